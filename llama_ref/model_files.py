"""What travels with a model beside its weights, so the tools people run it with use it unchanged.

Every model directory and export we write carries, next to config.json and the weights:

    tokenizer.model          the SentencePiece model itself (our tokenizer, llama.cpp's converter, GenAI's fallback)
    tokenizer.json           the same tokenizer for Hugging Face `tokenizers` (tokenizer.hf_tokenizer_json)
    tokenizer_config.json    which class reads tokenizer.json, the special tokens and, for a chat model, the chat
                             template (chat.LLAMA2_CHAT_TEMPLATE): what transformers' AutoTokenizer /
                             apply_chat_template and ONNX Runtime GenAI's og.Tokenizer read
    generation_config.json   BOS/EOS and, for a chat model, Meta's sampling defaults (below)

and a GGUF written from a chat model carries the template as `tokenizer.chat_template` (gguf_io), which llama.cpp and
llama-cpp-python render. Which model is a chat model is the caller's word (`chat_template=`); an export carries the
template its source carries (loader.read_chat_template), and a model without one gets none.

Why `tokenizer_class` is "PreTrainedTokenizerFast": that class reads tokenizer.json as written, so transformers 4.57
and 5.x give SentencePiece's ids on every text. Naming LlamaTokenizer(Fast) instead makes transformers 5 rebuild the
pre-tokenizer from its own Llama rules (two leading spaces lose a "▁"), and "legacy": false changes how text after a
special token is split in both versions (tests/test_interop.py shows each).

A template a client cannot parse is refused before anything is written (`check_chat_template`): it is compiled and
rendered the way transformers does, in jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from .config import LlamaConfig
from .errors import ChatFormatError, TokenizerError
from .inputs import read_bytes
from .tokenizer import MODEL_FILE_MAX_BYTES, _load_sentencepiece, hf_tokenizer_json

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
COMPANION_FILES = (TOKENIZER_MODEL, TOKENIZER_JSON, TOKENIZER_CONFIG, GENERATION_CONFIG)

# Meta's sampling defaults for the chat models: `temperature: float = 0.6, top_p: float = 0.9` in the Llama 2
# repository's example_chat_completion.py (github.com/meta-llama/llama), the values the generation_config.json of
# meta-llama/Llama-2-7b-chat-hf carries.
CHAT_TEMPERATURE, CHAT_TOP_P = 0.6, 0.9

PROBE_DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who are you?"}]


def check_chat_template(template: str) -> str:
    """The template, if a client can use it: it must compile and render a system + two-turn dialogue in the
    environment transformers renders with (jinja2's sandbox, trim_blocks, lstrip_blocks, raise_exception). Anything
    else is a ChatFormatError naming jinja2's complaint."""
    if not isinstance(template, str) or not template.strip():
        raise ChatFormatError(f"a chat template is a non-empty Jinja string, got {template!r:.60}")
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatFormatError("checking a chat template needs jinja2: pip install jinja2==3.1.6") from None

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(messages=PROBE_DIALOG, bos_token="<s>", eos_token="</s>",
                                                add_generation_prompt=True)
    except jinja2.TemplateError as e:               # syntax errors, undefined names, sandbox refusals, raise_exception
        raise ChatFormatError(f"the chat template cannot be rendered by a client ({type(e).__name__}: {e}); "
                              "fix the Jinja text") from None
    except Exception as e:                          # a template can raise anything while it runs (1 / 0, bad calls)
        raise ChatFormatError(f"the chat template fails while rendering ({type(e).__name__}: {e}); fix the Jinja "
                              "text") from None
    if "Who are you?" not in text:
        raise ChatFormatError("the chat template renders a dialogue without its last user message; a chat template "
                              "must render the messages it is given")
    return template


def tokenizer_config(config: LlamaConfig, tok_json: dict, chat_template: str | None = None) -> dict:
    """tokenizer_config.json for tokenizer.json (`tok_json`): PreTrainedTokenizerFast (BOS added by tokenizer.json's
    post-processor), the special tokens by their pieces, the context length and, for a chat model, the template."""
    pieces = {i: p for p, i in tok_json["model"]["vocab"].items()}
    out = {"tokenizer_class": "PreTrainedTokenizerFast",
           "bos_token": pieces[config.bos_id], "eos_token": pieces[config.eos_id],
           "unk_token": tok_json["model"]["unk_token"],
           "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": config.max_seq_len}
    if chat_template is not None:
        out["chat_template"] = check_chat_template(chat_template)
    return out


def slow_tokenizer_config(config: LlamaConfig, sp, chat_template: str | None = None) -> dict:
    """tokenizer_config.json for a SentencePiece model whose normalization tokenizer.json cannot state (NFKC, removed
    extra spaces): transformers' LlamaTokenizer, which runs the sentencepiece library on tokenizer.model itself."""
    out = {"tokenizer_class": "LlamaTokenizer", "legacy": True,
           "bos_token": sp.id_to_piece(config.bos_id), "eos_token": sp.id_to_piece(config.eos_id),
           "unk_token": sp.id_to_piece(sp.unk_id()), "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "model_max_length": config.max_seq_len}
    if chat_template is not None:
        out["chat_template"] = check_chat_template(chat_template)
    return out


def generation_config(config: LlamaConfig, chat: bool = False) -> dict:
    """generation_config.json: BOS/EOS, and for a chat model Meta's chat sampling defaults (do_sample, temperature
    0.6, top_p 0.9, max_length the context)."""
    out = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id}
    if chat:
        out.update({"do_sample": True, "temperature": CHAT_TEMPERATURE, "top_p": CHAT_TOP_P,
                    "max_length": config.max_seq_len})
    return out


def tokenizer_bytes(tokenizer) -> bytes | None:
    """A tokenizer given as a .model path or as its bytes -> the bytes (None stays None)."""
    if tokenizer is None or isinstance(tokenizer, bytes):
        return tokenizer
    return read_bytes(tokenizer, "tokenizer model", TokenizerError, limit=MODEL_FILE_MAX_BYTES)   # regular, capped


def companion_files(config: LlamaConfig, tokenizer=None, chat_template: str | None = None) -> dict[str, bytes]:
    """{file name: bytes} of everything that travels with a model beside config.json and the weights.

    tokenizer: the SentencePiece .model (path or bytes) or None: without one only generation_config.json is
    written (a chat template without a tokenizer is refused: it lives in tokenizer_config.json)."""
    if chat_template is not None:
        check_chat_template(chat_template)
    files = {GENERATION_CONFIG: _json(generation_config(config, chat=chat_template is not None))}
    data = tokenizer_bytes(tokenizer)
    if data is None:
        if chat_template is not None:
            raise TokenizerError("a chat template travels in tokenizer_config.json beside the tokenizer: pass the "
                                 "tokenizer.model too")
        return files
    name = Path(TOKENIZER_MODEL if isinstance(tokenizer, bytes) else tokenizer)
    sp = _load_sentencepiece(name, data)                     # a corrupt file is refused here, whatever follows
    if sp.get_piece_size() != config.vocab_size:
        raise TokenizerError(f"the tokenizer has {sp.get_piece_size()} pieces but the model's vocab_size is "
                             f"{config.vocab_size}; pass the tokenizer the model was trained with")
    files[TOKENIZER_MODEL] = data
    try:
        tok_json = hf_tokenizer_json(name, data)
    except TokenizerError as e:                              # normalization rules tokenizer.json cannot state
        warnings.warn(f"{e}; no tokenizer.json is written: transformers will read tokenizer.model with its "
                      "sentencepiece-based LlamaTokenizer")
        files[TOKENIZER_CONFIG] = _json(slow_tokenizer_config(config, sp, chat_template))
        return files
    files[TOKENIZER_JSON] = json.dumps(tok_json, ensure_ascii=False).encode("utf-8")
    files[TOKENIZER_CONFIG] = _json(tokenizer_config(config, tok_json, chat_template))
    return files


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
