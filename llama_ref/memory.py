"""The memory plan: how much memory this process may still take, and what a model, a cache or a batch will need.

Chapter 14 (the real Llama 2) teaches it; the loader, generation, training and the readers of untrusted files ask it
before they allocate anything large.

What this process may still allocate is MemAvailable (/proc/meminfo).

The contract of a loaded model (`plan_memory`, kept as `model.memory`):
    peak RSS  <=  file pages touched (at most the file size)
                + float32 copies (packed path only) + norms + one tile and decoder temporaries (TILE_BYTES)
                + KV cache for the tokens requested (capacity max(256, 2n) positions: it grows by doubling)
                + activations of one forward over n tokens (incl. one layer's (B, nh, T, T) scores)
                + CONSTANT_BYTES (interpreter, NumPy, OpenBLAS buffers)
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, MemoryBudgetError
from .matrices import TILE_FLOATS
from .weights import weight_shapes

CONSTANT_BYTES = 320 * 2 ** 20          # Python, NumPy, OpenBLAS buffers, this package (measured: benchmarks/big_model.py)
TILE_BYTES = 8 * TILE_FLOATS * 4        # one expanded tile and the decoders' temporaries (K-quants need the most)
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------
# What this process may still allocate

def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (RAM the kernel can hand out without swapping), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024                         # the file says kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit() -> tuple[int | None, str]:
    """(bytes this process may still allocate, the limit that says so)."""
    return available_ram_bytes(), "MemAvailable"


# ------------------------------------------------------------------------------------------------
# What a model needs

def kv_cache_bytes(config: LlamaConfig, batch_size: int, length: int) -> int:
    """Bytes of a float32 KV cache holding `length` positions: K and V, every layer, every key/value head."""
    return 2 * config.n_layers * batch_size * config.n_kv_heads * length * config.head_dim * 4


def packed_bytes(config: LlamaConfig, weights: dict) -> int:
    """Bytes of the float32 copies Llama(pack=True) makes: every float (not quantized) matrix, the embedding when it is
    not float32 already, and the (C, V) classifier a tied float embedding is packed into."""
    total = 0
    for name, shape in weight_shapes(config).items():
        w = weights[name]
        if len(shape) != 2 or getattr(w, "quantized", False):
            continue
        if name == "model.embed_tokens.weight":
            is_f32_array = isinstance(w, np.ndarray) and w.dtype == np.float32
            total += (0 if is_f32_array else 4 * shape[0] * shape[1]) + (4 * shape[0] * shape[1] if config.tie_embeddings else 0)
        else:
            total += 4 * shape[0] * shape[1]
    return total


def activation_bytes(config: LlamaConfig, n_tokens: int, batch_size: int = 1) -> int:
    """A forward over n_tokens at once (the prefill): the residual stream and its norms, q/k/v, SwiGLU's three (T, H)
    arrays, the logits, and the attention scores and probabilities of one layer (B, nh, T, S) with S = T."""
    T, B = n_tokens, batch_size
    per_token = 8 * config.dim + 4 * config.hidden_dim + config.vocab_size
    return 4 * B * (T * per_token + 2 * config.n_heads * T * T)


def weight_kinds(weights: dict) -> dict[str, int]:
    """How many tensors of each stored kind a checkpoint holds: {"q4_k": 193, "q6_k": 33, "f32": 65}."""
    kinds = {}
    for w in weights.values():
        kind = getattr(w, "kind", None) or {"float32": "f32", "float16": "f16"}.get(str(w.dtype), str(w.dtype))
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------------------
# The plan

@dataclasses.dataclass
class MemoryPlan:
    """Which path a model takes and what it will hold, in bytes. anonymous_bytes is the contract's right-hand side
    (without the file pages): the packed copies (when packed), the norms, one tile, the KV cache and activations for
    `n_tokens`, and CONSTANT_BYTES. `limited_by` names the limit `available` came from."""
    path: str                   # "packed" or "as stored"
    file_bytes: int
    packed_bytes: int           # the float32 copies packing makes (0 for a model with nothing to pack)
    anonymous_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    n_tokens: int
    budget: int
    available: int | None
    kinds: dict
    limited_by: str = "MemAvailable"

    def __str__(self):
        how = ("float weights packed as float32 (in, out) copies" if self.path == "packed" else
               "weights as stored, memory-mapped; one tile expanded to float32 per matmul")
        kinds = ", ".join(f"{k} x{n}" for k, n in self.kinds.items())
        avail = f"{self.available / GIB:.1f} GiB" if self.available is not None else "unknown"
        if self.available is not None and self.limited_by != "MemAvailable":
            avail += f" ({self.limited_by})"
        return (f"{how} ({kinds}). Memory: file {self.file_bytes / GIB:.2f} GiB mapped + {self.anonymous_bytes / GIB:.2f}"
                f" GiB allocated (KV cache for {self.n_tokens} tokens {self.kv_cache_bytes / 2**20:.0f} MiB"
                + (f", float32 copies {self.packed_bytes / GIB:.2f} GiB" if self.path == "packed" else "")
                + f"); available {avail}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def plan_memory(config: LlamaConfig, weights: dict, file_bytes: int = 0, n_tokens: int | None = None,
                batch_size: int = 1, pack: str = "auto", budget: int | None = None) -> MemoryPlan:
    """Choose packed or as stored (pack = "auto" | "always" | "never") and estimate the memory, or refuse with a
    MemoryBudgetError naming the numbers, before anything large is allocated."""
    if pack not in ("auto", "always", "never"):
        raise CheckpointError(f"pack={pack!r}: choose auto, always or never")
    n_tokens = min(config.max_seq_len, 4096) if n_tokens is None else max(1, int(n_tokens))
    available, limited_by = memory_limit()
    if budget is None:
        budget = available // 2 if available is not None else 4 * GIB
    capacity = min(config.max_seq_len, max(256, 2 * n_tokens))         # the KV cache grows by doubling
    kv = kv_cache_bytes(config, batch_size, capacity)
    act = activation_bytes(config, n_tokens, batch_size)
    norms = 4 * config.dim * (2 * config.n_layers + 1)
    base = norms + TILE_BYTES + kv + act + CONSTANT_BYTES
    copies = packed_bytes(config, weights)
    if copies > 0 and (pack == "always" or (pack == "auto" and base + copies <= budget)):
        path, anonymous = "packed", base + copies
    else:
        path, anonymous = "as stored", base
    plan = MemoryPlan(path, file_bytes, copies, anonymous, kv, act, n_tokens, budget, available,
                      weight_kinds(weights), limited_by)
    if available is not None and anonymous > available:
        what = ("with float32 copies of its weights" if path == "packed" else
                "even with its weights left as stored")
        raise MemoryBudgetError(
            f"this model needs ~{anonymous / GIB:.1f} GiB of memory {what} (KV cache for {n_tokens} tokens "
            f"{kv / GIB:.2f} GiB, activations {act / GIB:.2f} GiB), more than the {available / GIB:.1f} GiB available "
            f"({limited_by}); "
            + ("let it run as stored (--pack never / pack='never')" if path == "packed" else
               "ask for fewer tokens, or use a smaller or more quantized model"))
    return plan
