"""What the benchmark scripts share: thread pinning, the reference import, median timing, the README tables.

Imported as `from _bench import ...` by `python benchmarks/<name>.py` (the script's folder is on sys.path).
It imports nothing heavy, so `pin_threads` can run before numpy or torch loads its BLAS.
"""
import os
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


def import_reference(script: str):
    """(torch, transformers), or exit with the install command: the [reference] extra is optional."""
    try:
        import torch
        import transformers
    except ImportError:
        sys.exit(f"benchmarks/{script} needs torch and transformers: `make reference-env` "
                 "(installs torch==2.13.0 first, then transformers)")
    return torch, transformers


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one warm-up call (allocations, thread pools)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    README.write_text(s)
    print(f"wrote the table into {README}")
