"""Qualcomm's on-device Llama 2 recipe as real ONNX files: ondevice.py's rewrites, written as 2 x n_parts static graphs.

Chapter 13 builds the rewrites in NumPy (ondevice.py) and ends with these files. Each function below writes the nodes
of the ondevice.py function of the same name, so the two read side by side:

    rms_norm_nchw -> conv1x1 (W4 weights, A16 activations) -> single_head_attention -> conv_block -> part_graph
(RoPE and SwiGLU are onnx_export's: the same nodes on (T, hs) rows and (1, H, 1, T) images.)

For each part p (layers split evenly, as OnDeviceLlama.parts), two graphs with static shapes only:
    part{p}_prompt.onnx   the prompt processor: P tokens (left-padded), mask (P, P) -> the part's keys and values
    part{p}_token.onnx    the token generator: 1 token, past keys (nkv, hs, ctx-1) / values (nkv, ctx-1, hs) per
                          layer in -> only the new key (nkv, hs, 1) / value (nkv, 1, hs) out
Part 0 takes input_ids and holds the embedding; the last part holds the final norm and the classifier and gives
logits (T, V); the others take and give the hidden state as an image (1, C, 1, T). cos/sin (T, hs/2) and the additive
mask are inputs: the host computes them (OnDeviceLlama.prompt_inputs / generator_inputs), as on the phone.

W4A16 as QuantizeLinear/DequantizeLinear pairs, in the form Qualcomm's HTP runs: every Conv and MatMul inside one
complete QDQ unit (each input through a DequantizeLinear, the output through a QuantizeLinear), so it runs in integers;
a weight DequantizeLinear feeding a float operator is refused by the HTP.
    block weights   int4 codes, one fp16-rounded scale per 32 inputs (blocked DequantizeLinear): quant.quantize_w4's
                    numbers, so the float weights equal our w4a16-g32 scheme's exactly
    W8A16 exceptions the embedding and the classifier, int8 per output channel (our scheme's policy for them); the
                    embedding is gathered as integer codes and scaled after the lookup (`embedding`)
    activations     int16, one static scale per tensor, on the inputs and outputs of every Conv and MatMul
                    (ondevice.A16_SITES; ondevice.calibrate: 2x the largest |value| seen on calibration prompts / 32767).
                    Norms, RoPE, softmax, SiLU and the residual adds stay float (float16 on the HTP).
OnDeviceLlama(quantized_for_device(model), act_scales=...) is the NumPy twin of these graphs: same weights, same
static activation steps, so the logits agree to float rounding (float16 rounding on the HTP).

`OnnxOnDeviceLlama(dir, provider="cpu" | "qnn-htp")` is the host loop: OnDeviceLlama.generate's own code with the two
graphs replaced by the 2 x n_parts ONNX sessions chained part by part, on ONNX Runtime's CPU kernels or on the HTP
(onnx_export.session; `htp_placement` reads what the QNN EP reports it placed). Needs the `[onnx]` extra (and
onnxruntime-qnn for the HTP).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, InputError
from .inputs import read_json
from .output import atomic_dir, check_output, inputs_of
from .model import Llama
from .ondevice import CALIBRATION_TEXTS, OnDeviceLlama, calibrate, split_layers
from .model_files import companion_files
from .onnx_export import Graph, check_int4_shapes, check_static_rope, hf_config, require_onnx, rope, session, swiglu
from .quant import Int8Matrix, W4Matrix, quantize_model, unpack_w4
from .weights import MODEL_TENSORS, layer_names

F32 = np.float32
OPSET = 21                       # int4 tensors and blocked DequantizeLinear
SCHEME = "w4a16-g32"
# The op types these graphs may use, every one in ONNX Runtime's list of operators its QNN execution provider runs
# on Qualcomm's HTP (NPU) backend: https://onnxruntime.ai/docs/execution-providers/QNN-ExecutionProvider.html
# ("Supported ONNX operators"). tests/test_onnx.py checks every graph against it; tests/test_interop.py runs them on
# the HTP itself.
HTP_OPS = frozenset({"Add", "Concat", "Conv", "DequantizeLinear", "Div", "Gather", "MatMul", "Mul", "QuantizeLinear",
                     "ReduceMean", "Reshape", "Sigmoid", "Softmax", "Split", "Sqrt", "Sub", "Transpose", "Unsqueeze"})


# ------------------------------------------------------------------------------------------------
# The pieces of ondevice.py, as nodes

def qdq16(g, x, scale):
    """Activation x as int16 with a static scale, and back: what the device computes with."""
    s, zp = g.const(scale, F32), g.const(0, np.int16)
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, zp), s, zp)


def w4_kernel(g, name, w: W4Matrix, rows=slice(None)):
    """A W4 matrix's rows as a (out, in, 1, 1) conv kernel: int4 codes + blocked DequantizeLinear (block = group)."""
    import ml_dtypes
    codes = unpack_w4(w.packed[rows])                                   # (out, in) in [-8, 7]
    q = g.weight(name + ".q", codes[:, :, None, None].astype(ml_dtypes.int4))
    s = g.weight(name + ".scale", w.scales[rows].astype(F32)[:, :, None, None])
    return g.op("DequantizeLinear", q, s, axis=1, block_size=w.group)


def int8_kernel(g, name, w: Int8Matrix):
    """An int8 per-row matrix (V, C) as a (V, C, 1, 1) conv kernel, dequantized per output channel."""
    s = g.weight(name + ".scale", np.ascontiguousarray(w.scale.reshape(-1), F32))
    return g.op("DequantizeLinear", g.weight(name + ".q", w.q[:, :, None, None]), s, axis=0)


def embedding(g, name, w: Int8Matrix, ids):
    """Rows `ids` of an int8 per-row table (V, C), dequantized after the lookup: (T,) -> (T, C).

    The HTP's Gather takes a table with one scale for the whole tensor (a per-row scale cannot follow the rows it
    picks), so the int8 codes are gathered as integers (a QDQ unit with scale 1) and multiplied by their rows' scales,
    gathered beside them: the same numbers as dequantizing first."""
    one, z8, z16 = g.const(1.0, F32), g.const(0, np.int8), g.const(0, np.int16)
    codes = g.op("DequantizeLinear", g.weight(name + ".q", w.q), one, z8)
    picked = g.op("Gather", codes, ids, axis=0)                                   # (T, C) integers
    picked = g.op("DequantizeLinear", g.op("QuantizeLinear", picked, one, z16), one, z16)
    scales = g.op("Gather", g.weight(name + ".scale", np.ascontiguousarray(w.scale, F32)), ids, axis=0)   # (T, 1)
    return g.op("Mul", picked, scales)


def rms_norm_nchw(g, x, weight, eps):
    """RMSNorm over the channel axis of (1, C, 1, T)."""
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([1]), keepdims=1)
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.const(eps, F32)))),
                g.weight(g.fresh("norm"), np.asarray(weight, F32)[None, :, None, None]))


def conv1x1(g, x, kernel, a16, name_in, name_out):
    """A Linear as a 1x1 Conv inside one complete QDQ unit: int16 input (scale of `name_in`), dequantized weights,
    int16 output (`name_out`): (1, Cin, 1, T) -> (1, Cout, 1, T)."""
    return a16(g.op("Conv", a16(x, name_in), kernel), name_out)


def matmul(g, a, b, a16, name_a, name_b, name_out):
    """An activation x activation MatMul inside one QDQ unit: both inputs and the output int16."""
    return a16(g.op("MatMul", a16(a, name_a), a16(b, name_b)), name_out)


def single_head_attention(g, x, i, W, cfg: LlamaConfig, T, a16, past=None):
    """nh single-head attentions on x (1, C, 1, T). Returns (out (1, C, 1, T), new keys (nkv, hs, T), values
    (nkv, T, hs)); past = (past keys name (nkv, hs, S0), past values name (nkv, S0, hs)) for the token generator."""
    names, hs, rep, n = layer_names(i), cfg.head_dim, cfg.n_rep, f"layers.{i}"

    def rows(t):                                        # (1, hs, 1, T) -> (T, hs)
        return g.op("Transpose", g.op("Reshape", t, g.const([hs, T])), perm=[1, 0])

    def head_conv(short, h, out_name):                  # head h's rows of a q/k/v weight as its own conv
        kernel = w4_kernel(g, f"{names[short]}.head{h}", W[short], slice(h * hs, (h + 1) * hs))
        return rows(conv1x1(g, x, kernel, a16, f"{n}.attn_norm", out_name))

    new_k, new_v, keys, vals = [], [], [], []
    for j in range(cfg.n_kv_heads):
        new_k.append(g.op("Transpose", rope(g, head_conv("wk", j, f"{n}.attn.k"), "cos", "sin", hs), perm=[1, 0]))
        new_v.append(head_conv("wv", j, f"{n}.attn.v"))                                         # (hs, T), (T, hs)
        if past is None:
            keys.append(new_k[j])
            vals.append(new_v[j])
        else:
            keys.append(g.op("Concat", g.op("Gather", past[0], g.const(j), axis=0), new_k[j], axis=1))   # (hs, S)
            vals.append(g.op("Concat", g.op("Gather", past[1], g.const(j), axis=0), new_v[j], axis=0))   # (S, hs)
    heads = []
    for h in range(cfg.n_heads):
        j = h // rep
        q = g.op("Mul", rope(g, head_conv("wq", h, f"{n}.attn.q"), "cos", "sin", hs), g.const(1.0 / np.sqrt(hs), F32))
        scores = g.op("Add", matmul(g, q, keys[j], a16, f"{n}.attn.q_rope", f"{n}.attn.k_rope", f"{n}.attn.scores"),
                      "mask")
        heads.append(matmul(g, g.op("Softmax", scores, axis=-1), vals[j], a16, f"{n}.attn.probs", f"{n}.attn.v",
                            f"{n}.attn.heads"))                                                    # (T, hs)
    y = g.op("Reshape", g.op("Transpose", g.op("Concat", *heads, axis=1), perm=[1, 0]),
             g.const([1, cfg.n_heads * hs, 1, T]))                                              # (1, nh*hs, 1, T)
    out = conv1x1(g, y, w4_kernel(g, names["wo"], W["wo"]), a16, f"{n}.attn.heads", f"{n}.attn.out")
    stack_k = g.op("Concat", *[g.op("Unsqueeze", k, g.const([0])) for k in new_k], axis=0)
    stack_v = g.op("Concat", *[g.op("Unsqueeze", v, g.const([0])) for v in new_v], axis=0)
    return out, stack_k, stack_v


def conv_block(g, x, i, W, cfg: LlamaConfig, T, a16, past=None):
    """One block on (1, C, 1, T), convs only. Returns (x, new keys, new values)."""
    names, n = layer_names(i), f"layers.{i}"
    attn, k, v = single_head_attention(g, rms_norm_nchw(g, x, W["attn_norm"], cfg.norm_eps), i, W, cfg, T, a16,
                                       past)
    h = g.op("Add", x, attn)
    hn = rms_norm_nchw(g, h, W["ffn_norm"], cfg.norm_eps)
    gate = conv1x1(g, hn, w4_kernel(g, names["w_gate"], W["w_gate"]), a16, f"{n}.ffn_norm", f"{n}.ffn.gate")
    up = conv1x1(g, hn, w4_kernel(g, names["w_up"], W["w_up"]), a16, f"{n}.ffn_norm", f"{n}.ffn.up")
    hidden = swiglu(g, gate, up)                                                                   # (1, H, 1, T)
    down = conv1x1(g, hidden, w4_kernel(g, names["w_down"], W["w_down"]), a16, f"{n}.ffn.hidden", f"{n}.ffn.out")
    return g.op("Add", h, down), k, v


def part_graph(qmodel: Llama, p: int, layers: list[int], last: bool, kind: str, T: int, S: int, scales: dict):
    """Part p as one static graph: kind "prompt" (T = P tokens, S = P) or "token" (T = 1, S = context)."""
    onnx = require_onnx()
    TP = onnx.TensorProto
    cfg, Wall = qmodel.config, qmodel.weights
    C, hs, nkv = cfg.dim, cfg.head_dim, cfg.n_kv_heads
    g = Graph(f"part{p}_{kind}")

    def a16(x, name):                                   # the tensor `name` of ondevice.A16_SITES through int16
        return qdq16(g, x, scales[name])

    if p == 0:
        g.input("input_ids", TP.INT64, [T])
        x = embedding(g, MODEL_TENSORS["embed"][0], Wall[MODEL_TENSORS["embed"][0]], "input_ids")   # (T, C)
        x = g.op("Reshape", g.op("Transpose", x, perm=[1, 0]), g.const([1, C, 1, T]))           # (1, C, 1, T)
    else:
        x = g.input("hidden_in", TP.FLOAT, [1, C, 1, T])
    g.input("cos", TP.FLOAT, [T, hs // 2])
    g.input("sin", TP.FLOAT, [T, hs // 2])
    g.input("mask", TP.FLOAT, [T, S])
    outs = []
    for i in layers:
        W = {short: Wall[full] for short, full in layer_names(i).items()}
        past = None
        if kind == "token":
            past = (g.input(f"past_key.{i}", TP.FLOAT, [nkv, hs, S - 1]),
                    g.input(f"past_value.{i}", TP.FLOAT, [nkv, S - 1, hs]))
        x, k, v = conv_block(g, x, i, W, cfg, T, a16, past)
        outs += [(k, f"key.{i}", [nkv, hs, T]), (v, f"value.{i}", [nkv, T, hs])]
    if last:
        xn = rms_norm_nchw(g, x, Wall[MODEL_TENSORS["norm"][0]], cfg.norm_eps)
        head = MODEL_TENSORS["embed" if cfg.tie_embeddings else "lm_head"][0]
        y = conv1x1(g, xn, int8_kernel(g, head, Wall[head]), a16, "norm.out", "logits")   # (1, V, 1, T)
        g.rename(g.op("Transpose", g.op("Reshape", y, g.const([cfg.vocab_size, T])), perm=[1, 0]), "logits")
        g.output("logits", TP.FLOAT, [T, cfg.vocab_size])
    else:
        g.rename(x, "hidden")
        g.output("hidden", TP.FLOAT, [1, C, 1, T])
    for tensor, out_name, out_shape in outs:
        g.rename(tensor, out_name)
        g.output(out_name, TP.FLOAT, out_shape)
    return g.model({"": OPSET})


# ------------------------------------------------------------------------------------------------
# Export and the host loop

def quantized_for_device(model: Llama) -> Llama:
    """The model with our w4a16-g32 scheme's weights (W4 block matmuls, int8 embedding and classifier)."""
    return quantize_model(model, SCHEME)


def calibration_prompts_for(tokenizer, texts=CALIBRATION_TEXTS, max_len=None) -> list[list[int]]:
    """Token ids of the calibration texts (BOS first), each cut to max_len."""
    return [tokenizer.encode(t, bos=True)[:max_len] for t in texts]


def export_qnn_onnx(model: Llama, out, calibration_prompts, n_parts=4, prompt_len=None, context=None,
                    tokenizer=None, force=False, chat_template=None) -> Path:
    """Write out/: part{p}_prompt.onnx and part{p}_token.onnx for every part, ondevice.json (shapes, parts, activation
    scales), config.json and what travels with a model (model_files.companion_files: with a tokenizer its files, the
    chat template of a chat model). calibration_prompts: lists of ids (calibration_prompts_for).
    Atomic: an existing directory is replaced whole, and only with force."""
    onnx = require_onnx()
    cfg = model.config
    out = check_output(out, force=force, kind="dir", inputs=inputs_of(model, tokenizer))
    check_static_rope(cfg)
    parts = split_layers(cfg.n_layers, n_parts)
    prompt_len, context = prompt_len or min(cfg.max_seq_len, 64), context or cfg.max_seq_len
    if prompt_len > context:
        raise InputError(f"prompt length {prompt_len} exceeds the context {context}")
    check_int4_shapes(cfg)
    companions = companion_files(cfg, tokenizer, chat_template)
    qmodel = quantized_for_device(model)
    scales = calibrate(qmodel, calibration_prompts)
    graphs = {}
    for p, layers in enumerate(parts):
        last = p == len(parts) - 1
        graphs[f"part{p}_prompt.onnx"] = part_graph(qmodel, p, layers, last, "prompt", prompt_len, prompt_len, scales)
        graphs[f"part{p}_token.onnx"] = part_graph(qmodel, p, layers, last, "token", 1, context, scales)
    manifest = {"config": cfg.to_hf(), "parts": parts, "prompt_len": prompt_len, "context": context,
                "scheme": SCHEME, "activation_scales": scales, "graphs": sorted(graphs)}
    with atomic_dir(out, force=force) as tmp:
        for name, proto in graphs.items():
            onnx.save_model(proto, str(tmp / name))
        (tmp / "ondevice.json").write_text(json.dumps(manifest, indent=1))
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
        for name, content in companions.items():
            (tmp / name).write_bytes(content)
    return Path(out)


class OnnxOnDeviceLlama(OnDeviceLlama):
    """OnDeviceLlama's host loop (prompt_inputs, generator_inputs, the cache shift in generate) driving the exported
    graphs: each of its two graphs is n_parts ONNX sessions run in sequence, the hidden state handed on."""

    def __init__(self, path, threads=None, provider="cpu", op_trace_dir=None):
        require_onnx()
        path = Path(path)
        try:
            manifest = read_json(path / "ondevice.json", "on-device manifest")
        except CheckpointError as e:
            raise CheckpointError(f"{path} is not an on-device export ({e}); write one with "
                                  "`python -m llama_ref export --format qnn-onnx --out DIR`") from None
        cfg = LlamaConfig.from_hf(manifest["config"])
        self.set_host(cfg, len(manifest["parts"]), manifest["prompt_len"], manifest["context"])
        self.sessions = {}
        for name in manifest["graphs"]:
            trace = None if op_trace_dir is None else {"enable_framework_op_trace": "1",
                                                       "framework_op_trace_dir": str(Path(op_trace_dir) / name)}
            self.sessions[name] = session(path / name, threads, provider, trace)

    def _run_parts(self, kind, tokens, cos, sin, mask, past_k=None, past_v=None):
        h, ks, vs = None, [], []
        for p, layers in enumerate(self.parts):
            feed = {"cos": cos, "sin": sin, "mask": mask}
            feed.update({"input_ids": np.asarray(tokens, np.int64)} if p == 0 else {"hidden_in": h})
            if kind == "token":
                feed.update({f"past_key.{i}": past_k[i] for i in layers})
                feed.update({f"past_value.{i}": past_v[i] for i in layers})
            sess = self.sessions[f"part{p}_{kind}.onnx"]
            names = [o.name for o in sess.get_outputs()]
            outs = dict(zip(names, sess.run(names, feed)))
            h = outs["logits"] if p == len(self.parts) - 1 else outs["hidden"]
            ks += [outs[f"key.{i}"] for i in layers]
            vs += [outs[f"value.{i}"] for i in layers]
        return h, ks, vs

    def prompt_processor(self, tokens, cos, sin, mask):
        return self._run_parts("prompt", tokens, cos, sin, mask)

    def token_generator(self, token, cos, sin, mask, past_k, past_v):
        logits, ks, vs = self._run_parts("token", token, cos, sin, mask, past_k, past_v)
        return logits[0], ks, vs


def htp_placement(op_trace_dir) -> dict:
    """{graph: what the QNN EP reports it placed}, read from the framework op traces OnnxOnDeviceLlama(...,
    op_trace_dir=) made the EP write: the ONNX nodes it took and left, the QNN subgraphs, the target it compiled for,
    how many QNN ops of each type it built, and how many Conv2d/MatMul it built from a complete QDQ unit (int16
    inputs dequantized, the output quantized: the form that runs in integers)."""
    out = {}
    for trace in sorted(Path(op_trace_dir).glob("*/qnn_op_trace*.json")):
        d = json.loads(trace.read_text())
        counts, units = {}, 0
        for sub in d["subgraph_traces"]:
            for m in sub["op_mappings"]:
                counts[m["dst_qnn_op_type"]] = counts.get(m["dst_qnn_op_type"], 0) + 1
                ops = [src["name"] for src in m["sources"] if src["type"] == "OP"]
                dq = sum("DequantizeLinear" in o for o in ops)
                q = sum("QuantizeLinear" in o and "DequantizeLinear" not in o for o in ops)
                units += m["dst_qnn_op_type"] in ("Conv2d", "MatMul") and dq >= 2 and q >= 1
        s = d["summary"]
        out[trace.parent.name] = {"onnx_nodes": s["total_onnx_nodes"], "on_htp": s["supported_nodes"],
                                  "not_on_htp": s["unsupported_nodes"], "qnn_subgraphs": s["qnn_subgraphs"],
                                  "target": d["soc_traces"][0]["compilation_target"],
                                  "qnn_ops": dict(sorted(counts.items())),
                                  "quantized_conv_matmul": units}
    return out


def op_census(path) -> dict:
    """{graph file: {op type: count}} of an on-device export."""
    onnx = require_onnx()
    out = {}
    for f in sorted(Path(path).glob("part*.onnx")):
        counts = {}
        for node in onnx.load(str(f), load_external_data=False).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        out[f.name] = dict(sorted(counts.items()))
    return out

