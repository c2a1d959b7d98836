"""`python -m llama_ref inspect`: statistics and saved taps agree with transformers' (the fixtures), the .npz is
keyed by tap name with the tokens, written atomically, and bad input is a one-line error with exit code 2."""
import json

import numpy as np
import pytest

from llama_ref import paths
from llama_ref.config import LlamaConfig
from llama_ref.tokenizer import Tokenizer
from conftest import cli, random_weights  # noqa: E402

GQA = paths.REFERENCE_DIR / "gqa"
REF = dict(np.load(paths.REFERENCE_DIR / "gqa.npz"))
IDS = ",".join(str(t) for t in REF["tokens"][0])
TAP_RTOL = 2e-5        # float32 vs transformers, relative to each tensor's max (see tests/test_reference.py)


def test_saved_taps_are_transformers_taps(tmp_path):
    out = tmp_path / "ours.npz"
    r = cli("inspect", "--model", GQA, "--prompt-ids", IDS, "--tap", "layers.1.attn.*", "--tap", "logits", "--save", out)
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    want = ["layers.1.attn.q", "layers.1.attn.k", "layers.1.attn.v", "layers.1.attn.probs", "layers.1.attn.heads",
            "layers.1.attn.out", "logits"]
    assert sorted(z.files) == sorted(want + ["tokens"])
    np.testing.assert_array_equal(z["tokens"], REF["tokens"])
    for n in want:
        assert z[n].dtype == np.float32 and z[n].shape == REF[n].shape
        assert np.abs(z[n] - REF[n]).max() <= TAP_RTOL * np.abs(REF[n]).max(), n
    assert [p.name for p in tmp_path.iterdir()] == ["ours.npz"]        # no temp file left over
    for n in want:                                                     # the text table names each tap
        assert any(line.startswith(n + " ") for line in r.stdout.splitlines()), n


def test_json_statistics_match_the_fixture():
    r = cli("inspect", "--model", GQA, "--prompt-ids", IDS, "--tap", "*.ffn.hidden", "--tap", "norm.out", "--json",
            "--values", 3)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == REF["tokens"][0].tolist()
    assert list(out["taps"]) == ["layers.0.ffn.hidden", "layers.1.ffn.hidden", "norm.out"]
    for n, s in out["taps"].items():
        ref = REF[n].astype(np.float64)
        scale = np.abs(ref).max()
        assert s["shape"] == list(ref.shape) and s["dtype"] == "float32"
        for key, val in [("mean", ref.mean()), ("std", ref.std()), ("min", ref.min()), ("max", ref.max())]:
            assert abs(s[key] - val) <= TAP_RTOL * scale, (n, key)
        np.testing.assert_allclose(s["first"], ref.reshape(-1)[:3], atol=TAP_RTOL * scale)


def test_compare_with_the_fixture_file():
    r = cli("inspect", "--model", GQA, "--prompt-ids", IDS, "--tap", "layers.0.*", "--compare",
            paths.REFERENCE_DIR / "gqa.npz", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["compare"]
    assert len(rows) == 14 and all(row["tap"].startswith("layers.0.") for row in rows)
    assert all(row["max_rel_err"] <= TAP_RTOL for row in rows)
    r = cli("inspect", "--model", GQA, "--prompt-ids", "1,2,3", "--tap", "logits", "--compare", paths.REFERENCE_DIR / "gqa.npz")
    assert r.returncode == 2 and "same prompt" in r.stderr


def test_a_different_model_shows_up_in_the_comparison(tmp_path):
    """Compare the gqa model's taps with a file of the mha model: errors of order one, reported not hidden."""
    theirs = tmp_path / "mha.npz"
    assert cli("inspect", "--model", paths.REFERENCE_DIR / "mha", "--prompt-ids", IDS, "--tap", "logits",
               "--save", theirs).returncode == 0
    r = cli("inspect", "--model", GQA, "--prompt-ids", IDS, "--tap", "logits", "--compare", theirs, "--json")
    (row,) = json.loads(r.stdout)["compare"]
    assert row["max_abs_err"] > 0.1


@pytest.mark.parametrize("args, message", [
    (("--tap", "layer.0.*"), "matches no tap"),
    (("--tap", "layers.2.out"), "matches no tap"),            # gqa has 2 layers
    (("--prompt-ids", "1,999"), "out of range"),
    (("--prompt-ids", "1,x"), "comma-separated"),
    (("--prompt", "hello"), "--tokenizer"),                   # the fixture model has no tokenizer beside it
    (("--compare", "/nonexistent/ref.npz"), "does not exist"),
    (("--save", "/dev/null/dir/out.npz"), "not a directory"),             # a parent that is a file
    (("--save", "/proc/out.npz"), "cannot write"),
    (("--save", "/"), "is a directory"),
])
def test_errors_are_one_line(args, message):
    base = {"--prompt-ids": "1,2,3", "--tap": "logits"}
    extra = dict(zip(args[::2], args[1::2]))
    if "--prompt" in extra:
        base.pop("--prompt-ids")
    argv = [a for kv in {**base, **extra}.items() for a in kv]
    r = cli("inspect", "--model", GQA, *argv)
    assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "taps.npz"
    out.write_bytes(b"keep me")
    r = cli("inspect", "--model", GQA, "--prompt-ids", "1,2", "--tap", "logits", "--save", out)
    assert r.returncode == 2 and "--force" in r.stderr and out.read_bytes() == b"keep me"
    r = cli("inspect", "--model", GQA, "--prompt-ids", "1,2", "--tap", "logits", "--save", out, "--force")
    assert r.returncode == 0 and set(np.load(out).files) == {"logits", "tokens"}


def test_text_prompt_uses_the_tokenizer_beside_the_model(tmp_path):
    from llama_ref.checkpoint import save_model
    tok = Tokenizer(paths.DEFAULT_TOKENIZER)
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=64)
    save_model(tmp_path / "m", cfg, random_weights(cfg, 0, scale=1.0), tokenizer_path=paths.DEFAULT_TOKENIZER)
    r = cli("inspect", "--model", tmp_path / "m", "--prompt", "Once upon a time", "--tap", "embed", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == tok.encode("Once upon a time", bos=True)


def test_default_model():
    r = cli("inspect", "--prompt-ids", "1,2", "--tap", "logits", "--json")
    if (paths.DEFAULT_MODEL / "config.json").exists():
        assert r.returncode == 0 and json.loads(r.stdout)["taps"]["logits"]["shape"][:2] == [1, 2]
    else:                                  # not trained yet: a clear error, not a traceback
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_help():
    r = cli("inspect", "--help")
    assert r.returncode == 0 and "--tap" in r.stdout and "--save" in r.stdout and "tokens" in r.stdout
