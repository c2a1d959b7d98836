"""The decode bandwidth bound: tokens/s <= memory bandwidth / bytes read per token.

    python benchmarks/ondevice_bandwidth.py [--preset stories110M] [--tokens 32]

1. Llama 2 7B at W4 (Qualcomm's published 3.6 GB of weights) on phone-class LPDDR5/5X bandwidths (assumed: 64-bit bus at
   6400 / 8533 / 9600 MT/s = 51.2 / 68.3 / 76.8 GB/s), and the one phone Qualcomm publishes a speed for: Samsung
   Galaxy S23 Ultra (Snapdragon 8 Gen 2, LPDDR5X-8400: 67.2 GB/s), 117.8 ms per token = 8.5 tokens/s (Qualcomm AI Hub,
   llama_v2_7b_chat_quantized, perf.yaml in quic/ai-hub-models, measured 2024-01-26).
2. This machine: a NumPy copy benchmark for the bandwidth, our float32 decode speed (one token at a time with a KV cache)
   for a model of the preset's shape with random weights, and the ratio measured / bound. Also the same model in Q8_0 and
   Q4_0 (our NumPy kernels dequantize per call, so they read fewer bytes but do more work: the ratio shows it).
Printed, never asserted: speeds vary from run to run.
"""
import argparse
import os
import sys

import numpy as np
from _bench import machine_line

from llama_ref import PRESETS, ondevice as D, quant as Q
from llama_ref.model import Llama
from llama_ref.weights import weight_shapes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stories110M", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)

    c7 = PRESETS["llama2-7b"]
    bpw = 3.6e9 * 8 / c7.n_params()
    b = D.decode_bytes_per_token(c7, bpw)
    print(f"Llama 2 7B at {bpw:.2f} bits/weight: {b['total'] / 1e9:.2f} GB read per token (weights; KV cache excluded)")
    print("| memory | GB/s | bound tokens/s |")
    print("|---|---:|---:|")
    for name, bw in (("LPDDR5-6400", 51.2), ("LPDDR5X-8400 (Galaxy S23 Ultra)", 67.2), ("LPDDR5X-8533", 68.3),
                     ("LPDDR5X-9600", 76.8)):
        print(f"| {name} | {bw} | {D.tokens_per_second_bound(b['total'], bw):.1f} |")
    published = 1 / 0.1178
    print(f"published on the Galaxy S23 Ultra: {published:.1f} tokens/s = "
          f"{published / D.tokens_per_second_bound(b['total'], 67.2):.0%} of its bound")

    cfg = PRESETS[args.preset].replace(max_seq_len=64 + args.tokens)
    rng = np.random.default_rng(0)
    w = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for k, s in weight_shapes(cfg).items()}
    bw = D.measure_bandwidth()
    print(f"\nthis machine: {machine_line(os.environ.get('OPENBLAS_NUM_THREADS', os.cpu_count()))}")
    print(f"NumPy copy bandwidth {bw:.1f} GB/s (read + write)")
    print(f"| {args.preset} shape | bytes/token | bound tokens/s | measured tokens/s | measured / bound |")
    print("|---|---:|---:|---:|---:|")
    model = Llama(cfg, w)
    for scheme, bits in (("float32", 32), ("q8_0", 8.5), ("q4_0", 4.5)):
        m = model if scheme == "float32" else Q.quantize_model(model, scheme)
        nbytes = D.decode_bytes_per_token(cfg, bits, kv_len=8 + args.tokens // 2, kv_bytes=4)["total"]
        bound = D.tokens_per_second_bound(nbytes, bw)
        tok_s = D.measure_decode(m, n_tokens=args.tokens, prompt_len=8)
        print(f"| {scheme} | {nbytes / 1e6:.0f} MB | {bound:.1f} | {tok_s:.1f} | {tok_s / bound:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
