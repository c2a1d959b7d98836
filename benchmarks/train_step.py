"""One training step, ours (llama_ref/backprop.py, NumPy) vs PyTorch eager (transformers' LlamaForCausalLM), one process.

Same config (the embedded model's shape: dim 256, 6 layers, 8/4 heads, hidden 768, vocab 1024), same weights, same
batch of tokens, same thread count. A step is forward + backward + gradient clipping + AdamW; both sides compute the
same loss (checked). transformers is run with its eager attention and with PyTorch's fused SDPA attention.
Ours is what the trainer runs, backprop.forward_backward_parallel: the batch's rows split across as many threads as the
thread count, each with one BLAS thread (PyTorch gets the same count for its own threads); the single call stream,
backprop.forward_backward with that many BLAS threads, is timed beside it.

    python benchmarks/train_step.py [--threads 1,2] [--coretypes Haswell,SkylakeX] [--batch 8] [--seq-len 512]
                                    [--steps 5] [--readme]

Each OpenBLAS kernel family runs in a child process of its own (OPENBLAS_CORETYPE is read when NumPy loads), PyTorch
beside it in the same process: Haswell (AVX2) and SkylakeX (AVX-512), with Sandybridge in SkylakeX's place on a CPU
without AVX-512 (said under the table). Prints a markdown table of tokens/s and ratios; `--readme` writes it into
README.md between the BENCH-TRAIN markers. Needs the [reference] extra (torch==2.13.0, transformers).
"""
import argparse
import json
import sys

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each measured (default: 1,2)")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq-len", type=int, default=512)
ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median is reported)")
ap.add_argument("--coretypes", default="Haswell,SkylakeX",
                help="OpenBLAS kernel families, each in its own process (default: Haswell,SkylakeX)")
ap.add_argument("--readme", action="store_true", help="write the table into README.md")
ap.add_argument("--child", help=argparse.SUPPRESS)                 # internal: measure one kernel family, print JSON
args = ap.parse_args()
from _bench import (import_reference, kernel_label, machine_line, median_time, per_kernel_family,  # noqa: E402
                    pin_thread_counts, substitution_note, write_readme_block)
threads = pin_thread_counts(args.threads)                                  # before numpy/torch load BLAS

if args.child is None:                                                     # the parent: one child per kernel family
    results = per_kernel_family(__file__, sys.argv[1:], args.coretypes)
    table = [f"| training step (forward + backward + AdamW), embedded-model shape (5.2M params), batch {args.batch} x "
             f"{args.seq_len}, float32 | kernels | tokens/s | llama_ref / this |", "|---|---|---:|---:|"]
    notes = []
    for r in results:
        table += [f"| {name} | {kernel_label(r)} | {tok_s:,.0f} | {ratio} |" for name, tok_s, ratio in r["rows"]]
        notes.append(f"{kernel_label(r)}: {r['notes']} Machine: {r['machine']}.")
    text = "\n".join(table) + "\n\n" + "\n".join(notes + [substitution_note(results)]).strip()
    print(text)
    if args.readme:
        write_readme_block("BENCH-TRAIN", text, anchor="<!-- /BENCH-FORWARD -->")
    sys.exit(0)


import numpy as np  # noqa: E402

torch, transformers = import_reference("train_step.py")

from llama_ref import backprop  # noqa: E402
from llama_ref.config import LlamaConfig  # noqa: E402
from llama_ref.model import rope_freqs  # noqa: E402

from threadpoolctl import threadpool_limits  # noqa: E402

cfg = LlamaConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, hidden_dim=768, vocab_size=1024,
                  max_seq_len=max(512, args.seq_len))
B, T = args.batch, args.seq_len
rng = np.random.default_rng(0)
tokens = rng.integers(3, cfg.vocab_size, (B, T + 1))
x, y = tokens[:, :-1], tokens[:, 1:]
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_hf(attn):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    hf_cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(hf_cfg).train()


# --- ours -------------------------------------------------------------------------------------------
hf0 = make_hf("eager")
params = {k: v.detach().numpy().copy() for k, v in hf0.state_dict().items()}
opt = backprop.AdamW(params, betas=ADAMW["betas"], eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
rope = rope_freqs(cfg.head_dim, T, cfg.rope_theta)
losses = {}


def stepper_ours(workers):
    def step():
        if workers == 0:                                                   # the single call stream
            loss, grads = backprop.forward_backward(cfg, params, x, y, rope=rope)
        else:
            loss, grads = backprop.forward_backward_parallel(cfg, params, x, y, rope=rope, workers=workers)
        backprop.clip_grad_norm(grads, 1.0)
        opt.step(params, grads, ADAMW["lr"])
    return step


# --- PyTorch eager ----------------------------------------------------------------------------------
def torch_stepper(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])
    xt, yt = torch.tensor(x), torch.tensor(y)

    def step():
        o.zero_grad(set_to_none=True)
        logits = model(xt).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        o.step()
        losses.setdefault(model.config._attn_implementation, loss.item())
    return step


hf_sdpa = make_hf("sdpa")
losses["ours"] = backprop.forward_backward(cfg, params, x, y, rope=rope)[0]                  # at the starting weights,
losses["ours, 2 threads"] = backprop.forward_backward_parallel(cfg, params, x, y, rope=rope)[0]   # as torch's first steps
ntok = B * T
rows = []
for nt in threads:
    with threadpool_limits(nt):
        torch.set_num_threads(nt)
        t_ours = median_time(stepper_ours(nt), args.steps)
        t_serial = median_time(stepper_ours(0), args.steps) if nt > 1 else t_ours
        t_eager = median_time(torch_stepper(hf0), args.steps)
        t_sdpa = median_time(torch_stepper(hf_sdpa), args.steps)
    th = f"{nt} thread{'s' * (nt > 1)}"
    rows.append((f"llama_ref (NumPy, `backprop.forward_backward_parallel`, {nt} x 1 BLAS thread), {th}",
                 ntok / t_ours, "1.00x"))
    if nt > 1:
        rows.append((f"llama_ref, one call stream (`backprop.forward_backward`, {nt} BLAS threads), {th}",
                     ntok / t_serial, f"**{t_serial / t_ours:.2f}x**"))
    rows += [(f"PyTorch eager, transformers eager attention, {th}", ntok / t_eager, f"**{t_eager / t_ours:.2f}x**"),
             (f"PyTorch eager, transformers SDPA attention, {th}", ntok / t_sdpa, f"**{t_sdpa / t_ours:.2f}x**")]
same_loss = all(abs(v - losses["ours"]) < 1e-4 for v in losses.values())
notes = ("first-step loss: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()) +
         f" (agree to 1e-4: {same_loss}). numpy {np.__version__}, torch {torch.__version__}, "
         f"transformers {transformers.__version__}.")
print(json.dumps({"rows": rows, "notes": notes, "machine": machine_line(args.threads)}))
