"""The Llama 2 forward pass in NumPy: the one file to read.

Chapters 02-05 build each piece (RMSNorm, RoPE, attention with GQA and the KV cache, SwiGLU, the block) from a
few lines and then call these functions. Read top to bottom:

    rms_norm -> rope (HF rotate-half and Meta interleaved pairs, and the q/k permutation between them)
    -> softmax -> attention (causal, MHA/GQA, KV cache) -> swiglu -> block -> Llama.forward

`Llama.forward` is the one inference path: the prompt (prefill), each new token (decode, T = 1), a padded batch, a
trace. Matrices read by the same input are multiplied as one, [wq | wk | wv] and [w_gate | w_up], so a decode step
makes few NumPy calls per layer (for a small model each call's overhead costs as much as its arithmetic).

Notation (llm.c style): B batch, T new tokens, S = start_pos + T attended positions, C model dim,
nh query heads, nkv key/value heads, hs head size, H SwiGLU hidden size, V vocabulary size.

Everything is float32 end to end. Two NumPy traps are avoided on purpose: a NumPy float64 *scalar* (like
`np.sqrt(hs)`) silently promotes a float32 array to float64, so every scalar here is `np.float32`; and
`x @ W.T` with a row-major (out, in) W runs matrix-vector products at half speed, so `Llama` packs every float
matmul weight once as a contiguous (in, out) array (`Llama.params`, the one copy it holds; `Llama.weights` shows the
same arrays under their HF names and (out, in) shapes, for exporters).
"""
from __future__ import annotations

import numpy as np

from .config import LlamaConfig
from .errors import ContextLengthError, InputError
from .matrices import SideBySide, as_f32, as_stored
from .trace import Trace, tap
from .weights import (HF, MODEL_TENSORS, check_weights, layer_names, permute_qk_hf_to_meta,  # noqa: F401 (chapters)
                      permute_qk_meta_to_hf, qk_rows_hf_to_meta, qk_rows_meta_to_hf)

F32 = np.float32


# ------------------------------------------------------------------------------------------------
# RMSNorm

def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis. Unlike LayerNorm: no mean subtraction, no bias.
    (The mean as sum / C: np.mean's numbers without its Python-level wrapper, which costs more than a decode step's
    whole sum.)"""
    ms = np.square(x).sum(axis=-1, keepdims=True) / F32(x.shape[-1])   # (..., 1)
    ms += F32(eps)
    np.sqrt(ms, out=ms)
    return x * np.divide(F32(1.0), ms, out=ms) * weight                # x * (1 / sqrt(ms + eps)) * weight


# ------------------------------------------------------------------------------------------------
# RoPE: rotary position embeddings

def rope_freqs(head_dim, max_len, theta=10000.0, scaling=None, trained_len=None):
    """cos and sin tables, each (max_len, hs/2): angle[p, i] = p * theta^(-2i/hs).

    Computed in float64 and rounded once to float32 (at position 4096 the float32 angle would already be off by ~1e-4 rad).
    scaling (config.RopeScaling) stretches the frequencies for a longer context, as transformers' rope types do;
    trained_len is the context the model was trained for (dynamic NTK changes nothing up to it).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))   # (hs/2,)
    if scaling is not None:
        inv_freq = scaled_inv_freq(inv_freq, head_dim, max_len, theta, scaling, trained_len)
    angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)                       # (max_len, hs/2)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def rope_tables(config, length):
    """cos, sin (length, hs/2) for a config: its theta and its RoPE scaling (every caller builds them here)."""
    return rope_freqs(config.head_dim, length, config.rope_theta, config.rope_scaling, config.max_seq_len)


def scaled_inv_freq(inv_freq, head_dim, seq_len, theta, scaling, trained_len):
    """The three ways to stretch RoPE past the trained context (config.RopeScaling), on the frequencies (hs/2,)."""
    f = scaling.factor
    if scaling.kind == "linear":                        # position interpolation: p -> p / factor
        return inv_freq / f
    if scaling.kind == "dynamic":                       # NTK: a larger base once the sequence outgrows training
        if seq_len <= trained_len:
            return inv_freq
        base = theta * ((f * seq_len / trained_len) - (f - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    L = scaling.original_max_len                        # llama3: by wavelength, slow ones / factor, fast ones kept
    wavelen = 2 * np.pi / inv_freq
    smooth = (L / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / f + smooth * inv_freq
    return np.where(wavelen > L / scaling.low_freq_factor, inv_freq / f,
                    np.where(wavelen < L / scaling.high_freq_factor, inv_freq, blended))


def apply_rope_hf(x, cos, sin):
    """HF's rotate-half form: dimension i is paired with i + hs/2. x (..., hs), cos/sin (..., hs/2) broadcast against
    x's halves (the forward rotates q and k of every head at once: x (B, T, nh+nkv, hs), cos (T, 1, hs/2)).

        out[:hs/2] = x1 * cos - x2 * sin        out[hs/2:] = x2 * cos + x1 * sin
    """
    half = x.shape[-1] // 2
    pairs = x.reshape(*x.shape[:-1], 2, half)                   # (..., 2, hs/2): x1, x2 (a view)
    out = pairs * cos[..., None, :]                             # x1 * cos, x2 * cos
    swapped = pairs[..., ::-1, :] * sin[..., None, :]           # x2 * sin, x1 * sin
    out[..., 0, :] -= swapped[..., 0, :]
    out[..., 1, :] += swapped[..., 1, :]
    return out.reshape(*out.shape[:-2], 2 * half)


def apply_rope_meta(x, cos, sin):
    """Meta's form: dimensions (0,1), (2,3), ... are pairs, each rotated like a complex number by e^{i*angle}."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]                 # (..., T, hs/2) each
    out = np.empty_like(x)
    out[..., 0::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out


# ------------------------------------------------------------------------------------------------
# Attention

def softmax(x, axis=-1):
    """Numerically stable softmax; rows that are entirely -inf would give NaN, a causal mask never makes one."""
    e = x - x.max(axis=axis, keepdims=True)              # one new array, then in place: a long prefill's
    np.exp(e, out=e)                                      # (B, nh, T, S) scores are megabytes, and every
    e /= e.sum(axis=axis, keepdims=True)                  # temporary of that size costs fresh pages
    return e


def causal_mask(T, S):
    """Additive mask (T, S): query t sits at position S-T+t and may see keys at positions <= its own."""
    q_pos = np.arange(S - T, S)[:, None]
    k_pos = np.arange(S)[None, :]
    return np.where(k_pos <= q_pos, F32(0.0), F32(-np.inf)).astype(F32)


def attention(q, k, v, mask=None):
    """Scaled dot-product attention with grouped-query heads.

    q (B, nh, T, hs), k and v (B, nkv, S, hs), mask (T, S) or (B, 1, 1, T, S) additive. Query head h reads key/value
    head h // (nh/nkv): we view q as (B, nkv, rep, T, hs) instead of copying k and v rep times.
    Returns (out (B, nh, T, hs), probs (B, nh, T, S)).
    """
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    rep = nh // nkv
    if T == 1:                                      # one new token: its rep query heads are the rows of one product
        qg = q.reshape(B, nkv, rep, hs) * F32(1.0 / np.sqrt(hs))            # (B, nkv, rep, hs)
        scores = qg @ k.swapaxes(-1, -2)                                    # (B, nkv, rep, S)
        if mask is not None:
            scores += mask.reshape(-1, 1, 1, S) if np.ndim(mask) == 5 else mask   # (B, 1, 1, 1, S) -> (B, 1, 1, S)
        probs = softmax(scores)                                             # (B, nkv, rep, S)
        return (probs @ v).reshape(B, nh, 1, hs), probs.reshape(B, nh, 1, S)
    qg = q.reshape(B, nkv, rep, T, hs) * F32(1.0 / np.sqrt(hs))             # (B, nkv, rep, T, hs)
    scores = qg @ k[:, :, None].swapaxes(-1, -2)                            # (B, nkv, rep, T, S)
    if mask is not None:
        scores += mask                                                      # scores is our own new array
    probs = softmax(scores)                                                 # (B, nkv, rep, T, S)
    out = probs @ v[:, :, None]                                             # (B, nkv, rep, T, hs)
    return out.reshape(B, nh, T, hs), probs.reshape(B, nh, T, S)


ATTENTION_BLOCK = 128      # queries per block: small score matrices that stay in cache (the trainer uses it too)


def causal_attention(q, k, v, block: int = ATTENTION_BLOCK):
    """attention(q, k, v, causal_mask(T, S)) for a prompt, `block` queries at a time: a block whose last query sits at
    position p is scored against keys 0..p only, so most of the masked upper triangle is never computed (half the
    scores of a long prompt). Same numbers as one masked call up to float32 summation order. Returns out (B, nh, T, hs);
    a trace asks for every probability, so forward then makes the one masked call instead."""
    T, S = q.shape[2], k.shape[2]
    if T == 1:
        return attention(q, k, v)[0]                                        # one new token sees every key
    out = np.empty_like(q)                                                  # (B, nh, T, hs)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        seen = S - T + t1                                                   # keys 0..seen-1 visible to this block
        out[:, :, t0:t1] = attention(q[:, :, t0:t1], k[:, :, :seen], v[:, :, :seen], causal_mask(t1 - t0, seen))[0]
    return out


class KVCache:
    """Keys and values of every position seen so far, per layer: k[l], v[l] are (B, nkv, capacity, hs).

    Decoding one token then costs one new key/value per layer instead of recomputing the whole prefix.
    `length` is how many positions are filled; `max_len` how many it may ever hold. The arrays start small and
    double when a write needs more room (up to max_len), so a model that declares a huge context only pays for the
    positions it uses.
    """

    def __init__(self, config: LlamaConfig, batch_size=1, max_len=None):
        self.max_len = max_len or config.context_len
        self.shape = (batch_size, config.n_kv_heads, config.head_dim)             # (B, nkv, hs) around the time axis
        capacity = min(self.max_len, 256)
        self.k = [self._zeros(capacity) for _ in range(config.n_layers)]
        self.v = [self._zeros(capacity) for _ in range(config.n_layers)]
        self.batch_size = batch_size
        self.length = 0

    def _zeros(self, capacity):
        B, nkv, hs = self.shape
        return np.zeros((B, nkv, capacity, hs), F32)

    def update(self, layer, start_pos, k, v):
        """Write new k, v (B, nkv, T, hs) at [start_pos, start_pos+T); return all keys/values up to there."""
        end = start_pos + k.shape[2]
        if end > self.k[layer].shape[2]:                                           # grow by doubling
            capacity = min(self.max_len, max(end, 2 * self.k[layer].shape[2]))
            for store in (self.k, self.v):
                grown = self._zeros(capacity)
                grown[:, :, :store[layer].shape[2]] = store[layer]
                store[layer] = grown
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def nbytes(self):
        """Bytes held now (the arrays grow as positions are written; memory.kv_cache_bytes gives a full cache's)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


# ------------------------------------------------------------------------------------------------
# Feed-forward

def silu(x):
    """x * sigmoid(x) = x / (1 + exp(-x)). (errstate: exp(-x) overflows to inf for x < -88, which correctly gives -0.)"""
    with np.errstate(over="ignore"):
        d = np.exp(-x)
    d += F32(1.0)
    return np.divide(x, d, out=d)


def swiglu(gate, up):
    """SwiGLU's gating: silu(x W_gate) * (x W_up)."""
    h = silu(gate)
    h *= up
    return h


def linear(x, w):
    """x @ W for a packed (in, out) weight; stored weights (matrices.py, quant.py) bring their own matmul (x @ W.T of
    their (out, in) matrix). x (..., in) -> (..., out). One new token per row, x (B, 1, in), multiplies as (B, in):
    BLAS's matrix-vector product, which a stacked (B, 1, in) matmul does not always reach."""
    if not isinstance(w, np.ndarray):
        return w.matmul(x)
    if x.ndim == 3 and x.shape[1] == 1:
        return (x[:, 0] @ w)[:, None]                                        # (B, 1, out)
    return x @ w


# ------------------------------------------------------------------------------------------------
# The model

SIDE_BY_SIDE = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}    # read by the same input


class Llama:
    """A Llama 2 model: config + weights (HF names, HF layout), ready for a float32 forward.

    A weight may be a float array or any stored matrix (matrices.py: float16/bfloat16 memory maps, quantized blocks):
    anything with `.matmul(x) -> x @ W.T` is used as it is. pack=True (the fast path for models that fit) turns the
    float ones into contiguous float32 copies once; pack=False keeps every weight as stored, expanded one tile per
    matmul, so a 7B model runs in the memory its file takes. Quantized weights always stay quantized.

    `params` is the one copy of the weights the model holds: {"embed": (V, C), "layers": [{"attn_norm": (C,),
    "wqkv", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate_up", "w_gate", "w_up", "w_down"}], "norm": (C,),
    "lm_head"}. A packed matrix is a float32 (in, out) array; "wqkv" = [wq | wk | wv] (C, nq+2nkv*hs) and
    "w_gate_up" = [w_gate | w_up] (C, 2H) are side by side, and the layer's wq ... w_up are column views of them.
    A stored matrix keeps its (out, in) form and its own matmul, and the two side-by-side entries are
    matrices.SideBySide objects over the parts. `weights` derives the HF-named (out, in) view of the same arrays.
    """

    def __init__(self, config: LlamaConfig, weights: dict, pack: bool = True):
        self.config = config
        check_weights(config, weights, check_finite=False)   # names and shapes; readers also scan for NaN/Inf
        self.packed = pack
        self.params = self._pack(weights, pack)
        self._cos = self._sin = np.zeros((0, config.head_dim // 2), F32)

    @property
    def weights(self) -> dict:
        """{HF name: (out, in) weight} in a checkpoint's order, derived from `params` without copying: a packed
        matrix appears as the transposed view of its (in, out) array, a stored one as itself; a tied classifier is
        the embedding. For exporters, quantization and inspection (Llama(config, model.weights) is the same model)."""
        P = self.params

        def hf(w):
            return w.T if isinstance(w, np.ndarray) and w.ndim == 2 else w

        out = {MODEL_TENSORS["embed"][HF]: P["embed"]}
        for i, layer in enumerate(P["layers"]):
            out.update({name: hf(layer[short]) for short, name in layer_names(i).items()})
        out[MODEL_TENSORS["norm"][HF]] = P["norm"]
        if not self.config.tie_embeddings:
            out[MODEL_TENSORS["lm_head"][HF]] = hf(P["lm_head"])
        return out

    def rope(self, end):
        """cos, sin (end, hs/2) for positions [0, end). Built on first use and grown by doubling (up to
        max_seq_len), so a config may declare a context of 2^40 tokens and only the positions used cost memory.
        Dynamic NTK scaling past max_seq_len: the tables of a sequence of length `end` (as transformers computes them
        for the longest position seen), rebuilt when end changes."""
        cfg = self.config
        dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic" and end > cfg.max_seq_len
        if dynamic and end != self._cos.shape[0]:
            self._cos, self._sin = rope_tables(cfg, end)
        elif not dynamic and (end > self._cos.shape[0] or self._cos.shape[0] > cfg.max_seq_len):
            n = min(cfg.max_seq_len, max(end, 2 * self._cos.shape[0], 256))
            self._cos, self._sin = rope_tables(cfg, n)
        return self._cos[:end], self._sin[:end]

    @property
    def cos(self):
        """The cos table for the whole context (chapters slice it; builds max_seq_len rows)."""
        return self.rope(self.config.max_seq_len)[0]

    @property
    def sin(self):
        return self.rope(self.config.max_seq_len)[1]

    def _pack(self, w, pack):
        """The weights as the forward reads them (see the class docstring): (in, out) float32 copies when packing,
        else as stored; the norms always float32."""
        cfg = self.config

        def matrix(name):                      # (in, out) float32 copy, or the stored matrix used as it is
            m = w[name]
            return as_f32(name, m, transpose=True) if pack and not getattr(m, "quantized", False) else as_stored(m)

        embed_name, norm_name, head_name = (MODEL_TENSORS[k][HF] for k in ("embed", "norm", "lm_head"))
        embed = w[embed_name]                                                      # (V, C): rows are looked up
        if isinstance(embed, np.ndarray) and embed.dtype == F32:
            if pack and not np.isfinite(embed).all():
                as_f32(embed_name, embed)                    # raises with a count of the bad values
        elif pack and not getattr(embed, "quantized", False):
            embed = as_f32(embed_name, embed)
        else:
            embed = as_stored(embed)
        layers = []
        for i in range(cfg.n_layers):                        # {"attn_norm": (C,), "wq": (C, nh*hs) or stored, ...}
            layer = {short: (as_f32(name, w[name]) if short.endswith("norm") else matrix(name))
                     for short, name in layer_names(i).items()}
            for fused, parts in SIDE_BY_SIDE.items():
                layer[fused] = self._side_by_side(layer, parts)
            layers.append(layer)
        if cfg.tie_embeddings and not isinstance(embed, np.ndarray):                # stored (not packed) above:
            head = embed                                                           # one stored table, two uses
        else:
            head = matrix(embed_name if cfg.tie_embeddings else head_name)
        return {
            "embed": embed,                                                            # (V, C)
            "layers": layers,
            "norm": as_f32(norm_name, w[norm_name]),                                   # (C,)
            "lm_head": head,                                                           # (C, V) packed, or stored
        }

    @staticmethod
    def _side_by_side(layer, parts):
        """Matrices read by the same input as one: packed (in, out) arrays are concatenated, (in, out1+out2+..), and
        the layer's own entries become column views of the result (same numbers, no second copy); stored matrices
        are wrapped in a SideBySide, each part multiplied in its own format."""
        if not all(isinstance(layer[p], np.ndarray) for p in parts):
            return SideBySide([as_stored(layer[p]) for p in parts])
        fused = np.concatenate([layer[p] for p in parts], axis=1)                   # (in, out1+out2+..)
        start = 0
        for p in parts:
            width = layer[p].shape[1]
            layer[p] = fused[:, start:start + width]                                   # (in, out_p) column view
            start += width
        return fused

    def new_cache(self, batch_size=1, max_len=None) -> KVCache:
        return KVCache(self.config, batch_size, max_len)

    # --------------------------------------------------------------------------------------------
    def forward(self, tokens, start_pos=0, cache: KVCache | None = None, trace: Trace | None = None,
                last_only=False, mask=None):
        """Logits for `tokens` (T,) or (B, T) placed at positions start_pos.. start_pos+T-1.

        The one inference path: a prompt (prefill) and each new token (decode: T = 1 with a cache) run through it.
        With a cache, keys/values of earlier positions come from it and the new ones are written into it.
        Returns float32 logits (T, V) or (B, T, V); with last_only, only the last position's (V,) or (B, V)
        (then the norm.out and logits taps are (B, C) and (B, V)).
        mask: an additive (B, 1, 1, T, S) array (0 where a query may see a key, -inf where not) used instead of the
        causal mask: generate_batch hides each row's left padding with it.
        """
        tokens, squeeze = self.check_tokens(tokens, start_pos, cache)
        P = self.params
        B, T = tokens.shape
        S = start_pos + T
        cos, sin = (t[start_pos:S, None] for t in self.rope(S))                # (T, 1, hs/2): every head alike

        x = tap(trace, "embed", P["embed"][tokens].astype(F32, copy=False))   # (B, T, C)
        L = len(P["layers"])
        for i, layer in enumerate(P["layers"]):
            only_last = last_only and i == L - 1 and trace is None                 # the head reads one row only
            x = self.block(i, layer, x, start_pos, cos, sin, mask, cache, trace, only_last)
        if cache is not None:
            cache.length = S
        if last_only:
            x = x[:, -1]                                                        # (B, C): classify the last only
        logits = self.head(x, trace)                                            # (B, T, V) or (B, V)
        return logits[0] if squeeze else logits

    def block(self, i, layer, x, start_pos, cos, sin, mask, cache, trace, only_last=False):
        """One pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h)). x (B, T, C), cos/sin (T, 1, hs/2).

        only_last: return the last row only, (B, 1, C). Every row's key and value still go into the cache, but only
        the last query attends and only the last row goes through o_proj and the feed-forward: the last block of a
        prompt whose logits are wanted for its last position only (llama.cpp skips the same work)."""
        cfg = self.config
        B, T, C = x.shape
        nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        name = f"layers.{i}."

        # attention: q, k and v from one matmul against [wq | wk | wv]
        xn = tap(trace, name + "attn_norm", rms_norm(x, layer["attn_norm"], cfg.norm_eps))   # (B, T, C)
        qkv = linear(xn, layer["wqkv"]).reshape(B, T, nh + 2 * nkv, hs)                      # (B, T, nh+2nkv, hs)
        qk = apply_rope_hf(qkv[:, :, :nh + nkv], cos, sin)                                    # q and k heads at once
        q = tap(trace, name + "attn.q", qk[:, :, :nh].transpose(0, 2, 1, 3))                  # (B, nh, T, hs)
        k = tap(trace, name + "attn.k", qk[:, :, nh:].transpose(0, 2, 1, 3))                  # (B, nkv, T, hs)
        v = tap(trace, name + "attn.v", qkv[:, :, nh + nkv:].transpose(0, 2, 1, 3))           # (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.update(i, start_pos, k, v)                                           # (B, nkv, S, hs)
        if only_last and T > 1:                               # the last query attends to every key: no mask needed
            x, q, T = x[:, -1:], q[:, :, -1:], 1
            mask = None if mask is None else mask[..., -1:, :]
        if mask is None and trace is None:
            heads = causal_attention(q, k, v)                                                 # (B, nh, T, hs)
        else:                                                 # a trace records the probabilities of every query
            heads, probs = attention(q, k, v, causal_mask(T, k.shape[2]) if mask is None else mask)
            tap(trace, name + "attn.probs", probs)                                             # (B, nh, T, S)
        heads = tap(trace, name + "attn.heads", heads)                                         # (B, nh, T, hs)
        attn_out = linear(heads.transpose(0, 2, 1, 3).reshape(B, T, nh * hs), layer["wo"])   # (B, T, C)
        attn_out = tap(trace, name + "attn.out", attn_out)
        h = tap(trace, name + "attn_residual", x + attn_out)

        # feed-forward (SwiGLU): gate and up from one matmul against [w_gate | w_up]
        hn = tap(trace, name + "ffn_norm", rms_norm(h, layer["ffn_norm"], cfg.norm_eps))     # (B, T, C)
        gate_up = linear(hn, layer["w_gate_up"])                                             # (B, T, 2H)
        H = gate_up.shape[-1] // 2
        gate = tap(trace, name + "ffn.gate", gate_up[..., :H])                               # (B, T, H)
        up = tap(trace, name + "ffn.up", gate_up[..., H:])                                   # (B, T, H)
        hidden = tap(trace, name + "ffn.hidden", swiglu(gate, up))                           # (B, T, H)
        ffn_out = tap(trace, name + "ffn.out", linear(hidden, layer["w_down"]))              # (B, T, C)
        return tap(trace, name + "out", h + ffn_out)

    def head(self, x, trace: Trace | None = None):
        """The final RMSNorm and the classifier: residual stream (..., C) -> logits (..., V). forward ends with it;
        the logit lens (inspect.logit_lens) applies it to the stream after every block."""
        x = tap(trace, "norm.out", rms_norm(x, self.params["norm"], self.config.norm_eps))    # (..., C)
        return tap(trace, "logits", linear(x, self.params["lm_head"]))                       # (..., V)

    __call__ = forward

    def check_tokens(self, tokens, start_pos=0, cache=None):
        """Turn tokens into an int (B, T) array, or raise InputError/ContextLengthError saying what to fix."""
        cfg = self.config
        arr = np.asarray(tokens)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise InputError(f"tokens must be integer ids, got dtype {arr.dtype}")
        if arr.ndim not in (1, 2):
            raise InputError(f"tokens must be (T,) or (B, T), got shape {arr.shape}")
        squeeze = arr.ndim == 1
        arr = arr[None] if squeeze else arr
        if arr.shape[1] == 0:
            raise InputError("tokens is empty: give at least one token id (e.g. BOS = "
                             f"{cfg.bos_id})")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is out of range for vocab_size={cfg.vocab_size}; "
                             "was the prompt encoded with a different tokenizer than this model's?")
        if not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
            raise InputError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        end = start_pos + arr.shape[1]
        limit = cfg.context_len if cache is None else min(cfg.context_len, cache.max_len)
        if end > limit:
            raise ContextLengthError(f"positions {start_pos}..{end - 1} exceed the context window of {limit} tokens "
                                     f"(max_seq_len={cfg.max_seq_len}); shorten the prompt or generate fewer tokens")
        if cache is not None:
            if cache.batch_size != arr.shape[0]:
                raise InputError(f"the KV cache holds {cache.batch_size} sequences but tokens has {arr.shape[0]}; "
                                 "make a cache with model.new_cache(batch_size)")
            if start_pos > cache.length:
                raise InputError(f"start_pos={start_pos} leaves a gap: the cache holds only {cache.length} positions")
        return arr.astype(np.int64, copy=False), squeeze
