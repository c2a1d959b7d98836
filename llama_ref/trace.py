"""Activation taps: name every intermediate tensor of the forward pass, record the ones asked for, patch any.

Chapter 00 shows a tap. This module is only the mechanism (Trace, tap, the tap names); what is done with the
recorded tensors (comparing them with a reference, the logit lens, ablation, .npz files) is in inspect.py.

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
