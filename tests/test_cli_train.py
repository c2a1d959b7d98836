"""`python -m llama_ref train`: the embedded model's recipe end to end, a few steps, into a temp dir."""
import csv
import json

from llama_ref.loader import read_checkpoint
from conftest import assert_error, cli


def test_train_cli_writes_a_loadable_measured_model(tmp_path):
    out = tmp_path / "m"
    r = cli("train", "--out", out, "--steps", 3, "--batch-size", 2, "--seq-len", 32, "--tokens", 20000, "--warmup", 1,
            "--quick", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    config, weights = read_checkpoint(out)
    assert config.n_kv_heads < config.n_heads and config.max_seq_len >= 512        # GQA, long context
    m = json.loads((out / "metrics.json").read_text())
    for key in ("val_loss", "test_loss", "unigram_loss", "bigram_loss", "grammar_valid_share", "qa_accuracy",
                "params", "tokens_seen", "wall_time_s"):
        assert key in m, key
    assert m["params"] == config.n_params() and m["tokens_seen"] == 3 * 2 * 32
    rows = list(csv.DictReader(open(out / "loss_curve.csv")))
    assert [int(x["step"]) for x in rows] == [1, 2, 3]
    assert "parameters" in (out / "README.md").read_text()
    assert (out / "tokenizer.model").exists()


def test_train_cli_refuses_a_bad_learning_rate(tmp_path):
    assert_error(cli("train", "--out", tmp_path / "m", "--lr", -1, "--steps", 2, "--tokens", 5000, "--quick"),
                 "argument --lr: must be a number > 0")              # refused before the corpus is tokenized
    assert not (tmp_path / "m").exists()


def test_train_cli_refuses_an_out_whose_state_name_is_too_long(tmp_path):
    # a 250-byte --out is a valid name, but its <out>.train-state sibling is 262 bytes: refused before any work
    out = tmp_path / ("m" * 250)
    assert_error(cli("train", "--out", out, "--steps", 2, "--tokens", 5000, "--quick"), "<out>.train-state")
    assert list(tmp_path.iterdir()) == []
