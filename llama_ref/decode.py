"""The one-token decode step, fused: Llama.forward's arithmetic for T = 1 in fewer NumPy calls.

Decoding reads every weight once per new token and does little arithmetic with it, so for small models the time goes
to memory traffic and to NumPy's per-call overhead (a few microseconds per call, dozens of calls per layer).
`decode_step` computes what `model.forward([token], pos, cache, last_only=True)` computes; it differs in how:

    q, k, v      one matmul against [wq | wk | wv] (Llama packs them side by side; forward reads column views of it)
    gate, up     one matmul against [w_gate | w_up]
    RoPE         only the one new position: q and k of every head rotated together with (hs,) cos and signed sin
    RMSNorm      the mean square as a dot product, every scalar float32
    attention    queries grouped (nkv, rep, hs) against the cache, no mask (a new token sees every position)

Every number is computed by the same float32 operations in a different grouping, so logits agree with forward to
float32 rounding and greedy ids are the same (tests/test_decode.py). Models whose weights are quantized or stored
(not packed) have no side-by-side arrays; decode_step then calls forward itself. Chapter 06 times both.
"""
from __future__ import annotations

import numpy as np

from .model import F32, KVCache, Llama, softmax, swiglu


def can_fuse(model: Llama) -> bool:
    """True when every layer has its side-by-side qkv and gate/up arrays (packed float32 weights)."""
    return all(len(f) == 2 for f in model.fused)


def rope_rows(model: Llama, pos: int):
    """cos (hs,) and signed sin (hs,) of one position, in HF's rotate-half layout:
    x * cos + swap_halves(x) * sin_signed equals apply_rope_hf for one row."""
    cos, sin = (t[pos] for t in model.rope(pos + 1))                        # (hs/2,)
    return np.concatenate([cos, cos]), np.concatenate([-sin, sin])          # (hs,)


def rope_row(x, cos, sin):
    """RoPE at one position for rows x (B, n, hs) with rope_rows' tables: x * cos + swap_halves(x) * sin."""
    B, n, hs = x.shape
    swapped = x.reshape(B, n, 2, hs // 2)[:, :, ::-1].reshape(B, n, hs)
    return x * cos + swapped * sin


def rms_norm_row(x, weight, eps):
    """rms_norm for rows x (B, C): x / sqrt(mean(x^2) + eps) * weight, the mean square from one dot per row."""
    ms = np.einsum("bc,bc->b", x, x) / F32(x.shape[-1])                         # (B,)
    return x * (F32(1.0) / np.sqrt(ms + F32(eps)))[:, None] * weight


def decode_step(model: Llama, tokens, pos: int, cache: KVCache, mask=None):
    """Logits (B, V) for one new token per row, tokens (B,), at position pos; writes keys/values into cache.

    mask: an additive (B, 1, 1, 1, S) key mask (generate_batch's padding) or None."""
    if not can_fuse(model):
        return model.forward(np.asarray(tokens)[:, None], pos, cache, last_only=True, mask=mask)
    cfg, P = model.config, model.params
    tokens, _ = model.check_tokens(np.asarray(tokens)[:, None], pos, cache)
    B = tokens.shape[0]
    nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    nq, rep = nh * hs, nh // nkv
    cos, sin = rope_rows(model, pos)                                                    # (hs,)
    scale = F32(1.0 / np.sqrt(hs))
    key_mask = None if mask is None else mask.reshape(B, 1, 1, -1)                    # (B, 1, 1, S)

    x = P["embed"][tokens[:, 0]].astype(F32, copy=False)                              # (B, C)
    for i, (layer, fused) in enumerate(zip(P["layers"], model.fused)):
        # attention
        xn = rms_norm_row(x, layer["attn_norm"], cfg.norm_eps)                        # (B, C)
        qkv = xn @ fused["wqkv"]                                                      # (B, nq + 2*nkv*hs)
        qk = qkv[:, :nq + nkv * hs].reshape(B, nh + nkv, hs)                          # (B, nh+nkv, hs)
        qk = rope_row(qk, cos, sin)                                                   # RoPE at pos
        k = qk[:, nh:, None]                                                          # (B, nkv, 1, hs)
        v = qkv[:, nq + nkv * hs:].reshape(B, nkv, 1, hs)                             # (B, nkv, 1, hs)
        keys, values = cache.update(i, pos, k, v)                                     # (B, nkv, S, hs)
        q = qk[:, :nh].reshape(B, nkv, rep, hs) * scale                               # (B, nkv, rep, hs)
        scores = q @ keys.swapaxes(-1, -2)                                            # (B, nkv, rep, S)
        if key_mask is not None:
            scores = scores + key_mask
        heads = (softmax(scores) @ values).reshape(B, nq)                             # (B, nh*hs)
        x = x + heads @ layer["wo"]                                                   # (B, C)

        # feed-forward (SwiGLU)
        xn = rms_norm_row(x, layer["ffn_norm"], cfg.norm_eps)                         # (B, C)
        gate_up = xn @ fused["w_gate_up"]                                             # (B, 2H)
        H = gate_up.shape[1] // 2
        x = x + swiglu(gate_up[:, :H], gate_up[:, H:]) @ layer["w_down"]             # (B, C)
    cache.length = pos + 1
    return model.head(x)                                                              # (B, V)
