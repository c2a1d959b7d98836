"""Stored matrices (matrices.py, the block matmuls of quant.py and gguf_io.GGUFMatrix): every kind against an
independent decoder (gguf-py's, NumPy's float16 cast), tile by tile; the threads and the side-by-side matrix against
one thread and separate matrices; the load-time NaN/Inf scan against what the decoders produce."""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from llama_ref import matrices, quant, synthetic  # noqa: E402
from llama_ref.gguf_io import FP16_SCALES, GGUFMatrix, gguf_type_readable  # noqa: E402
from llama_ref.matrices import (BFloat16Matrix, Float16Matrix, Float32Matrix, RowPermuted, Scratch,  # noqa: E402
                                SideBySide, bf16_to_f32, f16_to_f32, first_nonfinite)

F32 = np.float32
ROWS, COLS = 40, 512                        # 2 super-blocks of 256 per row, 40 rows: 7-row tiles leave a partial one
READABLE = [t.name for t in GT if gguf_type_readable(t) and GGML_QUANT_SIZES[t][0] > 1]


def gguf_matrix(kind, rows=ROWS, cols=COLS, seed=0):
    if kind in FP16_SCALES:
        raw = synthetic.random_blocks(kind, rows, cols, np.random.default_rng(seed))
    else:                                                # random bytes; MXFP4's exponent byte 0xFF would be NaN
        block, size = GGML_QUANT_SIZES[GT[kind]]
        raw = np.random.default_rng(seed).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        if kind == "MXFP4":
            raw.reshape(rows, -1, size)[:, :, 0] = 120
    with np.errstate(all="ignore"):
        ref = dequantize(raw, GT[kind]).reshape(rows, cols).astype(F32)
    return GGUFMatrix(raw, (rows, cols), GT[kind]), ref


def check_tiles(m, ref, x):
    """Every tile of m (7 rows) against gguf-py's rows: the expansion bit for bit, the tile's product (block dot
    products for a few tokens, the expanded tile for more) to float32 summation order: the same products summed in
    another grouping, ~1e-7 of the output scale; 1e-5 leaves room, and a wrong code or scale is off by >1e-2."""
    m.tile_floats = 7 * m.shape[1]
    s = Scratch()
    for r0 in range(0, m.shape[0], 7):
        rows = slice(r0, min(r0 + 7, m.shape[0]))
        np.testing.assert_array_equal(m._expand(rows, s.get("check", (rows.stop - r0, m.shape[1]))), ref[rows])
        out = np.full((x.shape[0], rows.stop - r0), np.nan, F32)
        m._tile(x, rows, out, s)
        want = x.astype(np.float64) @ ref[rows].T.astype(np.float64)
        assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max(), (m.kind, r0)
    y = m.matmul(x)
    np.testing.assert_allclose(y, x @ ref.T, atol=1e-5 * np.abs(x @ ref.T).max(), rtol=0)


@pytest.mark.parametrize("kind", READABLE)
@pytest.mark.parametrize("tokens", [1, 3, quant.BLOCK_DOT_TOKENS + 5, quant.BLOCK_DOT_TOKENS_K4 + 3])  # block dots; expanded
def test_every_gguf_type_tile_by_tile_against_gguf_py(kind, tokens):
    m, ref = gguf_matrix(kind)
    if not np.isfinite(ref).all():                     # random bytes of a type without listed scales (MXFP4, ...)
        pytest.skip(f"{kind}: random blocks decode to inf/NaN")
    x = np.random.default_rng(1).standard_normal((tokens, COLS)).astype(F32)
    check_tiles(m, ref, x)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("tokens", [1, quant.BLOCK_DOT_TOKENS + 5])
def test_q8_0_q4_0_matrices_tile_by_tile(fmt, tokens):
    """quant.py's own Q8_0/Q4_0 matrices (what `quantize` and our GGUF files hold) against gguf-py's decoder."""
    w = np.random.default_rng(2).standard_normal((ROWS, COLS)).astype(F32)
    m = quant.quantize_matrix(w, fmt)
    ref = dequantize(m.data, GT[fmt.upper()]).reshape(ROWS, COLS)
    check_tiles(m, ref, np.random.default_rng(3).standard_normal((tokens, COLS)).astype(F32))


def test_float_kinds_tile_by_tile():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((ROWS, COLS)).astype(F32)
    h = w.astype(np.float16)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    x = rng.standard_normal((2, COLS)).astype(F32)
    for m, ref in ((Float32Matrix(w), w), (Float16Matrix(h), h.astype(F32)),
                   (BFloat16Matrix(bits), (bits.astype(np.uint32) << 16).view(F32))):
        check_tiles(m, ref, x)


# ------------------------------------------------------------------------------------------------
# Expansions

def test_f16_every_value_exact_inf_nan_included():
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got, want = f16_to_f32(every), every.astype(F32)
    np.testing.assert_array_equal(got, want)                          # NaN == NaN in array_equal; infs, -0 too
    assert np.array_equal(np.signbit(got), np.signbit(want))
    out = np.empty(every.shape, F32)
    assert f16_to_f32(every, out) is out                               # into the buffer given


def test_bf16_is_the_top_half_of_float32():
    w = np.random.default_rng(5).standard_normal(1000).astype(F32)
    top = (w.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bf16_to_f32(top), (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(F32))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_first_nonfinite_on_raw_bits(dtype):
    a = np.random.default_rng(6).standard_normal((50, 70)).astype(F32)
    a[33, 44], a[40, 1] = np.inf, np.nan
    arr = {"float16": a.astype(np.float16), "float32": a,
           "bfloat16": (a.view(np.uint32) >> 16).astype(np.uint16)}[dtype]
    assert first_nonfinite(arr, chunk=128) == (33, 44)                  # the first, across chunk boundaries
    assert first_nonfinite(arr[:33], chunk=128) is None
    big = np.full(3, 65504, np.float16)                                # the largest finite float16 is finite
    assert first_nonfinite(big) is None


# ------------------------------------------------------------------------------------------------
# The NaN/Inf scan reads the fp16 scales only: the table of where they are, checked against gguf-py's decoders

@pytest.mark.parametrize("kind", sorted(FP16_SCALES))
def test_fp16_scales_are_the_only_float_bytes(kind):
    """Blocks of random bytes with finite scales decode to finite values (gguf-py): nothing else in a block is a float;
    a NaN in any listed scale makes its block decode to NaN and the scan names that block."""
    block, size = GGML_QUANT_SIZES[GT[kind]]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (8, 4 * size), dtype=np.uint8)
    for off in FP16_SCALES[kind]:
        raw.reshape(8, 4, size)[:, :, off:off + 2] = np.array([0.5], np.float16).view(np.uint8)
    with np.errstate(all="ignore"):
        assert np.isfinite(dequantize(raw, GT[kind])).all()
    m = GGUFMatrix(raw, (8, 4 * block), GT[kind])
    assert m.first_nonfinite() is None
    for off in FP16_SCALES[kind]:
        bad = raw.copy()
        bad.reshape(8, 4, size)[5, 2, off:off + 2] = np.array([np.nan], np.float16).view(np.uint8)
        with np.errstate(all="ignore"):
            assert not np.isfinite(dequantize(bad, GT[kind]).reshape(8, 4, block)[5, 2]).all()
        assert GGUFMatrix(bad, (8, 4 * block), GT[kind]).first_nonfinite() == (5, 2 * block)


def test_scan_of_every_kind_finds_a_bad_value():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((ROWS, COLS)).astype(F32)
    for fmt in ("q8_0", "q4_0", "int8-channel", "w4-g64"):
        m = quant.quantize_matrix(w, fmt)
        assert m.first_nonfinite() is None
        part = next(iter(a for k, a in m.arrays().items() if k in ("blocks", "scales")))
        if fmt in ("q8_0", "q4_0"):
            part.reshape(ROWS, -1, part.shape[1] * 32 // COLS)[9, 3, :2] = np.array([np.inf], np.float16).view(np.uint8)
            assert m.first_nonfinite() == (9, 3 * 32)
        else:
            part[9, 0] = np.inf
            assert m.first_nonfinite()[0] == 9
    h = w.astype(np.float16)
    h[12, 300] = np.nan
    perm = np.random.default_rng(9).permutation(ROWS)
    view = RowPermuted(Float16Matrix(h), perm)
    r, c = view.first_nonfinite()
    assert perm[r] == 12 and c == 300                                  # named in the order the model sees


# ------------------------------------------------------------------------------------------------
# Threads, buffers, side by side, row order

def test_threads_give_the_same_numbers_as_one():
    m, _ = gguf_matrix("Q4_K", rows=300, cols=1024)
    m.tile_floats = 16 * 1024                                          # 19 tiles over the threads
    x = np.random.default_rng(10).standard_normal((1, 1024)).astype(F32)
    with threadpool_limits(1, user_api="blas"):
        one = m.matmul(x)
    with threadpool_limits(2, user_api="blas"):
        two = m.matmul(x)
    np.testing.assert_array_equal(one, two)                            # every tile is computed the same way


def test_buffers_are_reused_across_tiles_and_calls():
    m, _ = gguf_matrix("Q8_0", rows=64, cols=512)
    m.tile_floats = 8 * 512
    x = np.random.default_rng(11).standard_normal((1, 512)).astype(F32)
    with threadpool_limits(1, user_api="blas"):
        m.matmul(x)
        s = matrices.scratch()
        before = {k: b.ctypes.data for k, b in s.buffers.items()}
        m.matmul(x)
        assert {k: b.ctypes.data for k, b in s.buffers.items()} == before
    out = np.empty((1, 64), F32)
    assert m.matmul(x, out=out) is out


def test_each_thread_has_its_own_buffers():
    seen = []
    t = threading.Thread(target=lambda: seen.append(matrices.scratch()))
    t.start()
    t.join()
    assert seen[0] is not matrices.scratch()


def test_side_by_side_is_the_parts_concatenated():
    rng = np.random.default_rng(12)
    q, _ = gguf_matrix("Q4_K", rows=64, cols=512, seed=1)
    k = quant.quantize_matrix(rng.standard_normal((32, 512)).astype(F32), "q8_0")
    v = Float16Matrix(rng.standard_normal((32, 512)).astype(np.float16))
    kp = RowPermuted(k, rng.permutation(32))
    both = SideBySide([q, kp, v])
    assert both.shape == (128, 512) and both.bounds == [0, 64, 96, 128]
    for tokens in (1, 20):
        x = rng.standard_normal((2, tokens, 512)).astype(F32)
        np.testing.assert_array_equal(both.matmul(x), np.concatenate([q.matmul(x), kp.matmul(x), v.matmul(x)], -1))
    np.testing.assert_array_equal(both.dequantize(), np.concatenate([q.dequantize(), kp.dequantize(), v.dequantize()]))


def test_row_permuted_equals_the_matrix_stored_in_that_order():
    """GGUF q/k rows are presented in HF order by a view; its tiles gather their rows, so the products are the very
    ones of a matrix stored in HF order, bit for bit (chapter 12's GGUF round trip relies on it)."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((96, 512)).astype(F32)
    perm = rng.permutation(96)
    for fmt in ("q8_0", "q4_0"):
        m = quant.quantize_matrix(w, fmt)
        hf_order = type(m)(np.ascontiguousarray(m.data[perm]), m.shape)
        for tokens in (1, 20):
            x = rng.standard_normal((tokens, 512)).astype(F32)
            np.testing.assert_array_equal(RowPermuted(m, perm).matmul(x), hf_order.matmul(x))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "IQ4_XS", "f16"])
@pytest.mark.parametrize("tokens", [1, 32])
def test_a_thread_allocates_within_the_tile_buffer_bound(kind, tokens):
    """The memory plan counts matrices.TILE_BUFFER_BYTES per thread: the buffers a matmul keeps and every temporary it
    makes (NumPy reports its allocations to tracemalloc) stay within it, on matrices of a 7B's row length."""
    import tracemalloc
    shape = (1024, 4096)                                             # 4 tiles of 1M weights
    if kind == "f16":
        m = Float16Matrix(np.random.default_rng(14).standard_normal(shape).astype(np.float16))
    else:
        m, _ = gguf_matrix(kind, *shape)
    x = np.random.default_rng(15).standard_normal((tokens, shape[1])).astype(F32)
    out = np.empty((tokens, shape[0]), F32)
    matrices._local.scratch = Scratch()                              # this thread's buffers, from nothing
    with threadpool_limits(1, user_api="blas"):
        tracemalloc.start()
        m.matmul(x, out=out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= matrices.TILE_BUFFER_BYTES, f"{kind}: {peak / 2**20:.1f} MiB"


def test_a_forked_child_multiplies_on_threads_of_its_own():
    """The parent's worker threads do not exist in a fork (multiprocessing's default start method on Linux, the fuzz
    tests' sandboxes): a child must start its own pool instead of queueing tiles to the dead one and waiting for ever."""
    import os
    import signal
    m, ref = gguf_matrix("Q8_0", rows=512, cols=4096)                  # several tiles: both threads get work
    x = np.ones((1, 4096), F32)
    with threadpool_limits(2, user_api="blas"):
        m.matmul(x)                                                    # the parent's pool exists now
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)                                           # a hang kills the child, and fails below
            os._exit(0 if np.allclose(m.matmul(x), x @ ref.T, rtol=1e-5, atol=1e-3) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
