"""LlamaConfig: the handful of numbers that define a Llama 2 model, and their HF `config.json` round trip.

Chapter 00 introduces it; every other module takes one. Field names follow Meta's `ModelArgs`
(dim, n_layers, n_heads, n_kv_heads, ...); `to_hf` / `from_hf` translate to and from the names in a
Hugging Face `config.json` (hidden_size, num_hidden_layers, ...), so a directory we write is a valid
HF Llama checkpoint.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .inputs import read_json
from .output import write_text


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are changed for a longer context (transformers' `rope_type`; model.rope_freqs applies it):

      linear   position interpolation: every frequency / factor (position p looks like p / factor)
      dynamic  NTK-aware: past the trained length L, the base theta grows with the sequence length S to
               theta * (factor * S / L - (factor - 1)) ** (hs / (hs - 2)); up to L nothing changes
      llama3   Llama 3.1's rule: slow frequencies (wavelength > L / low_freq_factor) / factor, fast ones
               (wavelength < L / high_freq_factor) unchanged, a smooth blend between; L = original_max_len
    """
    kind: str                        # "linear" | "dynamic" | "llama3"
    factor: float
    low_freq_factor: float = 1.0     # llama3 only
    high_freq_factor: float = 4.0    # llama3 only
    original_max_len: int = 8192     # llama3 only: the context the model was pretrained with

    def to_hf(self) -> dict:
        d = {"rope_type": self.kind, "factor": float(self.factor)}
        if self.kind == "llama3":
            d.update(low_freq_factor=float(self.low_freq_factor), high_freq_factor=float(self.high_freq_factor),
                     original_max_position_embeddings=int(self.original_max_len))
        return d


ROPE_TYPES = ("linear", "dynamic", "llama3")
MAX_ROPE_FACTOR = 2.0 ** 20           # far beyond any published RoPE scaling; keeps factor x max_seq_len an integer
NORM_EPS_RANGE = (1e-38, 1.0)         # float32 keeps eps > 0 from 1e-38; above 1 it drowns mean(x^2) of a normed stream


def parse_rope_scaling(d: dict, key: str, source: str) -> RopeScaling | None:
    """transformers' rope_scaling / rope_parameters object -> RopeScaling (None for plain RoPE); ConfigError for a
    type llama_ref does not implement or a field out of range."""
    kind = d.get("rope_type", d.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: {key} asks for RoPE scaling of type {kind!r}; llama_ref implements "
                          f"{', '.join(ROPE_TYPES)} (running without it would give wrong outputs)")
    def number(name, default=None, integer=False):
        v = d.get(name, default)
        ok = _is_int(v) if integer else (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        if not ok or v <= 0:
            raise ConfigError(f"{source}: {key}.{name}={v!r} must be a positive {'integer' if integer else 'number'}")
        return int(v) if integer else float(v)
    factor = number("factor")
    if factor > MAX_ROPE_FACTOR:
        raise ConfigError(f"{source}: {key}.factor={factor:g} is above {MAX_ROPE_FACTOR:g}; published scalings stretch "
                          "RoPE by 4 to 64: is the config corrupt?")
    if kind != "llama3":
        if factor < 1:
            raise ConfigError(f"{source}: {key}.factor={factor} must be >= 1 (it stretches the context)")
        return RopeScaling(kind, factor)
    low, high = number("low_freq_factor"), number("high_freq_factor")
    if high <= low:
        raise ConfigError(f"{source}: {key}: high_freq_factor={high} must exceed low_freq_factor={low}")
    return RopeScaling(kind, factor, low, high, number("original_max_position_embeddings", integer=True))


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
    rope_scaling: RopeScaling | None = None   # RoPE for a longer context (linear, dynamic NTK, llama3); None: plain

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("rope_theta", "norm_eps"):                     # ints are fine here; store them as floats
            v = getattr(self, name)
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                object.__setattr__(self, name, float(v))
        self.validate()

    # derived sizes -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """hs: width of one attention head."""
        return self.dim // self.n_heads

    @property
    def context_len(self) -> int:
        """The longest sequence the model may run: max_seq_len, or factor x that with dynamic NTK scaling (whose
        purpose is to run past the trained length)."""
        s = self.rope_scaling
        return int(self.max_seq_len * s.factor) if s is not None and s.kind == "dynamic" else self.max_seq_len

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    def layer_matrix_params(self) -> int:
        """Weights in one layer's matrices: q and o (C x nh*hs), k and v (C x nkv*hs), gate, up and down (C x H)."""
        C, hs = self.dim, self.head_dim
        return C * self.n_heads * hs * 2 + C * self.n_kv_heads * hs * 2 + 3 * C * self.hidden_dim

    def n_params(self) -> int:
        """Number of parameters (the classifier counted once if tied)."""
        C, V = self.dim, self.vocab_size
        per_layer = 2 * C + self.layer_matrix_params()                          # two norm gains + the matrices
        return V * C + self.n_layers * per_layer + C + (0 if self.tie_embeddings else V * C)

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot describe a Llama model: types first (an int is an
        int, never a bool, a string or 64.9; floats are finite; tie_embeddings is a bool), then ranges, then how
        the fields fit together."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"config field {name}={v!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps"):
            v = getattr(self, name)
            if not isinstance(v, float) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"config field {name}={v!r} must be a finite number > 0")
        if not NORM_EPS_RANGE[0] <= self.norm_eps <= NORM_EPS_RANGE[1]:
            raise ConfigError(f"config field norm_eps={self.norm_eps!r} must be in [{NORM_EPS_RANGE[0]:g}, "
                              f"{NORM_EPS_RANGE[1]:g}]: RMSNorm adds it to the mean square of a float32 stream "
                              "(Llama 2 uses 1e-5)")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"config field tie_embeddings={self.tie_embeddings!r} must be true or false")
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v < self.vocab_size:
                raise ConfigError(f"config field {name}={v!r} must be a token id in [0, vocab_size={self.vocab_size})")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                              "the head size dim/n_heads must be an integer")
        if self.head_dim % 2:
            raise ConfigError(f"head size dim/n_heads={self.head_dim} must be even for RoPE (it rotates pairs)")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                              "grouped-query attention needs equal-sized groups")
        s = self.rope_scaling
        if s is not None:                                           # built directly, not by parse_rope_scaling
            if not isinstance(s, RopeScaling) or s.kind not in ROPE_TYPES:
                raise ConfigError(f"config field rope_scaling={s!r} must be None or a RopeScaling of type "
                                  f"{', '.join(ROPE_TYPES)}")
            parse_rope_scaling(s.to_hf(), "rope_scaling", "config")

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
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf(),
            "torch_dtype": "float32",
            "use_cache": True,
        }

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Read an HF Llama config dict: every field checked for its JSON type, then the config validated.
        Refuses the features this implementation does not have (other architectures, biases, RoPE scaling types other
        than linear, dynamic and llama3), from either spelling of the RoPE settings (rope_scaling, rope_parameters)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must hold a JSON object, got {type(d).__name__}")
        if d.get("model_type", "llama") != "llama":
            raise ConfigError(f"{source}: model_type={d.get('model_type')!r}: only Llama ('llama') configs are "
                              "supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r}: Llama's SwiGLU uses 'silu'")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias/mlp_bias=True is not Llama 2; these checkpoints are not "
                              "supported")
        rope_theta, rope_scaling = d.get("rope_theta"), None
        for key in ("rope_scaling", "rope_parameters"):            # transformers 4 / transformers 5 spelling
            scaling = d.get(key)
            if scaling is None:
                continue
            if not isinstance(scaling, dict):
                raise ConfigError(f"{source}: {key}={scaling!r} must be an object like {{\"rope_type\": \"default\"}} "
                                  "or null")
            parsed = parse_rope_scaling(scaling, key, source)
            if rope_scaling is not None and parsed != rope_scaling:
                raise ConfigError(f"{source}: rope_scaling and rope_parameters disagree ({rope_scaling} vs {parsed}); "
                                  "keep one of them")
            rope_scaling = rope_scaling or parsed
            if key == "rope_parameters" and rope_theta is None:
                rope_theta = scaling.get("rope_theta")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):                                   # generation may stop at several ids; the first
            eos = eos[0] if eos else None
        fields = {
            "dim": ("hidden_size", d.get("hidden_size")),
            "n_layers": ("num_hidden_layers", d.get("num_hidden_layers")),
            "n_heads": ("num_attention_heads", d.get("num_attention_heads")),
            "n_kv_heads": ("num_key_value_heads", d.get("num_key_value_heads", d.get("num_attention_heads"))),
            "hidden_dim": ("intermediate_size", d.get("intermediate_size")),
            "vocab_size": ("vocab_size", d.get("vocab_size")),
            "max_seq_len": ("max_position_embeddings", d.get("max_position_embeddings", 2048)),
            "rope_theta": ("rope_theta", 10000.0 if rope_theta is None else rope_theta),
            "norm_eps": ("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": ("tie_word_embeddings", d.get("tie_word_embeddings", False)),
            "bos_id": ("bos_token_id", 1 if d.get("bos_token_id") is None else d.get("bos_token_id")),
            "eos_id": ("eos_token_id", 2 if eos is None else eos),
        }
        for name in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"):
            key, value = fields[name]
            if key not in d:
                raise ConfigError(f"{source} lacks the field {key!r} that a Llama config must have")
        cfg = config_from_fields(fields, source)
        if rope_scaling is not None:
            cfg = cfg.replace(rope_scaling=rope_scaling)
        hd = d.get("head_dim")
        if hd is not None and (not _is_int(hd) or hd != cfg.head_dim):
            raise ConfigError(f"{source}: head_dim={hd!r} differs from hidden_size/num_attention_heads={cfg.head_dim}; "
                              "Llama 2 requires them equal")
        return cfg

    def save(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write config.json (HF format) atomically (an existing file only with force)."""
        write_text(path, json.dumps(self.to_hf(), indent=2) + "\n", force=force)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read an HF config.json (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path} does not exist; an HF model directory needs a config.json")
        d = read_json(path, "config.json", ConfigError)            # regular file, size cap, any bad JSON refused
        return cls.from_hf(d, source=str(path))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_hf()
        return d


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


_KINDS = {"dim": "int", "n_layers": "int", "n_heads": "int", "n_kv_heads": "int", "hidden_dim": "int",
          "vocab_size": "int", "max_seq_len": "int", "rope_theta": "float", "norm_eps": "float",
          "tie_embeddings": "bool", "bos_id": "int", "eos_id": "int"}


def config_from_fields(fields: dict, source: str) -> LlamaConfig:
    """The one typed parser: {our field: (the source's name for it, raw value)} -> a validated LlamaConfig.

    HF config.json, GGUF metadata and llama2.c headers all come through here, so every source gets the same
    checks and messages that name the source's own key: an int must be an int (not a bool, a string or 64.9), a
    float a finite number, a bool a JSON true/false. Nothing is allocated before this returns.
    """
    values = {}
    for name, (key, v) in fields.items():
        kind = _KINDS[name]
        if kind == "int" and not _is_int(v):
            raise ConfigError(f"{source}: {key}={v!r} must be an integer"
                              + (" (a whole number, not a string or a fraction)" if v is not None else ""))
        if kind == "float" and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                                or not math.isfinite(v)):
            raise ConfigError(f"{source}: {key}={v!r} must be a finite number")
        if kind == "bool" and not isinstance(v, (bool, np.bool_)):
            raise ConfigError(f"{source}: {key}={v!r} must be true or false (a JSON boolean, not a string)")
        values[name] = int(v) if kind == "int" else float(v) if kind == "float" else bool(v)
    try:
        return LlamaConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


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
