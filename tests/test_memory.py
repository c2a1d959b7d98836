"""The memory plan: what a model needs (packed or as stored), and what this process may still allocate."""
import os

import numpy as np
import pytest

from llama_ref import loader, memory
from llama_ref.checkpoint import save_model
from llama_ref.config import PRESETS, LlamaConfig
from llama_ref.errors import MemoryBudgetError
from llama_ref.weights import weight_shapes
from conftest import random_weights

GQA = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40, max_seq_len=16)


def _available(monkeypatch, nbytes, limit="MemAvailable"):
    monkeypatch.setattr(memory, "memory_limit", lambda: (nbytes, limit))


def test_memory_plan_packs_what_fits_and_refuses_what_cannot(tmp_path, monkeypatch):
    # Llama 2 7B has 6,738,415,616 parameters (untied): packing every float matrix makes ~25.1 GiB of float32 copies
    cfg7 = PRESETS["llama2-7b"]
    f16 = {n: np.lib.stride_tricks.as_strided(np.zeros(1, np.float16), s, (0,) * len(s))
           for n, s in weight_shapes(cfg7).items()}                  # the shapes of a float16 7B, no memory
    assert memory.packed_bytes(cfg7, f16) == (6_738_415_616 - cfg7.dim * (2 * cfg7.n_layers + 1)) * 4
    _available(monkeypatch, 24 * 2 ** 30)
    plan = memory.plan_memory(cfg7, f16, n_tokens=36)
    assert plan.path == "as stored" and plan.anonymous_bytes < 1 * 2 ** 30     # KV cache of 256 positions: 128 MiB
    assert plan.kv_cache_bytes == 2 * 32 * 32 * 256 * 128 * 4 == memory.kv_cache_bytes(cfg7, 1, 256)
    with pytest.raises(MemoryBudgetError, match=r"needs ~2.*GiB of memory with float32 copies .* more than the 24.0 GiB"):
        memory.plan_memory(cfg7, f16, n_tokens=36, pack="always")
    with pytest.raises(MemoryBudgetError, match=r"even with its weights left as stored .* ask for fewer tokens"):
        memory.plan_memory(cfg7, f16, n_tokens=4096 * 8, pack="never")     # a 32k-token prefill's scores
    save_model(tmp_path / "m", GQA, random_weights(GQA, scale=1.0))
    assert loader.load(tmp_path / "m").memory.path == "packed"
    model = loader.load(tmp_path / "m", pack="never")
    assert model.memory.path == "as stored" and not model.packed
    _available(monkeypatch, 1000)
    with pytest.raises(MemoryBudgetError, match="more than the 0.0 GiB available"):
        loader.load(tmp_path / "m")


def test_available_ram_reads_meminfo():
    have = memory.available_ram_bytes()
    if os.path.exists("/proc/meminfo"):
        assert isinstance(have, int) and have > 0
    else:
        assert have is None


# ------------------------------------------------------------------------------------------------
# what "available" means: the smallest of MemAvailable, the cgroup's headroom, RLIMIT_AS's headroom

def _tree(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_cgroup_v2_limit_is_the_smallest_headroom_up_the_tree(tmp_path):
    root = _tree(tmp_path / "sys", {
        "a/memory.max": "max\n", "a/memory.current": "100\n",
        "a/b/memory.max": str(3 * 2 ** 30), "a/b/memory.current": str(2 ** 30),
        "a/b/memory.stat": f"anon 1\ninactive_file {2 ** 28}\n",
        "memory.max": str(10 * 2 ** 30), "memory.current": str(9 * 2 ** 30)})
    proc = _tree(tmp_path / "proc", {"cgroup": "0::/a/b\n"}) / "cgroup"
    assert memory._cgroup_headroom(proc, root) == 2 ** 30                  # the root's 10 - 9 GiB binds
    (root / "memory.max").write_text("max\n")
    assert memory._cgroup_headroom(proc, root) == 2 * 2 ** 30 + 2 ** 28    # a/b: 3 - 1 GiB + inactive file cache


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    root = _tree(tmp_path / "sys", {
        "memory/grp/memory.limit_in_bytes": str(2 ** 31), "memory/grp/memory.usage_in_bytes": str(2 ** 30),
        "memory/grp/memory.stat": "total_inactive_file 4096\n",
        "memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "5"})
    proc = _tree(tmp_path / "proc", {"cgroup": "4:memory:/grp\n1:cpu:/\n"}) / "cgroup"
    assert memory._cgroup_headroom(proc, root) == 2 ** 30 + 4096
    (root / "memory/grp/memory.limit_in_bytes").write_text("9223372036854771712")
    assert memory._cgroup_headroom(proc, root) is None                      # v1's "no limit" is ~2^63
    assert memory._cgroup_headroom(tmp_path / "missing", root) is None


def test_rlimit_as_is_honoured_by_the_plan(tmp_path):
    """Under `prlimit --as`, the headroom is the limit minus the address space already mapped, and the plan packs
    only what fits in it (a child process: the limit cannot be lifted once set)."""
    import subprocess
    import sys
    save_model(tmp_path / "m", GQA, random_weights(GQA, scale=1.0))
    code = f"""
import resource
from llama_ref import load, memory
from llama_ref.memory import _address_space_headroom
assert _address_space_headroom() is None
vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]
limit = vm + 600 * 2 ** 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
have, which = memory.memory_limit()
assert which == 'RLIMIT_AS' and 0 < have <= 600 * 2 ** 20, (have, which)
model = load({str(tmp_path / 'm')!r})
assert model.memory.limited_by == 'RLIMIT_AS' and 'RLIMIT_AS' in str(model.memory)
try:
    memory.require(2 ** 40, 'a 1 TiB batch', 'use a smaller one')
except memory.MemoryBudgetError as e:
    assert 'RLIMIT_AS' in str(e) and 'use a smaller one' in str(e), e
else:
    raise AssertionError('1 TiB fitted under a 600 MiB limit')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_auto_falls_back_to_as_stored_when_copies_do_not_fit(monkeypatch):
    """A --memory-budget larger than what is available cannot make auto pack into an out-of-memory death."""
    cfg7 = PRESETS["llama2-7b"]
    f16 = {n: np.lib.stride_tricks.as_strided(np.zeros(1, np.float16), s, (0,) * len(s))
           for n, s in weight_shapes(cfg7).items()}
    _available(monkeypatch, 3 * 2 ** 30, "cgroup memory limit")
    plan = memory.plan_memory(cfg7, f16, n_tokens=16, budget=2 ** 40)
    assert plan.path == "as stored" and plan.limited_by == "cgroup memory limit"
    with pytest.raises(MemoryBudgetError, match=r"cgroup memory limit"):
        memory.plan_memory(cfg7, f16, n_tokens=16, pack="always")


def test_training_bytes_bounds_what_a_training_step_allocates():
    """memory.training_bytes (what `train` asks memory.require for before tokenizing) is an upper bound of a step's
    NumPy allocations (tracemalloc sees them), and within 2x of it: a bound, not a guess."""
    import tracemalloc
    from llama_ref import backprop
    from llama_ref.model import rope_tables
    from llama_ref.tinyworld import model_config
    cfg = model_config(1024)
    params = backprop.init_weights(cfg, seed=0)
    for B, T in [(1, 64), (4, 128), (2, 256)]:
        x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
        rope = rope_tables(cfg, T)
        tracemalloc.start()
        backprop.forward_backward_parallel(cfg, params, x, x, rope=rope, workers=2)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak += 4 * 3 * cfg.n_params()                      # what a run also holds: weights and Adam's moments
        est = memory.training_bytes(cfg, B, T)
        assert peak <= est <= 2 * peak, (B, T, peak, est)
