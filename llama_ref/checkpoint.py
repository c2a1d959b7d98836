"""Checkpoints: load and save model weights, memory-mapped and validated.

Chapter 00 (the model on disk) reads this file. Two formats come in and go out here:

  HF directory   config.json + model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
                 -> load_hf_dir / save_model. What we write loads in transformers' LlamaForCausalLM.from_pretrained.
  llama2.c .bin  a 28-byte int32 header + raw float32 arrays in Meta's layout (version 0), or the 256-byte
                 "ak42" header (version 1) -> load_llama2c / save_llama2c.

GGUF is gguf_io.py's; `loader.read_checkpoint(path)` picks the reader from what `path` is, and `llama_ref.load(path)`
makes the model. The weights are the flat dict of DEVELOPING.md: Hugging Face names and layouts (q/k rows in
rotate-half order).

Memory: the safetensors reader is our own. It parses the JSON header and returns np.memmap views straight into
the file, so nothing is read until it is used and a 7B checkpoint is never held in RAM twice (the OS page cache
*is* the array). float32 and float16 tensors are zero-copy views, bfloat16 matrices BFloat16Matrix views of the
bits (NumPy has no bfloat16); float64 becomes float32 copies.

Writes are atomic: a file is written complete under a temporary name beside its destination, then renamed over it
with os.replace. We never write into an existing file, so arrays still memory-mapped from an old checkpoint stay
valid when a new one is saved over it, and a crash leaves either the old file or the new one, never half of each.
The directory policy is spelled out in save_model.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np

from .config import LlamaConfig, config_from_fields
from .errors import CheckpointError, ConfigError, TokenizerError
from .files import _fsync_dir, atomic_file, check_output, publish, temp_dir_beside
from .matrices import BFloat16Matrix, Float32Matrix, bf16_to_f32
from .model import permute_qk_hf_to_meta, qk_rows_meta_to_hf, rope_freqs, weight_shapes
from .weights import check_weights, is_ignored  # noqa: F401  (check_weights: part of this module's API)

F32 = np.float32

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_NAME = "tokenizer.model"


# ================================================================================================
# safetensors: the file format
#
#   bytes [0, 8)        N, the header length: unsigned 64-bit little-endian
#   bytes [8, 8+N)      the header: UTF-8 JSON, padded with spaces so the data starts 8-byte aligned
#                         {"__metadata__": {"format": "pt"},                               (optional, str -> str)
#                          "model.norm.weight": {"dtype": "F32", "shape": [288], "data_offsets": [0, 1152]}, ...}
#   bytes [8+N, end)    the data buffer; data_offsets [begin, end) are relative to its start. Tensors are
#                       row-major, little-endian, packed back to back with no gaps and no overlaps.
#
# https://github.com/huggingface/safetensors (README "Format"). A reader must not trust the header: every offset
# and size is checked against the file before a single byte of data is touched.

# safetensors dtype -> (NumPy dtype as stored, bytes per element)
ST_DTYPES = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),   # raw bits: a BFloat16Matrix (matrices.py) or, 1-D, a float32 copy
}
NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}
MAX_HEADER_BYTES = 100_000_000      # the safetensors library refuses larger headers too


def read_safetensors_header(path):
    """Parse and validate a safetensors header. Returns (tensors, metadata, data_start, file_size).

    tensors maps name -> (dtype string, shape tuple, (begin, end)) in file order; nothing of the data is read.
    Raises CheckpointError naming the file, the tensor and what to do for every way a header can be wrong.
    """
    path = Path(path)
    fix = "re-download or re-save the checkpoint"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (or is not a file); check the path to the .safetensors file")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is {size} bytes, too short to be safetensors (8-byte length + JSON header): "
                              f"the file is truncated or empty; {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))                                  # header length N
        if n > size - 8:
            raise CheckpointError(f"{path}: the header claims {n} bytes but only {size - 8} follow the length field: "
                                  f"the file is truncated or not safetensors; {fix}")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds the safetensors limit of {MAX_HEADER_BYTES} "
                                  f"bytes; the file is corrupt or not safetensors; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # ValueError: bad JSON, or a 5000-digit number
        raise CheckpointError(f"{path}: the safetensors header is not valid UTF-8 JSON ({type(e).__name__}: "
                              f"{str(e)[:200]}); the file is corrupt or not safetensors; {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}; "
                              f"{fix}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}; {fix}")

    data_start = 8 + n
    buffer_len = size - data_start
    tensors = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets, got {info!r}; {fix}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise CheckpointError(f"{where} has dtype {dtype!r}; llama_ref reads {', '.join(ST_DTYPES)}: convert the "
                                  "checkpoint to float32/float16/bfloat16 (quantized models: use GGUF)")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where} has shape {shape!r}, not a list of non-negative integers; {fix}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{where} has data_offsets {offsets!r}, not [begin, end]; {fix}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"{where} has data_offsets [{begin}, {end}]: begin must be >= 0 and <= end; {fix}")
        if end > buffer_len:
            raise CheckpointError(f"{where} ends at data byte {end} but the file holds only {buffer_len} data bytes "
                                  f"({size} bytes in all): the file is truncated; {fix}")
        nbytes = math.prod(shape) * ST_DTYPES[dtype][1]
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: header says {dtype} {tuple(shape)} = {nbytes} bytes but data_offsets "
                                  f"[{begin}, {end}] span {end - begin} bytes; the header lies, the file is corrupt; "
                                  f"{fix}")
        tensors[name] = (dtype, tuple(shape), (begin, end))

    # The tensors must tile the data buffer exactly: sorted by offset, each starts where the previous one ended.
    pos, prev = 0, None
    for name, (_, _, (begin, end)) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
        if begin < pos:
            raise CheckpointError(f"{path}: tensor {name!r} (data bytes [{begin}, {end})) overlaps tensor {prev!r} "
                                  f"(which ends at {pos}); the header is corrupt; {fix}")
        if begin > pos:
            raise CheckpointError(f"{path}: data bytes [{pos}, {begin}) before tensor {name!r} belong to no tensor; "
                                  f"the header is corrupt; {fix}")
        pos, prev = end, name
    if pos != buffer_len:
        raise CheckpointError(f"{path}: the tensors cover {pos} data bytes but the file holds {buffer_len}; "
                              f"the file has trailing bytes or a tensor is missing from the header; {fix}")
    return tensors, metadata, data_start, size


def read_safetensors(path):
    """Memory-map a safetensors file. Returns (tensors, metadata).

    F32/F16/F64 tensors are read-only np.memmap views into the file (no copy, nothing read until used);
    BF16 matrices are matrices.BFloat16Matrix over the mapped bits (NumPy has no bfloat16), BF16 vectors float32
    copies. Use loader.read_checkpoint for a whole model (it converts F64 to float32 too).
    """
    path = Path(path)
    header, metadata, data_start, size = read_safetensors_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    out = {}
    for name, (dtype, shape, (begin, end)) in header.items():
        raw = mm[data_start + begin: data_start + end]                         # (nbytes,) uint8 view
        a = raw.view(ST_DTYPES[dtype][0]).reshape(shape)                       # still a view of the file
        if dtype == "BF16":
            a = BFloat16Matrix(a) if a.ndim == 2 else bf16_to_f32(a)
        out[name] = a
    return out, metadata


def save_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Write `tensors` (name -> float64/32/16 array) as a safetensors file, atomically.

    The header is JSON padded with spaces to a multiple of 8 bytes so every tensor starts 8-byte aligned when the
    tensors are float32 (transformers needs `{"format": "pt"}` in __metadata__, which is the default here).
    Tensors are written in dict order, one at a time, straight from their memory (no concatenated copy).
    """
    with atomic_file(path) as tmp:
        _write_safetensors(tmp, tensors, metadata)


def _write_safetensors(path, tensors, metadata=None, dtype=None):
    """`tensors` (name -> array) as safetensors, each converted to `dtype` if given: write_safetensors_stream."""
    entries = []
    for name, a in tensors.items():
        dt = np.dtype(dtype if dtype is not None else np.asarray(a).dtype).newbyteorder("<")
        if dt not in NP_TO_ST:
            raise CheckpointError(f"cannot write tensor {name!r} with dtype {dt} to {path}: use float32, "
                                  "float16 or float64")
        entries.append((name, tuple(getattr(a, "shape", None) or np.shape(a)), NP_TO_ST[dt],
                        lambda _, a=a, dt=dt: np.require(a, dtype=dt, requirements="C")))
    write_safetensors_stream(path, entries, metadata)


def write_safetensors_stream(path, entries, metadata=None, progress=None):
    """Write safetensors from [(name, shape, dtype string, make)]: the header from the shapes first, then each tensor
    made by make(name) (an array of that dtype's storage type; BF16 as uint16 bits), written and dropped."""
    header, pos = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}, 0
    for name, shape, st, _ in entries:
        nbytes = math.prod(shape) * ST_DTYPES[st][1]
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)                                          # pad to 8 with spaces (spec)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for name, shape, st, make in entries:
            a = np.require(make(name), dtype=ST_DTYPES[st][0], requirements="C")      # keeps a 0-d array 0-d
            if a.shape != tuple(shape):
                raise CheckpointError(f"tensor {name!r} came out {a.shape}, its header says {tuple(shape)}")
            if a.size:
                f.write(memoryview(a.reshape(-1)).cast("B"))
            if progress:
                progress(name)
        f.flush()
        os.fsync(f.fileno())


# ================================================================================================
# HF model directories

def load_hf_dir(path, check_finite=True):
    """Load config.json + model.safetensors (or the shards of model.safetensors.index.json) from a directory.

    Like transformers, a single model.safetensors wins over an index when both are present. Returns (config,
    weights) with weights validated against the config and the ignorable tensors dropped.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; an HF model directory needs config.json next to "
                              "model.safetensors (save one with llama_ref.checkpoint.save_model)")
    config = LlamaConfig.load(path / CONFIG_NAME)
    if (path / SAFETENSORS_NAME).is_file():
        weights, sources = _load_single(path / SAFETENSORS_NAME)
    elif (path / INDEX_NAME).is_file():
        weights, sources = _load_sharded(path / INDEX_NAME)
    elif any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds PyTorch pickle weights, which llama_ref does not read (they need torch "
                              "and can run code); convert them once with transformers: "
                              "LlamaForCausalLM.from_pretrained(dir).save_pretrained(out_dir)  # writes safetensors")
    else:
        raise CheckpointError(f"{path} has config.json but no {SAFETENSORS_NAME} or {INDEX_NAME}; copy the weights "
                              "into the directory")
    weights = {n: _to_model_dtype(a) for n, a in weights.items() if not is_ignored(n, config)}
    src = path / SAFETENSORS_NAME if len(set(sources.values())) == 1 else path
    check_weights(config, weights, source=src, check_finite=check_finite)
    return config, {n: weights[n] for n in weight_shapes(config)}              # canonical order, whatever the file's


def _load_single(file):
    tensors, metadata = read_safetensors(file)
    _check_format(file, metadata)
    return tensors, {n: file for n in tensors}


def _load_sharded(index_path):
    """Shards named by the index's weight_map; every tensor must be exactly where the index says."""
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path} is not valid JSON ({e}); re-save the checkpoint") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} lacks a weight_map {{tensor name: shard file}}; re-save the checkpoint")
    weights, sources = {}, {}
    for shard in sorted(set(weight_map.values())):
        file = index_path.parent / shard
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path} names shard {shard!r} outside the model directory; refusing to read it")
        if not file.is_file():
            raise CheckpointError(f"{index_path} lists shard {shard} but {file} does not exist; copy all shards "
                                  "into the directory")
        tensors, metadata = read_safetensors(file)
        _check_format(file, metadata)
        for name, a in tensors.items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{file} holds tensor {name!r} but {index_path.name} maps it to "
                                      f"{weight_map.get(name)!r}; the index is out of date: re-save the checkpoint")
            weights[name], sources[name] = a, file
    lost = [n for n, s in weight_map.items() if n not in weights]
    if lost:
        raise CheckpointError(f"{index_path} maps tensor {lost[0]!r} to {weight_map[lost[0]]} but that shard does not "
                              f"hold it ({len(lost)} such tensors); the shards and the index disagree: re-save")
    return weights, sources


def _check_format(file, metadata):
    fmt = metadata.get("format", "pt")
    if fmt not in ("pt", "np", "numpy", "tf", "flax", "mlx"):
        raise CheckpointError(f"{file}: __metadata__ format={fmt!r} is not a tensor framework we know; re-save it")


def _to_model_dtype(a):
    """float32/float16 views stay views; float64 becomes a float32 copy (bf16 was converted by the reader).

    np.array, not a.astype: astype on a memmap returns an in-RAM copy still typed np.memmap, which would lie.
    Values beyond float32's range become inf, which the finiteness check then reports.
    """
    if isinstance(a, np.ndarray) and a.dtype == np.float64:
        with np.errstate(over="ignore"):
            return np.array(a, dtype=F32)
    return a


def save_model(path, config: LlamaConfig, weights: dict, tokenizer_path=None, max_shard_bytes=None,
               extra_files=None):
    """Write an HF model directory that llama_ref and transformers' LlamaForCausalLM.from_pretrained both load.

    Writes config.json, generation_config.json (bos/eos), model.safetensors in float32 (or, with max_shard_bytes,
    model-0000i-of-0000n.safetensors shards of at most that many bytes each plus model.safetensors.index.json;
    a tensor larger than the limit gets a shard of its own), tokenizer.model copied from tokenizer_path, and
    extra_files {file name: str | bytes | path to copy}. The weights are checked against the config first.

    Atomicity policy ("nothing a user owns is overwritten half-way"):
      - everything is first written complete into a temporary directory `<path>.tmp-XXXX` beside `path`;
      - if `path` does not exist, that directory is renamed to `path` in one step;
      - if `path` is an existing directory, each new file is moved in with os.replace (atomic per file; weights
        first, config.json last). Files we did not write are left alone, except the weight files of an earlier
        save in another layout (model.safetensors, model.safetensors.index.json, model-*-of-*.safetensors), which
        would otherwise shadow or contradict the new weights and are removed once the new ones are in place;
      - on any error the temporary directory is removed and `path` is as it was.
    Existing files are replaced, never written into, so arrays memory-mapped from them stay valid.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; save_model writes a model directory: "
                              "choose a new path")
    check_weights(config, weights, source="the weights to save")
    if max_shard_bytes is not None and (not _is_int(max_shard_bytes) or max_shard_bytes <= 0):
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes!r} must be a positive number of bytes")
    extra_files = dict(extra_files or {})
    ours = {CONFIG_NAME, GENERATION_CONFIG_NAME, SAFETENSORS_NAME, INDEX_NAME, TOKENIZER_NAME}
    for name in extra_files:
        if Path(name).name != name or name in ours or SHARD_PATTERN.match(name) or name.startswith("."):
            raise CheckpointError(f"extra file name {name!r} must be a plain file name that is not one save_model "
                                  "writes itself")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise TokenizerError(f"tokenizer {tokenizer_path} does not exist; pass the tokenizer.model the model was "
                             "trained with, or tokenizer_path=None")

    check_output(path, force=True, kind="dir")
    with temp_dir_beside(path) as tmp:
        tensors = {n: weights[n] for n in weight_shapes(config)}              # HF order, lm_head only if untied
        weight_files = _write_weights(tmp, tensors, max_shard_bytes)
        gen = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id}
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_NAME)
        for name, content in extra_files.items():
            if isinstance(content, str):
                (tmp / name).write_text(content)
            elif isinstance(content, (bytes, bytearray)):
                (tmp / name).write_bytes(content)
            else:
                shutil.copyfile(content, tmp / name)
        config.save(tmp / CONFIG_NAME)
        publish(tmp)

        if not path.exists():
            os.rename(tmp, path)                                               # the whole directory, atomically
            _fsync_dir(path.parent)
            return path
        order = weight_files + sorted(n.name for n in tmp.iterdir() if n.name not in weight_files
                                      and n.name != CONFIG_NAME) + [CONFIG_NAME]
        for name in order:
            os.replace(tmp / name, path / name)
        for old in path.iterdir():                                             # weight files of an earlier layout
            if old.name not in weight_files and (old.name in (SAFETENSORS_NAME, INDEX_NAME)
                                                 or SHARD_PATTERN.match(old.name)):
                old.unlink()
        _fsync_dir(path)
        return path


def _write_weights(dir_, tensors, max_shard_bytes):
    """float32 model.safetensors, or shards + index when max_shard_bytes is given. Returns the file names written."""
    if max_shard_bytes is None:
        _write_safetensors(dir_ / SAFETENSORS_NAME, tensors, dtype=F32)
        return [SAFETENSORS_NAME]
    nbytes = {n: 4 * math.prod(np.shape(a)) for n, a in tensors.items()}          # as float32
    shards, cur, cur_bytes = [], {}, 0                     # greedy: fill a shard until the next tensor would overflow
    for name, a in tensors.items():
        if cur and cur_bytes + nbytes[name] > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = a
        cur_bytes += nbytes[name]
    shards.append(cur)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(dir_ / fname, shard, dtype=F32)
        names.append(fname)
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (dir_ / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]


# ================================================================================================
# llama2.c .bin
#
# version 0 (legacy, what run.c reads), all little-endian:
#   int32[7]  dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len      (28 bytes)
#             vocab_size < 0 means the classifier is NOT shared with the embedding (wcls is stored at the end)
#   float32   token_embedding (V, C)
#             rms_att (L, C)  wq (L, nh*hs, C)  wk (L, nkv*hs, C)  wv (L, nkv*hs, C)  wo (L, C, nh*hs)
#             rms_ffn (L, C)  w1 (L, H, C)  w2 (L, C, H)  w3 (L, H, C)        w1 = gate, w2 = down, w3 = up
#             rms_final (C,)
#             freq_cis_real (seq_len, hs/2)  freq_cis_imag (seq_len, hs/2)   legacy RoPE tables, run.c skips them
#             wcls (V, C)                                                     only when vocab_size < 0
# version 1 (export.py --version 1): a 256-byte header
#   uint32 magic 0x616b3432 ("ak42")  int32 version=1  int32[7] as above (vocab_size > 0)  uint8 shared_classifier
#   zero padding to 256; then float32: rms_att (L, C), rms_ffn (L, C), rms_final (C,), token_embedding (V, C),
#   wq, wk, wv, wo, w1, w2, w3 (shapes as above), wcls (V, C) if not shared. No RoPE tables.
# Matrices are (out, in) like torch's nn.Linear; q/k rows are in Meta's interleaved-pair RoPE layout.
# The file stores neither rope_theta nor norm_eps: run.c hard-codes 10000 and 1e-5.

LLAMA2C_MAGIC = 0x616B3432
LLAMA2C_THETA, LLAMA2C_EPS = 10000.0, 1e-5


def _llama2c_layout(config, version, shared):
    """[(name, shape)] in file order; names are llama2.c's, '_skip' entries are legacy tables we do not keep."""
    C, H, V, L = config.dim, config.hidden_dim, config.vocab_size, config.n_layers
    q, kv, hs = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.head_dim
    mats = [("wq", (L, q, C)), ("wk", (L, kv, C)), ("wv", (L, kv, C)), ("wo", (L, C, q))]
    ffn = [("w1", (L, H, C)), ("w2", (L, C, H)), ("w3", (L, H, C))]
    if version == 0:
        layout = [("token_embedding", (V, C)), ("rms_att", (L, C)), *mats, ("rms_ffn", (L, C)), *ffn,
                  ("rms_final", (C,)), ("_skip_freq_cis_real", (config.max_seq_len, hs // 2)),
                  ("_skip_freq_cis_imag", (config.max_seq_len, hs // 2))]
    else:
        layout = [("rms_att", (L, C)), ("rms_ffn", (L, C)), ("rms_final", (C,)), ("token_embedding", (V, C)),
                  *mats, *ffn]
    return layout if shared else layout + [("wcls", (V, C))]


def read_llama2c_header(path):
    """(config, version, shared_classifier, data_offset) from a llama2.c .bin header, validated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file; give a llama2.c .bin")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    if head[:2] == b"PK":
        raise CheckpointError(f"{path} is a PyTorch zip checkpoint, not a llama2.c .bin; llama_ref does not read "
                              "pickles: save it as safetensors with transformers' save_pretrained first")
    if len(head) < 28:
        raise CheckpointError(f"{path} is {size} bytes, too short for a llama2.c header (28 bytes); the file is "
                              "truncated or not a llama2.c checkpoint")
    (magic,) = struct.unpack("<I", head[:4])
    if magic == LLAMA2C_MAGIC:
        if len(head) < 256:
            raise CheckpointError(f"{path}: a versioned llama2.c file needs a 256-byte header but the file is "
                                  f"{size} bytes; it is truncated")
        (version,) = struct.unpack("<i", head[4:8])
        if version == 2:
            raise CheckpointError(f"{path} is a llama2.c version-2 (Q8_0 quantized) file, which llama_ref does not "
                                  "read; export with llama2.c's export.py --version 0 or 1, or use GGUF for quantized "
                                  "models")
        if version != 1:
            raise CheckpointError(f"{path} is a llama2.c file of unknown version {version}; llama_ref reads versions "
                                  "0 and 1")
        dims = struct.unpack("<7i", head[8:36])
        shared, offset = bool(head[36]), 256
    else:
        version, dims, offset = 0, struct.unpack("<7i", head[:28]), 28
        shared = dims[5] > 0                                     # negative vocab_size: unshared classifier
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = dims
    fields = {"dim": ("dim", dim), "hidden_dim": ("hidden_dim", hidden_dim), "n_layers": ("n_layers", n_layers),
              "n_heads": ("n_heads", n_heads), "n_kv_heads": ("n_kv_heads", n_kv_heads),
              "vocab_size": ("vocab_size", abs(vocab_size)), "max_seq_len": ("seq_len", seq_len),
              "rope_theta": ("rope_theta", LLAMA2C_THETA), "norm_eps": ("norm_eps", LLAMA2C_EPS),
              "tie_embeddings": ("shared classifier", shared), "bos_id": ("bos", 1), "eos_id": ("eos", 2)}
    try:
        config = config_from_fields(fields, f"{path} (llama2.c header {dims})")
    except ConfigError as e:
        raise CheckpointError(f"{e}: the header does not describe a Llama model; the file is corrupt or not a "
                              "llama2.c checkpoint") from None
    return config, version, shared, offset


def load_llama2c(path, check_finite=True):
    """Load a llama2.c .bin (version 0 or 1) as (config, HF-named weights), memory-mapped.

    Every tensor is a view into the file; q and k are presented in HF's rotate-half row order by a RowPermuted view
    of Meta's pair layout (no copy).
    The file size must match the header exactly: a truncated download is caught here, not as garbage logits.
    """
    path = Path(path)
    config, version, shared, offset = read_llama2c_header(path)
    layout = _llama2c_layout(config, version, shared)
    expected = offset + 4 * sum(math.prod(s) for _, s in layout)
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise CheckpointError(f"{path}: the llama2.c header (dim={config.dim}, n_layers={config.n_layers}, "
                              f"vocab_size={config.vocab_size}, seq_len={config.max_seq_len}, "
                              f"{'shared' if shared else 'unshared'} classifier) implies {expected} bytes but the "
                              f"file has {actual}: it is {what}; re-download or re-export it")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    t, pos = {}, offset
    for name, shape in layout:
        n = 4 * math.prod(shape)
        t[name] = mm[pos:pos + n].view("<f4").reshape(shape)                   # view into the file
        pos += n

    q_rows = qk_rows_meta_to_hf(config.n_heads * config.head_dim, config.n_heads)
    k_rows = qk_rows_meta_to_hf(config.n_kv_heads * config.head_dim, config.n_kv_heads)
    w = {"model.embed_tokens.weight": t["token_embedding"]}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = t["rms_att"][i]
        w[p + "self_attn.q_proj.weight"] = Float32Matrix(t["wq"][i]).take_rows(q_rows)
        w[p + "self_attn.k_proj.weight"] = Float32Matrix(t["wk"][i]).take_rows(k_rows)
        w[p + "self_attn.v_proj.weight"] = t["wv"][i]
        w[p + "self_attn.o_proj.weight"] = t["wo"][i]
        w[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        w[p + "mlp.gate_proj.weight"] = t["w1"][i]
        w[p + "mlp.up_proj.weight"] = t["w3"][i]
        w[p + "mlp.down_proj.weight"] = t["w2"][i]
    w["model.norm.weight"] = t["rms_final"]
    if not shared:
        w["lm_head.weight"] = t["wcls"]
    check_weights(config, w, source=path, check_finite=check_finite)
    return config, w


def save_llama2c(path, config: LlamaConfig, weights: dict, version=0, force=True):
    """Write HF-named weights as a llama2.c .bin (version 0, what run.c reads, or 1), atomically.

    q/k rows go back to Meta's pair layout (permute_qk_hf_to_meta). The classifier is written as shared when
    config.tie_embeddings (version 0: positive vocab_size), else appended as wcls (version 0: negative vocab_size).
    The format cannot store rope_theta, norm_eps, bos/eos: run.c assumes theta 10000, eps 1e-5 (BOS 1, EOS 2), so a
    config with another theta or eps is refused rather than silently changed.
    """
    path = check_output(path, force=force)
    if version not in (0, 1):
        raise CheckpointError(f"llama2.c version {version!r} is not written by llama_ref; use version=0 (run.c) or 1")
    if config.rope_theta != LLAMA2C_THETA or config.norm_eps != LLAMA2C_EPS:
        raise CheckpointError(f"a llama2.c .bin cannot store rope_theta={config.rope_theta} / norm_eps="
                              f"{config.norm_eps}; run.c hard-codes {LLAMA2C_THETA:g} / {LLAMA2C_EPS:g}: save this "
                              "model as an HF directory (save_model) or GGUF instead")
    check_weights(config, weights, source="the weights to save")
    if max(config.dim, config.hidden_dim, config.vocab_size, config.max_seq_len) >= 2 ** 31:
        raise CheckpointError(f"a llama2.c header holds 32-bit signed numbers; max_seq_len={config.max_seq_len:,} (or "
                              "another size) does not fit: lower it in the config before exporting")
    L, nh, nkv = config.n_layers, config.n_heads, config.n_kv_heads
    shared = config.tie_embeddings

    def stack(fmt, fn=lambda a: a):
        return (fn(np.asarray(weights[fmt.format(i)], dtype=F32)) for i in range(L))

    p = "model.layers.{}."
    cos, sin = rope_freqs(config.head_dim, config.max_seq_len, config.rope_theta)      # (seq_len, hs/2) each
    parts = {
        "token_embedding": [weights["model.embed_tokens.weight"]],
        "rms_att": stack(p + "input_layernorm.weight"),
        "wq": stack(p + "self_attn.q_proj.weight", lambda a: permute_qk_hf_to_meta(a, nh)),
        "wk": stack(p + "self_attn.k_proj.weight", lambda a: permute_qk_hf_to_meta(a, nkv)),
        "wv": stack(p + "self_attn.v_proj.weight"),
        "wo": stack(p + "self_attn.o_proj.weight"),
        "rms_ffn": stack(p + "post_attention_layernorm.weight"),
        "w1": stack(p + "mlp.gate_proj.weight"),
        "w2": stack(p + "mlp.down_proj.weight"),
        "w3": stack(p + "mlp.up_proj.weight"),
        "rms_final": [weights["model.norm.weight"]],
        "_skip_freq_cis_real": [cos], "_skip_freq_cis_imag": [sin],
        "wcls": [weights.get("lm_head.weight")],
    }
    dims = (config.dim, config.hidden_dim, L, nh, nkv, config.vocab_size, config.max_seq_len)
    with atomic_file(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            if version == 0:
                f.write(struct.pack("<7i", *dims[:5], dims[5] if shared else -dims[5], dims[6]))
            else:
                head = struct.pack("<Ii7iB", LLAMA2C_MAGIC, 1, *dims, int(shared))
                f.write(head + b"\0" * (256 - len(head)))
            for name, _ in _llama2c_layout(config, version, shared):
                for a in parts[name]:                                          # one layer at a time
                    f.write(memoryview(np.ascontiguousarray(a, dtype="<f4").reshape(-1)).cast("B"))
    return path


# ================================================================================================
# small helpers

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)



