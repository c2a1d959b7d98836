"""Activation taps: name every intermediate tensor of the forward pass, record the ones asked for, patch any.

Chapter 00 shows a tap; chapter 05 compares all of them with the reference, reads the logit lens and ablates a
head; `python -m llama_ref inspect` prints and saves taps for someone comparing another engine with this one.

The forward pass calls `tap(trace, name, x)` at each named point (names are listed in DEVELOPING.md, e.g.
`layers.3.attn.probs`). With no trace that is a no-op. A `Trace` records copies of the tensors whose names
match its fnmatch patterns, and can *patch* a tensor: replace it by `fn(x)` before the forward goes on,
which is how a head is ablated or an activation from another run is spliced in.
"""
from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .files import save_npz  # noqa: F401  (the .npz writer: inspect --save, chapters)
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
        self.applied: set[str] = set()      # patches that ran: a misspelled tap name never does

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
            self.applied.add(name)
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

    def unused_patches(self) -> list[str]:
        """Patches whose tap never ran (a typo, or a layer the model does not have)."""
        return [n for n in self.patches if n not in self.applied]


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


def load_reference(reference: str | os.PathLike | Mapping) -> Mapping:
    """A reference as a mapping name -> array: an .npz path (ours, `inspect --save`, or another engine's) or a mapping."""
    if isinstance(reference, Mapping) or hasattr(reference, "files"):
        return reference
    path = Path(reference)
    how = "give an .npz written by np.savez with tap names as keys (e.g. by `python -m llama_ref inspect --save`)"
    if path.is_dir():
        raise InputError(f"reference {path} is a directory; {how}")
    if not path.exists():
        raise InputError(f"reference file {path} does not exist; {how}")
    if not path.is_file():
        raise InputError(f"reference {path} is not a regular file (a pipe or a device?); {how}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":                                  # an .npz is a zip archive of .npy files
        what = "a single .npy array" if magic == b"\x93NUM" else "not an .npz file (an .npz is a zip of .npy arrays)"
        raise InputError(f"reference {path} is {what}; {how}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:   # not a zip, truncated, pickled objects...
        raise InputError(f"cannot read {path} as an .npz of arrays ({type(e).__name__}: {e}); "
                         "write it with np.savez(path, **{tap_name: array})") from None


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



def compare_table(trace: Trace | dict, reference: str | os.PathLike | Mapping, names: list[str] | None = None) -> str:
    """compare() printed by format_table(): the one-liner a chapter or a port's test prints."""
    return format_table(compare(trace, reference, names))


# ------------------------------------------------------------------------------------------------
# Tap names without running a model

LAYER_TAPS = ("attn_norm", "attn.q", "attn.k", "attn.v", "attn.probs", "attn.heads", "attn.out", "attn_residual",
              "ffn_norm", "ffn.gate", "ffn.up", "ffn.hidden", "ffn.out", "out")


def tap_names(config) -> list[str]:
    """Every tap Llama.forward records for a config with config.n_layers blocks, in forward order."""
    return (["embed"] + [f"layers.{i}.{n}" for i in range(config.n_layers) for n in LAYER_TAPS]
            + ["norm.out", "logits"])


def match_taps(config, patterns) -> list[str]:
    """Tap names matching any fnmatch pattern; InputError naming a pattern that matches nothing (a typo)."""
    names = tap_names(config)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            L = config.n_layers
            raise InputError(f"tap pattern {p!r} matches no tap of this model; taps are embed, "
                             f"layers.{{0..{L - 1}}}.{{{','.join(LAYER_TAPS)}}}, norm.out, logits "
                             f"(e.g. 'layers.0.attn.*', '*.probs', 'logits')")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


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
    from .model import linear, rms_norm     # model imports this module; a function-level import avoids a cycle
    names, x = residual_stream(trace, model.config.n_layers)                             # (L+1, B, T, C)
    xn = rms_norm(x, model.params["norm"], model.config.norm_eps)                        # (L+1, B, T, C)
    return names, linear(xn, model.params["lm_head"])                                    # (L+1, B, T, V)


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
