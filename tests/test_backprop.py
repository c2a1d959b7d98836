"""The NumPy backward pass and optimizer against PyTorch autograd and torch.optim.AdamW (the llm.c check).

Fixtures: data/reference/grads_<name>.npz, written by scripts/make_reference.py (torch + transformers only).

Tolerances. Gradients are float32 sums over B*T = 32 positions, pushed back through 2-3 layers of matmuls whose
summation order differs between OpenBLAS and PyTorch's kernels; measured worst case 3.3e-6 of each tensor's largest
value. We require max relative error <= 1e-4 (30x that); "relative" is taken to a tensor's scale (max |reference|),
because an element-wise relative error is meaningless for gradient entries that are ~0. A real bug (a missing
transpose, a wrong RoPE sign, an unscaled softmax, a mask off by one) gives errors of order 1e-1..1.
"""
import math

import numpy as np
import pytest

from llama_ref import backprop, paths
from llama_ref.loader import read_checkpoint
from llama_ref.errors import InputError
from llama_ref.model import Llama, rope_freqs
from conftest import MANIFEST, rel_err

GRAD_RTOL = 1e-4
GRAD_NAMES = [n for n, c in MANIFEST["configs"].items() if "grads" in c]


@pytest.fixture(scope="module", params=GRAD_NAMES)
def case(request):
    name = request.param
    config, weights = read_checkpoint(paths.REFERENCE_DIR / name)
    params = {k: np.array(v, np.float32) for k, v in weights.items()}
    return name, config, params, dict(np.load(paths.REFERENCE_DIR / f"grads_{name}.npz"))


def test_reference_configs_cover_mha_gqa_mqa_and_tied():
    cfgs = {n: MANIFEST["configs"][n]["hf_config"] for n in GRAD_NAMES}
    kv = {c["num_key_value_heads"] for c in cfgs.values()}
    assert 1 in kv and any(c["num_key_value_heads"] == c["num_attention_heads"] for c in cfgs.values())
    assert any(1 < c["num_key_value_heads"] < c["num_attention_heads"] for c in cfgs.values())
    assert {c["tie_word_embeddings"] for c in cfgs.values()} == {True, False}


@pytest.mark.parametrize("workers", [1, 2, 3], ids=["serial", "2-threads", "3-threads"])
@pytest.mark.parametrize("tag", ["", "_nomask"])
def test_loss_and_every_gradient_match_pytorch(case, tag, workers):
    """forward_backward, and forward_backward_parallel (the batch's rows split across threads, the parts' gradients
    weighted by their share of the loss tokens), against PyTorch's loss and gradients over the whole batch."""
    name, config, params, ref = case
    mask = ref["mask"] if tag == "" else None
    if tag == "":
        assert 0 < ref["mask"].sum() < ref["mask"].size            # the mask really drops positions
    if workers == 1:
        loss, grads = backprop.forward_backward(config, params, ref["tokens"], ref["targets"], mask)
    else:
        assert ref["tokens"].shape[0] >= 2                         # there really are rows to split
        loss, grads = backprop.forward_backward_parallel(config, params, ref["tokens"], ref["targets"], mask,
                                                      workers=workers)
    assert abs(loss - float(ref["loss" + tag])) <= 1e-5 * max(1.0, abs(float(ref["loss" + tag])))
    ref_names = {k.split("/", 1)[1] for k in ref if k.startswith(f"grad{tag}/")}
    assert set(grads) == ref_names
    errs = {k: rel_err(g, ref[f"grad{tag}/{k}"]) for k, g in grads.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{name}{tag}: {worst} off by {errs[worst]:.2e} of its scale"
    assert all(g.dtype == np.float32 for g in grads.values())


def test_parallel_part_with_no_loss_tokens_is_left_out(case):
    """A part whose rows are all masked out has no mean loss; it is skipped, and the rest give the whole batch's."""
    _, config, params, ref = case
    mask = ref["mask"].copy()
    mask[: mask.shape[0] // 2] = False
    serial = backprop.forward_backward(config, params, ref["tokens"], ref["targets"], mask)
    loss, grads = backprop.forward_backward_parallel(config, params, ref["tokens"], ref["targets"], mask, workers=2)
    assert abs(loss - serial[0]) <= 1e-6 * abs(serial[0])
    assert all(rel_err(grads[k], serial[1][k]) <= 1e-5 for k in grads)
    with pytest.raises(InputError, match="selects no token"):
        backprop.forward_backward_parallel(config, params, ref["tokens"], ref["targets"], np.zeros_like(mask), workers=2)


def test_masked_positions_get_no_gradient(case):
    """Changing the target of a masked-out position changes neither the loss nor any gradient."""
    _, config, params, ref = case
    mask = ref["mask"]
    b, t = np.argwhere(~mask)[0]
    other = ref["targets"].copy()
    other[b, t] = (other[b, t] + 1) % config.vocab_size
    l1, g1 = backprop.forward_backward(config, params, ref["tokens"], ref["targets"], mask)
    l2, g2 = backprop.forward_backward(config, params, ref["tokens"], other, mask)
    assert l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)


def test_adamw_on_torch_gradients_matches_torch_optimizer():
    """Our clipping + AdamW, fed torch's own gradients at each step, reproduce torch's parameters.

    This isolates the optimizer: float32 rounding only (measured ~1e-7 of scale)."""
    config, weights = read_checkpoint(paths.REFERENCE_DIR / "gqa")
    ref = np.load(paths.REFERENCE_DIR / "grads_gqa.npz")
    hp = MANIFEST["configs"]["gqa"]["grads"]["adamw"]
    params = {k: np.array(v, np.float32) for k, v in weights.items()}
    opt = backprop.AdamW(params, betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"])
    for step in range(hp["steps"]):
        grads = {k: ref[f"adamw_grad{step}/{k}"].copy() for k in params}
        backprop.clip_grad_norm(grads, hp["grad_clip"])
        opt.step(params, grads, hp["lr"])
    moved = max(float(np.abs(params[k] - weights[k]).max()) for k in params)
    assert moved > hp["lr"]                                          # the steps really changed the weights
    errs = {k: rel_err(params[k], ref[f"adamw/{k}"]) for k in params}
    assert max(errs.values()) <= 1e-5, max(errs.items(), key=lambda kv: kv[1])


def test_our_gradients_with_our_adamw_track_torch(case):
    """End to end: three steps of our forward/backward + clipping + AdamW against torch's.

    Adam divides each gradient by its own running magnitude, so an entry whose gradient is at rounding-noise level
    (|g| ~ 1e-7 while typical entries are ~1e-2) takes a full +-lr step whose sign is decided by rounding. Such
    entries exist (a few per 10^4): every entry must stay within the largest possible Adam drift (2 lr per step),
    and 99.9% of the entries of every tensor within 1e-4 of its scale. A wrong moment, bias correction, decay or
    clipping moves every entry, not one in a thousand."""
    name, config, params, ref = case
    hp = MANIFEST["configs"][name]["grads"]["adamw"]
    opt = backprop.AdamW(params, betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"])
    for _ in range(hp["steps"]):
        _, grads = backprop.forward_backward(config, params, ref["tokens"], ref["targets"], ref["mask"])
        backprop.clip_grad_norm(grads, hp["grad_clip"])
        opt.step(params, grads, hp["lr"])
    for k, p in params.items():
        r = ref[f"adamw/{k}"]
        d = np.abs(p.astype(np.float64) - r)
        assert d.max() <= 2 * hp["lr"] * hp["steps"], f"{name}: {k} drifted {d.max():.2e}"
        share = float(np.mean(d <= 1e-4 * np.abs(r).max()))
        assert share >= 0.999, f"{name}: only {share:.4%} of {k} within 1e-4 of scale"


def test_training_forward_equals_inference_forward(case):
    _, config, params, ref = case
    logits, _ = backprop.model_forward(config, params, ref["tokens"])
    ours = Llama(config, params).forward(ref["tokens"])
    assert logits.dtype == np.float32
    assert np.abs(logits - ours).max() <= 1e-5 * np.abs(ours).max()


# ------------------------------------------------------------------------------------------------
# each backward against central finite differences, in float64 (independent of PyTorch)

def numerical_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        a = f()
        x[idx] = old - eps
        b = f()
        x[idx] = old
        g[idx] = (a - b) / (2 * eps)
    return g


@pytest.fixture
def f64():
    """float64 inputs: backprop.py's functions keep their inputs' dtype, so finite differences are exact to ~1e-9."""
    return np.random.default_rng(0)


def test_rmsnorm_backward_finite_differences(f64):
    x, w, dy = f64.standard_normal((2, 3, 5)), f64.standard_normal(5), f64.standard_normal((2, 3, 5))
    y, cache = backprop.rmsnorm_forward(x, w, 1e-5)
    dx, dw = backprop.rmsnorm_backward(dy, cache)
    assert np.allclose(dx, numerical_grad(lambda: np.sum(backprop.rmsnorm_forward(x, w, 1e-5)[0] * dy), x), atol=1e-7)
    assert np.allclose(dw, numerical_grad(lambda: np.sum(backprop.rmsnorm_forward(x, w, 1e-5)[0] * dy), w), atol=1e-7)


def test_linear_backward_finite_differences(f64):
    x, w, dy = f64.standard_normal((2, 3, 4)), f64.standard_normal((5, 4)), f64.standard_normal((2, 3, 5))
    dx, dw = backprop.linear_backward(dy, x, w)
    assert np.allclose(dx, numerical_grad(lambda: np.sum(backprop.linear_forward(x, w) * dy), x), atol=1e-7)
    assert np.allclose(dw, numerical_grad(lambda: np.sum(backprop.linear_forward(x, w) * dy), w), atol=1e-7)


def test_rope_backward_finite_differences(f64):
    x, dy = f64.standard_normal((1, 2, 5, 8)), f64.standard_normal((1, 2, 5, 8))
    cos, sin = (a.astype(np.float64) for a in rope_freqs(8, 5))
    dx = backprop.rope_backward(dy, cos, sin)
    assert np.allclose(dx, numerical_grad(lambda: np.sum(backprop.rope_forward(x, cos, sin) * dy), x), atol=1e-7)


@pytest.mark.parametrize("nh,nkv,block", [(4, 4, 128), (4, 2, 128), (4, 1, 128), (4, 2, 2), (4, 1, 3)])
def test_attention_backward_finite_differences(f64, nh, nkv, block):
    """block < T: several query blocks, the last one ragged (T = 5), each against only the keys it may see."""
    q, k, v = f64.standard_normal((2, nh, 5, 6)), f64.standard_normal((2, nkv, 5, 6)), f64.standard_normal((2, nkv, 5, 6))
    dy = f64.standard_normal((2, nh, 5, 6))
    out, cache = backprop.attention_forward(q, k, v, block=block)
    dq, dk, dv = backprop.attention_backward(dy, cache)
    f = lambda: np.sum(backprop.attention_forward(q, k, v, block=block)[0] * dy)
    for got, x in ((dq, q), (dk, k), (dv, v)):
        assert np.allclose(got, numerical_grad(f, x), atol=1e-6)


def test_attention_blocks_equal_one_block_and_the_inference_attention():
    """The blocked causal attention (float32, T = 300: blocks of 128, 128, 44) equals model.attention's full masked
    softmax, and its gradients equal the single-block computation, to float32 rounding (1e-5 of scale)."""
    from llama_ref.model import attention, causal_mask
    rng = np.random.default_rng(0)
    B, nh, nkv, T, hs = 2, 4, 2, 300, 16
    q = rng.standard_normal((B, nh, T, hs), dtype=np.float32)
    k, v = (rng.standard_normal((B, nkv, T, hs), dtype=np.float32) for _ in range(2))
    dy = rng.standard_normal((B, nh, T, hs), dtype=np.float32)
    out, cache = backprop.attention_forward(q, k, v)
    assert len(cache[3]) == 3 and out.dtype == np.float32
    full = attention(q, k, v, causal_mask(T, T))[0]
    assert np.abs(out - full).max() <= 1e-5 * np.abs(full).max()
    one, cache1 = backprop.attention_forward(q, k, v, block=T)
    for a, b in zip(backprop.attention_backward(dy, cache), backprop.attention_backward(dy, cache1)):
        assert a.dtype == np.float32 and np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_swiglu_backward_finite_differences(f64):
    g, u, dy = f64.standard_normal((2, 3, 7)) * 3, f64.standard_normal((2, 3, 7)), f64.standard_normal((2, 3, 7))
    dg, du = backprop.swiglu_backward(dy, backprop.swiglu_forward(g, u)[1])
    f = lambda: np.sum(backprop.swiglu_forward(g, u)[0] * dy)
    assert np.allclose(dg, numerical_grad(f, g), atol=1e-7) and np.allclose(du, numerical_grad(f, u), atol=1e-7)


def test_cross_entropy_backward_finite_differences(f64):
    logits = f64.standard_normal((2, 4, 6))
    targets = f64.integers(0, 6, (2, 4))
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], bool)
    _, cache = backprop.cross_entropy_forward(logits, targets, mask)
    d = backprop.cross_entropy_backward(cache)
    num = numerical_grad(lambda: backprop.cross_entropy_forward(logits, targets, mask)[0], logits)
    assert np.allclose(d, num, atol=1e-7)
    assert np.all(d[~mask] == 0)


def test_embedding_backward_adds_repeated_tokens(f64):
    dout = f64.standard_normal((1, 3, 2))
    dwte = backprop.embedding_backward(dout, np.array([[4, 1, 4]]), 6)
    assert np.allclose(dwte[4], dout[0, 0] + dout[0, 2]) and np.allclose(dwte[1], dout[0, 1])
    assert np.all(dwte[[0, 2, 3, 5]] == 0)


# ------------------------------------------------------------------------------------------------
# optimizer pieces, data parallelism (the loop's tests: tests/test_trainer.py)

def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [backprop.lr_schedule(s, 1e-3, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert backprop.lr_schedule(100, 1e-3, 10, 100, 0.1) == pytest.approx(1e-4)


def test_clip_grad_norm_scales_to_the_limit():
    g = {"a": np.full(4, 3.0, np.float32), "b": np.full(9, 4.0 / 3, np.float32)}     # norm sqrt(36 + 16) = 7.21
    norm = backprop.clip_grad_norm(g, 1.0)
    assert norm == pytest.approx(math.sqrt(52), rel=1e-6)
    assert backprop.global_norm(g) == pytest.approx(1.0, rel=1e-5)
    g2 = {"a": np.full(4, 0.1, np.float32)}
    backprop.clip_grad_norm(g2, 1.0)
    assert np.all(g2["a"] == np.float32(0.1))                      # below the limit: untouched


def test_an_empty_loss_mask_is_a_clear_error():
    with pytest.raises(InputError, match="no token"):
        backprop.cross_entropy_forward(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2), int), np.zeros((1, 2), bool))


def test_parallel_parts_run_under_the_callers_errstate():
    """NumPy's errstate is per thread; data_parallel carries the caller's into every part (a diverging mini run that
    silences overflow must stay silent)."""
    seen = []

    def step(rows):
        seen.append(np.geterr()["over"])
        return 1.0, {"w": np.ones(1, np.float32)}, None

    with np.errstate(over="raise"):
        loss, grads, _ = backprop.data_parallel(step, [np.arange(1), np.arange(1, 3)], [1, 2])
    assert seen == ["raise", "raise"] and loss == 1.0 and np.allclose(grads["w"], 1.0)
