"""Llama 2 7B at full size: load time, peak memory, a 32-token prefill and decode speed, ours next to llama.cpp's and
transformers', on seeded random-weight checkpoints of the real shapes (no download: llama_ref.synthetic writes them).

    python benchmarks/big_model.py [--dir /tmp/llama7b] [--readme] [--keep] [--skip-cli] [--skip-peers]

Three files of Llama-2-7B's shapes (6.74 B parameters, 32 layers, vocabulary 32000):
    hf-f16/          an HF directory in float16, two safetensors shards (as meta-llama/Llama-2-7b-chat-hf)  13.5 GB
    q8_0.gguf        GGUF Q8_0                                                                                7.2 GB
    q4_k_m.gguf      GGUF in llama.cpp's Q4_K_M mix (Q4_K, Q6_K for output.weight and some attn_v/ffn_down)    4.1 GB
Each measurement runs in a fresh child process, so its peak RSS (ru_maxrss: the file pages it touched plus what it
allocated) is its own:
    ours        llama_ref.load(pack="never": weights as stored, memory-mapped), a 32-token prefill (what `inspect` does), then
                decoding 4 tokens with the KV cache: seconds per token (median). "floor": the time a decode step
                spends expanding weights to float32 (every weight once, tile by tile; timed inside the real steps,
                median): what any NumPy engine that never holds float32 weights pays per token; the rest of a step
                is the matmuls and everything else. Goals: decode <= 2x floor, prefill of 32 tokens <= 3x floor,
                peak RSS <= file size + 2 GiB. The three files (25 GB) do not fit in the page cache of a 24 GiB
                machine together: each is read from disk when its turn comes (the load's NaN scan).
    cli         `python -m llama_ref generate`, `inspect` and `chat` on the file, each in its own process: exit code,
                peak RSS and the path the loader stated.
    llama.cpp   llama-cpp-python on both GGUFs (if installed): the same prefill and decode; its last-position logits
                against ours (it rounds activations to 8 bits: agreement is to that rounding).
    transformers  LlamaForCausalLM in bfloat16 on the HF directory (if torch is installed and it fits).
Needs ~25 GB of disk (deleted at the end unless --keep) and takes ~30-40 minutes on 2 cores. Not part of `make test`.
"""
import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_line, pin_threads, write_readme_block  # noqa: E402

PROMPT_LEN, DECODE = 32, 4
GIB = 2 ** 30


def logits_file(path, engine) -> Path:
    """Where a child leaves its last-position logits for the comparison: beside a file, inside a directory."""
    path = Path(path)
    return path.with_suffix(f".{engine}.npy") if path.is_file() else path / f"{engine}.npy"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024           # Linux reports KiB


def prompt_ids(vocab):
    import numpy as np
    return [1] + [int(t) for t in np.random.default_rng(0).integers(3, min(vocab, 1024), PROMPT_LEN - 1)]


# ------------------------------------------------------------------------------------------------
# children (each prints one JSON line)

@contextlib.contextmanager
def timed_expansions(spent):
    """Add to spent[0] the seconds every stored matrix spends expanding tiles to float32 (its _dequantize_rows)."""
    from llama_ref import gguf_io, matrices, quant
    classes = {c for mod in (matrices, quant, gguf_io) for c in vars(mod).values()
               if isinstance(c, type) and issubclass(c, matrices.StoredMatrix) and "_dequantize_rows" in vars(c)
               and c is not matrices.RowPermuted}                              # RowPermuted calls its inner matrix's
    originals = {c: c._dequantize_rows for c in classes}

    def timing(original):
        def wrapper(self, rows):
            t0 = time.perf_counter()
            out = original(self, rows)
            spent[0] += time.perf_counter() - t0
            return out
        return wrapper
    for c, f in originals.items():
        c._dequantize_rows = timing(f)
    try:
        yield
    finally:
        for c, f in originals.items():
            c._dequantize_rows = f


def child_ours(path):
    import numpy as np
    from llama_ref import loader
    t0 = time.perf_counter()
    model = loader.load(path, pack="never", n_tokens=PROMPT_LEN + DECODE)   # the path a 7B takes here anyway
    t_load = time.perf_counter() - t0
    rss_load = peak_rss()
    ids = prompt_ids(model.config.vocab_size)
    t0 = time.perf_counter()
    model.forward(ids)                                                         # the inspect use case: one prefill
    t_inspect = time.perf_counter() - t0
    cache = model.new_cache()
    logits = model.forward(ids, cache=cache, last_only=True)
    tok, steps, expand = int(np.argmax(logits)), [], []
    for i in range(DECODE):
        spent = [0.0]
        with timed_expansions(spent):                                          # the floor, inside a real step
            t0 = time.perf_counter()
            logits = model.forward([tok], start_pos=PROMPT_LEN + i, cache=cache, last_only=True)
            steps.append(time.perf_counter() - t0)
        expand.append(spent[0])
        tok = int(np.argmax(logits))
    t_floor = float(np.median(expand))
    first = model.forward(ids, last_only=True)                                 # for the peers' logits
    np.save(logits_file(path, "ours"), first)
    print(json.dumps({"load_s": t_load, "inspect_s": t_inspect, "decode_s": float(np.median(steps)),
                      "floor_s": t_floor, "rss": peak_rss(), "rss_after_load": rss_load, "path": model.memory.path,
                      "estimate": model.memory.anonymous_bytes, "kinds": model.memory.kinds}))


def child_cli(path, command):
    import io
    from contextlib import redirect_stdout
    from llama_ref.__main__ import main
    ids = ",".join(map(str, prompt_ids(32000)[:8]))
    argv = {"generate": ["generate", "--model", path, "--prompt-ids", ids, "--max-new-tokens", "2", "--temperature",
                         "0", "--json"],
            "inspect": ["inspect", "--model", path, "--prompt", "Mia has a cat.", "--tap", "logits", "--json"],
            "chat": ["chat", "--model", path, "--max-new-tokens", "2", "--temperature", "0", "--json"]}[command]
    if command == "chat":
        sys.stdin = io.StringIO('[{"role": "user", "content": "What pet does Mia have?"}]')
    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        code = main(argv)
    out = json.loads(buf.getvalue()) if code == 0 else {}
    path_taken = out.get("memory", {}).get("path")
    print(json.dumps({"code": code, "seconds": time.perf_counter() - t0, "rss": peak_rss(), "path": path_taken}))


def child_llamacpp(path):
    import numpy as np
    from llama_cpp import Llama as LlamaCpp
    t0 = time.perf_counter()
    llm = LlamaCpp(model_path=path, n_ctx=256, n_batch=64, n_threads=os.cpu_count(), logits_all=True, verbose=False)
    t_load = time.perf_counter() - t0
    ids = prompt_ids(32000)
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prefill = time.perf_counter() - t0
    last = np.array(llm.scores[len(ids) - 1], np.float32)
    tok, steps = int(np.argmax(last)), []
    for _ in range(DECODE):
        t0 = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t0)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    np.save(logits_file(path, "llamacpp"), last)
    print(json.dumps({"load_s": t_load, "inspect_s": t_prefill, "decode_s": float(np.median(steps)), "rss": peak_rss()}))


def child_transformers(path):
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM
    torch.set_num_threads(os.cpu_count())
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
    t_load = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(32000)])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t_prefill = time.perf_counter() - t0
        past, tok, steps = out.past_key_values, out.logits[0, -1].argmax().view(1, 1), []
        last = out.logits[0, -1].float().numpy()
        for _ in range(DECODE):
            t0 = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - t0)
            past, tok = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
    np.save(logits_file(path, "transformers"), last)
    print(json.dumps({"load_s": t_load, "inspect_s": t_prefill, "decode_s": float(np.median(steps)), "rss": peak_rss()}))


def run_child(*args, stdin=None):
    """Run this script as `--child ...` in a fresh process; its JSON line, or {"error": ...}."""
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llama_ref-7b", help="where to write the 7B-shaped files (~25 GB)")
    ap.add_argument("--formats", default="hf-f16,q8_0.gguf,q4_k_m.gguf")
    ap.add_argument("--preset", default="llama2-7b", help="shapes from llama_ref.config.PRESETS (default: %(default)s)")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--keep", action="store_true", help="keep the files (they are deleted by default)")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-peers", action="store_true")
    args = ap.parse_args()
    pin_threads(os.cpu_count())
    import numpy as np
    from tqdm import tqdm
    from llama_ref import synthetic
    from llama_ref.config import PRESETS
    from llama_ref.weights import weight_shapes
    cfg = PRESETS[args.preset]
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    names = args.formats.split(",")
    for name in names:                                                         # synthesize what is missing
        path = d / name
        if path.exists():
            continue
        with tqdm(total=len(weight_shapes(cfg)), desc=f"writing {name}", unit="tensor") as bar:
            if name == "hf-f16":
                synthetic.write_hf(path, cfg, "float16", max_shard_bytes=10 * 10 ** 9, progress=lambda _: bar.update())
            else:
                synthetic.write_gguf(path, cfg, name.removesuffix(".gguf"), progress=lambda _: bar.update())

    rows, notes = [], []
    for name in names:
        path = d / name
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
        print(f"\n{name}: {size / GIB:.2f} GiB", flush=True)
        ours = run_child("ours", path)
        print("  ours", ours, flush=True)
        rows.append((name, "llama_ref", size, ours))
        if not args.skip_cli:
            for command in ("generate", "inspect", "chat"):
                r = run_child("cli", path, command)
                print(f"  cli {command}", r, flush=True)
                notes.append(f"`{command}` on {name}: exit {r.get('code', '?')}, peak RSS {r.get('rss', 0) / GIB:.2f} "
                             f"GiB ({'<=' if r.get('rss', 1e99) <= size + 2 * GIB else '>'} file + 2 GiB), "
                             f"{r.get('seconds', 0):.0f} s, path: {r.get('path')}")
        if args.skip_peers:
            continue
        # the peer on the same file: (child, module it needs, label, what the logits comparison is against)
        child, module, label, vs = (("llamacpp", "llama_cpp", "llama.cpp", "llama.cpp rounds activations to 8 bits, "
                                     "and its KV cache to f16") if path.suffix == ".gguf" else
                                    ("transformers", "torch", "transformers bf16", "we run the float16 weights, it "
                                     "rounds them to bfloat16"))
        try:
            __import__(module)
            peer = run_child(child, path)
        except ImportError:
            peer = {"error": f"{module} not installed (llama-cpp-python; torch: make reference-env)"}
        print(f"  {label}", peer, flush=True)
        rows.append((name, label, size, peer))
        theirs, mine = logits_file(path, child), logits_file(path, "ours")
        if theirs.exists() and mine.exists():
            a, b = np.load(mine), np.load(theirs)
            notes.append(f"{name}: last-position logits, max |ours - {label}| / max |{label}| = "
                         f"{np.abs(a - b).max() / np.abs(b).max():.1e}, same top-1: {int(a.argmax()) == int(b.argmax())}"
                         f" ({vs})")

    line = machine_line(os.cpu_count())
    out = [f"{args.preset}-shaped random weights, {PROMPT_LEN}-token prefill, decode of {DECODE} tokens (median); "
           f"one run. Machine: {line}", "",
           "| file | engine | load s | prefill 32 s | decode s/token | floor s | decode / floor | prefill / floor "
           "| peak RSS GiB | RSS - file GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    floors = {name: r.get("floor_s") for name, eng, _, r in rows if eng == "llama_ref"}
    for name, engine, size, r in rows:
        if "error" in r:
            out.append(f"| {name} | {engine} | {r['error']} |||||||||")
            continue
        fl = floors.get(name)
        ratio = (lambda x: f"{x / fl:.2f}") if fl else (lambda x: "")
        out.append(f"| {name} | {engine} | {r['load_s']:.1f} | {r['inspect_s']:.1f} | {r['decode_s']:.2f} | "
                   f"{r.get('floor_s', float('nan')):.2f} | {ratio(r['decode_s'])} | {ratio(r['inspect_s'])} | "
                   f"{r['rss'] / GIB:.2f} | {(r['rss'] - size) / GIB:+.2f} |")
    text = "\n".join(out + [""] + [f"- {n}" for n in notes])
    print("\n" + text)
    if args.readme:
        write_readme_block("BENCH-BIG", text, anchor="<!-- /BENCH-QUANT -->")
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        pin_threads(os.cpu_count())
        kind, rest = sys.argv[2], sys.argv[3:]
        {"ours": child_ours, "cli": child_cli, "llamacpp": child_llamacpp, "transformers": child_transformers}[kind](*rest)
    else:
        main()
