"""ONNX Runtime (float32 and int4 exports) vs our NumPy forward: same weights, same thread count, one process.

The files are written by `python -m llama_ref export --format onnx / onnx-int4` (llama_ref/onnx_export.py) into a
temporary directory. ONNX Runtime runs them through its own CPU kernels (MatMul, and MatMulNBits for int4); the
NumPy side is model.py's forward for float32 and onnx_export.int4_reference (our W4 path, the same numbers) for int4.

Prefill: one forward over a --prompt-len prompt (all logits on both sides). Decode: greedy new tokens one at a time
with a KV cache after an 8-token prompt; both sides must produce the same ids (checked and printed).

    python benchmarks/onnx_runtime.py [--shape stories15M|tinyworld] [--threads 1,2] [--readme]

Prints a markdown table with the machine line; `--readme` writes it between README.md's BENCH-ONNX markers.
Ratios move much less than tokens/s between runs on a shared machine: compare ratios. Needs the [onnx] extra.
"""
import argparse

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--shape", default="stories15M,tinyworld",
                help="stories15M (random weights of its shape) and/or tinyworld (the embedded model); default: both")
ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured (default: 1,2)")
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--decode-tokens", type=int, default=64)
ap.add_argument("--repeats", type=int, default=5, help="prefill repeats (median is reported)")
ap.add_argument("--readme", action="store_true", help="write the table into README.md")
args = ap.parse_args()
from _bench import machine_line, median_time, pin_thread_counts, write_readme_block  # noqa: E402

threads = pin_thread_counts(args.threads)                                  # before numpy loads its BLAS

import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from llama_ref import onnx_export as OX  # noqa: E402
from llama_ref.config import PRESETS  # noqa: E402
from llama_ref.errors import ExtraMissingError  # noqa: E402
from llama_ref.loader import read_checkpoint  # noqa: E402
from llama_ref.model import Llama  # noqa: E402
from llama_ref.weights import weight_shapes  # noqa: E402

try:
    OX.require_onnx()
    import onnxruntime
except (ExtraMissingError, ImportError) as e:
    sys.exit(f"benchmarks/onnx_runtime.py: {e}")


def model_of(shape):
    if shape == "tinyworld":
        config, weights = read_checkpoint()
        return Llama(config, weights)
    cfg = PRESETS["stories15M"].replace(max_seq_len=max(256, args.prompt_len + args.decode_tokens + 8))
    rng = np.random.default_rng(0)
    w = {k: (rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)) for k, s in weight_shapes(cfg).items()}
    for k in w:
        if w[k].ndim == 1:
            w[k] = np.ones_like(w[k])
    return Llama(cfg, w)


def decode_numpy(model, prompt, n):
    cache = model.new_cache(1, model.config.max_seq_len)
    tok = int(np.argmax(model.forward(prompt, 0, cache, last_only=True)))
    out, t0 = [], time.perf_counter()
    for pos in range(len(prompt), len(prompt) + n):
        out.append(tok)
        tok = int(np.argmax(model.forward([tok], pos, cache, last_only=True)))
    return time.perf_counter() - t0, out


def decode_ort(sess, cfg, prompt, n):
    logits, past = OX.run(sess, cfg, [list(prompt)])
    tok, out, t0 = int(np.argmax(logits[0, -1])), [], time.perf_counter()
    for _ in range(n):
        out.append(tok)
        logits, past = OX.run(sess, cfg, [[tok]], past)
        tok = int(np.argmax(logits[0, -1]))
    return time.perf_counter() - t0, out


rows, notes = [], []
with tempfile.TemporaryDirectory() as tmp:
    for shape in args.shape.split(","):
        model = model_of(shape)
        cfg = model.config
        rng = np.random.default_rng(0)
        prompt = rng.integers(3, cfg.vocab_size, args.prompt_len)
        for kind in ("float32", "int4"):
            ours = model if kind == "float32" else OX.int4_reference(model)
            path = OX.export_onnx(model, Path(tmp) / f"{shape}-{kind}", int4=kind == "int4")
            for nt in threads:
                sess = OX.session(path, threads=nt)
                with threadpool_limits(nt):
                    t_np = median_time(lambda: ours.forward(prompt[None]), args.repeats)
                    t_ort = median_time(lambda: OX.run(sess, cfg, prompt[None]), args.repeats)
                    decode_numpy(ours, prompt[:8], 8), decode_ort(sess, cfg, prompt[:8], 8)        # warm-up
                    d_np, ids_np = decode_numpy(ours, prompt[:8], args.decode_tokens)
                    d_ort, ids_ort = decode_ort(sess, cfg, prompt[:8], args.decode_tokens)
                th = f"{nt} thread{'s' * (nt > 1)}"
                rows.append((shape, kind, f"prefill {args.prompt_len}, {th}", args.prompt_len / t_np,
                             args.prompt_len / t_ort))
                rows.append((shape, kind, f"decode {args.decode_tokens}, {th}", args.decode_tokens / d_np,
                             args.decode_tokens / d_ort))
                notes.append(f"{shape} {kind} {th}: same greedy ids {ids_np == ids_ort}")

table = ["| shape | weights | phase | llama_ref (NumPy) tok/s | ONNX Runtime tok/s | ours / ORT |",
         "|---|---|---|---:|---:|---:|"]
for shape, kind, phase, a, b in rows:
    table.append(f"| {shape} | {kind} | {phase} | {a:,.0f} | {b:,.0f} | **{a / b:.2f}x** |")
text = ("\n".join(table) + "\n\n" + "; ".join(notes) + f".\nnumpy {np.__version__}, onnxruntime "
        f"{onnxruntime.__version__}. int4 = our W4 path (block 32) vs MatMulNBits on the same codes.\n"
        f"Machine: {machine_line(args.threads)}.")
print(text)
if args.readme:
    write_readme_block("BENCH-ONNX", text)
