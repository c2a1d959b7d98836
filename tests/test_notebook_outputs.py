"""The stored outputs of every chapter print only digits that hold on every CPU.

nbval compares each cell's output with the stored one character by character. float32 results differ in their last
digits between BLAS kernel families (OpenBLAS picks Haswell kernels on AVX2 CPUs, SkylakeX kernels on AVX-512 ones)
and between thread counts, so a chapter that prints `2.9e-07` passes on the author's CPU and fails on the reader's.
This lint reads the stored outputs (no kernel runs) and refuses numbers printed with more digits than float32
arithmetic guarantees:

  tiny        a number below 1e-5 in scientific notation with 2+ significant digits (`2.9e-07`): that is rounding
              noise; print the verdict against a stated tolerance instead (`within 1e-5: True`) or one digit (`3e-07`).
  sci3        scientific notation with 3+ significant digits (`2.52e-03`): a quantity computed through float32
              reductions keeps about 2 stable digits at that scale; print 2 (`2.5e-03`).
  digits5     a non-integer with 5+ significant digits (`0.431833`, `32.249`): float32 sums of a few hundred terms
              move the 5th-6th digit; round to 4 significant digits or fewer.

Cells tagged `nbval-ignore-output` (timings, hardware descriptions, widgets) are not compared by nbval and are skipped,
and the outputs are read after the replacements of notebooks/nbval_sanitize.cfg, as nbval compares them (a checks
table's measured column, `x.xe-yy <= tol`, is one of them).
Run the chapters under other kernel families with `make test-any-cpu`.
"""
import configparser
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# A number that stands alone: not part of a word, a version string (2.4.6) or a hex literal.
NUMBER = re.compile(r"(?<![\w.\-+])[-+]?(\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?)(?!\.\d)")


def significant_digits(mantissa: str) -> int:
    """Significant digits of a plain decimal string ('0.000517' -> 3, '32.249' -> 5, '1.000' -> 4)."""
    digits = mantissa.replace(",", "").replace(".", "").lstrip("0")
    return len(digits) if digits else 1


def violations(text: str):
    """(rule, number) for every number in `text` printed with more digits than float32 guarantees."""
    for m in NUMBER.finditer(text):
        s = m.group(1)
        if "e" in s or "E" in s:
            mantissa, exp = re.split("[eE]", s)
            sig = significant_digits(mantissa)
            value = float(s)
            if value != 0 and abs(value) < 1e-5 and "." in mantissa and sig >= 2:
                yield "tiny", s
            elif "." in mantissa and sig >= 3:
                yield "sci3", s
        elif "." in s and s.split(".")[1].strip("0") and significant_digits(s) >= 5:   # 2048.0 is an integer
            yield "digits5", s


FIX = {
    "tiny": "print the verdict against a stated tolerance (e.g. `within 1e-5: True`) or at most one digit (`3e-07`)",
    "sci3": "print 2 significant digits (`{x:.1e}`)",
    "digits5": "round to 4 significant digits or fewer (`{x:.4g}`, `{x:.3f}` for values below 10)",
}


def sanitizers(cfg=REPO / "notebooks" / "nbval_sanitize.cfg"):
    """The (regex, replacement) pairs nbval applies to every output before comparing (--sanitize-with)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(cfg)
    return [(re.compile(parser[s]["regex"]), parser[s]["replace"]) for s in parser.sections()]


SANITIZERS = sanitizers()


def sanitize(text: str) -> str:
    for regex, replacement in SANITIZERS:
        text = regex.sub(replacement, text)
    return text


def stored_outputs(path):
    """(cell index, text) of every compared output of a notebook, stream text and text/plain results, as nbval
    compares them (sanitized)."""
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code" or "nbval-ignore-output" in cell.get("metadata", {}).get("tags", []):
            continue
        src = "".join(cell["source"])
        if "# NBVAL_IGNORE_OUTPUT" in src:
            continue
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                yield i, sanitize("".join(out["text"]))
            elif "text/plain" in out.get("data", {}):
                yield i, sanitize("".join(out["data"]["text/plain"]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_print_only_stable_digits(path):
    problems = []
    for cell, text in stored_outputs(path):
        for line in text.splitlines():
            for rule, number in violations(line):
                problems.append(f"{path.name} cell {cell}: {number!r} ({rule}) in {line.strip()[:90]!r}\n"
                                f"    fix: {FIX[rule]}")
    assert not problems, ("stored outputs print digits that differ between CPUs (nbval will fail on other "
                          "machines):\n" + "\n".join(problems))


@pytest.mark.parametrize("text, rules", [
    ("max relative difference to the model's gate projection: 2.9e-07", ["tiny"]),
    ("integer path 0.431998   dequantized floats 0.431833", ["digits5", "digits5"]),
    ("KL from float32: Q8_0 weights 6.28e-04; integer path 2.52e-03", ["sci3", "sci3"]),
    ("min   32.249   max  73.233", ["digits5", "digits5"]),
    ("within 1e-5: True; error 3e-07; KL 2.5e-03; p 0.000517; 1,024 pieces; numpy 2.4.6; 0x4A", []),
    ("5,246,208 parameters, 2400 steps, 0.4056 nats, 175.5x", []),
])
def test_the_rules(text, rules):
    assert [r for r, _ in violations(text)] == rules


def test_a_checks_table_measured_column_is_sanitized():
    line = "cached decode vs one full forward    8.4e-06 <=  1e-05 rel   gemv and gemm sum in other orders"
    assert "8.4e-06" not in sanitize(line) and "1e-05 rel" in sanitize(line) and not list(violations(sanitize(line)))
