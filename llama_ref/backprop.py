"""Backpropagation, the llm.c way: every layer's forward next to its backward, and AdamW.

Chapter 07 derives each backward, checks one against finite differences and all of them against PyTorch autograd
(`data/reference/grads_*.npz`, written by scripts/make_reference.py), then trains. The loop that drives these
(batches, the schedule, validation, checkpoints and resume, fine-tuning) is trainer.py's.

Read top to bottom. Each layer is a pair

    y, cache = <layer>_forward(x, ...)        # what the inference forward computes, plus what backward needs
    dx, (dparams) = <layer>_backward(dy, cache)

and `forward_backward` chains them exactly as `model.Llama.forward` chains the inference versions (a test checks
the two forwards give the same logits). Parameters are a flat dict with Hugging Face names and layouts, so a
linear weight is (out, in) and `y = x @ W.T`; gradients come back in a dict with the same names and shapes, which
is also how PyTorch lays them out, so the reference comparison is name by name.

Notation (llm.c): B batch, T tokens, C model dim, nh query heads, nkv key/value heads, hs head size, H SwiGLU
hidden size, V vocabulary. Parameters are float32 (init_weights), and every layer function keeps the dtype of its inputs:
a NumPy 2 array never changes dtype when multiplied by a Python number (NEP 50), so no scalar needs a cast, and chapter
07 checks the same functions in float64 by giving them float64 inputs. (Only NumPy float64 *scalars* promote: the
gradient-clipping coefficient is cast for that reason.)
"""
from __future__ import annotations

import math

from typing import NamedTuple

import numpy as np

from .config import LlamaConfig
from .errors import InputError, TrainingError
from .model import ATTENTION_BLOCK, apply_rope_hf, causal_mask, rope_tables
from .weights import MODEL_TENSORS, layer_names, weight_shapes

F32 = np.float32
EMBED, NORM, HEAD = (MODEL_TENSORS[k][0] for k in ("embed", "norm", "lm_head"))   # HF names of the model-level tensors



# ------------------------------------------------------------------------------------------------
# Embedding: a table lookup; its backward scatters the gradient rows back into the table

def embedding_forward(wte, tokens):
    """out[b, t] = wte[tokens[b, t]].  wte (V, C), tokens (B, T) -> (B, T, C). Its backward needs only the tokens."""
    return wte[tokens]


def embedding_backward(dout, tokens, vocab_size):
    """Row v of dwte is the sum of dout over every position that read token v (a token may appear many times)."""
    C = dout.shape[-1]
    dwte = np.zeros((vocab_size, C), dout.dtype)
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(-1, C))
    return dwte


# ------------------------------------------------------------------------------------------------
# RMSNorm: y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)

def rmsnorm_forward(x, w, eps):
    """x (B, T, C), w (C,) -> y (B, T, C). Same arithmetic as model.rms_norm."""
    rstd = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)              # (B, T, 1)
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
    """x (..., in), w (out, in) -> (..., out). Its backward needs x and w themselves. (Training multiplies B*T rows at
    once: a GEMM, where BLAS reads a transposed operand at full speed; the inference forward's matrix-vector case is why
    model.py packs (in, out).)"""
    return x @ w.T


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
    scale = 1.0 / math.sqrt(hs)
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
        sig = 1.0 / (1.0 + np.exp(-gate))
    act = gate * sig
    return act * up, (gate, up, sig, act)


def swiglu_backward(dh, cache):
    """d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g)));  dup = dh * silu(gate)."""
    gate, up, sig, act = cache
    dgate = dh * up * (sig * (1.0 + gate * (1.0 - sig)))
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
    np.put_along_axis(dlogits, t, np.take_along_axis(dlogits, t, axis=-1) - 1.0, axis=-1)
    dlogits *= (mask.astype(dlogits.dtype) / n)[..., None]
    return dlogits


# ------------------------------------------------------------------------------------------------
# The block and the model, forward with caches and backward

class BlockCache(NamedTuple):
    """What block_backward needs from block_forward."""
    xn: np.ndarray              # (B, T, C) attention input, after RMSNorm
    attn_norm: tuple            # rmsnorm_forward's cache
    attention: tuple            # attention_forward's cache
    heads: np.ndarray           # (B, T, nh*hs) attention heads, before o_proj
    hn: np.ndarray              # (B, T, C) FFN input, after RMSNorm
    ffn_norm: tuple
    swiglu: tuple               # swiglu_forward's cache
    hidden: np.ndarray          # (B, T, H) SwiGLU output, before down_proj


def block_forward(config: LlamaConfig, P: dict, i: int, x, cos, sin):
    """One pre-norm block, keeping what its backward needs. x (B, T, C) -> (B, T, C)."""
    n = layer_names(i)
    B, T, C = x.shape
    nh, nkv, hs = config.n_heads, config.n_kv_heads, config.head_dim
    xn, c_an = rmsnorm_forward(x, P[n["attn_norm"]], config.norm_eps)                   # (B, T, C)
    q = linear_forward(xn, P[n["wq"]])                                                # (B, T, nh*hs)
    k = linear_forward(xn, P[n["wk"]])                                                # (B, T, nkv*hs)
    v = linear_forward(xn, P[n["wv"]])
    q = rope_forward(q.reshape(B, T, nh, hs).transpose(0, 2, 1, 3), cos, sin)           # (B, nh, T, hs)
    k = rope_forward(k.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3), cos, sin)          # (B, nkv, T, hs)
    v = np.ascontiguousarray(v.reshape(B, T, nkv, hs).transpose(0, 2, 1, 3))             # (B, nkv, T, hs)
    heads, c_att = attention_forward(q, k, v)                                             # (B, nh, T, hs)
    heads = np.ascontiguousarray(heads.transpose(0, 2, 1, 3)).reshape(B, T, nh * hs)      # (B, T, nh*hs)
    attn_out = linear_forward(heads, P[n["wo"]])                                      # (B, T, C)
    h = x + attn_out                                                                      # residual
    hn, c_fn = rmsnorm_forward(h, P[n["ffn_norm"]], config.norm_eps)
    gate = linear_forward(hn, P[n["w_gate"]])                                         # (B, T, H)
    up = linear_forward(hn, P[n["w_up"]])
    hidden, c_sw = swiglu_forward(gate, up)                                               # (B, T, H)
    ffn_out = linear_forward(hidden, P[n["w_down"]])                                  # (B, T, C)
    out = h + ffn_out                                                                     # residual
    return out, BlockCache(xn, c_an, c_att, heads, hn, c_fn, c_sw, hidden)


def block_backward(config: LlamaConfig, P: dict, i: int, dout, cache, cos, sin, grads: dict):
    """Backward through one block; adds its parameter gradients into `grads`, returns d(block input)."""
    n = layer_names(i)
    xn, hn, heads, hidden = cache.xn, cache.hn, cache.heads, cache.hidden
    B, T, C = dout.shape
    nh, nkv, hs = config.n_heads, config.n_kv_heads, config.head_dim
    # out = h + ffn(h): the residual passes dout straight through to h, and the FFN branch adds its part
    dhidden, grads[n["w_down"]] = linear_backward(dout, hidden, P[n["w_down"]])           # (B, T, H)
    dgate, dup = swiglu_backward(dhidden, cache.swiglu)
    dhn, grads[n["w_gate"]] = linear_backward(dgate, hn, P[n["w_gate"]])
    dhn_up, grads[n["w_up"]] = linear_backward(dup, hn, P[n["w_up"]])
    dhn += dhn_up
    dh, grads[n["ffn_norm"]] = rmsnorm_backward(dhn, cache.ffn_norm)
    dh += dout                                                                            # (B, T, C)
    # h = x + attn(x)
    dheads, grads[n["wo"]] = linear_backward(dh, heads, P[n["wo"]])                      # (B, T, nh*hs)
    dheads = dheads.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                           # (B, nh, T, hs)
    dq, dk, dv = attention_backward(dheads, cache.attention)
    dq = rope_backward(dq, cos, sin).transpose(0, 2, 1, 3).reshape(B, T, nh * hs)         # (B, T, nh*hs)
    dk = rope_backward(dk, cos, sin).transpose(0, 2, 1, 3).reshape(B, T, nkv * hs)        # (B, T, nkv*hs)
    dv = dv.transpose(0, 2, 1, 3).reshape(B, T, nkv * hs)
    dxn, grads[n["wq"]] = linear_backward(dq, xn, P[n["wq"]])
    dxn_k, grads[n["wk"]] = linear_backward(dk, xn, P[n["wk"]])
    dxn_v, grads[n["wv"]] = linear_backward(dv, xn, P[n["wv"]])
    dxn += dxn_k
    dxn += dxn_v
    dx, grads[n["attn_norm"]] = rmsnorm_backward(dxn, cache.attn_norm)
    dx += dh
    return dx


def trunk_forward(config: LlamaConfig, P: dict, tokens, rope=None):
    """The final hidden states xn (B, T, C), after the last RMSNorm, for tokens (B, T) at positions 0..T-1, and the
    caches the backward needs. The language-model head reads xn; so do the reward model's score head and PPO's value head."""
    B, T = tokens.shape
    cos, sin = rope if rope is not None else rope_tables(config, T)
    cos, sin = cos[:T], sin[:T]
    x = embedding_forward(P[EMBED], tokens)                     # (B, T, C)
    caches = []
    for i in range(config.n_layers):
        x, c = block_forward(config, P, i, x, cos, sin)
        caches.append(c)
    xn, c_norm = rmsnorm_forward(x, P[NORM], config.norm_eps)             # (B, T, C)
    return xn, (tokens, caches, c_norm, cos, sin)


def trunk_backward(config: LlamaConfig, P: dict, dxn, cache, grads: dict) -> dict:
    """Gradients of the trunk's parameters given d loss / d xn, added into `grads` (which may already hold the tied
    embedding's head gradient). Returns grads."""
    tokens, caches, c_norm, cos, sin = cache
    dx, grads[NORM] = rmsnorm_backward(dxn, c_norm)
    for i in reversed(range(config.n_layers)):
        dx = block_backward(config, P, i, dx, caches[i], cos, sin, grads)
    dwte = embedding_backward(dx, tokens, config.vocab_size)
    if EMBED in grads:
        grads[EMBED] += dwte                                                              # tied: one matrix, two uses
    else:
        grads[EMBED] = dwte
    return grads


def model_forward(config: LlamaConfig, P: dict, tokens, rope=None):
    """Logits (B, T, V) for tokens (B, T) at positions 0..T-1, and the caches the backward needs."""
    xn, trunk = trunk_forward(config, P, tokens, rope)
    head = P[EMBED if config.tie_embeddings else HEAD]
    logits = linear_forward(xn, head)                                                  # (B, T, V)
    return logits, (xn, trunk)


def model_backward(config: LlamaConfig, P: dict, dlogits, cache, dxn_extra=None) -> dict:
    """Gradients of every parameter (HF names, HF shapes) given d loss / d logits (and, for a head that also reads
    the final hidden states, such as PPO's value head, d loss / d xn from it)."""
    xn, trunk = cache
    head_name = EMBED if config.tie_embeddings else HEAD
    dxn, dhead = linear_backward(dlogits, xn, P[head_name])                               # (B, T, C), (V, C)
    if dxn_extra is not None:
        dxn += dxn_extra
    return trunk_backward(config, P, dxn, trunk, {head_name: dhead})


def forward_backward(config: LlamaConfig, P: dict, tokens, targets, mask=None, rope=None):
    """Loss of predicting `targets` from `tokens` (both (B, T)), and the gradient of every parameter."""
    logits, cache = model_forward(config, P, tokens, rope)
    loss, ce_cache = cross_entropy_forward(logits, targets, mask)
    grads = model_backward(config, P, cross_entropy_backward(ce_cache), cache)
    return loss, grads


def forward_backward_parallel(config: LlamaConfig, P: dict, tokens, targets, mask=None, rope=None, workers: int = 2):
    """forward_backward with the batch's rows split across `workers` threads: data parallelism on one machine.

    Each part's loss is a mean over its loss tokens, so weighting the parts by their share of those tokens gives what
    one forward_backward over the whole batch computes, up to float32 summation order (tests/test_backprop.py). A part
    whose rows hold no loss token is left out."""
    keep = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)          # (B, T)
    parts = [rows for rows in split_rows(tokens.shape[0], workers) if keep[rows].any()]
    if len(parts) < 2:
        return forward_backward(config, P, tokens, targets, mask, rope)

    def part(rows):
        loss, grads = forward_backward(config, P, tokens[rows], targets[rows], None if mask is None else keep[rows], rope)
        return loss, grads, None

    loss, grads, _ = data_parallel(part, parts, [int(keep[rows].sum()) for rows in parts])
    return loss, grads


def split_rows(n_rows: int, workers: int) -> list[np.ndarray]:
    """Row indices 0..n_rows-1 in at most `workers` contiguous, non-empty parts."""
    return [rows for rows in np.array_split(np.arange(n_rows), max(1, min(workers, n_rows))) if len(rows)]


def data_parallel(step, parts, weights):
    """Run step(rows) -> (loss, grads, extra) for every part on its own thread, each with one BLAS thread, and combine:
    loss and gradients weighted by each part's share of `weights` (a part's loss being a mean over weights[i] items).

    Why it pays: a single NumPy call stream does a step's elementwise work (softmax, SwiGLU, RoPE, RMSNorm) on one
    core, and a second BLAS thread only helps its matmuls. NumPy releases the GIL inside its loops and BLAS, so threads
    with a part of the batch each keep every core busy, as data-parallel training keeps many GPUs busy. The trainer,
    the reward model and PPO all train this way. Returns (loss, grads, [extra of each part])."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits
    errors = np.geterr()                          # NumPy's errstate is per thread: the parts run under the caller's

    def run(rows):
        with np.errstate(**errors):
            return step(rows)

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(parts)) as pool:
        results = list(pool.map(run, parts))
    total = sum(weights)
    loss = sum(w * r[0] for w, r in zip(weights, results)) / total
    grads = {}
    for w, (_, g, _) in zip(weights, results):              # sum of (share) x (that part's mean gradient)
        for k, v in g.items():
            grads[k] = grads[k] + (w / total) * v if k in grads else (w / total) * v
    return loss, grads, [r[2] for r in results]


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
        step_size = lr / (1 - b1 ** self.t)
        bc2_sqrt = math.sqrt(1 - b2 ** self.t)
        for name, p in params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if self.weight_decay and decays(name):
                p *= 1 - lr * self.weight_decay
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            denom = np.sqrt(v) / bc2_sqrt + self.eps
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
