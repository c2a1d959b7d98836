"""The benchmark helpers that decide what a user sees: the machine line, and llama.cpp crashes reported with the fix."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


FAKE_LLAMA_CPP = '''
import ctypes, os
class Llama:
    def __init__(self, model_path, **kw):
        self.path = model_path
    def eval(self, ids):
        if os.environ.get("FAKE_LLAMA_CPP") == "crash":
            ctypes.string_at(0)                      # a segmentation fault, as llama.cpp's AMX matmul gives
        self.scores = [[float(i), 1.0] for i in ids]
'''


@pytest.fixture
def fake_llama_cpp(tmp_path, monkeypatch):
    pkg = tmp_path / "fake" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_llamacpp_logits_come_back_from_the_child(fake_llama_cpp, monkeypatch):
    check = _load("llamacpp_check")
    monkeypatch.setenv("FAKE_LLAMA_CPP", "ok")
    np.testing.assert_array_equal(check.llamacpp_logits(fake_llama_cpp, [3, 5]), [[3, 1], [5, 1]])


def test_a_llamacpp_crash_is_reported_with_the_amx_fix(fake_llama_cpp, monkeypatch):
    check = _load("llamacpp_check")
    monkeypatch.setenv("FAKE_LLAMA_CPP", "crash")
    with pytest.raises(check.LlamaCppCrashed) as e:
        check.llamacpp_logits(fake_llama_cpp, [3, 5])
    msg = str(e.value)
    assert "SIGSEGV" in msg and "-DGGML_AMX_INT8=OFF" in msg and "--no-cache-dir" in msg and "m.gguf" in msg


def test_machine_line_names_cpu_simd_blas_and_threads():
    bench = _load("_bench")
    line = bench.machine_line(2)
    assert "2 threads" in line and "BLAS" in line
    assert any(s in line for s in ("AVX-512", "AVX2", "AVX", "SSE", "NEON", "SIMD unknown"))


@pytest.mark.parametrize("spec", ["0", "a,b", "", "1,-2", "1.5"])
def test_bad_thread_counts_exit_2_with_the_fix(spec, capsys, monkeypatch):
    bench = _load("_bench")
    with pytest.raises(SystemExit) as e:
        bench.pin_thread_counts(spec)
    assert e.value.code == 2 and "--threads 1,2" in capsys.readouterr().err


def test_thread_counts_pin_the_largest(monkeypatch):
    bench = _load("_bench")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    assert bench.pin_thread_counts("1,2") == [1, 2]
    import os
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"
