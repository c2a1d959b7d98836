"""Llama 2 as an ONNX graph, written by our own code: the decoder ONNX Runtime and ONNX Runtime GenAI run.

Chapter 13 uses it (the Windows / ONNX Runtime section). Each function below writes the nodes of one piece of
model.py, under the same name, so the two files read side by side:

    rms_norm -> rope -> attention (GQA, KV cache, causal + padding mask) -> swiglu -> block -> decoder_graph

The graph has the layout ONNX Runtime GenAI and Optimum use for Llama decoders:
    inputs   input_ids (B, T) int64, attention_mask (B, S) int64, position_ids (B, T) int64,
             past_key_values.{i}.key / .value (B, nkv, P, hs) float32         (S = P + T)
    outputs  logits (B, T, V) float32, present.{i}.key / .value (B, nkv, S, hs)
B, T and P are dynamic. With `int4=True` every block matmul is ONNX Runtime's com.microsoft.MatMulNBits (4 bits,
block 32: the op its CPU and DirectML paths use for int4 LLM weights), holding exactly quant.quantize_w4's codes and
fp16-rounded scales, so `int4_reference(model)` (our NumPy W4 path) computes the same function. The embedding and
the classifier stay float32 in both.

`export_onnx` writes a directory: model.onnx, its weights as external data (model.onnx.data), genai_config.json,
config.json and what travels with a model (model_files.companion_files: the tokenizer files, generation_config.json and,
for a chat model, the chat template), so onnxruntime_genai.Model(dir) and Optimum's
ORTModelForCausalLM.from_pretrained(dir) run it as it is. Needs the `[onnx]` extra (onnx, onnxruntime,
onnxruntime-genai); the rest of the package never imports them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import ExtraMissingError, InputError, QuantizationError
from .output import atomic_dir, check_output, inputs_of
from .model import Llama, rope_tables
from .model_files import companion_files
from .quant import W4Matrix
from .weights import MODEL_TENSORS, layer_names, tensor_shape

F32 = np.float32
MASK_NEG = -1e9          # finite, as ondevice.MASK_NEG: a fully padded row gives a uniform softmax, not NaN
INT4_BLOCK = 32          # MatMulNBits block size: 32 weights share one scale
OPSET = 18
BLOCK_MATMULS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def require_onnx():
    """Import onnx, or say how to install it."""
    try:
        import onnx
    except ImportError:
        raise ExtraMissingError("ONNX export needs the [onnx] extra: pip install -e '.[onnx]' "
                                "(onnx, onnxruntime, onnxruntime-genai)") from None
    return onnx


# ------------------------------------------------------------------------------------------------
# A graph under construction: nodes, weights (initializers), inputs and outputs

class Graph:
    """Collects nodes in the order they are written. `op` adds one node and returns its output's name."""

    def __init__(self, name):
        self.onnx = require_onnx()
        self.name, self.nodes, self.weights, self.inputs, self.outputs = name, [], [], [], []
        self.count = 0

    def op(self, op_type, *inputs, outputs=1, name=None, domain="", **attrs):
        self.count += 1
        base = name or f"{op_type.lower()}_{self.count}"
        outs = [base] if outputs == 1 else [f"{base}_{k}" for k in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outs, name=f"n{self.count}_{op_type}",
                                                     domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def weight(self, name, array):
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        self.weights.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64):
        """A small constant tensor (shapes, axes, scalars)."""
        self.count += 1
        return self.weight(f"const_{self.count}", np.asarray(value, dtype))

    def fresh(self, prefix):
        """A new unique name."""
        self.count += 1
        return f"{prefix}_{self.count}"

    def rename(self, tensor, name):
        """Give the tensor a graph-output name (its producer and consumers follow)."""
        for node in self.nodes:
            node.output[:] = [name if o == tensor else o for o in node.output]
            node.input[:] = [name if i == tensor else i for i in node.input]

    def input(self, name, elem_type, shape):
        self.inputs.append(self.onnx.helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name, elem_type, shape):
        self.outputs.append(self.onnx.helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, opsets=None):
        h = self.onnx.helper
        graph = h.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.weights)
        opsets = opsets or {"": OPSET}
        m = h.make_model(graph, opset_imports=[h.make_opsetid(d, v) for d, v in opsets.items()],
                         producer_name="llama_ref")
        m.ir_version = 9                               # onnxruntime 1.32 reads up to IR 11; 9 is widely supported
        return m


# ------------------------------------------------------------------------------------------------
# The pieces of model.py, as nodes

def rms_norm(g, x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(eps, F32))))
    return g.op("Mul", g.op("Mul", x, inv), weight)


def rope(g, x, cos, sin, hs):
    """HF's rotate-half on the last axis: x (..., hs), cos/sin broadcast against (..., hs/2) (the decoder's
    (B, h, T, hs) with (B, 1, T, hs/2); the on-device graphs' (T, hs) rows). [x1 cos - x2 sin, x2 cos + x1 sin]."""
    x1, x2 = g.op("Split", x, g.const([hs // 2, hs // 2]), outputs=2, axis=-1)
    return g.op("Concat", g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin)),
                g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin)), axis=-1)


def attention(g, q, k, v, mask, cfg: LlamaConfig):
    """q (B, nh, T, hs), k/v (B, nkv, S, hs), mask (B, 1, 1, T, S) additive -> (B, nh, T, hs).
    Query head h reads key/value head h // rep: q is viewed as (B, nkv, rep, T, hs), as model.attention does."""
    nkv, rep, hs = cfg.n_kv_heads, cfg.n_rep, cfg.head_dim
    qg = g.op("Reshape", g.op("Mul", q, g.const(1.0 / np.sqrt(hs), F32)), g.const([0, nkv, rep, -1, hs]))
    kt = g.op("Unsqueeze", g.op("Transpose", k, perm=[0, 1, 3, 2]), g.const([2]))      # (B, nkv, 1, hs, S)
    scores = g.op("Add", g.op("MatMul", qg, kt), mask)                                  # (B, nkv, rep, T, S)
    probs = g.op("Softmax", scores, axis=-1)
    out = g.op("MatMul", probs, g.op("Unsqueeze", v, g.const([2])))                     # (B, nkv, rep, T, hs)
    return g.op("Reshape", out, g.const([0, cfg.n_heads, -1, hs]))


def swiglu(g, gate, up):
    """silu(gate) * up, silu(x) = x * sigmoid(x)."""
    return g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)


def linear(g, x, name, w, int4):
    """x @ W.T for an (out, in) weight: a MatMul with the (in, out) float32 copy, or MatMulNBits on int4 blocks."""
    if not int4:
        return g.op("MatMul", x, g.weight(name, np.asarray(w, F32).T))
    packed, scales = int4_blocks(name, w)
    N, K = w.shape
    g.weight(name + ".qweight", packed.reshape(N, K // INT4_BLOCK, INT4_BLOCK // 2))
    g.weight(name + ".scales", scales.astype(F32))
    return g.op("MatMulNBits", x, name + ".qweight", name + ".scales", domain="com.microsoft",
                K=K, N=N, bits=4, block_size=INT4_BLOCK)


def check_static_rope(cfg: LlamaConfig) -> None:
    """The graphs hold fixed cos/sin tables: dynamic NTK scaling (tables that change with the sequence length) cannot
    be one."""
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic":
        raise InputError("this model uses dynamic NTK RoPE scaling, whose tables change with the sequence length; the "
                         "ONNX graphs hold fixed tables: export a copy with linear scaling or none")


def check_int4_shapes(cfg: LlamaConfig) -> None:
    """QuantizationError naming the first block matmul whose inputs are no multiple of the int4 block."""
    for short in BLOCK_MATMULS:
        K = tensor_shape(short, cfg)[1]
        if K % INT4_BLOCK:
            raise QuantizationError(f"{layer_names(0)[short]} (and every layer's): {K} inputs are not a multiple of "
                                    f"the int4 block size {INT4_BLOCK}; export this model with --format onnx "
                                    "(float32) instead")


def int4_blocks(name, w):
    """quant.quantize_w4 with block 32: codes q + 8 packed two per byte, low nibble first (MatMulNBits' layout and
    default zero point 8), fp16-rounded scales (N, K/32)."""
    m = w if isinstance(w, W4Matrix) and w.group == INT4_BLOCK else None
    if m is None:
        K = np.shape(w)[1]
        if K % INT4_BLOCK:
            raise QuantizationError(f"{name}: {K} inputs are not a multiple of the int4 block size {INT4_BLOCK}; "
                                    "export this model with --format onnx (float32) instead")
        m = W4Matrix.quantize(np.asarray(w, F32), INT4_BLOCK, name=name)
    return m.packed, m.scales


def block(g, i, x, w: dict, cfg: LlamaConfig, cos, sin, mask, int4):
    """One decoder layer: x + attention(rms_norm(x)), then + swiglu(rms_norm(x)). Returns (x, present k, present v)."""
    names = layer_names(i)
    nh, nkv, hs = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def heads(t, n):                                   # (B, T, n*hs) -> (B, n, T, hs)
        return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, hs])), perm=[0, 2, 1, 3])

    xn = rms_norm(g, x, g.weight(names["attn_norm"], np.asarray(w["attn_norm"], F32)), cfg.norm_eps)
    q = rope(g, heads(linear(g, xn, names["wq"], w["wq"], int4), nh), cos, sin, hs)
    k = rope(g, heads(linear(g, xn, names["wk"], w["wk"], int4), nkv), cos, sin, hs)
    v = heads(linear(g, xn, names["wv"], w["wv"], int4), nkv)
    k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, name=f"present.{i}.key")       # (B, nkv, S, hs)
    v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, name=f"present.{i}.value")
    att = attention(g, q, k, v, mask, cfg)                                                    # (B, nh, T, hs)
    att = g.op("Reshape", g.op("Transpose", att, perm=[0, 2, 1, 3]), g.const([0, 0, nh * hs]))
    x = g.op("Add", x, linear(g, att, names["wo"], w["wo"], int4))
    xn = rms_norm(g, x, g.weight(names["ffn_norm"], np.asarray(w["ffn_norm"], F32)), cfg.norm_eps)
    hidden = swiglu(g, linear(g, xn, names["w_gate"], w["w_gate"], int4), linear(g, xn, names["w_up"], w["w_up"], int4))
    return g.op("Add", x, linear(g, hidden, names["w_down"], w["w_down"], int4))


def causal_padding_mask(g):
    """(B, 1, 1, T, S) additive mask: query t (at position S-T+t) sees key j if j <= S-T+t and attention_mask[b, j]."""
    S = g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0)
    T = g.op("Gather", g.op("Shape", "input_ids"), g.const(1), axis=0)
    k_pos = g.op("Range", g.const(0), S, g.const(1))                                          # (S,)
    q_pos = g.op("Range", g.op("Sub", S, T), S, g.const(1))                                   # (T,)
    causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, g.const([0])), g.op("Unsqueeze", q_pos, g.const([1])))
    keep = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2, 3])), to=9)       # (B, 1, 1, 1, S) bool
    seen = g.op("And", causal, keep)                                                          # (B, 1, 1, T, S)
    return g.op("Where", seen, g.const(0.0, F32), g.const(MASK_NEG, F32))


def decoder_graph(model: Llama, int4=False, max_len=None):
    """The whole decoder as an onnx.ModelProto: embedding, n_layers blocks, final norm, classifier."""
    onnx = require_onnx()
    cfg, W = model.config, model.weights
    check_static_rope(cfg)
    TP = onnx.TensorProto
    g = Graph("llama_ref_decoder")
    g.input("input_ids", TP.INT64, ["batch", "sequence"])
    g.input("attention_mask", TP.INT64, ["batch", "total_sequence"])
    g.input("position_ids", TP.INT64, ["batch", "sequence"])
    kv_shape = ["batch", cfg.n_kv_heads, "past_sequence", cfg.head_dim]
    for i in range(cfg.n_layers):
        g.input(f"past_key_values.{i}.key", TP.FLOAT, kv_shape)
        g.input(f"past_key_values.{i}.value", TP.FLOAT, kv_shape)

    cos_table, sin_table = rope_tables(cfg, max_len or cfg.max_seq_len)   # (L, hs/2)
    pos = "position_ids"
    cos = g.op("Unsqueeze", g.op("Gather", g.weight("rope.cos", cos_table), pos), g.const([1]))   # (B, 1, T, hs/2)
    sin = g.op("Unsqueeze", g.op("Gather", g.weight("rope.sin", sin_table), pos), g.const([1]))
    mask = causal_padding_mask(g)

    embed = np.asarray(W[MODEL_TENSORS["embed"][0]], F32)                                     # (V, C)
    x = g.op("Gather", g.weight(MODEL_TENSORS["embed"][0], embed), "input_ids", axis=0)        # (B, T, C)
    for i in range(cfg.n_layers):
        layer = {short: W[full] for short, full in layer_names(i).items()}
        x = block(g, i, x, layer, cfg, cos, sin, mask, int4)
    x = rms_norm(g, x, g.weight(MODEL_TENSORS["norm"][0], np.asarray(W[MODEL_TENSORS["norm"][0]], F32)), cfg.norm_eps)
    head = embed if cfg.tie_embeddings else np.asarray(W[MODEL_TENSORS["lm_head"][0]], F32)
    g.op("MatMul", x, g.weight("lm_head.weight.T", head.T), name="logits")                    # (B, T, V)

    g.output("logits", TP.FLOAT, ["batch", "sequence", cfg.vocab_size])
    present = ["batch", cfg.n_kv_heads, "total_sequence", cfg.head_dim]
    for i in range(cfg.n_layers):
        g.output(f"present.{i}.key", TP.FLOAT, present)
        g.output(f"present.{i}.value", TP.FLOAT, present)
    return g.model({"": OPSET, "com.microsoft": 1} if int4 else {"": OPSET})


def int4_reference(model: Llama) -> Llama:
    """Our NumPy W4 path with the int4 export's numbers: every block matmul as a W4Matrix (block 32, no activation
    rounding), embedding, norms and classifier float32."""
    cfg, out = model.config, dict(model.weights)
    for i in range(cfg.n_layers):
        for short, full in layer_names(i).items():
            if short in BLOCK_MATMULS:
                packed, scales = int4_blocks(full, out[full])
                out[full] = W4Matrix(packed, scales)
    return Llama(cfg, out)


# ------------------------------------------------------------------------------------------------
# The directory ONNX Runtime GenAI runs

def genai_config(cfg: LlamaConfig, max_length: int) -> dict:
    """genai_config.json: where the decoder's inputs/outputs are and how to search (greedy by default)."""
    return {
        "model": {
            "type": "llama", "vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len,
            "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.eos_id,
            "decoder": {
                "filename": "model.onnx", "session_options": {"log_id": "llama_ref", "provider_options": []},
                "head_size": cfg.head_dim, "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": max_length, "min_length": 0,
                   "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "num_return_sequences": 1},
    }


def hf_config(cfg: LlamaConfig) -> dict:
    """config.json of an export: the model's HF config (LlamaForCausalLM, model_type llama), which Optimum reads to
    know the library and the cache layout."""
    return cfg.to_hf()


def export_onnx(model: Llama, out, int4=False, tokenizer=None, force=False, max_length=None,
                chat_template=None) -> Path:
    """Write `out/`: model.onnx + model.onnx.data, genai_config.json, config.json and what travels with a model
    (model_files.companion_files: generation_config.json and, with a tokenizer (a .model path or its bytes), the
    tokenizer files; chat_template for a chat model), atomically: an existing directory is replaced only when the new
    one is whole (and only with force)."""
    onnx = require_onnx()
    out = check_output(out, force=force, kind="dir", inputs=inputs_of(model, tokenizer))
    if int4:
        check_int4_shapes(model.config)                            # before anything is built or written
    companions = companion_files(model.config, tokenizer, chat_template)
    proto = decoder_graph(model, int4=int4)
    max_length = max_length or model.config.max_seq_len
    with atomic_dir(out, force=force) as tmp:
        onnx.save_model(proto, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(model.config, max_length), indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
        for name, content in companions.items():
            (tmp / name).write_bytes(content)
    return Path(out)


# ------------------------------------------------------------------------------------------------
# Running it with onnxruntime (the proofs and the benchmark use these)

PROVIDERS = ("cpu", "qnn-htp")
QNN_INSTALL = "pip install onnxruntime-qnn==2.7.0 (or `make interop`, which installs every client)"
# What the QNN execution provider is given for the HTP backend, and why each option (measured with onnxruntime-qnn
# 2.7.0's Linux x86_64 simulator on the embedded model's graphs):
QNN_HTP_OPTIONS = {
    # the SoC the simulator stands in for: QNN's SoC id 60 is SC8380XP (Snapdragon X Elite, HTP v73). A phone's
    # backend reads its own chip; the simulator has none to read: without a SoC the EP leaves the Convs unplaced (it
    # turns them to NHWC, then refuses them), and with htp_arch alone graph finalization fails allocating memory
    "soc_model": "60",
    # that SoC's HTP generation, stated with it (the backend derives it from soc_model when given alone)
    "htp_arch": "73",
    # float operators (norms, RoPE, softmax, SiLU, the residual adds) run in float16: the backend's default, stated
    # because the bound tests/test_interop.py and chapter 13 put on the HTP's logits rests on it
    "enable_htp_fp16_precision": "1",
}


def session(path, threads=None, provider="cpu", qnn_options=None):
    """An onnxruntime InferenceSession for `path` (a model.onnx or a directory holding one).

    provider "cpu": ONNX Runtime's CPU kernels. "qnn-htp": the QNN execution provider (onnxruntime-qnn) on Qualcomm's
    HTP backend with QNN_HTP_OPTIONS (+ qnn_options, e.g. the EP's op trace) and CPU fallback disabled, so a node the
    HTP cannot take is an error naming it, never a silent CPU run; on Linux x86_64 the wheel's HTP simulator runs it."""
    require_onnx()
    import onnxruntime as ort
    if provider not in PROVIDERS:
        raise InputError(f"provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    path = Path(path)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    file = str(path / "model.onnx" if path.is_dir() else path)
    if provider == "cpu":
        return ort.InferenceSession(file, opts, providers=["CPUExecutionProvider"])
    devices, htp = qnn_htp_devices()
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    opts.add_provider_for_devices(devices, {"backend_path": htp, **QNN_HTP_OPTIONS, **(qnn_options or {})})
    return ort.InferenceSession(file, sess_options=opts)


def qnn_htp_devices():
    """(the QNN EP's devices, the path of its HTP backend library), registering onnxruntime-qnn's plugin once; an
    ExtraMissingError naming the install command where it or its HTP backend is missing."""
    import onnxruntime as ort
    try:
        import onnxruntime_qnn
    except ImportError:
        raise ExtraMissingError(f"the QNN HTP provider needs onnxruntime-qnn: {QNN_INSTALL}") from None
    htp = Path(onnxruntime_qnn.get_qnn_htp_path())
    if not htp.is_file():
        raise ExtraMissingError(f"onnxruntime-qnn has no HTP backend at {htp} (its Linux x86_64 and Windows wheels "
                                f"ship one): reinstall it, {QNN_INSTALL}")
    name = "QNNExecutionProvider"
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(name, onnxruntime_qnn.get_library_path())
    return [d for d in ort.get_ep_devices() if d.ep_name == name], str(htp)


def empty_past(cfg: LlamaConfig, batch=1) -> dict:
    z = np.zeros((batch, cfg.n_kv_heads, 0, cfg.head_dim), F32)
    return {f"past_key_values.{i}.{kind}": z for i in range(cfg.n_layers) for kind in ("key", "value")}


def run(sess, cfg: LlamaConfig, tokens, past=None):
    """One call: new tokens (B, T) after the past keys/values -> (logits (B, T, V), present dict as the next past)."""
    tokens = np.asarray(tokens, np.int64)
    past = past or empty_past(cfg, tokens.shape[0])
    P = past["past_key_values.0.key"].shape[2]
    B, T = tokens.shape
    feed = {"input_ids": tokens, "attention_mask": np.ones((B, P + T), np.int64),
            "position_ids": np.broadcast_to(np.arange(P, P + T, dtype=np.int64), (B, T)).copy(), **past}
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed)))
    present = {k.replace("present.", "past_key_values."): v for k, v in outs.items() if k.startswith("present.")}
    return outs["logits"], present


def greedy(sess, cfg: LlamaConfig, prompt_ids, n_new):
    """Greedy decoding through the ONNX graph with its KV cache: prefill the prompt, then one token per call."""
    logits, past = run(sess, cfg, [list(prompt_ids)])
    out = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits[0, -1])))
        logits, past = run(sess, cfg, [[out[-1]]], past)
    return out
