"""Tests of llama_ref.ondevice: every rewrite equals the plain forward (model.forward), and the bandwidth calculator
agrees with counts done by hand from the architecture."""
import numpy as np
import pytest

from llama_ref import PRESETS
from llama_ref import ondevice as D
from llama_ref import quant as Q
from llama_ref.config import LlamaConfig
from llama_ref.errors import InputError
from llama_ref.generate import generate
from llama_ref.model import Llama
from llama_ref.trace import Trace
from conftest import random_weights  # noqa: E402

CFG = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=50, max_seq_len=40)




@pytest.fixture(scope="module")
def model():
    return Llama(CFG, random_weights(CFG))


# Tolerances: the rewrites do the same float32 products in another order (per-head matmuls, convs as (Cout, Cin) @
# (Cin, T) instead of (T, Cin) @ (Cin, Cout)), so sums are reordered: ~1e-6 relative per op, a few 1e-6 after four
# layers. We allow 1e-5 of the logits' scale; a wrong head slice, RoPE position or mask gives errors of order 1.
def close(a, b):
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_conv1x1_equals_linear():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 48)).astype(np.float32)
    w = rng.standard_normal((24, 48)).astype(np.float32)
    k = D.linear_to_conv(w)
    assert k.shape == (24, 48, 1, 1) and D.to_nchw(x).shape == (2, 48, 1, 7)
    close(D.from_nchw(D.conv1x1(D.to_nchw(x), k)), x @ w.T)
    # the 1x1 conv as a real convolution (sum over input channels at every pixel), written out with loops
    xn = D.to_nchw(x)
    ref = np.zeros((2, 24, 1, 7), np.float32)
    for o in range(24):
        for i in range(48):
            ref[:, o] += k[o, i, 0, 0] * xn[:, i]
    close(D.conv1x1(xn, k), ref)


def test_single_head_attention_equals_block_attention(model):
    tokens = np.array([1, 4, 9, 16, 25, 36])
    tr = Trace("layers.1.attn_norm", "layers.1.attn.out", "layers.1.attn.k", "layers.1.attn.v")
    model.forward(tokens, trace=tr)
    layer = D.conv_layers(model)[1]
    T = len(tokens)
    mask = np.where(np.tri(T, dtype=bool), 0, D.MASK_NEG).astype(np.float32)
    out, k, v = D.single_head_attention(D.to_nchw(tr["layers.1.attn_norm"]), layer, CFG,
                                        model.cos[:T], model.sin[:T], mask)
    close(D.from_nchw(out), tr["layers.1.attn.out"])
    close(k, tr["layers.1.attn.k"][0].transpose(0, 2, 1))              # keys stored transposed (nkv, hs, T)
    close(v, tr["layers.1.attn.v"][0])                                  # values (nkv, T, hs)
    assert len(layer.wq) == 4 and layer.wq[0].shape == (16, 64, 1, 1) and len(layer.wk) == 2


@pytest.mark.parametrize("n_parts", [1, 2, 4])
def test_parts_in_sequence_equal_forward(model, n_parts):
    od = D.OnDeviceLlama(model, n_parts=n_parts, prompt_len=16)
    assert sum(len(p) for p in od.parts) == CFG.n_layers and len(od.parts) == n_parts
    assert [i for p in od.parts for i in p] == list(range(CFG.n_layers))
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    T = len(tokens)
    mask = np.where(np.tri(T, dtype=bool), 0, D.MASK_NEG).astype(np.float32)
    logits, ks, vs = od.run_parts(tokens, model.cos[:T], model.sin[:T], mask)
    close(logits, model.forward(tokens))
    assert len(ks) == CFG.n_layers


@pytest.mark.parametrize("n", [1, 5, 16])
def test_prompt_processor_equals_forward_and_cache(model, n):
    od = D.OnDeviceLlama(model, prompt_len=16)
    prompt = list(np.random.default_rng(n).integers(0, CFG.vocab_size, n))
    tokens, cos, sin, mask = od.prompt_inputs(prompt)
    assert tokens.shape == (16,) and mask.shape == (16, 16) and cos.shape == (16, CFG.head_dim // 2)
    logits, ks, vs = od.prompt_processor(tokens, cos, sin, mask)
    assert logits.shape == (16, CFG.vocab_size) and np.isfinite(logits).all()    # pad rows too: no NaN
    close(logits[16 - n:], model.forward(prompt))                    # real rows = the plain forward's logits
    cache = model.new_cache()
    model.forward(prompt, 0, cache)
    for i in range(CFG.n_layers):
        close(ks[i][:, :, 16 - n:], cache.k[i][0, :, :n].transpose(0, 2, 1))
        close(vs[i][:, 16 - n:], cache.v[i][0, :, :n])


def test_token_generator_equals_cached_decode(model):
    od = D.OnDeviceLlama(model, prompt_len=16, context=40)
    prompt = [1, 7, 3, 3, 8]
    _, ks, vs = od.prompt_processor(*od.prompt_inputs(prompt))
    cache_k, cache_v = od.empty_cache()
    for i in range(CFG.n_layers):
        cache_k[i][:, :, -5:] = ks[i][:, :, -5:]
        cache_v[i][:, -5:] = vs[i][:, -5:]
    logits, nk, nv = od.token_generator(*od.generator_inputs(11, 5, 5), cache_k, cache_v)
    assert logits.shape == (CFG.vocab_size,) and nk[0].shape == (2, 16, 1) and nv[0].shape == (2, 1, 16)
    assert cache_k[0].shape == (2, 16, 39)                              # static: context-1 past slots
    close(logits, model.forward(prompt + [11])[-1])


def test_static_generation_equals_generate(model):
    od = D.OnDeviceLlama(model, prompt_len=16, context=40)
    prompt = [1, 2, 3, 4, 5, 6]
    ids, logits = od.generate(prompt, 12)
    ref = generate(model, prompt, 12, temperature=0, stop_at_eos=False, keep_logits=True)
    assert ids == ref.ids
    for a, b in zip(logits, ref.logits):
        close(a, b)


def test_on_device_graph_of_a_quantized_model(model):
    qm = Q.quantize_model(model, "q8_0")
    od = D.OnDeviceLlama(qm, prompt_len=8)
    prompt = [4, 2, 4]
    close(od.prompt_processor(*od.prompt_inputs(prompt))[0][-3:], qm.forward(prompt))


def test_bad_inputs(model):
    od = D.OnDeviceLlama(model, prompt_len=8, context=12)
    with pytest.raises(InputError, match="1..8"):
        od.prompt_inputs(list(range(9)))
    with pytest.raises(InputError, match="context"):
        od.generate([1] * 8, 6)
    with pytest.raises(InputError, match="n_parts"):
        D.OnDeviceLlama(model, n_parts=5)


def test_bandwidth_calculator_by_hand():
    c = PRESETS["llama2-7b"]
    # Llama 2 7B: 32 layers x (4 x 4096^2 attention + 3 x 4096 x 11008 MLP) + 32000 x 4096 classifier
    layer_params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    b = D.decode_bytes_per_token(c, 4.0)
    assert b["weights"] == (layer_params + 32000 * 4096) * 0.5 and b["kv_cache"] == 0
    assert (layer_params + 32000 * 4096 + 32000 * 4096 + 65 * 4096) == c.n_params()   # + embedding and norms
    b = D.decode_bytes_per_token(c, 4.0, kv_len=1024, kv_bytes=2)
    assert b["kv_cache"] == 2 * 32 * 4096 * 1024 * 2                   # K and V, fp16, 1024 positions: 512 MiB
    assert D.tokens_per_second_bound(4e9, 64.0) == pytest.approx(16.0)
    # 70B uses GQA (8 kv heads): its cache per position is 8x smaller than with 64 heads
    b70 = D.decode_bytes_per_token(PRESETS["llama2-70b"], 4.0, kv_len=1)
    assert b70["kv_cache"] == 2 * 80 * 8 * 128 * 2


# ------------------------------------------------------------------------------------------------
# static A16: every Conv/MatMul input and output on int16 steps; the stored HTP run matches the twin

def test_calibration_gives_every_site_a_scale_and_the_twin_rounds_each(model):
    scales = D.calibrate(model, [[1, 2, 3, 4, 5], [7, 8, 9]])
    assert list(scales) == D.a16_names(CFG) and len(scales) == 15 * CFG.n_layers + 2
    assert all(s > 0 for s in scales.values())
    seen = []

    class Recorder(D.StaticA16):
        def __call__(self, x, name):
            seen.append(name)
            return super().__call__(x, name)

    od = D.OnDeviceLlama(model, prompt_len=8, context=12, act_scales=Recorder(scales))
    od.prompt_processor(*od.prompt_inputs([1, 2, 3]))
    assert set(seen) == set(scales)                       # no site is skipped, none is invented
    # rounding moves the logits by about the size of the steps, not more (a random model: a loose check)
    exact = D.OnDeviceLlama(model, prompt_len=8, context=12).prompt_processor(*od.prompt_inputs([1, 2, 3]))[0]
    rounded = D.OnDeviceLlama(model, prompt_len=8, context=12, act_scales=scales).prompt_processor(
        *od.prompt_inputs([1, 2, 3]))[0]
    assert 0 < np.abs(rounded - exact).max() < 1e-2 * np.abs(exact).max()


def test_float16_emulation_rounds_before_the_int16_step():
    a16 = D.StaticA16({"t": 1e-4}, float16=True)
    x = np.array([1.00012345, 70000.0], np.float32)
    out = a16(x, "t")
    assert out[0] == D.fake_quant16(np.float32(np.float16(1.00012345)), 1e-4)
    assert out[1] == np.float32(32767 * np.float32(1e-4))             # float16 overflows to inf; int16 saturates


def test_the_stored_htp_run_is_what_the_twin_computes_now():
    """data/ondevice/htp_run.json (scripts/qnn_htp_run.py on onnxruntime-qnn's HTP simulator) holds the HTP's greedy
    ids; the NumPy twin of today's code must choose the same tokens, or the stored run is stale: rerun the script."""
    import json
    from llama_ref import ondevice_onnx as QO, paths
    from llama_ref.loader import load
    from llama_ref.tokenizer import Tokenizer
    run = json.loads((paths.DATA_DIR / "ondevice" / "htp_run.json").read_text())
    qmodel = QO.quantized_for_device(load(paths.DEFAULT_MODEL))
    scales = D.calibrate(qmodel, QO.calibration_prompts_for(Tokenizer(paths.DEFAULT_MODEL / "tokenizer.model")))
    export = run["export"]
    twin = D.OnDeviceLlama(qmodel, len(export["parts"]), export["prompt_len"], export["context"], act_scales=scales)
    for r in run["runs"]:
        assert twin.generate(r["prompt"], run["new_tokens"])[0] == r["ids"], r["text"]
    for graph, report in run["placement"].items():
        assert report["not_on_htp"] == 0 and report["on_htp"] == report["onnx_nodes"], graph
