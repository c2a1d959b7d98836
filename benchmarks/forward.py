"""Our NumPy forward vs transformers' LlamaForCausalLM and llama.cpp's F32 path: same weights, same thread count.

llama.cpp (where llama-cpp-python is installed, see benchmarks/llamacpp_check.py for the AMX build note) runs the same
weights exported by us as an F32 GGUF, in a child process per thread count (its own threads: n_threads), with an F32
KV cache. Greedy ids must agree across all three (printed).

Prefill: one forward over a 256-token prompt up to the first new token's logits (the time to first token): the last
position's logits only, as generate() asks Llama.forward (last_only=True), transformers' generate() asks its model
(logits_to_keep=1) and llama.cpp computes by default.
Decode: greedy generation of new tokens one at a time with a KV cache, after a short prompt; prompt tokens are
never counted as generated tokens. Ours is generate()'s loop: Llama.forward with T = 1. Both sides decode the same
tokens (checked), so they do the same work.

Kernel families: OpenBLAS picks its kernels when NumPy loads (OPENBLAS_CORETYPE), so each family is measured in a child
process of its own, peers included (ratios come from one run): Haswell (AVX2) and SkylakeX (AVX-512), with Sandybridge
(AVX, no FMA) in SkylakeX's place on a CPU without AVX-512 (it would die of an illegal instruction there; the table
says so). PyTorch and llama.cpp bring their own kernels and do not read OPENBLAS_CORETYPE.

    python benchmarks/forward.py [--threads 1,2] [--coretypes Haswell,SkylakeX] [--prompt-len 256]
                                 [--decode-tokens 128] [--repeats 5] [--shape stories15M|tinyworld] [--readme]

Each thread count is measured in the same process (threadpoolctl limits OpenBLAS, torch.set_num_threads limits
PyTorch), so the rows of one family share the machine and its load. Prints a markdown table with the machine line
(CPU, SIMD level, BLAS and its kernel family); `--readme` also writes it into README.md between the BENCH-FORWARD
markers. Ratios move much less than tokens/s between runs on a shared machine; compare ratios.
`--old` adds a column for the forward as it was before Llama.forward became the one inference path (benchmarks/
_old_forward.py: the fused decode step generate() used, (in, out) copies), timed in the same run.
Needs the [reference] extra (torch==2.13.0, transformers).
"""
import argparse
import json
import sys

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured (default: 1,2)")
ap.add_argument("--coretypes", default="Haswell,SkylakeX",
                help="OpenBLAS kernel families, each in its own process (default: Haswell,SkylakeX)")
ap.add_argument("--prompt-len", type=int, default=256)
ap.add_argument("--decode-tokens", type=int, default=128)
ap.add_argument("--repeats", type=int, default=5, help="prefill repeats (median is reported)")
ap.add_argument("--shape", default="stories15M", choices=["stories15M", "tinyworld"],
                help="stories15M (dim 288, vocab 32000) or the embedded model's shape (dim 256, GQA, vocab 1024)")
ap.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out even if llama-cpp-python is installed")
ap.add_argument("--old", action="store_true", help="also time the forward as it was before the one forward")
ap.add_argument("--readme", action="store_true", help="write the table into README.md")
ap.add_argument("--child", help=argparse.SUPPRESS)                 # internal: measure one kernel family, print JSON
args = ap.parse_args()
from _bench import (import_reference, kernel_label, machine_line, median_time, per_kernel_family,  # noqa: E402
                    pin_thread_counts, substitution_note, write_readme_block)
threads = pin_thread_counts(args.threads)                                  # before numpy/torch load BLAS

if args.child is None:                                                     # the parent: one child per kernel family
    results = per_kernel_family(__file__, sys.argv[1:], args.coretypes)

    def table(with_old):
        head = (f"| {results[0]['shape']}, float32 | kernels | llama_ref (NumPy) | "
                + ("before | now / before | " if with_old else "")
                + "transformers (PyTorch) | ours / transformers | llama.cpp F32 | ours / llama.cpp |")
        lines = [head, "|---|---|" + "---:|" * (7 if with_old else 5)]
        for r in results:
            for name, a, b, c, o in r["rows"]:
                old_cells = (f"{o:,.0f} | {a / o:.2f}x | " if o else "– | – | ") if with_old else ""
                lc_cells = f"{c:,.0f} | **{a / c:.2f}x**" if c else "– | –"
                lines.append(f"| {name} | {kernel_label(r)} | {a:,.0f} | {old_cells}{b:,.0f} | **{a / b:.2f}x** | "
                             f"{lc_cells} |")
        notes = [f"{kernel_label(r)}: {r['notes']} Machine: {r['machine']}." for r in results]
        return "\n".join(lines) + "\n\n" + "\n".join(notes + [substitution_note(results)]).strip()
    print(table(args.old))
    if args.readme:                          # the README keeps today's code only (--old is a one-time comparison)
        write_readme_block("BENCH-FORWARD" if args.shape == "stories15M" else "BENCH-FORWARD-TINYWORLD",
                           table(False), anchor="<!-- /BENCH-FORWARD -->")
    sys.exit(0)

# ---- a child: one kernel family -----------------------------------------------------------------------------------
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

torch, transformers = import_reference("forward.py")

from llama_ref import gguf_io, paths, synthetic  # noqa: E402
from llama_ref.config import PRESETS, LlamaConfig  # noqa: E402
from llama_ref.model import Llama  # noqa: E402

from threadpoolctl import threadpool_limits  # noqa: E402

base = PRESETS["stories15M"] if args.shape == "stories15M" else LlamaConfig.load(paths.DEFAULT_MODEL)
cfg = base.replace(max_seq_len=max(512, args.prompt_len + args.decode_tokens + 8))

# one set of weights, made by transformers, shared by all
torch.manual_seed(0)
hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",)})
hf = transformers.LlamaForCausalLM(hf_cfg).eval()
weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
ours = Llama(cfg, weights)
before = None
if args.old:
    from _old_forward import OldLlama
    before = OldLlama(ours)

rng = np.random.default_rng(0)
prompt = rng.integers(3, cfg.vocab_size, args.prompt_len)
prompt_t = torch.tensor(prompt[None])


def decode_ours(n, step=lambda tok, pos, cache: ours.forward([tok], pos, cache, last_only=True)):
    """generate()'s decode loop: Llama.forward with one token per step (or another step: the old path)."""
    cache = ours.new_cache(1, cfg.max_seq_len)
    logits = ours.forward(prompt[:8], 0, cache, last_only=True)
    tok, out = int(np.argmax(logits)), []
    t0 = time.perf_counter()
    for pos in range(8, 8 + n):
        out.append(tok)
        tok = int(np.argmax(step(tok, pos, cache)))
    return time.perf_counter() - t0, out


def old_step(tok, pos, cache):
    return before.decode_step([tok], pos, cache)[0]


@torch.inference_mode()
def decode_hf(n):
    cache = transformers.DynamicCache(config=hf.config)
    logits = hf(prompt_t[:, :8], past_key_values=cache, use_cache=True).logits[0, -1]
    tok, out = int(torch.argmax(logits)), []
    t0 = time.perf_counter()
    for pos in range(8, 8 + n):
        out.append(tok)
        res = hf(torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                 cache_position=torch.tensor([pos]))
        tok = int(torch.argmax(res.logits[0, -1]))
    return time.perf_counter() - t0, out


with torch.inference_mode():
    ref_logits = hf(prompt_t).logits[0].numpy()
err = float(np.abs(ours.forward(prompt) - ref_logits).max())
n = args.decode_tokens
llamacpp = None
if not args.no_llamacpp:
    try:
        import llama_cpp  # noqa: F401
        import tempfile
        from llamacpp_check import llamacpp_speed
        llamacpp_dir = tempfile.TemporaryDirectory()
        gguf = gguf_io.save_gguf(Path(llamacpp_dir.name) / "bench-f32.gguf", cfg, weights,
                                 gguf_io.GGUFVocab(synthetic.vocabulary_for(cfg.vocab_size)), "f32")
        llamacpp = {nt: llamacpp_speed(gguf, [int(t) for t in prompt], n, nt) for nt in threads}
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp column (pip install llama-cpp-python==0.3.36)",
              file=sys.stderr)
rows, same, agree_lc = [], True, []
for nt in threads:
    with threadpool_limits(nt):
        torch.set_num_threads(nt)
        t_ours_pf = median_time(lambda: ours.forward(prompt, last_only=True), args.repeats)          # --- prefill
        t_old_pf = before and median_time(lambda: before.forward(prompt, last_only=True), args.repeats)
        with torch.inference_mode():
            t_hf_pf = median_time(lambda: hf(prompt_t, logits_to_keep=1), args.repeats)
        decode_ours(8), decode_hf(8)                                                                  # --- decode
        t_ours_dec, ids_ours = decode_ours(n)
        t_hf_dec, ids_hf = decode_hf(n)
        same = same and ids_ours == ids_hf
        t_old_dec = None
        if before:
            decode_ours(8, old_step)
            t_old_dec, ids_old = decode_ours(n, old_step)
            same = same and ids_old == ids_ours
    lc = llamacpp[nt] if llamacpp else None
    if lc is not None:                       # tokens until the first disagreement (random weights: near-ties happen)
        agree_lc.append(next((i for i, (a, b) in enumerate(zip(lc["ids"], ids_ours)) if a != b), n))
    P = args.prompt_len
    rows.append((f"prefill ({P}-token prompt), {nt} thread{'s' * (nt > 1)}, tok/s", P / t_ours_pf, P / t_hf_pf,
                 lc and P / lc["prefill_s"], t_old_pf and P / t_old_pf))
    rows.append((f"decode with KV cache ({n} tokens), {nt} thread{'s' * (nt > 1)}, tok/s",
                 n / t_ours_dec, n / t_hf_dec, lc and n / lc["decode_s"], t_old_dec and n / t_old_dec))

shape = ("stories15M-shaped (dim 288, 6 layers, vocab 32000)" if args.shape == "stories15M"
         else f"tinyworld-shaped (dim {cfg.dim}, {cfg.n_layers} layers, GQA {cfg.n_heads}/{cfg.n_kv_heads}, vocab {cfg.vocab_size})")
lc_note = ""
if agree_lc and min(agree_lc) == n:
    lc_note = f" llama.cpp decoded the same {n} tokens at every thread count."
elif agree_lc:
    lc_note = (f" llama.cpp's greedy ids equal ours for the first {', '.join(map(str, agree_lc))} of {n} tokens at "
               f"{args.threads} threads (its F32 path sums in another order; random weights have near-ties).")
notes = (f"max abs logit difference to transformers {err:.1e}; ours{' (now and before)' if before else ''} and "
         f"transformers decoded the same {n} tokens: {same}.{lc_note} numpy {np.__version__}, torch "
         f"{torch.__version__}, transformers {transformers.__version__}.")
print(json.dumps({"shape": shape, "rows": rows, "notes": notes, "machine": machine_line(args.threads)}))
