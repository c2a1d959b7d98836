"""The ONNX exports against our NumPy forward and against transformers: the decoder ONNX Runtime (GenAI) runs, its
int4 twin, and Qualcomm-style on-device graphs chained by the host loop. Needs the [onnx] extra (skipped without it).

Tolerances.
  * float32 export: ONNX Runtime's kernels sum in another order than NumPy/OpenBLAS: a few 1e-7 of the logits' scale
    measured (9e-7 on the embedded model). Bound: 1e-4 of the logit scale, the bound every engine comparison here uses;
    a wrong RoPE pair, head or mask gives errors of order 1e-1.
  * int4 export: MatMulNBits holds exactly our W4 codes and fp16-rounded scales, so it equals our W4 path to float
    rounding (1.2e-6 measured); same bound.
  * on-device graphs vs their NumPy twin (OnDeviceLlama with the same static int16 activation scales): float rounding
    before each int16 rounding can move a value by one int16 step, and that compounds over layers: <= 7e-4 of the
    logit scale measured on the embedded model; bound 5e-3. Greedy ids must be identical.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from llama_ref import ondevice_onnx as QO  # noqa: E402
from llama_ref import onnx_export as OX  # noqa: E402
from llama_ref import paths  # noqa: E402
from llama_ref.config import LlamaConfig  # noqa: E402
from llama_ref.errors import InputError  # noqa: E402
from llama_ref.generate import generate  # noqa: E402
from llama_ref.loader import read_checkpoint  # noqa: E402
from llama_ref.model import Llama  # noqa: E402
from llama_ref.ondevice import OnDeviceLlama  # noqa: E402
from llama_ref.tokenizer import Tokenizer  # noqa: E402
from conftest import MANIFEST, REPO, assert_error, cli, genai_greedy, rel_err, random_weights  # noqa: E402

REF_NAMES = list(MANIFEST["configs"])
BOUND = 1e-4
SMALL = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=96, max_seq_len=96)


@pytest.fixture(scope="module")
def embedded():
    config, weights = read_checkpoint()
    return Llama(config, weights)


@pytest.fixture(scope="module")
def embedded_onnx(embedded, tmp_path_factory):
    return OX.export_onnx(embedded, tmp_path_factory.mktemp("onnx") / "tinyworld", tokenizer=paths.DEFAULT_TOKENIZER)


# ------------------------------------------------------------------------------------------------
# float32: ONNX Runtime = transformers = ours, on every reference config

@pytest.mark.parametrize("name", REF_NAMES)
def test_float_export_equals_transformers_and_ours(name, tmp_path):
    config, weights = read_checkpoint(paths.REFERENCE_DIR / name)
    ref = dict(np.load(paths.REFERENCE_DIR / f"{name}.npz"))
    model = Llama(config, weights)
    if config.rope_scaling is not None and config.rope_scaling.kind == "dynamic":   # tables that change with length
        with pytest.raises(InputError, match="dynamic NTK"):
            OX.export_onnx(model, tmp_path / "m")
        assert not (tmp_path / "m").exists()
        return
    sess = OX.session(OX.export_onnx(model, tmp_path / "m"))
    tokens = ref["tokens"]                                                  # (B, T): batch, odd lengths
    logits, _ = OX.run(sess, config, tokens)
    assert rel_err(logits, ref["logits"]) <= BOUND, name                   # transformers' logits
    assert rel_err(logits, model.forward(tokens)) <= BOUND, name
    # the KV cache: the prompt in two calls gives the last logits of one call
    cut = tokens.shape[1] // 2 + 1
    _, past = OX.run(sess, config, tokens[:, :cut])
    rest, present = OX.run(sess, config, tokens[:, cut:], past)
    assert rel_err(rest, ref["logits"][:, cut:]) <= BOUND, name
    assert present["past_key_values.0.key"].shape == (tokens.shape[0], config.n_kv_heads, tokens.shape[1],
                                                      config.head_dim)


def test_float_export_layout_is_genai_and_optimum(embedded_onnx, embedded):
    import onnx
    m = onnx.load(str(embedded_onnx / "model.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    cfg = embedded.config
    assert inputs["input_ids"] == ["batch", "sequence"] and inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.0.key"] == ["batch", cfg.n_kv_heads, "past_sequence", cfg.head_dim]
    assert outputs["logits"] == ["batch", "sequence", cfg.vocab_size]
    assert outputs[f"present.{cfg.n_layers - 1}.value"] == ["batch", cfg.n_kv_heads, "total_sequence", cfg.head_dim]
    data = (embedded_onnx / "model.onnx.data").stat().st_size
    assert data > 0.9 * 4 * cfg.n_params() and (embedded_onnx / "model.onnx").stat().st_size < 2 ** 20   # external
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= \
        {p.name for p in embedded_onnx.iterdir()}


def test_onnx_runtime_genai_generator_greedy_equals_ours(embedded_onnx, embedded):
    og = pytest.importorskip("onnxruntime_genai")
    prompt = Tokenizer().encode("Once upon a time, Mia had a cat.", bos=True)
    theirs = genai_greedy(og, og.Model(str(embedded_onnx)), prompt, 64)
    assert theirs == generate(embedded, prompt, 64, stop_at_eos=False).ids


def test_tokenizer_json_encodes_as_sentencepiece(embedded_onnx):
    """tokenizer.json (merges derived from the piece scores) against the sentencepiece library, through Hugging Face's
    `tokenizers` where it is installed (the [reference] extra brings it). One difference is by design and left out:
    Hugging Face reads "<s>" / "</s>" typed in the text as the special tokens, sentencepiece as characters."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(embedded_onnx / "tokenizer.json"))
    sp = Tokenizer()
    texts = ["Mia has a cat. 1234567", "  two  spaces ", "Emoji 😀 and ünïcode", "[INST] <<SYS>>\nBe brief.\n"
             "<</SYS>>\n\nWhat is 12+35? [/INST] 47"]
    import gzip
    with gzip.open(paths.DATA_DIR / "corpus" / "val.jsonl.gz", "rt") as f:
        texts += [json.loads(line)["text"] for _, line in zip(range(300), f)]
    for t in texts:
        ids = hf.encode(t).ids
        assert ids == sp.encode(t, bos=True), t
        assert hf.decode(ids) == sp.decode(ids), t


# ------------------------------------------------------------------------------------------------
# int4: MatMulNBits = our W4 path

@pytest.mark.parametrize("tied,n_kv", [(False, 4), (True, 2), (False, 1)])     # MHA untied, GQA tied, MQA
def test_int4_export_equals_our_w4_path(tied, n_kv, tmp_path):
    cfg = SMALL.replace(tie_embeddings=tied, n_kv_heads=n_kv)
    model = Llama(cfg, random_weights(cfg, seed=3 + tied))
    sess = OX.session(OX.export_onnx(model, tmp_path / "i4", int4=True))
    ours = OX.int4_reference(model)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13))
    logits, _ = OX.run(sess, cfg, tokens)
    assert rel_err(logits, ours.forward(tokens)) <= BOUND
    assert rel_err(logits, model.forward(tokens)) > 1e-3           # it is 4-bit: not the float model
    assert OX.greedy(sess, cfg, tokens[0], 24) == generate(ours, tokens[0], 24, stop_at_eos=False).ids


def test_int4_export_of_the_embedded_model(embedded, tmp_path):
    sess = OX.session(OX.export_onnx(embedded, tmp_path / "i4", int4=True))
    ours = OX.int4_reference(embedded)
    prompt = Tokenizer().encode("Tom's favourite colour was", bos=True)
    logits, _ = OX.run(sess, embedded.config, [prompt])
    assert rel_err(logits, ours.forward(np.array([prompt]))) <= BOUND
    assert OX.greedy(sess, embedded.config, prompt, 64) == generate(ours, prompt, 64, stop_at_eos=False).ids


# ------------------------------------------------------------------------------------------------
# Qualcomm-style on-device graphs: 2 x parts static graphs, HTP ops only, the host loop = OnDeviceLlama = generate

@pytest.fixture(scope="module")
def device_export(embedded, tmp_path_factory):
    tok = Tokenizer()
    out = QO.export_qnn_onnx(embedded, tmp_path_factory.mktemp("qnn") / "dev", QO.calibration_prompts_for(tok),
                             n_parts=4, prompt_len=32, context=128)
    return out, json.loads((out / "ondevice.json").read_text())


def test_on_device_graphs_are_static_and_use_htp_ops_only(device_export):
    import onnx
    out, manifest = device_export
    census = QO.op_census(out)
    assert sorted(census) == sorted(f"part{p}_{k}.onnx" for p in range(4) for k in ("prompt", "token"))
    used = set().union(*census.values())
    assert used <= QO.HTP_OPS, used - QO.HTP_OPS
    assert {"Conv", "QuantizeLinear", "DequantizeLinear", "Softmax"} <= used and "Gemm" not in used
    for name in census:
        g = onnx.load(str(out / name)).graph
        for v in list(g.input) + list(g.output):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            assert all(isinstance(d, int) and d > 0 for d in dims), (name, v.name, dims)       # no dynamic axis
        int4 = [t for t in g.initializer if t.data_type == onnx.TensorProto.INT4]
        int8 = [t for t in g.initializer if t.data_type == onnx.TensorProto.INT8]
        assert int4, name                                                    # W4 block weights
        if name.startswith(("part0", "part3")):
            assert int8, name                                                # W8A16: embedding / classifier
        q16 = [n for n in g.node if n.op_type == "QuantizeLinear"]
        zero_points = {n.input[2] for n in q16}
        assert all(t.data_type == onnx.TensorProto.INT16 for t in g.initializer if t.name in zero_points)
    token = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
             for i in onnx.load(str(out / "part1_token.onnx")).graph.input}
    cfg = LlamaConfig.from_hf(manifest["config"])
    i = manifest["parts"][1][0]
    assert token[f"past_key.{i}"] == [cfg.n_kv_heads, cfg.head_dim, 127]    # keys stored transposed
    assert token[f"past_value.{i}"] == [cfg.n_kv_heads, 127, cfg.head_dim]


def test_every_conv_and_matmul_is_a_complete_qdq_unit(device_export):
    """The form the HTP runs in integers: each Conv and MatMul takes only DequantizeLinear outputs (weights and int16
    activations) and hands its output only to a QuantizeLinear; no weight DequantizeLinear feeds a float operator."""
    import onnx
    out, _ = device_export
    for name in sorted(p.name for p in out.glob("part*.onnx")):
        g = onnx.load(str(out / name)).graph
        producer = {o: n for n in g.node for o in n.output}
        consumers = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        weights = {t.name for t in g.initializer}
        units = [n for n in g.node if n.op_type in ("Conv", "MatMul")]
        assert units, name
        for n in units:
            assert all(producer[i].op_type == "DequantizeLinear" for i in n.input), (name, n.name)
            assert [c.op_type for c in consumers[n.output[0]]] == ["QuantizeLinear"], (name, n.name)
        for n in g.node:                                       # a dequantized weight goes into a Conv/Gather only
            if n.op_type == "DequantizeLinear" and n.input[0] in weights and n.input[0].endswith(".q"):
                assert {c.op_type for c in consumers[n.output[0]]} <= {"Conv", "Gather"}, (name, n.name)


def test_qnn_provider_names_what_to_install(tmp_path, device_export):
    out, _ = device_export
    code = ("import sys; sys.modules['onnxruntime_qnn'] = None; from llama_ref import onnx_export as OX; "
            f"OX.session({str(out / 'part1_token.onnx')!r}, provider='qnn-htp')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "ExtraMissingError" in proc.stderr
    assert "pip install onnxruntime-qnn==2.7.0" in proc.stderr and "make interop" in proc.stderr
    with pytest.raises(InputError, match="qnn-htp"):
        OX.session(out / "part1_token.onnx", provider="htp")


@pytest.mark.parametrize("text", ["Once upon a time, Mia had a cat.", "[INST] What does a cow say? [/INST]"])
def test_host_loop_over_the_graphs_equals_ondevice_and_generate(device_export, embedded, text):
    out, manifest = device_export
    prompt = Tokenizer().encode(text, bos=True)
    device = QO.OnnxOnDeviceLlama(out)
    ids, logits = device.generate(prompt, 64)
    qmodel = QO.quantized_for_device(embedded)
    twin = OnDeviceLlama(qmodel, 4, 32, 128, act_scales=manifest["activation_scales"])
    twin_ids, twin_logits = twin.generate(prompt, 64)
    assert ids == twin_ids
    assert max(rel_err(a, b) for a, b in zip(logits, twin_logits)) <= 5e-3
    assert ids == generate(qmodel, prompt, 64, stop_at_eos=False).ids         # our w4a16-g32 scheme, dynamic A16


def test_on_device_export_of_a_small_gqa_model(tmp_path):
    model = Llama(SMALL, random_weights(SMALL, seed=9, scale=0.2))
    rng = np.random.default_rng(1)
    cal = [list(rng.integers(0, SMALL.vocab_size, 40)) for _ in range(4)]
    out = QO.export_qnn_onnx(model, tmp_path / "q", cal, n_parts=3, prompt_len=12, context=40)
    prompt = [1, 5, 9, 33, 2, 70, 11]
    ids, _ = QO.OnnxOnDeviceLlama(out).generate(prompt, 20)
    scales = json.loads((out / "ondevice.json").read_text())["activation_scales"]
    twin = OnDeviceLlama(QO.quantized_for_device(model), 3, 12, 40, act_scales=scales)
    assert ids == twin.generate(prompt, 20)[0]


# ------------------------------------------------------------------------------------------------
# bad input: one error line, exit 2, nothing written

@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A reference config whose SwiGLU width (176) is no multiple of the int4 block (32)."""
    return paths.REFERENCE_DIR / "gqa"


def test_int4_blocks_that_do_not_divide_are_refused(odd_model, tmp_path):
    for fmt in ("onnx-int4", "qnn-onnx"):
        proc = cli("export", "--model", odd_model, "--format", fmt, "--out", tmp_path / fmt)
        assert_error(proc, "model.layers.0.mlp.down_proj.weight (and every layer's): 176 inputs are not a multiple")
        assert not (tmp_path / fmt).exists() and not list(tmp_path.iterdir())
    ok = cli("export", "--model", odd_model, "--format", "onnx", "--out", tmp_path / "f32")      # float32 is fine
    assert ok.returncode == 0, ok.stderr[-1000:]


def test_parts_beyond_the_layers_and_existing_output_are_refused(tmp_path):
    assert_error(cli("export", "--format", "qnn-onnx", "--parts", 7, "--out", tmp_path / "q"), "--parts 7")
    assert_error(cli("export", "--format", "qnn-onnx", "--parts", 0, "--out", tmp_path / "q"), "--parts: must be an integer >= 1; got '0'")   # the parser's range (test_cli_options)
    assert not (tmp_path / "q").exists()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "mine.txt").write_text("mine")
    assert_error(cli("export", "--format", "onnx", "--out", tmp_path / "keep"), "--force")
    assert (tmp_path / "keep" / "mine.txt").read_text() == "mine"


def test_missing_extra_names_the_install_command(tmp_path):
    code = ("import sys; sys.modules['onnx'] = None; from llama_ref.__main__ import main; "
            f"sys.exit(main(['export', '--format', 'onnx', '--out', {str(tmp_path / 'x')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=REPO)
    assert_error(proc, "pip install -e '.[onnx]'")
    assert not (tmp_path / "x").exists()
