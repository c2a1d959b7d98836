"""Valid output and clean exits: strict JSON, a reader that stops reading (EPIPE), a full disk (ENOSPC), a closed
standard input, an endless one."""
import json
import os
import subprocess
import sys

import pytest

from llama_ref import paths
from llama_ref.checkpoint import save_model
from llama_ref.config import LlamaConfig
from conftest import REPO, assert_error, cli, random_weights

CFG = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=1024, max_seq_len=128)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("exits") / "m"
    save_model(d, CFG, random_weights(CFG, 0, scale=0.05), tokenizer_path=paths.DEFAULT_TOKENIZER)
    return d


def strict(text):
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_json_rates_over_no_tokens_are_null(model, n):
    r = cli("generate", "--model", model, "--prompt-ids", "1,2", "--max-new-tokens", n, "--json")
    assert r.returncode == 0, r.stderr
    out = strict(r.stdout)
    if n <= 1:                                                 # decode rate over 0 tokens (n=1: the first token is
        assert out["decode_tok_s"] is None                     # the prefill's)
    assert out["n_decode"] == max(0, n - 1)


def piped_into(head, argv, stdin=None):
    """Run the CLI with its stdout piped into `head ...`; returns (exit code, stderr)."""
    h = subprocess.Popen(head, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    p = subprocess.run([sys.executable, "-m", "llama_ref", *map(str, argv)], stdout=h.stdin, stderr=subprocess.PIPE,
                       input=None if stdin is None else stdin.encode(), cwd=REPO, timeout=120)
    h.stdin.close()
    h.wait()
    return p.returncode, p.stderr.decode()


@pytest.mark.parametrize("head, argv", [
    (["head", "-c", "5"], ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "48"]),
    (["head", "-n", "1"], ["tokenize", "--text", "Mia has a cat. " * 2000]),
    (["head", "-c", "1"], ["tokenize", "--json", "--text", "Mia has a cat. " * 2000]),
])
def test_a_reader_that_stops_reading_ends_the_command_quietly(head, argv):
    code, err = piped_into(head, argv)
    noise = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]   # the plan line
    assert code in (0, 141) and not noise, err                 # 141 = 128 + SIGPIPE, as Unix tools end


@pytest.mark.parametrize("argv", [["generate", "--prompt", "Once", "--max-new-tokens", "4"],
                                  ["tokenize", "--text", "Mia"],
                                  ["inspect", "--prompt-ids", "1", "--json"]])
def test_a_full_stdout_is_one_error_line(argv):
    with open("/dev/full", "wb") as full:
        p = subprocess.run([sys.executable, "-m", "llama_ref", *argv], stdout=full, stderr=subprocess.PIPE, cwd=REPO,
                           timeout=120)
    err = p.stderr.decode()
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert p.returncode == 2 and len(lines) == 1 and "No space left" in lines[0] and "Traceback" not in err, err


def test_a_closed_or_endless_stdin_is_an_error(model):
    for extra in ([], ["--format-only"]):
        p = subprocess.run([sys.executable, "-m", "llama_ref", "chat", "--model", str(model), *extra],
                           stdin=subprocess.DEVNULL, capture_output=True, cwd=REPO, timeout=120,
                           preexec_fn=lambda: os.close(0))
        assert_error(p, "standard input is closed")
        with open("/dev/zero", "rb") as zero:                  # 16 MiB read, then refused: no 6.7 GB, no hang
            p = subprocess.run([sys.executable, "-m", "llama_ref", "chat", "--model", str(model), *extra],
                               stdin=zero, capture_output=True, cwd=REPO, timeout=120)
        assert_error(p, "more than 16 MiB on standard input")
