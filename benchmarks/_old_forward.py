"""The forward as it was before Llama.forward became the one inference path, kept only so benchmarks/forward.py can
time the old and the new code in the same run: the (in, out) packed copies, Llama.forward with three q/k/v and two
gate/up matmuls, and decode.decode_step (the fused one-token step generate() used). Verbatim but for the imports;
delete this file once the old/new comparison has been reported.
"""
import numpy as np

from llama_ref.model import F32, causal_mask, rms_norm, silu, softmax, swiglu
from llama_ref.weights import layer_names

# --- model.py (before) ------------------------------------------------------------------------------------------


def apply_rope_hf(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k, v, mask=None):
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    rep = nh // nkv
    qg = q.reshape(B, nkv, rep, T, hs) * F32(1.0 / np.sqrt(hs))             # (B, nkv, rep, T, hs)
    scores = qg @ k[:, :, None].swapaxes(-1, -2)                            # (B, nkv, rep, T, S)
    if mask is not None:
        scores += mask
    probs = softmax(scores)
    out = probs @ v[:, :, None]
    return out.reshape(B, nh, T, hs), probs.reshape(B, nh, T, S)


def causal_attention(q, k, v, block=128):
    T, S = q.shape[2], k.shape[2]
    if T == 1:
        return attention(q, k, v)[0]
    out = np.empty_like(q)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        seen = S - T + t1
        out[:, :, t0:t1] = attention(q[:, :, t0:t1], k[:, :, :seen], v[:, :, :seen], causal_mask(t1 - t0, seen))[0]
    return out


def linear(x, w):
    return x @ w if isinstance(w, np.ndarray) else w.matmul(x)


class OldLlama:
    """The packed form of a (float32) model as the old Llama held it: (in, out) copies, [wq|wk|wv] and [w_gate|w_up]
    side by side with column views; forward and decode_step as they were."""

    def __init__(self, model):
        self.config, self.new_cache, self.rope = model.config, model.new_cache, model.rope
        self.check_tokens = model.check_tokens
        W = model.weights                                                       # HF names, (out, in)
        self.layers, self.fused = [], []
        for i in range(self.config.n_layers):
            new = {k: (np.ascontiguousarray(W[n].T) if W[n].ndim == 2 else np.asarray(W[n]))
                   for k, n in layer_names(i).items()}
            fused = {}
            for name, parts in {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}.items():
                fused[name] = np.concatenate([new[p] for p in parts], axis=1)
                start = 0
                for p in parts:
                    width = new[p].shape[1]
                    new[p] = fused[name][:, start:start + width]
                    start += width
            self.layers.append(new)
            self.fused.append(fused)
        self.embed, self.norm = np.asarray(W["model.embed_tokens.weight"]), np.asarray(W["model.norm.weight"])
        self.lm_head = np.ascontiguousarray(W.get("lm_head.weight", self.embed).T)

    def forward(self, tokens, start_pos=0, cache=None, last_only=False):
        tokens, squeeze = self.check_tokens(tokens, start_pos, cache)
        B, T = tokens.shape
        S = start_pos + T
        cos, sin = (t[start_pos:S] for t in self.rope(S))
        x = self.embed[tokens].astype(F32, copy=False)
        for i, layer in enumerate(self.layers):
            x = self.block(i, layer, x, start_pos, cos, sin, cache)
        if cache is not None:
            cache.length = S
        if last_only:
            x = x[:, -1]
        logits = linear(rms_norm(x, self.norm, self.config.norm_eps), self.lm_head)
        return logits[0] if squeeze else logits

    def block(self, i, layer, x, start_pos, cos, sin, cache):
        cfg = self.config
        B, T, C = x.shape
        nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        xn = rms_norm(x, layer["attn_norm"], cfg.norm_eps)
        q = linear(xn, layer["wq"]).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
        k = linear(xn, layer["wk"]).reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)
        v = linear(xn, layer["wv"]).reshape(B, T, nkv, hs).transpose(0, 2, 1, 3)
        q = apply_rope_hf(q, cos, sin)
        k = apply_rope_hf(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, start_pos, k, v)
        heads = causal_attention(q, k, v)
        attn_out = linear(heads.transpose(0, 2, 1, 3).reshape(B, T, nh * hs), layer["wo"])
        h = x + attn_out
        hn = rms_norm(h, layer["ffn_norm"], cfg.norm_eps)
        gate = linear(hn, layer["w_gate"])
        up = linear(hn, layer["w_up"])
        return h + linear(swiglu(gate, up), layer["w_down"])

    # --- decode.py (before) ---------------------------------------------------------------------------------------

    def decode_step(self, tokens, pos, cache):
        cfg = self.config
        tokens, _ = self.check_tokens(np.asarray(tokens)[:, None], pos, cache)
        B = tokens.shape[0]
        nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        nq, rep = nh * hs, nh // nkv
        cos, sin = rope_rows(self, pos)
        scale = F32(1.0 / np.sqrt(hs))
        x = self.embed[tokens[:, 0]].astype(F32, copy=False)
        for i, (layer, fused) in enumerate(zip(self.layers, self.fused)):
            xn = rms_norm_row(x, layer["attn_norm"], cfg.norm_eps)
            qkv = xn @ fused["wqkv"]
            qk = qkv[:, :nq + nkv * hs].reshape(B, nh + nkv, hs)
            qk = rope_row(qk, cos, sin)
            k = qk[:, nh:, None]
            v = qkv[:, nq + nkv * hs:].reshape(B, nkv, 1, hs)
            keys, values = cache.update(i, pos, k, v)
            q = qk[:, :nh].reshape(B, nkv, rep, hs) * scale
            scores = q @ keys.swapaxes(-1, -2)
            heads = (softmax(scores) @ values).reshape(B, nq)
            x = x + heads @ layer["wo"]
            xn = rms_norm_row(x, layer["ffn_norm"], cfg.norm_eps)
            gate_up = xn @ fused["w_gate_up"]
            H = gate_up.shape[1] // 2
            x = x + swiglu(gate_up[:, :H], gate_up[:, H:]) @ layer["w_down"]
        cache.length = pos + 1
        return linear(rms_norm(x, self.norm, cfg.norm_eps), self.lm_head)


def rope_rows(model, pos):
    cos, sin = (t[pos] for t in model.rope(pos + 1))
    return np.concatenate([cos, cos]), np.concatenate([-sin, sin])


def rope_row(x, cos, sin):
    B, n, hs = x.shape
    swapped = x.reshape(B, n, 2, hs // 2)[:, :, ::-1].reshape(B, n, hs)
    return x * cos + swapped * sin


def rms_norm_row(x, weight, eps):
    ms = np.einsum("bc,bc->b", x, x) / F32(x.shape[-1])
    return x * (F32(1.0) / np.sqrt(ms + F32(eps)))[:, None] * weight


__all__ = ["OldLlama", "silu"]
