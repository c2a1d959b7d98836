"""Run the GGUF files we write in llama.cpp itself (via llama-cpp-python) and compare its logits with our forward.

    pip install llama-cpp-python==0.3.36        # builds llama.cpp from source (~20 min on 2 cores); not a dependency
    python benchmarks/llamacpp_check.py [--model data/models/tinyworld]

For each file type (F32, F16, Q8_0, Q4_0) the model is exported with gguf_io.save_gguf (tokenizer included), loaded by
llama.cpp with an F32 KV cache, and evaluated on the same tokens; printed: max |llama.cpp - ours| relative to the largest
logit, top-1 agreement and KL. F32 must agree to float32 rounding (that checks names, metadata, the Meta q/k layout and
the shapes). For F16/Q8_0/Q4_0, llama.cpp also rounds the *activations* (to f16, or to Q8_0 blocks for the integer dot
product), so the gap is of the size of the quantization error itself. Last, a random-weight model in llama.cpp's Q4_K_M
mix (synthetic.write_gguf: Q4_K, Q6_K): once as we run it, once with llama.cpp's Q8_K activation rounding reproduced
(quant.set_integer_dot), which must agree to float32 rounding.

Intel CPUs with AMX (Sapphire Rapids and later): a llama-cpp-python built natively there crashes with a segmentation
fault in llama.cpp's AMX matmul (ggml_backend_amx_mul_mat, upstream bug ggml-org/llama.cpp#20824). Each file runs in
a child process, so the crash is reported with the fix instead of killing this script. The fix is a build without AMX:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF" \\
        pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36
"""
import argparse
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

AMX_ADVICE = """llama.cpp died of {what} while evaluating {name}.
On Intel CPUs with AMX a natively built llama-cpp-python crashes in llama.cpp's AMX matmul (ggml_backend_amx_mul_mat,
upstream bug ggml-org/llama.cpp#20824){amx}. Rebuild it without AMX (--no-cache-dir, or pip reuses the old wheel):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF" \\
        pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36"""


class LlamaCppCrashed(RuntimeError):
    """llama.cpp's process ended by a signal (a crash inside the C++ library), not by a Python error."""


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def llamacpp_logits(gguf_path: Path, tokens: list[int], one_by_one=False) -> np.ndarray:
    """(T, V) float32 logits of llama.cpp on `tokens`, computed in a child process (see `worker`). one_by_one feeds
    the tokens one at a time (decoding: llama.cpp's vec_dot kernels) instead of as one batch (its GEMM kernels)."""
    out = gguf_path.with_suffix(".logits.npy")
    run_child(gguf_path, "--worker", out, ",".join(map(str, tokens)), "1" if one_by_one else "0")
    return np.load(out)


def run_child(gguf_path: Path, mode: str, out: Path, *args) -> None:
    """Run this file's worker `mode` on a GGUF in a child process; a crash (a signal) becomes LlamaCppCrashed with the
    AMX advice, another failure a RuntimeError with llama.cpp's last words."""
    cmd = [sys.executable, __file__, mode, str(gguf_path), str(out), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0:                                              # killed by a signal: a crash in C++
        sig = -proc.returncode
        what = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        amx = "; this CPU has AMX" if cpu_has_amx() else ""
        raise LlamaCppCrashed(AMX_ADVICE.format(what=what, name=gguf_path.name, amx=amx))
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {gguf_path.name}:\n{proc.stderr.strip()[-2000:]}")


def worker(gguf_path: str, out: str, tokens: str, one_by_one: str = "0") -> int:
    """Child process: load the GGUF in llama.cpp with an F32 KV cache, evaluate, save all logits."""
    from llama_cpp import Llama as LlamaCpp
    ids = [int(t) for t in tokens.split(",")]
    n = len(ids)
    llm = LlamaCpp(model_path=gguf_path, n_ctx=max(64, n), n_batch=max(64, n), logits_all=True, verbose=False,
                   type_k=0, type_v=0)                                       # GGML_TYPE_F32 KV cache
    for chunk in ([[t] for t in ids] if one_by_one == "1" else [ids]):
        llm.eval(chunk)
    np.save(out, np.array(llm.scores[:n], dtype=np.float32))
    return 0


def llamacpp_speed(gguf_path: Path, prompt: list[int], n_decode: int, threads: int) -> dict:
    """llama.cpp's prefill and greedy decode timed in a child process (a crash is reported as in llamacpp_logits):
    {"prefill_s", "decode_s", "ids"}; the decode starts after the first 8 prompt tokens, as benchmarks/forward.py's."""
    out = gguf_path.with_suffix(f".speed{threads}.npy")
    run_child(gguf_path, "--speed-worker", out, ",".join(map(str, prompt)), n_decode, threads)
    r = np.load(out, allow_pickle=False)
    return {"prefill_s": float(r[0]), "decode_s": float(r[1]), "ids": [int(i) for i in r[2:]]}


def speed_worker(gguf_path: str, out: str, tokens: str, n_decode: str, threads: str) -> int:
    """Child process: median of 3 prefills of the whole prompt, then a greedy decode of n_decode tokens after the
    first 8 prompt tokens, one token per eval (the F32 KV cache, as in `worker`)."""
    import statistics
    import time
    from llama_cpp import Llama as LlamaCpp
    ids, n, nt = [int(t) for t in tokens.split(",")], int(n_decode), int(threads)
    llm = LlamaCpp(model_path=gguf_path, n_ctx=max(512, len(ids) + n + 16), n_batch=max(512, len(ids)),
                   n_threads=nt, n_threads_batch=nt, verbose=False, type_k=0, type_v=0)
    times = []
    for _ in range(4):                                                    # a warm-up, then 3 timed prefills
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        times.append(time.perf_counter() - t0)
    def last_logits():                   # without logits_all, llama-cpp-python keeps no scores: read the context's
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    llm.reset()
    llm.eval(ids[:8])
    tok, new = int(np.argmax(last_logits())), []
    t0 = time.perf_counter()
    for _ in range(n):
        new.append(tok)
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    decode = time.perf_counter() - t0
    np.save(out, np.array([statistics.median(times[1:]), decode] + new, dtype=np.float64))
    return 0


def main(argv=None):
    from llama_ref import paths, quant as Q, evaluate as E, gguf_io as G, synthetic
    from llama_ref.config import LlamaConfig
    from llama_ref.loader import load, read_checkpoint
    from llama_ref.model import Llama

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(paths.DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("needs llama-cpp-python: pip install llama-cpp-python==0.3.36 (on Intel CPUs with AMX see --help)")
    src = Path(args.model)
    config, weights = read_checkpoint(src)
    model = Llama(config, weights)
    tok = src / "tokenizer.model" if (src / "tokenizer.model").exists() else paths.DEFAULT_TOKENIZER
    n = min(args.tokens, config.max_seq_len)
    tokens = [config.bos_id] + [int(t) for t in np.random.default_rng(0).integers(3, config.vocab_size, n - 1)]
    print("| GGUF type | max abs diff / max abs logit | top-1 agreement | KL(ours ‖ llama.cpp) |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ft in ("f32", "f16", "q8_0", "q4_0"):
            path = G.save_gguf(Path(tmp) / f"m-{ft}.gguf", config, model, tok, ft)
            try:
                theirs = llamacpp_logits(path, tokens)
            except LlamaCppCrashed as e:
                print(f"\n{e}", file=sys.stderr)
                return 2
            if ft == "f32":
                ours = model.forward(tokens)
            elif ft == "f16":
                ours = Llama(config, E.f16_weights(weights)).forward(tokens)
            else:
                ours = Q.quantize_model(model, ft).forward(tokens)
            r = E.compare_logits(ours, theirs)
            print(f"| {ft} | {np.abs(theirs - ours).max() / np.abs(ours).max():.2e} | {100 * r['top1']:.1f}% | {r['kl']:.2e} |")
        # K-quants: gguf-py cannot write them from real weights, so a random model in llama.cpp's Q4_K_M mix
        small = LlamaConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=768, vocab_size=config.vocab_size,
                            max_seq_len=64)
        path = synthetic.write_gguf(Path(tmp) / "random-q4_k_m.gguf", small, "q4_k_m")
        ids = tokens[:min(len(tokens), 32)]
        theirs = llamacpp_logits(path, ids)
        for label, m in (("q4_k_m (random; ours: float32 activations)", load(path)),
                         ("q4_k_m (random; ours: activations rounded to Q8_K like llama.cpp)",
                          Q.set_integer_dot(load(path)))):
            ours = m.forward(ids)
            r = E.compare_logits(ours, theirs)
            print(f"| {label} | {np.abs(theirs - ours).max() / np.abs(ours).max():.2e} | {100 * r['top1']:.1f}% | "
                  f"{r['kl']:.2e} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        sys.exit(worker(*sys.argv[2:]))
    if len(sys.argv) == 7 and sys.argv[1] == "--speed-worker":
        sys.exit(speed_worker(*sys.argv[2:]))
    sys.exit(main())
