"""Weight matrices kept as they are stored: float16, bfloat16, float32, every GGUF type; multiplied a tile at a time,
on every core.

Chapter 14 (the real Llama 2) teaches it; chapter 12's quantized matrices (quant.py) are the same idea.

A 7B model is 6.7 billion weights: 27 GB as float32, 13.5 GB as float16, 7.2 GB as Q8_0. To run it in the memory of a
laptop, the weights stay in the file's form, memory-mapped (the OS reads a page when it is touched and may drop it
again), and a matmul works through one tile of rows at a time:

    x (N, in) @ W.T  =  concat over tiles [ x @ W[r0:r1].T ]            W (out, in) as stored

Decoding reads every weight once per token and does two flops with it. NumPy has no integer dot product, so a stored
weight must become a float32 before BLAS can multiply it: that conversion, not memory, sets the speed (the README's 7B
table measures each part on one machine). Three rules keep it cheap:
  - expand with few, long NumPy passes into buffers that are reused (`Scratch`): allocating per tile costs as much as
    the arithmetic. float16 and bfloat16 are expanded bit by bit (below), exactly;
  - quantized blocks are not expanded at all where the format allows it: the block's scale multiplies the block's dot
    product, y[n] = sum_b d[b, n] (x_b . q_b[:, n]), so the codes go straight into one batched product and only a
    (blocks, rows) array is scaled (quant.py);
  - tiles run on every core: `run_jobs` gives each thread its share of the tiles (NumPy releases the GIL inside its
    loops and BLAS calls, and each thread uses one BLAS thread).
Only a tile's buffers are alive at once: TILE_FLOATS (1M) floats and their helpers per thread.

Every stored matrix has `.shape` (out, in), `.matmul(x, out=None) -> x @ W.T`, `[ids]` (embedding rows),
`.dequantize()` (the whole float32 matrix), `.nbytes` and `.first_nonfinite()` (the load-time NaN/Inf check, which
reads only what can hold a NaN: the float bits of a float matrix, the fp16 scales of a quantized one). `Llama` takes any
of them in place of a float array (model.linear calls matmul). `quantized` says whether expanding loses nothing (float
formats: a model may pack them as float32 once instead). `SideBySide([wq, wk, wv])` multiplies several matrices that
read the same input in one run of tiles. `as_f32` is the float32 copy a packed model holds.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import NonFiniteWeightsError

F32 = np.float32
TILE_FLOATS = 1 << 20                          # weights a tile holds (its float32 form: 4 MB)
TILE_BUFFER_BYTES = 16 * TILE_FLOATS           # one thread's buffers and temporaries at most (measured: 14 MiB, the
                                               # K-quants gguf-py decodes; tests/test_matrices.py holds the bound)


# ------------------------------------------------------------------------------------------------
# Expansions to float32, bit by bit: NumPy's own float16 astype runs at ~0.4 G values/s (no F16C in its build)

_F16_EXPONENT_SHIFT = F32(2.0 ** 112)          # 2^(127 - 15): float16's exponent bias to float32's
_F16_KEEP = np.int32(-0x70000001)              # 0x8FFFFFFF: the sign bit and the 28 bits below the garbage


def f16_to_f32(h, out=None, finite=False):
    """float16 (any shape) -> float32 in three passes, each in place in `out` (a new array if None):

        int32(int16 bits) << 13    exponent and mantissa move up to float32's places; the int16 sign-extends, so the
                                   sign lands in bit 31 (and copies of it in bits 28-30)
        & 0x8FFFFFFF               clears the copies
        * 2^112                    rescales float16's exponent bias (15) to float32's (127), and turns float16's
                                   subnormals into the right float32 normals
    Exact for every value. inf and NaN (exponent all ones) need a fourth pass that looks for them; finite=True skips it
    for values already checked finite (weights are, when loaded). Small arrays (a tile's block scales) are looked up
    in a table of all 65536 float16 values instead: one NumPy call, where each pass costs a call's overhead."""
    h = np.asarray(h)
    if h.size <= _SMALL:
        index = h.view(np.uint16).astype(np.intp)                      # contiguous indices: take's fast path
        return np.take(_f16_table(), index, out=out, mode="clip")      # (clip: no bounds pass; all are in range)
    if not h.flags.c_contiguous:                                       # a field of records (a block's scale): one
        h = np.ascontiguousarray(h)                                    # gather, then every pass runs contiguously
    out = np.empty(h.shape, F32) if out is None else out
    bits = out.view(np.int32)
    np.left_shift(h.view(np.int16), 13, out=bits, dtype=np.int32)
    np.bitwise_and(bits, _F16_KEEP, out=bits)
    np.multiply(out, _F16_EXPONENT_SHIFT, out=out)
    if not finite:
        special = np.left_shift(h.view(np.uint16), 1) >= 0xF800          # exponent all ones: inf or NaN
        if special.any():
            out[special] = h[special].astype(F32)
    return out


_SMALL = 1 << 12                                   # below this a table look-up beats the passes (measured)


@functools.cache
def _f16_table():
    """float32 value of every float16 bit pattern (NumPy's own conversion, inf and NaN included): 256 KB."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)


def bf16_to_f32(bits, out=None):
    """bfloat16 bit patterns (uint16) -> float32: bfloat16 is the top half of a float32, so shift it up 16 bits."""
    bits = np.asarray(bits)
    out = np.empty(bits.shape, F32) if out is None else out
    np.left_shift(bits.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


# Where a float's exponent is all ones it is inf or NaN. Shifting the sign out (x << 1, wrapping) leaves the exponent
# on top, so "exponent all ones" is one unsigned comparison: integer passes over the raw bits, no float conversion.
_NONFINITE_FROM = {np.dtype(np.float16): (np.uint16, 0xF800), np.dtype(np.uint16): (np.uint16, 0xFF00),   # bf16 bits
                   np.dtype(np.float32): (np.uint32, 0xFF000000)}


def first_nonfinite(a, chunk=1 << 18):
    """Index (a tuple) of the first inf/NaN in a float16, bfloat16 (uint16 bits) or float32 array, or None; read in
    chunks of its raw bits with integer operations."""
    a = np.asarray(a)
    utype, limit = _NONFINITE_FROM[a.dtype]
    flat = a.reshape(-1) if a.flags.c_contiguous else a.ravel()
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk].view(utype)
        top = np.left_shift(part, 1)
        if top.max(initial=0) >= limit:
            return tuple(int(i) for i in np.unravel_index(start + int(np.argmax(top >= limit)), a.shape))
    return None


def plain(a):
    """The same memory as a plain ndarray: a slice, reshape or view of an np.memmap runs memmap's Python-level
    __array_finalize__ (5-10 us, holding the GIL), dozens of times per tile; of an ndarray, none. `.base` still
    leads to the memmap (nothing is copied)."""
    return a.view(np.ndarray) if isinstance(a, np.memmap) else a


# ------------------------------------------------------------------------------------------------
# The cores: tiles run on threads, each with its own reusable buffers

class Scratch:
    """One thread's reusable buffers: get(name, shape, dtype) returns a view of a buffer kept between calls (grown
    when a bigger one is asked for), so a tile loop allocates nothing after its first tile."""

    def __init__(self):
        self.buffers, self.views = {}, {}                    # name -> bytes; (name, shape, dtype) -> a view of them

    def get(self, name, shape, dtype=F32):
        key = (name, shape, dtype)
        view = self.views.get(key)
        if view is not None:
            return view
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.size < n:
            buf = self.buffers[name] = np.empty(max(n, 64), np.uint8)
            self.views = {k: v for k, v in self.views.items() if k[0] != name}   # views of the old buffer go
        view = self.views[key] = buf[:n].view(dtype).reshape(shape)
        return view

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers.values())


_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def scratch() -> Scratch:
    """This thread's buffers."""
    s = getattr(_local, "scratch", None)
    if s is None:
        s = _local.scratch = Scratch()
    return s


@functools.cache
def _blas():
    """threadpoolctl's handle on the BLAS NumPy loaded (None if it finds none): how many threads it runs, and a way to
    run it on one thread while tiles run on every core."""
    try:
        from threadpoolctl import ThreadpoolController
        return next((c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"), None)
    except Exception:                                              # noqa: BLE001 - no threadpoolctl, or it failed
        return None


def cores() -> int:
    """Threads a matmul uses: the BLAS thread count (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or threadpoolctl's
    limits decide it), so one setting governs NumPy's products and ours; the CPUs this process may use otherwise."""
    blas = _blas()
    n = blas.num_threads if blas is not None else len(os.sched_getaffinity(0))
    return max(1, int(n))


def tile_buffer_bytes() -> int:
    """What the tile buffers of every thread a matmul runs on take at most: the memory plan counts it."""
    return TILE_BUFFER_BYTES * cores()


def _worker_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:                 # noqa: SLF001 - grown, never shrunk
            _pool = ThreadPoolExecutor(n, thread_name_prefix="llama_ref-tiles")
        return _pool


def _forget_pool_after_fork():
    """A forked child has only the thread that forked: the parent's workers are not there, so work queued to their
    pool would wait for ever. The child starts a pool of its own when it needs one."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def run_jobs(jobs, threads: int | None = None) -> None:
    """Run jobs (callables taking a Scratch) on `threads` threads (default: cores()), the calling thread included.
    Job i goes to thread i % threads. BLAS runs single-threaded meanwhile, however many threads there are: cores are
    not shared, and a tile's numbers never depend on the thread count (OpenBLAS's threaded gemm rounds differently)."""
    threads = max(1, min(cores() if threads is None else threads, len(jobs)))
    errstate = np.geterr()                                         # NumPy's errstate is per thread

    def run(share):
        with np.errstate(**errstate):
            s = scratch()
            for job in share:
                job(s)

    blas = _blas()
    before = blas.num_threads if blas is not None else None
    if blas is not None and before != 1:
        blas.set_num_threads(1)
    try:
        futures = [_worker_pool(threads - 1).submit(run, jobs[i::threads]) for i in range(1, threads)]
        run(jobs[0::threads])
        for f in futures:
            f.result()
    finally:
        if blas is not None and before != 1:
            blas.set_num_threads(before)


def product(x, w, out, s: Scratch | None = None):
    """out (N, rows) = x (N, in) @ w (rows, in).T: a gemv on w's rows for one token, a gemm for more. BLAS writes a
    buffer of its own layout (s) when out is a column slice of a wider output, so the numbers never depend on where out
    lies (a side-by-side matrix's parts equal the matrices alone)."""
    if x.shape[0] == 1 and out.flags.c_contiguous:
        return np.dot(w, x[0], out=out[0])
    if out.flags.c_contiguous or s is None:
        return np.matmul(x, w.T, out=out)
    out[...] = np.matmul(x, w.T, out=s.get("product", out.shape))
    return out


def as_f32(name, w, transpose=False):
    """A contiguous float32 copy of a weight (any float array or stored matrix), (in, out) when transpose, refusing
    NaN/Inf with a count."""
    a = np.asarray(w)
    a = np.array(a.T if transpose else a, dtype=F32, order="C")          # always a copy: the model owns it
    if not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise NonFiniteWeightsError(f"weight {name!r} holds {bad} NaN/Inf values; the checkpoint is corrupt "
                                    "or was saved after training diverged: re-export it from a good copy")
    return a


# ------------------------------------------------------------------------------------------------
# The base: one tile of rows at a time

class StoredMatrix:
    """An (out, in) weight held in some stored form. Subclasses define `_dequantize_rows(rows)` (float32 rows, a new
    array) and `arrays()`; `_expand(rows, out)` (rows into a reused buffer) and `_tile(...)` (the tile's product) when
    they can do better than the defaults."""
    kind = "?"
    quantized = True                          # False: expanding loses nothing (float16, bfloat16, float32)
    tile_floats = TILE_FLOATS                 # a test may shrink it on one matrix

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

    def matmul(self, x, out=None):
        """x (..., in) -> x @ W.T (..., out), tile by tile on every core; `out` (..., out) float32 may be given."""
        x = np.asarray(x, F32)
        out_dim, in_dim = self.shape
        x2 = x.reshape(-1, in_dim)                                          # (N, in)
        if out is None:
            out = np.empty((*x.shape[:-1], out_dim), F32)
        out2 = out.reshape(-1, out_dim)                                     # (N, out), a view of out
        run_jobs(self.tile_jobs(x2, out2))
        return out

    def tile_jobs(self, x2, out2, order=None):
        """Jobs (run_jobs runs them) that together write out2 (N, out) = x2 (N, in) @ W.T, one per tile of rows.
        order: the stored rows to use for output rows 0, 1, ... (RowPermuted's q/k order): each tile then gathers its
        rows, so it multiplies the same tiles, and gives the same float32 results, as the matrix stored in that order
        would."""
        x2 = self._input(x2)
        out_dim, in_dim = self.shape
        step = max(1, self.tile_floats // in_dim)
        return [functools.partial(self._tile, x2, slice(r0, min(r0 + step, out_dim)) if order is None else
                                  order[r0:r0 + step], out2[:, r0:r0 + step])
                for r0 in range(0, out_dim, step)]

    def _tile(self, x, rows, out, s: Scratch):
        """out (N, rows) = x (N, in) @ W[rows].T (rows: a slice or row indices): expand the rows into a reused float32
        buffer, one BLAS product."""
        n = len(range(*rows.indices(self.shape[0]))) if isinstance(rows, slice) else len(rows)
        return product(x, self._expand(rows, s.get("tile", (n, self.shape[1]))), out, s)

    def _expand(self, rows, out):
        """Rows (a slice or indices) as float32 into out (n, in)."""
        out[...] = self._dequantize_rows(rows)
        return out

    def first_nonfinite(self):
        """(row, column) of the first inf/NaN among the values this matrix stands for, or None. The default expands
        tile by tile; formats with float scales override it to read only those."""
        rows, cols = self.shape
        step = max(1, self.tile_floats // cols)
        for r0 in range(0, rows, step):
            with np.errstate(all="ignore"):
                tile = self._dequantize_rows(slice(r0, min(r0 + step, rows)))
            bad = ~np.isfinite(tile)
            if bad.any():
                r, c = np.unravel_index(int(np.argmax(bad)), tile.shape)
                return r0 + int(r), int(c)
        return None

    def take_rows(self, perm):
        """The matrix whose row r is this one's row perm[r] (the q/k RoPE permutation), without copying weights."""
        return RowPermuted(self, perm)

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape}, {self.bits_per_weight:.3g} bits/weight)"


class _FloatMatrix(StoredMatrix):
    """A float format held as one (out, in) array (float32, float16, or bfloat16 bits); expanding it loses nothing."""
    quantized = False

    def __init__(self, data):
        self.data, self.shape = plain(data), tuple(data.shape)

    def arrays(self):
        return {"weight": self.data}

    def first_nonfinite(self):
        return first_nonfinite(self.data)


class Float32Matrix(_FloatMatrix):
    """A float32 (out, in) array used where it lies (a memory map): no packed copy."""
    kind = "f32"

    def _dequantize_rows(self, rows):
        return np.asarray(self.data[rows], F32)

    def _tile(self, x, rows, out, s):               # nothing to expand: BLAS on the mapped rows
        return product(x, self.data[rows], out, s)


class Float16Matrix(_FloatMatrix):
    """float16 (out, in), as in HF float16 checkpoints and GGUF F16 tensors."""
    kind = "f16"

    def _dequantize_rows(self, rows):
        return f16_to_f32(self.data[rows])

    def _expand(self, rows, out):
        return f16_to_f32(self.data[rows], out, finite=True)       # checked finite when loaded


class BFloat16Matrix(_FloatMatrix):
    """bfloat16 bit patterns (uint16) (out, in), as in meta-llama's HF checkpoints and GGUF BF16 tensors."""
    kind = "bf16"

    def _dequantize_rows(self, rows):
        return bf16_to_f32(self.data[rows])

    def _expand(self, rows, out):
        return bf16_to_f32(self.data[rows], out)


class RowPermuted(StoredMatrix):
    """Rows of another stored matrix in another order: row r is inner row perm[r]. Meta-layout formats (GGUF,
    llama2.c) hold q/k rows in RoPE pairs; this presents them in HF's rotate-half order without a copy."""

    def __init__(self, inner, perm):
        self.inner, self.perm, self.shape = inner, np.asarray(perm, np.int64), inner.shape
        self.kind, self.quantized = inner.kind, inner.quantized

    def _dequantize_rows(self, rows):
        return self.inner._dequantize_rows(self.perm[rows])

    def tile_jobs(self, x2, out2, order=None):
        return self.inner.tile_jobs(x2, out2, self.perm if order is None else self.perm[order])

    def first_nonfinite(self):
        at = self.inner.first_nonfinite()
        if at is None:
            return None
        return int(np.argmax(self.perm == at[0])), at[1]                   # the row's place in this order

    def take_rows(self, perm):
        combined = self.perm[np.asarray(perm, np.int64)]
        return self.inner if np.array_equal(combined, np.arange(len(combined))) else RowPermuted(self.inner, combined)

    def arrays(self):
        return self.inner.arrays()


class SideBySide(StoredMatrix):
    """Stored matrices that read the same input, multiplied as one: [A; B; C] (rows stacked), so
    x @ [A; B; C].T = [x @ A.T | x @ B.T | x @ C.T]. Every part's tiles go to the cores in one run (q, k and v of a
    layer, or gate and up, are one matmul), each part in its own format. `.parts`; part j's outputs are columns
    `.bounds[j]:.bounds[j + 1]`."""

    def __init__(self, parts):
        parts = [as_stored(p) for p in parts]
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError(f"side-by-side matrices must read the same input: in sizes {[p.shape[1] for p in parts]}")
        self.parts = parts
        self.bounds = np.cumsum([0] + [p.shape[0] for p in parts]).tolist()
        self.shape = (self.bounds[-1], parts[0].shape[1])
        self.kind = "+".join(dict.fromkeys(p.kind for p in parts))
        self.quantized = any(p.quantized for p in parts)

    def tile_jobs(self, x2, out2, order=None):
        if order is not None:
            raise ValueError("a side-by-side matrix is not reordered; reorder its parts")
        return [job for p, c0, c1 in zip(self.parts, self.bounds, self.bounds[1:])
                for job in p.tile_jobs(x2, out2[:, c0:c1])]

    def _dequantize_rows(self, rows):
        return np.concatenate([p.dequantize() for p in self.parts])[rows]

    def first_nonfinite(self):
        for p, c0 in zip(self.parts, self.bounds):
            at = p.first_nonfinite()
            if at is not None:
                return c0 + at[0], at[1]
        return None

    def arrays(self):
        return {f"{i}.{k}": a for i, p in enumerate(self.parts) for k, a in p.arrays().items()}

    def __repr__(self):
        return f"SideBySide({', '.join(map(repr, self.parts))})"


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
