"""llama_ref.generate: sampling against transformers' logits warpers (fixtures), determinism, greedy, errors,
EOS, streaming, prefill/decode bookkeeping and the context window."""
import json
from pathlib import Path

import numpy as np
import pytest

from llama_ref.config import LlamaConfig
from llama_ref.errors import ContextLengthError, InputError, SamplingError
from llama_ref.generate import GenerationResult, check_sampling, generate, sample, sampling_probs, stream
from llama_ref.model import Llama
from llama_ref.paths import REFERENCE_DIR
from conftest import random_weights  # noqa: E402

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64, max_seq_len=32)
FIXTURE = REFERENCE_DIR / "sampling.npz"
TIED_ROW = 3          # make_reference_sampling.make_logits: row 3 is rounded to 0.1, so it holds many exact ties


@pytest.fixture(scope="module")
def model():
    weights = random_weights(CFG, 0, scale=0.5)
    return Llama(CFG, weights)


# ------------------------------------------------------------------------------------------------
# sampling_probs == transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> softmax

def _fixture_cases():
    d = np.load(FIXTURE)
    for g, (t, k, p) in enumerate(d["settings"]):
        for n in range(d["logits"].shape[0]):
            yield float(t), int(k), float(p), n, d["logits"][n], d["probs"][g, n]


def test_fixture_manifest_matches_file():
    import hashlib
    manifest = json.loads((REFERENCE_DIR / "sampling_manifest.json").read_text())
    assert manifest["files"]["sampling.npz"] == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    assert manifest["generator"] == "scripts/make_reference_sampling.py"


def test_sampling_probs_match_transformers():
    # Tolerance 1e-6 absolute on probabilities: both sides are float32 softmaxes of the same float32 logits
    # (ours over the kept set, theirs over -inf-filled logits); measured worst error 4.8e-7 (a few float32 ulps
    # of the largest probability). The kept set must be identical, except for exact ties at the top-p boundary
    # (row TIED_ROW): which of several equal logits falls out there depends on torch.sort's unspecified order
    # of equal keys, so for those we compare the distribution up to a permutation of equal-logit tokens.
    n_cases = 0
    for t, k, p, n, logits, ref in _fixture_cases():
        ours = sampling_probs(logits, t, k or None, p)
        assert ours.dtype == np.float32 and abs(float(ours.sum()) - 1.0) < 1e-5
        if n == TIED_ROW:
            assert (ours > 0).sum() == (ref > 0).sum(), (t, k, p)
            np.testing.assert_allclose(np.sort(ours), np.sort(ref), atol=1e-6, rtol=0)
            np.testing.assert_array_equal(np.sort(logits[ours > 0]), np.sort(logits[ref > 0]))
        else:
            np.testing.assert_array_equal(ours > 0, ref > 0, err_msg=f"kept set differs at T={t} k={k} p={p} row {n}")
            np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0, err_msg=f"T={t} k={k} p={p} row {n}")
        n_cases += 1
    assert n_cases == 48 * 6


def test_top_k_keeps_ties_and_top_p_keeps_the_argmax():
    logits = np.array([3.0, 1.0, 3.0, 0.5, 2.0], np.float32)
    assert (sampling_probs(logits, 1.0, top_k=1) > 0).tolist() == [True, False, True, False, False]
    probs = sampling_probs(logits, 1.0, top_p=1e-6)          # tiny nucleus: still the most likely token
    assert (probs > 0).sum() == 1 and probs.max() == 1.0 and logits[np.argmax(probs)] == 3.0
    assert (sampling_probs(logits, 1.0, top_k=100) > 0).all()  # k larger than V: nothing dropped


def test_temperature_order_matters_for_top_p():
    # temperature is applied BEFORE top-p (as in transformers): a hot temperature flattens the distribution,
    # so the same top_p keeps more tokens
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 200).astype(np.float32)
    cold = (sampling_probs(logits, 0.5, top_p=0.9) > 0).sum()
    hot = (sampling_probs(logits, 2.0, top_p=0.9) > 0).sum()
    assert cold < hot


def test_fixtures_regenerate_identically():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import subprocess, sys
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_reference_sampling.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------
# settings

@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature="hot"),
    dict(top_k=-1), dict(top_k=2.5), dict(top_k=True), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(seed=-3), dict(seed=1.5),
])
def test_invalid_settings_are_sampling_errors(kw, model):
    args = dict(temperature=1.0, top_k=None, top_p=None, seed=0) | kw
    with pytest.raises(SamplingError) as e:
        check_sampling(**args)
    assert str(e.value)                                      # the message names the setting
    with pytest.raises(SamplingError):
        generate(model, [1, 2], 3, **args)


def test_temperature_zero_is_greedy(model):
    logits = np.random.default_rng(1).normal(size=64).astype(np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, rng, temperature=0) == int(np.argmax(logits))
    assert sampling_probs(logits, 0.0, top_k=5, top_p=0.5)[np.argmax(logits)] == 1.0
    res = generate(model, [1, 5, 9], 8, temperature=0.0, stop_at_eos=False)
    ids = [1, 5, 9]
    for _ in range(8):                                        # greedy by hand: full forward, no cache
        ids.append(int(np.argmax(model.forward(ids)[-1])))
    assert res.ids == ids[3:]
    # the seed does not matter for greedy
    assert generate(model, [1, 5, 9], 8, temperature=0.0, seed=99, stop_at_eos=False).ids == res.ids


def test_same_seed_same_output(model):
    kw = dict(temperature=1.2, top_k=20, top_p=0.95, stop_at_eos=False)
    a = generate(model, [1, 3], 20, seed=5, **kw).ids
    b = generate(model, [1, 3], 20, seed=5, **kw).ids
    c = generate(model, [1, 3], 20, seed=6, **kw).ids
    assert a == b and a != c


def test_sampled_tokens_follow_the_filtered_distribution():
    # 20000 draws from a 5-token distribution: frequencies within 0.015 of the probabilities (5 sigma ~ 0.015)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    probs = sampling_probs(logits, 0.8, top_k=4, top_p=0.95)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample(logits, rng, 0.8, 4, 0.95) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(counts, probs, atol=0.015)
    assert counts[4] == 0                                     # outside the top-k: never drawn


# ------------------------------------------------------------------------------------------------
# the loop

def test_stop_at_eos(model):
    # find a prompt whose greedy continuation reaches some token, then call that token EOS
    res = generate(model, [1, 7], 10, temperature=0.0, stop_at_eos=False)
    eos = res.ids[3]
    m = Llama(CFG.replace(eos_id=eos), model.weights)
    first = res.ids.index(eos)
    stopped = generate(m, [1, 7], 10, temperature=0.0, stop_at_eos=True)
    assert stopped.stop_reason == "eos" and stopped.ids == res.ids[:first + 1]   # EOS is the last id
    assert generate(m, [1, 7], 10, temperature=0.0, stop_at_eos=False).ids == res.ids
    assert res.stop_reason == "length"


def test_streaming_equals_non_streaming(model):
    kw = dict(temperature=0.9, top_p=0.9, seed=3, stop_at_eos=False)
    result = GenerationResult([], [], "length", 0.0, 0.0)
    streamed = list(stream(model, [1, 2, 3], 12, result=result, **kw))
    seen = []
    full = generate(model, [1, 2, 3], 12, on_token=seen.append, **kw)
    assert streamed == full.ids == seen == result.ids


def test_prefill_decode_bookkeeping(model):
    res = generate(model, [1, 2, 3, 4, 5], 7, temperature=0.0, stop_at_eos=False)
    assert len(res.ids) == 7 and res.n_decode == 6            # the first token comes from the prefill
    assert res.prompt_ids == [1, 2, 3, 4, 5]
    assert res.prefill_s > 0 and res.decode_s > 0
    assert res.prefill_tok_s == pytest.approx(5 / res.prefill_s)
    assert res.decode_tok_s == pytest.approx(6 / res.decode_s)
    assert res.time_to_first_token_s == res.prefill_s
    one = generate(model, [1, 2], 1, temperature=0.0)
    assert one.n_decode == 0 and len(one.ids) == 1
    zero = generate(model, [1, 2], 0)
    assert zero.ids == [] and zero.n_decode == 0


def test_kv_cache_decode_equals_full_forward_logits(model):
    res = generate(model, [1, 4, 9], 6, temperature=0.0, stop_at_eos=False, keep_logits=True)
    ids = [1, 4, 9] + res.ids
    full = model.forward(ids)                                 # (T, V), no cache
    for i, lg in enumerate(res.logits):                       # logits that chose new token i sit at position 2+i
        np.testing.assert_allclose(lg, full[2 + i], atol=1e-4, rtol=1e-4)


def test_context_overflow_and_bad_input(model):
    with pytest.raises(ContextLengthError, match="context window"):
        generate(model, list(range(1, 30)), 10)
    generate(model, list(range(1, 30)), 3, temperature=0.0)   # exactly 32 fits
    with pytest.raises(InputError):
        generate(model, [], 3)
    with pytest.raises(InputError, match="out of range"):
        generate(model, [1, 64], 3)
    with pytest.raises(InputError):
        generate(model, [1], -1)


def test_generate_batch_equals_one_at_a_time(model):
    # left padding + key mask: each row gives the ids generate() gives alone (RoPE depends on distances only)
    from llama_ref.generate import generate_batch
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 64, n)) for n in (3, 11, 6, 1)]
    got = generate_batch(model, prompts, 9, temperature=0.0, stop_at_eos=False)
    assert got == [generate(model, p, 9, temperature=0.0, stop_at_eos=False).ids for p in prompts]
    got = generate_batch(model, prompts, 9, temperature=1.0, top_p=0.9, seeds=[5, 6, 7, 8], stop_at_eos=False)
    assert got == [generate(model, p, 9, 1.0, None, 0.9, seed=s, stop_at_eos=False).ids
                   for p, s in zip(prompts, [5, 6, 7, 8])]
    eos = got[1][2]                                          # rows stop at their own EOS
    m = Llama(CFG.replace(eos_id=eos), model.weights)
    stopped = generate_batch(m, prompts, 9, temperature=1.0, top_p=0.9, seeds=[5, 6, 7, 8])
    assert stopped[1] == got[1][:got[1].index(eos) + 1]
    with pytest.raises(ContextLengthError):
        generate_batch(model, prompts, 30)
