"""Bad input through the command line: one `error:` line and exit 2, never a traceback; valid edge cases work.

One test per root cause (a config field of the wrong type, a hostile header, text that is not Unicode, a setting at
the edge, an output that cannot be written, a damaged quantized directory...), each with a few neighbours.
tests/test_fuzz.py mutates the same files at random.
"""
import json
import os
import shutil

import numpy as np
import pytest

from llama_ref import paths
from llama_ref.checkpoint import save_model
from llama_ref.config import LlamaConfig
from conftest import assert_error, cli, random_weights  # noqa: E402

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=1024, max_seq_len=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "m"
    save_model(d, CFG, random_weights(CFG, 0, scale=0.05), tokenizer_path=paths.DEFAULT_TOKENIZER)
    return d


def with_config(model_dir, tmp_path, **changes):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def generate(model, *extra):
    return cli("generate", "--model", model, "--prompt-ids", "1,5", "--max-new-tokens", "2", "--temperature", "0",
               *extra)


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": "32"}, "hidden_size='32' must be an integer"),
    ({"hidden_size": None}, "hidden_size=None must be an integer"),
    ({"hidden_size": 32.9}, "hidden_size=32.9 must be an integer"),
    ({"rope_scaling": "linear"}, "rope_scaling='linear' must be an object"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "RoPE scaling of type 'yarn'"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 10000.0}}, "of type 'longrope'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "4", "rope_theta": 10000.0}}, "factor='4' must be a positive"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.5}}, "factor=0.5 must be >= 1"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor=None must be a positive number"),
    ({"rope_theta": "10000"}, "rope_theta='10000' must be a finite number"),
    ({"rms_norm_eps": float("nan")}, "must be a finite number"),
    ({"eos_token_id": "2"}, "eos_token_id='2' must be an integer"),
    ({"eos_token_id": 5000}, "eos_id=5000 must be a token id"),
    ({"head_dim": "8"}, "head_dim='8' differs"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false' must be true or false"),
    ({"num_attention_heads": 0}, "n_heads=0 must be a positive integer"),
])
def test_config_fields_of_the_wrong_type(model_dir, tmp_path, changes, message):
    assert_error(generate(with_config(model_dir, tmp_path, **changes)), message)


def test_a_huge_context_costs_only_what_is_used(model_dir, tmp_path):
    """max_position_embeddings 2^40: RoPE tables and the KV cache grow with the positions used, not up front; the
    formats with 32-bit header fields refuse to store it instead of crashing in struct.pack."""
    d = with_config(model_dir, tmp_path, max_position_embeddings=2 ** 40)
    r = generate(d, "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["ids"]) == 2
    assert_error(cli("generate", "--model", d, "--prompt-ids", "1", "--max-new-tokens", str(10 ** 11)),
                 "KV cache")
    assert_error(cli("export", "--model", d, "--format", "gguf-f32", "--out", tmp_path / "x.gguf"), "32-bit")
    assert_error(cli("export", "--model", d, "--format", "llama2c", "--out", tmp_path / "x.bin"), "32-bit")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.bin").exists()


def test_hostile_safetensors_headers(model_dir, tmp_path):
    import struct
    for what, header in [("nesting", b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
                         ("digits", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"7" * 5000 + b"]}}")]:
        d = tmp_path / what
        shutil.copytree(model_dir, d)
        header += b" " * (-len(header) % 8)
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        assert_error(generate(d), "is not valid JSON")


def test_text_that_is_not_unicode(model_dir):
    assert_error(cli("tokenize", "--text", "ab\udcff"), "not valid Unicode")           # invalid UTF-8 on argv
    assert_error(cli("tokenize", "--impl", "python", "--text", "ab\udcff"), "not valid Unicode")
    assert_error(cli("generate", "--model", model_dir, "--prompt", "x\udcff"), "not valid Unicode")
    assert_error(cli("chat", "--format-only", stdin=b'[{"role": "user", "content": "hi \xff"}]'), "not valid UTF-8")
    assert_error(cli("chat", "--format-only", stdin=b'[{"role": "user", "content": "hi \\ud800"}]'),
                 "not valid Unicode")


def test_settings_at_the_edge(model_dir, tmp_path):
    r = cli("generate", "--model", model_dir, "--prompt-ids", "1", "--max-new-tokens", "2", "--temperature", "1e-40",
            "--json")
    assert r.returncode == 0, r.stderr                                      # a tiny temperature is greedy
    assert_error(cli("generate", "--model", model_dir, "--prompt-ids", "1", "--temperature", "1e300"),
                 "--temperature: must be a number >= 0 and <= 100")
    assert_error(cli("quantize", "--model", model_dir, "--scheme", "w4a16-g0", "--out", tmp_path / "q"),
                 "group size must be")
    assert_error(cli("generate", "--model", model_dir, "--prompt-ids", "1,9999"), "vocabulary has ids 0..1023")
    r = cli("quantize", "--model", model_dir, "--scheme", "Q8_0", "--out", tmp_path / "x.gguf")
    assert r.returncode == 0, r.stderr                                      # schemes are case-insensitive


def test_outputs_that_cannot_be_written(model_dir, tmp_path):
    (tmp_path / "adir").mkdir()
    assert_error(cli("export", "--model", model_dir, "--format", "gguf-f32", "--out", tmp_path / "adir", "--force"),
                 "is a directory")
    assert_error(cli("export", "--model", model_dir, "--format", "llama2c", "--out", "/proc/x.bin"), "cannot write")
    assert_error(cli("export", "--model", model_dir, "--format", "gguf-f32", "--out", "/dev/null/x.gguf"),
                 "not a directory")
    r = cli("export", "--model", model_dir, "--format", "gguf-f32", "--out", tmp_path / "new" / "dir" / "m.gguf")
    assert r.returncode == 0, r.stderr                                      # parents are created
    (tmp_path / "afile").write_text("x")
    assert_error(cli("quantize", "--model", model_dir, "--scheme", "q8_0", "--out", tmp_path / "afile", "--force"),
                 "is a file")


def test_bad_tokenizer_when_writing(model_dir, tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    out = tmp_path.parent / f"{tmp_path.name}-out"
    for tok, message in [(tmp_path, "is a directory"), (tmp_path / "missing.model", "not found"),
                         (tmp_path / "junk.model", "not a valid SentencePiece")]:
        assert_error(cli("export", "--model", model_dir, "--format", "gguf-q8_0", "--out", out / "o.gguf",
                         "--tokenizer", tok), message)
        assert_error(cli("quantize", "--model", model_dir, "--scheme", "q4_0", "--out", out / "o2.gguf",
                         "--tokenizer", tok), message)
    assert not out.exists()                                       # nothing written, not even the parent


def test_quantized_directories_run_and_damage_is_an_error(model_dir, tmp_path):
    q = tmp_path / "q"
    assert cli("quantize", "--model", model_dir, "--scheme", "q8_0", "--out", q).returncode == 0
    r = generate(q, "--json")
    assert r.returncode == 0, r.stderr                                      # generate runs what quantize wrote
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(q / "model.safetensors"))
    for what, change, message in [
            ("tensor", lambda t: t.pop("model.layers.1.mlp.up_proj.weight.blocks"), "lacks 1 tensor"),
            ("key", lambda c: c["quantization"].pop("tensors"), "no llama_ref quantization block"),
            ("layers", lambda c: c.update(num_hidden_layers=1), "has no place for"),
            ("bytes", None, "the file is truncated")]:                 # our safetensors reader says how
        d = tmp_path / what
        shutil.copytree(q, d)
        if what == "tensor":
            t = dict(tensors)
            change(t)
            save_file(t, str(d / "model.safetensors"))
        elif what == "bytes":
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        else:
            cfg = json.loads((d / "config.json").read_text())
            change(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        assert_error(generate(d), message)
        assert_error(cli("export", "--model", d, "--format", "gguf-q8_0", "--out", tmp_path / f"{what}.gguf"), message)


def test_misleading_messages_say_what_is_wrong(model_dir, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_error(generate(fifo), "not a regular file")
    (tmp_path / "t.txt").write_text("just text")
    for ref, message in [(tmp_path / "t.txt", "not an .npz file"), (tmp_path, "is a directory")]:
        assert_error(cli("inspect", "--model", model_dir, "--prompt-ids", "1,2", "--tap", "logits", "--compare", ref),
                     message)
    assert_error(cli("generate", "--model", tmp_path / "nothing.gguf", "--prompt-ids", "1"), "does not exist")
    assert_error(cli("generate", "--model", model_dir, "--tokenizer", tmp_path, "--prompt", "hi"), "is a directory")


def test_gguf_is_validated(model_dir, tmp_path):
    """A GGUF with NaN weights or a config that disagrees with its tensors is refused, and nothing is exported."""
    from llama_ref import gguf_io
    from llama_ref.loader import read_checkpoint
    config, weights = read_checkpoint(model_dir)
    weights = dict(weights)
    w = np.array(weights["model.layers.0.mlp.up_proj.weight"])
    w[0, 0] = np.nan
    weights["model.layers.0.mlp.up_proj.weight"] = w
    bad = gguf_io.save_gguf(tmp_path / "nan.gguf", config, weights, paths.DEFAULT_TOKENIZER, "f32")
    assert_error(generate(bad), "NaN")
    out = tmp_path / "out.bin"
    assert_error(cli("export", "--model", bad, "--format", "llama2c", "--out", out), "NaN")
    assert not out.exists()


def test_outputs_follow_the_umask(model_dir, tmp_path):
    """mkstemp/mkdtemp create 0600/0700; the writer gives files and directories what the umask asks for."""
    old = os.umask(0o022)
    try:
        assert cli("export", "--model", model_dir, "--format", "llama2c", "--out", tmp_path / "m.bin").returncode == 0
        assert cli("quantize", "--model", model_dir, "--scheme", "q8_0", "--out", tmp_path / "q").returncode == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "q").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "q" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_replacing_a_quantized_directory_keeps_a_users_dot_old(model_dir, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", "--model", model_dir, "--scheme", "q8_0", "--out", out).returncode == 0
    (tmp_path / "q.old").write_text("mine")
    assert cli("quantize", "--model", model_dir, "--scheme", "q4_0", "--out", out, "--force").returncode == 0
    assert (tmp_path / "q.old").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "q.old"]
    assert json.loads((out / "config.json").read_text())["quantization"]["scheme"] == "q4_0"
