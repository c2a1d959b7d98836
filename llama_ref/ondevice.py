"""On-device rewrites of the Llama forward (as in Qualcomm's on-device Llama 2), each proven equal to model.forward.

Chapter 13 teaches it. A phone NPU runs a *static graph*: fixed shapes, no Python, few op types, and it is fastest
at 2-D convolutions on NCHW tensors. So the same maths is rewritten, step by step:

  1. Linear -> 1x1 Conv       x (B, T, C) becomes an image (B, C, 1, T): channels = features, width = tokens;
                               a Linear weight (out, in) becomes a conv kernel (out, in, 1, 1). Same numbers.
  2. multi-head -> single-head one small attention per head, with that head's q, k and v as their own 1x1 convs
                               (hs, C, 1, 1): no reshape/transpose of a (B, T, nh, hs) tensor anywhere.
  3. split into parts          4 parts run in sequence (part 1 has the embedding, part 4 the final norm and the
                               classifier); each part is a graph small enough to compile and load on its own.
  4. two static graphs         a *prompt processor* (P tokens, left-padded, with an attention mask; returns the
                               logits and the new keys/values) and a *token generator* (1 token, a fixed-size KV
                               cache in, only the new key/value out). RoPE's cos/sin are inputs, not computed inside.
  5. the bandwidth bound       decoding one token reads every weight once: tokens/s <= bandwidth / bytes per token.
  6. static A16 activations    (optional, act_scales) the inputs and outputs of every Conv and MatMul rounded to
                               int16, one scale per tensor fixed ahead of time by `calibrate` (A16_SITES): the
                               tensors the exported QDQ graphs quantize (ondevice_onnx.py writes them as ONNX files;
                               Qualcomm's HTP runs them). Norms, RoPE, softmax and the residual stay float.

Conventions (batch 1, as on the device):
  activations  NCHW (1, C, 1, T)                   (executorch's Qualcomm static Llama uses the same layout)
  keys         per layer (nkv, hs, S), stored transposed: q (T, hs) @ k (hs, S) needs no transpose
  values       per layer (nkv, S, hs)
  mask         additive (T, S): 0 where a query may look, MASK_NEG (a large finite negative) where not; finite so a
               fully padded row gives a uniform softmax, not NaN.
  cos, sin     (T, hs/2) rows of model.rope_freqs for the tokens' positions
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .config import LlamaConfig
from .errors import InputError
from .model import Llama, apply_rope_hf, rope_tables, silu, softmax
from .weights import MODEL_TENSORS, layer_names

F32 = np.float32
MASK_NEG = F32(-30000.0)   # a large negative that float16 still holds (its max is 65504): the HTP computes in fp16


# ------------------------------------------------------------------------------------------------
# 1. Linear -> 1x1 convolution in NCHW

def to_nchw(x):
    """(B, T, C) -> (B, C, 1, T): features become channels, tokens become the width of a 1-pixel-high image."""
    return np.ascontiguousarray(x.transpose(0, 2, 1)[:, :, None, :])


def from_nchw(x):
    """(B, C, 1, T) -> (B, T, C)."""
    return np.ascontiguousarray(x[:, :, 0, :].transpose(0, 2, 1))


def linear_to_conv(w):
    """An HF Linear weight (out, in) as a 1x1 conv kernel (out, in, 1, 1)."""
    w = np.asarray(w, F32)
    return np.ascontiguousarray(w[:, :, None, None])


def conv1x1(x, kernel):
    """2-D convolution with a 1x1 kernel: out[b, o, h, w] = sum_i kernel[o, i] x[b, i, h, w].

    x (B, Cin, H, W), kernel (Cout, Cin, 1, 1) -> (B, Cout, H, W). At every pixel (= token) it is the Linear.
    """
    B, Cin, H, W = x.shape
    y = kernel[:, :, 0, 0] @ x.reshape(B, Cin, H * W)          # (B, Cout, H*W)
    return y.reshape(B, kernel.shape[0], H, W)


def fake_quant16(x, scale):
    """Static A16: x rounded to int16 steps of `scale` (half to even, saturating), as float. None: x unchanged.
    What a QuantizeLinear / DequantizeLinear int16 pair computes."""
    if scale is None:
        return x
    return (np.clip(np.rint(x / F32(scale)), -32768, 32767) * F32(scale)).astype(F32)


class StaticA16:
    """The activation rounding of a device graph: `a16(x, name)` puts tensor `name` on int16 steps of its fixed scale
    (fake_quant16; a name without a scale stays float). With scales=None nothing is rounded and the largest |value|
    of every named tensor is recorded instead (`amax`): the calibration pass.

    float16=True also rounds each tensor to float16 before its int16 step: the value an NPU that computes its float
    ops in float16 (Qualcomm's HTP) hands to each quantized unit. The logits' bound for the HTP is derived from it."""

    def __init__(self, scales=None, float16=False):
        self.scales, self.amax, self.float16 = scales, {}, float16

    def __call__(self, x, name):
        if self.scales is None:
            self.amax[name] = max(self.amax.get(name, 0.0), float(np.abs(x).max()))
            return x
        if self.float16:
            with np.errstate(over="ignore"):                 # beyond 65504 float16 is inf, as on the device
                x = x.astype(np.float16).astype(F32)
        return fake_quant16(x, self.scales.get(name))


def rms_norm_nchw(x, weight, eps):
    """RMSNorm over the channel axis of (B, C, 1, T)."""
    ms = np.mean(np.square(x), axis=1, keepdims=True)
    return x * (F32(1.0) / np.sqrt(ms + F32(eps))) * weight[None, :, None, None]


# ------------------------------------------------------------------------------------------------
# 2. Conv weights for single-head attention, from a Llama

@dataclass
class ConvLayer:
    """One block as on-device kernels: per-head q/k/v convs, o/gate/up/down convs, norms."""
    attn_norm: np.ndarray          # (C,)
    wq: list                       # nh  x (hs, C, 1, 1)
    wk: list                       # nkv x (hs, C, 1, 1)
    wv: list                       # nkv x (hs, C, 1, 1)
    wo: np.ndarray                 # (C, nh*hs, 1, 1)
    ffn_norm: np.ndarray           # (C,)
    w_gate: np.ndarray             # (H, C, 1, 1)
    w_up: np.ndarray               # (H, C, 1, 1)
    w_down: np.ndarray             # (C, H, 1, 1)
    name: str = ""                 # "layers.{i}": the prefix of its activations' names (A16_SITES)


def _float(w):
    """An (out, in) float32 array from a weight (quantized matrices are dequantized: the device graph here is float)."""
    return w.dequantize() if hasattr(w, "dequantize") else np.asarray(w, F32)


def conv_layers(model: Llama) -> list[ConvLayer]:
    """Every block's weights as 1x1 conv kernels, the q/k/v projections cut into one kernel per head."""
    cfg, W = model.config, model.weights
    hs = cfg.head_dim
    layers = []
    for i in range(cfg.n_layers):
        n = layer_names(i)                                    # short name -> HF name (weights.py's table)
        wq = _float(W[n["wq"]])                               # (nh*hs, C): rows h*hs .. (h+1)*hs are head h
        wk = _float(W[n["wk"]])
        wv = _float(W[n["wv"]])
        layers.append(ConvLayer(
            attn_norm=np.asarray(W[n["attn_norm"]], F32),
            wq=[linear_to_conv(wq[h * hs:(h + 1) * hs]) for h in range(cfg.n_heads)],
            wk=[linear_to_conv(wk[h * hs:(h + 1) * hs]) for h in range(cfg.n_kv_heads)],
            wv=[linear_to_conv(wv[h * hs:(h + 1) * hs]) for h in range(cfg.n_kv_heads)],
            wo=linear_to_conv(_float(W[n["wo"]])),
            ffn_norm=np.asarray(W[n["ffn_norm"]], F32),
            w_gate=linear_to_conv(_float(W[n["w_gate"]])),
            w_up=linear_to_conv(_float(W[n["w_up"]])),
            w_down=linear_to_conv(_float(W[n["w_down"]])),
            name=f"layers.{i}",
        ))
    return layers


FLOAT = StaticA16({})       # no tensor rounded: the float rewrites of sections 1-4


def single_head_attention(x, layer: ConvLayer, cfg: LlamaConfig, cos, sin, mask, past_k=None, past_v=None,
                          a16: StaticA16 = FLOAT):
    """Attention as nh independent single-head attentions. x (1, C, 1, T) normalized input.

    past_k (nkv, hs, S0) / past_v (nkv, S0, hs) or None. Returns (out (1, C, 1, T), new_k (nkv, hs, T),
    new_v (nkv, T, hs)); mask (T, S0 + T) additive. a16 rounds every Conv's and MatMul's inputs and outputs.
    """
    hs, rep, n = cfg.head_dim, cfg.n_rep, layer.name
    x = a16(x, f"{n}.attn_norm")                                        # the q/k/v convs' input
    new_k, new_v, keys, vals = [], [], [], []
    for j in range(cfg.n_kv_heads):
        k = a16(conv1x1(x, layer.wk[j]), f"{n}.attn.k")[0, :, 0, :].T   # (T, hs)
        new_k.append(apply_rope_hf(k, cos, sin).T)                      # (hs, T): stored transposed
        new_v.append(a16(conv1x1(x, layer.wv[j]), f"{n}.attn.v")[0, :, 0, :].T)                   # (T, hs)
        keys.append(a16(new_k[j] if past_k is None else np.concatenate([past_k[j], new_k[j]], axis=1),
                        f"{n}.attn.k_rope"))                                                       # (hs, S)
        vals.append(a16(new_v[j] if past_v is None else np.concatenate([past_v[j], new_v[j]], axis=0),
                        f"{n}.attn.v"))                                                            # (S, hs)
    heads = []
    for h in range(cfg.n_heads):
        j = h // rep                                                    # the key/value head this query head reads
        q = apply_rope_hf(a16(conv1x1(x, layer.wq[h]), f"{n}.attn.q")[0, :, 0, :].T, cos, sin)   # (T, hs)
        q = a16(q * F32(1.0 / np.sqrt(hs)), f"{n}.attn.q_rope")
        scores = a16(q @ keys[j], f"{n}.attn.scores") + mask                                      # (T, S)
        heads.append(a16(a16(softmax(scores), f"{n}.attn.probs") @ vals[j], f"{n}.attn.heads"))  # (T, hs)
    y = np.concatenate(heads, axis=1)                                   # (T, nh*hs): the o conv's input
    out = a16(conv1x1(y.T[None, :, None, :], layer.wo), f"{n}.attn.out")   # (1, C, 1, T)
    return out, np.stack(new_k), np.stack(new_v)


def conv_block(x, layer: ConvLayer, cfg: LlamaConfig, cos, sin, mask, past_k=None, past_v=None,
               a16: StaticA16 = FLOAT):
    """One transformer block on (1, C, 1, T), convs only. Returns (x, new_k, new_v)."""
    n = layer.name
    attn, k, v = single_head_attention(rms_norm_nchw(x, layer.attn_norm, cfg.norm_eps), layer, cfg,
                                       cos, sin, mask, past_k, past_v, a16)
    h = x + attn
    hn = a16(rms_norm_nchw(h, layer.ffn_norm, cfg.norm_eps), f"{n}.ffn_norm")
    gate = a16(conv1x1(hn, layer.w_gate), f"{n}.ffn.gate")
    up = a16(conv1x1(hn, layer.w_up), f"{n}.ffn.up")
    hidden = a16(silu(gate) * up, f"{n}.ffn.hidden")                   # (1, H, 1, T)
    return h + a16(conv1x1(hidden, layer.w_down), f"{n}.ffn.out"), k, v


# ------------------------------------------------------------------------------------------------
# 6. Static A16: one int16 scale per activation tensor, fixed ahead of time

# The tensors a W4A16 graph holds as int16: the inputs and outputs of every Conv and MatMul, as Qualcomm's recipe
# quantizes them. Per layer (named "layers.{i}.<site>"), then the classifier's two:
A16_SITES = {
    "attn_norm": "input of the q, k and v convs",
    "attn.q": "q conv output", "attn.k": "k conv output", "attn.v": "v conv output (the values: P.V's right input)",
    "attn.q_rope": "q after RoPE and 1/sqrt(hs): the score MatMul's left input",
    "attn.k_rope": "the keys after RoPE, past and new: its right input",
    "attn.scores": "the score MatMul's output (before the mask)",
    "attn.probs": "softmax output: P.V's left input",
    "attn.heads": "P.V's output, one head each (together the o conv's input)",
    "attn.out": "o conv output",
    "ffn_norm": "input of the gate and up convs", "ffn.gate": "gate conv output", "ffn.up": "up conv output",
    "ffn.hidden": "silu(gate) * up: the down conv's input", "ffn.out": "down conv output",
}
A16_MODEL_SITES = {"norm.out": "the classifier conv's input", "logits": "its output"}
ACT_MARGIN = 2.0          # the fixed range is 2x the calibration maximum: one of int16's 15 bits spent as headroom
CALIBRATION_TEXTS = (     # the world's kinds of text: a story, facts, a chat turn
    "Once upon a time, there was a happy girl named Lucy. Lucy lived near the river. Lucy liked to eat honey. "
    "One morning, Lucy and Leo went to the lake. The sun was bright and the sky was blue.",
    "Sam was a little boy. Sam's book was red. Sam found four apples. Then Dan picked one more apples. "
    "Now they had five apples.",
    "[INST] <<SYS>>\nAnswer in one sentence.\n<</SYS>>\n\nWhat does a mouse say? [/INST] A mouse says squeak.",
)


def a16_names(config: LlamaConfig) -> list[str]:
    """Every tensor name a calibration gives a scale, in forward order."""
    return [f"layers.{i}.{s}" for i in range(config.n_layers) for s in A16_SITES] + list(A16_MODEL_SITES)


def calibrate(model: Llama, prompts) -> dict:
    """{tensor name: int16 scale} for every A16 site: ACT_MARGIN x the largest |value| seen while the float on-device
    rewrite of the (weight-quantized) model runs the calibration prompts (lists of ids), / 32767. Values beyond the
    range saturate."""
    record = StaticA16(None)
    n = max(len(p) for p in prompts)
    od = OnDeviceLlama(model, n_parts=1, prompt_len=n, context=n, act_scales=record)
    for ids in prompts:
        T = len(ids)
        mask = np.where(np.tri(T, dtype=bool), F32(0), MASK_NEG).astype(F32)
        od.run_parts(np.asarray(ids), od.cos[:T], od.sin[:T], mask)
    return {k: (ACT_MARGIN * record.amax[k] / 32767) or 1.0 for k in a16_names(model.config)}


# ------------------------------------------------------------------------------------------------
# 3. The model cut into parts, and 4. the two static graphs

def split_layers(n_layers: int, n_parts: int) -> list[list[int]]:
    """The layers cut into n_parts parts of whole layers, as evenly as they go: [[0, 1], [2], [3], [4, 5]]."""
    if not 1 <= n_parts <= n_layers:
        raise InputError(f"n_parts={n_parts} (--parts {n_parts}): the model has {n_layers} layers, so 1..{n_layers} parts")
    bounds = np.linspace(0, n_layers, n_parts + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(n_parts)]


class OnDeviceLlama:
    """A Llama rewritten for a static-graph runtime: conv kernels, single-head attention, n_parts parts.

    prompt_len P: the prompt processor's fixed length (Qualcomm: 1024); context: the KV-cache capacity of the token
    generator including the new token (past slots = context - 1). act_scales ({tensor name: scale}, from
    `calibrate`): static A16 at every Conv's and MatMul's inputs and outputs; None keeps them float (a StaticA16
    records them instead: calibrate's pass).
    """

    def __init__(self, model: Llama, n_parts=4, prompt_len=None, context=None, act_scales=None):
        cfg = model.config
        self.set_host(cfg, n_parts, prompt_len, context)
        self.layers = conv_layers(model)
        self.a16 = act_scales if isinstance(act_scales, StaticA16) else StaticA16(act_scales or {})
        embed, norm, head = (MODEL_TENSORS[k][0] for k in ("embed", "norm", "lm_head"))   # HF names
        self.embed = _float(model.weights[embed])                                  # (V, C)
        self.norm = np.asarray(model.weights[norm], F32)
        head = embed if cfg.tie_embeddings else head
        self.lm_head = linear_to_conv(_float(model.weights[head]))              # (V, C, 1, 1)

    def set_host(self, cfg: LlamaConfig, n_parts, prompt_len=None, context=None):
        """The host's side, without weights (OnnxOnDeviceLlama has only this): the lengths, the RoPE tables it slices,
        the parts."""
        self.config = cfg
        self.prompt_len = prompt_len or min(cfg.max_seq_len, 64)
        self.context = context or cfg.max_seq_len
        self.cos, self.sin = rope_tables(cfg, self.context)                     # (context, hs/2) each
        self.parts = split_layers(cfg.n_layers, n_parts)

    # -- one part: a graph of its own ----------------------------------------------------------------
    def run_part(self, p, h, cos, sin, mask, past_k=None, past_v=None):
        """Part p. Input: token ids (T,) for part 0, else hidden (1, C, 1, T). Output: hidden, or logits (T, V) for
        the last part; plus this part's new keys [(nkv, hs, T)] and values [(nkv, T, hs)], one per layer."""
        cfg = self.config
        if p == 0:
            h = to_nchw(self.embed[np.asarray(h)][None])                        # (1, C, 1, T)
        ks, vs = [], []
        for n, i in enumerate(self.parts[p]):
            pk = None if past_k is None else past_k[n]
            pv = None if past_v is None else past_v[n]
            h, k, v = conv_block(h, self.layers[i], cfg, cos, sin, mask, pk, pv, self.a16)
            ks.append(k)
            vs.append(v)
        if p == len(self.parts) - 1:
            h = self.a16(rms_norm_nchw(h, self.norm, cfg.norm_eps), "norm.out")
            h = self.a16(conv1x1(h, self.lm_head), "logits")[0, :, 0, :].T      # (T, V) logits
        return h, ks, vs

    def run_parts(self, tokens, cos, sin, mask, past_k=None, past_v=None):
        """All parts in sequence (on a device: load part, run, hand the hidden state on). past_* per layer."""
        h, ks, vs = tokens, [], []
        for p, layer_ids in enumerate(self.parts):
            pk = None if past_k is None else [past_k[i] for i in layer_ids]
            pv = None if past_v is None else [past_v[i] for i in layer_ids]
            h, k, v = self.run_part(p, h, cos, sin, mask, pk, pv)
            ks += k
            vs += v
        return h, ks, vs

    # -- the prompt processor: fixed length P, left-padded ------------------------------------------
    def prompt_inputs(self, prompt_ids, pad_id=0):
        """Host side: (tokens (P,), cos (P, hs/2), sin, mask (P, P)) for a prompt of n <= P tokens.

        The prompt is right-aligned (left padding), so the last row's logits are always the next-token logits.
        Real token t sits at slot P-n+t with position t; pad slots get position 0 and are masked as keys.
        """
        P, n = self.prompt_len, len(prompt_ids)
        if not 0 < n <= P:
            raise InputError(f"the prompt processor takes 1..{P} tokens, got {n}; process longer prompts in chunks")
        tokens = np.full(P, pad_id, np.int64)
        tokens[P - n:] = prompt_ids
        pos = np.zeros(P, np.int64)
        pos[P - n:] = np.arange(n)
        valid = np.arange(P) >= P - n                                           # key slot holds a real token
        causal = np.arange(P)[None, :] <= np.arange(P)[:, None]
        mask = np.where(causal & valid[None, :], F32(0), MASK_NEG).astype(F32)
        return tokens, self.cos[pos], self.sin[pos], mask

    def prompt_processor(self, tokens, cos, sin, mask):
        """Static graph 1: tokens (P,) -> logits (P, V), keys [L x (nkv, hs, P)], values [L x (nkv, P, hs)]."""
        return self.run_parts(tokens, cos, sin, mask)

    # -- the token generator: one token, a fixed-size cache ------------------------------------------
    def generator_inputs(self, token, position, n_valid):
        """Host side: (token (1,), cos (1, hs/2), sin, mask (1, context)) for the next token.

        The past cache has context-1 slots, right-aligned: the n_valid most recent positions fill the last slots.
        """
        past = self.context - 1
        if n_valid > past:
            raise InputError(f"the cache holds {past} positions; {n_valid} do not fit (context={self.context})")
        mask = np.full((1, self.context), MASK_NEG, F32)
        mask[0, past - n_valid:] = 0.0                                         # valid past slots and the new token
        return np.array([token]), self.cos[[position]], self.sin[[position]], mask

    def token_generator(self, token, cos, sin, mask, past_k, past_v):
        """Static graph 2: token (1,), past keys [L x (nkv, hs, context-1)], values [L x (nkv, context-1, hs)]
        -> logits (V,), new key [L x (nkv, hs, 1)], new value [L x (nkv, 1, hs)] (only the new ones go out)."""
        logits, ks, vs = self.run_parts(token, cos, sin, mask, past_k, past_v)
        return logits[0], ks, vs

    # -- the host loop around the two graphs ----------------------------------------------------------
    def empty_cache(self):
        cfg, past = self.config, self.context - 1
        ks = [np.zeros((cfg.n_kv_heads, cfg.head_dim, past), F32) for _ in range(cfg.n_layers)]
        vs = [np.zeros((cfg.n_kv_heads, past, cfg.head_dim), F32) for _ in range(cfg.n_layers)]
        return ks, vs

    def generate(self, prompt_ids, max_new_tokens, keep_logits=True):
        """Greedy generation with the two graphs: prompt processor once, token generator per new token.

        The host keeps the cache: after each step it shifts the cache left by one and writes the new key/value
        into the last slot. Returns (new ids, list of logits (V,) that chose them).
        """
        n = len(prompt_ids)
        if n + max_new_tokens > self.context:
            raise InputError(f"{n} prompt + {max_new_tokens} new tokens exceed the context of {self.context}")
        logits, ks, vs = self.prompt_processor(*self.prompt_inputs(prompt_ids))
        cache_k, cache_v = self.empty_cache()
        for i in range(self.config.n_layers):                  # the prompt's n real keys go to the last n slots
            cache_k[i][:, :, -n:] = ks[i][:, :, -n:]
            cache_v[i][:, -n:, :] = vs[i][:, -n:, :]
        out, all_logits = [], [logits[-1]]
        token = int(np.argmax(logits[-1]))
        for step in range(max_new_tokens - 1):
            out.append(token)
            pos = n + step
            lg, nk, nv = self.token_generator(*self.generator_inputs(token, pos, pos), cache_k, cache_v)
            for i in range(self.config.n_layers):
                cache_k[i] = np.concatenate([cache_k[i][:, :, 1:], nk[i]], axis=2)
                cache_v[i] = np.concatenate([cache_v[i][:, 1:, :], nv[i]], axis=1)
            all_logits.append(lg)
            token = int(np.argmax(lg))
        out.append(token)
        return out, (all_logits if keep_logits else None)


# ------------------------------------------------------------------------------------------------
# 5. The bandwidth bound of decoding

def decode_bytes_per_token(config: LlamaConfig, bits_per_weight: float, kv_len: int = 0, kv_bytes: float = 2,
                           head_bits: float | None = None) -> dict:
    """Bytes read from memory to decode one token: every matmul weight once (the embedding only one row),
    plus the KV cache of kv_len past positions (2 x layers x nkv x hs x kv_len x kv_bytes)."""
    C, V, L = config.dim, config.vocab_size, config.n_layers
    hs, nkv = config.head_dim, config.n_kv_heads
    layer_params = L * config.layer_matrix_params()
    head_params = V * C
    weights = layer_params * bits_per_weight / 8 + head_params * (head_bits or bits_per_weight) / 8
    kv = 2 * L * nkv * hs * kv_len * kv_bytes
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def tokens_per_second_bound(bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Memory-bound ceiling: each token must stream bytes_per_token through a bus of bandwidth_gb_s (1e9 B/s)."""
    return bandwidth_gb_s * 1e9 / bytes_per_token


def measure_bandwidth(nbytes=256 * 2 ** 20, repeats=5) -> float:
    """This machine's copy bandwidth in GB/s: the best of `repeats` np.copyto of nbytes (read + write counted)."""
    a = np.ones(nbytes // 4, F32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def measure_decode(model: Llama, n_tokens=16, prompt_len=8) -> float:
    """Our decode speed (tokens/s) for one sequence: the median time of single-token forwards with a KV cache (the
    step generate() runs)."""
    cache = model.new_cache(max_len=prompt_len + n_tokens + 1)
    model.forward(np.arange(prompt_len) % model.config.vocab_size, 0, cache, last_only=True)
    times = []
    for i in range(n_tokens):
        t0 = time.perf_counter()
        model.forward([i % model.config.vocab_size], prompt_len + i, cache, last_only=True)
        times.append(time.perf_counter() - t0)
    return 1.0 / float(np.median(times))
