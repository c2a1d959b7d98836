"""Run the chapters under nbval with OpenBLAS's other kernel families and thread counts (`make test-any-cpu`).

float32 results differ in their last digits between BLAS kernels: OpenBLAS picks `Haswell` kernels on AVX2 CPUs (AMD
Zen, older Intel) and `SkylakeX` kernels on AVX-512 Intel CPUs, and results also move with the thread count. The
stored outputs of every chapter must not depend on that, so this runs `pytest --nbval notebooks/` once per setting of
OPENBLAS_CORETYPE x OPENBLAS_NUM_THREADS and prints a table of the results.

SkylakeX kernels need AVX-512: on a CPU without it they die of an illegal instruction, so that family is replaced by
`Sandybridge` (AVX without FMA, which every x86-64 CPU of the last decade runs): different kernels, different rounding,
the same kind of test. The substitution is printed. The default `make test` never sets these variables.

    python scripts/test_any_cpu.py [--coretypes Haswell SkylakeX] [--threads 1 2] [--notebooks NB.ipynb ...]
                                   [-- extra pytest args]
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NBVAL = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", "notebooks/nbval_sanitize.cfg"]


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable(coretype: str, flags: set[str]) -> str:
    """The kernel family to run for `coretype` on this CPU (SkylakeX needs AVX-512F)."""
    if coretype.lower() == "skylakex" and "avx512f" not in flags:
        return "Sandybridge"
    return coretype


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coretypes", nargs="+", default=["Haswell", "SkylakeX"], help="OPENBLAS_CORETYPE values")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="OPENBLAS_NUM_THREADS values")
    ap.add_argument("--notebooks", nargs="+", default=["notebooks"],
                    help="the chapters to run (default: every one in notebooks/)")
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = ap.parse_args(argv)
    flags = cpu_flags()
    results = []
    for requested in args.coretypes:
        coretype = runnable(requested, flags)
        if coretype != requested:
            print(f"note: this CPU has no AVX-512, so {requested} kernels cannot run here; using {coretype} instead")
        for threads in args.threads:
            env = dict(os.environ, OPENBLAS_CORETYPE=coretype, OPENBLAS_NUM_THREADS=str(threads),
                       OMP_NUM_THREADS=str(threads))
            cmd = [sys.executable, "-m", "pytest", *args.notebooks, *NBVAL, "-q", "-p", "no:cacheprovider",
                   *args.pytest_args]
            print(f"\n=== OPENBLAS_CORETYPE={coretype} OPENBLAS_NUM_THREADS={threads}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, cwd=REPO, env=env)
            results.append((coretype, threads, rc, time.perf_counter() - t0))
    print("\n| OPENBLAS_CORETYPE | threads | nbval | time |\n|---|---:|---|---:|")
    for coretype, threads, rc, seconds in results:
        print(f"| {coretype} | {threads} | {'passed' if rc == 0 else f'FAILED (exit {rc})'} | {seconds:.0f} s |")
    return 0 if all(rc == 0 for _, _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
