"""Reference fixtures for sampling: transformers' logits warpers applied to random logits.

Writes data/reference/sampling.npz and data/reference/sampling_manifest.json. Uses torch + transformers
only (never llama_ref), so tests/test_generate.py can compare `llama_ref.generate.sampling_probs` with an
independent implementation of the same rules:

    TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> softmax

in the order transformers' `generate` chains them (generation/utils.py, `_get_logits_processor`), each
with min_tokens_to_keep=1. The npz holds
    logits            (N, V) float32   N random logit vectors (flat, peaked, with ties)
    settings          (G, 3) float64   the grid: temperature, top_k (0 = off), top_p (1 = off)
    probs             (G, N, V) float32 the distribution transformers samples from for setting g, row n

Run:  python scripts/make_reference_sampling.py          # (re)write the fixtures
      python scripts/make_reference_sampling.py --check  # recompute and compare with the stored files
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "data" / "reference"
NPZ = OUT_DIR / "sampling.npz"
MANIFEST = OUT_DIR / "sampling_manifest.json"
SEED = 1234
V = 1024                      # our tokenizer's vocabulary size
TEMPERATURES = (0.5, 1.0, 1.7)
TOP_KS = (0, 1, 5, 50)        # 0 = off
TOP_PS = (1.0, 0.3, 0.9, 0.99)  # 1 = off


def make_logits(seed: int = SEED) -> np.ndarray:
    """Logit vectors that exercise the rules: flat, peaked (one token holds most mass), heavy-tailed, tied values."""
    rng = np.random.default_rng(seed)
    rows = [
        rng.normal(0, 1, V),                       # flat-ish: top-p keeps many tokens
        rng.normal(0, 4, V),                       # peaked: top-p keeps few
        rng.standard_t(2, V) * 2,                  # heavy tails
        np.round(rng.normal(0, 2, V), 1),          # many exact ties (top-k keeps ties with the k-th value)
        np.concatenate([[12.0], rng.normal(0, 1, V - 1)]),   # one dominant token: top-p 0.3 keeps only it
        rng.normal(0, 1.5, V),
    ]
    return np.stack(rows).astype(np.float32)


def settings_grid() -> np.ndarray:
    return np.array([(t, k, p) for t in TEMPERATURES for k in TOP_KS for p in TOP_PS], dtype=np.float64)


def reference_probs(logits: np.ndarray, grid: np.ndarray) -> np.ndarray:
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = torch.from_numpy(logits)                       # (N, V) float32
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    out = []
    for t, k, p in grid:
        chain = LogitsProcessorList()
        if t != 1.0:
            chain.append(TemperatureLogitsWarper(float(t)))
        if k > 0:
            chain.append(TopKLogitsWarper(top_k=int(k), min_tokens_to_keep=1))
        if p < 1.0:
            chain.append(TopPLogitsWarper(top_p=float(p), min_tokens_to_keep=1))
        out.append(torch.softmax(chain(ids, scores.clone()), dim=-1).numpy())
    return np.stack(out).astype(np.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build() -> dict:
    logits = make_logits()
    grid = settings_grid()
    return {"logits": logits, "settings": grid, "probs": reference_probs(logits, grid)}


def write(arrays: dict) -> None:
    import torch
    import transformers
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = NPZ.with_name(NPZ.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, NPZ)
    manifest = {
        "generator": "scripts/make_reference_sampling.py",
        "generator_sha256": sha256(Path(__file__).resolve()),
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
        "seed": SEED, "vocab_size": V,
        "chain": "TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> softmax (min_tokens_to_keep=1)",
        "grid": {"temperature": TEMPERATURES, "top_k (0=off)": TOP_KS, "top_p (1=off)": TOP_PS},
        "files": {NPZ.name: sha256(NPZ)},
    }
    tmp = MANIFEST.with_name(MANIFEST.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, MANIFEST)
    print(f"wrote {NPZ} ({arrays['probs'].shape[0]} settings x {arrays['probs'].shape[1]} logit rows) and {MANIFEST}")


def check(arrays: dict) -> int:
    """Compare freshly computed fixtures with the stored ones; exit 1 on a difference.

    The set of kept tokens (probs > 0) must be identical; probabilities may differ by float32 rounding, because
    torch's vectorized exp differs between CPUs (AVX2 vs AVX-512): measured 2.4e-7 absolute, 6e-7 relative between
    two x86_64 machines, so allow 1e-5 relative (+1e-7 absolute)."""
    if not NPZ.exists():
        print(f"{NPZ} is missing: run without --check to write it", file=sys.stderr)
        return 1
    stored = np.load(NPZ)
    ok = True
    for name, a in arrays.items():
        b = stored[name]
        if a.shape != b.shape or not np.array_equal(a > 0, b > 0) or not np.allclose(a, b, rtol=1e-5, atol=1e-7):
            print(f"MISMATCH {name}: shapes {a.shape} vs {b.shape}", file=sys.stderr)
            ok = False
    manifest = json.loads(MANIFEST.read_text())
    if manifest["files"][NPZ.name] != sha256(NPZ):
        print(f"MISMATCH: {NPZ} sha256 differs from the manifest", file=sys.stderr)
        ok = False
    print("sampling fixtures: OK" if ok else "sampling fixtures: FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="recompute and compare with the stored fixtures")
    args = ap.parse_args(argv)
    arrays = build()
    if args.check:
        return check(arrays)
    write(arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
