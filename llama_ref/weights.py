"""What a Llama checkpoint holds, under every format's names, and checking that it does: one place for every format.

The one table of tensor names (as llama2.c has one TransformerWeights and llm.c one ParameterTensors): each tensor's
short name (the keys of Llama.params and of the training layer dicts), its Hugging Face name, its GGUF name and its
llama2.c array, and its shape from the config. Chapter 00 prints the tensors of a checkpoint; chapter 14 reads every
format through this table. Every loader and writer reads it. Every loader (checkpoint.py,
gguf_io.py, quant.py) ends with `check_weights(config, weights)`: exactly the tensors the config describes, with the
config's shapes, and no NaN/Inf, float or quantized. Chapter 00 shows the tensor table.

The one layout fact formats disagree on lives here too: the order of q/k rows. HF pairs RoPE dimensions (i, i+hs/2)
(rotate-half), Meta's checkpoints, llama2.c and GGUF pair (2i, 2i+1); `permute_qk_meta_to_hf` / `permute_qk_hf_to_meta`
map one onto the other (chapter 03 proves it), and `qk_heads` says which tensors they apply to.
"""
from __future__ import annotations

import re

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, NonFiniteWeightsError, ShapeMismatchError
from .matrices import run_jobs

# short name: (HF name, GGUF name, llama2.c array). Per-layer names take the layer index for {i}; llama2.c stacks each
# per-layer tensor over layers in one array. q/k rows: HF's rotate-half order here, Meta's pairs in GGUF and llama2.c.
LAYER_TENSORS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", "rms_att"),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "wq"),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "wk"),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", "wv"),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", "wo"),
    "ffn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", "rms_ffn"),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", "w1"),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", "w3"),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", "w2"),
}
MODEL_TENSORS = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight", "token_embedding"),
    "norm": ("model.norm.weight", "output_norm.weight", "rms_final"),
    "lm_head": ("lm_head.weight", "output.weight", "wcls"),          # absent when the embedding is tied
}
HF, GGUF, LLAMA2C = 0, 1, 2


def tensor_shape(short: str, config: LlamaConfig) -> tuple:
    """The (out, in) shape of a tensor by its short name."""
    C, H, V = config.dim, config.hidden_dim, config.vocab_size
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"attn_norm": (C,), "wq": (q, C), "wk": (kv, C), "wv": (kv, C), "wo": (C, q), "ffn_norm": (C,),
            "w_gate": (H, C), "w_up": (H, C), "w_down": (C, H), "embed": (V, C), "norm": (C,), "lm_head": (V, C)}[short]


def layer_names(i: int, column: int = HF) -> dict[str, str]:
    """{short name: full name} of layer i's tensors in one naming (HF or GGUF)."""
    return {short: names[column].format(i=i) for short, names in LAYER_TENSORS.items()}


def weight_shapes(config: LlamaConfig) -> dict[str, tuple]:
    """Every tensor a Llama checkpoint must hold, with its HF name and (out, in) shape, in HF's order."""
    shapes = {MODEL_TENSORS["embed"][HF]: tensor_shape("embed", config)}
    for i in range(config.n_layers):
        shapes.update({name: tensor_shape(short, config) for short, name in layer_names(i).items()})
    shapes[MODEL_TENSORS["norm"][HF]] = tensor_shape("norm", config)
    if not config.tie_embeddings:
        shapes[MODEL_TENSORS["lm_head"][HF]] = tensor_shape("lm_head", config)
    return shapes


def short_name(name: str) -> str | None:
    """The short name of an HF-named tensor ("model.layers.3.mlp.up_proj.weight" -> "w_up"); None if it is none."""
    for short, names in MODEL_TENSORS.items():
        if names[HF] == name:
            return short
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    return next((short for short, names in LAYER_TENSORS.items() if m and names[HF].format(i=m.group(1)) == name), None)


def rename(name: str, to: int, source: int = HF) -> str | None:
    """A tensor's name in another naming (HF <-> GGUF); None if `name` is no Llama tensor."""
    for names in MODEL_TENSORS.values():
        if names[source] == name:
            return names[to]
    m = re.fullmatch(r"(model\.layers|blk)\.(\d+)\.(.+)", name)
    if m:
        for names in LAYER_TENSORS.values():
            if names[source].format(i=m.group(2)) == name:
                return names[to].format(i=m.group(2))
    return None


# ------------------------------------------------------------------------------------------------
# q/k rows: HF's rotate-half order vs Meta's interleaved pairs

def permute_qk_meta_to_hf(w, n_heads):
    """Reorder the rows of a q/k projection (n_heads*hs, C) from Meta's pair layout to HF's rotate-half layout.

    Within each head, Meta row 2i+j becomes HF row j*hs/2 + i, so Meta's pair (2i, 2i+1) lands on HF's (i, i+hs/2).
    With permuted weights, model.apply_rope_hf gives the same attention scores as model.apply_rope_meta on the originals.
    """
    rows, cols = w.shape
    hs = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, hs // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols))


def permute_qk_hf_to_meta(w, n_heads):
    """Inverse of permute_qk_meta_to_hf: HF rotate-half rows back to Meta's interleaved pairs."""
    rows, cols = w.shape
    hs = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, hs // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols))


def qk_rows_meta_to_hf(n_rows, n_heads):
    """The row order permute_qk_meta_to_hf produces, as indices: w_hf = w_meta[perm]. Stored matrices are reordered
    with it lazily (matrices.RowPermuted), so a memory-mapped q/k is never copied."""
    return permute_qk_meta_to_hf(np.arange(n_rows)[:, None], n_heads)[:, 0]


def qk_rows_hf_to_meta(n_rows, n_heads):
    """Indices of permute_qk_hf_to_meta: w_meta = w_hf[perm]."""
    return permute_qk_hf_to_meta(np.arange(n_rows)[:, None], n_heads)[:, 0]


def qk_heads(name: str, config: LlamaConfig, source: int = HF) -> int | None:
    """The heads whose RoPE pairs a tensor's rows hold, for the tensors Meta-layout formats store in pair order:
    n_heads for a q projection, n_kv_heads for a k projection (named in `source`'s naming); None for every other."""
    short = short_name(name if source == HF else rename(name, HF, source) or "")
    return {"wq": config.n_heads, "wk": config.n_kv_heads}.get(short)


IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")   # RoPE tables old transformers versions saved; we recompute

# which config fields each shape comes from, for messages
_SHAPE_WHY = {
    "embed_tokens": "(vocab_size, hidden_size)", "lm_head": "(vocab_size, hidden_size)",
    "q_proj": "(num_attention_heads*head_dim, hidden_size)", "k_proj": "(num_key_value_heads*head_dim, hidden_size)",
    "v_proj": "(num_key_value_heads*head_dim, hidden_size)", "o_proj": "(hidden_size, num_attention_heads*head_dim)",
    "gate_proj": "(intermediate_size, hidden_size)", "up_proj": "(intermediate_size, hidden_size)",
    "down_proj": "(hidden_size, intermediate_size)", "norm": "(hidden_size,)", "layernorm": "(hidden_size,)",
}


def is_ignored(name: str, config: LlamaConfig) -> bool:
    """Tensors a checkpoint may carry that we drop on load: rotary_emb.inv_freq, and lm_head when tied."""
    return bool(IGNORED.search(name)) or (config.tie_embeddings and name == "lm_head.weight")


def check_weights(config: LlamaConfig, weights: dict, source=None, check_finite=True) -> None:
    """Raise unless `weights` is exactly the set of tensors `config` describes, with the right shapes, all finite.

    - every expected name present (lm_head.weight only when the config is untied);
    - no unexpected tensors: a tensor we would not use means the checkpoint is not the model we implement (biases,
      a different architecture, a wrong n_layers), and silently dropping it would give wrong outputs. Exceptions:
      `*.rotary_emb.inv_freq`, and `lm_head.weight` when tied (transformers ignores it too);
    - shapes equal to the config's (ShapeMismatchError);
    - no NaN/Inf (NonFiniteWeightsError), scanned in chunks so a memmap is never materialised whole.
    `source` (a path) is named in messages.
    """
    src = f" in {source}" if source else ""
    check_layer_count(config, weights, src)
    expected = weight_shapes(config)
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected and not is_ignored(n, config)]
    if missing:
        raise CheckpointError(_missing_message(config, missing, list(weights), src))
    if extra:
        raise CheckpointError(_extra_message(config, extra, src))
    for name, shape in expected.items():
        got = tuple(getattr(weights[name], "shape", ()))
        if got != shape:
            why = next((v for k, v in _SHAPE_WHY.items() if k in name), "")
            raise ShapeMismatchError(
                f"tensor {name!r}{src} has shape {got} but config.json requires {shape} {why}: config.json and the "
                f"weights disagree; use the config.json the weights were saved with (or fix its sizes)")
    if check_finite:
        check_all_finite(weights, expected, src)


def check_all_finite(weights, names, src=""):
    """No NaN/Inf in any of `names`: arrays scanned in chunks, stored matrices by their first_nonfinite() (their raw bits,
    or the scales of quantized blocks), the tensors spread over the cores (matrices.run_jobs)."""
    found = {}

    def scan(name, w):
        if isinstance(w, np.ndarray):
            check_finite_array(name, w, src)
        elif hasattr(w, "first_nonfinite"):                                    # a stored matrix (matrices.py)
            check_finite_stored(name, w, src)

    def job(name):
        def run(_scratch):
            try:
                scan(name, weights[name])
            except NonFiniteWeightsError as e:
                found[name] = e
        return run
    run_jobs([job(name) for name in names])
    for name in names:                                                         # the first in the model's order
        if name in found:
            raise found[name]


def check_layer_count(config: LlamaConfig, names, src="") -> None:
    """A config that claims far more layers than the weights hold (2^40 from a corrupt header) is refused here, before
    anything enumerates one entry per layer (a near miss gets check_weights' detailed message instead)."""
    held = 1 + max((int(m.group(1)) for n in names if (m := re.match(r"(?:model\.layers|blk)\.(\d+)\.", n))),
                   default=-1)
    if config.n_layers > held + 100_000:
        raise CheckpointError(f"the config says {config.n_layers} layers but the weights{src} hold {held}: the config "
                              "and the weights disagree (num_hidden_layers / block_count / the llama2.c header)")


def check_finite_array(name, a, src="", chunk=1 << 22):
    """Raise NonFiniteWeightsError if `a` holds NaN/Inf. Scans 4M elements at a time, in a's own dtype."""
    if not (np.issubdtype(a.dtype, np.floating)):
        raise CheckpointError(f"tensor {name!r}{src} has dtype {a.dtype}; weights must be floating point")
    flat = a.reshape(-1)                                                       # a view for contiguous arrays
    for start in range(0, flat.size, chunk):
        ok = np.isfinite(flat[start:start + chunk])
        if not ok.all():
            first = np.unravel_index(start + int(np.argmin(ok)), a.shape)
            bad = sum(int(np.size(c) - np.count_nonzero(np.isfinite(c)))
                      for c in (flat[s:s + chunk] for s in range(start, flat.size, chunk)))
            raise NonFiniteWeightsError(
                f"tensor {name!r}{src} holds {bad} NaN/Inf values (first at index {tuple(map(int, first))}); the "
                "checkpoint is corrupt or was saved after training diverged: re-export it from a good copy")


def check_finite_stored(name, w, src=""):
    """NaN/Inf in a stored matrix, found by its own first_nonfinite(): the raw bits of a float16/bfloat16 matrix, the
    fp16 scales of a quantized one (the only bytes of a block that can make its values inf/NaN), never an expansion
    of the whole tensor."""
    at = w.first_nonfinite()
    if at is not None:
        where = " in the scale of the block" if getattr(w, "quantized", False) else ""
        raise NonFiniteWeightsError(
            f"tensor {name!r}{src} holds NaN/Inf values (first at index {tuple(map(int, at))}{where}); the checkpoint "
            "is corrupt or was saved after training diverged: re-export it from a good copy")


def _missing_message(config, missing, present, src):
    if missing == ["lm_head.weight"]:
        return (f"tensor 'lm_head.weight' is missing{src} but config.json says the classifier is untied "
                "(tie_word_embeddings=false); if the model shares its classifier with the token embedding, set "
                "\"tie_word_embeddings\": true in config.json, otherwise the checkpoint is incomplete")
    hint = ""
    if any(n.startswith(("tok_embeddings", "layers.")) for n in present):
        hint = (" The names look like Meta's original checkpoint format: convert it to HF format first with "
                "transformers' convert_llama_weights_to_hf.py.")
    elif any(n.startswith(("token_embd", "blk.")) for n in present):
        hint = " The names look like GGUF: load the .gguf file itself."
    else:
        layers = {int(m.group(1)) for n in present if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        if layers and max(layers) + 1 < config.n_layers:
            hint = (f" The weights hold {max(layers) + 1} layers but config.json says num_hidden_layers="
                    f"{config.n_layers}: fix config.json.")
    shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"{len(missing)} tensor(s) the config requires are missing{src}: {shown}.{hint}"


def _extra_message(config, extra, src):
    shown = ", ".join(repr(n) for n in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    layers = {int(m.group(1)) for n in extra if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layers and min(layers) >= config.n_layers:
        hint = (f"the weights hold {max(layers) + 1} layers but config.json says num_hidden_layers={config.n_layers}: "
                "fix config.json")
    else:
        hint = ("llama_ref implements Llama 2 exactly (no biases, no extra modules), so this is probably a different "
                "architecture; ignoring these tensors would give wrong outputs")
    return f"{len(extra)} unexpected tensor(s){src}: {shown}; {hint}"
