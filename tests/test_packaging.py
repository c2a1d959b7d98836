"""The project's plumbing: pyproject and environment.yml agree, CI runs the README's test command, no torch in the package."""
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _pyproject_pins():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = list(data["project"]["dependencies"])
    for extra in ("dev", "lab", "onnx"):
        reqs += data["project"]["optional-dependencies"][extra]
    pins = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][^ ;]*)", r.strip())
        assert m, f"pyproject requirement {r!r} is not an exact pin"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def _environment_pins():
    pins = {}
    for line in (REPO / "environment.yml").read_text().splitlines():
        m = re.fullmatch(r"\s*-\s*([A-Za-z0-9_.\-]+)\s*(==|=)\s*([0-9][^\s#]*)\s*(#.*)?", line)
        if m and m.group(1).lower() != "python":
            pins[m.group(1).lower()] = m.group(3)
    return pins


def test_environment_yml_matches_pyproject():
    assert _environment_pins() == _pyproject_pins()


def test_environment_installs_the_package_itself():
    assert re.search(r"^\s*-\s*-e \.\s*$", (REPO / "environment.yml").read_text(), re.M)


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make test$", ci, re.M)
    assert "make test" in readme and "make lab" in readme and "environment.yml" in readme


def test_no_torch_in_the_package():
    for f in (REPO / "llama_ref").glob("*.py"):
        src = f.read_text()
        assert not re.search(r"^\s*(import torch|from torch)", src, re.M), f"{f.name} imports torch"
        assert not re.search(r"^\s*(import transformers|from transformers)", src, re.M), f"{f.name} imports transformers"


def test_every_module_opens_with_a_docstring():
    for f in (REPO / "llama_ref").glob("*.py"):
        assert f.read_text().lstrip().startswith('"""'), f"{f.name} lacks its opening docstring"


def _package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside functions (relative or absolute)."""
    import ast
    graph = {}
    for f in (REPO / "llama_ref").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llama_ref."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("llama_ref."))
        graph[f.stem] = deps - {f.stem}
    return graph


def test_no_import_cycles_in_the_package():
    graph = _package_imports()

    def reaches(a, b, seen):
        return any(n == b or (n not in seen and not seen.add(n) and reaches(n, b, seen)) for n in graph.get(a, ()))
    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a, set())})
    assert not cycles, f"import cycles in llama_ref: {cycles}"


def _reachable(graph, a, seen=None) -> set:
    """Every module `a` imports, directly or through others."""
    seen = set() if seen is None else seen
    for n in graph.get(a, ()):
        if n not in seen:
            seen.add(n)
            _reachable(graph, n, seen)
    return seen


def test_generate_does_not_import_the_loader():
    """Generation needs a model and the memory plan, not the file formats: memory.py holds the plan for both."""
    graph = _package_imports()
    assert "loader" not in _reachable(graph, "generate")


FORMATS = ("safetensors", "checkpoint", "llama2c", "gguf_io", "quant", "synthetic", "weights", "matrices")


def test_no_format_imports_the_model():
    """The formats on disk (and the name table and stored matrices they share) sit below the model: facts about
    layouts (the q/k row order, names) live in weights.py, so no reader or writer needs model.py, even indirectly."""
    graph = _package_imports()
    for fmt in FORMATS:
        assert fmt in graph, f"{fmt}.py is gone: update FORMATS"
        assert "model" not in _reachable(graph, fmt), f"{fmt}.py imports model.py (directly or through another module)"


def test_the_module_map_names_every_module():
    """DEVELOPING.md's module map matches the tree: every module of the package has its row, and no row names a module
    that is gone (a reader finds every concept in the module named after it)."""
    text = (REPO / "DEVELOPING.md").read_text()
    table = text[text.index("### Module map"):]
    table = table[:table.index("\n\n")]
    named = set(re.findall(r"`(\w+)\.py`", table))
    modules = {f.stem for f in (REPO / "llama_ref").glob("*.py")} - {"__init__"}
    assert not modules - named, f"modules missing from DEVELOPING.md's module map: {sorted(modules - named)}"
    assert not named - modules, f"DEVELOPING.md's module map names modules that are gone: {sorted(named - modules)}"
