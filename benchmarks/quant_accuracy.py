"""What each quantization scheme costs: bits per weight, file size, KL divergence from float32, top-1 agreement,
validation perplexity. One table (markdown) and one plot (bits per weight vs KL), on the embedded model.

    python benchmarks/quant_accuracy.py [--model data/models/tinyworld] [--docs 64] [--seq-len 256] [--out DIR]

Validation text: the first --docs documents of the corpus' val split (llama_ref.corpus), encoded with the model's
tokenizer. File sizes are measured by writing each file: GGUF for f32/f16/q8_0/q4_0 (with the tokenizer), our
quantized directory format (model.safetensors) for w4a16 and int8. Q8_0 is held to top-1 agreement >= 99% and
perplexity within 1% of float32 (llama.cpp measures no loss for it); the 4-bit schemes are reported as they are.
Top-1 agreement is a rate over the predicted tokens: it is printed with its binomial standard error.
Writes DIR/quant_accuracy.md, .json and .png (default DIR: benchmarks/results).
"""
import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path


from llama_ref import paths, quant as Q, evaluate as E, gguf_io as G
from llama_ref.evaluate import rate
from llama_ref.loader import read_checkpoint
from llama_ref.model import Llama
from llama_ref.output import atomic_file, write_text


def file_size(model, scheme, tokenizer, tmp: Path) -> int:
    """Bytes on disk of the model saved in the natural format for `scheme`."""
    if scheme in ("f32", "f16", "q8_0", "q4_0"):
        p = G.save_gguf(tmp / f"{scheme}.gguf", model.config, model.weights, tokenizer, scheme, force=True)
        return p.stat().st_size
    d = Q.save_quantized(tmp / scheme, Q.quantize_model(model, scheme), scheme, force=True)
    return sum(f.stat().st_size for f in d.iterdir())


def markdown(rows, title, n) -> str:
    lines = [title, "",
             "| scheme | bits/weight (all) | bits/weight (blocks) | file size | KL(f32 ‖ q) nats | top-1 agreement | "
             "val perplexity | Δ perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['bpw']:.2f} | {r['bpw_layers']:.2f} | {r['file_bytes'] / 2**20:.2f} MiB | "
                     f"{r['kl']:.2e} | {top1(r, n)} | {r['ppl']:.3f} | {100 * r['ppl_change']:+.2f}% |")
    return "\n".join(lines)


def top1(row, n) -> str:
    """Top-1 agreement over n predicted tokens with its binomial standard error, in points."""
    r = rate(round(row["top1"] * n), n)
    return f"{100 * r.value:.2f}% ± {100 * r.se:.2f}"


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r, marker in zip(rows[1:], "osD^v<>p"):
        ax.scatter(r["bpw"], r["kl"], s=45, marker=marker, label=r["scheme"], alpha=0.8)
    ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all weights held)")
    ax.set_ylabel("KL(float32 ‖ quantized), nats / token")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(paths.DEFAULT_MODEL))
    ap.add_argument("--tokenizer", default=None, help="default: tokenizer.model beside the model, else the project's")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--readme", action="store_true", help="write the table into README.md between the BENCH-QUANT markers")
    args = ap.parse_args(argv)

    model_path = Path(args.model)
    if not model_path.exists():
        sys.exit(f"{model_path} does not exist (the embedded model is trained by llama_ref.trainer); pass --model")
    config, weights = read_checkpoint(model_path)
    model = Llama(config, weights)
    tok = Path(args.tokenizer) if args.tokenizer else (model_path / "tokenizer.model" if (model_path / "tokenizer.model").exists()
                                                        else paths.DEFAULT_TOKENIZER)
    seq_len = min(args.seq_len, config.max_seq_len)
    tokens, lengths = E.validation_batches(tok, args.docs, seq_len)
    t0 = time.perf_counter()
    rows = E.accuracy_study(model, tokens, lengths)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in rows:
            r["file_bytes"] = file_size(model, r["scheme"], tok, Path(tmp))
    n_pos = int((lengths - 1).sum())
    title = (f"Quantization accuracy on {model_path.name} ({config.n_params() / 1e6:.2f}M parameters), "
             f"{args.docs} validation documents, n = {n_pos} predicted tokens")
    table = markdown(rows, "### " + title, n_pos)
    print(table)
    q8 = next(r for r in rows if r["scheme"] == "q8_0")
    held = (f"\nQ8_0 against float32: top-1 agreement {top1(q8, n_pos)} of n = {n_pos} tokens (held to >= 99%: "
            f"{'met' if q8['top1'] >= 0.99 else 'NOT met'}), perplexity change {100 * q8['ppl_change']:+.2f}% "
            f"(held to within 1%: {'met' if abs(q8['ppl_change']) <= 0.01 else 'NOT met'})")
    print(held)
    print(f"(study took {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    out = Path(args.out)                            # results are rewritten each run: the output policy, force
    write_text(out / "quant_accuracy.md", table + "\n" + held + "\n", force=True)
    write_text(out / "quant_accuracy.json", json.dumps({"model": str(model_path), "config": config.as_dict(),
                                                        "docs": args.docs, "seq_len": seq_len, "positions": n_pos,
                                                        "rows": rows}, indent=1) + "\n", force=True)
    plot(rows, out / "quant_accuracy.png", title)
    if args.readme:
        from _bench import write_readme_block
        write_readme_block("BENCH-QUANT", table + "\n" + held, anchor="## Developing", after=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
