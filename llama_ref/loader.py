"""Loading a model: one function for every checkpoint a user brings, memory-mapped and in bounded memory.

Chapter 14 (the real Llama 2) teaches it; every command, chapter, script and benchmark loads through it.

    model = llama_ref.load("llama-2-7b-chat.Q4_K_M.gguf")     # -> Llama
    model = llama_ref.load("Llama-2-7b-chat-hf")               # HF directory: float32/float16/bfloat16, sharded or not
    print(model.memory)                                         # the MemoryPlan: the path taken and the estimate
    tok = find_tokenizer("llama-2-7b-chat.Q4_K_M.gguf")        # the tokenizer that came with the model

What `read_checkpoint(path)` reads (each reader memory-maps and validates; the format is picked from the path):
    HF directory      config.json + model.safetensors, or shards + model.safetensors.index.json  (checkpoint.py)
    llama2.c .bin     version 0 or 1                                                            (llama2c.py)
    .gguf             every tensor type gguf-py can dequantize, K-quants included                (gguf_io.py)
    quantized dir     what `python -m llama_ref quantize` writes                                (quant.py)

The memory contract. A process holds two kinds of memory:
    file pages   the mapped checkpoint. The OS reads a page when it is touched and may drop it again: at most the
                 file's size, and never more than once however many views point into it.
    anonymous    what we allocate: float32 copies of packed weights, the norms, one expanded tile, the KV cache for
                 the tokens asked for, the activations of one forward, and the interpreter with NumPy (CONSTANT).
    peak RSS  <=  file pages touched + anonymous estimate (MemoryPlan.anonymous_bytes)
`plan_memory` computes the estimate before anything large is allocated and picks the path:
    packed       float weights become contiguous (in, out) float32 copies once: the fastest forward. Taken when the
                 anonymous estimate with the copies fits the budget (half of what is available unless given).
    as stored    weights stay in the file's type; each matmul expands one tile (matrices.py). A model is refused
                 only when even this does not fit in what is available.
memory.py holds the plan and what "available" means (MemAvailable, the cgroup limit, RLIMIT_AS: the smallest).
Quantized weights are never packed: a Q4_K model runs as Q4_K ("as stored", with nothing to pack).
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import INDEX_NAME, load_hf_dir
from .llama2c import load_llama2c
from .config import LlamaConfig
from .inputs import read_json
from .errors import CheckpointError, TokenizerError
from .memory import plan_memory
from .model_files import TOKENIZER_CONFIG
from .model import Llama
from . import gguf_io, paths, quant, tokenizer

MAX_TOKENIZER_CONFIG_BYTES = 64 * 2 ** 20   # Meta's is 1.6 KB; ones listing thousands of added tokens reach MBs


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint of any format

def read_checkpoint(path=None, check_finite=True, heads=None) -> tuple[LlamaConfig, dict]:
    """(config, HF-named weights) from anything a user may give, memory-mapped and validated. Default: the embedded
    model. Weights are arrays or stored matrices (matrices.py, quant.py), each in the file's own type. `heads`
    {name: what it is}: tensors beside the model's that the caller reads (a reward model's score.weight, only in an
    HF directory), returned with the weights."""
    path = Path(path) if path is not None else paths.DEFAULT_MODEL
    if heads and not (path.is_dir() and not quant.is_quantized_dir(path)):
        raise CheckpointError(f"{path} is not an HF model directory; {', '.join(heads.values())} is read from one "
                              "(config.json + model.safetensors)")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give an HF model directory (config.json + model.safetensors), "
                              "a llama2.c .bin, a .gguf file or a directory written by `python -m llama_ref quantize`")
    if path.is_dir():
        if quant.is_quantized_dir(path):
            return quant.load_quantized_weights(path, check_finite)
        return load_hf_dir(path, check_finite, heads)
    if not path.is_file():                                   # a FIFO would block for ever on its first read
        raise CheckpointError(f"{path} is not a regular file or directory (a pipe, socket or device?); give an HF "
                              "model directory, a llama2.c .bin or a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    if path.suffix == ".gguf" or magic == b"GGUF":
        return gguf_io.load_gguf(path, check_finite)
    if path.suffix == ".safetensors" or path.name == INDEX_NAME:
        return read_checkpoint(path.parent, check_finite)
    if path.suffix == ".bin":
        return load_llama2c(path, check_finite)
    raise CheckpointError(f"{path}: unknown checkpoint format; llama_ref loads an HF model directory, a llama2.c "
                          ".bin or a .gguf file")


def checkpoint_bytes(path) -> int:
    """Bytes of the files a checkpoint maps: the file, or a directory's weight files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------
# The one loader

def load(path=None, pack: str = "auto", memory_budget: int | None = None, n_tokens: int | None = None,
         check_finite: bool = True) -> Llama:
    """A Llama from any checkpoint (read_checkpoint), packed or left as stored by the memory plan (plan_memory).

    pack: "auto" (by the budget), "always", "never". memory_budget: bytes the packed path may take (default half of
    MemAvailable). n_tokens: how many positions will be used (prompt + new tokens), for the KV cache estimate.
    The plan is kept as model.memory; model.source is the path."""
    path = Path(path) if path is not None else paths.DEFAULT_MODEL
    config, weights = read_checkpoint(path, check_finite)
    plan = plan_memory(config, weights, checkpoint_bytes(path), n_tokens, pack=pack, budget=memory_budget)
    model = Llama(config, weights, pack=plan.path == "packed")
    model.memory, model.source = plan, path
    return model


def tokenizer_source(model_path=None, tokenizer_path=None) -> Path | None:
    """Where the tokenizer that came with a model is: `tokenizer_path` if given (a SentencePiece .model, or a .gguf
    whose vocabulary to use), else tokenizer.model beside an HF or quantized directory, else the .gguf itself; None."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    model_path = Path(model_path) if model_path is not None else paths.DEFAULT_MODEL
    if model_path.is_dir() and (model_path / "tokenizer.model").exists():
        return model_path / "tokenizer.model"
    if model_path.is_file() and model_path.suffix == ".gguf":
        return model_path
    return None


def find_tokenizer(model_path=None, tokenizer_path=None, impl="sentencepiece"):
    """The tokenizer for a model (tokenizer_source), loaded: a Tokenizer, or None if the model came without one."""
    src = tokenizer_source(model_path, tokenizer_path)
    if src is None:
        return None
    if src.suffix == ".gguf":
        return gguf_tokenizer(src, impl, required=tokenizer_path is not None)
    return tokenizer.Tokenizer(src, impl=impl)


def read_chat_template(model_path=None) -> str | None:
    """The chat template a model carries, None for a model without one: `chat_template` of the tokenizer_config.json
    beside an HF or quantized directory, `tokenizer.chat_template` inside a .gguf. What an export of it passes on."""
    model_path = Path(model_path) if model_path is not None else paths.DEFAULT_MODEL
    if model_path.is_file() and model_path.suffix == ".gguf":
        return gguf_io.read_chat_template(model_path)
    file = model_path / TOKENIZER_CONFIG
    if not model_path.is_dir() or not file.exists():
        return None
    try:
        data = read_json(file, "tokenizer_config.json", TokenizerError, limit=MAX_TOKENIZER_CONFIG_BYTES)
    except TokenizerError as e:
        raise TokenizerError(f"{e}; remove it or copy the model's own tokenizer_config.json") from None
    template = data.get("chat_template") if isinstance(data, dict) else None
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{file}: chat_template is a {type(template).__name__}; llama_ref passes on one Jinja "
                             "string (a list of named templates is not supported): keep the default one")
    return template or None


def gguf_tokenizer(path, impl="sentencepiece", required=True):
    """The SentencePiece tokenizer a GGUF carries (tokenizer.ggml.tokens/scores/token_type), as a Tokenizer."""
    vocab = gguf_io.read_gguf_vocab(path)
    if vocab is None:
        if required:
            raise TokenizerError(f"{path} carries no SentencePiece vocabulary (tokenizer.ggml.model 'llama'); pass "
                                 "the model's tokenizer.model with --tokenizer")
        return None
    pieces, scores, types, unk_id = vocab
    bos, eos = gguf_io.special_ids(path)
    data = tokenizer.proto_from_vocab(pieces, scores, types, unk_id, bos, eos)
    return tokenizer.Tokenizer(Path(path), impl=impl, data=data)
