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
