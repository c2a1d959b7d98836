"""Where the time of one decode step goes: each operation of decode.decode_step timed alone, beside the whole step.

The stories15M shape (dim 288, 6 layers, hidden 768, vocab 32000), float32, one new token at position 128. Each row
times one operation of one layer on its own, repeated, so its weights sit in cache; "all layers" multiplies by the
layer count. The measured step reads ~60 MB of weights that do not fit in cache, so the step takes longer than the
sum: that difference is memory traffic. A last table times matrix-vector products of three sizes on 1 and 2 BLAS
threads: what a second thread can do for a decode step (OpenBLAS splits a large product, not a small one).

    python benchmarks/decode_profile.py [--readme]

No [reference] extra needed. `--readme` writes the tables into README.md between the BENCH-DECODE-PROFILE markers.
"""
import argparse

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--readme", action="store_true", help="write the tables into README.md")
args = ap.parse_args()
from _bench import machine_line, pin_threads, write_readme_block  # noqa: E402
pin_threads(2)

import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from llama_ref import decode  # noqa: E402
from llama_ref.config import PRESETS  # noqa: E402
from llama_ref.model import Llama, softmax, swiglu  # noqa: E402
from llama_ref.weights import weight_shapes  # noqa: E402

cfg = PRESETS["stories15M"].replace(max_seq_len=512)
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


# one layer's inputs, as decode.blocks makes them at position POS
layer, fused = model.params["layers"][0], model.fused[0]
nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
x = rng.standard_normal((1, cfg.dim), dtype=np.float32)
cache = model.new_cache(1, 512)
cos, sin = decode.rope_rows(model, POS)
qkv = x @ fused["wqkv"]
qk = qkv[:, :(nh + nkv) * hs].reshape(1, nh + nkv, hs)
keys = rng.standard_normal((1, nkv, POS + 1, hs), dtype=np.float32)
q = qk[:, :nh].reshape(1, nkv, nh // nkv, hs)
scores = q @ keys.swapaxes(-1, -2)
probs = softmax(scores)
heads = (probs @ keys).reshape(1, nh * hs)
gate_up = x @ fused["w_gate_up"]
H = gate_up.shape[1] // 2
hidden = swiglu(gate_up[:, :H], gate_up[:, H:])


OPS = [("RMSNorm (x2)", lambda: decode.rms_norm_row(x, layer["attn_norm"], cfg.norm_eps), 2),
       ("x @ [wq | wk | wv]", lambda: x @ fused["wqkv"], 1),
       ("RoPE on q and k", lambda: decode.rope_row(qk, cos, sin), 1),
       ("KV cache write", lambda: cache.update(0, POS, qk[:, nh:, None], qk[:, nh:, None]), 1),
       ("scores q k^T", lambda: q @ keys.swapaxes(-1, -2), 1),
       ("softmax", lambda: softmax(scores), 1),
       ("probs @ v", lambda: probs @ keys, 1),
       ("heads @ wo + residual", lambda: x + heads @ layer["wo"], 1),
       ("x @ [w_gate | w_up]", lambda: x @ fused["w_gate_up"], 1),
       ("SwiGLU", lambda: swiglu(gate_up[:, :H], gate_up[:, H:]), 1),
       ("hidden @ w_down + residual", lambda: x + hidden @ layer["w_down"], 1)]


def whole_step_us():
    c = model.new_cache(1, 512)
    model.forward(np.arange(POS) % cfg.vocab_size, 0, c)
    return per_call_us(lambda: (decode.decode_step(model, [5], POS, c), setattr(c, "length", POS)))


with threadpool_limits(1):
    rows = [(name, per_call_us(fn) * times) for name, fn, times in OPS]
    head_us = per_call_us(lambda: model.head(x))
    step_us = whole_step_us()
layers_us = sum(us for _, us in rows) * cfg.n_layers
table = ["| one decode step, stories15M shape, 1 thread | us per layer (in cache) | all 6 layers | share of the step |",
         "|---|---:|---:|---:|"]
table += [f"| {name} | {us:,.1f} | {us * cfg.n_layers:,.0f} | {100 * us * cfg.n_layers / step_us:.0f}% |"
          for name, us in rows]
table += [f"| classifier (final RMSNorm + 288 x 32000) | | {head_us:,.0f} | {100 * head_us / step_us:.0f}% |",
          f"| **sum of the parts, in cache** | | **{layers_us + head_us:,.0f}** | "
          f"{100 * (layers_us + head_us) / step_us:.0f}% |",
          f"| **measured step (decode.decode_step)** | | **{step_us:,.0f}** | 100% |"]
weight_mb = sum(np.asarray(w).nbytes for w in weights.values() if np.ndim(w) == 2) / 1e6 - \
    cfg.vocab_size * cfg.dim * 4 / 1e6 * (0 if cfg.tie_embeddings else 1)                 # the embedding: one row read
notes = (f"\nThe step reads about {weight_mb:.0f} MB of float32 weights; at the measured step that is "
         f"{weight_mb / step_us * 1e3:.1f} GB/s. The gap between the sum of the parts (weights in cache) and the "
         "step is memory traffic; NumPy's per-call overhead is inside every row (a few us per call).")

sizes = [(288, 768), (1024, 4096), (288, 32000)]
mv = ["| matrix-vector product x @ W | 1 BLAS thread, us | 2 BLAS threads, us | 2 threads / 1 |", "|---|---:|---:|---:|"]
for n_in, n_out in sizes:
    W = rng.standard_normal((n_in, n_out), dtype=np.float32)
    v = rng.standard_normal((1, n_in), dtype=np.float32)
    t = []
    for nt in (1, 2):
        with threadpool_limits(nt):
            t.append(per_call_us(lambda: v @ W))
    mv.append(f"| {n_in} x {n_out} ({W.nbytes / 2**20:.1f} MiB) | {t[0]:,.1f} | {t[1]:,.1f} | **{t[1] / t[0]:.2f}x** |")
text = "\n".join(table) + "\n" + notes + "\n\n" + "\n".join(mv) + f"\n\nMachine: {machine_line('1,2')}."
print(text)

if args.readme:
    write_readme_block("BENCH-DECODE-PROFILE", text, anchor="<!-- /BENCH-FORWARD-TINYWORLD -->")
