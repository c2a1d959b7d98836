"""Random-weight checkpoints of real shapes, in the formats users download: for tests, benchmarks and chapter 14.

No model hub is reachable from here, and none is needed to check a loader: a Llama-2-7B-shaped file with seeded random
weights has the same tensors, types, byte layouts and sizes as the real one, so loading, memory and speed are measured
on the real thing's terms (only the words it writes are nonsense).

    write_gguf(path, config, mix="q4_k_m")   # GGUF: f32 | f16 | q8_0 | q4_0 | q4_k_m (llama.cpp's mix, below)
    write_hf(path, config, dtype="float16")  # HF directory: float32 | float16 | bfloat16, sharded like the hub's

Weights are made one tensor at a time from a seed per tensor name, so writing a 13 GB checkpoint needs the memory of
its largest tensor only. Matrices have standard deviation `std` (0.02, GPT-2's initialisation); norms are 1 + noise.
Quantized tensors are random blocks with sane scales: random bytes for the quants, then every fp16 scale set so the
block's values have that standard deviation (any bit pattern is a valid quant; only inf/NaN scales are not).
The vocabulary is our tokenizer's pieces padded with unused pieces up to vocab_size (vocabulary_for).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from .checkpoint import INDEX_NAME
from .config import LlamaConfig
from .output import atomic_dir, atomic_file
from .gguf_io import FILE_TYPES, FP16_SCALES, GGUFMatrix, add_llama_metadata, hf_to_gguf_name, sentencepiece_vocab
from .safetensors import write_safetensors_stream
from .weights import permute_qk_hf_to_meta, qk_heads, weight_shapes
from .tokenizer import UNUSED, proto_from_vocab
from . import paths

F32 = np.float32

# llama.cpp's LlamaFileType of each mix (general.file_type), for the ones llama.cpp names after a single type or mix
FILE_TYPE_IDS = {**FILE_TYPES, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 11, "q4_k": 14, "q4_k_m": 15,
                 "q5_k": 16, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30}

# The block types write_gguf writes (their fp16 scales are set to sane values; gguf_io.FP16_SCALES says where they are)
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def _seed(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def random_tensor(name: str, shape, seed=0, std=0.02) -> np.ndarray:
    """float32 values of one tensor: N(0, std) for matrices, 1 + N(0, std) for norm vectors. Seeded by the name."""
    rng = _seed(name, seed)
    a = rng.standard_normal(shape, dtype=F32) * F32(std)
    return a + F32(1.0) if len(shape) == 1 else a


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator, std=0.02) -> np.ndarray:
    """(rows, bytes per row) uint8 of a GGUF block type: random quants, fp16 scales set for values of about `std`."""
    from gguf import GGMLQuantizationType as GT
    from gguf.constants import GGML_QUANT_SIZES
    gt = GT[type_name]
    block, size = GGML_QUANT_SIZES[gt]
    nb = cols // block
    raw = rng.integers(0, 256, (rows * nb, size), dtype=np.uint8)      # (blocks, bytes)
    fields = FP16_SCALES[type_name]
    ones = np.ones((rows * nb, 1), np.float16).view(np.uint8)            # scale 1.0 everywhere: measure the spread
    for off in fields:
        raw[:, off:off + 2] = ones
    probe = GGUFMatrix(raw[:64 * nb].reshape(-1, nb * size), (min(64, rows), cols), gt).dequantize()
    unit = float(np.std(probe)) or 1.0
    scale = (rng.uniform(0.5, 1.5, (rows * nb, 1)) * (std / unit)).astype(np.float16).view(np.uint8)
    for off in fields:                                                  # values are linear in all scales together
        raw[:, off:off + 2] = scale
    return raw.reshape(rows, nb * size)


def vocabulary_for(vocab_size: int):
    """(pieces, scores, types, unk_id): our SentencePiece vocabulary padded to vocab_size with unused pieces, so a
    random 32000-token model has a tokenizer that encodes text (into our 1024 pieces) and decodes every id."""
    pieces, scores, types, unk = sentencepiece_vocab(paths.DEFAULT_TOKENIZER)
    pieces, scores, types = list(pieces[:vocab_size]), list(scores[:vocab_size]), list(types[:vocab_size])
    for i in range(len(pieces), vocab_size):
        pieces.append(f"<unused{i}>")
        scores.append(-1e9)
        types.append(UNUSED)
    return pieces, scores, types, unk


# ------------------------------------------------------------------------------------------------
# GGUF

def q4_k_m_type(gguf_name: str, n_layers: int) -> str:
    """llama.cpp's Q4_K_M mix (llama-quant.cpp): Q4_K everywhere except output.weight (Q6_K) and attn_v / ffn_down
    in the layers where use_more_bits holds (the first and last eighth, and every third layer between: Q6_K)."""
    if gguf_name == "output.weight":
        return "Q6_K"
    if gguf_name.endswith(("attn_v.weight", "ffn_down.weight")):
        i = int(gguf_name.split(".")[1])
        more = i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2
        return "Q6_K" if more else "Q4_K"
    return "Q4_K"


def matrix_type(mix: str, gguf_name: str, n_layers: int) -> str:
    """The GGUF block type of a matrix under a mix: q4_k_m's rule, or the one type named (q8_0, q5_k, iq4_nl, ...)."""
    return q4_k_m_type(gguf_name, n_layers) if mix == "q4_k_m" else mix.upper()


def _layout(name, shape, config, mix):
    """(GGUF name, block type or None, float dtype or None) of one tensor under a mix: norms float32, matrices the mix's
    type. Both passes of write_gguf (tensor infos, then data) read it."""
    gname = hf_to_gguf_name(name)
    if len(shape) == 1 or mix == "f32":
        return gname, None, np.dtype(F32)
    if mix == "f16":
        return gname, None, np.dtype(np.float16)
    return gname, matrix_type(mix, gname, config.n_layers), None


def _gguf_tensor(name, shape, config, layout, seed, std):
    """The array to write for one tensor: random blocks of its type, or random floats with q/k rows in Meta's pair
    order, as convert_hf_to_gguf.py writes them."""
    gname, kind, dtype = layout
    if kind:
        return random_blocks(kind, shape[0], shape[1], _seed(name, seed), std)
    a = random_tensor(name, shape, seed, std).astype(dtype)
    heads = qk_heads(name, config)                                      # q/k: Meta's pair order in GGUF
    return a if heads is None else permute_qk_hf_to_meta(a, heads)


def write_gguf(path, config: LlamaConfig, mix: str = "q8_0", seed: int = 0, std: float = 0.02, progress=None,
               force=False) -> Path:
    """A Llama GGUF of random weights, with a vocabulary (vocabulary_for) and Llama metadata, written tensor by tensor
    (gguf-py's streaming writer) into a temporary file, then renamed. mix: f32 | f16 | q4_k_m (llama.cpp's mix) | one
    block type for every matrix (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k ... q6_k, iq4_nl, iq4_xs). Norms are float32."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES
    if mix not in ("f32", "f16", "q4_k_m") and mix.upper() not in BLOCK_TYPES:
        raise ValueError(f"mix {mix!r}: choose f32, f16, q4_k_m or one of {', '.join(k.lower() for k in BLOCK_TYPES)}")
    shapes = weight_shapes(config)
    with atomic_file(path, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        add_llama_metadata(w, config, FILE_TYPE_IDS.get(mix, 0), vocabulary_for(config.vocab_size), f"random {mix} llama",
                           quantized=mix not in ("f32", "f16"))
        layouts = {name: _layout(name, shape, config, mix) for name, shape in shapes.items()}
        for name, shape in shapes.items():                              # tensor infos first: sizes are known
            gname, kind, dtype = layouts[name]
            if kind:
                gt = gguf.GGMLQuantizationType[kind]
                block, size = GGML_QUANT_SIZES[gt]
                row_bytes = shape[1] // block * size
                w.add_tensor_info(gname, (shape[0], row_bytes), np.dtype(np.uint8), shape[0] * row_bytes, raw_dtype=gt)
            else:
                w.add_tensor_info(gname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape in shapes.items():
            w.write_tensor_data(np.ascontiguousarray(_gguf_tensor(name, shape, config, layouts[name], seed, std)))
            if progress:
                progress(name)
        w.close()
    return Path(path)


# ------------------------------------------------------------------------------------------------
# HF directory

def write_hf(path, config: LlamaConfig, dtype: str = "float16", seed: int = 0, std: float = 0.02,
             max_shard_bytes: int = 10 * 2 ** 30, progress=None, force=False) -> Path:
    """An HF model directory of random weights in float32 | float16 | bfloat16: config.json, safetensors shards of at
    most max_shard_bytes with model.safetensors.index.json (as meta-llama's repositories), and a tokenizer.model with
    vocabulary_for's pieces. Tensors are made and written one at a time."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: choose float32, float16 or bfloat16")
    itemsize = 4 if dtype == "float32" else 2
    shapes = weight_shapes(config)
    shards, cur, cur_bytes = [], [], 0
    for name, shape in shapes.items():                                  # greedy: a shard fills up to the limit
        n = int(np.prod(shape)) * itemsize
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    shards.append(cur)

    def make(name):
        a = random_tensor(name, shapes[name], seed, std)
        if dtype == "float16":
            return a.astype(np.float16)
        if dtype == "bfloat16":                                          # round to nearest even on the top 16 bits
            u = a.view(np.uint32)
            return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        return a

    pieces, scores, types, unk = vocabulary_for(config.vocab_size)
    with atomic_dir(path, force=force) as tmp:
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            st = "BF16" if dtype == "bfloat16" else {"float16": "F16", "float32": "F32"}[dtype]
            write_safetensors_stream(tmp / fname, [(n, shapes[n], st, make) for n in names], progress=progress)
            weight_map.update({n: fname for n in names})
        total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = config.to_hf()
        hf["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "tokenizer.model").write_bytes(proto_from_vocab(pieces, scores, types, unk, config.bos_id, config.eos_id))
    return Path(path)
