"""Llama 2 7B at full size, ours next to llama.cpp's and transformers': load, time to first token, a 32-token prefill,
decode speed and peak memory, on seeded random-weight checkpoints of the real shapes (nothing is downloaded:
llama_ref.synthetic writes them, and they are deleted at the end), and the rates that explain the numbers.

    python benchmarks/big_model.py [--dir /tmp/llama_ref-7b] [--formats hf-f16,q8_0.gguf,q4_k_m.gguf] [--decode 8]
                                   [--cli generate,inspect,chat] [--readme] [--keep] [--skip-peers] [--skip-rates]

Run it alone on the machine (`/work/bin/bench` here): transformers in bfloat16 peaks near 23 GiB on a 24 GiB machine,
and two NumPy processes on 2 cores stall each other. Three files of Llama-2-7B's shapes (6.74 B parameters):
    hf-f16/          an HF directory in float16, two safetensors shards (as meta-llama/Llama-2-7b-chat-hf)  13.5 GB
    q8_0.gguf        GGUF Q8_0                                                                                7.2 GB
    q4_k_m.gguf      GGUF in llama.cpp's Q4_K_M mix (Q4_K, Q6_K for output.weight and some attn_v/ffn_down)    4.1 GB
Each engine runs in its own fresh process, one at a time, on the same file, with the same thread count, after the file
was read once into the page cache (both engines start warm; a cold start adds the disk read to both):
    ours          llama_ref.load (the default memory plan: weights as stored, memory-mapped), then the prompt's 32
                  tokens in one forward (the prefill; load + prefill = time to first token), then --decode tokens
                  generated greedily with the KV cache (s/token: the median step)
    llama.cpp     llama-cpp-python on the GGUFs: the same prompt ids, prefill and greedy decode
    transformers  LlamaForCausalLM in bfloat16 on the HF directory (torch: `make reference-env`)
    cli           `python -m llama_ref generate`, `inspect` and `chat` on the file: exit code, peak RSS, the path taken
The "why" table measures this machine's parts in isolation: memory bandwidth, the in-cache float32 gemv, the float16
expansion, and each stored kind's matmul (a 11008 x 4096 matrix, 1 token and 32 tokens, 1 and 2 threads).
Every run writes its results to benchmarks/big_model.json (chapter 14 prints the ratios from it), with the machine
line: CPU model, SIMD level, numpy, the BLAS library with its version and kernel family (threadpoolctl), threads.
With --readme the tables also go into README.md. Files already in --dir are reused (delete them to write new ones).
Needs ~25 GB of disk and ~20-30 minutes on 2 cores. Not part of `make test`.
"""
import argparse
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

THREADS = 2
PROMPT = "[INST] Write a short story about a lighthouse keeper who finds a message in a bottle on the beach. [/INST]"
PROMPT_LEN = 32
DECODE = int(os.environ.get("BIG_MODEL_DECODE", "8"))      # tokens decoded per engine (--decode; children read it here)
GIB = 2 ** 30
RESULTS = Path(__file__).resolve().parent / "big_model.json"
SHAPE = (11008, 4096)                                       # the MLP matrices: two thirds of a 7B's weights


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM of its own memory map. (ru_maxrss would also count the parent's,
    which Linux carries over into a child through fork and exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024                                 # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024       # not Linux: the best there is


def logits_file(path, engine) -> Path:
    """Where a child leaves its last-position logits for the comparison: beside a file, inside a directory."""
    path = Path(path)
    return path.with_suffix(f".{engine}.npy") if path.is_file() else path / f"{engine}.npy"


def prompt_ids(path) -> list[int]:
    """The prompt as the model's own tokenizer encodes it, cut to PROMPT_LEN tokens: the same ids for every engine."""
    from llama_ref import loader
    tok = loader.find_tokenizer(path)
    ids = tok.encode(PROMPT, bos=True)
    assert len(ids) >= PROMPT_LEN, f"the prompt encodes to {len(ids)} tokens, fewer than {PROMPT_LEN}"
    return ids[:PROMPT_LEN]


def warm(path):
    """Read a checkpoint's files once so they are in the page cache (every engine then starts from the same state)."""
    path = Path(path)
    for f in ([path] if path.is_file() else sorted(path.glob("*.safetensors"))):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


# ------------------------------------------------------------------------------------------------
# children: each prints one JSON line

def child_ours(path, ids):
    import numpy as np
    from llama_ref import loader
    ids = [int(i) for i in ids.split(",")]
    t0 = time.perf_counter()
    model = loader.load(path, n_tokens=len(ids) + DECODE)
    t_load = time.perf_counter() - t0
    rss_load = peak_rss()
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(ids, cache=cache, last_only=True)
    t_prefill = time.perf_counter() - t0
    np.save(logits_file(path, "ours"), logits)
    generated, steps = [int(np.argmax(logits))], []
    for i in range(DECODE):
        t0 = time.perf_counter()
        logits = model.forward([generated[-1]], start_pos=len(ids) + i, cache=cache, last_only=True)
        steps.append(time.perf_counter() - t0)
        generated.append(int(np.argmax(logits)))
    print(json.dumps({"load_s": t_load, "prefill_s": t_prefill, "ttft_s": t_load + t_prefill,
                      "decode_s": float(np.median(steps)), "rss": peak_rss(), "rss_after_load": rss_load,
                      "path": model.memory.path, "estimate": model.memory.anonymous_bytes, "kinds": model.memory.kinds,
                      "generated": generated}))


def child_llamacpp(path, ids):
    import numpy as np
    from llama_cpp import Llama as LlamaCpp
    ids = [int(i) for i in ids.split(",")]
    t0 = time.perf_counter()
    llm = LlamaCpp(model_path=str(path), n_ctx=256, n_batch=64, n_threads=THREADS, n_threads_batch=THREADS,
                   verbose=False)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prefill = time.perf_counter() - t0

    def last_logits():          # without logits_all, llama-cpp-python 0.3 keeps no scores: read the context's own row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32)

    last = last_logits()
    np.save(logits_file(path, "llamacpp"), last)
    generated, steps = [int(np.argmax(last))], []
    for _ in range(DECODE):
        t0 = time.perf_counter()
        llm.eval([generated[-1]])
        steps.append(time.perf_counter() - t0)
        generated.append(int(np.argmax(last_logits())))
    print(json.dumps({"load_s": t_load, "prefill_s": t_prefill, "ttft_s": t_load + t_prefill,
                      "decode_s": float(np.median(steps)), "rss": peak_rss(), "generated": generated}))


def child_transformers(path, ids):
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, low_cpu_mem_usage=True)
    t_load = time.perf_counter() - t0
    ids = torch.tensor([[int(i) for i in ids.split(",")]])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t_prefill = time.perf_counter() - t0
        past, last = out.past_key_values, out.logits[0, -1]
        np.save(logits_file(path, "transformers"), last.float().numpy())
        generated, steps = [int(last.argmax())], []
        for _ in range(DECODE):
            t0 = time.perf_counter()
            out = model(torch.tensor([[generated[-1]]]), past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - t0)
            past = out.past_key_values
            generated.append(int(out.logits[0, -1].argmax()))
    print(json.dumps({"load_s": t_load, "prefill_s": t_prefill, "ttft_s": t_load + t_prefill,
                      "decode_s": float(np.median(steps)), "rss": peak_rss(), "generated": generated}))


def child_cli(path, command):
    import io
    from contextlib import redirect_stdout
    from llama_ref.__main__ import main
    argv = {"generate": ["generate", "--model", path, "--prompt", "Mia has a cat.", "--max-new-tokens", "2",
                         "--temperature", "0", "--json"],
            "inspect": ["inspect", "--model", path, "--prompt", "Mia has a cat.", "--tap", "logits", "--json"],
            "chat": ["chat", "--model", path, "--max-new-tokens", "2", "--temperature", "0", "--json"]}[command]
    if command == "chat":
        sys.stdin = io.StringIO('[{"role": "user", "content": "What pet does Mia have?"}]')
    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        code = main(argv)
    out = json.loads(buf.getvalue()) if code == 0 else {}
    print(json.dumps({"code": code, "seconds": time.perf_counter() - t0, "rss": peak_rss(),
                      "path": out.get("memory", {}).get("path")}))


def child_rates():
    """This machine's parts, each alone: memory bandwidth, the in-cache gemv, the float16 expansion, every kind's matmul
    (G weights/s: a 7B decode step multiplies 6.5 G weights)."""
    import numpy as np
    from threadpoolctl import threadpool_limits
    from gguf import GGMLQuantizationType as GT
    from llama_ref import matrices, quant, synthetic
    from llama_ref.gguf_io import GGUFMatrix
    F32 = np.float32

    def best(fn, reps=7):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    rates = {}
    big = np.ones((1 << 28) // 4096, F32).repeat(4096).reshape(-1, 4096)   # 1 GiB: far beyond every cache
    x = np.ones(4096, F32)
    for n in (1, THREADS):
        with threadpool_limits(n, user_api="blas"):
            rates[f"memory read GB/s, {n} thread"] = big.nbytes / best(lambda: big @ x, 5) / 1e9
    del big
    tile = np.ones((256, 4096), F32)                                       # 4 MB: in the cache
    with threadpool_limits(1, user_api="blas"):
        rates["float32 gemv in cache, G multiply-adds/s, 1 thread"] = tile.size / best(lambda: tile @ x, 50) / 1e9
        h = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float16)
        out = np.empty(h.shape, F32)
        rates["float16 -> float32 expansion, G values/s, 1 thread"] = h.size / best(
            lambda: matrices.f16_to_f32(h, out, finite=True), 50) / 1e9
        rates["float16 astype (NumPy), G values/s, 1 thread"] = h.size / best(lambda: np.copyto(out, h), 20) / 1e9
    rng = np.random.default_rng(0)
    w = rng.standard_normal(SHAPE, dtype=F32) * F32(0.02)
    kinds = {"f16": matrices.Float16Matrix(w.astype(np.float16)),
             "bf16": matrices.BFloat16Matrix((w.view(np.uint32) >> 16).astype(np.uint16)),
             "q8_0": quant.Q8_0Matrix(synthetic.random_blocks("Q8_0", *SHAPE, rng), SHAPE),
             "q4_k": GGUFMatrix(synthetic.random_blocks("Q4_K", *SHAPE, rng), SHAPE, GT.Q4_K),
             "q6_k": GGUFMatrix(synthetic.random_blocks("Q6_K", *SHAPE, rng), SHAPE, GT.Q6_K)}
    for kind, m in kinds.items():
        for tokens in (1, PROMPT_LEN):
            xs = rng.standard_normal((tokens, SHAPE[1])).astype(F32)
            out = np.empty((tokens, SHAPE[0]), F32)
            for n in (1, THREADS):
                with threadpool_limits(n, user_api="blas"):
                    rates[f"{kind} matmul, {tokens} token{'s' if tokens > 1 else ''}, G weights/s, {n} thread"] = \
                        SHAPE[0] * SHAPE[1] / best(lambda: m.matmul(xs, out=out), 5) / 1e9
    print(json.dumps(rates))


def run_child(*args, coretype=None):
    """Run this script as `--child ...` in a fresh process (with OPENBLAS_CORETYPE=coretype if given: OpenBLAS picks its
    kernels when it loads); its JSON line, or {"error": ...}."""
    env = dict(os.environ, **({"OPENBLAS_CORETYPE": coretype} if coretype else {}))
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------

def synthesize(d: Path, names, preset):
    from tqdm import tqdm
    from llama_ref import synthetic
    from llama_ref.config import PRESETS
    from llama_ref.weights import weight_shapes
    cfg = PRESETS[preset]
    for name in names:
        path = d / name
        if path.exists():
            continue
        with tqdm(total=len(weight_shapes(cfg)), desc=f"writing {name}", unit="tensor") as bar:
            if name == "hf-f16":
                synthetic.write_hf(path, cfg, "float16", max_shard_bytes=10 * 10 ** 9, progress=lambda _: bar.update())
            else:
                synthetic.write_gguf(path, cfg, name.removesuffix(".gguf"), progress=lambda _: bar.update())


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def tables(results) -> str:
    """The README block: one row per engine and file, the ratios to the peer, the CLI and logits
    notes, and the "why" table of rates."""
    rows = ["| file | engine | load s | prefill 32 s | time to first token s | decode s/token | peak RSS GiB "
            "| RSS - file GiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    ratios = ["| file | ours | peer | decode ours/peer | prefill ours/peer | first token ours/peer | peak RSS - file "
              "(ours) |", "|---|---|---|---:|---:|---:|---:|"]
    for f in results["files"]:
        size = f["bytes"]
        for engine, r in f["engines"].items():
            if "error" in r:
                rows.append(f"| {f['name']} | {engine} | {r['error']} |||||||")
                continue
            rows.append(f"| {f['name']} | {engine} | {r['load_s']:.1f} | {r['prefill_s']:.1f} | {r['ttft_s']:.1f} | "
                        f"{r['decode_s']:.2f} | {r['rss'] / GIB:.2f} | {(r['rss'] - size) / GIB:+.2f} |")
        peer_name = f["peer"]
        peer = f["engines"].get(peer_name, {})
        for engine, ours in f["engines"].items():
            if not engine.startswith("llama_ref") or "error" in ours or "error" in peer or not peer:
                continue
            ratios.append(f"| {f['name']} | {engine} | {peer_name} | **{ours['decode_s'] / peer['decode_s']:.1f}x** "
                          f"| {ours['prefill_s'] / peer['prefill_s']:.1f}x | {ours['ttft_s'] / peer['ttft_s']:.1f}x | "
                          f"{(ours['rss'] - size) / GIB:+.2f} GiB |")
    why = ["| part of this machine, measured alone | rate |", "|---|---:|"]
    why += [f"| {k} | {v:.2f} |" for k, v in results.get("rates", {}).items()]
    notes = [f"- {n}" for n in results["notes"]]
    return "\n".join([f"{results['preset']}-shaped random weights, the prompt's {PROMPT_LEN} tokens in one prefill, "
                      f"then {DECODE} tokens decoded greedily (median step); every engine in its own process, warm "
                      f"page cache, one run. Machine: {results['machine']}. Rows marked with another kernel family ran "
                      "ours with OPENBLAS_CORETYPE set (Sandybridge stands in for SkylakeX, which needs AVX-512, on CPUs "
                      "without it; llama.cpp and torch bring their own kernels).", "", *rows, "", *ratios, "", *notes,
                      "", *why])


def main():
    global DECODE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/llama_ref-7b",
                    help="where the 7B-shaped files are written, or reused if present (~25 GB; default: %(default)s)")
    ap.add_argument("--formats", default="hf-f16,q8_0.gguf,q4_k_m.gguf",
                    help="which files, comma-separated: hf-f16 (peer: transformers bf16), q8_0.gguf, q4_k_m.gguf "
                    "(peer: llama.cpp), also q4_0.gguf, f16.gguf (default: %(default)s)")
    ap.add_argument("--preset", default="llama2-7b", help="shapes from llama_ref.config.PRESETS (default: %(default)s)")
    ap.add_argument("--decode", type=int, default=DECODE, metavar="N",
                    help="tokens each engine decodes after the prefill; s/token is their median (default: %(default)s)")
    ap.add_argument("--out", default=str(RESULTS), help="the results file (default: benchmarks/big_model.json)")
    ap.add_argument("--readme", action="store_true", help="also write the tables into README.md")
    ap.add_argument("--keep", action="store_true", help="keep the files (they are deleted at the end by default)")
    ap.add_argument("--cli", default="generate", metavar="COMMANDS",
                    help="`python -m llama_ref` commands run once on every file for their exit code and peak RSS, "
                    "comma-separated from generate,inspect,chat ('' for none; default: %(default)s)")
    ap.add_argument("--skip-cli", action="store_true", help="same as --cli ''")
    ap.add_argument("--skip-peers", action="store_true", help="run ours only (no llama.cpp, no transformers)")
    ap.add_argument("--skip-rates", action="store_true", help="skip the table of this machine's parts measured alone")
    ap.add_argument("--other-kernels", default="Sandybridge", metavar="CORETYPES",
                    help="also run ours with these OpenBLAS kernel families (OPENBLAS_CORETYPE), comma-separated; "
                    "Sandybridge stands in for SkylakeX on CPUs without AVX-512 (default: %(default)s; '' for none)")
    args = ap.parse_args()
    if args.decode < 1:
        ap.error("--decode must be at least 1")
    DECODE = args.decode
    os.environ["BIG_MODEL_DECODE"] = str(DECODE)                         # the children read it at import
    commands = [] if args.skip_cli else [c for c in args.cli.split(",") if c]
    if set(commands) - {"generate", "inspect", "chat"}:
        ap.error(f"--cli {args.cli!r}: choose from generate, inspect, chat")
    pin_threads(THREADS)
    started = time.perf_counter()
    import numpy as np
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    names = args.formats.split(",")
    synthesize(d, names, args.preset)
    results = {"preset": args.preset, "prompt": PROMPT, "prompt_len": PROMPT_LEN, "decode": DECODE, "files": [],
               "notes": []}
    if not args.skip_rates:
        results["rates"] = run_child("rates")
        for coretype in args.other_kernels.split(",") if args.other_kernels else []:
            results["rates"].update({f"{k} ({coretype} kernels)": v for k, v in run_child("rates", coretype=coretype).items()
                                     if "matmul, 1 token" in k or "gemv" in k})
        print("rates", results["rates"], flush=True)
    for name in names:
        path = d / name
        size = file_bytes(path)
        ids = ",".join(map(str, prompt_ids(path)))
        gguf = path.suffix == ".gguf"
        peer, module, child = (("llama.cpp", "llama_cpp", "llamacpp") if gguf else
                               ("transformers bf16", "transformers", "transformers"))
        f = {"name": name, "bytes": size, "peer": peer, "engines": {}}
        print(f"\n{name}: {size / GIB:.2f} GiB", flush=True)
        warm(path)
        f["engines"]["llama_ref"] = run_child("ours", path, ids)
        print("  llama_ref", f["engines"]["llama_ref"], flush=True)
        for coretype in args.other_kernels.split(",") if args.other_kernels else []:
            warm(path)
            f["engines"][f"llama_ref, {coretype} kernels"] = run_child("ours", path, ids, coretype=coretype)
            print(f"  llama_ref, {coretype} kernels", f["engines"][f"llama_ref, {coretype} kernels"], flush=True)
        if commands:
            for command in commands:
                r = run_child("cli", path, command)
                results["notes"].append(
                    f"`{command}` on {name}: exit {r.get('code', '?')}, peak RSS {r.get('rss', 0) / GIB:.2f} GiB "
                    f"({'<=' if r.get('rss', 1e99) <= size + 2 * GIB else '>'} file + 2 GiB), {r.get('seconds', 0):.0f} s"
                    f", path: {r.get('path')}")
        if not args.skip_peers:
            try:
                __import__(module)
                warm(path)
                f["engines"][peer] = run_child(child, path, ids)
            except ImportError:
                f["engines"][peer] = {"error": f"{module} not installed (llama-cpp-python; torch: make reference-env)"}
            print(f"  {peer}", f["engines"][peer], flush=True)
            theirs, mine = logits_file(path, child), logits_file(path, "ours")
            if theirs.exists() and mine.exists():
                a, b = np.load(mine), np.load(theirs)
                ours_gen = f["engines"]["llama_ref"].get("generated", [])
                peer_gen = f["engines"][peer].get("generated", [])
                vs = ("llama.cpp rounds activations to 8 bits, and its KV cache to f16" if gguf else
                      "we run the float16 weights, it rounds them to bfloat16")
                results["notes"].append(
                    f"{name}: last prompt position's logits, max |ours - {peer}| / max |{peer}| = "
                    f"{np.abs(a - b).max() / np.abs(b).max():.1e}, same top-1: {int(a.argmax()) == int(b.argmax())} "
                    f"({vs}); greedy ids the same for {_common_prefix(ours_gen, peer_gen)} of {len(ours_gen)} tokens")
                theirs.unlink()
                mine.unlink()
        results["files"].append(f)
    results["machine"] = f"{machine_line(THREADS)}; numpy {np.__version__}"
    results["machine_parts"] = machine_parts()
    results["minutes"] = round((time.perf_counter() - started) / 60, 1)
    text = tables(results)
    print("\n" + text)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.readme:
        write_readme_block("BENCH-BIG", text, anchor="<!-- /BENCH-QUANT -->")
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


def machine_parts() -> dict:
    """The machine line's parts, one key each, for readers of big_model.json (chapter 14)."""
    import numpy as np
    from threadpoolctl import threadpool_info
    from _bench import cpu_model, simd_level
    blas = [d for d in threadpool_info() if d["user_api"] == "blas"]
    return {"cpu": cpu_model(), "simd": simd_level(), "cores": os.cpu_count(), "threads": THREADS,
            "numpy": np.__version__, "blas": blas[0]["internal_api"] if blas else None,
            "blas_version": blas[0].get("version") if blas else None,
            "kernels": blas[0].get("architecture") if blas else None,
            "other_kernels": "rows named '<family> kernels' ran with OPENBLAS_CORETYPE=<family>"}


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        pin_threads(THREADS)
        kind, rest = sys.argv[2], sys.argv[3:]
        {"ours": child_ours, "cli": child_cli, "llamacpp": child_llamacpp, "transformers": child_transformers,
         "rates": child_rates}[kind](*rest)
    else:
        main()
