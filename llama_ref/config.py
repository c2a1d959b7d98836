"""LlamaConfig: the handful of numbers that define a Llama 2 model, and their HF `config.json` round trip.

Chapter 00 introduces it; every other module takes one. Field names follow Meta's `ModelArgs`
(dim, n_layers, n_heads, n_kv_heads, ...); `to_hf` / `from_hf` translate to and from the names in a
Hugging Face `config.json` (hidden_size, num_hidden_layers, ...), so a directory we write is a valid
HF Llama checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class LlamaConfig:
    dim: int = 288                 # C: model (residual stream) width
    n_layers: int = 6              # number of transformer blocks
    n_heads: int = 6               # nh: query heads
    n_kv_heads: int | None = None  # nkv: key/value heads (GQA when < n_heads); None means = n_heads
    hidden_dim: int = 768          # H: SwiGLU inner width
    vocab_size: int = 32000        # V
    max_seq_len: int = 256         # context window
    rope_theta: float = 10000.0    # RoPE base
    norm_eps: float = 1e-5         # RMSNorm epsilon
    tie_embeddings: bool = False   # classifier shares the token-embedding matrix
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        self.validate()

    # derived sizes -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """hs: width of one attention head."""
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    def n_params(self) -> int:
        """Number of parameters (the classifier counted once if tied)."""
        C, H, V, hs = self.dim, self.hidden_dim, self.vocab_size, self.head_dim
        per_layer = 2 * C + C * self.n_heads * hs * 2 + C * self.n_kv_heads * hs * 2 + 3 * C * H
        return V * C + self.n_layers * per_layer + C + (0 if self.tie_embeddings else V * C)

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot describe a Llama model."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name}={v!r} must be a positive integer")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                              "the head size dim/n_heads must be an integer")
        if self.head_dim % 2:
            raise ConfigError(f"head size dim/n_heads={self.head_dim} must be even for RoPE (it rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                              "grouped-query attention needs equal-sized groups")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta={self.rope_theta!r} must be > 0")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps={self.norm_eps!r} must be > 0")

    def replace(self, **changes) -> "LlamaConfig":
        return replace(self, **changes)

    # Hugging Face config.json round trip ---------------------------------------------------------
    def to_hf(self) -> dict:
        """The dict transformers' LlamaConfig reads from config.json."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": float(self.rope_theta),
            "rms_norm_eps": float(self.norm_eps),
            "tie_word_embeddings": bool(self.tie_embeddings),
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "head_dim": self.head_dim,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "torch_dtype": "float32",
            "use_cache": True,
        }

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """Read an HF Llama config dict; refuse the features this implementation does not have."""
        if d.get("model_type", "llama") != "llama":
            raise ConfigError(f"model_type={d.get('model_type')!r}: only Llama ('llama') configs are supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r}: Llama's SwiGLU uses 'silu'")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("attention_bias/mlp_bias=True is not Llama 2; these checkpoints are not supported")
        scaling = d.get("rope_scaling")
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"rope_scaling={scaling!r} is not supported (Llama 2 uses plain RoPE)")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 may nest it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        try:
            cfg = cls(
                dim=int(d["hidden_size"]),
                n_layers=int(d["num_hidden_layers"]),
                n_heads=int(d["num_attention_heads"]),
                n_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                hidden_dim=int(d["intermediate_size"]),
                vocab_size=int(d["vocab_size"]),
                max_seq_len=int(d.get("max_position_embeddings", 2048)),
                rope_theta=float(rope_theta),
                norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_id=_first_int(d.get("bos_token_id"), 1),
                eos_id=_first_int(d.get("eos_token_id"), 2),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r} that a Llama config must have") from None
        hd = d.get("head_dim")
        if hd is not None and int(hd) != cfg.head_dim:
            raise ConfigError(f"head_dim={hd} differs from hidden_size/num_attention_heads={cfg.head_dim}; "
                              "Llama 2 requires them equal")
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json (HF format) atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_hf(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read an HF config.json (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path} does not exist; an HF model directory needs a config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-create it or copy it from the model's source")
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf(d)

    def as_dict(self) -> dict:
        return asdict(self)


def _first_int(v, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, list):
        return int(v[0]) if v else default
    return int(v)


# Presets: shapes of well-known models (weights are never downloaded; these are for shapes and maths)
PRESETS = {
    "stories15M": LlamaConfig(dim=288, n_layers=6, n_heads=6, hidden_dim=768, vocab_size=32000, max_seq_len=256),
    "stories110M": LlamaConfig(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000, max_seq_len=1024),
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000,
                             max_seq_len=4096, norm_eps=1e-5),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000,
                              max_seq_len=4096, norm_eps=1e-5),
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                              vocab_size=32000, max_seq_len=4096, norm_eps=1e-5),
}
