"""Every numeric option of every command, generated from `__main__`'s argparse parser: hostile values end in one
`error:` line and exit 2 (argparse checks each option's range: __main__.Number), values in range run.

A new option is covered without anyone adding a case: the walk finds it. An option that takes numbers must use
Number (a test below fails otherwise), so its range is stated in --help and checked while parsing.
"""
import argparse
import json
import os

import pytest

from llama_ref.__main__ import Number, build_parser, main
from conftest import cli

HOSTILE = ["nan", "inf", "-inf", "-1", "0", "1e300", str(2 ** 70), "", "a"]


def numeric_options():
    """(command, flag, Number) for every option of every subcommand whose type is a Number."""
    out = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                for a in sub._actions:
                    if a.option_strings and isinstance(a.type, Number):
                        out.append((command, a.option_strings[0], a.type))
    return out


def test_every_option_that_takes_a_number_is_a_checked_number():
    """An option parsed with int or float (or a default that is a number) without Number would accept nan, -1..."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                for a in sub._actions:
                    numeric = a.type in (int, float) or (isinstance(a.default, (int, float))
                                                         and not isinstance(a.default, bool))
                    if a.option_strings and numeric:
                        assert isinstance(a.type, Number), f"{command} {a.option_strings[0]} is not a checked Number"
    assert len(numeric_options()) >= 20


def in_range(t: Number, text: str) -> bool:
    try:
        v = int(text) if t.kind is int else float(text)
    except ValueError:
        return False
    if t.kind is float and not (v == v and abs(v) != float("inf")):
        return False
    return not ((t.low is not None and v < t.low) or (t.high is not None and v > t.high)
                or (t.above is not None and not v > t.above))


@pytest.mark.parametrize("command, flag, t", numeric_options(), ids=lambda x: x if isinstance(x, str) else "")
def test_hostile_values_are_one_error_line_and_exit_2(command, flag, t, capsys):
    """The parser itself answers: exit 2, one `error:` line naming the option and its range, nothing else."""
    for value in HOSTILE:
        if in_range(t, value):
            continue
        with pytest.raises(SystemExit) as e:                   # --flag=-inf: argparse takes "-inf" for an option
            build_parser().parse_args([command, f"{flag}={value}"] + REQUIRED.get(command, []))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: argument {flag}: must be"), err
        assert t.help_range() in lines[0]


REQUIRED = {"generate": ["--prompt-ids", "1"], "inspect": ["--prompt-ids", "1"], "quantize": ["--scheme", "q8_0",
            "--out", "x"], "export": ["--format", "gguf-f32", "--out", "x"], "tokenize": ["--text", "x"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from llama_ref import paths
    from llama_ref.checkpoint import save_model
    from llama_ref.config import LlamaConfig
    from conftest import random_weights
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=1024, max_seq_len=64)
    d = tmp_path_factory.mktemp("opt") / "m"
    save_model(d, cfg, random_weights(cfg, 0, scale=0.05), tokenizer_path=paths.DEFAULT_TOKENIZER)
    return d


def base_args(command, model, out):
    """A quick, valid run of each command, the option under test appended (its value replaces any base value)."""
    return {"generate": ["--model", model, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--temperature", "0"],
            "inspect": ["--model", model, "--prompt-ids", "1,2", "--tap", "logits"],
            "chat": ["--model", model, "--max-new-tokens", "2", "--temperature", "0"],
            "export": ["--model", model, "--format", "qnn-onnx", "--parts", "1", "--out", out],
            "train": ["--out", out, "--steps", "2", "--batch-size", "1", "--seq-len", "16", "--tokens", "400",
                      "--eval-tokens", "64", "--samples", "1", "--qa", "1", "--warmup", "1", "--time-budget-min", "0.05"]
            }[command]


EDGE_RUNS = int(os.environ.get("LLAMA_REF_FUZZ_EXAMPLES", "60")) > 60      # make fuzz runs every in-range edge


@pytest.mark.parametrize("command, flag, t", numeric_options(), ids=lambda x: x if isinstance(x, str) else "")
def test_values_in_range_run_through_the_command(command, flag, t, model_dir, tmp_path):
    """In-range edge values (0, 1e300, 2^70 where allowed) run the command: exit 0, or exit 2 with one error line
    when the value asks for more than the model or the machine has (a context, a memory budget). `make fuzz` runs
    every such value; `make test` one per option."""
    values = [v for v in HOSTILE if in_range(t, v)] or []
    if not EDGE_RUNS:
        values = values[-1:]                                   # the largest: where limits bite
    if command == "export":
        pytest.importorskip("onnx")
    for value in values:
        args = base_args(command, model_dir, tmp_path / f"out{abs(hash(value))}")
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        stdin = json.dumps([{"role": "user", "content": "hi"}]) if command == "chat" else None
        r = cli(command, *args, f"{flag}={value}", stdin=stdin, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error")]
        assert "Traceback" not in r.stderr, f"{command} {flag} {value}: {r.stderr[-2000:]}"
        assert r.returncode == 0 or (r.returncode == 2 and len(lines) == 1), f"{flag} {value}: {r.stderr[-1500:]}"


def test_main_is_callable_with_an_error_exit(capsys):
    assert main(["generate", "--prompt-ids", "1", "--model", "/no/such/model"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
