"""Our files, unchanged, in the tools people run them with, each compared with our ids exactly.

Every file here is written by the CLI (`python -m llama_ref export/quantize`) into a temporary directory, from the
shipped models; then the client itself reads it the way its users do:

    transformers 4.57 and 5.x   AutoTokenizer.from_pretrained(dir): encode, decode, apply_chat_template
    llama-cpp-python            Llama(gguf).create_chat_completion: the prompt its chat path builds, the greedy reply
    llama.cpp's own formatter   llama_chat_apply_template (what llama-server uses without --jinja)
    Optimum                     ORTModelForCausalLM.from_pretrained(onnx dir), float32 and int4: greedy ids
    ONNX Runtime GenAI          og.Tokenizer: apply_chat_template + encode, and the documented calls where it differs
    QNN HTP (onnxruntime-qnn)   the 8 qnn-onnx graphs on the HTP backend, CPU fallback off: the host loop's greedy
                                ids equal the NumPy twin's, logits within a bound derived from float16 (see below)

A client that is not installed skips its tests with the command that installs it (`make interop` installs them all:
.venv-interop holds transformers 4.57, Optimum, onnxruntime-qnn, llama-cpp-python and GenAI; .venv-interop-tf5 holds
transformers 5, whose tests run there as a subprocess). Expected tokenizer ids come from the sentencepiece library;
expected chat ids from chat.format_dialog, which tests/test_chat.py pins to Meta's per-turn strings.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from llama_ref import paths
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE, format_dialog
from llama_ref.generate import generate
from llama_ref.loader import load
from llama_ref.tokenizer import Tokenizer
from conftest import cli, genai_greedy  # noqa: E402
from test_chat import EDGE_DIALOGUES, META_EXAMPLES, OUR_EXAMPLES  # noqa: E402
from test_tokenizer import HARD_STRINGS  # noqa: E402

REPO = paths.REPO_DIR
MAKE = "make interop"
PIP = {"transformers4": "transformers==4.57.6", "transformers5": "transformers==5.23.0",
       "llama_cpp": "llama-cpp-python==0.3.36 (built with the CMAKE_ARGS in the README)",
       "optimum": "torch==2.13.0 first, then optimum-onnx==0.1.0", "onnxruntime_genai": "onnxruntime-genai==0.18.0",
       "onnxruntime_qnn": "onnxruntime-qnn==2.7.0"}
SP = spm.SentencePieceProcessor(model_file=str(paths.DEFAULT_TOKENIZER))
TOK = Tokenizer(paths.DEFAULT_TOKENIZER)
PROMPT_DIALOGS = [d for d, _ in META_EXAMPLES + OUR_EXAMPLES] + [d for d in EDGE_DIALOGUES if d[-1]["role"] == "user"]
TEXTS = HARD_STRINGS


def client(module, key=None):
    """Import a client or skip, naming the command that installs it."""
    return pytest.importorskip(module, reason=f"{module} is not installed: run `{MAKE}` "
                                              f"(or pip install {PIP[key or module]})")


def write(*args):
    """`python -m llama_ref ARGS`, which must succeed: the files every test here reads are written this way."""
    proc = cli(*args, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-1500:]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What the CLI writes from the shipped chat model: GGUF f32 and Q8_0, ONNX float32 and int4 directories."""
    d = tmp_path_factory.mktemp("cli")
    chat = paths.CHAT_BASELINE_MODEL
    for fmt in ("gguf-f32", "gguf-q8_0"):
        write("export", "--model", chat, "--format", fmt, "--out", d / f"chat-{fmt}.gguf")
    for fmt in ("onnx", "onnx-int4"):
        write("export", "--model", chat, "--format", fmt, "--out", d / f"chat-{fmt}")
    return d


def sp_ids(text, bos=True):
    return ([SP.bos_id()] if bos else []) + SP.encode(text)


# ------------------------------------------------------------------------------------------------
# transformers 4.x and 5.x: AutoTokenizer on the directories we write

TRANSFORMERS_CLIENT = r"""
import json, sys
import transformers
from transformers import AutoTokenizer
req = json.load(sys.stdin)
out = {"version": transformers.__version__}
for name, d in req["dirs"].items():
    tok = AutoTokenizer.from_pretrained(d)
    chat = []
    for dialog in req["dialogs"]:
        ids = tok.apply_chat_template(dialog, tokenize=True)
        chat.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    out[name] = {
        "class": type(tok).__name__,
        "encode": [tok(t, split_special_tokens=True)["input_ids"] for t in req["texts"]],
        "encode_default": [tok(t)["input_ids"] for t in req["texts"]],
        "decode": [tok.decode(ids, skip_special_tokens=True) for ids in req["ids"]],
        "chat": chat, "template": tok.chat_template}
print(json.dumps(out))
"""


def transformers_pythons():
    """{major version: interpreter} for the transformers installs `make interop` made (this one and the tf5 env)."""
    found = {}
    for py in (sys.executable, str(REPO / ".venv-interop-tf5" / "bin" / "python")):
        if not Path(py).exists():
            continue
        proc = subprocess.run([py, "-c", "import transformers; print(transformers.__version__)"], capture_output=True,
                              text=True)
        if proc.returncode == 0:
            found.setdefault(proc.stdout.strip().split(".")[0], py)
    return found


def run_transformers(python, dirs, dialogs=(), texts=(), ids=()):
    req = {"dirs": {k: str(v) for k, v in dirs.items()}, "dialogs": list(dialogs), "texts": list(texts),
           "ids": list(ids)}
    proc = subprocess.run([python, "-c", TRANSFORMERS_CLIENT], input=json.dumps(req), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["4", "5"])
def transformers_python(request):
    py = transformers_pythons().get(request.param)
    if py is None:
        pytest.skip(f"transformers {request.param}.x is not installed: run `{MAKE}` "
                    f"(or pip install {PIP['transformers' + request.param]} into its own environment)")
    return py


def test_autotokenizer_gives_sentencepiece_ids_and_decodes_back(transformers_python, files):
    """The shipped chat model and the ONNX export, in transformers 4.57 and 5.x: every hard text to sentencepiece's
    ids (BOS first) and back. split_special_tokens=True is the call that treats "<s>" typed in a text as text, as
    SentencePiece does; without it transformers reads it as the BOS token (pinned below)."""
    dirs = {"shipped": paths.CHAT_BASELINE_MODEL, "onnx": files / "chat-onnx"}
    expected = [sp_ids(t) for t in TEXTS]
    out = run_transformers(transformers_python, dirs, texts=TEXTS, ids=expected)
    for name in dirs:
        got = out[name]
        assert got["class"] in ("PreTrainedTokenizerFast", "TokenizersBackend")     # 5.x names its fast class so
        bad = [t for t, a, b in zip(TEXTS, got["encode"], expected) if a != b]
        assert not bad, (out["version"], name, bad[:3])
        assert got["decode"] == [SP.decode(e) for e in expected], out["version"]
        differ = [t for t, a, b in zip(TEXTS, got["encode_default"], expected) if a != b]
        assert differ == ["<s>not a control token</s> <unk> <0x41>"], (out["version"], differ)


def test_apply_chat_template_gives_our_chat_ids(transformers_python):
    out = run_transformers(transformers_python, {"chat": paths.CHAT_BASELINE_MODEL}, dialogs=PROMPT_DIALOGS)
    assert out["chat"]["template"] == LLAMA2_CHAT_TEMPLATE
    for dialog, ids in zip(PROMPT_DIALOGS, out["chat"]["chat"]):
        assert ids == format_dialog(dialog, TOK), (out["version"], dialog)


def test_why_the_tokenizer_class_is_pretrainedtokenizerfast(transformers_python, tmp_path):
    """The alternative, measured: naming LlamaTokenizerFast makes transformers 5 build its own Llama tokenizer instead
    of reading tokenizer.json (texts of leading spaces lose a "▁"; every chat prompt differs), while 4.57 reads the
    file either way. "legacy": false, tried on top, changes nothing in either version with tokenizer.json present."""
    variants = {}
    for name, change in {"llama_fast": {"tokenizer_class": "LlamaTokenizerFast"},
                         "legacy_false": {"tokenizer_class": "LlamaTokenizerFast", "legacy": False}}.items():
        d = tmp_path / name
        d.mkdir()
        for f in ("tokenizer.json", "tokenizer.model"):
            (d / f).write_bytes((paths.CHAT_BASELINE_MODEL / f).read_bytes())
        cfg = json.loads((paths.CHAT_BASELINE_MODEL / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, **change}))
        variants[name] = d
    out = run_transformers(transformers_python, variants, texts=TEXTS, dialogs=PROMPT_DIALOGS)
    v5 = out["version"].startswith("5.")
    for name in variants:
        texts = [t for t, a in zip(TEXTS, out[name]["encode"]) if a != sp_ids(t)]
        chats = [d for d, a in zip(PROMPT_DIALOGS, out[name]["chat"]) if a != format_dialog(d, TOK)]
        if v5:
            assert texts and all(t[:1] in (" ", "\u2581") for t in texts), (name, texts)
            assert len(chats) == len(PROMPT_DIALOGS), name
        else:
            assert not texts and not chats, (out["version"], name)


# ------------------------------------------------------------------------------------------------
# llama-cpp-python: the chat path on the GGUF of a chat model

def chat_prompt_and_reply(llm, dialog, max_tokens):
    """The ids llama-cpp-python's chat path evaluates: the prompt it builds, then the greedy reply."""
    llm.reset()
    out = llm.create_chat_completion(messages=dialog, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
    n_prompt = out["usage"]["prompt_tokens"]
    evaluated = [int(t) for t in llm.input_ids[:llm.n_tokens]]
    return evaluated[:n_prompt], out


@pytest.mark.parametrize("fmt", ["gguf-f32", "gguf-q8_0"])
def test_llama_cpp_chat_builds_our_prompt_and_replies_our_greedy_ids(files, fmt):
    llama_cpp = client("llama_cpp")
    path = files / f"chat-{fmt}.gguf"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0, n_threads=2)
    assert llm.metadata["tokenizer.chat_template"] == LLAMA2_CHAT_TEMPLATE
    ours = load(path)
    for dialog in PROMPT_DIALOGS:
        prompt, out = chat_prompt_and_reply(llm, dialog, 24)
        assert prompt == format_dialog(dialog, TOK), dialog
        if fmt == "gguf-f32":                   # llama.cpp rounds activations to 8 bits for Q8_0 dot products
            reply = generate(ours, prompt, 24, temperature=0).ids
            text = TOK.decode([t for t in reply if t != TOK.eos_id]).strip()
            assert out["choices"][0]["message"]["content"].strip() == text, dialog


def test_llama_cpp_builtin_formatter_detects_llama2_but_renders_finished_turns_its_own_way():
    """llama.cpp's built-in formatter (llama-server and llama-cli without --jinja) recognises our template as its
    llama2 family (llm_chat_detect_template: "[INST]", "<<SYS>>", "content.strip()"), not ChatML. It gives our ids for
    a prompt of one user turn (with or without a system message, when no text is empty or has outer whitespace: it
    strips each text alone, Meta strips the merged system + user text); for earlier finished turns it writes "[/INST]answer</s>[INST]" without the spaces
    and the BOS Meta's format has, so multi-turn prompts differ: use the template itself (llama-cpp-python's chat
    path above, llama-server --jinja)."""
    llama_cpp = client("llama_cpp")
    import ctypes

    def builtin(dialog):
        msgs = (llama_cpp.llama_chat_message * len(dialog))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in dialog])
        buf = ctypes.create_string_buffer(8192)
        n = llama_cpp.llama_chat_apply_template(LLAMA2_CHAT_TEMPLATE.encode(), msgs, len(dialog), True, buf, 8192)
        assert n > 0
        return buf.raw[:n].decode()

    for dialog in PROMPT_DIALOGS:
        text = builtin(dialog)
        ids = [SP.bos_id()] + SP.encode(text)          # llama.cpp adds BOS, then encodes the text
        one_turn = len([m for m in dialog if m["role"] == "user"]) == 1
        stripped = all(m["content"] == m["content"].strip() != "" for m in dialog)   # it strips each text alone
        if one_turn and stripped:
            assert ids == format_dialog(dialog, TOK), (dialog, text)
        elif not one_turn:
            assert ids != format_dialog(dialog, TOK), (dialog, text)
    assert "<|im_start|>" not in builtin(PROMPT_DIALOGS[0])


# ------------------------------------------------------------------------------------------------
# Optimum: ORTModelForCausalLM.from_pretrained on the ONNX export as it is

@pytest.mark.parametrize("fmt", ["onnx", "onnx-int4"])
def test_optimum_loads_the_export_and_gives_our_greedy_ids(files, fmt):
    client("torch", "optimum")
    ort_models = client("optimum.onnxruntime", "optimum")
    import torch
    model = ort_models.ORTModelForCausalLM.from_pretrained(str(files / f"chat-{fmt}"))
    ours = load(paths.CHAT_BASELINE_MODEL)
    if fmt == "onnx-int4":
        from llama_ref.onnx_export import int4_reference
        ours = int4_reference(ours)
    for dialog in PROMPT_DIALOGS[:5]:
        prompt = format_dialog(dialog, TOK)
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=TOK.eos_id)
        assert out[0, len(prompt):].tolist() == generate(ours, prompt, 30, temperature=0, stop_at_eos=False).ids


# ------------------------------------------------------------------------------------------------
# ONNX Runtime GenAI's tokenizer and chat template

GENAI_DIFFERS = {   # plain texts GenAI's own tokenizer encodes differently (add_special_tokens="true"), and why
    "[INST] <<SYS>>\nSpeak like a pirate.\n<</SYS>>\n\nHi! [/INST] Arr. ": "the pre-split at newlines: no '.\\n<</'",
    "<s>not a control token</s> <unk> <0x41>": "special tokens typed in the text are read as special tokens",
    "\u2581already\u2581escaped \u2581\u2581": "a typed '▁' is read as an escaped space",
    "\x00\x01\x7f\x1b[0m": "the text ends at the NUL byte (a C string)",
}


def test_genai_chat_template_and_tokenizer(files):
    """og.Tokenizer reads the template from tokenizer_config.json. GenAI opens tokenizers with add_special_tokens
    false: the rendered prompt carries its own "<s>", so chat prompts need nothing, and a plain text needs
    update_options(add_special_tokens="true") for its BOS. Its tokenizer splits text at newlines before BPE
    (onnxruntime-extensions' Llama pre-split), so a piece with text on both sides of a newline, ".\\n<</" at the end
    of a system message here, is never produced; no option changes that. For those prompts (and the other texts of
    GENAI_DIFFERS) the agreeing call is SentencePiece on the exported tokenizer.model, the ids handed to GenAI:
    generator.append_tokens(chat.format_dialog(dialog, Tokenizer(export_dir / "tokenizer.model")))."""
    og = client("onnxruntime_genai")
    d = files / "chat-onnx"
    model = og.Model(str(d))
    tokenizer = og.Tokenizer(model)
    spanning = {i for i in range(SP.get_piece_size()) if re.search("[^\n]\n+[^\n]", SP.id_to_piece(i))}
    assert [SP.id_to_piece(i) for i in spanning] == [".\n<</"]           # the one such piece in our vocabulary
    ours_from_export = Tokenizer(d / "tokenizer.model")
    for dialog in PROMPT_DIALOGS:
        text = tokenizer.apply_chat_template(json.dumps(dialog), add_generation_prompt=True)
        ours = format_dialog(dialog, TOK)
        genai = [int(t) for t in tokenizer.encode(text)]
        assert (genai == ours) == (not spanning & set(ours)), (dialog, genai, ours)
        assert format_dialog(dialog, ours_from_export) == ours                # the agreeing call's ids
    prompt = format_dialog(PROMPT_DIALOGS[-1], ours_from_export)                    # GenAI takes them as they are
    reply = genai_greedy(og, model, prompt, 16)
    assert reply == generate(load(paths.CHAT_BASELINE_MODEL), prompt, 16).ids         # both stop at </s>
    tokenizer.update_options(add_special_tokens="true")
    differ = [t for t in TEXTS if [int(i) for i in tokenizer.encode(t)] != sp_ids(t)]
    assert set(differ) == set(GENAI_DIFFERS), differ
    for text in TEXTS:
        if text and text not in GENAI_DIFFERS:
            assert tokenizer.decode(sp_ids(text)) == SP.decode(sp_ids(text)), text


# ------------------------------------------------------------------------------------------------
# Qualcomm's HTP: the qnn-onnx graphs in onnxruntime's QNN execution provider, CPU fallback disabled

HTP_PROMPTS = ("Once upon a time, there was a happy girl named", "[INST] What does a cow say? [/INST]")
HTP_NEW_TOKENS = 32
# The HTP runs the float ops between quantized units (norms, RoPE, softmax, SwiGLU's sigmoid, the residual adds) in
# float16: each rounds its result to 11 significant bits. The NumPy twin with StaticA16(float16=True) rounds every
# value to float16 once where it enters a quantized unit; the HTP rounds after every op on the way there, and the
# longest such float path (the residual Add, then RMSNorm's Mul, ReduceMean, Add, Sqrt, Div, Mul) has 7 ops. To first
# order their errors add, each no larger than the one the emulation makes, so the HTP's logits may differ from the
# twin's by at most 7 times what the emulation moves them.
FLOAT16_PATH_OPS = 7


@pytest.fixture(scope="module")
def htp_run(tmp_path_factory):
    """The qnn-onnx export at the default --prompt-len/--context, its 8 graphs on the HTP, the host loop over
    HTP_PROMPTS, and the NumPy twin (float32 and float16-emulating) on the same prompts."""
    client("onnxruntime_qnn")
    import onnxruntime_qnn
    from llama_ref import ondevice_onnx as QO
    from llama_ref.ondevice import OnDeviceLlama, StaticA16
    d = tmp_path_factory.mktemp("qnn")
    write("export", "--format", "qnn-onnx", "--out", d / "dev")            # the embedded model, every default
    manifest = json.loads((d / "dev" / "ondevice.json").read_text())
    htp = QO.OnnxOnDeviceLlama(d / "dev", provider="qnn-htp", op_trace_dir=d / "trace")
    qmodel = QO.quantized_for_device(load(paths.DEFAULT_MODEL))
    shape = (qmodel, len(manifest["parts"]), manifest["prompt_len"], manifest["context"])
    twin = OnDeviceLlama(*shape, act_scales=manifest["activation_scales"])
    half = OnDeviceLlama(*shape, act_scales=StaticA16(manifest["activation_scales"], float16=True))
    runs = []
    for text in HTP_PROMPTS:
        prompt = TOK.encode(text, bos=True)
        runs.append({"prompt": prompt, "htp": htp.generate(prompt, HTP_NEW_TOKENS),
                     "twin": twin.generate(prompt, HTP_NEW_TOKENS), "half": half.generate(prompt, HTP_NEW_TOKENS)})
    return {"manifest": manifest, "placement": QO.htp_placement(d / "trace"), "runs": runs,
            "qnn_version": onnxruntime_qnn.__version__}


def test_all_8_graphs_are_placed_on_the_htp_whole(htp_run):
    """The EP's own report (its framework op trace): every ONNX node of every graph on the HTP, one QNN graph each,
    compiled for SoC 60 (the simulator's target, onnx_export.QNN_HTP_OPTIONS), and every Conv and MatMul built from a
    complete QDQ unit (weights and int16 activations dequantized in, int16 out)."""
    manifest, placement = htp_run["manifest"], htp_run["placement"]
    assert (manifest["prompt_len"], manifest["context"]) == (64, 512)       # the CLI's defaults for this model
    assert sorted(placement) == sorted(manifest["graphs"]) and len(placement) == 8
    for graph, report in placement.items():
        assert report["not_on_htp"] == 0 and report["on_htp"] == report["onnx_nodes"] > 0, (graph, report)
        assert report["qnn_subgraphs"] == 1 and report["target"]["soc_model"] == 60, (graph, report)
        ops = report["qnn_ops"]
        assert ops["Conv2d"] > 0 and report["quantized_conv_matmul"] == ops["Conv2d"] + ops["MatMul"], (graph, report)


def test_htp_greedy_ids_equal_the_twin_and_logits_stay_within_the_float16_bound(htp_run):
    for run in htp_run["runs"]:
        (htp_ids, htp_logits), (twin_ids, twin_logits), (_, half_logits) = run["htp"], run["twin"], run["half"]
        assert len(htp_ids) == HTP_NEW_TOKENS and htp_ids == twin_ids
        emulated = max(float(np.abs(a - b).max()) for a, b in zip(half_logits, twin_logits))
        measured = max(float(np.abs(a - b).max()) for a, b in zip(htp_logits, twin_logits))
        assert 0 < emulated and measured / emulated <= FLOAT16_PATH_OPS, (measured, emulated)
