"""Our NumPy forward vs transformers' LlamaForCausalLM: same weights, same thread count, one process.

Prefill: one forward over a 256-token prompt (all logits, as both libraries compute them by default).
Decode: greedy generation of new tokens one at a time with a KV cache, after a short prompt; prompt tokens are
never counted as generated tokens. Both sides decode the same tokens (checked), so they do the same work.

    python benchmarks/forward.py [--threads 1,2] [--prompt-len 256] [--decode-tokens 128] [--repeats 5]

Each thread count is measured in the same process (threadpoolctl limits OpenBLAS, torch.set_num_threads limits
PyTorch), so the rows of one table share the machine and its load. Prints a markdown table with the machine line
(CPU, SIMD level, BLAS and its kernel family); `--readme` also writes it into README.md between the BENCH-FORWARD
markers. Ratios move much less than tokens/s between runs on a shared machine; compare ratios.
Needs the [reference] extra (torch==2.13.0, transformers).
"""
import argparse

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured (default: 1,2)")
ap.add_argument("--prompt-len", type=int, default=256)
ap.add_argument("--decode-tokens", type=int, default=128)
ap.add_argument("--repeats", type=int, default=5, help="prefill repeats (median is reported)")
ap.add_argument("--readme", action="store_true", help="write the table into README.md")
args = ap.parse_args()
from _bench import import_reference, machine_line, median_time, pin_threads, write_readme_block  # noqa: E402
threads = [int(t) for t in args.threads.split(",")]
pin_threads(max(threads))                                                  # before numpy/torch load BLAS

import time  # noqa: E402

import numpy as np  # noqa: E402

torch, transformers = import_reference("forward.py")

from llama_ref.config import PRESETS  # noqa: E402
from llama_ref.model import Llama  # noqa: E402

from threadpoolctl import threadpool_limits  # noqa: E402

cfg = PRESETS["stories15M"].replace(max_seq_len=max(512, args.prompt_len + args.decode_tokens + 8))

# one set of weights, made by transformers, shared by both
torch.manual_seed(0)
hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",)})
hf = transformers.LlamaForCausalLM(hf_cfg).eval()
weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
ours = Llama(cfg, weights)

rng = np.random.default_rng(0)
prompt = rng.integers(3, cfg.vocab_size, args.prompt_len)
prompt_t = torch.tensor(prompt[None])


def decode_ours(n):
    cache = ours.new_cache(1, cfg.max_seq_len)
    logits = ours.forward(prompt[:8], 0, cache, last_only=True)
    tok, out = int(np.argmax(logits)), []
    t0 = time.perf_counter()
    for pos in range(8, 8 + n):
        out.append(tok)
        tok = int(np.argmax(ours.forward([tok], pos, cache, last_only=True)))
    return time.perf_counter() - t0, out


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
rows, same = [], True
for nt in threads:
    with threadpool_limits(nt):
        torch.set_num_threads(nt)
        t_ours_pf = median_time(lambda: ours.forward(prompt), args.repeats)                 # --- prefill
        with torch.inference_mode():
            t_hf_pf = median_time(lambda: hf(prompt_t), args.repeats)
        decode_ours(8), decode_hf(8)                                                          # --- decode (warm-up)
        t_ours_dec, ids_ours = decode_ours(n)
        t_hf_dec, ids_hf = decode_hf(n)
        same = same and ids_ours == ids_hf
    rows.append((f"prefill ({args.prompt_len}-token prompt), {nt} thread{'s' * (nt > 1)}, tok/s",
                 args.prompt_len / t_ours_pf, args.prompt_len / t_hf_pf))
    rows.append((f"decode with KV cache ({n} tokens), {nt} thread{'s' * (nt > 1)}, tok/s",
                 n / t_ours_dec, n / t_hf_dec))

table = ["| stories15M-shaped (dim 288, 6 layers, vocab 32000), float32 | llama_ref (NumPy) | transformers (PyTorch) "
         "| ratio |",
         "|---|---:|---:|---:|"]
for name, a, b in rows:
    table.append(f"| {name} | {a:,.0f} | {b:,.0f} | **{a / b:.2f}x** |")
notes = (f"\nmax abs logit difference {err:.1e}; greedy decode produced the same {n} tokens: {same}. "
         f"numpy {np.__version__}, torch {torch.__version__}, transformers {transformers.__version__}.\n"
         f"Machine: {machine_line(args.threads)}.")
text = "\n".join(table) + "\n" + notes
print(text)

if args.readme:
    write_readme_block("BENCH-FORWARD", text)
