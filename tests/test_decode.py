"""The fused one-token decode step (decode.py) computes what Llama.forward computes, and generation uses it.

Both sides do the same float32 operations on the same numbers; decode_step only groups them differently (one
(C, nq+2*nkv*hs) matmul instead of three, the mean square as a dot product), which reorders float32 sums of C..H terms
(eps 1.2e-7): ~1e-6 of the logits' scale over a few layers. We allow 2e-5 of the scale, as the KV-cache test does;
a wrong position, head grouping or cache slot gives errors of order 1.
"""
import numpy as np
import pytest

from llama_ref import generate as gen
from llama_ref import paths
from llama_ref.config import LlamaConfig, RopeScaling
from llama_ref.decode import can_fuse, decode_step
from llama_ref.loader import load
from llama_ref.model import Llama
from llama_ref.quant import quantize_model
from conftest import random_weights  # noqa: E402

CONFIGS = {
    "gqa": LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=128, vocab_size=97, max_seq_len=40),
    "mha": LlamaConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=4, hidden_dim=80, vocab_size=61, max_seq_len=40),
    "mqa-tied": LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=64, vocab_size=50,
                            max_seq_len=40, tie_embeddings=True),
    "dynamic-ntk": LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=50,
                               max_seq_len=16, rope_scaling=RopeScaling("dynamic", 2.0)),
}
TOL = 2e-5


def forward_steps(model, tokens, start, end):
    """Logits of tokens[:, t] for start <= t < end, one Llama.forward per position (the plain path)."""
    cache = model.new_cache(tokens.shape[0])
    model.forward(tokens[:, :start], 0, cache)
    return np.stack([model.forward(tokens[:, t:t + 1], t, cache, last_only=True) for t in range(start, end)], 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_step_equals_forward(name):
    cfg = CONFIGS[name]
    model = Llama(cfg, random_weights(cfg))
    assert can_fuse(model)
    length = cfg.context_len                                         # dynamic NTK: past max_seq_len, tables change
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, length))
    ref = forward_steps(model, tokens, 5, length)                    # (B, T-5, V)
    cache = model.new_cache(2)
    model.forward(tokens[:, :5], 0, cache)
    got = np.stack([decode_step(model, tokens[:, t], t, cache) for t in range(5, length)], 1)
    np.testing.assert_allclose(got, ref, atol=TOL * np.abs(ref).max(), rtol=0)
    assert cache.length == length


def test_generate_uses_it_and_keeps_greedy_ids():
    """The embedded model: 64 greedy tokens from generate() (decode_step) == a loop of plain forwards."""
    model = load(paths.DEFAULT_MODEL)
    prompt = [1, 450, 3303, 29879] if model.config.vocab_size > 30000 else [1, 5, 9, 33, 7]
    res = gen.generate(model, prompt, 64, stop_at_eos=False, keep_logits=True)
    cache = model.new_cache(1, len(prompt) + 64)
    logits = model.forward(prompt, 0, cache, last_only=True)
    ids, diffs = [], []
    for pos in range(len(prompt), len(prompt) + 64):
        ids.append(int(np.argmax(logits)))
        diffs.append(np.abs(logits - res.logits[len(ids) - 1]).max() / np.abs(logits).max())
        logits = model.forward([ids[-1]], pos, cache, last_only=True)
    assert res.ids == ids
    assert max(diffs) < TOL


def test_generate_batch_with_padding_equals_forward():
    cfg = CONFIGS["gqa"]
    model = Llama(cfg, random_weights(cfg, scale=0.1))
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    batch = gen.generate_batch(model, prompts, 12, stop_at_eos=False)
    alone = [gen.generate(model, p, 12, stop_at_eos=False).ids for p in prompts]
    assert batch == alone


def test_quantized_model_falls_back_to_forward():
    """Quantized weights have no side-by-side arrays: decode_step runs forward itself, same logits."""
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96, max_seq_len=40)
    qm = quantize_model(Llama(cfg, random_weights(cfg)), "q8_0")
    assert not can_fuse(qm)
    tokens = np.arange(8)[None] % cfg.vocab_size
    c1, c2 = qm.new_cache(), qm.new_cache()
    qm.forward(tokens[:, :7], 0, c1)
    qm.forward(tokens[:, :7], 0, c2)
    np.testing.assert_array_equal(decode_step(qm, tokens[:, 7], 7, c1), qm.forward(tokens[:, 7:], 7, c2, last_only=True))


def test_bad_token_is_refused_like_forward():
    from llama_ref.errors import InputError
    cfg = CONFIGS["gqa"]
    model = Llama(cfg, random_weights(cfg))
    cache = model.new_cache()
    model.forward([1, 2], 0, cache)
    with pytest.raises(InputError, match="out of range"):
        decode_step(model, [cfg.vocab_size], 2, cache)
