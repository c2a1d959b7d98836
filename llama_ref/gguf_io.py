"""GGUF: write our models the way llama.cpp expects them, and read GGUF files back into our forward.

Chapter 12 uses it; `python -m llama_ref export --format gguf-q8_0` and `quantize --scheme q4_0 --out x.gguf`
call it; loader.read_checkpoint sends `.gguf` paths to load_gguf, which reads every tensor type gguf-py can
dequantize (chapter 14).

A GGUF file is: header, key/value metadata (architecture hyper-parameters, the tokenizer), tensor infos
(name, ggml type, dims), then the tensor data, aligned to 32 bytes. We write it with the `gguf` package
(gguf-py, maintained in llama.cpp's repository) and read it memory-mapped with our own header reader (GGUFHeader).

Three things differ from our HF-layout weights dict:
  names   token_embd.weight, blk.{i}.attn_q.weight, ... (the GGUF column of weights.py's name table)
  q, k    rows in Meta's interleaved RoPE layout: convert_hf_to_gguf.py permutes HF weights back, so do we
          (permute_qk_hf_to_meta with n_heads for q and n_kv_heads for k). Rows of a block-quantized matrix are
          independent, so a writer permutes Q8_0/Q4_0 byte rows without dequantizing, and the reader presents the
          file's rows in HF order through a matrices.RowPermuted view (no copy).
  shapes  GGUF lists dims fastest-first (ne0 = in): an HF (out, in) matrix has ne = [in, out]. gguf-py
          reverses them for us on write and read.
Tensor types we write, by file type (llama.cpp's LlamaFileType): 1-D tensors (norms) are always F32; 2-D tensors are
F32 / F16 / Q8_0 / Q4_0 (we read every type: GGUFMatrix below). For Q4_0 files the classifier is Q8_0 (llama.cpp's quantizer keeps output.weight at
higher precision, Q6_K, which gguf-py cannot write; see quant.py's policy). A 2-D tensor whose rows are not a
multiple of 32 is written as F16, as convert_hf_to_gguf.py does.
"""
from __future__ import annotations

import functools
import struct
import warnings
from typing import NamedTuple
from pathlib import Path

import numpy as np

from .config import LlamaConfig, config_from_fields, parse_rope_scaling
from .errors import CheckpointError, LlamaRefError, QuantizationError, TokenizerError
from .output import atomic_file, check_output, inputs_of
from .weights import (GGUF, HF, check_weights, permute_qk_hf_to_meta, qk_heads, qk_rows_hf_to_meta, qk_rows_meta_to_hf,
                      rename)
from .model_files import check_chat_template
from .matrices import BFloat16Matrix, Float16Matrix, RowPermuted, StoredMatrix, as_stored, bf16_to_f32, plain
from .tokenizer import _load_sentencepiece
from . import quant

F32 = np.float32

FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}       # LlamaFileType values for general.file_type

def hf_to_gguf_name(name: str) -> str:
    """GGUF's name of an HF-named tensor (the one table: weights.LAYER_TENSORS / MODEL_TENSORS)."""
    return rename(name, GGUF, HF)


def gguf_to_hf_name(name: str) -> str | None:
    """HF's name of a GGUF tensor; None if it is not part of a Llama 2 model."""
    return rename(name, HF, GGUF)


# ------------------------------------------------------------------------------------------------
# q/k permutation on float or quantized rows

def _rows_in_meta_order(w, n_heads):
    """A q/k weight (HF rotate-half rows) with its rows in Meta's pair order, as GGUF stores them: a float array is
    permuted, a Q8_0/Q4_0 matrix gets its byte rows permuted (rows of blocks are independent: no dequantization)."""
    if not isinstance(w, StoredMatrix):
        return permute_qk_hf_to_meta(np.asarray(w), n_heads)
    w = w.take_rows(qk_rows_hf_to_meta(w.shape[0], n_heads))      # a view, or the file's own matrix back
    if isinstance(w, RowPermuted) and isinstance(w.inner, (quant.Q8_0Matrix, quant.Q4_0Matrix)):
        w = type(w.inner)(np.ascontiguousarray(w.inner.data[w.perm]), w.shape)
    if isinstance(w, quant.QuantizedMatrix) and not isinstance(w, (quant.Q8_0Matrix, quant.Q4_0Matrix)):
        raise QuantizationError(f"{w.kind} matrices cannot go into a GGUF file; use q8_0, q4_0, f16 or f32")
    return w


# ------------------------------------------------------------------------------------------------
# The tokenizer as GGUF metadata (what convert_hf_to_gguf.py's _create_vocab_sentencepiece writes)

def sentencepiece_vocab(tokenizer_path):
    """(pieces, scores, token types) of a SentencePiece .model, with gguf.TokenType codes."""
    from gguf import TokenType
    sp = _load_sentencepiece(Path(tokenizer_path))                   # TokenizerError for a missing or corrupt file
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(int(TokenType.UNKNOWN))
        elif sp.is_control(i):
            types.append(int(TokenType.CONTROL))
        elif sp.is_unused(i):
            types.append(int(TokenType.UNUSED))
        elif sp.is_byte(i):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.NORMAL))
    return pieces, scores, types, sp.unk_id()


class GGUFVocab(tuple):
    """(pieces, scores, types, unk_id) taken from a GGUF file, to carry a vocabulary over into a new GGUF."""


def _token_id(r, key, default, path) -> int:
    v = _field(r, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise TokenizerError(f"{path}: {key}={v!r} is not a token id; the GGUF's tokenizer metadata is corrupt")
    return int(v)


def special_ids(path) -> tuple[int, int]:
    """(BOS, EOS) token ids a GGUF names (Llama 2's 1 and 2 when it does not)."""
    r = _open_gguf(path)
    return _token_id(r, "tokenizer.ggml.bos_token_id", 1, path), _token_id(r, "tokenizer.ggml.eos_token_id", 2, path)


def read_gguf_vocab(path) -> GGUFVocab | None:
    """The SentencePiece vocabulary stored in a GGUF (tokenizer.ggml.*), or None if it has none. Scores and token
    types may be absent (llama.cpp then takes 0.0 and NORMAL, and so do we); pieces must be distinct strings and
    every array as long as the pieces, else TokenizerError."""
    r = _open_gguf(path)
    if _field(r, "tokenizer.ggml.tokens") is None or _field(r, "tokenizer.ggml.model") != "llama":
        return None
    pieces = _field(r, "tokenizer.ggml.tokens")
    n = len(pieces) if isinstance(pieces, list) else 0
    scores = _field(r, "tokenizer.ggml.scores", [0.0] * n)
    types = _field(r, "tokenizer.ggml.token_type", [1] * n)
    fix = "the GGUF's tokenizer metadata is corrupt: re-export it, or pass --tokenizer"
    if not n or not all(isinstance(p, str) for p in pieces):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens must be a non-empty array of strings; {fix}")
    for key, values in (("scores", scores), ("token_type", types)):
        if not isinstance(values, list) or len(values) != n or not all(
                isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)
                for v in values):
            raise TokenizerError(f"{path}: tokenizer.ggml.{key} must hold {n} finite numbers, one per token; {fix}")
    if not all(isinstance(t, (int, np.integer)) and 1 <= t <= 6 for t in types):
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type holds a type outside 1..6 (SentencePiece's); {fix}")
    if len(set(pieces)) != n:
        seen = set()
        dup = next(p for p in pieces if p in seen or seen.add(p))
        raise TokenizerError(f"{path}: the piece {dup!r} appears twice in tokenizer.ggml.tokens; {fix}")
    unk = _token_id(r, "tokenizer.ggml.unknown_token_id", 0, path)
    if unk >= n:
        raise TokenizerError(f"{path}: tokenizer.ggml.unknown_token_id={unk} is outside the {n} tokens; {fix}")
    return GGUFVocab((pieces, scores, types, unk))


def read_chat_template(path) -> str | None:
    """The chat template a GGUF carries (tokenizer.chat_template), or None."""
    template = _field(_open_gguf(path), "tokenizer.chat_template")
    return template if isinstance(template, str) and template else None


# ------------------------------------------------------------------------------------------------
# Writing

def _gguf_tensors(config: LlamaConfig, weights: dict, file_type: str):
    """(gguf name, array, raw ggml type or None) for every tensor, in llama.cpp's order, Meta q/k layout."""
    from gguf import GGMLQuantizationType as GT
    if file_type in ("q8_0", "q4_0"):
        weights = quant.quantize_weights(config, weights, file_type, on_bad_shape="keep")
    out = []
    for name in weights:
        w, heads = weights[name], qk_heads(name, config)
        if heads is not None:                                  # q/k: back to Meta's pair order
            w = _rows_in_meta_order(w, heads)
        gname = hf_to_gguf_name(name)
        if isinstance(w, quant.Q8_0Matrix):
            out.append((gname, np.ascontiguousarray(w.data), GT.Q8_0))
        elif isinstance(w, quant.Q4_0Matrix):
            out.append((gname, np.ascontiguousarray(w.data), GT.Q4_0))
        elif isinstance(w, quant.QuantizedMatrix):
            raise QuantizationError(f"{name} is {w.kind}, which GGUF has no type for; export as q8_0, q4_0, f16 "
                                    "or f32 (the values are re-quantized from the dequantized weights)")
        else:
            a = np.asarray(w, F32)
            if a.ndim == 2 and file_type != "f32":          # f16 files, and the F16 fallback of q8_0/q4_0 files
                a = a.astype(np.float16)
            out.append((gname, np.ascontiguousarray(a), None))
    return out


def save_gguf(path, config: LlamaConfig, weights, tokenizer_path=None, file_type="q8_0", force=False,
              name="llama_ref model", chat_template=None) -> Path:
    """Write a Llama GGUF file (file_type f32 | f16 | q8_0 | q4_0), atomically (temp file + rename).

    weights: an HF-named dict (float arrays and/or quant matrices) or a Llama. Quantized q8_0/q4_0 matrices that
    already have the file's format are written byte for byte; float tensors are quantized here.
    tokenizer_path: the SentencePiece .model (llama.cpp needs the vocabulary; without it the file is written
    with a warning and only our loader can run it), or a GGUFVocab read from another GGUF (read_gguf_vocab).
    chat_template: a chat model's Jinja template (chat.LLAMA2_CHAT_TEMPLATE), written as tokenizer.chat_template,
    which llama.cpp and llama-cpp-python render; checked before anything is written.
    """
    if not isinstance(weights, dict):                          # a Llama: its weights under HF names
        weights = weights.weights
    if file_type not in FILE_TYPES:
        raise QuantizationError(f"GGUF file type {file_type!r}: choose one of {', '.join(FILE_TYPES)}")
    if file_type in ("f32", "f16"):
        weights = {k: (v.dequantize() if isinstance(v, quant.QuantizedMatrix) else v) for k, v in weights.items()}
    path = check_output(path, force=force, inputs=inputs_of(weights, tokenizer_path))
    if config.rope_scaling is not None and config.rope_scaling.kind != "linear":
        raise CheckpointError(f"GGUF (as llama.cpp reads it) has no {config.rope_scaling.kind!r} RoPE scaling for Llama; "
                              "only 'linear' can be written: save this model as an HF directory instead")
    too_big = {k: v for k, v in (("context_length", config.max_seq_len), ("embedding_length", config.dim),
                                 ("block_count", config.n_layers), ("feed_forward_length", config.hidden_dim),
                                 ("vocab_size", config.vocab_size)) if v >= 2 ** 32}
    if too_big:
        raise CheckpointError(f"GGUF stores llama.{next(iter(too_big))} as a 32-bit number and "
                              f"{next(iter(too_big.values())):,} does not fit; lower it in the config before exporting")
    if chat_template is not None:
        check_chat_template(chat_template)
    tensors = _gguf_tensors(config, weights, file_type)
    vocab = None
    if tokenizer_path is not None:
        vocab = tokenizer_path if isinstance(tokenizer_path, GGUFVocab) else sentencepiece_vocab(tokenizer_path)
        if len(vocab[0]) != config.vocab_size:
            raise CheckpointError(f"the tokenizer {tokenizer_path} has {len(vocab[0])} pieces but the model's "
                                  f"vocab_size is {config.vocab_size}; pass the tokenizer it was trained with")
    else:
        warnings.warn("GGUF written without a tokenizer: llama.cpp will refuse it; pass tokenizer_path")
    with atomic_file(path, force=force) as tmp:
        _write_gguf(tmp, config, tensors, vocab, file_type, name, chat_template)
    return path


def _write_gguf(tmp, config, tensors, vocab, file_type, name, chat_template=None):
    """The GGUF itself, written by gguf-py's GGUFWriter to `tmp` (save_gguf renames it into place)."""
    import gguf
    w = gguf.GGUFWriter(str(tmp), "llama")
    add_llama_metadata(w, config, FILE_TYPES[file_type], vocab, name, quantized=file_type in ("q8_0", "q4_0"))
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for gname, arr, raw in tensors:
        w.add_tensor(gname, arr, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def add_llama_metadata(w, config: LlamaConfig, file_type: int, vocab=None, name="llama_ref model", quantized=True):
    """What llama.cpp reads from a Llama GGUF, onto a gguf-py GGUFWriter: the llama.* hyper-parameters, the file type
    (llama.cpp's LlamaFileType number) and, given vocab = (pieces, scores, types, unk_id), the tokenizer.ggml.* keys."""
    import gguf
    w.add_name(name)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.norm_eps))
    w.add_rope_dimension_count(config.head_dim)
    if config.rope_scaling is not None:                   # llama.cpp stores linear scaling as metadata
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(config.rope_scaling.factor))
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)
    if quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if vocab is not None:
        pieces, scores, types, unk_id = vocab
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(config.bos_id)
        w.add_eos_token_id(config.eos_id)
        w.add_unk_token_id(unk_id if unk_id >= 0 else 0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)


# ------------------------------------------------------------------------------------------------
# Reading: the header, parsed once by our own reader
#
#   "GGUF" | version u32 (2 or 3) | tensor count u64 | metadata count u64
#   metadata: key (string) | value type u32 | value          string = length u64 | UTF-8 bytes
#             array = item type u32 | count u64 | items      (types below)
#   tensor infos: name (string) | n_dims u32 | dims u64 x n_dims (fastest first) | ggml type u32 | offset u64
#   tensor data from the first multiple of general.alignment (32) after the infos; each tensor at its offset
# gguf-py's GGUFReader makes a NumPy view per value, 3.5 s for a 32000-piece vocabulary; this reader reads the same
# bytes with struct and np.frombuffer (30 ms), and checks every count against the bytes left before it reads or
# allocates anything, so a lying header is a CheckpointError naming what lied, never a huge allocation.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MIN_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
GGML_MAX_DIMS = 4


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: object          # gguf.GGMLQuantizationType
    shape: tuple                 # GGUF's order: fastest-varying first (ne0 = the row length)
    data: np.ndarray             # the bytes in the file: float32/float16/bf16 bits (numpy order), or (rows, row bytes)


class GGUFHeader:
    """A GGUF file's metadata (`kv`: key -> Python value, arrays as lists) and tensors (GGUFTensor, data memory-mapped),
    read once. `source` names the file in messages."""

    def __init__(self, path):
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES
        self.source = str(path)
        self.map = np.memmap(path, np.uint8, mode="r")
        self.buf, self.pos = memoryview(self.map), 0
        if bytes(self.buf[:4]) != b"GGUF":
            raise self.error("does not start with the GGUF magic bytes")
        self.pos = 4
        version = self.scalar("<I", "the version")
        if version not in (2, 3):
            raise self.error(f"has GGUF version {version:#x}; llama_ref reads versions 2 and 3 (little-endian)")
        n_tensors, n_kv = self.scalar("<Q", "the tensor count"), self.scalar("<Q", "the metadata count")
        self.check_count(n_kv, 8 + 4 + 1, "the metadata count")
        self.kv = {}
        for _ in range(n_kv):
            key = self.string("a metadata key")
            if key in self.kv:
                raise self.error(f"holds metadata key {key!r} twice")
            self.kv[key] = self.value(self.scalar("<I", f"the type of {key!r}"), key)
        self.check_count(n_tensors, 8 + 4 + 4 + 8, "the tensor count")
        infos = []
        for _ in range(n_tensors):
            name = self.string("a tensor name")
            n_dims = self.scalar("<I", f"the dimension count of tensor {name!r}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise self.error(f"says tensor {name!r} has {n_dims} dimensions (1 to {GGML_MAX_DIMS})")
            dims = tuple(self.scalar("<Q", f"a dimension of tensor {name!r}") for _ in range(n_dims))
            code = self.scalar("<I", f"the type of tensor {name!r}")
            try:
                kind = GGMLQuantizationType(code)
            except ValueError:
                raise self.error(f"says tensor {name!r} has type {code}, which no ggml type is") from None
            infos.append((name, dims, kind, self.scalar("<Q", f"the data offset of tensor {name!r}")))
        alignment = self.kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
            raise self.error(f"has general.alignment={alignment!r}; it must be a power of two")
        start = -(-self.pos // alignment) * alignment
        names, self.tensors = set(), []
        for name, dims, kind, offset in infos:
            if name in names:
                raise self.error(f"holds tensor {name!r} twice")
            names.add(name)
            block, size = GGML_QUANT_SIZES[kind]
            count = int(np.prod(dims, dtype=object))
            if count == 0 or dims[0] % block:
                raise self.error(f"says tensor {name!r} has shape {dims}, whose rows are not whole {kind.name} blocks "
                                 f"of {block}")
            nbytes = count // block * size
            if start + offset + nbytes > len(self.map):
                raise self.error(f"says tensor {name!r} ({nbytes:,} bytes) lies at byte {start + offset:,}, past the "
                                 f"end of the {len(self.map):,}-byte file: it is truncated")
            raw = self.map[start + offset:start + offset + nbytes]
            self.tensors.append(GGUFTensor(name, kind, dims, _tensor_view(raw, dims, kind, block, size)))

    def error(self, what):
        return CheckpointError(f"{self.source} {what}; the file is not a GGUF llama_ref can read (truncated or corrupt?):"
                               " re-download or re-export it")

    def check_count(self, n, min_bytes, what):
        left = len(self.map) - self.pos
        if n * min_bytes > left:
            raise self.error(f"says {what} is {n:,}, more than the {left:,} bytes left can hold")

    def scalar(self, fmt, what):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.map):
            raise self.error(f"ends inside {what} (byte {self.pos:,})")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what):
        n = self.scalar("<Q", f"the length of {what}")
        self.check_count(n, 1, f"the length of {what}")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"holds {what} that is not UTF-8 ({raw[:40]!r})") from None

    def value(self, vtype, key):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"the value of {key!r}")
        if vtype == _STRING:
            return self.string(f"the value of {key!r}")
        if vtype != _ARRAY:
            raise self.error(f"gives metadata key {key!r} the value type {vtype}, which GGUF does not have")
        item = self.scalar("<I", f"the item type of {key!r}")
        n = self.scalar("<Q", f"the length of {key!r}")
        if item not in _MIN_BYTES:
            raise self.error(f"gives the items of {key!r} the type {item}, which GGUF does not have")
        self.check_count(n, _MIN_BYTES[item], f"the length of {key!r}")
        if item in _SCALARS:                                          # numbers: one view of the bytes
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return values
        return [self.value(item, f"{key}[{i}]") for i in range(n)]


def _tensor_view(raw, dims, kind, block, size):
    """A tensor's bytes as the array readers use: float types in numpy order (reversed dims), block types as
    (rows..., bytes per row)."""
    float_types = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8,
                   "I16": np.int16, "I32": np.int32, "I64": np.int64}
    if kind.name in float_types:
        return raw.view(float_types[kind.name]).reshape(tuple(reversed(dims)))
    return raw.reshape(*reversed(dims[1:]), dims[0] // block * size)


def _field(reader, key, default=None):
    return reader.kv.get(key, default)


def _f32_value(v) -> float:
    """GGUF stores these floats as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal that
    rounds to the same float32 (numpy's str), so the config equals the one that was written. Anything that is not
    a real number is returned as it is, for the config parser to refuse by name."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return v
    return float(str(np.float32(v)))


def gguf_config(reader, source="the GGUF") -> LlamaConfig:
    """LlamaConfig from a GGUF's llama.* keys (vocab size from llama.vocab_size, the token list or token_embd),
    through the same typed parser as config.json: a string, a fraction or a zero where a count belongs is an error."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: GGUF architecture is {arch!r}; llama_ref runs only 'llama' (Llama 2) models")
    a = "llama."
    names = {t.name: t for t in reader.tensors}
    vocab = _field(reader, a + "vocab_size")
    if vocab is None:
        toks = _field(reader, "tokenizer.ggml.tokens")
        vocab = len(toks) if isinstance(toks, list) else None
    if vocab is None and "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[1])
    n_heads = _field(reader, a + "attention.head_count")
    fields = {
        "dim": (a + "embedding_length", _field(reader, a + "embedding_length")),
        "n_layers": (a + "block_count", _field(reader, a + "block_count")),
        "n_heads": (a + "attention.head_count", n_heads),
        "n_kv_heads": (a + "attention.head_count_kv", _field(reader, a + "attention.head_count_kv", n_heads)),
        "hidden_dim": (a + "feed_forward_length", _field(reader, a + "feed_forward_length")),
        "vocab_size": (a + "vocab_size", vocab),
        "max_seq_len": (a + "context_length", _field(reader, a + "context_length", 2048)),
        "rope_theta": (a + "rope.freq_base", _f32_value(_field(reader, a + "rope.freq_base", 10000.0))),
        "norm_eps": (a + "attention.layer_norm_rms_epsilon",
                     _f32_value(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5))),
        "tie_embeddings": ("output.weight", "output.weight" not in names),
        "bos_id": ("tokenizer.ggml.bos_token_id", _field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_id": ("tokenizer.ggml.eos_token_id", _field(reader, "tokenizer.ggml.eos_token_id", 2)),
    }
    for name in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"):
        if fields[name][1] is None:
            raise CheckpointError(f"{source} lacks {fields[name][0]}, a hyper-parameter every Llama GGUF has; was it "
                                  "written for Llama?")
    config = config_from_fields(fields, f"{source} (GGUF metadata)")
    scaling = _field(reader, a + "rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise CheckpointError(f"{source}: llama.rope.scaling.type={scaling!r}; llama_ref reads GGUF RoPE scaling of type "
                              "'linear' only (running without it would give wrong outputs)")
    if scaling == "linear":
        factor = _field(reader, a + "rope.scaling.factor")
        config = config.replace(rope_scaling=parse_rope_scaling({"rope_type": "linear", "factor": factor},
                                                                "llama.rope.scaling", f"{source} (GGUF metadata)"))
    rope_dims = _field(reader, a + "rope.dimension_count")
    if rope_dims is not None and rope_dims != config.head_dim:
        raise CheckpointError(f"{source}: llama.rope.dimension_count={rope_dims!r} differs from the head size "
                              f"{config.head_dim}: partial RoPE is not Llama 2")
    return config


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int):
    """A file's header is parsed once per version (path, modification time, size), however many of config, weights
    and tokenizer are read from it."""
    return GGUFHeader(path)


def _open_gguf(path):
    """The parsed header (GGUFHeader) of `path`, or CheckpointError for anything that is not a readable GGUF."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give the path of a .gguf file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a .gguf file")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a pipe or a device?); give a .gguf file")
    try:
        st = path.stat()
        return _reader(str(path.resolve()), st.st_mtime_ns, st.st_size)
    except LlamaRefError:
        raise
    except (Exception, MemoryError) as e:                          # noqa: BLE001 - an empty file, a read error
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); it is "
                              "truncated or corrupt: re-download or re-export it") from None


# Where each block type keeps its fp16 scales (byte offsets inside one block), from ggml-common.h's block structs: the
# only bytes of a block that can make its values inf/NaN (the rest are integer codes and grid indices).
FP16_SCALES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,),
               "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,),
               "TQ1_0": (52,), "TQ2_0": (64,)}


class GGUFMatrix(quant.QuantizedMatrix):
    """A GGUF tensor of any block type, as stored: raw rows (out, bytes per row), expanded by the type's decoder.

    A few tokens multiply Q8_0, Q4_0 and the K-quants of the Q4_K_M/Q5_K_M mixes (Q4_K, Q5_K, Q6_K) by block dot
    products (quant.q4_k_dots ...); more tokens, and every other type, expand a tile with a decoder: quant.py's for
    Q8_0, Q4_0, Q4_K and Q6_K, gguf-py's NumPy ones for the rest (Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, the IQ types ...)."""

    act_quant = None                      # "q8_k": round activations as llama.cpp does (quant.set_integer_dot)

    def __init__(self, data, shape, ggml_type):
        self.data, self.shape, self.ggml_type = plain(data), tuple(shape), ggml_type
        self.kind = ggml_type.name.lower()

    def _input(self, x):
        return quant.fake_quantize_q8_k(x) if self.act_quant == "q8_k" else np.asarray(x, F32)

    def _dequantize_rows(self, rows):
        return self._decode(self.data[rows])

    def _expand(self, rows, out):
        return self._decode(self.data[rows], out)

    def _decode(self, raw, out=None):
        decode = _OUR_DECODERS.get(self.ggml_type.name)
        if decode is not None:
            return decode(raw, out)
        from gguf.quants import dequantize
        with np.errstate(all="ignore"):                    # inf/NaN scales are reported by the finiteness check
            w = dequantize(raw, self.ggml_type).reshape(*raw.shape[:-1], self.shape[1])
        if out is None:
            return w
        out[...] = w
        return out

    def _tile(self, x, rows, out, s):
        dots, most = _BLOCK_DOTS.get(self.ggml_type.name, (None, 0))
        if x.shape[0] <= most:
            return dots(self.data[rows], x, out, s)
        return super()._tile(x, rows, out, s)

    def first_nonfinite(self):
        offsets = FP16_SCALES.get(self.ggml_type.name)
        if offsets is None:                                # a type whose float parts are not simple fp16 fields
            return super().first_nonfinite()
        from gguf.constants import GGML_QUANT_SIZES
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return quant.first_bad_scale(self.data, size, offsets, block)

    def arrays(self):
        return {"blocks": self.data}


_OUR_DECODERS = {"Q4_K": quant.dequantize_q4_k, "Q6_K": quant.dequantize_q6_k,
                 "Q8_0": quant.dequantize_q8_0, "Q4_0": quant.dequantize_q4_0}
_BLOCK_DOTS = {"Q4_K": (quant.q4_k_dots, quant.BLOCK_DOT_TOKENS_K4), "Q5_K": (quant.q5_k_dots, quant.BLOCK_DOT_TOKENS_K4),
               "Q6_K": (quant.q6_k_dots, quant.BLOCK_DOT_TOKENS), "Q8_0": (quant.q8_0_dots, quant.BLOCK_DOT_TOKENS),
               "Q4_0": (quant.q4_0_dots, quant.BLOCK_DOT_TOKENS)}              # kernel, most tokens it serves


def gguf_type_readable(ggml_type) -> bool:
    """Whether llama_ref can expand this GGUF tensor type: ours, or one gguf-py dequantizes (tried on one zero block)."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize
    if ggml_type.name in ("F32", "F16", "BF16") or ggml_type.name in _OUR_DECODERS:
        return True
    block, size = GGML_QUANT_SIZES[ggml_type]
    if block == 1:                                         # integer types (I8..I64), F64: not weights of a Llama
        return False
    try:
        with np.errstate(all="ignore"):
            dequantize(np.zeros((1, size), np.uint8), ggml_type)
        return True
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return False


def _gguf_weight(path, t, shape):
    """One GGUF tensor as our weight: F32 as its mapped array, F16/BF16 matrices as float16/bfloat16 stored matrices
    (1-D ones as float32 copies), Q8_0/Q4_0 as quant.py's matrices, any other type as a GGUFMatrix."""
    from gguf import GGMLQuantizationType as GT
    from gguf.constants import GGML_QUANT_SIZES
    tt = t.tensor_type
    if tt == GT.F32:
        return t.data
    if tt == GT.F16:
        return Float16Matrix(t.data) if t.data.ndim == 2 else t.data.astype(F32)
    if tt == GT.BF16:
        bits = t.data.view(np.uint16)
        return BFloat16Matrix(bits) if bits.ndim == 2 else bf16_to_f32(bits)
    if not gguf_type_readable(tt) or len(shape) != 2:
        raise CheckpointError(f"{path}: GGUF tensor {t.name!r} has type {tt.name}, which neither llama_ref nor gguf-py "
                              "can dequantize; re-quantize the model to a common type (llama-quantize ... Q4_K_M or "
                              "Q8_0), or export it as F16")
    block, size = GGML_QUANT_SIZES[tt]
    blocks = (shape[0], shape[1] // block * size)
    if shape[1] % block or tuple(t.data.shape) != blocks:
        raise CheckpointError(f"{path}: GGUF tensor {t.name!r} says shape {shape} ({blocks} bytes of {tt.name} "
                              f"blocks) but holds {tuple(t.data.shape)}; the file is corrupt")
    if tt == GT.Q8_0:
        return quant.Q8_0Matrix(t.data, shape)
    if tt == GT.Q4_0:
        return quant.Q4_0Matrix(t.data, shape)
    return GGUFMatrix(t.data, shape, tt)


def load_gguf(path, check_finite=True) -> tuple[LlamaConfig, dict]:
    """(config, HF-named weights) from a .gguf, memory-mapped and validated like every format: the config through
    the typed parser, every tensor the config requires present with its shape, no tensor of another model, and
    (check_finite) no NaN/Inf, checked tile by tile on the dequantized values of quantized tensors.
    Nothing is copied: matrices stay in the file's type (see _gguf_weight) and q/k rows are presented in HF order by
    a RowPermuted view. A type that cannot be read is refused before anything is expanded."""
    path = Path(path)
    reader = _open_gguf(path)
    try:
        config = gguf_config(reader, str(path))
        tensors = list(reader.tensors)
    except LlamaRefError:
        raise
    except (Exception, MemoryError) as e:                          # noqa: BLE001 - metadata of the wrong GGUF type
        raise CheckpointError(f"{path}: unreadable GGUF metadata ({type(e).__name__}: {str(e)[:200]})") from None
    weights = {}
    for t in tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: GGUF tensor {t.name!r} is not part of a Llama 2 model; llama_ref cannot "
                                  "run it")
        shape = tuple(int(x) for x in reversed(t.shape))                   # GGUF lists dims fastest-first
        try:
            w = _gguf_weight(path, t, shape)
            heads = qk_heads(name, config)
            if heads is not None and len(shape) == 2 and shape[0] % heads == 0:    # Meta's pairs -> HF order (a view)
                w = as_stored(w).take_rows(qk_rows_meta_to_hf(shape[0], heads))
        except LlamaRefError:
            raise
        except (Exception, MemoryError) as e:                      # noqa: BLE001 - a tensor gguf-py cannot map
            raise CheckpointError(f"{path}: GGUF tensor {t.name!r} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the file is truncated or corrupt") from None
        weights[name] = w
    check_weights(config, weights, source=path, check_finite=check_finite)
    return config, weights
