"""Looking at taps: compare them with a reference, read the residual stream through the logit lens, ablate heads,
summarize and save them.

Chapter 00 compares every tap with transformers'; chapter 05 reads the logit lens and ablates a head; every chapter
prints its numerical checks (a measured error, a tolerance and why) as one table per section with `Checks`;
`python -m llama_ref inspect` prints and saves taps for someone comparing another engine with this one. The taps
themselves are recorded by trace.py (Trace, tap, tap names); the .npz writer is output.save_npz.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping

import numpy as np

from .errors import InputError
from .inputs import NpzArchive, regular_file
from .output import save_npz  # noqa: F401  (taps are saved with the package's one atomic writer)
from .trace import Trace


# ------------------------------------------------------------------------------------------------
# Ablation: patch a tap while the forward runs

def ablate_heads(layer: int, heads: list[int] | int) -> dict[str, Callable]:
    """A patch that zeroes the output of the given heads in one layer (pass as Trace(patches=...)).

    Zeroing `attn.heads` (before o_proj) removes exactly that head's contribution to the residual stream.
    """
    heads = [heads] if isinstance(heads, (int, np.integer)) else list(heads)

    def zero(x):  # x: (B, nh, T, hs)
        bad = [h for h in heads if not 0 <= h < x.shape[1]]
        if bad:
            raise InputError(f"cannot ablate head(s) {bad} of layer {layer}: the model has heads 0..{x.shape[1] - 1}")
        x[:, heads] = 0.0
        return x
    return {f"layers.{layer}.attn.heads": zero}


def forward_patched(model, tokens, patches: dict[str, Callable], *patterns: str, start_pos=0):
    """model.forward(tokens) with patches applied; returns (logits, trace recording `patterns`).

    Raises InputError if a patch named a tap the forward never reached, so an ablation can never silently do
    nothing. With no patterns, nothing is recorded.
    """
    trace = Trace(*(patterns or ("",)), patches=patches)    # "" matches no tap name: patch, record nothing
    logits = model.forward(tokens, start_pos=start_pos, trace=trace)
    unused = trace.unused_patches()
    if unused:
        raise InputError(f"patch(es) for {unused} never ran: no such tap in this model; tap names are listed by "
                         "trace.tap_names(model.config)")
    return logits, trace



# ------------------------------------------------------------------------------------------------
# Comparing with a reference

def load_reference(reference: str | os.PathLike | Mapping) -> Mapping:
    """A reference as a mapping name -> array: an .npz path (ours, `inspect --save`, or another engine's) or a mapping.

    An .npz is an inputs.NpzArchive: every member's name, dtype and shape is checked from the archive's headers
    first (numbers only; a claimed size must match the member's bytes), and an array is read only when asked for."""
    if isinstance(reference, Mapping) or hasattr(reference, "files"):
        return reference
    if isinstance(reference, bytes) or not isinstance(reference, (str, os.PathLike)):
        raise InputError(f"reference must be an .npz path or a mapping of tap name -> array, not "
                         f"{type(reference).__name__}")
    path = regular_file(reference, "reference .npz", InputError)
    how = "give an .npz written by np.savez with tap names as keys (e.g. by `python -m llama_ref inspect --save`)"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":                                  # an .npz is a zip archive of .npy files
        what = "a single .npy array" if magic == b"\x93NUM" else "not an .npz file (an .npz is a zip of .npy arrays)"
        raise InputError(f"reference {path} is {what}; {how}")
    return NpzArchive(path, InputError)


def compare(trace: Trace | dict, reference: str | os.PathLike | Mapping, names: list[str] | None = None) -> list[dict]:
    """Per-tap comparison with a reference (.npz path, np.load result or dict): shape, max abs error, max rel error.

    Returns rows {"tap", "shape", "max_abs_err", "max_rel_err", "ref_scale"} in the trace's order. A tap present
    on one side only is reported with max_abs_err=inf, so a missing tap never passes silently.
    """
    reference = load_reference(reference)
    ours = trace.tensors if isinstance(trace, Trace) else trace
    names = names if names is not None else [n for n in ours] + [n for n in reference if n not in ours and n != "tokens"]
    rows = []
    for n in names:
        if n not in ours or n not in reference:
            rows.append({"tap": n, "shape": None, "max_abs_err": float("inf"), "max_rel_err": float("inf"),
                         "ref_scale": float("nan"), "missing": "ours" if n not in ours else "reference"})
            continue
        a = np.asarray(ours[n], dtype=np.float64)
        b_shape = reference.shapes[n] if isinstance(reference, NpzArchive) else np.shape(reference[n])
        if a.shape != tuple(b_shape):                              # checked before an archive's array is read
            rows.append({"tap": n, "shape": a.shape, "max_abs_err": float("inf"), "max_rel_err": float("inf"),
                         "ref_scale": float("nan"), "missing": f"shape {a.shape} vs reference {tuple(b_shape)}"})
            continue
        try:
            b = np.asarray(reference[n], dtype=np.float64)
        except (ValueError, TypeError):
            raise InputError(f"reference tap {n!r} is not numeric ({np.asarray(reference[n]).dtype}); a reference "
                             "holds numbers") from None
        err = np.abs(a - b)
        scale = float(np.abs(b).max()) if b.size else 0.0
        rows.append({"tap": n, "shape": a.shape, "max_abs_err": float(err.max()) if err.size else 0.0,
                     "max_rel_err": float(err.max() / scale) if scale > 0 else 0.0, "ref_scale": scale})
    return rows


def format_table(rows: list[dict]) -> str:
    """The comparison rows as an aligned text table (tap, shape, max abs error, error / max |ref|)."""
    lines = [f"{'tap':32s} {'shape':>20s} {'max abs err':>12s} {'rel to max':>11s}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else r.get("missing", "-")
        lines.append(f"{r['tap']:32s} {shape:>20s} {r['max_abs_err']:12.3e} {r['max_rel_err']:11.3e}")
    return "\n".join(lines)



def compare_table(trace: Trace | dict, reference: str | os.PathLike | Mapping, names: list[str] | None = None) -> str:
    """compare() printed by format_table(): the one-liner a chapter or a port's test prints."""
    return format_table(compare(trace, reference, names))


# ------------------------------------------------------------------------------------------------
# Checks: measured errors against stated tolerances, one table per chapter section

class Checks:
    """The numerical checks of one chapter section: each a measured error, a tolerance and why that tolerance.

        checks = Checks("section 5 · the KV cache")
        checks.close("cached decode vs one full forward", cached, full, 1e-5, "gemv and gemm sum in other orders",
                     relative=True)                              # max|a - b| / max|b| <= 1e-5
        checks.add("logits vs transformers", err, 1e-4, "float32 logits of order 10 keep ~6 digits")
        checks.exact("embed tap vs E[ids]", tap, E[ids], "a lookup does no arithmetic")
        checks.differs("Meta rows with HF's RoPE", wrong, right, 1.0, "a real mistake is of order one")
        checks.report()        # prints one table; an AssertionError names every check that failed

    The measured column of a tolerance check is float32 noise whose digits move between CPUs (BLAS kernels, threads).
    It is printed as `x.xe-yy` just before ` <= `, a pattern notebooks/nbval_sanitize.cfg replaces, so a stored chapter
    shows the reader the error while nbval compares the verdict. `differs` rows print their (large) value as it is.
    """

    def __init__(self, title: str = ""):
        self.title = title
        self.rows: list[dict] = []

    def add(self, name: str, error: float, tol: float, why: str, relative: bool = False) -> bool:
        """Record an error measured elsewhere; passes when error <= tol (NaN fails)."""
        error = float(error)
        ok = bool(error <= tol)
        self.rows.append({"name": name, "error": error, "op": "<=", "tol": float(tol), "why": why,
                          "unit": "rel" if relative else "abs", "ok": ok})
        return ok

    def close(self, name: str, ours, ref, tol: float, why: str, relative: bool = False) -> bool:
        """max |ours - ref| (divided by max |ref| when relative) <= tol; shapes must agree."""
        a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        if a.shape != b.shape:
            return self.add(f"{name} (shape {a.shape} vs {b.shape})", float("nan"), tol, why, relative)
        err = float(np.abs(a - b).max()) if a.size else 0.0
        if relative:
            scale = float(np.abs(b).max()) if b.size else 0.0
            err = err / scale if scale > 0 else err
        return self.add(name, err, tol, why, relative)

    def exact(self, name: str, ours, ref, why: str) -> bool:
        """Bit for bit: the same shape and the same values (tolerance 0)."""
        a, b = np.asarray(ours), np.asarray(ref)
        same = a.shape == b.shape and bool(np.array_equal(a, b))
        err = 0.0 if same else (float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
                                if a.shape == b.shape else float("nan"))
        self.rows.append({"name": name, "error": err, "op": "<=", "tol": 0.0, "why": why, "unit": "exact",
                          "ok": same})
        return same

    def differs(self, name: str, ours, ref, at_least: float, why: str) -> bool:
        """A planted mistake must show: max |ours - ref| >= at_least (a check that a wrong version is caught)."""
        a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        err = float(np.abs(a - b).max()) if a.shape == b.shape and a.size else float("nan")
        ok = bool(err >= at_least)
        self.rows.append({"name": name, "error": err, "op": ">=", "tol": float(at_least), "why": why,
                          "unit": "abs", "ok": ok})
        return ok

    @property
    def failed(self) -> list[str]:
        return [r["name"] for r in self.rows if not r["ok"]]

    def table(self) -> str:
        """The checks as an aligned text table: check, measured, relation, tolerance, why; then a one-line verdict."""
        width = max([len(r["name"]) for r in self.rows] + [len(self.title), 5])
        lines = [f"{self.title or 'check':{width}s}  {'measured':>9s}     {'tolerance':11s} why this tolerance"]
        previous = None
        for r in self.rows:
            if r["op"] == ">=":                                  # a large, stable number: printed as it is
                measured = f"{r['error']:9.3g}"
            else:                                                # float32 noise: x.xe-yy, sanitized before ' <= '
                measured = f"{r['error']:9.1e}"
            tol = "0 (exact)" if r["unit"] == "exact" else f"{r['tol']:{'g' if r['tol'] >= 0.01 else '.0e'}} {r['unit']}"
            flag = "" if r["ok"] else "   <-- FAILED"
            why = '"' if r["why"] == previous else r["why"]          # a ditto mark for a reason just given
            previous = r["why"]
            lines.append(f"{r['name']:{width}s}  {measured} {r['op']:>2s}  {tol:11s} {why}{flag}")
        n_bad = len(self.failed)
        lines.append(f"{len(self.rows) - n_bad} of {len(self.rows)} checks passed" + (f"; FAILED: {self.failed}"
                                                                                     if n_bad else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def report(self) -> None:
        """Print the table, then fail loudly (AssertionError naming them) if any check failed."""
        print(self.table())
        assert not self.failed, f"checks outside their tolerance: {self.failed}"


# ------------------------------------------------------------------------------------------------
# The residual stream and the logit lens

def residual_stream(trace: Trace | dict, n_layers: int | None = None) -> tuple[list[str], np.ndarray]:
    """The residual stream before block 0 and after every block: (names, x (L+1, B, T, C)).

    names are "embed", "layers.0.out", ..., the taps HF calls hidden_states[0..L]. Record them with
    Trace("embed", "layers.*.out").
    """
    tensors = trace.tensors if isinstance(trace, Trace) else trace
    if n_layers is None:
        n_layers = sum(1 for n in tensors if re.fullmatch(r"layers\.\d+\.out", n))
    names = ["embed"] + [f"layers.{i}.out" for i in range(n_layers)]
    missing = [n for n in names if n not in tensors]
    if missing or n_layers == 0:
        raise InputError(f"the trace lacks the residual-stream taps {missing or names[1:2]}; record them with "
                         'Trace("embed", "layers.*.out")')
    return names, np.stack([tensors[n] for n in names])


def logit_lens(model, trace: Trace | dict) -> tuple[list[str], np.ndarray]:
    """The logit lens: the final RMSNorm and the classifier applied to the residual stream after every block.

    Returns (names, logits (L+1, B, T, V)) float32. Row L is exactly the model's logits; row i < L is what the
    model would predict if the blocks after i were skipped, which shows at which depth a prediction forms.
    """
    names, x = residual_stream(trace, model.config.n_layers)                             # (L+1, B, T, C)
    return names, model.head(x)                                                          # (L+1, B, T, V)


# ------------------------------------------------------------------------------------------------
# Inspecting taps: summary statistics and an atomic .npz (the `inspect` command)

def summarize(x: np.ndarray, n_values: int = 4) -> dict:
    """Shape, dtype and statistics (in float64) of a tensor, plus its first n_values entries (flattened)."""
    a = np.asarray(x)
    f = a.astype(np.float64, copy=False)
    stats = {"shape": list(a.shape), "dtype": str(a.dtype), "mean": float(f.mean()), "std": float(f.std()),
             "min": float(f.min()), "max": float(f.max()), "abs_max": float(np.abs(f).max()),
             "first": [float(v) for v in f.reshape(-1)[:n_values]]}
    return stats
