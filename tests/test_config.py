import json

import pytest

from llama_ref.config import PRESETS, LlamaConfig
from llama_ref.errors import ConfigError


def test_hf_round_trip(tmp_path):
    cfg = LlamaConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=172, vocab_size=512,
                      max_seq_len=128, rope_theta=5e5, norm_eps=1e-6, tie_embeddings=True)
    cfg.save(tmp_path / "config.json")
    assert LlamaConfig.load(tmp_path) == cfg
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["num_key_value_heads"] == 2 and d["rope_theta"] == 5e5 and d["tie_word_embeddings"] is True


def test_defaults_and_derived():
    cfg = LlamaConfig(dim=288, n_heads=6)
    assert cfg.n_kv_heads == 6 and cfg.head_dim == 48 and cfg.n_rep == 1
    assert PRESETS["llama2-70b"].n_rep == 8
    # stories15M: 15.2M parameters with llama2.c's shared classifier
    assert abs(PRESETS["stories15M"].replace(tie_embeddings=True).n_params() - 15_191_712) < 1


@pytest.mark.parametrize("changes, msg", [
    (dict(dim=100, n_heads=3), "not divisible"),
    (dict(dim=36, n_heads=4), "must be even"),
    (dict(n_heads=6, n_kv_heads=4), "not a multiple"),
    (dict(n_layers=0), "positive integer"),
    (dict(rope_theta=0.0), "rope_theta"),
])
def test_invalid_configs(changes, msg):
    with pytest.raises(ConfigError, match=msg):
        LlamaConfig(**changes)


def test_unsupported_hf_configs():
    base = LlamaConfig().to_hf()
    with pytest.raises(ConfigError, match="model_type"):
        LlamaConfig.from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ConfigError, match="rope_scaling"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(ConfigError, match="rope_parameters"):              # transformers 5's spelling is read too
        LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "longrope", "factor": 8.0, "rope_theta": 1e4}})
    with pytest.raises(ConfigError, match="intermediate_size"):
        LlamaConfig.from_hf({k: v for k, v in base.items() if k != "intermediate_size"})


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LlamaConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.load(tmp_path)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, {"type": "dynamic", "factor": 2.0},
                                     LLAMA3])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_is_read_from_either_key_and_round_trips(scaling, key, tmp_path):
    base = LlamaConfig(dim=64, n_heads=4, max_seq_len=128).to_hf()
    cfg = LlamaConfig.from_hf({**base, "rope_scaling": None, key: {**scaling, "rope_theta": 10000.0}})
    kind = scaling.get("rope_type", scaling.get("type"))
    assert cfg.rope_scaling.kind == kind and cfg.rope_scaling.factor == scaling["factor"]
    cfg.save(tmp_path / "config.json")
    assert LlamaConfig.load(tmp_path) == cfg
    assert cfg.context_len == (256 if kind == "dynamic" else 128)         # dynamic NTK runs past the trained length


def test_rope_scaling_keys_that_disagree_are_refused():
    base = LlamaConfig().to_hf()
    with pytest.raises(ConfigError, match="disagree"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                             "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    same = LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}})
    assert same.rope_scaling.factor == 4.0


def test_rope_scaling_round_trips_through_transformers(tmp_path):
    """A config we write is read by transformers as the same scaling, and what transformers writes back (its
    rope_parameters spelling) is read by us as the same config."""
    transformers = pytest.importorskip("transformers")
    for scaling in ({"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}, LLAMA3):
        ours = LlamaConfig.from_hf({**LlamaConfig(dim=64, n_heads=4).to_hf(), "rope_scaling": scaling})
        ours.save(tmp_path / "config.json")
        theirs = transformers.LlamaConfig.from_pretrained(tmp_path)
        assert {k: v for k, v in theirs.rope_parameters.items() if k != "rope_theta"} == scaling
        theirs.save_pretrained(tmp_path / "back")
        assert LlamaConfig.load(tmp_path / "back") == ours


def test_rope_scaling_frequencies_by_hand():
    """linear divides every frequency; dynamic changes nothing up to the trained length, then raises the base;
    llama3 keeps the fast frequencies, divides the slow ones and blends between."""
    import numpy as np
    from llama_ref.config import RopeScaling
    from llama_ref.model import rope_freqs
    hs, theta = 16, 10000.0
    plain_cos, _ = rope_freqs(hs, 100, theta)
    lin_cos, _ = rope_freqs(hs, 100, theta, RopeScaling("linear", 4.0), 32)
    np.testing.assert_allclose(lin_cos[4 * 7], plain_cos[7], atol=1e-6)           # position 28 looks like 7
    dyn_short, _ = rope_freqs(hs, 32, theta, RopeScaling("dynamic", 2.0), 32)
    np.testing.assert_array_equal(dyn_short, plain_cos[:32])
    dyn_long, _ = rope_freqs(hs, 48, theta, RopeScaling("dynamic", 2.0), 32)
    base = theta * (2.0 * 48 / 32 - 1.0) ** (hs / (hs - 2))
    inv = 1.0 / base ** (np.arange(0, hs, 2) / hs)
    np.testing.assert_allclose(dyn_long[47], np.cos(47 * inv), atol=1e-6)
    l3 = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    l3_cos, _ = rope_freqs(hs, 100, theta, l3, 64)
    inv = 1.0 / theta ** (np.arange(0, hs, 2) / hs)                                 # wavelengths 6.3, 20, 63, 199, ...
    np.testing.assert_allclose(l3_cos[50, 0], np.cos(50 * inv[0]), atol=1e-6)     # 6.3 < 64/4: kept
    np.testing.assert_allclose(l3_cos[50, 3:], np.cos(50 * inv[3:] / 8), atol=1e-6)   # > 64: / factor
    smooth = (64 / (2 * np.pi / inv[1]) - 1.0) / 3.0
    np.testing.assert_allclose(l3_cos[50, 1], np.cos(50 * inv[1] * ((1 - smooth) / 8 + smooth)), atol=1e-6)
