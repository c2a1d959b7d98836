"""A llama2.c `.bin` (Meta's interleaved q/k layout) written from a reference model gives the HF dir's logits.

This is the end-to-end guard against the classic RoPE-layout porting bug: the loader must permute q/k rows back to
HF's rotate-half layout. Checked against transformers' own logits from the fixture, not just against ourselves.
"""

import numpy as np
import pytest

from llama_ref import paths
from llama_ref.llama2c import save_llama2c
from llama_ref.loader import read_checkpoint
from llama_ref.model import Llama
from conftest import MANIFEST



def llama2c_compatible(name):
    """run.c hard-codes theta 10000, eps 1e-5 and plain RoPE (save_llama2c refuses anything else, tests/test_gguf.py)."""
    cfg = MANIFEST["configs"][name]["hf_config"]
    plain = (cfg.get("rope_parameters") or {}).get("rope_type", "default") == "default" and not cfg.get("rope_scaling")
    return cfg.get("rope_theta", 10000.0) == 10000.0 and cfg.get("rms_norm_eps") == 1e-5 and plain


@pytest.mark.parametrize("name", [n for n in MANIFEST["configs"] if llama2c_compatible(n)])
def test_llama2c_bin_matches_hf_dir_and_transformers(name, tmp_path):
    config, weights = read_checkpoint(paths.REFERENCE_DIR / name)
    save_llama2c(tmp_path / "model.bin", config, weights)
    config_bin, weights_bin = read_checkpoint(tmp_path / "model.bin")
    ref = np.load(paths.REFERENCE_DIR / f"{name}.npz")
    tokens = ref["tokens"]
    ours_hf = Llama(config, weights).forward(tokens)
    ours_bin = Llama(config_bin, weights_bin).forward(tokens)
    np.testing.assert_array_equal(ours_bin, ours_hf)       # same float32 weights after the permutation round trip
    # 1e-4: the fixture tolerance of tests/test_reference.py (float32 rounding between two implementations)
    assert np.abs(ours_bin - ref["logits"]).max() <= 1e-4


def test_wrong_layout_is_caught(tmp_path):
    """If the loader forgot the permutation, the logits would be far off: show the test can fail."""
    name = next(n for n in MANIFEST["configs"] if llama2c_compatible(n))
    config, weights = read_checkpoint(paths.REFERENCE_DIR / name)
    ref = np.load(paths.REFERENCE_DIR / f"{name}.npz")
    from llama_ref.model import permute_qk_hf_to_meta
    meta = dict(weights)
    for i in range(config.n_layers):
        for proj, n in (("q_proj", config.n_heads), ("k_proj", config.n_kv_heads)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            meta[key] = permute_qk_hf_to_meta(np.asarray(weights[key]), n)
    assert np.abs(Llama(config, meta).forward(ref["tokens"]) - ref["logits"]).max() > 1e-2
