"""Our NumPy forward against transformers' LlamaForCausalLM, tap by tap (fixtures from scripts/make_reference.py).

Tolerances. Both sides compute in float32 (unit roundoff 6e-8) with different matmul kernels and summation orders,
over dot products of 64-176 terms, a few layers deep. The measured worst case is ~3e-6 relative to each tensor's
largest value (logits: <= 3.3e-5 absolute on the `tied` config, whose logits reach 37, and < 1e-5 elsewhere).
  * logits: max abs error <= 1e-4; that is 3x the worst measured and still ~1e-5 of the
    logit range, far below anything that changes a prediction;
  * every other tap: max abs error <= 2e-5 x max|reference tensor| (7x the worst measured). A real bug
    (wrong RoPE pairs, a missing gain, a misplaced mask, a wrong kv head) gives errors of order 1e-1..1.
"""
import subprocess
import sys

import numpy as np
import pytest

from llama_ref import paths
from llama_ref.loader import read_checkpoint
from llama_ref.model import Llama
from llama_ref.inspect import compare, format_table
from llama_ref.trace import Trace
from conftest import MANIFEST

NAMES = list(MANIFEST["configs"])
LOGITS_ATOL = 1e-4
TAP_RTOL = 2e-5


def test_every_reference_config_is_there():
    cfgs = {n: c["hf_config"] for n, c in MANIFEST["configs"].items()}
    assert any(c["num_key_value_heads"] == c["num_attention_heads"] for c in cfgs.values())        # MHA
    assert any(c["num_key_value_heads"] < c["num_attention_heads"] for c in cfgs.values())         # GQA
    assert any(c["rope_theta"] != 10000.0 for c in cfgs.values())                                 # rope_theta
    assert {c["tie_word_embeddings"] for c in cfgs.values()} == {True, False}                     # tied, untied
    shapes = [c["tokens_shape"] for c in MANIFEST["configs"].values()]
    assert any(T % 2 for _, T in shapes) and any(B > 1 for B, _ in shapes)                         # odd T, batch
    kinds = {c.get("rope_parameters", {}).get("rope_type", "default") for c in cfgs.values()}
    assert {"linear", "dynamic", "llama3"} <= kinds                                                # RoPE scaling


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    config, weights = read_checkpoint(paths.REFERENCE_DIR / name)
    ref = dict(np.load(paths.REFERENCE_DIR / f"{name}.npz"))
    return name, Llama(config, weights), ref


def test_every_tap_matches_transformers(case):
    name, model, ref = case
    trace = Trace()
    logits = model.forward(ref["tokens"], trace=trace)
    rows = compare(trace, ref)
    table = format_table(rows)
    missing = [r["tap"] for r in rows if "missing" in r]
    assert not missing, f"{name}: taps on one side only or with other shapes: {missing}\n{table}"
    logit_err = np.abs(logits.astype(np.float64) - ref["logits"]).max()
    assert logit_err <= LOGITS_ATOL, f"{name}: logits max abs err {logit_err:.2e}\n{table}"
    bad = [r for r in rows if r["max_rel_err"] > TAP_RTOL]
    assert not bad, f"{name}: taps beyond {TAP_RTOL:.0e} of their scale:\n{format_table(bad)}\n\nall:\n{table}"
    assert all(t.dtype == np.float32 for t in trace.tensors.values()), "a tap left float32"


@pytest.mark.parametrize("name", ["mha", "gqa", "batch"])
def test_kv_cache_decode_matches_full_forward(name):
    """One token at a time through the KV cache gives our full-sequence logits, and so transformers' logits.

    Tolerance vs our own full forward: 1e-5 of the logit scale (max|logits| ~6.5 here, so ~6e-5 absolute).
    Decode multiplies (B, 1, C) rows where the full forward multiplies (B, T, C) blocks, so BLAS picks other
    kernels and summation orders; measured 5e-6..8.5e-6 absolute on these configs, too close to a flat 1e-5
    to survive another CPU. Mixing up cache positions or RoPE offsets gives errors of order 1.
    """
    config, weights = read_checkpoint(paths.REFERENCE_DIR / name)
    ref = np.load(paths.REFERENCE_DIR / f"{name}.npz")
    model, tokens = Llama(config, weights), ref["tokens"]
    full = model.forward(tokens)                                                  # (B, T, V)
    cache = model.new_cache(batch_size=tokens.shape[0])
    steps = np.concatenate([model.forward(tokens[:, t:t + 1], start_pos=t, cache=cache)
                            for t in range(tokens.shape[1])], axis=1)              # (B, T, V)
    assert steps.dtype == np.float32
    own_err = np.abs(steps - full).max()
    assert own_err <= 1e-5 * np.abs(full).max(), f"{name}: cache decode vs full forward max abs err {own_err:.2e}"
    assert np.abs(steps.astype(np.float64) - ref["logits"]).max() <= LOGITS_ATOL


def test_fixture_files_match_the_manifest():
    import hashlib
    for name, entry in MANIFEST["configs"].items():
        for f, digest in entry["sha256"].items():
            assert hashlib.sha256((paths.REFERENCE_DIR / f).read_bytes()).hexdigest() == digest, f"{f} changed"


def test_fixtures_regenerate():
    """With the [reference] extra: regenerating the fixtures with transformers gives the committed files."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    script = paths.REPO_DIR / "scripts" / "make_reference.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_embedded_model_matches_transformers_on_real_text():
    """The shipped model (data/models/tinyworld), run by transformers on two real texts (scripts/make_reference.py):
    logits, every layer's output, every attention map and the final norm. Same tolerances as above: the model is
    deeper (6 layers) and its activations larger than the random fixtures', so errors are taken relative to scale."""
    fixture = paths.REFERENCE_DIR / "tinyworld.npz"
    if not fixture.exists():
        pytest.skip("no embedded-model fixture yet: train the model (make model), then make reference")
    entry = MANIFEST["embedded_model"]
    import hashlib
    assert hashlib.sha256((paths.DEFAULT_MODEL / "model.safetensors").read_bytes()).hexdigest() == entry["model_sha256"], \
        "the embedded model changed since its fixture was written: run make reference"
    ref = dict(np.load(fixture))
    config, weights = read_checkpoint(paths.DEFAULT_MODEL)
    trace = Trace(*[k for k in ref if k != "tokens"])
    logits = Llama(config, weights).forward(ref["tokens"], trace=trace)
    rows = compare(trace, {k: v for k, v in ref.items() if k != "tokens"})
    assert len(rows) == len(ref) - 1 and not [r for r in rows if "missing" in r], format_table(rows)
    assert np.abs(logits.astype(np.float64) - ref["logits"]).max() <= LOGITS_ATOL
    bad = [r for r in rows if r["max_rel_err"] > TAP_RTOL]
    assert not bad, format_table(bad)
