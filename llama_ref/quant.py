"""Quantization: int8 (per tensor / per channel), GGUF's Q8_0 and Q4_0, grouped 4-bit (W4A16), activation quant.

Chapter 12 teaches it. Read top to bottom:

    rounding -> int8 symmetric -> Q8_0 (bytes = GGUF's) -> Q4_0 (bytes = GGUF's) -> grouped int4 + fp16 scales
    -> activation quantization (int8/int16, dynamic per token) -> the Q8_0 x Q8_0 integer dot product
    -> quantized matrices (hold only the quantized bytes, matmul dequantizes tile by tile)
    -> quantize_model (the policy for embeddings, norms and the classifier) -> save / load

What each scheme costs in accuracy is measured by evaluate.accuracy_study (chapter 12's table).

Conventions. A weight matrix is an HF-layout (out, in) array: one row per output channel. Every format here cuts
a row into blocks (or groups) *along `in`*, exactly as GGUF does (GGUF's ne0, the contiguous axis, is `in`).
So the rows stay independent: they can be permuted (the q/k RoPE permutation), looked up (embedding rows) or
dequantized a few at a time. A row length that is not a multiple of the block raises QuantizationError.

Byte layouts (little endian), per block of 32 weights:
    Q8_0  34 bytes = fp16 d | 32 x int8 q                       w = d * q            8.5 bits/weight
    Q4_0  18 bytes = fp16 d | 16 x uint8 (q[j] | q[j+16] << 4)  w = d * (q - 8)      4.5 bits/weight
Grouped int4 ("w4", group g): uint8 (out, in/2) with element 2k in the low nibble and 2k+1 in the high one,
stored as q + 8 for q in [-8, 7], plus fp16 scales (out, in/g): 4 + 16/g bits/weight.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, LlamaRefError, QuantizationError
from .inputs import read_json
from .output import atomic_dir, check_output, inputs_of
from .matrices import Scratch, StoredMatrix, as_f32, f16_to_f32, first_nonfinite, plain, product
from .model_files import companion_files
from .safetensors import _write_safetensors, read_safetensors
from .weights import check_layer_count, check_weights, short_name, weight_shapes

F32 = np.float32
QK = 32                                    # GGUF's block size for Q8_0 and Q4_0
Q8_0_BLOCK_BYTES = 2 + QK                  # 34
Q4_0_BLOCK_BYTES = 2 + QK // 2             # 18


# ------------------------------------------------------------------------------------------------
# Rounding and checks

def round_half_away(v):
    """C's roundf: to nearest, ties away from zero (np.rint rounds ties to even: 2.5 -> 2, roundf gives 3).

    v - trunc(v) is exact in floating point, so this never suffers the `floor(a + 0.5)` bug (0.49999997 + 0.5
    rounds to 1.0 in float32).
    """
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0.0)).astype(v.dtype)


def _check_rows(x, block, what, name=None):
    """x as a float32 array whose last axis is a multiple of `block`; QuantizationError (saying what to do) if not."""
    x = np.asarray(x, dtype=F32)
    label = f"tensor {name!r}" if name else "the tensor"
    if x.ndim == 0 or x.shape[-1] % block:
        n = x.shape[-1] if x.ndim else 0
        raise QuantizationError(
            f"{label} has rows of length {n} (shape {x.shape}), not a multiple of {what}'s block of {block}; "
            f"choose a scheme without blocks (int8-channel), a group size that divides {n}, or keep it in float "
            "(quantize_model(..., on_bad_shape='keep'))")
    if not np.isfinite(x).all():
        raise QuantizationError(f"{label} holds NaN/Inf; a scale computed from it would be meaningless")
    return x


# ------------------------------------------------------------------------------------------------
# Symmetric int8: w ~ scale * q, q in [-127, 127]

def quantize_int8(w, axis=None):
    """Symmetric int8 with round-to-nearest-even. axis=None: one scale for the tensor; axis=-1: one scale per row
    (per output channel of an (out, in) matrix). Returns (q int8, scale float32 broadcastable against q)."""
    w = _check_rows(w, 1, "int8")
    amax = np.abs(w).max() if axis is None else np.abs(w).max(axis=axis, keepdims=True)
    scale = (np.asarray(amax, F32) / F32(127)).astype(F32)
    q = np.clip(np.rint(w / np.where(scale == 0, F32(1), scale)), -127, 127).astype(np.int8)   # all-zero rows -> 0
    return q, scale


def dequantize_int8(q, scale):
    return q.astype(F32) * scale


# ------------------------------------------------------------------------------------------------
# GGUF Q8_0: blocks of 32, d = amax / 127 (fp16), q = roundf(x / d)   (ggml-quants.c quantize_row_q8_0_ref)

def quantize_q8_0(x):
    """(..., n) float -> (..., n/32*34) uint8, byte for byte what ggml/gguf-py write.

    The float32 d (not its fp16 rounding) divides the values, as in ggml; only the stored d is fp16.
    """
    x = _check_rows(x, QK, "Q8_0")
    blocks = x.reshape(-1, QK)                                          # (nb, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / F32(127)            # (nb, 1) float32
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, F32(0), F32(1) / d)
    q = round_half_away(blocks * inv_d).astype(np.int8)                 # (nb, 32) in [-127, 127]
    out = np.empty((blocks.shape[0], Q8_0_BLOCK_BYTES), np.uint8)
    with np.errstate(over="ignore"):                                    # |d| > 65504 -> fp16 inf, as in ggml
        out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * Q8_0_BLOCK_BYTES)


Q8_0_BLOCK = np.dtype([("d", "<f2"), ("q", "i1", QK)])         # ggml's block_q8_0: the same 34 bytes, named


def blocks_of(data, block):
    """Raw block bytes (..., nb * block size) uint8 viewed as (..., nb) records of a block dtype (Q8_0_BLOCK, ...):
    each field (b["d"], b["q"]) is then a view of the bytes, no copy."""
    data = np.asarray(data, np.uint8)
    if data.ndim and data.strides[-1] != 1:
        data = np.ascontiguousarray(data)
    return data.view(block)


def block_scales(blocks, block, field, s: Scratch):
    """The fp16 field `field` (a scale) of every block of rows `blocks`, as float32 (nb, rows) in a reused buffer:
    gathered block-major in one pass whose inner loop runs along the rows, then expanded in contiguous passes."""
    f = blocks_of(blocks, block)[field].T                               # (nb, rows) float16, strided
    bits = s.get(field + "_bits", f.shape, np.float16)
    np.copyto(bits, f)
    return f16_to_f32(bits, s.get(field, f.shape))


def q8_0_split(data):
    """Q8_0 bytes (..., nb*34) -> (d float32 (..., nb, 1), q int8 (..., nb, 32))."""
    b = blocks_of(data, Q8_0_BLOCK)
    return f16_to_f32(b["d"])[..., None], b["q"]


def dequantize_q8_0(data, out=None):
    """Q8_0 bytes (..., nb*34) -> float32 (..., nb*32): w = d * q (one pass, straight into `out` if given)."""
    b = blocks_of(data, Q8_0_BLOCK)                                     # (..., nb)
    out = np.empty((*b.shape, QK), F32) if out is None else out.reshape(*b.shape, QK)
    np.multiply(b["q"], f16_to_f32(b["d"])[..., None], out=out)
    return out.reshape(*b.shape[:-1], -1)


# ------------------------------------------------------------------------------------------------
# GGUF Q4_0: blocks of 32, d = (value of largest magnitude, with its sign) / -8, q = min(15, int(x/d + 8.5))
# (ggml-quants.c quantize_row_q4_0_ref). Dividing by -8 maps that extreme value exactly onto q = 0 (-8 d),
# and the other side of zero gets 7 steps: the asymmetric int4 range [-8, 7] is used fully on the bigger side.

def quantize_q4_0(x):
    """(..., n) float -> (..., n/32*18) uint8, byte for byte what ggml/gguf-py write."""
    x = _check_rows(x, QK, "Q4_0")
    blocks = x.reshape(-1, QK)                                          # (nb, 32)
    imax = np.abs(blocks).argmax(axis=1)[:, None]                       # first index of the largest |x|
    vmax = np.take_along_axis(blocks, imax, axis=1)                     # (nb, 1), signed
    d = vmax / F32(-8)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, F32(0), F32(1) / d)
    q = np.minimum(np.trunc(blocks * inv_d + F32(8.5)), F32(15)).astype(np.uint8)   # (nb, 32) in [0, 15]
    out = np.empty((blocks.shape[0], Q4_0_BLOCK_BYTES), np.uint8)
    with np.errstate(over="ignore"):
        out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q[:, :QK // 2] | (q[:, QK // 2:] << np.uint8(4))      # element j low nibble, j+16 high
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK * Q4_0_BLOCK_BYTES)


Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", QK // 2)])    # ggml's block_q4_0: 18 bytes


def q4_0_split(data):
    """Q4_0 bytes (..., nb*18) -> (d float32 (..., nb, 1), q int8 (..., nb, 32) in [-8, 7])."""
    b = blocks_of(data, Q4_0_BLOCK)
    nib = b["qs"]
    q = np.concatenate([nib & np.uint8(0x0F), nib >> np.uint8(4)], axis=-1).view(np.int8) - np.int8(8)
    return f16_to_f32(b["d"])[..., None], q


def dequantize_q4_0(data, out=None):
    """Q4_0 bytes (..., nb*18) -> float32 (..., nb*32): w = d * (q - 8), each half of a block written in place."""
    b = blocks_of(data, Q4_0_BLOCK)                                     # (..., nb)
    d = f16_to_f32(b["d"])[..., None]                                   # (..., nb, 1)
    nib = b["qs"]                                                       # (..., nb, 16)
    out = np.empty((*b.shape, QK), F32) if out is None else out.reshape(*b.shape, QK)
    np.multiply((nib & np.uint8(0x0F)).view(np.int8) - np.int8(8), d, out=out[..., :QK // 2])   # elements 0..15
    np.multiply((nib >> np.uint8(4)).view(np.int8) - np.int8(8), d, out=out[..., QK // 2:])    # elements 16..31
    return out.reshape(*b.shape[:-1], -1)


# ------------------------------------------------------------------------------------------------
# GGUF K-quants (read only): super-blocks of 256 weights in 8 or 16 sub-blocks, each with its own small scale.
# llama.cpp's Q4_K_M files (the most downloaded GGUF of every Llama 2) are Q4_K with some tensors in Q6_K.
#   Q4_K  144 bytes = fp16 d | fp16 dmin | 12 bytes: eight 6-bit scales and eight 6-bit mins | 128 bytes of nibbles
#         w = d * scale_j * q - dmin * min_j, q in [0, 15]; 64 weights per 32 bytes: low nibbles are sub-block 2i,
#         high nibbles sub-block 2i+1                                                            4.5 bits/weight
#   Q6_K  210 bytes = 128 bytes low 4 bits | 64 bytes high 2 bits | 16 int8 scales | fp16 d
#         w = d * scale_j * (q - 32), q in [0, 63], 16 sub-blocks of 16                         6.56 bits/weight
# (ggml-quants.c dequantize_row_q4_K / _q6_K.) gguf-py decodes every other type; these two are ours because the
# Q4_K_M mix is the common case and a vectorised decode over whole tiles is what decode speed rests on.

QK_K = 256
Q4_K_BLOCK = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", QK_K // 2)])
Q6_K_BLOCK = np.dtype([("ql", "u1", QK_K // 2), ("qh", "u1", QK_K // 4), ("scales", "i1", QK_K // 16), ("d", "<f2")])
Q4_K_BLOCK_BYTES, Q6_K_BLOCK_BYTES = Q4_K_BLOCK.itemsize, Q6_K_BLOCK.itemsize          # 144, 210


def k_scales(data, block_bytes=Q4_K_BLOCK_BYTES):
    """The eight 6-bit scales and eight 6-bit mins of every Q4_K block (Q5_K's, block_bytes=176, are packed the same
    way), each (..., nb, 8) uint8, unpacked from the block's 12 bytes at offset 4 (ggml-quants.c get_scale_min_k4) four
    at a time, as the bytes of little-endian uint32 lanes:
        scales 0-3 = bytes 0-3 & 63       scales 4-7 = (bytes 8-11 & 15) | (bytes 0-3 >> 6) << 4
        mins   0-3 = bytes 4-7 & 63       mins   4-7 = (bytes 8-11 >> 4) | (bytes 4-7 >> 6) << 4"""
    data = np.asarray(data, np.uint8)
    words = np.ascontiguousarray(data).view("<u4").reshape(*data.shape[:-1], -1, block_bytes // 4)
    s0, s1, s2 = words[..., 1], words[..., 2], words[..., 3]          # bytes 4-7, 8-11, 12-15 of each block
    lanes = np.empty((*s0.shape, 2, 2), "<u4")                        # [scales, mins] x [0-3, 4-7]
    np.bitwise_and(s0, 0x3F3F3F3F, out=lanes[..., 0, 0])
    np.bitwise_and(s1, 0x3F3F3F3F, out=lanes[..., 1, 0])
    lanes[..., 0, 1] = (s2 & 0x0F0F0F0F) | ((s0 >> 2) & 0x30303030)
    lanes[..., 1, 1] = ((s2 >> 4) & 0x0F0F0F0F) | ((s1 >> 2) & 0x30303030)
    b = lanes.view(np.uint8).reshape(*s0.shape, 2, 8)
    return b[..., 0, :], b[..., 1, :]


def dequantize_q4_k(data, out=None):
    """Q4_K bytes (..., nb*144) -> float32 (..., nb*256): w = d * scale_j * q - dmin * min_j."""
    b = blocks_of(data, Q4_K_BLOCK)                                     # (..., nb)
    sc, mn = k_scales(data)                                             # (..., nb, 8)
    scale = f16_to_f32(b["d"])[..., None] * sc                          # (..., nb, 8)
    offset = f16_to_f32(b["dmin"])[..., None] * mn
    qs = b["qs"].reshape(*b.shape, 4, 1, 32)                            # 4 chunks of 32 bytes
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-2)     # (..., nb, 4, 2, 32): low nibbles are
    q = q.reshape(*b.shape, 8, 32)                                      # sub-block 2i, high ones 2i+1
    out = np.empty((*b.shape, 8, 32), F32) if out is None else out.reshape(*b.shape, 8, 32)
    np.multiply(q, scale[..., None], out=out)
    out -= offset[..., None]
    return out.reshape(*b.shape[:-1], -1)


def dequantize_q6_k(data, out=None):
    """Q6_K bytes (..., nb*210) -> float32 (..., nb*256): w = d * scale_j * (q - 32)."""
    b = blocks_of(data, Q6_K_BLOCK).reshape(-1)                        # (NB,)
    ql = b["ql"].reshape(-1, 2, 2, 32)                                  # (NB, half, 32-chunk, l)
    qh = b["qh"].reshape(-1, 2, 1, 32)                                  # (NB, half, 1, l)
    sc = b["scales"].reshape(-1, 2, 4, 2, 1)                            # (NB, half, k, l // 16, 1)
    d = f16_to_f32(b["d"]).reshape(-1, 1, 1, 1, 1)
    low = np.concatenate([ql & np.uint8(15), ql >> np.uint8(4)], axis=2)            # (NB, 2, 4, 32): k = 0..3
    high = (qh >> (np.arange(4, dtype=np.uint8) * np.uint8(2))[None, None, :, None]) & np.uint8(3)   # (NB, 2, 4, 32)
    q = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)       # (NB, 2, 4, 32) in [-32, 31]
    shape = (*np.shape(data)[:-1], np.shape(data)[-1] // Q6_K_BLOCK_BYTES * QK_K)
    out = np.empty(shape, F32) if out is None else out
    np.multiply(q.reshape(-1, 2, 4, 2, 16), d * sc, out=out.reshape(-1, 2, 4, 2, 16))
    return out


# ------------------------------------------------------------------------------------------------
# Grouped int4 with fp16 scales (the weight half of W4A16): symmetric, scale = amax / 7 per group of g

def quantize_w4(w, group=64):
    """(out, in) float -> (packed uint8 (out, in/2), scales fp16 (out, in/g)). q = clip(rint(w / s), -8, 7).

    The values are divided by the *fp16-rounded* scale, the one dequantization will use.
    """
    w = _check_rows(w, group, f"grouped int4 (g={group})")
    if group % 2:
        raise QuantizationError(f"group size {group} must be even (two 4-bit values share a byte)")
    g = w.reshape(*w.shape[:-1], -1, group)                             # (..., in/g, g)
    with np.errstate(over="ignore"):
        scales = (np.abs(g).max(axis=-1, keepdims=True) / F32(7)).astype(np.float16)   # (..., in/g, 1)
    s = scales.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s == 0, F32(0), np.rint(g / s))
    q = (np.clip(q, -8, 7).astype(np.int8) + np.int8(8)).astype(np.uint8).reshape(*w.shape)   # stored as q + 8
    packed = q[..., 0::2] | (q[..., 1::2] << np.uint8(4))               # element 2k low nibble, 2k+1 high
    return packed, scales[..., 0]


def unpack_w4(packed):
    """The int4 codes of a packed W4 matrix: int8 (out, in) in [-8, 7] (element 2k from the low nibble)."""
    q = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.int8)
    q[..., 0::2] = (packed & np.uint8(0x0F)).astype(np.int8) - np.int8(8)
    q[..., 1::2] = (packed >> np.uint8(4)).astype(np.int8) - np.int8(8)
    return q


def dequantize_w4(packed, scales):
    """Inverse of quantize_w4: float32 (out, in)."""
    q = unpack_w4(packed)
    n = q.shape[-1]
    group = n // scales.shape[-1]
    w = q.reshape(*q.shape[:-1], -1, group).astype(F32) * scales.astype(F32)[..., None]
    return w.reshape(*q.shape)


# ------------------------------------------------------------------------------------------------
# Activation quantization: dynamic, symmetric, one scale per token (computed at run time from that token's row)

def quantize_activations(x, bits=8):
    """x (..., C) -> (q int8/int16 (..., C), scale float32 (..., 1)), scale = max|x_token| / (2^(bits-1) - 1)."""
    if bits not in (8, 16):
        raise QuantizationError(f"activation bits must be 8 or 16, got {bits!r}")
    x = np.asarray(x, F32)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(x).max(axis=-1, keepdims=True) / F32(qmax)).astype(F32)
    inv = np.where(scale == 0, F32(0), F32(1) / np.where(scale == 0, F32(1), scale))
    q = np.clip(np.rint(x * inv), -qmax, qmax).astype(np.int8 if bits == 8 else np.int16)
    return q, scale


def fake_quantize_activations(x, bits=8):
    """What the next matmul sees when activations travel as `bits`-bit integers: dequant(quant(x))."""
    q, scale = quantize_activations(x, bits)
    return q.astype(F32) * scale


# ------------------------------------------------------------------------------------------------
# Q8_0 x Q8_0: llama.cpp's CPU dot product (ggml_vec_dot_q8_0_q8_0). Activations are quantized to Q8_0 too;
# per block: 32 int8 x int8 products summed in int32, then ONE float multiply by d_x * d_w.

def vec_dot_q8_0(x_bytes, w_bytes):
    """Dot product of two Q8_0-encoded vectors of equal length: sum_b d_x[b] d_w[b] sum_j qx[b,j] qw[b,j]."""
    dx, qx = q8_0_split(np.asarray(x_bytes))
    dw, qw = q8_0_split(np.asarray(w_bytes))
    isum = (qx.astype(np.int32) * qw.astype(np.int32)).sum(axis=-1)    # (nb,) int32: |sum| <= 32*127*127
    return F32(np.sum((dx[:, 0] * dw[:, 0]) * isum.astype(F32), dtype=F32))


def matmul_q8_0_int(x, w_bytes):
    """x (..., in) float @ W^T for W held as Q8_0 bytes (out, in/32*34): the integer path of llama.cpp.

    x is quantized to Q8_0 per token (per block of 32), then int8 x int8 -> int32 per block, one float
    multiply per block. Returns (..., out) float32. Slow in NumPy (integer einsum has no BLAS): for teaching.
    """
    x = np.asarray(x, F32)
    lead = x.shape[:-1]
    dx, qx = q8_0_split(quantize_q8_0(x.reshape(-1, x.shape[-1])))    # (N, nb, 1), (N, nb, 32)
    dw, qw = q8_0_split(w_bytes)                                        # (O, nb, 1), (O, nb, 32)
    isum = np.einsum("nbj,obj->nob", qx.astype(np.int32), qw.astype(np.int32))    # (N, O, nb) int32
    scale = dx[:, None, :, 0] * dw[None, :, :, 0]                        # (N, O, nb) float32
    out = np.sum(isum.astype(F32) * scale, axis=-1, dtype=F32)          # (N, O)
    return out.reshape(*lead, -1)


def fake_quantize_q8_k(x):
    """x (..., n) rounded the way llama.cpp's CPU backend sends activations to a K-quant dot product: Q8_K blocks of
    256 with a float32 scale d = max/-127, where max is the value of largest magnitude (ggml-quants.c
    quantize_row_q8_K_ref), q = min(127, round(x / d)). Returns q * d as float32."""
    x = np.asarray(x, F32)
    b = x.reshape(-1, QK_K)                                             # (blocks, 256)
    vmax = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax == 0, F32(0), F32(-127) / vmax).astype(F32)
        d = np.where(iscale == 0, F32(0), F32(1) / iscale).astype(F32)
    q = np.minimum(np.rint(iscale * b), F32(127))
    return (q * d).reshape(x.shape)


# ------------------------------------------------------------------------------------------------
# Matmuls on blocks: scale block dot products, not weights
#
#     y[t, n] = sum_b d[n, b] (x[t, b] . q[n, b])  -  m[n, b] sum(x[t, b])        x @ W.T for W in blocks b
#
# (m: the mins of the K-quants; Q4_0's "- 8" is a min of 8 d.) So a tile of rows needs its codes as floats, made by
# one cast of the tile's bytes in one long NumPy pass, and one batched product (np.matmul over a stack of blocks, BLAS
# underneath) of every block's slice of x with every row's codes there; the scales multiply a (blocks, tokens, rows)
# array of dot products, 1/32 of the tile. A weight is never multiplied by its scale. That pays while few tokens share
# the tile (decoding); a prompt of more than BLOCK_DOT_TOKENS tokens expands the tile to float32 instead, once, and
# one BLAS product serves all its tokens.

BLOCK_DOT_TOKENS = 16                   # up to here block dots beat an expanded tile (measured per kind, 7B rows)
BLOCK_DOT_TOKENS_K4 = 32                # Q4_K and Q5_K: their expansion costs more, block dots win up to 32 tokens


def q8_0_dots(blocks, x, out, s: Scratch):
    """out (N, r) = x (N, K) @ W.T for Q8_0 rows `blocks` (r, K/32*34), by block dot products."""
    r, N = blocks.shape[0], x.shape[0]
    nb = blocks.shape[1] // Q8_0_BLOCK_BYTES
    codes = s.get("codes", (r, nb, Q8_0_BLOCK_BYTES))                   # every byte as a float, in one pass (the 2
    np.copyto(codes, blocks.reshape(r, nb, -1).view(np.int8), casting="unsafe")   # bytes of a scale: never read)
    dots = s.get("dots", (nb, N, r))                                    # dots[b, t, n] = x[t, b] . q[n, b]
    np.matmul(x.reshape(N, nb, QK).transpose(1, 0, 2), codes[:, :, 2:].transpose(1, 2, 0), out=dots)
    np.multiply(dots, block_scales(blocks, Q8_0_BLOCK, "d", s)[:, None, :], out=dots)    # d (nb, r)
    out[...] = np.sum(dots, axis=0, out=s.get("y", (N, r)))           # summed in a buffer of its own layout: the
    return out                                                          # same numbers wherever out lies


def q4_0_dots(blocks, x, out, s: Scratch):
    """out (N, r) = x (N, K) @ W.T for Q4_0 rows (r, K/32*18): w = d (q - 8), q the low nibbles (elements 0-15) and
    high nibbles (16-31) of a block's 16 bytes."""
    r, N = blocks.shape[0], x.shape[0]
    nb = blocks.shape[1] // Q4_0_BLOCK_BYTES
    raw = blocks.reshape(r, nb, Q4_0_BLOCK_BYTES)
    nibbles = s.get("nibbles", (2, r, nb, Q4_0_BLOCK_BYTES), np.uint8)  # [low, high] of every byte
    np.bitwise_and(raw, np.uint8(15), out=nibbles[0])
    np.right_shift(raw, np.uint8(4), out=nibbles[1])
    codes = s.get("codes", nibbles.shape)
    np.copyto(codes, nibbles)
    dots = s.get("dots", (2, nb, N, r))                                 # dots[h, b, t, n]: half h of block b
    np.matmul(x.reshape(N, nb, 2, QK // 2).transpose(2, 1, 0, 3), codes[..., 2:].transpose(0, 2, 3, 1), out=dots)
    dots = np.add(dots[0], dots[1], out=dots[0])                        # (nb, N, r)
    dots -= F32(8) * x.reshape(N, nb, QK).sum(-1).T[:, :, None]         # the "- 8" of every code
    np.multiply(dots, block_scales(blocks, Q4_0_BLOCK, "d", s)[:, None, :], out=dots)
    out[...] = np.sum(dots, axis=0, out=s.get("y", (N, r)))
    return out


def _scaled_block_sums(dots, scales, sub_axes, d, s: Scratch):
    """y (N, r) = sum_b d[b, n] sum_j scales[j..., b, n] dots[j..., b, t, n]: dots (sub-block axes..., nb, N, r) are
    the block dot products, scales (sub-block axes..., nb, 1, r) a float32 view of the sub-block scales, d (nb, r).
    Every pass runs along r; the result lands in a buffer of its own layout (the same numbers wherever out lies)."""
    np.multiply(dots, scales, out=dots)                                 # z: (nb, N, r)
    z = np.sum(dots, axis=sub_axes, out=s.get("z", tuple(n for i, n in enumerate(dots.shape) if i not in sub_axes)))
    np.multiply(z, d[:, None, :], out=z)
    return np.sum(z, axis=0, out=s.get("y", z.shape[1:]))               # (N, r)


def _cast_codes(q, s: Scratch):
    """The codes (integers in uint8) as float32, in one pass into a reused buffer."""
    codes = s.get("codes", q.shape)
    np.copyto(codes, q)
    return codes


_NIBBLE_SHIFTS = np.array([0, 4], np.uint32).reshape(2, 1, 1)
_K_HEAD = {size: np.dtype([("head", "V16"), ("rest", "V", size - 16)]) for size in (144, 176)}   # Q4_K, Q5_K


def k_header(blocks, block_bytes, s: Scratch):
    """d, dmin (nb, r) and the eight scales and mins (8, nb, r), float32, of K-quant rows whose blocks open with d,
    dmin and 12 bytes of 6-bit scales and mins (Q4_K, Q5_K): the 16 header bytes of every block are gathered once,
    block-major (one pass, 16 bytes a block), and unpacked as k_scales does, so every pass runs along the rows."""
    r = blocks.shape[0]
    heads = blocks.view(_K_HEAD[block_bytes])["head"]                 # (r, nb): 16 bytes each, strided
    nb = heads.shape[1]
    gathered = s.get("head", (nb, r), "V16")
    np.copyto(gathered, heads.T)
    head = gathered.view("<u4").reshape(nb, r, 4).transpose(2, 0, 1)   # [d | dmin, scale bytes 0-3, 4-7, 8-11]
    d_dmin = f16_to_f32(gathered.view(np.float16).reshape(nb, r, 8)[..., :2], s.get("d_dmin", (nb, r, 2)))
    d, dmin = d_dmin[..., 0], d_dmin[..., 1]
    lanes = s.get("lanes", (2, 2, nb, r), "<u4")                        # [0-3, 4-7] x [scales, mins], 4 per lane
    np.bitwise_and(head[1:3], 0x3F3F3F3F, out=lanes[0])                 # scales 0-3, mins 0-3
    high = np.right_shift(head[3], _NIBBLE_SHIFTS, out=lanes[1])       # bytes 8-11: scales' low nibbles, mins' high
    np.bitwise_and(high, 0x0F0F0F0F, out=high)
    top = np.right_shift(head[1:3], 2, out=s.get("top2", (2, nb, r), "<u4"))   # the 2 top bits of bytes 0-7 ...
    np.bitwise_and(top, 0x30303030, out=top)                            # ... moved to bits 4-5
    np.bitwise_or(high, top, out=high)                                  # scales 4-7, mins 4-7
    both = s.get("scales", (2, 8, nb, r))                               # [scales, mins] x j, float32
    np.copyto(both.reshape(2, 2, 4, nb, r), lanes.view(np.uint8).reshape(2, 2, nb, r, 4).transpose(1, 0, 4, 2, 3))
    return d, dmin, both[0], both[1]


def q4_k_dots(blocks, x, out, s: Scratch):
    """out (N, r) = x (N, K) @ W.T for Q4_K rows (r, K/256*144): w = d scale_j q - dmin min_j per sub-block j of 32.
    The mins need no codes at all: their part is sum_j dmin min_j sum(x_j), one small product."""
    return _k_dots(blocks, x, out, s, Q4_K_BLOCK_BYTES, 16)


Q5_K_BLOCK_BYTES = 176                                  # fp16 d | fp16 dmin | 12 bytes scales/mins | qh 32 | qs 128
_Q5_K_BITS = np.array([[0, 2, 4, 6], [1, 3, 5, 7]], np.uint32).reshape(2, 1, 1, 4, 1)      # [h, i]: bit 2i + h


def q5_k_dots(blocks, x, out, s: Scratch):
    """out (N, r) = x (N, K) @ W.T for Q5_K rows (r, K/256*176): Q4_K's blocks with a fifth bit per weight, bit
    2i + h of qh byte l for element 64 i + 32 h + l, added as 16 to the nibble before the cast."""
    return _k_dots(blocks, x, out, s, Q5_K_BLOCK_BYTES, 48, high_bits=_q5_k_high_bits)


def _q5_k_high_bits(blocks, nibbles, s: Scratch):
    r, nb = nibbles.shape[1:3]
    qh = s.get("qh", (r, nb, 32), np.uint8)                             # qh[l]: bit 2i + h for element (i, h, l)
    np.copyto(qh, blocks.reshape(r, nb, Q5_K_BLOCK_BYTES)[:, :, 16:48])
    top = s.get("top", (2, r, nb, 4, 8), "<u4")                         # [h, n, b, i, 4 bytes of l at a time]
    np.right_shift(qh.view("<u4").reshape(1, r, nb, 1, 8), _Q5_K_BITS, out=top)
    np.bitwise_and(top, 0x01010101, out=top)
    np.left_shift(top, 4, out=top)                                      # 0 or 16 in every byte
    region = nibbles[:, :, :, 48:].reshape(2, r, nb, 4, 32)
    np.bitwise_or(region, top.view(np.uint8).reshape(2, r, nb, 4, 32), out=region)


def _k_dots(blocks, x, out, s: Scratch, block_bytes, qs_at, high_bits=None):
    """Q4_K and Q5_K: blocks of 256 opening with d, dmin and the 6-bit scales and mins (k_header), their 4-bit codes
    at byte qs_at in 4 chunks of 32 bytes, sub-block j = 2i + h being nibble half h of chunk i."""
    r, N = blocks.shape[0], x.shape[0]
    nb = blocks.shape[1] // block_bytes
    raw = blocks.reshape(r, nb, block_bytes)
    if high_bits is None:                                               # [low, high] nibble of every byte, as floats
        codes = s.get("codes", (2, r, nb, block_bytes))                 # (the cast happens inside each ufunc call)
        np.bitwise_and(raw, np.uint8(15), out=codes[0], casting="unsafe")
        np.right_shift(raw, np.uint8(4), out=codes[1], casting="unsafe")
    else:
        nibbles = s.get("nibbles", (2, r, nb, block_bytes), np.uint8)
        np.bitwise_and(raw, np.uint8(15), out=nibbles[0])
        np.right_shift(raw, np.uint8(4), out=nibbles[1])
        high_bits(blocks, nibbles, s)
        codes = _cast_codes(nibbles, s)
    dots = s.get("dots", (2, nb, 4, N, r))                              # dots[h, b, i, t, n]
    np.matmul(x.reshape(N, nb, 4, 2, 32).transpose(3, 1, 2, 0, 4),
              codes[..., qs_at:].reshape(2, r, nb, 4, 32).transpose(0, 2, 3, 4, 1), out=dots)
    d, dmin, scales, mins = k_header(blocks, block_bytes, s)            # (nb, r), (nb, r), (8, nb, r), (8, nb, r)
    y = _scaled_block_sums(dots, scales.reshape(4, 2, nb, r).transpose(1, 2, 0, 3)[:, :, :, None, :], (0, 2), d, s)
    sums = x.reshape(N, nb, 8, 32).sum(-1).transpose(1, 0, 2)           # (nb, N, 8): sum(x_j)
    m = np.matmul(sums, mins.transpose(1, 0, 2), out=s.get("mins", (nb, N, r)))     # sum_j min_j sum(x_j)
    np.multiply(m, dmin[:, None, :], out=m)
    y -= m.sum(axis=0)
    out[...] = y
    return out


_Q6_K_TOP_SHIFTS = np.array([4, 2, 0], np.uint32).reshape(3, 1, 1, 1, 1)   # bits 2k of a byte to bits 4-5, k < 3
_Q6_K_TAIL = np.dtype([("quants", "V", 192), ("tail", "V18")])                  # the 16 scales and d of a block


def q6_k_dots(blocks, x, out, s: Scratch):
    """out (N, r) = x (N, K) @ W.T for Q6_K rows (r, K/256*210): w = d scale_j (q - 32) per sub-block j of 16,
    q = 4 low bits | 2 high bits << 4. Element h*128 + 32k + l of a block takes its low bits from byte
    h*64 + 32(k % 2) + l of ql (the low nibble for k < 2, the high one for k >= 2) and its high bits from bits 2k of
    byte h*32 + l of qh. The codes are assembled k-major, (4, r, nb, 2, 32), so that after one gather of the low bytes
    every step is one long NumPy pass; bit moves run on uint32 lanes (NumPy's uint8 shifts are not vectorised), the
    mask keeping each byte's own bits."""
    r, N = blocks.shape[0], x.shape[0]
    nb = blocks.shape[1] // Q6_K_BLOCK_BYTES
    b = blocks_of(blocks, Q6_K_BLOCK)                                   # (r, nb)
    low = s.get("low", (2, r, nb, 2, 32), np.uint8)                     # ql by 32-byte chunk j: (j, n, b, h, l)
    np.copyto(low, b["ql"].reshape(r, nb, 2, 2, 32).transpose(3, 0, 1, 2, 4))
    q = s.get("q", (4, r, nb, 2, 32), np.uint8)                         # q[k, n, b, h, l]
    np.bitwise_and(low, np.uint8(15), out=q[:2])
    np.right_shift(low, np.uint8(4), out=q[2:])
    high = s.get("high", (r, nb, 2, 32), np.uint8)
    np.copyto(high, b["qh"].reshape(r, nb, 2, 32))
    high, top = high.view("<u4"), s.get("top", (4, r, nb, 2, 8), "<u4")
    np.left_shift(high, _Q6_K_TOP_SHIFTS, out=top[:3])                  # bits 2k -> 4-5 (k = 0, 1, 2)
    np.right_shift(high, 2, out=top[3])                                 # bits 6-7 -> 4-5
    np.bitwise_and(top, 0x30303030, out=top)
    np.bitwise_or(q.view("<u4"), top, out=q.view("<u4"))
    codes = _cast_codes(q, s)
    dots = s.get("dots", (4, nb, 2, 2, N, r))                           # dots[k, b, h, half, t, n], sub-blocks of 16
    xs = x.reshape(N, nb, 2, 4, 2, 16)                                  # [t, b, h, k, half, i]
    np.matmul(xs.transpose(3, 1, 2, 4, 0, 5), codes.reshape(4, r, nb, 2, 2, 16).transpose(0, 2, 3, 4, 5, 1), out=dots)
    dots -= F32(32) * xs.sum(-1).transpose(3, 1, 2, 4, 0)[..., None]    # the "- 32" of every code
    tails = s.get("tails", (nb, r), "V18")                              # scales and d, gathered block-major
    np.copyto(tails, blocks.view(_Q6_K_TAIL)["tail"].T)
    tails = tails.view(np.uint8).reshape(nb, r, 18)
    scales = s.get("scales", (16, nb, r))
    np.copyto(scales, tails[..., :16].view(np.int8).transpose(2, 0, 1))
    d = f16_to_f32(tails[..., 16:].view(np.float16)[..., 0], s.get("d", (nb, r)))
    view = scales.reshape(2, 4, 2, nb, r).transpose(1, 3, 0, 2, 4)[:, :, :, :, None, :]    # (k, b, h, half, 1, r)
    out[...] = _scaled_block_sums(dots, view, (0, 2, 3), d, s)
    return out


# ------------------------------------------------------------------------------------------------
# Quantized matrices: what a model holds instead of a float32 (out, in) weight

class QuantizedMatrix(StoredMatrix):
    """An (out, in) weight held quantized; `.matmul(x) = x @ W.T` dequantizes a tile of rows at a time.

    The forward (model.linear) calls .matmul; the embedding lookup calls [ids]. Only the quantized bytes are
    held: a matmul dequantizes `matrices.TILE_FLOATS` floats (4 MB) at a time, uses them and drops them (the tile
    loop is matrices.StoredMatrix's, shared with float16/bfloat16 weights). That costs a dequantization per call
    (measured in chapter 12), the price of never keeping a float32 copy.
    Subclasses define `_dequantize_rows(rows)` and the arrays they hold (`arrays()`).
    """
    act_bits = None                       # 8 or 16: activations are quantized per token before the matmul

    def _input(self, x):
        """With act_bits, x is rounded per token the way a W4A16/W8A8 engine sends it."""
        x = np.asarray(x, F32)
        return fake_quantize_activations(x, self.act_bits) if self.act_bits else x


class Q8_0Matrix(QuantizedMatrix):
    """GGUF Q8_0 bytes (out, in/32*34). With int_dot=True, matmul runs llama.cpp's integer Q8_0 x Q8_0 path."""
    kind = "q8_0"

    def __init__(self, data, shape, int_dot=False):
        self.data, self.shape, self.int_dot = plain(data), tuple(shape), int_dot

    @classmethod
    def quantize(cls, w, name=None):
        w = _check_rows(w, QK, "Q8_0", name)
        return cls(quantize_q8_0(w), w.shape)

    def _dequantize_rows(self, rows):
        return dequantize_q8_0(self.data[rows])

    def _expand(self, rows, out):
        return dequantize_q8_0(self.data[rows], out)

    def _tile(self, x, rows, out, s):
        if self.int_dot:
            out[...] = matmul_q8_0_int(x, self.data[rows])
            return out
        if x.shape[0] <= BLOCK_DOT_TOKENS:
            return q8_0_dots(self.data[rows], x, out, s)
        return super()._tile(x, rows, out, s)

    def first_nonfinite(self):
        return first_bad_scale(self.data, Q8_0_BLOCK_BYTES, (0,), QK)

    def arrays(self):
        return {"blocks": self.data}


class Q4_0Matrix(QuantizedMatrix):
    """GGUF Q4_0 bytes (out, in/32*18)."""
    kind = "q4_0"

    def __init__(self, data, shape):
        self.data, self.shape = plain(data), tuple(shape)

    @classmethod
    def quantize(cls, w, name=None):
        w = _check_rows(w, QK, "Q4_0", name)
        return cls(quantize_q4_0(w), w.shape)

    def _dequantize_rows(self, rows):
        return dequantize_q4_0(self.data[rows])

    def _expand(self, rows, out):
        return dequantize_q4_0(self.data[rows], out)

    def _tile(self, x, rows, out, s):
        if x.shape[0] <= BLOCK_DOT_TOKENS:
            return q4_0_dots(self.data[rows], x, out, s)
        return super()._tile(x, rows, out, s)

    def first_nonfinite(self):
        return first_bad_scale(self.data, Q4_0_BLOCK_BYTES, (0,), QK)

    def arrays(self):
        return {"blocks": self.data}


def first_bad_scale(data, block_bytes, offsets, block_len, rows_at_once=4096):
    """(row, first column of its block) of the first block whose fp16 scales (2 bytes at each of `offsets` in the
    block) are inf/NaN, or None. A block of integer codes can stand for inf/NaN only through them, so only they are
    read: 2 or 4 bytes of every 18-210."""
    for r0 in range(0, data.shape[0], rows_at_once):
        part = np.asarray(data[r0:r0 + rows_at_once], np.uint8)
        raw = part.reshape(part.shape[0], -1, block_bytes)               # (rows, nb, block bytes)
        for off in offsets:
            at = first_nonfinite(raw[:, :, off:off + 2].view(np.float16)[:, :, 0])
            if at is not None:
                return r0 + at[0], at[1] * block_len
    return None


class Int8Matrix(QuantizedMatrix):
    """int8 q (out, in) + float32 scale: per channel (out, 1) or per tensor (1, 1)."""

    def __init__(self, q, scale, act_bits=None):
        self.q, self.scale, self.shape, self.act_bits = plain(q), np.asarray(scale, F32).reshape(-1, 1), q.shape, act_bits
        self.kind = "int8-channel" if self.scale.shape[0] > 1 or q.shape[0] == 1 else "int8-tensor"

    @classmethod
    def quantize(cls, w, per_channel=True, act_bits=None, name=None):
        q, scale = quantize_int8(_check_rows(w, 1, "int8", name), axis=-1 if per_channel else None)
        return cls(q, scale, act_bits)

    def _dequantize_rows(self, rows):
        scale = self.scale[rows] if self.scale.shape[0] > 1 else self.scale
        return self.q[rows].astype(F32) * scale

    def first_nonfinite(self):                   # int8 codes are finite: only the float32 scales can be inf/NaN
        at = first_nonfinite(self.scale)
        return None if at is None else (at[0] if self.scale.shape[0] > 1 else 0, 0)

    def arrays(self):
        return {"qweight": self.q, "scales": self.scale}


class W4Matrix(QuantizedMatrix):
    """Grouped int4: packed uint8 (out, in/2) + fp16 scales (out, in/group)."""

    def __init__(self, packed, scales, act_bits=None):
        self.packed, self.scales, self.act_bits = plain(packed), plain(scales), act_bits
        self.shape = (packed.shape[0], packed.shape[1] * 2)
        self.group = self.shape[1] // scales.shape[1]
        self.kind = f"w4-g{self.group}"

    @classmethod
    def quantize(cls, w, group=64, act_bits=None, name=None):
        packed, scales = quantize_w4(_check_rows(w, group, f"grouped int4 (g={group})", name), group)
        return cls(packed, scales, act_bits)

    def _dequantize_rows(self, rows):
        return dequantize_w4(self.packed[rows], self.scales[rows])

    def first_nonfinite(self):                   # only the fp16 scales can be inf/NaN
        at = first_nonfinite(self.scales)
        return None if at is None else (at[0], at[1] * self.group)

    def arrays(self):
        return {"qweight": self.packed, "scales": self.scales}


def quantize_matrix(w, fmt, act_bits=None, name=None) -> QuantizedMatrix:
    """One (out, in) weight in format fmt: q8_0 | q4_0 | int8-channel | int8-tensor | w4-g<group>."""
    if fmt == "q8_0":
        return Q8_0Matrix.quantize(w, name)
    if fmt == "q4_0":
        return Q4_0Matrix.quantize(w, name)
    if fmt in ("int8-channel", "int8-tensor"):
        return Int8Matrix.quantize(w, fmt == "int8-channel", act_bits, name)
    m = re.fullmatch(r"w4-g(\d+)", fmt)
    if m:
        return W4Matrix.quantize(w, int(m.group(1)), act_bits, name)
    raise QuantizationError(f"unknown weight format {fmt!r}; use q8_0, q4_0, int8-channel, int8-tensor or w4-g64")


# ------------------------------------------------------------------------------------------------
# Schemes: which format each kind of tensor gets
#
# Policy (stated once, used everywhere):
#   norms (RMSNorm weights)  stay float32: C numbers per layer, and every activation is multiplied by them.
#   block matmuls            wq wk wv wo w_gate w_up w_down: the scheme's weight format.
#   classifier (lm_head)     8-bit even in 4-bit schemes: the logits feed the softmax directly. llama.cpp keeps
#                            output.weight at higher precision (Q6_K) for its Q4_0 files; Qualcomm's W4A16
#                            keeps some tensors W8A16. We use Q8_0 / int8 per channel (formats we can write).
#   embedding                a lookup table: only the rows of the prompt's tokens are dequantized. llama.cpp
#                            quantizes token_embd with the file's type; we do the same for Q8_0/Q4_0 and use
#                            int8 per row (= per channel) for the int8 / W4A16 schemes.
#   tied embedding/classifier one tensor, in the classifier's format.

def parse_scheme(scheme: str) -> dict:
    """Scheme name -> {"layers", "embed", "head": weight formats, "act_bits": None/8/16}."""
    s = scheme.lower()
    if s == "q8_0":
        return {"layers": "q8_0", "embed": "q8_0", "head": "q8_0", "act_bits": None}
    if s == "q4_0":
        return {"layers": "q4_0", "embed": "q4_0", "head": "q8_0", "act_bits": None}
    if s in ("int8-channel", "int8-tensor"):
        return {"layers": s, "embed": "int8-channel", "head": "int8-channel", "act_bits": None}
    m = re.fullmatch(r"w4a(16|8)-g(\d+)", s)
    if m and (int(m.group(2)) < 2 or int(m.group(2)) % 2):
        raise QuantizationError(f"scheme {scheme!r}: the group size must be an even number >= 2 (two 4-bit values share "
                                "a byte); Llama layers use 32, 64 or 128")
    if m:
        return {"layers": f"w4-g{m.group(2)}", "embed": "int8-channel", "head": "int8-channel",
                "act_bits": int(m.group(1))}
    raise QuantizationError(f"unknown scheme {scheme!r}; choose q8_0, q4_0, int8-channel, int8-tensor or "
                            "w4a16-g32/-g64/-g128 (also w4a8-gN)")


SCHEMES = ["q8_0", "q4_0", "w4a16-g32", "w4a16-g64", "w4a16-g128", "int8-channel"]


def tensor_format(name: str, config: LlamaConfig, policy: dict) -> str | None:
    """The format `name` gets under a policy; None = stays float32."""
    short = short_name(name)
    if short in ("attn_norm", "ffn_norm", "norm"):
        return None
    if short == "lm_head" or (short == "embed" and config.tie_embeddings):
        return policy["head"]
    if short == "embed":
        return policy["embed"]
    return policy["layers"]


def quantize_weights(config: LlamaConfig, weights: dict, scheme: str, on_bad_shape="error") -> dict:
    """HF-named float weights -> the same dict with every matmul weight (and the embedding) quantized.

    on_bad_shape: "error" raises QuantizationError naming the tensor; "keep" leaves that tensor float32.
    """
    policy = parse_scheme(scheme)
    out = {}
    for name, w in weights.items():
        fmt = tensor_format(name, config, policy)
        if fmt is None:
            out[name] = as_f32(name, w)
            continue
        act = policy["act_bits"] if short_name(name) != "embed" or config.tie_embeddings else None
        if isinstance(w, QuantizedMatrix):
            if w.kind == fmt and w.act_bits == act:          # already in this format: keep the bytes as they are
                out[name] = w
                continue
            w = w.dequantize()                               # another format: re-quantize from its float values
        try:
            out[name] = quantize_matrix(as_f32(name, w), fmt, act, name)
        except QuantizationError:
            if on_bad_shape != "keep":
                raise
            out[name] = as_f32(name, w)
    return out


def set_integer_dot(model, on=True):
    """Make a model multiply the way llama.cpp's CPU backend does, for comparisons: every Q8_0 matrix quantizes its
    activations to Q8_0 and sums int8 x int8 in int32 per block (matmul_q8_0_int, slow in NumPy); every K-quant matrix
    of a GGUF rounds its activations to Q8_K first (fake_quantize_q8_k, exact in float32)."""
    for w in model.weights.values():
        w = getattr(w, "inner", w)                           # q/k of a GGUF: a RowPermuted view of its rows
        if isinstance(w, Q8_0Matrix):
            w.int_dot = on
        elif getattr(w, "kind", "").endswith("_k"):
            w.act_quant = "q8_k" if on else None
    return model


def quantize_model(model, scheme: str, on_bad_shape="error"):
    """A Llama -> a new Llama holding `scheme`-quantized weights (for a weights dict: quantize_weights).

    (quant.py is a format and does not import the model: the new model is made by the given one's class.)"""
    if isinstance(model, dict) or not hasattr(model, "weights"):
        raise QuantizationError("quantize_model(model, scheme) takes a Llama; quantize an HF-named weights dict with "
                                "quantize_weights(config, weights, scheme) and build Llama(config, quantized) from it")
    return type(model)(model.config, quantize_weights(model.config, model.weights, scheme, on_bad_shape))


def held_nbytes(model) -> int:
    """Bytes of every weight array the model holds, each buffer counted once."""
    seen, total = set(), 0

    def visit(a):
        nonlocal total
        if isinstance(a, StoredMatrix):
            for arr in a.arrays().values():
                visit(arr)
        elif isinstance(a, np.ndarray):
            base = a
            while isinstance(base.base, np.ndarray):
                base = base.base
            key = (id(base), a.__array_interface__["data"][0])
            if key not in seen:
                seen.add(key)
                total += a.nbytes
        elif isinstance(a, dict):
            for v in a.values():
                visit(v)
        elif isinstance(a, list):
            for v in a:
                visit(v)

    visit(model.weights)                         # every array the model holds, once (params holds the same ones)
    return total


# ------------------------------------------------------------------------------------------------
# Save / load. Q8_0 and Q4_0 models are best saved as GGUF (gguf_io.save_gguf). Every scheme can be saved in
# our own directory format, an HF-like directory:
#   config.json        the HF config plus a block  "quantization": {"format": "llama_ref-quant-v1",
#                      "scheme": "w4a16-g64", "act_bits": 16, "tensors": {name: kind}}
#   model.safetensors  float tensors under their HF names; a quantized tensor `name` as
#                        q8_0/q4_0:  name + ".blocks"  uint8 (out, in/32*34 or *18), GGUF's bytes
#                        int8-*:     name + ".qweight" int8 (out, in),  name + ".scales" float32 (out or 1, 1)
#                        w4-gN:      name + ".qweight" uint8 (out, in/2), name + ".scales" float16 (out, in/N)
#   tokenizer.model    copied when given

QUANT_FORMAT = "llama_ref-quant-v1"
QUANT_DTYPES = ("F32", "F16", "U8", "I8")       # what save_quantized writes (safetensors dtypes)


def save_quantized(path, model, scheme: str, tokenizer_path=None, force=False, chat_template=None) -> Path:
    """Write a quantized model as a directory (format above) with what travels with a model (tokenizer files, the
    chat template of a chat model: model_files.companion_files); atomic: built in a temp dir, then renamed."""
    path = check_output(path, force=force, kind="dir", inputs=inputs_of(model, tokenizer_path))
    companions = companion_files(model.config, tokenizer_path, chat_template)     # checked before any work
    tensors, kinds = {}, {}
    for name, w in model.weights.items():
        if isinstance(w, QuantizedMatrix):
            kinds[name] = w.kind
            for part, arr in w.arrays().items():
                tensors[f"{name}.{part}"] = np.ascontiguousarray(arr)
        else:
            tensors[name] = np.ascontiguousarray(np.asarray(w, F32))
    policy = parse_scheme(scheme)
    cfg = model.config.to_hf()
    cfg["quantization"] = {"format": QUANT_FORMAT, "scheme": scheme, "act_bits": policy["act_bits"], "tensors": kinds}
    with atomic_dir(path, force=force) as tmp:                             # the old directory stays until the end
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _write_safetensors(tmp / "model.safetensors", tensors, {"format": QUANT_FORMAT, "scheme": scheme})
        for name, content in companions.items():
            (tmp / name).write_bytes(content)
    return path


def is_quantized_dir(path) -> bool:
    p = Path(path) / "config.json"
    try:
        d = read_json(p, "config.json")                             # a FIFO or /dev/zero is refused, not read
    except CheckpointError:
        return False
    return isinstance(d, dict) and "quantization" in d


# What each kind of quantized matrix stores: part name -> (dtype, shape from (out, in)).
def stored_parts(kind, out_dim, in_dim):
    if kind == "q8_0":
        return {"blocks": (np.uint8, (out_dim, in_dim // QK * 34))}
    if kind == "q4_0":
        return {"blocks": (np.uint8, (out_dim, in_dim // QK * Q4_0_BLOCK_BYTES))}
    if kind == "int8-channel":
        return {"qweight": (np.int8, (out_dim, in_dim)), "scales": (np.float32, (out_dim, 1))}
    if kind == "int8-tensor":
        return {"qweight": (np.int8, (out_dim, in_dim)), "scales": (np.float32, (1, 1))}
    m = re.fullmatch(r"w4-g(\d+)", kind or "")
    if m and int(m.group(1)) > 0 and in_dim % int(m.group(1)) == 0:
        return {"qweight": (np.uint8, (out_dim, in_dim // 2)), "scales": (np.float16, (out_dim, in_dim // int(m.group(1))))}
    return None


def load_quantized_weights(path, check_finite=True) -> tuple[LlamaConfig, dict]:
    """Read a directory written by save_quantized -> (config, weights with QuantizedMatrix objects), memory-mapped.

    Validated like every checkpoint: the config through the typed parser, every tensor the config requires present
    with the dtype and shape its kind stores, no tensor of another model (a config saying 2 layers over a file of 6
    is refused), and no NaN/Inf (scales included)."""
    path = Path(path)
    fix = "re-create it with `python -m llama_ref quantize`"
    try:
        cfg = read_json(path / "config.json", "config.json")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {fix}") from None
    q = cfg.get("quantization") if isinstance(cfg, dict) else None
    if not isinstance(q, dict) or q.get("format") != QUANT_FORMAT or not isinstance(q.get("tensors"), dict):
        raise CheckpointError(f"{path}/config.json has no llama_ref quantization block (format {QUANT_FORMAT!r} with a "
                              f"'tensors' map); {fix}")
    config = LlamaConfig.from_hf(cfg, source=f"{path}/config.json")
    if q["tensors"]:                                                     # before anything enumerates the layers
        check_layer_count(config, [n for n in q["tensors"] if isinstance(n, str)], f" of {path}")
    act_bits = q.get("act_bits")
    if act_bits not in (None, 8, 16):
        raise CheckpointError(f"{path}/config.json: quantization act_bits={act_bits!r} must be null, 8 or 16; {fix}")
    shapes = weight_shapes(config)
    wanted = {}                                                          # stored tensor name -> (dtype, shape)
    for name, shape in shapes.items():
        kind = q["tensors"].get(name)
        if kind is None:
            wanted[name] = (np.float32, shape)                             # save_quantized writes floats as float32
            continue
        parts = stored_parts(kind, *shape) if isinstance(kind, str) and len(shape) == 2 else None
        if parts is None:
            raise CheckpointError(f"{path}: tensor {name!r} has quantization kind {kind!r}, which llama_ref cannot "
                                  f"read for shape {shape}; {fix}")
        wanted.update({f"{name}.{part}": spec for part, spec in parts.items()})
    stray = sorted(set(q["tensors"]) - set(shapes))
    if stray:
        raise CheckpointError(f"{path}/config.json lists quantized tensors the config has no place for ({stray[:3]}); "
                              f"config and weights disagree; {fix}")
    file = path / "model.safetensors"
    stored, _ = read_safetensors(file, dtypes=QUANT_DTYPES)            # memory-mapped, every header lie refused
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing:
        raise CheckpointError(f"{file} lacks {len(missing)} tensor(s) the config requires, e.g. {missing[0]!r}; {fix}")
    if extra:
        raise CheckpointError(f"{file} holds {len(extra)} tensor(s) the config has no place for, e.g. {extra[0]!r} "
                              f"(does config.json say too few layers?); {fix}")
    for n, (dtype, shape) in wanted.items():
        a = stored[n]
        if tuple(a.shape) != shape or a.dtype != dtype:
            raise CheckpointError(f"{file}: tensor {n!r} is {a.dtype} {tuple(a.shape)}, expected "
                                  f"{np.dtype(dtype)} {shape}; {fix}")
    weights = {}
    for name in shapes:
        kind = q["tensors"].get(name)
        act = act_bits if short_name(name) != "embed" or config.tie_embeddings else None
        if kind is None:
            weights[name] = stored[name]
        elif kind in ("q8_0", "q4_0"):
            weights[name] = (Q8_0Matrix if kind == "q8_0" else Q4_0Matrix)(stored[name + ".blocks"], shapes[name])
        elif kind.startswith("int8"):
            weights[name] = Int8Matrix(stored[name + ".qweight"], stored[name + ".scales"], act)
        else:
            weights[name] = W4Matrix(stored[name + ".qweight"], stored[name + ".scales"], act)
    check_weights(config, weights, source=path, check_finite=check_finite)
    return config, weights
