"""What the benchmark scripts share: thread pinning, the reference import, median timing, the machine line, the
README tables.

Imported as `from _bench import ...` by `python benchmarks/<name>.py` (the script's folder is on sys.path).
It imports nothing heavy, so `pin_threads` can run before numpy or torch loads its BLAS.
"""
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def pin_threads(n: int) -> None:
    """Same thread count for every BLAS/OpenMP library; must run before numpy or torch is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def pin_thread_counts(spec: str) -> list[int]:
    """The thread counts of a `--threads 1,2` option, with every library pinned to the largest (pin_threads): call it
    before numpy or torch is imported. Anything but comma-separated positive integers exits with status 2."""
    try:
        threads = [int(t) for t in spec.split(",")]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        print(f"error: --threads {spec!r}: give comma-separated positive thread counts, e.g. --threads 1,2",
              file=sys.stderr)
        sys.exit(2)
    pin_threads(max(threads))
    return threads


def import_reference(script: str):
    """(torch, transformers), or exit with the install command: the [reference] extra is optional."""
    try:
        import torch
        import transformers
    except ImportError:
        sys.exit(f"benchmarks/{script} needs torch and transformers: `make reference-env` "
                 "(installs torch==2.13.0 first, then transformers)")
    return torch, transformers


def runnable_coretype(coretype: str) -> str:
    """The OpenBLAS kernel family to run for `coretype` here: SkylakeX needs AVX-512F, and on a CPU without it
    Sandybridge (AVX, no FMA) stands in, as scripts/test_any_cpu.py does."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return coretype
    return "Sandybridge" if coretype.lower() == "skylakex" and "avx512f" not in text else coretype


def per_kernel_family(script: str, argv: list[str], coretypes: str) -> list[dict]:
    """Run a benchmark script once per OpenBLAS kernel family, each in a child process with OPENBLAS_CORETYPE set
    before NumPy loads (`--child REQUESTED` appended to its arguments), and return what each child printed as JSON on
    its last line, plus "requested" and "coretype" (runnable_coretype: Sandybridge where SkylakeX cannot run)."""
    import json
    import subprocess
    results = []
    for requested in coretypes.split(","):
        coretype = runnable_coretype(requested)
        env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
        cmd = [sys.executable, script, *[a for a in argv if a != "--readme"], "--child", requested]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"the {coretype} run of {Path(script).name} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({**result, "requested": requested, "coretype": coretype})
    return results


def kernel_label(result: dict) -> str:
    """'Haswell', or 'Sandybridge (for SkylakeX)' where one family stood in for another."""
    return result["coretype"] + (f" (for {result['requested']})" if result["coretype"] != result["requested"] else "")


def substitution_note(results: list[dict]) -> str:
    """The sentence a table needs when a kernel family could not run on this CPU ('' when none)."""
    subst = [r for r in results if r["coretype"] != r["requested"]]
    if not subst:
        return ""
    return (f"This CPU has no AVX-512: OpenBLAS's {subst[0]['requested']} kernels cannot run here, so "
            f"{subst[0]['coretype']} kernels (AVX, no FMA) stand in for them; PyTorch and llama.cpp use their own "
            "kernels in every row.")


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one warm-up call (allocations, thread pools)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's marketing name ('AMD EPYC 7B13', 'Intel(R) Xeon(R) Platinum 8481C'), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_level() -> str:
    """The widest vector instructions the CPU has: what decides which BLAS kernels run (AMX noted where present)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = set(next(l for l in text.splitlines() if l.startswith(("flags", "Features"))).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "SIMD unknown"
    level = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags
             else "NEON" if {"asimd", "neon"} & flags else "SSE" if "sse2" in flags else "SIMD unknown")
    return level + (" + AMX" if "amx_tile" in flags else "")


def blas_libraries() -> str:
    """Every BLAS loaded in this process with its kernel family (threadpoolctl), e.g. 'openblas 0.3.31 Haswell'."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS unknown (pip install threadpoolctl)"
    libs = [f"{d['internal_api']} {d.get('version') or ''} {d.get('architecture') or ''}".replace("  ", " ").strip()
            for d in threadpool_info() if d["user_api"] == "blas"]
    return ", ".join(dict.fromkeys(libs)) or "no BLAS loaded"


def machine_line(threads) -> str:
    """CPU model, SIMD level, BLAS library and kernel family, threads: the line every benchmark table carries.
    Call it after numpy (and torch) are imported, so their BLAS libraries are loaded."""
    return (f"{cpu_model()}, {simd_level()}, {os.cpu_count()} cores; BLAS: {blas_libraries()}; "
            f"{threads} threads; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")


def write_readme_block(name: str, text: str, anchor: str | None = None, after: bool = True) -> None:
    """Put `text` between README.md's <!-- NAME --> and <!-- /NAME --> markers; a README without them gets the
    block next to `anchor` (after it, or before it with after=False)."""
    s = README.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{text}\n{end}"
    if start in s:
        s = re.sub(re.escape(start) + ".*" + re.escape(end), lambda m: block, s, flags=re.S)
    elif anchor is not None:
        s = s.replace(anchor, f"{anchor}\n\n{block}" if after else f"{block}\n\n{anchor}")
    from llama_ref.output import write_text        # here, not at the top: importing it loads numpy (see pin_threads)
    write_text(README, s, force=True)               # the one output policy: atomic, the file's mode kept
    print(f"wrote the table into {README}")
