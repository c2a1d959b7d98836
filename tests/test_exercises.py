"""Every chapter ends with exercises, each followed by its solution: a collapsed code cell tagged `solution` that checks
itself with asserts. nbval runs the notebooks, so every solution runs and its output is compared (make test)."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))      # appendix A1 too


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_a_solution_that_checks_itself(path):
    cells = json.loads(path.read_text())["cells"]
    text = ["".join(c["source"]) for c in cells]
    heads = [i for i, t in enumerate(text) if cells[i]["cell_type"] == "markdown" and t.startswith("### Exercise ")]
    assert any(t.startswith("## Exercises") for t in text), f"{path.name}: no exercises section"
    assert 2 <= len(heads) <= 4, f"{path.name}: {len(heads)} exercises (2-4 per chapter)"
    numbers = [int(re.match(r"### Exercise (\d+)", text[i]).group(1)) for i in heads]
    assert numbers == list(range(1, len(heads) + 1)), f"{path.name}: exercises numbered {numbers}"
    for i in heads:
        sol = cells[i + 1]
        assert sol["cell_type"] == "code" and "solution" in sol["metadata"].get("tags", []), \
            f"{path.name}: exercise {text[i][:40]!r} is not followed by a solution cell"
        assert sol["metadata"].get("jupyter", {}).get("source_hidden"), f"{path.name}: solution not collapsed"
        assert "assert " in text[i + 1], f"{path.name}: the solution of {text[i][:40]!r} checks nothing"
        assert "nbval-ignore-output" not in sol["metadata"].get("tags", []) and "nbval-skip" not in \
            sol["metadata"].get("tags", []), f"{path.name}: a solution must run and be compared"
