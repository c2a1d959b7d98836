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
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="intermediate_size"):
        LlamaConfig.from_hf({k: v for k, v in base.items() if k != "intermediate_size"})


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LlamaConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.load(tmp_path)
