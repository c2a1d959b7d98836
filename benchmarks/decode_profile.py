"""Where the time of one decode step goes: each operation of Llama.forward with T = 1 timed alone, beside the step.

A decode step is Llama.forward([token], pos, cache, last_only=True), generate()'s loop body. One new token at position
128, float32, in the stories15M shape (dim 288, 6 layers, hidden 768, vocab 32000) or the embedded model's
(`--shape tinyworld`: dim 256, GQA 8/4, vocab 1024). Each row times one operation of one layer on its own, repeated,
so its weights sit in cache; "all layers" multiplies by the layer count. The measured step reads every weight once,
from memory where they do not fit in cache, so the step takes longer than the sum: that difference is memory traffic
(and the cache misses of everything else). A last table times the step at each thread count and matrix-vector
products of three sizes on 1 and 2 BLAS threads: what a second thread can do for a decode step (OpenBLAS splits a
large product, not a small one).

    python benchmarks/decode_profile.py [--shape stories15M|tinyworld] [--readme]

No [reference] extra needed. `--readme` writes the tables into README.md between the BENCH-DECODE-PROFILE markers
(BENCH-DECODE-PROFILE-TINYWORLD for the embedded shape).
"""
import argparse

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--shape", default="stories15M", choices=["stories15M", "tinyworld"])
ap.add_argument("--readme", action="store_true", help="write the tables into README.md")
args = ap.parse_args()
from _bench import machine_line, pin_threads, write_readme_block  # noqa: E402
pin_threads(2)

import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from llama_ref import paths  # noqa: E402
from llama_ref.config import PRESETS, LlamaConfig  # noqa: E402
from llama_ref.model import Llama, apply_rope_hf, attention, linear, rms_norm, softmax, swiglu  # noqa: E402
from llama_ref.weights import weight_shapes  # noqa: E402

base = PRESETS["stories15M"] if args.shape == "stories15M" else LlamaConfig.load(paths.DEFAULT_MODEL)
cfg = base.replace(max_seq_len=512)
rng = np.random.default_rng(0)
weights = {k: (rng.standard_normal(s, dtype=np.float32) * 0.05 if len(s) == 2 else np.ones(s, np.float32))
           for k, s in weight_shapes(cfg).items()}
model = Llama(cfg, weights)
POS = 128


def per_call_us(fn, seconds=0.3):
    """Median of 5 runs of fn in a loop of ~`seconds`, microseconds per call."""
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 5:
        fn()
        n += 1
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return float(np.median(runs))


# one layer's inputs at position POS, as Llama.block makes them for one new token
layer = model.params["layers"][0]
nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
x = rng.standard_normal((1, 1, cfg.dim), dtype=np.float32)                           # (B, T, C)
cache = model.new_cache(1, 512)
model.forward(np.arange(POS) % cfg.vocab_size, 0, cache)
cos, sin = (t[POS:POS + 1, None] for t in model.rope(POS + 1))                       # (T, 1, hs/2)
qkv = linear(x, layer["wqkv"]).reshape(1, 1, nh + 2 * nkv, hs)
qk = apply_rope_hf(qkv[:, :, :nh + nkv], cos, sin)
q, k, v = (a.transpose(0, 2, 1, 3) for a in (qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv:]))
keys, values = cache.update(0, POS, k, v)
heads = attention(q, keys, values)[0]
qg = q.reshape(1, nkv, nh // nkv, 1, hs) * np.float32(1 / np.sqrt(hs))      # as model.attention groups the heads
scores = qg @ keys[:, :, None].swapaxes(-1, -2)
probs = softmax(scores)
flat = heads.transpose(0, 2, 1, 3).reshape(1, 1, nh * hs)
gate_up = linear(x, layer["w_gate_up"])
H = gate_up.shape[-1] // 2
hidden = swiglu(gate_up[..., :H], gate_up[..., H:])

OPS = [("RMSNorm (x2)", lambda: rms_norm(x, layer["attn_norm"], cfg.norm_eps), 2),
       ("x @ [wq | wk | wv]", lambda: linear(x, layer["wqkv"]), 1),
       ("RoPE on q and k", lambda: apply_rope_hf(qkv[:, :, :nh + nkv], cos, sin), 1),
       ("KV cache write", lambda: cache.update(0, POS, k, v), 1),
       ("scores q k^T (incl. the 1/sqrt(hs) scale)", lambda: (q.reshape(1, nkv, nh // nkv, 1, hs) * np.float32(0.1))
        @ keys[:, :, None].swapaxes(-1, -2), 1),
       ("softmax", lambda: softmax(scores), 1),
       ("probs @ v", lambda: probs @ values[:, :, None], 1),
       ("heads @ wo + residual", lambda: x + linear(flat, layer["wo"]), 1),
       ("x @ [w_gate | w_up]", lambda: linear(x, layer["w_gate_up"]), 1),
       ("SwiGLU", lambda: swiglu(gate_up[..., :H], gate_up[..., H:]), 1),
       ("hidden @ w_down + residual", lambda: x + linear(hidden, layer["w_down"]), 1),
       ("the whole block (Llama.block)", lambda: model.block(0, layer, x, POS, cos, sin, None, cache, None), 0)]


def step_us():
    c = model.new_cache(1, 512)
    model.forward(np.arange(POS) % cfg.vocab_size, 0, c)
    return per_call_us(lambda: (model.forward([5], POS, c, last_only=True), setattr(c, "length", POS)))


with threadpool_limits(1):
    rows = [(name, per_call_us(fn) * times if times else per_call_us(fn), times) for name, fn, times in OPS]
    head_us = per_call_us(lambda: model.head(x[:, -1]))
    steps = {1: step_us()}
with threadpool_limits(2):
    steps[2] = step_us()
L = cfg.n_layers
ops_us = sum(us for _, us, times in rows if times) * L
block_us = rows[-1][1] * L
step1 = steps[1]
shape = (f"{args.shape} shape" if args.shape == "stories15M"
         else f"tinyworld shape (dim {cfg.dim}, GQA {nh}/{nkv}, vocab {cfg.vocab_size})")
table = [f"| one decode step, {shape}, 1 thread | us per layer (in cache) | all {L} layers | share of the step |",
         "|---|---:|---:|---:|"]
table += [f"| {name} | {us:,.1f} | {us * L:,.0f} | {100 * us * L / step1:.0f}% |" for name, us, times in rows]
table += [f"| classifier (final RMSNorm + {cfg.dim} x {cfg.vocab_size}) | | {head_us:,.0f} | {100 * head_us / step1:.0f}% |",
          f"| **the operations above, in cache, + classifier** | | **{ops_us + head_us:,.0f}** | "
          f"{100 * (ops_us + head_us) / step1:.0f}% |",
          f"| **the blocks alone, in cache, + classifier** | | **{block_us + head_us:,.0f}** | "
          f"{100 * (block_us + head_us) / step1:.0f}% |",
          f"| **measured step (Llama.forward, T = 1)** | | **{step1:,.0f}** | 100% |"]
weight_mb = (sum(np.asarray(w).nbytes for w in weights.values() if np.ndim(w) == 2)
             - cfg.vocab_size * cfg.dim * 4 * (0 if cfg.tie_embeddings else 1)) / 1e6       # the embedding: one row
notes = (f"\nThe step reads about {weight_mb:.0f} MB of float32 weights; at the measured step that is "
         f"{weight_mb / step1 * 1e3:.1f} GB/s. Blocks minus operations is the Python between NumPy calls (views, "
         "taps, arguments); step minus blocks is memory traffic. NumPy's per-call overhead is inside every row (about a "
         f"microsecond per call). The step at 2 BLAS threads: {steps[2]:,.0f} us ({steps[2] / step1:.2f}x the 1-thread "
         "time).")
sizes = [(cfg.dim, cfg.hidden_dim), (1024, 4096), (cfg.dim, cfg.vocab_size)]
mv = ["| matrix-vector product x @ W | 1 BLAS thread, us | 2 BLAS threads, us | 2 threads / 1 |", "|---|---:|---:|---:|"]
for n_in, n_out in sizes:
    W = rng.standard_normal((n_in, n_out), dtype=np.float32)
    vec = rng.standard_normal((1, n_in), dtype=np.float32)
    t = []
    for nt in (1, 2):
        with threadpool_limits(nt):
            t.append(per_call_us(lambda: vec @ W))
    mv.append(f"| {n_in} x {n_out} ({W.nbytes / 2**20:.1f} MiB) | {t[0]:,.1f} | {t[1]:,.1f} | **{t[1] / t[0]:.2f}x** |")
text = "\n".join(table) + "\n" + notes + "\n\n" + "\n".join(mv) + f"\n\nMachine: {machine_line('1,2')}."
print(text)

if args.readme:
    name = "BENCH-DECODE-PROFILE" + ("" if args.shape == "stories15M" else "-TINYWORLD")
    write_readme_block(name, text, anchor="<!-- /BENCH-DECODE-PROFILE -->")
