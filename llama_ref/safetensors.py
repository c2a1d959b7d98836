"""safetensors, the format of Hugging Face checkpoints: read memory-mapped and validated, written atomically.

Chapter 00 (the model on disk) reads it. The whole format:

      bytes [0, 8)        N, the header length: unsigned 64-bit little-endian
      bytes [8, 8+N)      the header: UTF-8 JSON, padded with spaces so the data starts 8-byte aligned
                            {"__metadata__": {"format": "pt"},                               (optional, str -> str)
                             "model.norm.weight": {"dtype": "F32", "shape": [288], "data_offsets": [0, 1152]}, ...}
      bytes [8+N, end)    the data buffer; data_offsets [begin, end) are relative to its start. Tensors are
                          row-major, little-endian, packed back to back with no gaps and no overlaps.

    https://github.com/huggingface/safetensors (README "Format"). A reader must not trust the header: every offset
    and size is checked against the file before a single byte of data is touched.

read_safetensors_header validates all of it in one function; read_safetensors maps the data (float32/float16 views,
bfloat16 matrices as matrices.BFloat16Matrix over the bits); write_safetensors_stream writes tensors made one at a time.
checkpoint.py builds model directories (config.json, shards, index) on top.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .inputs import parse_json
from .output import atomic_file
from .matrices import BFloat16Matrix, bf16_to_f32

# safetensors dtype -> (NumPy dtype as stored, bytes per element)
ST_DTYPES = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),   # raw bits: a BFloat16Matrix (matrices.py) or, 1-D, a float32 copy
    "U8": (np.dtype("u1"), 1),      # quantized blocks and codes (quant.py's directories)
    "I8": (np.dtype("i1"), 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")    # what a checkpoint of float weights may hold (the default)
NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("u1"): "U8",
            np.dtype("i1"): "I8"}
MAX_DIM = 2 ** 40                   # no tensor dimension is larger (numpy's limit is the product: 2^63 bytes)
MAX_HEADER_BYTES = 100_000_000      # the safetensors library refuses larger headers too


def read_safetensors_header(path, dtypes=FLOAT_DTYPES):
    """Parse and validate a safetensors header. Returns (tensors, metadata, data_start, file_size).

    tensors maps name -> (dtype string, shape tuple, (begin, end)) in file order; nothing of the data is read.
    dtypes: the safetensors dtypes the caller accepts (float weights unless told otherwise).
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
        header = parse_json(raw, f"{path}: the safetensors header")     # any bad JSON, a 5000-digit number, [[[...
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the file is corrupt or not safetensors; {fix}") from None
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
        if not isinstance(dtype, str) or dtype not in dtypes:
            raise CheckpointError(f"{where} has dtype {dtype!r}; llama_ref reads {', '.join(dtypes)}: convert the "
                                  "checkpoint to float32/float16/bfloat16 (quantized models: use GGUF)")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
            raise CheckpointError(f"{where} has shape {str(shape)[:80]}, not a list of at most 8 integers in "
                                  f"[0, 2^40]; {fix}")
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


def read_safetensors(path, dtypes=FLOAT_DTYPES):
    """Memory-map a safetensors file. Returns (tensors, metadata).

    F32/F16/F64 (and, where `dtypes` admits them, U8/I8) tensors are read-only np.memmap views into the file (no
    copy, nothing read until used); BF16 matrices are matrices.BFloat16Matrix over the mapped bits (NumPy has no
    bfloat16), BF16 vectors float32 copies. Use loader.read_checkpoint for a whole model (it converts F64 to float32).
    """
    path = Path(path)
    header, metadata, data_start, size = read_safetensors_header(path, dtypes)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    out = {}
    for name, (dtype, shape, (begin, end)) in header.items():
        raw = mm[data_start + begin: data_start + end]                         # (nbytes,) uint8 view
        a = raw.view(ST_DTYPES[dtype][0]).reshape(shape)                       # still a view of the file
        if dtype == "BF16":
            a = BFloat16Matrix(a) if a.ndim == 2 else bf16_to_f32(a)
        out[name] = a
    return out, metadata


def save_safetensors(path, tensors: dict, metadata: dict | None = None, force=False):
    """Write `tensors` (name -> float64/32/16, uint8 or int8 array) as a safetensors file, atomically.

    The header is JSON padded with spaces to a multiple of 8 bytes, and the tensors are written widest type first
    (dict order within a type), so every tensor starts aligned to its element size (transformers needs
    `{"format": "pt"}` in __metadata__, which is the default here). One at a time, straight from their memory.
    """
    with atomic_file(path, force=force) as tmp:
        _write_safetensors(tmp, tensors, metadata)


def _write_safetensors(path, tensors, metadata=None, dtype=None):
    """`tensors` (name -> array) as safetensors, each converted to `dtype` if given: write_safetensors_stream."""
    entries = []
    for name, a in tensors.items():
        dt = np.dtype(dtype if dtype is not None else np.asarray(a).dtype).newbyteorder("<")
        if dt not in NP_TO_ST:
            raise CheckpointError(f"cannot write tensor {name!r} with dtype {dt} to {path}: use float32, "
                                  "float16, float64, uint8 or int8")
        entries.append((name, tuple(getattr(a, "shape", None) or np.shape(a)), NP_TO_ST[dt],
                        lambda _, a=a, dt=dt: np.require(a, dtype=dt, requirements="C")))
    entries.sort(key=lambda e: -ST_DTYPES[e[2]][1])                            # stable: widest first, else in order
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


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
