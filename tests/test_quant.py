"""Tests of llama_ref.quant: GGUF byte identity (gguf-py is the independent reference), error bounds that follow
from each format's definition, the integer Q8_0 dot product, quantized models, memory held, save/load."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402

from llama_ref import quant as Q, evaluate as E  # noqa: E402
from llama_ref.config import LlamaConfig  # noqa: E402
from llama_ref.errors import QuantizationError, ShapeMismatchError, OutputError  # noqa: E402
from llama_ref.loader import load  # noqa: E402
from llama_ref.model import Llama  # noqa: E402
from conftest import random_weights  # noqa: E402

CFG = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=96, max_seq_len=48)





@pytest.fixture(scope="module")
def model():
    return Llama(CFG, random_weights(CFG, scale=0.1))


def _tensors():
    """Inputs that stress the rounding rules: odd shapes, zeros, -0.0, ties, tiny and huge values."""
    rng = np.random.default_rng(7)
    ties = np.tile(np.array([127, 0.5, 1.5, -2.5, 2.5, -0.5, 126.5, -126.5] * 4, np.float32), (3, 1))  # d = 1 exactly
    mixed = rng.standard_normal((4, 64)).astype(np.float32)
    mixed[0, :32] = 0.0
    mixed[1, 5] = -mixed[1].max() * 3          # largest magnitude negative: Q4_0's d > 0
    mixed[2, 40] = mixed[2].max() * 3          # largest magnitude positive: Q4_0's d < 0
    return {
        "odd (3, 96)": rng.standard_normal((3, 96)).astype(np.float32),
        "one block": rng.standard_normal((1, 32)).astype(np.float32),
        "3-D": rng.standard_normal((2, 5, 64)).astype(np.float32),
        "zeros": np.zeros((2, 64), np.float32),
        "negative zeros": -np.zeros((2, 32), np.float32),
        "ties": ties,
        "mixed signs": mixed,
        "huge 1e30 (fp16 scale overflows)": (rng.standard_normal((2, 64)) * 1e30).astype(np.float32),
        "just over fp16 range": (rng.standard_normal((2, 64)) * 65504 * 127).astype(np.float32),
        "tiny (fp16 subnormal scale)": (rng.standard_normal((2, 64)) * 1e-6).astype(np.float32),
        "1-D": rng.standard_normal(96).astype(np.float32),
    }


@pytest.mark.parametrize("case", list(_tensors()))
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_bytes_identical_to_gguf_py(case, fmt):
    x = _tensors()[case]
    ours_q, ours_dq = (Q.quantize_q8_0, Q.dequantize_q8_0) if fmt == "q8_0" else (Q.quantize_q4_0, Q.dequantize_q4_0)
    qt = GT.Q8_0 if fmt == "q8_0" else GT.Q4_0
    with np.errstate(over="ignore", invalid="ignore"):
        ref = gguf.quants.quantize(x, qt)
        ours = ours_q(x)
        ref_dq = gguf.quants.dequantize(ref, qt)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_array_equal(ours_dq(ours), ref_dq)     # same float32 operations: exactly equal


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_bytes_identical_on_model_weights(model, fmt):
    qt = GT.Q8_0 if fmt == "q8_0" else GT.Q4_0
    for name, w in model.weights.items():
        if w.ndim == 2:
            ours = Q.quantize_q8_0(w) if fmt == "q8_0" else Q.quantize_q4_0(w)
            np.testing.assert_array_equal(ours, gguf.quants.quantize(w, qt), err_msg=name)


def test_block_layouts_by_hand():
    # Q8_0: fp16 d, then the 32 int8 values
    x = np.arange(-16, 16, dtype=np.float32)[None] * 2.0           # amax 32 -> d = 32/127
    b = Q.quantize_q8_0(x)[0]
    assert b.size == 34
    assert np.frombuffer(b[:2].tobytes(), np.float16)[0] == np.float16(np.float32(32) / np.float32(127))
    assert b[2:].view(np.int8)[0] == -127                          # -32 / (32/127)
    # Q4_0: d = (signed extreme) / -8; element j in the low nibble of byte j, element j+16 in the high nibble
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 16], x[0, 1] = -8.0, 4.0, 1.0                     # d = -8 / -8 = 1
    b = Q.quantize_q4_0(x)[0]
    assert b.size == 18 and np.frombuffer(b[:2].tobytes(), np.float16)[0] == 1.0
    assert b[2] == (0 | (12 << 4))                                 # q(-8)=0 low, q(4)=12 high
    assert b[3] == (9 | (8 << 4))                                  # q(1)=9 low, q(0)=8 high


def test_round_half_away_matches_c_roundf():
    v = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 3.4999998, -0.0], np.float32)
    expected = np.array([1, 2, 3, -1, -3, 0, 0, 127, 3, 0], np.float32)   # C roundf, ties away from zero
    np.testing.assert_array_equal(Q.round_half_away(v), expected)
    np.testing.assert_array_equal(Q.round_half_away(v), gguf.quants.np_roundf(v))


@pytest.mark.parametrize("shape", [(3, 33), (2, 100), (4, 16)])
def test_rows_not_multiple_of_block_raise(shape):
    x = np.ones(shape, np.float32)
    for f in (Q.quantize_q8_0, Q.quantize_q4_0, lambda a: Q.quantize_w4(a, 64)):
        with pytest.raises(QuantizationError, match="not a multiple"):
            f(x)


def test_non_finite_raises():
    x = np.ones((1, 32), np.float32)
    x[0, 3] = np.nan
    with pytest.raises(QuantizationError, match="NaN"):
        Q.quantize_q8_0(x)


def test_int8_error_bounds():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64)).astype(np.float32) * rng.uniform(0.01, 10, (16, 1)).astype(np.float32)
    for axis in (None, -1):
        q, s = Q.quantize_int8(w, axis=axis)
        assert q.dtype == np.int8 and np.abs(q).max() == 127       # the largest magnitude maps onto 127
        err = np.abs(Q.dequantize_int8(q, s) - w)
        assert np.all(err <= s / 2 * (1 + 1e-5))                   # round to nearest: half a step at most
    # per channel is better than per tensor when rows have different ranges
    e_t = np.abs(Q.dequantize_int8(*Q.quantize_int8(w)) - w).mean()
    e_c = np.abs(Q.dequantize_int8(*Q.quantize_int8(w, axis=-1)) - w).mean()
    assert e_c < e_t


@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4_grouped(group):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    packed, scales = Q.quantize_w4(w, group)
    assert packed.shape == (8, 128) and packed.dtype == np.uint8
    assert scales.shape == (8, 256 // group) and scales.dtype == np.float16
    dq = Q.dequantize_w4(packed, scales)
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    assert np.all(np.abs(dq - w) <= s / 2 * (1 + 1e-3))           # half a step (scale is fp16-rounded)
    bpw = 8 * (packed.nbytes + scales.nbytes) / w.size
    assert bpw == pytest.approx(4 + 16 / group)
    # nibble order: element 2k low, 2k+1 high, stored as q + 8
    row = np.zeros((1, group), np.float32)
    row[0, :4] = [7.0, -7.0, 1.0, 0.0]                            # scale = 7/7 = 1
    p, sc = Q.quantize_w4(row, group)
    assert sc[0, 0] == 1.0 and p[0, 0] == (15 | (1 << 4)) and p[0, 1] == (9 | (8 << 4))


@pytest.mark.parametrize("bits", [8, 16])
def test_activation_quant_per_token(bits):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32) * np.array([0.01, 1, 100, 3, 0.5], np.float32)[:, None]
    q, s = Q.quantize_activations(x, bits)
    assert q.dtype == (np.int8 if bits == 8 else np.int16) and s.shape == (2, 5, 1)
    qmax = 2 ** (bits - 1) - 1
    np.testing.assert_allclose(s[..., 0], np.abs(x).max(-1) / qmax, rtol=1e-6)
    assert np.all(np.abs(Q.fake_quantize_activations(x, bits) - x) <= s / 2 * (1 + 1e-5))


def test_q8_0_integer_dot_equals_float_dot():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 256)).astype(np.float32)
    qa, qb = Q.quantize_q8_0(a), Q.quantize_q8_0(b)
    dot_int = Q.vec_dot_q8_0(qa, qb)
    dot_float = float(np.dot(Q.dequantize_q8_0(qa).astype(np.float64), Q.dequantize_q8_0(qb).astype(np.float64)))
    # The integer sums are exact; only the per-block float multiplies and the 8-term float32 sum round: ~1e-6.
    assert dot_int == pytest.approx(dot_float, rel=1e-5, abs=1e-5)
    # ...and both are close to the unquantized dot product (two 8-bit roundings per term)
    assert dot_int == pytest.approx(float(a @ b), abs=float(0.02 * np.linalg.norm(a) * np.linalg.norm(b) / 16))
    # the matrix version, as llama.cpp's CPU path computes x @ W.T with Q8_0 activations
    x = rng.standard_normal((3, 256)).astype(np.float32)
    w = rng.standard_normal((5, 256)).astype(np.float32)
    wq = Q.quantize_q8_0(w)
    y_int = Q.matmul_q8_0_int(x, wq)
    y_deq = Q.dequantize_q8_0(Q.quantize_q8_0(x)).astype(np.float64) @ Q.dequantize_q8_0(wq).astype(np.float64).T
    np.testing.assert_allclose(y_int, y_deq, rtol=1e-5, atol=1e-4)
    for i in range(3):
        for o in range(5):
            assert y_int[i, o] == pytest.approx(Q.vec_dot_q8_0(Q.quantize_q8_0(x[i]), wq[o]), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "int8-channel", "int8-tensor", "w4-g32", "w4-g128"])
def test_quantized_matrix_matmul_tiles(fmt):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    qm = Q.quantize_matrix(w, fmt)
    qm.tile_floats = 256 * 7                                      # 7 rows per tile: 6 tiles, the last partial
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    full = qm.dequantize()
    y = qm.matmul(x)
    assert y.shape == (2, 3, 40)
    # the same products as one float32 matmul with the dequantized matrix (only BLAS blocking differs)
    np.testing.assert_allclose(y, x @ full.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(qm[np.array([[3, 0], [39, 3]])], full[[[3, 0], [39, 3]]])   # embedding lookup
    assert qm.nbytes < w.nbytes / 3


def test_quantized_forward_equals_float_forward_of_dequantized_weights(model):
    """The plumbing: a quantized model computes exactly what a float model holding the dequantized values does."""
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, 24)
    for s in Q.SCHEMES:
        qm = Q.quantize_model(model, s)
        plain = Llama(CFG, {k: (v.dequantize() if isinstance(v, Q.QuantizedMatrix) else v) for k, v in qm.weights.items()})
        y, y_ref = qm.forward(tokens), plain.forward(tokens)
        if Q.parse_scheme(s)["act_bits"]:
            # W4A16: activations are also rounded to 16 bits per token (relative step 2^-15 ~ 3e-5)
            np.testing.assert_allclose(y, y_ref, atol=2e-3 * np.abs(y_ref).max(), rtol=0, err_msg=s)
        else:
            # same float32 products; only BLAS blocking (tiles vs one matmul) reorders sums: ~1e-6 relative
            np.testing.assert_allclose(y, y_ref, atol=2e-5 * np.abs(y_ref).max(), rtol=0, err_msg=s)


def test_quantized_forward_close_to_float(model):
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, 24)
    ref = model.forward(tokens)
    results = {s: E.compare_logits(ref, Q.quantize_model(model, s).forward(tokens)) for s in Q.SCHEMES}
    # KL ~ Var(logit error) / 2. 8-bit weights: ~0.6% relative rms error per weight, which this random 2-layer model
    # (logit std ~1.2) turns into logit errors ~0.03, KL ~5e-4. 4-bit: ~10x the error, ~100x the KL.
    # Bounds at ~10x those estimates; a wrong layout or a transposed weight gives KL ~ 1.
    for s in ("q8_0", "int8-channel"):
        assert results[s]["kl"] < 5e-3, (s, results[s])
    for s in ("q4_0", "w4a16-g32", "w4a16-g64", "w4a16-g128"):
        assert results[s]["kl"] < 0.5, (s, results[s])
        assert results[s]["kl"] > 10 * results["q8_0"]["kl"], s      # 4 bits cost far more than 8
    assert results["w4a16-g32"]["kl"] < results["w4a16-g128"]["kl"]   # smaller groups, smaller error


def test_kv_cache_decode_with_quantized_model(model):
    qm = Q.quantize_model(model, "q4_0")
    tokens = np.random.default_rng(8).integers(0, CFG.vocab_size, 12)
    full = qm.forward(tokens)
    cache = qm.new_cache()
    steps = np.concatenate([qm.forward(tokens[t:t + 1], t, cache) for t in range(12)])
    np.testing.assert_allclose(steps, full, atol=2e-5 * np.abs(full).max(), rtol=0)


@pytest.mark.parametrize("scheme,bpw", [("q8_0", 8.5), ("q4_0", 4.5), ("w4a16-g64", 4.25), ("int8-channel", 8.0)])
def test_memory_held_shrinks(model, scheme, bpw):
    qm = Q.quantize_model(model, scheme)
    for layer in qm.params["layers"]:
        for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            assert isinstance(layer[k], Q.QuantizedMatrix)
            assert layer[k].bits_per_weight == pytest.approx(bpw, rel=0.04)   # int8: + 32 bits of scale per row
    assert isinstance(qm.params["embed"], Q.QuantizedMatrix) and isinstance(qm.params["lm_head"], Q.QuantizedMatrix)
    # Expected bytes, from the format definitions: layers in the scheme's format, embedding and classifier as the
    # policy says (Q8_0/Q4_0 embedding, Q8_0 classifier; int8 per row for the others), norms float32.
    def nbytes(out, inp, fmt):
        return {"q8_0": out * inp // 32 * 34, "q4_0": out * inp // 32 * 18, "w4-g64": out * inp // 2 + out * inp // 64 * 2,
                "int8-channel": out * inp + 4 * out}[fmt]
    policy = Q.parse_scheme(scheme)
    expected = sum(nbytes(*w.shape, policy["layers"]) for n, w in model.weights.items() if w.ndim == 2 and "layers" in n)
    expected += nbytes(CFG.vocab_size, CFG.dim, policy["embed"]) + nbytes(CFG.vocab_size, CFG.dim, policy["head"])
    expected += (2 * CFG.n_layers + 1) * CFG.dim * 4
    held = Q.held_nbytes(qm)
    assert held == expected
    float_bytes = sum(w.nbytes for w in model.weights.values())
    assert held < float_bytes * (bpw + 1) / 32


def test_no_float_copy_kept_by_quantized_matrix():
    w = np.random.default_rng(9).standard_normal((64, 128)).astype(np.float32)
    qm = Q.Q4_0Matrix.quantize(w)
    qm.matmul(np.ones((2, 128), np.float32))
    assert [a.dtype for a in qm.arrays().values()] == [np.uint8] and qm.nbytes == 64 * 4 * 18
    assert not any(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in vars(qm).values())


def test_bad_shapes_in_a_model():
    cfg = CFG.replace(hidden_dim=200)                             # 200 is not a multiple of 32
    w = random_weights(cfg, scale=0.1)
    with pytest.raises(QuantizationError, match="down_proj"):
        Q.quantize_model(Llama(cfg, w), "q8_0")
    qm = Q.quantize_model(Llama(cfg, w), "q8_0", on_bad_shape="keep")   # documented fallback: that tensor stays float
    assert isinstance(qm.weights["model.layers.0.mlp.down_proj.weight"], np.ndarray)
    assert isinstance(qm.weights["model.layers.0.mlp.up_proj.weight"], Q.Q8_0Matrix)
    with pytest.raises(QuantizationError, match="unknown scheme"):
        Q.parse_scheme("q3_k")


def test_build_llama_validates_shapes(model):
    w = Q.quantize_weights(CFG, model.weights, "q8_0")
    w["model.layers.1.self_attn.v_proj.weight"] = Q.Q8_0Matrix.quantize(np.zeros((CFG.dim, CFG.dim), np.float32))
    with pytest.raises(ShapeMismatchError):
        Llama(CFG, w)


def test_tied_embeddings_share_one_quantized_tensor():
    cfg = CFG.replace(tie_embeddings=True)
    qm = Q.quantize_model(Llama(cfg, random_weights(cfg, scale=0.1)), "q4_0")
    with pytest.raises(QuantizationError, match="quantize_weights"):           # a dict is not a model: say what is
        Q.quantize_model(random_weights(cfg, scale=0.1), "q4_0")
    assert qm.params["lm_head"] is qm.params["embed"] and qm.params["embed"].kind == "q8_0"   # classifier's format


@pytest.mark.parametrize("scheme", ["w4a16-g64", "int8-channel", "q4_0"])
def test_save_load_quantized_dir(model, tmp_path, scheme):
    qm = Q.quantize_model(model, scheme)
    out = Q.save_quantized(tmp_path / "m", qm, scheme)
    assert Q.is_quantized_dir(out)
    back = load(out)
    tokens = np.arange(10) % CFG.vocab_size
    np.testing.assert_array_equal(back.forward(tokens), qm.forward(tokens))
    assert Q.held_nbytes(back) == Q.held_nbytes(qm)
    with pytest.raises(OutputError, match="exists"):
        Q.save_quantized(out, qm, scheme)
    (tmp_path / "m.old").write_text("a file of the user's that happens to be called m.old")
    Q.save_quantized(out, qm, scheme, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.old"]       # no temporary left, m.old untouched
    assert (tmp_path / "m.old").read_text().startswith("a file of the user's")


def test_requantizing_same_format_keeps_bytes(model):
    w = Q.quantize_weights(CFG, model.weights, "q8_0")
    w2 = Q.quantize_weights(CFG, w, "q8_0")
    name = "model.layers.0.mlp.up_proj.weight"
    assert w2[name] is w[name]


def test_bytes_identical_on_the_embedded_model():
    """Byte identity on a trained model's weights too (the embedded model, when it has been trained)."""
    from llama_ref import paths
    from llama_ref.loader import read_checkpoint
    if not (paths.DEFAULT_MODEL / "config.json").exists():
        pytest.skip("the embedded model data/models/tinyworld is not there yet")
    _, weights = read_checkpoint(paths.DEFAULT_MODEL)
    for name, w in weights.items():
        if np.ndim(w) == 2:
            w = np.asarray(w, np.float32)
            np.testing.assert_array_equal(Q.quantize_q8_0(w), gguf.quants.quantize(w, GT.Q8_0), err_msg=name)
            np.testing.assert_array_equal(Q.quantize_q4_0(w), gguf.quants.quantize(w, GT.Q4_0), err_msg=name)


def test_integer_dot_model_close_to_dequantized_path(model):
    tokens = np.arange(8) * 7 % CFG.vocab_size
    qm = Q.quantize_model(model, "q8_0")
    y_float = qm.forward(tokens)
    y_int = Q.set_integer_dot(Q.quantize_model(model, "q8_0")).forward(tokens)
    # The integer path also rounds the activations to 8 bits per block of 32 (~0.4% relative each), so the logits
    # move by about as much as Q8_0 weights move them: relative error of order 1e-2, not 1e-6 and not 1.
    rel = np.abs(y_int - y_float).max() / np.abs(y_float).max()
    assert 1e-6 < rel < 5e-2
    assert E.compare_logits(y_float, y_int)["kl"] < 5e-3
