"""llama2.c's .bin checkpoints (what run.c reads): read memory-mapped, written atomically.

Chapter 00 (the model on disk) reads it. The format:

    version 0 (legacy, what run.c reads), all little-endian:
      int32[7]  dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len      (28 bytes)
                vocab_size < 0 means the classifier is NOT shared with the embedding (wcls is stored at the end)
      float32   token_embedding (V, C)
                rms_att (L, C)  wq (L, nh*hs, C)  wk (L, nkv*hs, C)  wv (L, nkv*hs, C)  wo (L, C, nh*hs)
                rms_ffn (L, C)  w1 (L, H, C)  w2 (L, C, H)  w3 (L, H, C)        w1 = gate, w2 = down, w3 = up
                rms_final (C,)
                freq_cis_real (seq_len, hs/2)  freq_cis_imag (seq_len, hs/2)   legacy RoPE tables, run.c skips them
                wcls (V, C)                                                     only when vocab_size < 0
    version 1 (export.py --version 1): a 256-byte header
      uint32 magic 0x616b3432 ("ak42")  int32 version=1  int32[7] as above (vocab_size > 0)  uint8 shared_classifier
      zero padding to 256; then float32: rms_att (L, C), rms_ffn (L, C), rms_final (C,), token_embedding (V, C),
      wq, wk, wv, wo, w1, w2, w3 (shapes as above), wcls (V, C) if not shared. No RoPE tables.
    Matrices are (out, in) like torch's nn.Linear; q/k rows are in Meta's interleaved-pair RoPE layout.
    The file stores neither rope_theta nor norm_eps: run.c hard-codes 10000 and 1e-5.

The names of the arrays are the llama2.c column of weights.py's table. q/k are read through a RowPermuted view (HF order,
no copy) and written back in Meta's pairs.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from .config import LlamaConfig, config_from_fields
from .errors import CheckpointError, ConfigError
from .output import atomic_file, check_output, inputs_of
from .matrices import Float32Matrix
from .weights import (HF, LAYER_TENSORS, LLAMA2C, MODEL_TENSORS, check_weights, layer_names, permute_qk_hf_to_meta,
                      qk_rows_meta_to_hf)

F32 = np.float32

LLAMA2C_MAGIC = 0x616B3432
LLAMA2C_THETA, LLAMA2C_EPS = 10000.0, 1e-5


def _llama2c_layout(config, version, shared):
    """[(name, shape)] in file order; names are llama2.c's, '_skip' entries are legacy tables we do not keep."""
    C, H, V, L = config.dim, config.hidden_dim, config.vocab_size, config.n_layers
    q, kv, hs = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.head_dim
    mats = [("wq", (L, q, C)), ("wk", (L, kv, C)), ("wv", (L, kv, C)), ("wo", (L, C, q))]
    ffn = [("w1", (L, H, C)), ("w2", (L, C, H)), ("w3", (L, H, C))]
    if version == 0:
        layout = [("token_embedding", (V, C)), ("rms_att", (L, C)), *mats, ("rms_ffn", (L, C)), *ffn,
                  ("rms_final", (C,)), ("_skip_freq_cis_real", (config.max_seq_len, hs // 2)),
                  ("_skip_freq_cis_imag", (config.max_seq_len, hs // 2))]
    else:
        layout = [("rms_att", (L, C)), ("rms_ffn", (L, C)), ("rms_final", (C,)), ("token_embedding", (V, C)),
                  *mats, *ffn]
    return layout if shared else layout + [("wcls", (V, C))]


def read_llama2c_header(path):
    """(config, version, shared_classifier, data_offset) from a llama2.c .bin header, validated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file; give a llama2.c .bin")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    if head[:2] == b"PK":
        raise CheckpointError(f"{path} is a PyTorch zip checkpoint, not a llama2.c .bin; llama_ref does not read "
                              "pickles: save it as safetensors with transformers' save_pretrained first")
    if len(head) < 28:
        raise CheckpointError(f"{path} is {size} bytes, too short for a llama2.c header (28 bytes); the file is "
                              "truncated or not a llama2.c checkpoint")
    (magic,) = struct.unpack("<I", head[:4])
    if magic == LLAMA2C_MAGIC:
        if len(head) < 256:
            raise CheckpointError(f"{path}: a versioned llama2.c file needs a 256-byte header but the file is "
                                  f"{size} bytes; it is truncated")
        (version,) = struct.unpack("<i", head[4:8])
        if version == 2:
            raise CheckpointError(f"{path} is a llama2.c version-2 (Q8_0 quantized) file, which llama_ref does not "
                                  "read; export with llama2.c's export.py --version 0 or 1, or use GGUF for quantized "
                                  "models")
        if version != 1:
            raise CheckpointError(f"{path} is a llama2.c file of unknown version {version}; llama_ref reads versions "
                                  "0 and 1")
        dims = struct.unpack("<7i", head[8:36])
        shared, offset = bool(head[36]), 256
    else:
        version, dims, offset = 0, struct.unpack("<7i", head[:28]), 28
        shared = dims[5] > 0                                     # negative vocab_size: unshared classifier
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = dims
    fields = {"dim": ("dim", dim), "hidden_dim": ("hidden_dim", hidden_dim), "n_layers": ("n_layers", n_layers),
              "n_heads": ("n_heads", n_heads), "n_kv_heads": ("n_kv_heads", n_kv_heads),
              "vocab_size": ("vocab_size", abs(vocab_size)), "max_seq_len": ("seq_len", seq_len),
              "rope_theta": ("rope_theta", LLAMA2C_THETA), "norm_eps": ("norm_eps", LLAMA2C_EPS),
              "tie_embeddings": ("shared classifier", shared), "bos_id": ("bos", 1), "eos_id": ("eos", 2)}
    try:
        config = config_from_fields(fields, f"{path} (llama2.c header {dims})")
    except ConfigError as e:
        raise CheckpointError(f"{e}: the header does not describe a Llama model; the file is corrupt or not a "
                              "llama2.c checkpoint") from None
    return config, version, shared, offset


def load_llama2c(path, check_finite=True):
    """Load a llama2.c .bin (version 0 or 1) as (config, HF-named weights), memory-mapped.

    Every tensor is a view into the file; q and k are presented in HF's rotate-half row order by a RowPermuted view
    of Meta's pair layout (no copy).
    The file size must match the header exactly: a truncated download is caught here, not as garbage logits.
    """
    path = Path(path)
    config, version, shared, offset = read_llama2c_header(path)
    layout = _llama2c_layout(config, version, shared)
    expected = offset + 4 * sum(math.prod(s) for _, s in layout)
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise CheckpointError(f"{path}: the llama2.c header (dim={config.dim}, n_layers={config.n_layers}, "
                              f"vocab_size={config.vocab_size}, seq_len={config.max_seq_len}, "
                              f"{'shared' if shared else 'unshared'} classifier) implies {expected} bytes but the "
                              f"file has {actual}: it is {what}; re-download or re-export it")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    t, pos = {}, offset
    for name, shape in layout:
        n = 4 * math.prod(shape)
        t[name] = mm[pos:pos + n].view("<f4").reshape(shape)                   # view into the file
        pos += n

    q_rows = qk_rows_meta_to_hf(config.n_heads * config.head_dim, config.n_heads)
    k_rows = qk_rows_meta_to_hf(config.n_kv_heads * config.head_dim, config.n_kv_heads)
    rows = {"wq": q_rows, "wk": k_rows}                           # q/k: Meta's pairs -> HF's rotate-half, as views
    w = {MODEL_TENSORS["embed"][HF]: t["token_embedding"]}
    for i in range(config.n_layers):
        for short, name in layer_names(i).items():
            a = t[LAYER_TENSORS[short][LLAMA2C]][i]                   # llama2.c stacks each tensor over layers
            w[name] = Float32Matrix(a).take_rows(rows[short]) if short in rows else a
    w[MODEL_TENSORS["norm"][HF]] = t["rms_final"]
    if not shared:
        w[MODEL_TENSORS["lm_head"][HF]] = t["wcls"]
    check_weights(config, w, source=path, check_finite=check_finite)
    return config, w


def legacy_rope_tables(config: LlamaConfig):
    """freq_cis_real, freq_cis_imag of a version-0 file: cos and sin (seq_len, hs/2) of p * theta^(-2i/hs), rounded
    once from float64 (the angles model.rope_freqs gives; run.c skips the tables and recomputes them)."""
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    angles = np.outer(np.arange(config.max_seq_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def save_llama2c(path, config: LlamaConfig, weights: dict, version=0, force=False):
    """Write HF-named weights as a llama2.c .bin (version 0, what run.c reads, or 1), atomically.

    q/k rows go back to Meta's pair layout (permute_qk_hf_to_meta). The classifier is written as shared when
    config.tie_embeddings (version 0: positive vocab_size), else appended as wcls (version 0: negative vocab_size).
    The format cannot store rope_theta, norm_eps, bos/eos: run.c assumes theta 10000, eps 1e-5 (BOS 1, EOS 2), so a
    config with another theta or eps is refused rather than silently changed.
    """
    path = check_output(path, force=force, inputs=inputs_of(weights))
    if version not in (0, 1):
        raise CheckpointError(f"llama2.c version {version!r} is not written by llama_ref; use version=0 (run.c) or 1")
    if config.rope_scaling is not None:
        raise CheckpointError(f"a llama2.c .bin cannot store RoPE scaling ({config.rope_scaling.kind}, factor "
                              f"{config.rope_scaling.factor:g}); run.c knows plain RoPE only: save this model as an HF "
                              "directory (save_model) instead")
    if config.rope_theta != LLAMA2C_THETA or config.norm_eps != LLAMA2C_EPS:
        raise CheckpointError(f"a llama2.c .bin cannot store rope_theta={config.rope_theta} / norm_eps="
                              f"{config.norm_eps}; run.c hard-codes {LLAMA2C_THETA:g} / {LLAMA2C_EPS:g}: save this "
                              "model as an HF directory (save_model) or GGUF instead")
    check_weights(config, weights, source="the weights to save")
    if max(config.dim, config.hidden_dim, config.vocab_size, config.max_seq_len) >= 2 ** 31:
        raise CheckpointError(f"a llama2.c header holds 32-bit signed numbers; max_seq_len={config.max_seq_len:,} (or "
                              "another size) does not fit: lower it in the config before exporting")
    L, nh, nkv = config.n_layers, config.n_heads, config.n_kv_heads
    shared = config.tie_embeddings

    meta = {"wq": lambda a: permute_qk_hf_to_meta(a, nh), "wk": lambda a: permute_qk_hf_to_meta(a, nkv)}

    def stack(short):                                     # one layer at a time, q/k back to Meta's pairs
        fn = meta.get(short, lambda a: a)
        return (fn(np.asarray(weights[LAYER_TENSORS[short][HF].format(i=i)], dtype=F32)) for i in range(L))

    cos, sin = legacy_rope_tables(config)                                               # (seq_len, hs/2) each
    parts = {names[LLAMA2C]: stack(short) for short, names in LAYER_TENSORS.items()}    # rms_att, wq, ..., w3
    parts.update({names[LLAMA2C]: [weights.get(names[HF])] for names in MODEL_TENSORS.values()})
    parts.update({"_skip_freq_cis_real": [cos], "_skip_freq_cis_imag": [sin]})
    dims = (config.dim, config.hidden_dim, L, nh, nkv, config.vocab_size, config.max_seq_len)
    with atomic_file(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            if version == 0:
                f.write(struct.pack("<7i", *dims[:5], dims[5] if shared else -dims[5], dims[6]))
            else:
                head = struct.pack("<Ii7iB", LLAMA2C_MAGIC, 1, *dims, int(shared))
                f.write(head + b"\0" * (256 - len(head)))
            for name, _ in _llama2c_layout(config, version, shared):
                for a in parts[name]:                                          # one layer at a time
                    f.write(memoryview(np.ascontiguousarray(a, dtype="<f4").reshape(-1)).cast("B"))
    return path
