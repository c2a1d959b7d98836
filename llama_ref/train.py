"""Training, the llm.c way: every layer's forward next to its backward, AdamW, and the training loop.

Chapter 07 derives each backward, checks one against finite differences and all of them against PyTorch autograd
(`data/reference/grads_*.npz`, written by scripts/make_reference.py), then trains. `make model` uses this file to
train the embedded model from scratch; `make gatt` uses `finetune` for chat SFT and Ghost Attention.

Read top to bottom. Each layer is a pair

    y, cache = <layer>_forward(x, ...)        # what the inference forward computes, plus what backward needs
    dx, (dparams) = <layer>_backward(dy, cache)

and `forward_backward` chains them exactly as `model.Llama.forward` chains the inference versions (a test checks
the two forwards give the same logits). Parameters are a flat dict with Hugging Face names and layouts, so a
linear weight is (out, in) and `y = x @ W.T`; gradients come back in a dict with the same names and shapes, which
is also how PyTorch lays them out, so the reference comparison is name by name.

Notation (llm.c): B batch, T tokens, C model dim, nh query heads, nkv key/value heads, hs head size, H SwiGLU
hidden size, V vocabulary. Everything is float32 (scalars are cast, so nothing is promoted to float64).
"""
from __future__ import annotations

import json
import math

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import InputError, LlamaRefError
from .files import save_npz, write_text
from .model import apply_rope_hf, causal_mask, rope_freqs
from .weights import MODEL_TENSORS, layer_names, weight_shapes

F32 = np.float32
EMBED, NORM, HEAD = (MODEL_TENSORS[k][0] for k in ("embed", "norm", "lm_head"))   # HF names of the model-level tensors


class TrainingError(LlamaRefError):
    """Training cannot go on: a loss became NaN/Inf, a resume state does not fit, a bad setting."""


# ------------------------------------------------------------------------------------------------
# Embedding: a table lookup; its backward scatters the gradient rows back into the table

def embedding_forward(wte, tokens):
    """out[b, t] = wte[tokens[b, t]].  wte (V, C), tokens (B, T) -> (B, T, C)."""
    return wte[tokens], tokens


def embedding_backward(dout, tokens, vocab_size):
    """Row v of dwte is the sum of dout over every position that read token v (a token may appear many times)."""
    C = dout.shape[-1]
    dwte = np.zeros((vocab_size, C), F32)
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(-1, C))
    return dwte


# ------------------------------------------------------------------------------------------------
# RMSNorm: y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)

def rmsnorm_forward(x, w, eps):
    """x (B, T, C), w (C,) -> y (B, T, C). Same arithmetic as model.rms_norm."""
    rstd = F32(1.0) / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + F32(eps))   # (B, T, 1)
    xhat = x * rstd                                                                        # (B, T, C)
    return xhat * w, (xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """dw = sum over positions of dy * xhat.

    dx: xhat_j = x_j * rstd and d rstd / d x_j = -rstd^3 x_j / C, so
        dx_j = rstd * (g_j - xhat_j * mean_i(g_i * xhat_i))   with g = dy * w.
    The second term removes the part of g along xhat: scaling x does not change xhat.
    """
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = np.sum((dy * xhat).reshape(-1, C), axis=0)                                      # (C,)
    g = dy * w                                                                             # (B, T, C)
    dx = rstd * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True))                     # (B, T, C)
    return dx, dw


# ------------------------------------------------------------------------------------------------
# Linear (no bias, as in Llama): y = x @ W.T with W (out, in), HF/PyTorch layout

def linear_forward(x, w):
    """x (..., in), w (out, in) -> (..., out). (Training multiplies B*T rows at once: a GEMM, where BLAS reads
    a transposed operand at full speed; the inference forward's matrix-vector case is why model.py packs (in, out).)"""
    return x @ w.T, x


def linear_backward(dy, x, w):
    """dx = dy @ W;  dW = dy^T @ x summed over every position (B*T rows)."""
    dx = dy @ w                                                                            # (..., in)
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])                      # (out, in)
    return dx, dw


# ------------------------------------------------------------------------------------------------
# RoPE: a rotation of each (i, i + hs/2) pair by angle p * theta_i. A rotation's transpose is its inverse, so the
# backward is the same rotation by the opposite angle: sin -> -sin.

def rope_forward(x, cos, sin):
    """x (B, n, T, hs), cos/sin (T, hs/2): HF's rotate-half RoPE (model.apply_rope_hf)."""
    return apply_rope_hf(x, cos, sin)


def rope_backward(dy, cos, sin):
    return apply_rope_hf(dy, cos, -sin)


# ------------------------------------------------------------------------------------------------
# Causal attention with grouped-query heads

ATTENTION_BLOCK = 128      # queries per block: small score matrices that stay in cache, masked work mostly skipped


def attention_forward(q, k, v, block: int = ATTENTION_BLOCK):
    """q (B, nh, T, hs), k and v (B, nkv, T, hs) -> out (B, nh, T, hs).

    Query head h reads key/value head h // rep (rep = nh/nkv): q is viewed as (B, nkv, rep, T, hs), so k and v are
    broadcast over the rep heads of their group, never copied. Like llm.c's loop over t2 <= t, the causal structure
    saves work: queries are taken `block` at a time, and a block ending at position t1 is scored against keys
    0..t1-1 only. The causal mask inside the block adds -inf above the diagonal, so those probabilities are exactly 0.
    """
    B, nh, T, hs = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    scale = F32(1.0 / math.sqrt(hs))
    qs = q.reshape(B, nkv, rep, T, hs) * scale                  # (B, nkv, rep, T, hs); scaled here, not the scores
    out = np.empty_like(qs)
    probs = []                                                                            # one entry per block
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)                                                           # keys 0..t1-1
        scores = qs[:, :, :, t0:t1] @ k[:, :, None, :t1].swapaxes(-1, -2)                # (B, nkv, rep, Tb, t1)
        scores += causal_mask(t1 - t0, t1)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores, out=scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, :, :, t0:t1] = p @ v[:, :, None, :t1]                                      # (B, nkv, rep, Tb, hs)
        probs.append(p)
    return out.reshape(B, nh, T, hs), (qs, k, v, probs, scale)


def attention_backward(dout, cache):
    """Backward of out = softmax(q k^T * scale + mask) v, block by block of queries as in the forward.

        dv = P^T dout            summed over the rep heads that read this v
        dP = dout v^T
        dS = P * (dP - sum_j dP_j P_j)          softmax backward (row by row); masked entries have P = 0
        dq = dS k * scale,  dk = dS^T (q * scale)  (dk summed over the rep heads)
    A block of queries only touched keys 0..t1-1, so it adds to dk and dv there only; each block's probabilities
    (Tb, t1) say where it sits: queries t1-Tb..t1-1.
    """
    qs, k, v, probs, scale = cache
    B, nkv, rep, T, hs = qs.shape
    do = dout.reshape(B, nkv, rep, T, hs)                                                 # (B, nkv, rep, T, hs)
    dq = np.empty_like(qs)
    dk, dv = np.zeros_like(k), np.zeros_like(v)                                           # (B, nkv, T, hs)
    for p in probs:
        t0, t1 = p.shape[-1] - p.shape[-2], p.shape[-1]
        dob = do[:, :, :, t0:t1]                                                          # (B, nkv, rep, Tb, hs)
        dv[:, :, :t1] += np.sum(p.swapaxes(-1, -2) @ dob, axis=2)
        ds = dob @ v[:, :, None, :t1].swapaxes(-1, -2)                                    # dP (B, nkv, rep, Tb, t1)
        ds -= np.sum(ds * p, axis=-1, keepdims=True)
        ds *= p                                                                           # dS
        dq[:, :, :, t0:t1] = (ds @ k[:, :, None, :t1]) * scale
        dk[:, :, :t1] += np.sum(ds.swapaxes(-1, -2) @ qs[:, :, :, t0:t1], axis=2)
    return dq.reshape(B, nkv * rep, T, hs), dk, dv


# ------------------------------------------------------------------------------------------------
# SwiGLU: h = silu(gate) * up,  silu(g) = g * sigmoid(g)

def swiglu_forward(gate, up):
    """gate, up (B, T, H) -> h (B, T, H)."""
    with np.errstate(over="ignore"):                                                      # exp(-g) -> inf gives sig 0
        sig = F32(1.0) / (F32(1.0) + np.exp(-gate))
    act = gate * sig
    return act * up, (gate, up, sig, act)


def swiglu_backward(dh, cache):
    """d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g)));  dup = dh * silu(gate)."""
    gate, up, sig, act = cache
    dgate = dh * up * (sig * (F32(1.0) + gate * (F32(1.0) - sig)))
    dup = dh * act
    return dgate, dup


# ------------------------------------------------------------------------------------------------
# Cross-entropy with a per-token loss mask

def cross_entropy_forward(logits, targets, mask=None):
    """Mean of -log p(target) over the positions where mask is True.

    logits (B, T, V), targets (B, T) ints, mask (B, T) bool or None (= all). Returns (loss, cache).
    PyTorch's cross_entropy(ignore_index=-100) with masked targets set to -100 computes the same mean.
    """
    B, T, V = logits.shape
    mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    n = int(mask.sum())
    if n == 0:
        raise InputError("the loss mask selects no token: nothing to learn from this batch")
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    sumexp = e.sum(axis=-1, keepdims=True)                                                # (B, T, 1)
    probs = e / sumexp                                                                    # (B, T, V)
    logp_target = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - np.log(sumexp[..., 0])   # (B, T)
    loss = -float(np.sum(logp_target[mask], dtype=np.float64)) / n
    return loss, (probs, targets, mask, n)


def cross_entropy_backward(cache):
    """d loss / d logits = (softmax - onehot(target)) / n at masked-in positions, 0 elsewhere."""
    probs, targets, mask, n = cache
    dlogits = probs.copy()
    t = targets[..., None]
    np.put_along_axis(dlogits, t, np.take_along_axis(dlogits, t, axis=-1) - F32(1.0), axis=-1)
    dlogits *= (mask.astype(F32) / F32(n))[..., None]
    return dlogits


# ------------------------------------------------------------------------------------------------
# The block and the model, forward with caches and backward

def block_forward(config: LlamaConfig, P: dict, i: int, x, cos, sin):
    """One pre-norm block, keeping what its backward needs. x (B, T, C) -> (B, T, C)."""
    n = layer_names(i)
    B, T, C = x.shape
    nh, nkv, hs = config.n_heads, config.n_kv_heads, config.head_dim
    xn, c_an = rmsnorm_forward(x, P[n["attn_norm"]], config.norm_eps)                   # (B, T, C)
    q, _ = linear_forward(xn, P[n["wq"]])                                                # (B, T, nh*hs)
    k, _ = linear_forward(xn, P[n["wk"]])                                                # (B, T, nkv*hs)
    v, _ = linear_forward(xn, P[n["wv"]])
    q = rope_forward(q.reshape(B, T, nh, hs).transpose(0, 2, 1, 3), cos, sin)           # (B, nh, T, hs)
    k = rope_forward(k.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3), cos, sin)          # (B, nkv, T, hs)
    v = np.ascontiguousarray(v.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3))             # (B, nkv, T, hs)
    heads, c_att = attention_forward(q, k, v)                                             # (B, nh, T, hs)
    heads = np.ascontiguousarray(heads.transpose(0, 2, 1, 3)).reshape(B, T, nh * hs)      # (B, T, nh*hs)
    attn_out, _ = linear_forward(heads, P[n["wo"]])                                      # (B, T, C)
    h = x + attn_out                                                                      # residual
    hn, c_fn = rmsnorm_forward(h, P[n["ffn_norm"]], config.norm_eps)
    gate, _ = linear_forward(hn, P[n["w_gate"]])                                         # (B, T, H)
    up, _ = linear_forward(hn, P[n["w_up"]])
    hidden, c_sw = swiglu_forward(gate, up)                                               # (B, T, H)
    ffn_out, _ = linear_forward(hidden, P[n["w_down"]])                                  # (B, T, C)
    out = h + ffn_out                                                                     # residual
    return out, (xn, c_an, c_att, heads, hn, c_fn, c_sw, hidden)


def block_backward(config: LlamaConfig, P: dict, i: int, dout, cache, cos, sin, grads: dict):
    """Backward through one block; adds its parameter gradients into `grads`, returns d(block input)."""
    n = layer_names(i)
    xn, c_an, c_att, heads, hn, c_fn, c_sw, hidden = cache
    B, T, C = dout.shape
    nh, nkv, hs = config.n_heads, config.n_kv_heads, config.head_dim
    # out = h + ffn(h): the residual passes dout straight through to h, and the FFN branch adds its part
    dhidden, grads[n["w_down"]] = linear_backward(dout, hidden, P[n["w_down"]])           # (B, T, H)
    dgate, dup = swiglu_backward(dhidden, c_sw)
    dhn, grads[n["w_gate"]] = linear_backward(dgate, hn, P[n["w_gate"]])
    dhn_up, grads[n["w_up"]] = linear_backward(dup, hn, P[n["w_up"]])
    dhn += dhn_up
    dh, grads[n["ffn_norm"]] = rmsnorm_backward(dhn, c_fn)
    dh += dout                                                                            # (B, T, C)
    # h = x + attn(x)
    dheads, grads[n["wo"]] = linear_backward(dh, heads, P[n["wo"]])                      # (B, T, nh*hs)
    dheads = dheads.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                           # (B, nh, T, hs)
    dq, dk, dv = attention_backward(dheads, c_att)
    dq = rope_backward(dq, cos, sin).transpose(0, 2, 1, 3).reshape(B, T, nh * hs)         # (B, T, nh*hs)
    dk = rope_backward(dk, cos, sin).transpose(0, 2, 1, 3).reshape(B, T, nkv * hs)        # (B, T, nkv*hs)
    dv = dv.transpose(0, 2, 1, 3).reshape(B, T, nkv * hs)
    dxn, grads[n["wq"]] = linear_backward(dq, xn, P[n["wq"]])
    dxn_k, grads[n["wk"]] = linear_backward(dk, xn, P[n["wk"]])
    dxn_v, grads[n["wv"]] = linear_backward(dv, xn, P[n["wv"]])
    dxn += dxn_k
    dxn += dxn_v
    dx, grads[n["attn_norm"]] = rmsnorm_backward(dxn, c_an)
    dx += dh
    return dx


def model_forward(config: LlamaConfig, P: dict, tokens, rope=None):
    """Logits (B, T, V) for tokens (B, T) at positions 0..T-1, and the caches the backward needs."""
    B, T = tokens.shape
    cos, sin = rope if rope is not None else rope_freqs(config.head_dim, T, config.rope_theta)
    cos, sin = cos[:T], sin[:T]
    x, _ = embedding_forward(P[EMBED], tokens)                     # (B, T, C)
    x = x.astype(F32, copy=False)
    caches = []
    for i in range(config.n_layers):
        x, c = block_forward(config, P, i, x, cos, sin)
        caches.append(c)
    xn, c_norm = rmsnorm_forward(x, P[NORM], config.norm_eps)             # (B, T, C)
    head = P[EMBED if config.tie_embeddings else HEAD]
    logits, _ = linear_forward(xn, head)                                                  # (B, T, V)
    return logits, (tokens, caches, xn, c_norm, cos, sin)


def model_backward(config: LlamaConfig, P: dict, dlogits, cache) -> dict:
    """Gradients of every parameter (HF names, HF shapes) given d loss / d logits."""
    tokens, caches, xn, c_norm, cos, sin = cache
    grads = {}
    head_name = EMBED if config.tie_embeddings else HEAD
    dxn, dhead = linear_backward(dlogits, xn, P[head_name])                               # (B, T, C), (V, C)
    dx, grads[NORM] = rmsnorm_backward(dxn, c_norm)
    for i in reversed(range(config.n_layers)):
        dx = block_backward(config, P, i, dx, caches[i], cos, sin, grads)
    dwte = embedding_backward(dx, tokens, config.vocab_size)
    if config.tie_embeddings:
        dwte += dhead                                                                     # one matrix, two uses
    else:
        grads[HEAD] = dhead
    grads[EMBED] = dwte
    return grads


def forward_backward(config: LlamaConfig, P: dict, tokens, targets, mask=None, rope=None):
    """Loss of predicting `targets` from `tokens` (both (B, T)), and the gradient of every parameter."""
    logits, cache = model_forward(config, P, tokens, rope)
    loss, ce_cache = cross_entropy_forward(logits, targets, mask)
    grads = model_backward(config, P, cross_entropy_backward(ce_cache), cache)
    return loss, grads


def loss_only(config: LlamaConfig, P: dict, tokens, targets, mask=None, rope=None) -> float:
    logits, _ = model_forward(config, P, tokens, rope)
    return cross_entropy_forward(logits, targets, mask)[0]


# ------------------------------------------------------------------------------------------------
# Optimisation: initialisation, gradient clipping, learning-rate schedule, AdamW

def init_weights(config: LlamaConfig, seed: int = 0, std: float = 0.02) -> dict:
    """Random weights the way GPT-2/llama2.c initialise: N(0, std) matrices, norm gains 1, and the projections
    that write into the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 n_layers) so the stream's variance
    does not grow with depth."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in weight_shapes(config).items():
        if len(shape) == 1:
            out[name] = np.ones(shape, F32)
        else:
            s = std / math.sqrt(2 * config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * F32(s)).astype(F32)
    return out


def global_norm(grads: dict) -> float:
    return math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm (as torch.nn.utils.clip_grad_norm_:
    coefficient max_norm / (norm + 1e-6), applied only when it is < 1). Returns the norm before clipping."""
    norm = global_norm(grads)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= F32(coef)
    return norm


def lr_schedule(step: int, max_lr: float, warmup: int, total: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_lr_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def decays(name: str) -> bool:
    """Weight decay on matrices (linears, embeddings), not on the 1-D norm gains (as llama2.c / nanoGPT)."""
    return not name.endswith("norm.weight")


class AdamW:
    """AdamW exactly as torch.optim.AdamW (decoupled weight decay applied first, bias-corrected moments).

        p <- p * (1 - lr * wd)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params: dict, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.b1, self.b2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.m = {k: np.zeros_like(v, dtype=F32) for k, v in params.items()}
        self.v = {k: np.zeros_like(v, dtype=F32) for k, v in params.items()}
        self.t = 0

    def step(self, params: dict, grads: dict, lr: float) -> None:
        self.t += 1
        b1, b2 = self.b1, self.b2
        step_size = F32(lr / (1 - b1 ** self.t))
        bc2_sqrt = F32(math.sqrt(1 - b2 ** self.t))
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if self.weight_decay and decays(name):
                p *= F32(1 - lr * self.weight_decay)
            m *= F32(b1)
            m += F32(1 - b1) * g
            v *= F32(b2)
            v += F32(1 - b2) * (g * g)
            denom = np.sqrt(v) / bc2_sqrt + F32(self.eps)
            p -= step_size * (m / denom)

    def state(self) -> dict:
        return {"t": np.array(self.t), **{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state(self, state) -> None:
        self.t = int(state["t"])
        for k in self.m:
            if f"m/{k}" not in state or state[f"m/{k}"].shape != self.m[k].shape:
                raise TrainingError(f"the resume state has no optimizer moments for {k!r} of shape {self.m[k].shape}; "
                                    "it belongs to another model: start without --resume or point --out elsewhere")
            self.m[k][...] = state[f"m/{k}"]
            self.v[k][...] = state[f"v/{k}"]


# ------------------------------------------------------------------------------------------------
# Data: a stream of token ids cut into (B, T+1) windows

def tokenize_documents(docs, tokenizer, n_tokens: int, progress: bool = True) -> np.ndarray:
    """BOS + ids + EOS of each document, concatenated until n_tokens ids (uint16 when the vocabulary fits)."""
    from tqdm.auto import tqdm
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    out, have = [], 0
    with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for doc in docs:
            ids = [tokenizer.bos_id] + tokenizer.encode(doc) + [tokenizer.eos_id]
            out.append(np.asarray(ids, dtype))
            have += len(ids)
            bar.update(len(ids))
            if have >= n_tokens:
                break
    return np.concatenate(out)[:n_tokens]


def random_windows(data: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int):
    """Batch number `step`: B windows at random offsets (a function of (seed, step), so a resumed run sees the
    same batches as an uninterrupted one). Returns tokens (B, T) and targets (B, T) = tokens shifted by one."""
    if len(data) < seq_len + 2:
        raise InputError(f"the token stream holds {len(data)} tokens, fewer than one window of {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
    win = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)           # (B, T+1)
    return win[:, :-1], win[:, 1:]


def sequential_windows(data: np.ndarray, batch_size: int, seq_len: int):
    """Non-overlapping windows covering `data` in order (for validation loss): yields (tokens, targets)."""
    n = (len(data) - 1) // seq_len
    for b in range(0, n, batch_size):
        idx = range(b, min(n, b + batch_size))
        win = np.stack([data[i * seq_len:i * seq_len + seq_len + 1] for i in idx]).astype(np.int64)
        yield win[:, :-1], win[:, 1:]


def evaluate_loss(config: LlamaConfig, P: dict, data: np.ndarray, batch_size: int, seq_len: int,
                  max_batches: int | None = None) -> float:
    """Mean next-token loss over non-overlapping windows of `data` (token-weighted)."""
    total, count = 0.0, 0
    rope = rope_freqs(config.head_dim, seq_len, config.rope_theta)
    for b, (x, y) in enumerate(sequential_windows(data, batch_size, seq_len)):
        if max_batches is not None and b >= max_batches:
            break
        total += loss_only(config, P, x, y, rope=rope) * x.size
        count += x.size
    return total / max(1, count)


# ------------------------------------------------------------------------------------------------
# The training loop: warmup + cosine, clipping, AdamW, validation, atomic checkpoints and resume

@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    seed: int = 0
    time_budget_s: float | None = None          # stop early (cleanly, with a checkpoint) when this is used up

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise TrainingError(f"training setting {name}={v!r} must be a positive integer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"learning rate {self.lr!r} must be a positive number (try 1e-3)")
        if not 0 <= self.warmup <= self.steps:
            raise TrainingError(f"warmup={self.warmup} must be between 0 and steps={self.steps}")


def save_training_state(out_dir: Path, config: LlamaConfig, params: dict, opt: AdamW, step: int, history: list,
                        tokenizer_path=None) -> None:
    """The model (an HF dir, written atomically by save_model) plus optimizer moments and history for resume.
    Order: state first, model second, so a crash in between leaves a resumable pair (the state's step says which)."""
    from .checkpoint import save_model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = out_dir.parent / (out_dir.name + ".train-state")
    state_dir.mkdir(exist_ok=True)
    save_npz(state_dir / "optimizer.npz", {**opt.state(), "step": np.array(step),
                                                **{f"p/{k}": v for k, v in params.items()}})
    write_text(state_dir / "history.json", json.dumps(history))
    save_model(out_dir, config, params, tokenizer_path=tokenizer_path)


def load_training_state(out_dir: Path, params: dict, opt: AdamW):
    """Resume: parameters, optimizer moments, step and history saved by save_training_state."""
    state_dir = Path(out_dir).parent / (Path(out_dir).name + ".train-state")
    f = state_dir / "optimizer.npz"
    if not f.exists():
        raise TrainingError(f"nothing to resume: {f} does not exist (start without --resume)")
    with np.load(f) as st:
        opt.load_state(st)
        for k in params:
            params[k][...] = st[f"p/{k}"]
        step = int(st["step"])
    history = json.loads((state_dir / "history.json").read_text())
    return step, history


def train(config: LlamaConfig, params: dict, train_data: np.ndarray, val_data: np.ndarray | None,
          settings: TrainSettings, out_dir=None, resume: bool = False, tokenizer_path=None, log=print,
          progress: bool = True, stop_after: int | None = None):
    """Pre-train on a token stream. Returns (params, history); history rows are dicts per logged step
    ({"step", "tokens", "lr", "train_loss", "grad_norm", "val_loss"?, "time_s"}).

    With out_dir, writes the model there every ckpt_every steps and at the end (atomically), and keeps optimizer
    state beside it in <out_dir>.train-state/ so `resume=True` continues exactly where it stopped. `stop_after`
    ends the run (with a checkpoint) after that many steps of the `settings.steps` schedule."""
    from tqdm.auto import tqdm
    settings.check()
    s = settings
    opt = AdamW(params, betas=s.betas, weight_decay=s.weight_decay)
    step, history = 0, []
    if resume:
        step, history = load_training_state(out_dir, params, opt)
        log(f"resumed at step {step}")
    rope = rope_freqs(config.head_dim, s.seq_len, config.rope_theta)
    t0 = time.time() - (history[-1]["time_s"] if history else 0.0)
    t_start = time.time()
    bar = tqdm(total=s.steps, initial=step, desc="train", unit="step", disable=not progress)
    recent = []                                                   # raw losses since the last validation
    while step < s.steps:
        lr = lr_schedule(step, s.lr, s.warmup, s.steps, s.min_lr_ratio)
        x, y = random_windows(train_data, s.batch_size, s.seq_len, s.seed, step)
        loss, grads = forward_backward(config, params, x, y, rope=rope)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {step}: lower the learning rate ({s.lr}) "
                                "or raise warmup, then resume from the last checkpoint")
        norm = clip_grad_norm(grads, s.grad_clip) if s.grad_clip else global_norm(grads)
        opt.step(params, grads, lr)
        step += 1
        recent.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        row = {"step": step, "tokens": step * s.batch_size * s.seq_len, "lr": lr, "train_loss": loss,
               "grad_norm": norm, "time_s": time.time() - t0}
        out_of_time = ((s.time_budget_s is not None and time.time() - t_start > s.time_budget_s)
                       or (stop_after is not None and step >= stop_after))
        if val_data is not None and (step % s.eval_every == 0 or step == s.steps or out_of_time):
            row["val_loss"] = evaluate_loss(config, params, val_data, s.batch_size, s.seq_len, s.eval_batches)
            log(f"step {step}: train loss {np.mean(recent):.4f} (mean of the last {len(recent)} steps), "
                f"val loss {row['val_loss']:.4f}, lr {lr:.2e}, {row['time_s'] / 60:.1f} min")
            recent = []
        history.append(row)
        if out_dir is not None and (step % s.ckpt_every == 0 or step == s.steps or out_of_time):
            save_training_state(out_dir, config, params, opt, step, history, tokenizer_path)
        if out_of_time:
            log(f"stopping at step {step} of {s.steps} (time budget or stop_after reached)")
            break
    bar.close()
    return params, history


def finetune(config: LlamaConfig, weights: dict, batches, steps: int, lr: float, seed: int = 0,
             time_budget_s: float | None = None, warmup: int | None = None, weight_decay: float = 0.0,
             grad_clip: float = 1.0, log=print, progress: bool = True):
    """Fine-tune on an iterator of (tokens, targets, mask) batches with a loss mask (chat SFT, Ghost Attention).

    Returns (weights, metrics) with the loss curve in metrics["history"]. Weights are copied, never modified in place.
    """
    from tqdm.auto import tqdm
    params = {k: np.array(v, dtype=F32) for k, v in weights.items()}
    opt = AdamW(params, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    max_len = max(config.max_seq_len, 1)
    rope = rope_freqs(config.head_dim, max_len, config.rope_theta)
    history, t0, tokens_seen, smooth = [], time.time(), 0, None
    bar = tqdm(total=steps, desc="finetune", unit="step", disable=not progress)
    step = 0
    for step in range(steps):
        x, y, m = next(batches)
        if x.shape[1] > max_len:
            raise InputError(f"a batch of length {x.shape[1]} exceeds the context window {max_len}")
        lr_now = lr_schedule(step, lr, warmup, steps)
        loss, grads = forward_backward(config, params, x, y, m, rope=rope)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at fine-tuning step {step}: lower the learning rate ({lr})")
        norm = clip_grad_norm(grads, grad_clip)
        opt.step(params, grads, lr_now)
        tokens_seen += int(np.asarray(m).sum())
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        history.append({"step": step + 1, "loss": loss, "lr": lr_now, "grad_norm": norm, "time_s": time.time() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.3f}")
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}: loss {smooth:.4f}")
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            log(f"time budget of {time_budget_s:.0f} s used after {step + 1} of {steps} steps")
            break
    bar.close()
    metrics = {"steps": len(history), "final_loss": smooth, "target_tokens": tokens_seen, "lr": lr,
               "wall_time_s": time.time() - t0, "history": history}
    return params, metrics
