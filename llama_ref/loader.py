"""Loading a model: one function for every checkpoint a user brings, memory-mapped and in bounded memory.

Chapter 14 (the real Llama 2) teaches it; every command, chapter, script and benchmark loads through it.

    model = llama_ref.load("llama-2-7b-chat.Q4_K_M.gguf")     # -> Llama
    model = llama_ref.load("Llama-2-7b-chat-hf")               # HF directory: float32/float16/bfloat16, sharded or not
    print(model.memory)                                         # the MemoryPlan: the path taken and the estimate
    tok = find_tokenizer("llama-2-7b-chat.Q4_K_M.gguf")        # the tokenizer that came with the model

What `read_checkpoint(path)` reads (each reader memory-maps and validates; the format is picked from the path):
    HF directory      config.json + model.safetensors, or shards + model.safetensors.index.json  (checkpoint.py)
    llama2.c .bin     version 0 or 1                                                          (checkpoint.py)
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
                 anonymous estimate with the copies fits the budget (half of MemAvailable unless given).
    as stored    weights stay in the file's type; each matmul expands one tile (matrices.py). A model is refused
                 only when even this does not fit in MemAvailable.
Quantized weights are never packed: a Q4_K model runs as Q4_K ("as stored", with nothing to pack).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .checkpoint import INDEX_NAME, load_hf_dir
from .llama2c import load_llama2c
from .config import LlamaConfig
from .errors import CheckpointError, MemoryBudgetError, TokenizerError
from .matrices import TILE_FLOATS
from .model import Llama, kv_cache_bytes
from .weights import weight_shapes
from . import gguf_io, paths, quant, tokenizer

CONSTANT_BYTES = 320 * 2 ** 20          # Python, NumPy, OpenBLAS buffers, this package (measured: benchmarks/big_model.py)
TILE_BYTES = 8 * TILE_FLOATS * 4        # one expanded tile and the decoders' temporaries (K-quants need the most)
GIB = 2 ** 30


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


def weight_kinds(weights: dict) -> dict[str, int]:
    """How many tensors of each stored kind a checkpoint holds: {"q4_k": 193, "q6_k": 33, "f32": 65}."""
    kinds = {}
    for w in weights.values():
        kind = getattr(w, "kind", None) or {"float32": "f32", "float16": "f16"}.get(str(w.dtype), str(w.dtype))
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------------
# The memory plan

@dataclasses.dataclass
class MemoryPlan:
    """Which path a model takes and what it will hold, in bytes. anonymous_bytes is the contract's right-hand side
    (without the file pages): the packed copies (when packed), the norms, one tile, the KV cache and activations for
    `n_tokens`, and CONSTANT_BYTES."""
    path: str                   # "packed" or "as stored"
    file_bytes: int
    packed_bytes: int           # the float32 copies packing makes (0 for a model with nothing to pack)
    anonymous_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    n_tokens: int
    budget: int
    available: int | None
    kinds: dict

    def __str__(self):
        how = ("float weights packed as float32 (in, out) copies" if self.path == "packed" else
               "weights as stored, memory-mapped; one tile expanded to float32 per matmul")
        kinds = ", ".join(f"{k} x{n}" for k, n in self.kinds.items())
        avail = f"{self.available / GIB:.1f} GiB" if self.available is not None else "unknown"
        return (f"{how} ({kinds}). Memory: file {self.file_bytes / GIB:.2f} GiB mapped + {self.anonymous_bytes / GIB:.2f}"
                f" GiB allocated (KV cache for {self.n_tokens} tokens {self.kv_cache_bytes / 2**20:.0f} MiB"
                + (f", float32 copies {self.packed_bytes / GIB:.2f} GiB" if self.path == "packed" else "")
                + f"); available {avail}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (RAM the kernel can hand out without swapping), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024                         # the file says kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def packed_bytes(config: LlamaConfig, weights: dict) -> int:
    """Bytes of the float32 copies Llama(pack=True) makes: every float (not quantized) matrix, the embedding when it is
    not float32 already, and the (C, V) classifier a tied float embedding is packed into."""
    total = 0
    for name, shape in weight_shapes(config).items():
        w = weights[name]
        if len(shape) != 2 or getattr(w, "quantized", False):
            continue
        if name == "model.embed_tokens.weight":
            is_f32_array = isinstance(w, np.ndarray) and w.dtype == np.float32
            total += (0 if is_f32_array else 4 * shape[0] * shape[1]) + (4 * shape[0] * shape[1] if config.tie_embeddings else 0)
        else:
            total += 4 * shape[0] * shape[1]
    return total


def activation_bytes(config: LlamaConfig, n_tokens: int, batch_size: int = 1) -> int:
    """A forward over n_tokens at once (the prefill): the residual stream and its norms, q/k/v, SwiGLU's three (T, H)
    arrays, the logits, and the attention scores and probabilities of one layer (B, nh, T, S) with S = T."""
    T, B = n_tokens, batch_size
    per_token = 8 * config.dim + 4 * config.hidden_dim + config.vocab_size
    return 4 * B * (T * per_token + 2 * config.n_heads * T * T)


def plan_memory(config: LlamaConfig, weights: dict, file_bytes: int = 0, n_tokens: int | None = None,
                batch_size: int = 1, pack: str = "auto", budget: int | None = None) -> MemoryPlan:
    """Choose packed or as stored (pack = "auto" | "always" | "never") and estimate the memory, or refuse with a
    MemoryBudgetError naming the numbers, before anything large is allocated."""
    if pack not in ("auto", "always", "never"):
        raise CheckpointError(f"pack={pack!r}: choose auto, always or never")
    n_tokens = min(config.max_seq_len, 4096) if n_tokens is None else max(1, int(n_tokens))
    available = available_ram_bytes()
    if budget is None:
        budget = available // 2 if available is not None else 4 * GIB
    capacity = min(config.max_seq_len, max(256, 2 * n_tokens))         # the KV cache grows by doubling
    kv = kv_cache_bytes(config, batch_size, capacity)
    act = activation_bytes(config, n_tokens, batch_size)
    norms = 4 * config.dim * (2 * config.n_layers + 1)
    base = norms + TILE_BYTES + kv + act + CONSTANT_BYTES
    copies = packed_bytes(config, weights)
    if copies > 0 and (pack == "always" or (pack == "auto" and base + copies <= budget)):
        path, anonymous = "packed", base + copies
    else:
        path, anonymous = "as stored", base
    plan = MemoryPlan(path, file_bytes, copies, anonymous, kv, act, n_tokens, budget, available,
                      weight_kinds(weights))
    if available is not None and anonymous > available:
        what = ("with float32 copies of its weights" if path == "packed" else
                "even with its weights left as stored")
        raise MemoryBudgetError(
            f"this model needs ~{anonymous / GIB:.1f} GiB of memory {what} (KV cache for {n_tokens} tokens "
            f"{kv / GIB:.2f} GiB, activations {act / GIB:.2f} GiB), more than the {available / GIB:.1f} GiB available; "
            + ("let it run as stored (--pack never / pack='never')" if path == "packed" else
               "ask for fewer tokens, or use a smaller or more quantized model"))
    return plan


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


def find_tokenizer(model_path=None, tokenizer_path=None, impl="sentencepiece"):
    """The tokenizer for a model: `tokenizer_path` if given (a SentencePiece .model, or a .gguf whose vocabulary to
    use), else tokenizer.model beside an HF or quantized directory, else the vocabulary inside a .gguf; None if none."""
    model_path = Path(model_path) if model_path is not None else paths.DEFAULT_MODEL
    if tokenizer_path is not None:
        p = Path(tokenizer_path)
        return gguf_tokenizer(p, impl) if p.suffix == ".gguf" else tokenizer.Tokenizer(p, impl=impl)
    beside = model_path / "tokenizer.model"
    if model_path.is_dir() and beside.exists():
        return tokenizer.Tokenizer(beside, impl=impl)
    if model_path.is_file() and model_path.suffix == ".gguf":
        return gguf_tokenizer(model_path, impl, required=False)
    return None


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
