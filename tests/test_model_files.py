"""llama_ref.model_files: what travels with every model we write (tokenizer files, the chat template of a chat model,
generation_config.json), through every writer: save_model, quantize (directory and GGUF), export (GGUF, ONNX,
on-device graphs), and the shipped models in data/models/.

The clients themselves (transformers 4.x/5.x, llama-cpp-python, Optimum, ONNX Runtime GenAI, the QNN HTP) read these
files in tests/test_interop.py; here: what is written, what is refused, and that a non-chat model gets no template.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_ref import model_files, paths
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE
from llama_ref.checkpoint import save_model
from llama_ref.config import LlamaConfig
from llama_ref.errors import ChatFormatError, TokenizerError
from llama_ref.loader import read_chat_template
from conftest import random_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=1024, max_seq_len=64)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "chat"
    save_model(d, CFG, random_weights(CFG, scale=0.1), tokenizer_path=paths.DEFAULT_TOKENIZER,
               chat_template=LLAMA2_CHAT_TEMPLATE)
    return d


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "base"
    save_model(d, CFG, random_weights(CFG, scale=0.1), tokenizer_path=paths.DEFAULT_TOKENIZER)
    return d


def read_json(path):
    return json.loads(Path(path).read_text())


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llama_ref", *map(str, args)], capture_output=True, timeout=600,
                          cwd=REPO)


# ------------------------------------------------------------------------------------------------
# save_model: a chat model and a base model

def test_a_chat_model_directory_carries_the_template_and_metas_sampling_defaults(chat_dir):
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "config.json", "model.safetensors"} <= {p.name for p in chat_dir.iterdir()}
    tc = read_json(chat_dir / "tokenizer_config.json")
    assert tc["chat_template"] == LLAMA2_CHAT_TEMPLATE and tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert "legacy" not in tc                                # "legacy": false changes the ids in transformers 4 and 5
    gen = read_json(chat_dir / "generation_config.json")
    assert (gen["temperature"], gen["top_p"], gen["do_sample"]) == (0.6, 0.9, True)
    assert read_chat_template(chat_dir) == LLAMA2_CHAT_TEMPLATE


def test_a_base_model_directory_carries_no_template(base_dir):
    tc = read_json(base_dir / "tokenizer_config.json")
    assert "chat_template" not in tc and (base_dir / "tokenizer.json").exists()
    assert read_json(base_dir / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": 2}
    assert read_chat_template(base_dir) is None


@pytest.mark.parametrize("bad,match", [
    ("{% if %}", "cannot be rendered"),                      # a syntax error
    ("{{ messages.pop() }}", "cannot be rendered"),        # the immutable sandbox refuses it, as in transformers
    ("{{ 1 / 0 }}", "fails while rendering"),
    ("{{ raise_exception('no') }}", "no"),
    ("Hello", "without its last user message"),
    ("", "non-empty"),
])
def test_a_template_no_client_can_render_is_refused_before_anything_is_written(bad, match, tmp_path):
    with pytest.raises(ChatFormatError, match=match):
        save_model(tmp_path / "m", CFG, random_weights(CFG, scale=0.1), tokenizer_path=paths.DEFAULT_TOKENIZER,
                   chat_template=bad)
    assert not (tmp_path / "m").exists()


def test_a_template_needs_the_tokenizer_it_travels_with(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        save_model(tmp_path / "m", CFG, random_weights(CFG, scale=0.1), chat_template=LLAMA2_CHAT_TEMPLATE)
    assert not (tmp_path / "m").exists()


def test_companion_files_are_what_the_shipped_models_hold():
    """data/models/*: the files were written by model_files.companion_files and still equal what it writes; the chat
    models carry the template, the base and the reward model none."""
    shipped = sorted(p.parent for p in paths.MODELS_DIR.glob("*/config.json"))
    assert {d.name for d in shipped} >= {"tinyworld", "tinyworld-rm", *(d.name for d in paths.CHAT_MODELS)}
    for d in shipped:
        expected = model_files.companion_files(LlamaConfig.load(d), d / "tokenizer.model",
                                               LLAMA2_CHAT_TEMPLATE if d in paths.CHAT_MODELS else None)
        for fname, content in expected.items():
            assert (d / fname).read_bytes() == content, (d.name, fname)


# ------------------------------------------------------------------------------------------------
# every other writer, through the CLI: the template follows the source, never appears from nowhere

def gguf_template(path):
    import gguf
    field = gguf.GGUFReader(str(path)).get_field("tokenizer.chat_template")
    return None if field is None else field.contents()


@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q8_0"])
def test_gguf_export_carries_the_template_of_a_chat_model_only(fmt, chat_dir, base_dir, tmp_path):
    for src, want in ((chat_dir, LLAMA2_CHAT_TEMPLATE), (base_dir, None)):
        out = tmp_path / f"{src.name}.gguf"
        proc = cli("export", "--model", src, "--format", fmt, "--out", out)
        assert proc.returncode == 0, proc.stderr.decode()[-800:]
        assert gguf_template(out) == want
        assert read_chat_template(out) == want


def test_quantize_carries_the_template_into_gguf_and_directories(chat_dir, tmp_path):
    assert cli("quantize", "--model", chat_dir, "--scheme", "q4_0", "--out", tmp_path / "q.gguf").returncode == 0
    assert gguf_template(tmp_path / "q.gguf") == LLAMA2_CHAT_TEMPLATE
    proc = cli("quantize", "--model", chat_dir, "--scheme", "w4a16-g32", "--out", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr.decode()[-800:]
    assert read_json(tmp_path / "q" / "tokenizer_config.json")["chat_template"] == LLAMA2_CHAT_TEMPLATE
    assert (tmp_path / "q" / "tokenizer.json").exists()
    # and from the GGUF on: a GGUF source's template and vocabulary travel on into a directory
    proc = cli("quantize", "--model", tmp_path / "q.gguf", "--scheme", "int8-channel", "--out", tmp_path / "g")
    assert proc.returncode == 0, proc.stderr.decode()[-800:]
    assert read_chat_template(tmp_path / "g") == LLAMA2_CHAT_TEMPLATE


@pytest.mark.parametrize("fmt", ["onnx", "qnn-onnx"])
def test_onnx_exports_carry_config_generation_config_and_the_template(fmt, chat_dir, base_dir, tmp_path):
    pytest.importorskip("onnx")
    for src, want in ((chat_dir, LLAMA2_CHAT_TEMPLATE), (base_dir, None)):
        out = tmp_path / f"{src.name}-{fmt}"
        proc = cli("export", "--model", src, "--format", fmt, "--out", out, "--prompt-len", 8, "--context", 16, "--parts", 2)
        assert proc.returncode == 0, proc.stderr.decode()[-800:]
        assert read_json(out / "config.json")["architectures"] == ["LlamaForCausalLM"]
        assert read_json(out / "generation_config.json")["eos_token_id"] == 2
        assert read_json(out / "tokenizer_config.json").get("chat_template") == want
        assert (out / "tokenizer.json").exists() and (out / "tokenizer.model").exists()


def test_a_source_with_a_broken_template_is_refused_before_export(chat_dir, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(chat_dir, src)
    tc = read_json(src / "tokenizer_config.json")
    tc["chat_template"] = "{% for m in messages %}"                         # never closed
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    proc = cli("export", "--model", src, "--format", "gguf-f16", "--out", tmp_path / "x.gguf")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.startswith("error: ") and "chat template" in err, err[-800:]
    assert not (tmp_path / "x.gguf").exists()
