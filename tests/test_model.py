"""Unit tests of llama_ref.model that need no fixtures: internal consistency and error handling.

The comparison with transformers lives in tests/test_reference.py (fixtures made by an independent implementation).
"""
import numpy as np
import pytest

from llama_ref.config import LlamaConfig, RopeScaling
from llama_ref.errors import (CheckpointError, ContextLengthError, InputError, LlamaRefError,
                              NonFiniteWeightsError, ShapeMismatchError)
from llama_ref.model import (Llama, apply_rope_hf, apply_rope_meta, attention, causal_attention, causal_mask,
                             permute_qk_hf_to_meta, permute_qk_meta_to_hf, rms_norm, rope_freqs, softmax)
from llama_ref.trace import Trace
from conftest import random_weights  # noqa: E402

CFG = LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=40)




@pytest.fixture(scope="module")
def model():
    return Llama(CFG, random_weights(CFG))


CONFIGS = {                                      # every head grouping, a tied classifier, a rope table that changes
    "gqa": CFG,
    "mha": LlamaConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=4, hidden_dim=80, vocab_size=61, max_seq_len=40),
    "mqa-tied": LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=64, vocab_size=50,
                            max_seq_len=40, tie_embeddings=True),
    "dynamic-ntk": LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=50,
                               max_seq_len=16, rope_scaling=RopeScaling("dynamic", 2.0)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decode_equals_full_forward(name):
    """Decoding (one token per forward, T = 1, with the cache) gives the logits of one forward over all positions.
    Same maths on the same numbers; only BLAS's kernels differ between a (1, C) and a (T, C) product (matrix-vector
    vs matrix-matrix), which reorders float32 sums (eps 1.2e-7) over C..H terms in a few layers: ~1e-6 relative. We
    allow 2e-5 of the logits' scale; a wrong position, head grouping, mask or cache slot gives errors of order 1.
    Dynamic NTK: the full forward uses the tables of the whole length, the steps those of the length so far (as
    transformers does), so that config is checked only where its tables do not change (up to max_seq_len)."""
    cfg = CONFIGS[name]
    model = Llama(cfg, random_weights(cfg))
    T = cfg.max_seq_len if cfg.rope_scaling else 25
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, T))
    full = model.forward(tokens)
    cache = model.new_cache(batch_size=3)
    steps = [model.forward(tokens[:, :5], 0, cache)] + [model.forward(tokens[:, t:t + 1], t, cache)
                                                         for t in range(5, T)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5 * np.abs(full).max(), rtol=0)
    assert cache.length == T


@pytest.mark.parametrize("T, S, block", [(300, 300, 128), (300, 310, 128), (37, 50, 7), (5, 5, 1), (1, 9, 128)])
def test_causal_attention_in_blocks_equals_one_masked_call(T, S, block):
    """Blocks of queries scored against the keys they may see == one call with the full causal mask. Only float32
    summation order differs (a sum over fewer terms, the masked ones having been exact zeros): 1e-6 of the scale."""
    rng = np.random.default_rng(T + S)
    q = rng.standard_normal((2, 6, T, 16), dtype=np.float32)
    k, v = (rng.standard_normal((2, 2, S, 16), dtype=np.float32) for _ in range(2))
    ref, _ = attention(q, k, v, causal_mask(T, S))
    got = causal_attention(q, k, v, block)
    np.testing.assert_allclose(got, ref, atol=1e-6 * np.abs(ref).max(), rtol=0)


def test_chunked_prefill_equals_full_forward(model):
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, 30)
    full = model.forward(tokens)
    cache = model.new_cache()
    parts = [model.forward(tokens[:11], 0, cache), model.forward(tokens[11:12], 11, cache),
             model.forward(tokens[12:], 12, cache)]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=2e-5 * np.abs(full).max(), rtol=0)


def test_batch_rows_equal_single_sequences(model):
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 17))
    batch = model.forward(tokens)
    for b in range(2):
        np.testing.assert_allclose(batch[b], model.forward(tokens[b]), atol=2e-5 * np.abs(batch).max(), rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_last_only_matches_full(name):
    """last_only: the last block computes only the last row (every key and value still go into the cache), then the
    head reads that row. Same logits as the full forward's last position and the same cache, for a whole prompt and
    for a chunk after cached positions; only the last block's (1, C) products differ from the (T, C) ones in BLAS's
    summation order (the tolerance of the KV-cache test above). The keys and values come from the very same calls."""
    cfg = CONFIGS[name]
    model = Llama(cfg, random_weights(cfg))
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 13))
    caches = model.new_cache(batch_size=2), model.new_cache(batch_size=2)
    full = model.forward(tokens[:, :9], 0, caches[0])[:, -1]
    last = model.forward(tokens[:, :9], 0, caches[1], last_only=True)
    assert last.shape == (2, cfg.vocab_size)
    np.testing.assert_allclose(last, full, atol=2e-5 * np.abs(full).max(), rtol=0)
    full = model.forward(tokens[:, 9:], 9, caches[0])[:, -1]                  # a chunk after cached positions
    last = model.forward(tokens[:, 9:], 9, caches[1], last_only=True)
    np.testing.assert_allclose(last, full, atol=2e-5 * np.abs(full).max(), rtol=0)
    assert caches[0].length == caches[1].length == 13
    for kind in ("k", "v"):
        for a, b in zip(getattr(caches[0], kind), getattr(caches[1], kind)):
            np.testing.assert_array_equal(a[:, :, :13], b[:, :, :13])
    np.testing.assert_allclose(model.forward(tokens[0], last_only=True), model.forward(tokens[0])[-1],
                               atol=2e-5 * np.abs(full).max(), rtol=0)


def test_forward_stays_float32(model):
    trace = Trace()
    logits = model.forward(np.arange(12) % CFG.vocab_size, trace=trace)
    assert logits.dtype == np.float32
    assert len(trace) > 10
    wrong = {name: t.dtype for name, t in trace.items() if t.dtype != np.float32}
    assert not wrong, f"taps that left float32: {wrong}"
    for layer in model.params["layers"]:
        assert all(a.dtype == np.float32 for a in layer.values())
        for key in ("attn_norm", "wo", "ffn_norm", "w_down", "wqkv", "w_gate_up"):
            assert layer[key].flags.c_contiguous                              # (in, out) rows, read once per matmul
        for name, parts in (("wqkv", ("wq", "wk", "wv")), ("w_gate_up", ("w_gate", "w_up"))):
            assert all(layer[p].base is layer[name] and layer[p].strides[1] == 4 for p in parts)   # column views
            np.testing.assert_array_equal(np.concatenate([layer[p] for p in parts], 1), layer[name])


def test_one_layout_weights_are_params_under_hf_names(model):
    """model.weights shows the very arrays model.params holds (transposed views, no second copy), under HF names and
    (out, in) shapes, in a checkpoint's order; a model built from them computes the same logits."""
    from llama_ref.weights import weight_shapes
    w = model.weights
    assert list(w) == list(weight_shapes(CFG)) and all(w[k].shape == s for k, s in weight_shapes(CFG).items())
    assert w["model.layers.1.self_attn.k_proj.weight"].base is model.params["layers"][1]["wqkv"]
    assert w["lm_head.weight"].base is model.params["lm_head"]
    tokens = np.arange(9) % CFG.vocab_size
    np.testing.assert_array_equal(Llama(CFG, w).forward(tokens), model.forward(tokens))


def test_stored_weights_multiply_side_by_side():
    """Stored or quantized weights are not concatenated: q/k/v (and gate/up) become one matrices.SideBySide, whose
    matmul writes each part's own product into its columns (the same numbers as the parts alone), and the model
    decodes through it exactly as it prefills (within the KV-cache tolerance above)."""
    from llama_ref.matrices import SideBySide
    from llama_ref.quant import quantize_model
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96, max_seq_len=40)
    qm = quantize_model(Llama(cfg, random_weights(cfg)), "q8_0")         # Q8_0: rows in blocks of 32
    layer = qm.params["layers"][0]
    assert isinstance(layer["wqkv"], SideBySide) and layer["wqkv"].parts == [layer["wq"], layer["wk"], layer["wv"]]
    x = np.random.default_rng(0).standard_normal((2, 3, cfg.dim), dtype=np.float32)
    np.testing.assert_array_equal(layer["wqkv"].matmul(x),
                                  np.concatenate([layer[p].matmul(x) for p in ("wq", "wk", "wv")], -1))
    np.testing.assert_array_equal(layer["w_gate_up"].dequantize(),
                                  np.concatenate([layer["w_gate"].dequantize(), layer["w_up"].dequantize()]))
    tokens = np.arange(12)[None] % cfg.vocab_size
    full = qm.forward(tokens)
    cache = qm.new_cache()
    steps = [qm.forward(tokens[:, :7], 0, cache)] + [qm.forward(tokens[:, t:t + 1], t, cache) for t in range(7, 12)]
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5 * np.abs(full).max(), rtol=0)


def test_every_documented_tap_is_recorded(model):
    trace = Trace()
    model.forward([1, 2, 3], trace=trace)
    per_layer = ["attn_norm", "attn.q", "attn.k", "attn.v", "attn.probs", "attn.heads", "attn.out",
                 "attn_residual", "ffn_norm", "ffn.gate", "ffn.up", "ffn.hidden", "ffn.out", "out"]
    expected = ["embed"] + [f"layers.{i}.{n}" for i in range(CFG.n_layers) for n in per_layer] + ["norm.out", "logits"]
    assert sorted(trace.names()) == sorted(expected)
    B, T, hs = 1, 3, CFG.head_dim
    assert trace["layers.0.attn.q"].shape == (B, CFG.n_heads, T, hs)
    assert trace["layers.0.attn.k"].shape == (B, CFG.n_kv_heads, T, hs)
    assert trace["layers.1.attn.probs"].shape == (B, CFG.n_heads, T, T)
    assert trace["layers.1.ffn.gate"].shape == (B, T, CFG.hidden_dim)
    np.testing.assert_allclose(trace["layers.1.attn.probs"].sum(-1), 1.0, atol=1e-6)
    assert np.all(np.triu(trace["layers.0.attn.probs"][0, 0], k=1) == 0), "causal mask leaked the future"


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA is MHA whose k/v heads are shared: repeating k/v weights per group must give identical logits."""
    w = random_weights(CFG, seed=5)
    mha_cfg = CFG.replace(n_kv_heads=CFG.n_heads)
    hs, rep = CFG.head_dim, CFG.n_rep
    w_mha = dict(w)
    for i in range(CFG.n_layers):
        for p in ("k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{p}.weight"
            w_mha[name] = np.repeat(w[name].reshape(CFG.n_kv_heads, hs, CFG.dim), rep, axis=0).reshape(-1, CFG.dim)
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, 14)
    np.testing.assert_allclose(Llama(mha_cfg, w_mha).forward(tokens), Llama(CFG, w).forward(tokens), atol=1e-5)


def test_rope_permutation_maps_meta_onto_hf():
    """Meta's interleaved RoPE on Meta-layout rows == HF's rotate-half RoPE on permuted rows (scores q.k)."""
    rng = np.random.default_rng(7)
    nh, hs, C, T = 4, 16, 32, 11
    wq, wk = rng.standard_normal((2, nh * hs, C)).astype(np.float32)
    x = rng.standard_normal((T, C)).astype(np.float32)
    cos, sin = rope_freqs(hs, T)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(T, nh, hs).transpose(1, 0, 2), cos, sin)
        k = rope((x @ wk.T).reshape(T, nh, hs).transpose(1, 0, 2), cos, sin)
        return q @ k.transpose(0, 2, 1)

    meta = scores(wq, wk, apply_rope_meta)
    hf = scores(permute_qk_meta_to_hf(wq, nh), permute_qk_meta_to_hf(wk, nh), apply_rope_hf)
    np.testing.assert_allclose(hf, meta, rtol=1e-4, atol=1e-3 * np.abs(meta).max())
    # and mixing them up is badly wrong: that is the classic porting bug
    wrong = scores(wq, wk, apply_rope_hf)
    assert np.abs(wrong - meta).max() > 0.1 * np.abs(meta).max()
    np.testing.assert_array_equal(permute_qk_hf_to_meta(permute_qk_meta_to_hf(wq, nh), nh), wq)


def test_rope_relative_position():
    """q.k after RoPE depends only on the distance between the positions."""
    rng = np.random.default_rng(8)
    hs = 32
    q, k = rng.standard_normal((2, hs)).astype(np.float32)
    cos, sin = rope_freqs(hs, 64)
    dots = [apply_rope_hf(q, cos[m], sin[m]) @ apply_rope_hf(k, cos[m - 5], sin[m - 5]) for m in (5, 20, 63)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_rms_norm_and_softmax_by_hand():
    x = np.array([[3.0, -4.0]], np.float32)
    np.testing.assert_allclose(rms_norm(x, np.array([1.0, 2.0], np.float32), 0.0),
                               [[3 / np.sqrt(12.5), -8 / np.sqrt(12.5)]], rtol=1e-6)
    np.testing.assert_allclose(softmax(np.array([0.0, np.log(3.0)], np.float32)), [0.25, 0.75], rtol=1e-6)
    m = causal_mask(2, 4)   # two new queries at positions 2 and 3
    assert np.isneginf(m).tolist() == [[False, False, False, True], [False, False, False, False]]


def test_attention_gqa_head_mapping():
    """Query head h reads k/v head h // n_rep."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 4, 3, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, 2, 5, 8)).astype(np.float32)
    out, probs = attention(q, k, v)
    for h in range(4):
        ref_p = softmax(q[0, h] @ k[0, h // 2].T / np.float32(np.sqrt(8)))
        np.testing.assert_allclose(probs[0, h], ref_p, atol=1e-6)
        np.testing.assert_allclose(out[0, h], ref_p @ v[0, h // 2], atol=1e-5)


# ---- bad input: clear LlamaRefError subclasses, never a raw NumPy traceback ----------------------------

def test_token_out_of_range(model):
    with pytest.raises(InputError, match="out of range for vocab_size=97"):
        model.forward([1, 97])
    with pytest.raises(InputError, match="out of range"):
        model.forward([-1])


def test_bad_token_arrays(model):
    with pytest.raises(InputError, match="integer"):
        model.forward(np.array([1.5, 2.0]))
    with pytest.raises(InputError, match="empty"):
        model.forward([])
    with pytest.raises(InputError, match="shape"):
        model.forward(np.zeros((1, 2, 3), int))


def test_context_overflow(model):
    with pytest.raises(ContextLengthError, match="context window of 40"):
        model.forward(np.ones(41, int))
    cache = model.new_cache()
    model.forward(np.ones(39, int), 0, cache)
    with pytest.raises(ContextLengthError):
        model.forward([1, 1], 39, cache)


def test_cache_misuse(model):
    cache = model.new_cache(batch_size=2)
    with pytest.raises(InputError, match="holds 2 sequences"):
        model.forward([1, 2], 0, cache)
    with pytest.raises(InputError, match="gap"):
        model.forward([[1], [2]], 5, cache)


def test_weights_that_do_not_fit_the_config():
    w = random_weights(CFG)
    w["model.layers.1.mlp.up_proj.weight"] = np.zeros((CFG.hidden_dim + 1, CFG.dim), np.float32)
    with pytest.raises(ShapeMismatchError, match="up_proj.*config.json and the weights disagree"):
        Llama(CFG, w)
    w = random_weights(CFG)
    del w["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        Llama(CFG, w)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights(bad):
    w = random_weights(CFG)
    w["model.layers.0.self_attn.v_proj.weight"][3, 4] = bad
    with pytest.raises(NonFiniteWeightsError, match="v_proj.*1 NaN/Inf"):
        Llama(CFG, w)
    w = random_weights(CFG)
    w["model.embed_tokens.weight"][0, 0] = bad
    with pytest.raises(NonFiniteWeightsError, match="embed_tokens"):
        Llama(CFG, w)


def test_errors_share_one_base():
    for cls in (InputError, ContextLengthError, ShapeMismatchError, NonFiniteWeightsError, CheckpointError):
        assert issubclass(cls, LlamaRefError)


def test_tied_embeddings_use_the_embedding_as_classifier():
    cfg = CFG.replace(tie_embeddings=True)
    w = random_weights(cfg)
    m = Llama(cfg, w)
    np.testing.assert_array_equal(m.params["lm_head"], w["model.embed_tokens.weight"].T)   # (C, V) for the matmul
    assert "lm_head.weight" not in m.weights                                # one tensor in a checkpoint


def test_a_mask_replaces_the_causal_one(model):
    """forward(mask=) takes an additive (B, 1, 1, T, S) mask instead of the causal one: the causal mask itself gives
    the same logits, and hiding the first key from the later queries changes theirs but not the first row's."""
    tokens = np.array([[1, 5, 9, 3], [2, 4, 6, 8]])
    T = tokens.shape[1]
    causal = np.broadcast_to(causal_mask(T, T), (2, 1, 1, T, T))
    np.testing.assert_array_equal(model.forward(tokens, mask=causal), model.forward(tokens))
    hidden = causal.copy()
    hidden[:, :, :, 1:, 0] = -np.inf                                   # later queries may not see position 0
    out = model.forward(tokens, mask=hidden)
    np.testing.assert_array_equal(out[:, 0], model.forward(tokens)[:, 0])
    assert np.abs(out[:, 1:] - model.forward(tokens)[:, 1:]).max() > 1e-3
