"""Activation taps: name every intermediate tensor of the forward pass, record the ones asked for, patch any.

Chapter 00 shows a tap; chapter 05 compares all of them with the reference and ablates a head.

The forward pass calls `tap(trace, name, x)` at each named point (names are listed in DEVELOPING.md, e.g.
`layers.3.attn.probs`). With no trace that is a no-op. A `Trace` records copies of the tensors whose names
match its fnmatch patterns, and can *patch* a tensor: replace it by `fn(x)` before the forward goes on,
which is how a head is ablated or an activation from another run is spliced in.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable

import numpy as np

from .errors import InputError, LlamaRefError


class Trace:
    """Records named activations during `Llama.forward`.

    trace = Trace("layers.0.*", "logits")   # fnmatch patterns; Trace() records every tap
    model.forward(tokens, trace=trace)
    trace["layers.0.attn.probs"]            # (B, nh, T, S) float32
    """

    def __init__(self, *patterns: str, patches: dict[str, Callable] | None = None):
        self.patterns = patterns or ("*",)
        self._regex = re.compile("|".join(fnmatch.translate(p) for p in self.patterns))
        self.tensors: dict[str, np.ndarray] = {}
        self.patches: dict[str, Callable[[np.ndarray], np.ndarray]] = dict(patches or {})

    def wants(self, name: str) -> bool:
        return self._regex.match(name) is not None

    def patch(self, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> "Trace":
        """During the forward, replace the tensor at tap `name` by fn(tensor)."""
        self.patches[name] = fn
        return self

    def record(self, name: str, x: np.ndarray) -> np.ndarray:
        if name in self.patches:
            y = self.patches[name](x.copy())
            if not isinstance(y, np.ndarray) or y.shape != x.shape:
                raise InputError(f"patch for tap {name!r} must return an array of shape {x.shape}, "
                                 f"got {getattr(y, 'shape', type(y))}")
            x = y.astype(x.dtype, copy=False)
        if self.wants(name):
            if name in self.tensors:   # a second forward with the same trace (e.g. decode steps): append along T
                self.tensors[name] = _append(self.tensors[name], x, name)
            else:
                self.tensors[name] = x.copy()
        return x

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"tap {name!r} was not recorded; recorded: {', '.join(list(self.tensors)[:8])}"
                           f"{' ...' if len(self.tensors) > 8 else ''} (patterns {self.patterns})")
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def names(self) -> list[str]:
        return list(self.tensors)

    def items(self):
        return self.tensors.items()

    def select(self, pattern: str) -> dict[str, np.ndarray]:
        """Recorded tensors whose names match an fnmatch pattern, in forward order."""
        return {k: v for k, v in self.tensors.items() if fnmatch.fnmatchcase(k, pattern)}


def tap(trace: Trace | None, name: str, x: np.ndarray) -> np.ndarray:
    """The forward pass calls this at every named point; returns x (or its patch)."""
    if trace is None:
        return x
    return trace.record(name, x)


def _append(old: np.ndarray, new: np.ndarray, name: str) -> np.ndarray:
    # token axis: 1 for (B, T, ...) taps, 2 for per-head (B, h, T, ...) taps; probs grow along S too
    axis = 2 if ".attn." in name and not name.endswith(".out") else 1
    if name.endswith(".probs"):
        S = max(old.shape[3], new.shape[3])
        old = np.pad(old, [(0, 0)] * 3 + [(0, S - old.shape[3])])
        new = np.pad(new, [(0, 0)] * 3 + [(0, S - new.shape[3])])
    try:
        return np.concatenate([old, new], axis=axis)
    except ValueError as e:
        raise LlamaRefError(f"cannot append tap {name!r} of shape {new.shape} to {old.shape}; "
                            "use a fresh Trace for each forward") from e


def ablate_heads(layer: int, heads: list[int] | int) -> dict[str, Callable]:
    """A patch that zeroes the output of the given heads in one layer (pass as Trace(patches=...))."""
    heads = [heads] if isinstance(heads, int) else list(heads)

    def zero(x):  # x: (B, nh, T, hs)
        x[:, heads] = 0.0
        return x
    return {f"layers.{layer}.attn.heads": zero}


def compare(trace: Trace | dict, reference: dict, names: list[str] | None = None) -> list[dict]:
    """Per-tap comparison with a reference (an .npz mapping or dict): shape, max abs error, max relative error.

    Returns rows {"tap", "shape", "max_abs_err", "max_rel_err", "ref_scale"} in the trace's order. A tap present
    on one side only is reported with max_abs_err=inf, so a missing tap never passes silently.
    """
    ours = trace.tensors if isinstance(trace, Trace) else trace
    names = names if names is not None else [n for n in ours] + [n for n in reference if n not in ours and n != "tokens"]
    rows = []
    for n in names:
        if n not in ours or n not in reference:
            rows.append({"tap": n, "shape": None, "max_abs_err": float("inf"), "max_rel_err": float("inf"),
                         "ref_scale": float("nan"), "missing": "ours" if n not in ours else "reference"})
            continue
        a = np.asarray(ours[n], dtype=np.float64)
        b = np.asarray(reference[n], dtype=np.float64)
        if a.shape != b.shape:
            rows.append({"tap": n, "shape": a.shape, "max_abs_err": float("inf"), "max_rel_err": float("inf"),
                         "ref_scale": float("nan"), "missing": f"shape {a.shape} vs reference {b.shape}"})
            continue
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
