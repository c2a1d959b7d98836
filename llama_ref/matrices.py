"""Weight matrices kept as they are stored: float16, bfloat16, float32, every GGUF type; multiplied a tile at a time.

Chapter 14 (the real Llama 2) teaches it; chapter 12's quantized matrices (quant.py) are the same idea.

A 7B model is 6.7 billion weights: 27 GB as float32, 13.5 GB as float16, 7.2 GB as Q8_0. To run it in the memory of a
laptop, the weights stay in the file's form, memory-mapped (the OS reads a page when it is touched and may drop it
again), and a matmul expands one tile of rows at a time to float32, uses it and drops it:

    x (N, in) @ W.T  =  concat over tiles [ x @ expand(W[r0:r1]).T ]            W (out, in) as stored

So the only float32 weights alive are one tile (TILE_FLOATS = 1M floats, 4 MB). The price is an expansion per matmul:
decoding a token expands every weight once, prefilling a prompt of any length also once. The expansions, fastest first:

    int8 -> float32     astype                                     (quant.py's int8 formats)
    bfloat16 -> float32 a 16-bit shift: bf16 is the top half of a float32
    Q8_0 -> float32     fp16 scale per block of 32 times int8      (quant.py)
    float16 -> float32  sign | (exponent, mantissa) << 13, times 2^112 (rescales the exponent bias 15 -> 127,
                        and turns float16's subnormals into the right float32 normals)
    Q4_0, K-quants      unpack nibbles, scale per block             (quant.py)

Every stored matrix has `.shape` (out, in), `.matmul(x) -> x @ W.T`, `[ids]` (embedding rows), `.dequantize()` (the
whole float32 matrix) and `.nbytes`. `Llama` takes any of them in place of a float array (model.linear calls matmul).
`quantized` says whether expanding loses nothing (float formats: a model may pack them as float32 once instead).
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
TILE_FLOATS = 1 << 20                          # floats expanded at a time by a matmul (4 MB)


# ------------------------------------------------------------------------------------------------
# Expansions to float32

_F16_EXPONENT_SHIFT = F32(2.0 ** 112)          # 2^(127 - 15): float16's exponent bias to float32's


def f16_to_f32(h):
    """float16 (any shape) -> float32, bit by bit: NumPy's own astype runs at ~0.5 G values/s without F16C.

    The 15 low bits (exponent, mantissa) move up by 13 to float32's places, the sign bit comes from sign-extending the
    int16; the product with 2^112 corrects the exponent bias. Exact for normals, subnormals and zeros; inf/NaN do not
    survive (weights are checked finite when loaded)."""
    u = np.asarray(h).view(np.int16).astype(np.int32)                     # sign-extended: the sign lands in bit 31
    bits = ((u & np.int32(0x7FFF)) << np.int32(13)) | (u & np.int32(-0x80000000))
    return bits.view(F32) * _F16_EXPONENT_SHIFT


def bf16_to_f32(bits):
    """bfloat16 bit patterns (uint16) -> float32: bfloat16 is the top half of a float32, so shift it up 16 bits."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(F32)


# ------------------------------------------------------------------------------------------------
# The base: one tile of rows at a time

class StoredMatrix:
    """An (out, in) weight held in some stored form. Subclasses define `_dequantize_rows(rows)` and `arrays()`."""
    kind = "?"
    quantized = True                          # False: expanding loses nothing (float16, bfloat16, float32)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def ndim(self):
        return 2

    def dequantize(self):
        """The float32 (out, in) matrix this stands for (a new array; the object does not keep it)."""
        return self._dequantize_rows(slice(None))

    def __array__(self, dtype=None, copy=None):
        """np.asarray(w) expands to float32, for code that only knows arrays."""
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype)

    def __getitem__(self, ids):
        """Embedding lookup: rows `ids` (any int array shape) -> float32 (*ids.shape, in)."""
        ids = np.asarray(ids)
        return self._dequantize_rows(ids.reshape(-1)).reshape(*ids.shape, self.shape[1])

    def _input(self, x):
        """What the matmul multiplies: x itself (float32). Quantized formats may round it first, as an engine that
        quantizes activations does (quant.QuantizedMatrix.act_bits, gguf_io.GGUFMatrix.act_quant)."""
        return np.asarray(x, F32)

    def matmul(self, x):
        """x (..., in) -> x @ W.T (..., out), one tile of rows of W expanded at a time."""
        x = self._input(x)
        out_dim, in_dim = self.shape
        x2 = x.reshape(-1, in_dim)                                          # (N, in)
        out = np.empty((x2.shape[0], out_dim), F32)
        step = max(1, TILE_FLOATS // in_dim)
        for r0 in range(0, out_dim, step):
            tile = self._dequantize_rows(slice(r0, min(r0 + step, out_dim)))    # (rows, in) float32, transient
            if x2.shape[0] == 1:
                out[:, r0:r0 + tile.shape[0]] = (tile @ x2[0])[None]          # gemv on a row-major tile
            else:
                out[:, r0:r0 + tile.shape[0]] = x2 @ tile.T
        return out.reshape(*x.shape[:-1], out_dim)

    def take_rows(self, perm):
        """The matrix whose row r is this one's row perm[r] (the q/k RoPE permutation), without copying weights."""
        return RowPermuted(self, perm)

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape}, {self.bits_per_weight:.3g} bits/weight)"


class _FloatMatrix(StoredMatrix):
    """A float format held as one (out, in) array (float32, float16, or bfloat16 bits); expanding it loses nothing."""
    quantized = False

    def __init__(self, data):
        self.data, self.shape = data, tuple(data.shape)

    def arrays(self):
        return {"weight": self.data}


class Float32Matrix(_FloatMatrix):
    """A float32 (out, in) array used where it lies (a memory map): no packed copy."""
    kind = "f32"

    def _dequantize_rows(self, rows):
        return np.asarray(self.data[rows], F32)

    def matmul(self, x):                       # nothing to expand: one BLAS call on the mapped (out, in) rows
        x = np.asarray(x, F32)
        x2 = x.reshape(-1, self.shape[1])                                   # (N, in)
        out = (self.data @ x2.T).T                                          # (N, out): W @ x, gemv-friendly
        return out.reshape(*x.shape[:-1], self.shape[0])


class Float16Matrix(_FloatMatrix):
    """float16 (out, in), as in HF float16 checkpoints and GGUF F16 tensors."""
    kind = "f16"

    def _dequantize_rows(self, rows):
        return f16_to_f32(self.data[rows])


class BFloat16Matrix(_FloatMatrix):
    """bfloat16 bit patterns (uint16) (out, in), as in meta-llama's HF checkpoints and GGUF BF16 tensors."""
    kind = "bf16"

    def _dequantize_rows(self, rows):
        return bf16_to_f32(self.data[rows])


class RowPermuted(StoredMatrix):
    """Rows of another stored matrix in another order: row r is inner row perm[r]. Meta-layout formats (GGUF,
    llama2.c) hold q/k rows in RoPE pairs; this presents them in HF's rotate-half order without a copy."""

    def __init__(self, inner, perm):
        self.inner, self.perm, self.shape = inner, np.asarray(perm, np.int64), inner.shape
        self.kind, self.quantized = inner.kind, inner.quantized

    def _dequantize_rows(self, rows):
        return self.inner._dequantize_rows(self.perm[rows])

    def _input(self, x):
        return self.inner._input(x)

    def matmul(self, x):
        """Tile by tile like any stored matrix, each tile gathered in this order: the same tiles, and so the same
        float32 results, as the matrix stored in HF order. (An inner matmul of its own kind, llama.cpp's integer Q8_0
        dot product, runs on the inner rows and has its outputs reordered.)"""
        if getattr(self.inner, "int_dot", False):
            return self.inner.matmul(x)[..., self.perm]
        return super().matmul(x)

    def take_rows(self, perm):
        combined = self.perm[np.asarray(perm, np.int64)]
        return self.inner if np.array_equal(combined, np.arange(len(combined))) else RowPermuted(self.inner, combined)

    def arrays(self):
        return self.inner.arrays()


def as_stored(w):
    """A stored matrix for `w`: itself if it already is one, else a float32/float16 array wrapped as it lies."""
    if isinstance(w, StoredMatrix):
        return w
    w = np.asarray(w)
    if w.dtype == np.float16:
        return Float16Matrix(w)
    return Float32Matrix(w if w.dtype == F32 else w.astype(F32))


def take_rows(w, perm):
    """Rows of `w` reordered (row r = w[perm[r]]): a copy for an array, a view for a stored matrix."""
    return w.take_rows(perm) if isinstance(w, StoredMatrix) else np.ascontiguousarray(np.asarray(w)[perm])
