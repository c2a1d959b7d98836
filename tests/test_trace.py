"""trace.py: tap names, comparing with a reference file, the residual stream, the logit lens, patching, saving.

Independent checks: the logit lens of block i must equal the logits of a model truncated after block i, and the
lens computed from transformers' own hidden states (fixtures) must give transformers' logits; an ablated head
must equal the same model with that head's o_proj columns zeroed.
"""
import os

import numpy as np
import pytest

from llama_ref import paths
from llama_ref.loader import read_checkpoint
from llama_ref.config import LlamaConfig
from llama_ref.errors import InputError, OutputError
from llama_ref.model import Llama
from llama_ref.weights import weight_shapes
from llama_ref.inspect import (ablate_heads, compare, compare_table, format_table, forward_patched, load_reference,
                               logit_lens, residual_stream, save_npz, summarize)
from llama_ref.trace import Trace, match_taps, tap_names
from conftest import random_weights  # noqa: E402

CFG = LlamaConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=50, max_seq_len=32)
GQA = paths.REFERENCE_DIR / "gqa"
LOGITS_ATOL = 1e-4     # float32 against transformers: see tests/test_reference.py for why




@pytest.fixture(scope="module")
def model():
    return Llama(CFG, random_weights(CFG))


@pytest.fixture(scope="module")
def gqa():
    config, weights = read_checkpoint(GQA)
    return Llama(config, weights), dict(np.load(paths.REFERENCE_DIR / "gqa.npz"))


TOKENS = np.array([[1, 7, 3, 9, 22, 4, 4, 31, 2]])


# ------------------------------------------------------------------------------------------------
# names

def test_tap_names_are_what_the_forward_records(model, gqa):
    for m, tokens in ((model, TOKENS), (gqa[0], gqa[1]["tokens"])):
        trace = Trace()
        m.forward(tokens, trace=trace)
        assert tap_names(m.config) == trace.names()          # same names, same (forward) order


def test_fixture_files_use_the_same_names(gqa):
    m, ref = gqa
    assert set(tap_names(m.config)) == set(ref) - {"tokens"}


def test_match_taps(model):
    assert match_taps(CFG, ["logits"]) == ["logits"]
    assert match_taps(CFG, ["layers.1.attn.*"]) == [f"layers.1.attn.{n}" for n in
                                                       ("q", "k", "v", "probs", "heads", "out")]
    assert len(match_taps(CFG, ["*.probs", "embed"])) == CFG.n_layers + 1
    with pytest.raises(InputError, match="matches no tap"):
        match_taps(CFG, ["logits", "layer.0.*"])               # one good pattern does not hide a typo
    with pytest.raises(InputError, match="matches no tap"):
        match_taps(CFG, ["layers.3.out"])                       # layer 3 does not exist in a 3-layer model


# ------------------------------------------------------------------------------------------------
# comparing with a reference

def test_compare_accepts_a_path_and_matches_transformers(gqa):
    m, ref = gqa
    trace = Trace()
    m.forward(ref["tokens"], trace=trace)
    by_path = compare(trace, paths.REFERENCE_DIR / "gqa.npz")
    by_str = compare(trace, str(paths.REFERENCE_DIR / "gqa.npz"))
    by_map = compare(trace, ref)
    assert by_path == by_str == by_map
    assert [r["tap"] for r in by_path] == tap_names(m.config)
    logits = next(r for r in by_path if r["tap"] == "logits")
    assert logits["max_abs_err"] <= LOGITS_ATOL
    table = compare_table(trace, paths.REFERENCE_DIR / "gqa.npz")
    assert table == format_table(by_map) and all(n in table for n in tap_names(m.config))


def test_compare_flags_missing_and_wrong_taps(gqa):
    m, ref = gqa
    trace = Trace("layers.0.*")
    m.forward(ref["tokens"], trace=trace)
    rows = {r["tap"]: r for r in compare(trace, ref)}
    assert rows["logits"]["missing"] == "ours" and rows["logits"]["max_abs_err"] == np.inf
    bad = dict(ref)
    bad["layers.0.attn.q"] = bad["layers.0.attn.q"] + 0.5
    rows = {r["tap"]: r for r in compare(trace, bad)}
    assert rows["layers.0.attn.q"]["max_abs_err"] == pytest.approx(0.5, abs=1e-5)
    del bad["layers.0.out"]
    assert {r["tap"]: r for r in compare(trace, bad)}["layers.0.out"]["missing"] == "reference"


def test_load_reference_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_reference(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="not an .npz file"):
        load_reference(junk)
    with pytest.raises(InputError, match="is a directory"):
        load_reference(tmp_path)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(InputError, match="single .npy array"):
        load_reference(tmp_path / "one.npy")
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InputError, match="dtype object; only numbers"):
        load_reference(pickled)


# ------------------------------------------------------------------------------------------------
# residual stream and logit lens

def test_residual_stream(model):
    trace = Trace("embed", "layers.*.out")
    model.forward(TOKENS, trace=trace)
    names, x = residual_stream(trace)
    assert names == ["embed", "layers.0.out", "layers.1.out", "layers.2.out"]
    assert x.shape == (CFG.n_layers + 1, 1, TOKENS.shape[1], CFG.dim)
    np.testing.assert_array_equal(x[2], trace["layers.1.out"])
    with pytest.raises(InputError, match="residual-stream"):
        residual_stream(Trace("logits"))


def test_logit_lens_equals_truncated_models():
    """Lens row i+1 == the logits of the same weights with only blocks 0..i (an independent forward)."""
    w = random_weights(CFG, seed=3)
    full = Llama(CFG, w)
    trace = Trace("embed", "layers.*.out")
    logits = full.forward(TOKENS, trace=trace)
    names, lens = logit_lens(full, trace)
    assert lens.shape == (CFG.n_layers + 1, 1, TOKENS.shape[1], CFG.vocab_size) and lens.dtype == np.float32
    np.testing.assert_array_equal(lens[-1], logits)
    for n in range(1, CFG.n_layers):
        cfg = CFG.replace(n_layers=n)
        part = Llama(cfg, {k: v for k, v in w.items() if k in weight_shapes(cfg)})
        np.testing.assert_allclose(lens[n], part.forward(TOKENS), atol=1e-5 * np.abs(lens[n]).max())
    # row 0: the embedding straight into the classifier, by hand in float64
    e = w["model.embed_tokens.weight"][TOKENS].astype(np.float64)
    by_hand = e / np.sqrt((e ** 2).mean(-1, keepdims=True) + CFG.norm_eps) * w["model.norm.weight"] \
        @ w["lm_head.weight"].T.astype(np.float64)
    np.testing.assert_allclose(lens[0], by_hand, atol=1e-5 * np.abs(by_hand).max())


def test_logit_lens_on_transformers_hidden_states(gqa):
    """Fed transformers' own residual stream (fixture taps), the lens's last row gives transformers' logits."""
    m, ref = gqa
    names, lens = logit_lens(m, ref)
    assert names[-1] == f"layers.{m.config.n_layers - 1}.out"
    assert np.abs(lens[-1] - ref["logits"]).max() <= LOGITS_ATOL


# ------------------------------------------------------------------------------------------------
# patching and ablation

def test_ablating_a_head_equals_zeroing_its_output_projection():
    w = random_weights(CFG, seed=4)
    layer, head, hs = 1, 2, CFG.head_dim
    logits, trace = forward_patched(Llama(CFG, w), TOKENS, ablate_heads(layer, head), "layers.1.attn.heads")
    assert np.all(trace["layers.1.attn.heads"][:, head] == 0)
    assert np.any(trace["layers.1.attn.heads"][:, head - 1] != 0)
    w2 = dict(w)
    name = f"model.layers.{layer}.self_attn.o_proj.weight"
    w2[name] = w[name].copy()
    w2[name][:, head * hs:(head + 1) * hs] = 0.0           # the head's columns of o_proj: its whole contribution
    np.testing.assert_allclose(logits, Llama(CFG, w2).forward(TOKENS), atol=1e-5 * np.abs(logits).max())
    assert np.abs(logits - Llama(CFG, w).forward(TOKENS)).max() > 1e-3     # and it did change something


def test_patches_that_never_run_or_point_nowhere_are_errors(model):
    with pytest.raises(InputError, match="never ran"):
        forward_patched(model, TOKENS, {"layers.7.attn.heads": lambda x: x})
    with pytest.raises(InputError, match="never ran"):
        forward_patched(model, TOKENS, {"layers.0.attn.head": lambda x: x})   # typo
    with pytest.raises(InputError, match="heads 0..3"):
        forward_patched(model, TOKENS, ablate_heads(0, [1, 4]))
    trace = Trace(patches={"layers.0.ffn.out": lambda x: x * 0})
    model.forward(TOKENS, trace=trace)
    assert trace.unused_patches() == [] and np.all(trace["layers.0.ffn.out"] == 0)


def test_patch_splices_an_activation_from_another_run(model):
    """Activation patching: the residual stream of run A put into run B after block 1 gives A's logits."""
    a, b = TOKENS, TOKENS[:, ::-1].copy()
    ta = Trace("layers.1.out")
    la = model.forward(a, trace=ta)
    lb, _ = forward_patched(model, b, {"layers.1.out": lambda x: ta["layers.1.out"].copy()})
    np.testing.assert_array_equal(lb, la)


# ------------------------------------------------------------------------------------------------
# summaries and atomic saving

def test_summarize():
    s = summarize(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), n_values=3)
    assert s["shape"] == [2, 2] and s["dtype"] == "float32" and s["first"] == [1.0, 2.0, 3.0]
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(np.sqrt(1.25)) and s["min"] == 1.0 and s["max"] == 4.0


def test_save_npz_round_trip_and_atomic(tmp_path, monkeypatch):
    out = tmp_path / "taps.npz"
    arrays = {"layers.0.attn.q": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "tokens": np.array([[1, 2]])}
    save_npz(out, arrays)
    back = load_reference(out)
    assert set(back) == set(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    before = out.read_bytes()

    def boom(f, **kw):
        f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OutputError, match="disk full"):
        save_npz(out, {"x": np.zeros(3)}, force=True)
    assert out.read_bytes() == before                       # the old file is untouched
    assert os.listdir(tmp_path) == ["taps.npz"]             # and no temp file is left behind
    monkeypatch.undo()
    save_npz(tmp_path / "new" / "dir.npz", arrays)          # missing parents are created, as for every output
    assert load_reference(tmp_path / "new" / "dir.npz").keys() == arrays.keys()
    with pytest.raises(OutputError, match="is a directory"):
        save_npz(tmp_path / "new", arrays)


def test_checks_table_passes_fails_loudly_and_names_the_failure():
    from llama_ref.inspect import Checks
    c = Checks("section 1")
    assert c.close("a vs b", np.ones(3) * (1 + 1e-7), np.ones(3), 1e-5, "float32 rounding", relative=True)
    assert c.exact("lookup", np.arange(3), np.arange(3), "no arithmetic")
    assert c.differs("the bug shows", np.full(3, 9.0), np.zeros(3), 1.0, "a real mistake is of order one")
    c.report()                                                        # all pass: no exception
    table = c.table()
    assert "3 of 3 checks passed" in table and "1e-05 rel" in table and "0 (exact)" in table
    assert not c.close("shapes differ", np.ones(3), np.ones(4), 1e-5, "x")
    assert not c.add("nan never passes", float("nan"), 1.0, "x")
    assert not c.differs("a bug that does not show", np.zeros(3), np.zeros(3), 1.0, "x")
    assert not c.exact("not bitwise", np.ones(2), np.ones(2) + 1e-9, "x")
    with pytest.raises(AssertionError, match="shapes differ"):
        c.report()
    assert "FAILED" in c.table() and len(c.failed) == 4
