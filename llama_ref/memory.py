"""The memory plan: how much memory this process may still take, and what a model, a cache or a batch will need.
(`config` arguments are LlamaConfigs; this module imports no config, so low-level readers can ask it too.)

Chapter 14 (the real Llama 2) teaches it; the loader, generation, training and the readers of untrusted files ask it
before they allocate anything large.

What this process may still allocate is the smallest of what three places allow:
    MemAvailable      /proc/meminfo: RAM the kernel can hand out without swapping
    cgroup limit      memory.max (v2) or memory.limit_in_bytes (v1) of this process's cgroup and its ancestors,
                      minus what the group already uses (less its inactive file cache, which the kernel drops first)
    RLIMIT_AS         the address-space limit (`ulimit -v`, `prlimit --as`) minus the address space already mapped
                      (VmSize; mapped checkpoint files count there too)
`memory_limit()` says which one binds; `available_ram_bytes()` is its number (None where none can be read).

The contract of a loaded model (`plan_memory`, kept as `model.memory`):
    peak RSS  <=  file pages touched (at most the file size)
                + float32 copies (packed path only) + norms + each thread's tile buffers (matrices.tile_buffer_bytes)
                + KV cache for the tokens requested (capacity max(256, 2n) positions: it grows by doubling)
                + activations of one forward over n tokens (incl. one layer's (B, nh, T, T) scores)
                + CONSTANT_BYTES (interpreter, NumPy, OpenBLAS buffers)
`require(nbytes, what, fix)` is the same question for anything else: a KV cache, a training batch, an archive member.
"""
from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import numpy as np

from .errors import CheckpointError, MemoryBudgetError
from .matrices import tile_buffer_bytes

CONSTANT_BYTES = 320 * 2 ** 20          # Python, NumPy, OpenBLAS buffers, this package (measured: benchmarks/big_model.py)
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------
# What this process may still allocate

def _int_file(path) -> int | None:
    """The integer in a one-line kernel file (None for 'max', a missing file or anything else)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available(meminfo="/proc/meminfo") -> int | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024                         # the file says kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _inactive_file(stat_path, key) -> int:
    try:
        for line in Path(stat_path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_headroom(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup") -> int | None:
    """Bytes this process's cgroup (v2 or v1) may still take: min over the group and its ancestors of limit - usage
    (+ inactive file cache). None when no limit is set or nothing can be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and controllers == "":                                  # v2: one unified hierarchy
            mounts = [Path(root), Path(root) / "unified"]
            files = ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):                               # v1: the memory controller's tree
            mounts = [Path(root) / "memory"]
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file")
        else:
            continue
        limit_name, usage_name, stat_name, inactive_key = files
        for mount in mounts:
            d = mount / rel.lstrip("/")
            if not d.is_dir():
                d = mount                                                      # a cgroup namespace shows "/" as root
            while True:
                limit = _int_file(d / limit_name)
                usage = _int_file(d / usage_name)
                if limit is not None and usage is not None and limit < 2 ** 60:   # v1 writes ~2^63 for "no limit"
                    room = max(0, limit - usage + _inactive_file(d / stat_name, inactive_key))
                    best = room if best is None else min(best, room)
                if d == mount or mount not in d.parents:
                    break
                d = d.parent
    return best


def _address_space_headroom(status="/proc/self/status") -> int | None:
    """RLIMIT_AS minus the address space mapped now (VmSize), or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = 0
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("VmSize:"):
                mapped = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - mapped)


def memory_limit() -> tuple[int | None, str]:
    """(bytes this process may still allocate, which limit binds: "MemAvailable", "cgroup memory limit" or
    "RLIMIT_AS"); (None, "unknown") where none can be read (off Linux)."""
    found = [(b, name) for b, name in ((_meminfo_available(), "MemAvailable"), (_cgroup_headroom(), "cgroup memory limit"),
                                       (_address_space_headroom(), "RLIMIT_AS")) if b is not None]
    return min(found) if found else (None, "unknown")


def available_ram_bytes() -> int | None:
    """The smallest of MemAvailable, the cgroup's headroom and RLIMIT_AS's headroom (None if none is known)."""
    return memory_limit()[0]


def require(nbytes: int, what: str, fix: str, error=MemoryBudgetError) -> None:
    """Refuse, before allocating, `nbytes` for `what` when they cannot fit in what this process may still take."""
    have, limit = memory_limit()
    if have is not None and nbytes > have:
        raise error(f"{what} needs {nbytes / GIB:.2f} GiB, more than the {have / GIB:.2f} GiB available "
                    f"({limit}); {fix}")


# ------------------------------------------------------------------------------------------------
# What a model needs

def kv_cache_bytes(config, batch_size: int, length: int) -> int:
    """Bytes of a float32 KV cache holding `length` positions: K and V, every layer, every key/value head."""
    return 2 * config.n_layers * batch_size * config.n_kv_heads * length * config.head_dim * 4


def packed_bytes(config, weights: dict) -> int:
    """Bytes of the float32 copies Llama(pack=True) makes: every float (not quantized) matrix, the embedding when it is
    not float32 already, and the (C, V) classifier a tied float embedding is packed into."""
    total = 0
    for name, w in weights.items():                                     # checked weights: exactly the config's
        shape = tuple(w.shape)
        if len(shape) != 2 or getattr(w, "quantized", False):
            continue
        if name == "model.embed_tokens.weight":
            is_f32_array = isinstance(w, np.ndarray) and w.dtype == np.float32
            total += (0 if is_f32_array else 4 * shape[0] * shape[1]) + (4 * shape[0] * shape[1] if config.tie_embeddings else 0)
        else:
            total += 4 * shape[0] * shape[1]
    return total


def activation_bytes(config, n_tokens: int, batch_size: int = 1) -> int:
    """A forward over n_tokens at once (the prefill): the residual stream and its norms, q/k/v, SwiGLU's three (T, H)
    arrays, the logits, and the attention scores and probabilities of one layer (B, nh, T, S) with S = T."""
    T, B = n_tokens, batch_size
    per_token = 8 * config.dim + 4 * config.hidden_dim + config.vocab_size
    return 4 * B * (T * per_token + 2 * config.n_heads * T * T)


def training_bytes(config, batch_size: int, seq_len: int) -> int:
    """An upper bound of what one training step holds (train.forward_backward_parallel and AdamW): weights, Adam's
    two moments and the gradients of two workers and their sum (6 x 4 bytes a parameter), and per token each layer's
    cached activations (~12 (C,) and 4 (H,) vectors, the attention row of nh x T) plus the logits, their softmax and
    gradient. Measured against tracemalloc in tests/test_memory.py."""
    per_token = 4 * (config.n_layers * (12 * config.dim + 4 * config.hidden_dim + config.n_heads * seq_len)
                     + 4 * config.vocab_size)
    return 6 * 4 * config.n_params() + batch_size * seq_len * per_token


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


def plan_memory(config, weights: dict, file_bytes: int = 0, n_tokens: int | None = None,
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
    base = norms + tile_buffer_bytes() + kv + act + CONSTANT_BYTES
    copies = packed_bytes(config, weights)
    fits = available is None or base + copies <= available
    if copies > 0 and (pack == "always" or (pack == "auto" and base + copies <= budget and fits)):
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
