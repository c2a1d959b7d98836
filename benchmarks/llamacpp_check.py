"""Run the GGUF files we write in llama.cpp itself (via llama-cpp-python) and compare its logits with our forward.

    pip install llama-cpp-python==0.3.36        # builds llama.cpp from source (~20 min on 2 cores); not a dependency
    python benchmarks/llamacpp_check.py [--model data/models/tinyworld]

For each file type (F32, F16, Q8_0, Q4_0) the model is exported with gguf_io.save_gguf (tokenizer included), loaded by
llama.cpp with an F32 KV cache, and evaluated on the same tokens; printed: max |llama.cpp - ours| relative to the largest
logit, top-1 agreement and KL. F32 must agree to float32 rounding (that checks names, metadata, the Meta q/k layout and
the shapes). For F16/Q8_0/Q4_0, llama.cpp also rounds the *activations* (to f16, or to Q8_0 blocks for the integer dot
product), so the gap is of the size of the quantization error itself.
"""
import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from llama_ref import paths, quant as Q, gguf_io as G
from llama_ref.checkpoint import load_model
from llama_ref.model import Llama


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(paths.DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args(argv)
    try:
        from llama_cpp import Llama as LlamaCpp
    except ImportError:
        sys.exit("needs llama-cpp-python: pip install llama-cpp-python==0.3.36")
    src = Path(args.model)
    config, weights = load_model(src)
    model = Llama(config, weights)
    tok = src / "tokenizer.model" if (src / "tokenizer.model").exists() else paths.DEFAULT_TOKENIZER
    n = min(args.tokens, config.max_seq_len)
    tokens = [config.bos_id] + list(np.random.default_rng(0).integers(3, config.vocab_size, n - 1))
    print("| GGUF type | max abs diff / max abs logit | top-1 agreement | KL(ours ‖ llama.cpp) |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ft in ("f32", "f16", "q8_0", "q4_0"):
            path = G.save_gguf(Path(tmp) / f"m-{ft}.gguf", config, model, tok, ft)
            llm = LlamaCpp(model_path=str(path), n_ctx=max(64, n), n_batch=max(64, n), logits_all=True, verbose=False,
                           type_k=0, type_v=0)                                   # GGML_TYPE_F32 KV cache
            llm.eval(tokens)
            theirs = np.array(llm.scores[:n], dtype=np.float32)
            if ft == "f32":
                ours = model.forward(tokens)
            elif ft == "f16":
                ours = Llama(config, Q.f16_weights(weights)).forward(tokens)
            else:
                ours = Q.quantize_model(model, ft).forward(tokens)
            r = Q.compare_logits(ours, theirs)
            print(f"| {ft} | {np.abs(theirs - ours).max() / np.abs(ours).max():.2e} | {100 * r['top1']:.1f}% | {r['kl']:.2e} |")
            del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
