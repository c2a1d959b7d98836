"""Fuzzing every file a user can hand us: load succeeds with a valid model or raises a LlamaRefError, quickly, in
bounded memory; the CLI answers bad files with exit 2 and one `error:` line; writers interrupted by SIGINT/SIGTERM
leave the old target intact and no temporary file behind.

Mutations start from valid files made here (an HF directory, a llama2.c .bin, GGUF files, the tokenizer, chat JSON)
and are chosen by hypothesis (derandomized, so every run tries the same ones): bytes flipped, the file cut at every
structural boundary (header fields, JSON, tensor infos, tensor data) and at random offsets, header fields replaced by
values of the wrong type or an absurd size.

Every load runs in a forked child with its address space capped (RLIMIT_AS: what the test process uses plus
1 GiB) and a time limit, so a huge allocation shows up as a MemoryError and a hang as a timeout, both failures.
`make fuzz` runs the same properties with many more examples (LLAMA_REF_FUZZ_EXAMPLES).
"""
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from llama_ref import paths  # noqa: E402
from llama_ref.config import LlamaConfig  # noqa: E402
from conftest import assert_error, bounded, cli, random_weights  # noqa: E402

EXAMPLES = int(os.environ.get("LLAMA_REF_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=1024, max_seq_len=64)


# ------------------------------------------------------------------------------------------------
# running a load in a bounded child

def load_and_build(path):
    """What every command does with --model: load (validated) and build the model, then run one token."""
    from llama_ref.loader import load
    model = load(path)
    model.forward([model.config.bos_id])


def assert_clean(kind, mutation, result):
    status, detail = result
    assert status in ("ok", "llamaref"), f"{kind} mutation {mutation!r}: {detail}"
    if status == "llamaref":
        assert detail and "Traceback" not in detail


# ------------------------------------------------------------------------------------------------
# the valid files we start from

@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    from llama_ref import gguf_io
    from llama_ref.checkpoint import save_model
    from llama_ref.llama2c import save_llama2c
    d = tmp_path_factory.mktemp("fuzz-originals")
    weights = random_weights(CFG, 0, scale=0.05)
    save_model(d / "hf", CFG, weights, tokenizer_path=paths.DEFAULT_TOKENIZER)
    save_llama2c(d / "m.bin", CFG, weights)
    gguf_io.save_gguf(d / "m-f32.gguf", CFG, weights, paths.DEFAULT_TOKENIZER, "f32")
    gguf_io.save_gguf(d / "m-q8_0.gguf", CFG, weights, paths.DEFAULT_TOKENIZER, "q8_0")
    return d


def _write_variant(tmp, name, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


HOSTILE = [None, True, False, "64", "", "linear", -1, 0, 1, 64.9, 1e308, -1e-300, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64,
           [], [1, 2], {}, {"rope_type": "linear", "factor": 4.0}, "nan", float("nan"), float("inf")]


# ------------------------------------------------------------------------------------------------
# config.json

CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "head_dim", "rope_scaling", "rope_parameters", "model_type",
               "hidden_act", "attention_bias"]


@FUZZ
@given(key=st.sampled_from(CONFIG_KEYS), value=st.sampled_from(HOSTILE + ["deep", "digits"]))
def test_config_json_fields(originals, tmp_path, key, value):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(originals / "hf", d, dirs_exist_ok=True)
    cfg = json.loads((d / "config.json").read_text())
    if value == "deep":
        text = json.dumps(cfg).replace(f'"{key}": ', f'"{key}": ' + "[" * 100000 + "]" * 100000 + ', "_x": ', 1) \
            if key in cfg else json.dumps({**cfg, key: None})
    elif value == "digits":
        text = json.dumps(cfg).replace(f'"{key}": ', f'"{key}": ' + "9" * 5000 + ', "_x": ', 1) \
            if key in cfg else json.dumps({**cfg, key: None})
    else:
        cfg[key] = value
        text = json.dumps(cfg)                                     # Python writes NaN/Infinity tokens, as json allows
    (d / "config.json").write_text(text)
    assert_clean("config.json", (key, repr(value)[:40]), bounded(load_and_build, d))


@FUZZ
@given(cut=st.integers(0, 2000), flip=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=4))
def test_config_json_bytes(originals, tmp_path, cut, flip):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(originals / "hf", d, dirs_exist_ok=True)
    data = bytearray((d / "config.json").read_bytes())
    for pos, x in flip:
        if pos < len(data):
            data[pos] ^= x
    (d / "config.json").write_bytes(bytes(data[:cut]) if cut < len(data) else bytes(data))
    assert_clean("config.json bytes", (cut, tuple(flip)), bounded(load_and_build, d))


# ------------------------------------------------------------------------------------------------
# safetensors

def _safetensors_boundaries(data: bytes) -> list[int]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    cuts = [0, 4, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n]
    for name, info in header.items():
        if name != "__metadata__":
            b, e = info["data_offsets"]
            cuts += [8 + n + b, 8 + n + (b + e) // 2, 8 + n + e - 1]
    return sorted(set(cuts))


@FUZZ
@given(data=st.data())
def test_safetensors_bytes(originals, tmp_path, data):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(originals / "hf", d, dirs_exist_ok=True)
    raw = (d / "model.safetensors").read_bytes()
    how = data.draw(st.sampled_from(["cut", "flip", "field"]))
    buf = bytearray(raw)
    if how == "cut":
        cut = data.draw(st.sampled_from(_safetensors_boundaries(raw)) | st.integers(0, len(raw)))
        buf = buf[:cut]
        mutation = ("cut", cut)
    elif how == "flip":
        flips = data.draw(st.lists(st.tuples(st.integers(0, min(len(raw) - 1, 4096)), st.integers(1, 255)),
                                   min_size=1, max_size=6))
        for pos, x in flips:
            buf[pos] ^= x
        mutation = ("flip", tuple(flips))
    else:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "__length__", "__nest__", "__digits__"]))
        value = data.draw(st.sampled_from(HOSTILE + ["I8", "F8_E4M3", [10 ** 12, 10 ** 12], [-8], [[1]]]))
        if field == "__length__":
            buf[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, n - 1, n + 1, 2 ** 40, 2 ** 63])))
            mutation = ("length", bytes(buf[:8]))
        else:
            if field == "__nest__":
                header[name]["shape"] = "NEST"
                text = json.dumps(header).replace('"NEST"', "[" * 100000 + "]" * 100000)
            elif field == "__digits__":
                header[name]["data_offsets"] = "DIG"
                text = json.dumps(header).replace('"DIG"', "[0, " + "7" * 5000 + "]")
            else:
                header[name][field] = value
                text = json.dumps(header)
            hb = text.encode()
            hb += b" " * (-len(hb) % 8)
            buf = bytearray(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
            mutation = ("field", name, field, repr(value)[:30])
    (d / "model.safetensors").write_bytes(bytes(buf))
    assert_clean("safetensors", mutation, bounded(load_and_build, d))


# ------------------------------------------------------------------------------------------------
# llama2.c .bin

@FUZZ
@given(data=st.data())
def test_llama2c_header(originals, tmp_path, data):
    raw = (originals / "m.bin").read_bytes()
    buf = bytearray(raw)
    how = data.draw(st.sampled_from(["field", "cut", "flip", "magic"]))
    if how == "field":
        i = data.draw(st.integers(0, 6))
        v = data.draw(st.sampled_from([0, -1, 1, 3, 7, 2 ** 31 - 1, -2 ** 31, 1 << 20, 65536]))
        buf[4 * i:4 * i + 4] = struct.pack("<i", v)
        mutation = ("field", i, v)
    elif how == "cut":
        cut = data.draw(st.sampled_from([0, 3, 27, 28, 29, 1000, len(raw) - 1]) | st.integers(0, len(raw)))
        buf = buf[:cut]
        mutation = ("cut", cut)
    elif how == "magic":
        v = data.draw(st.sampled_from([0, 2, 3, -1, 2 ** 31 - 1]))
        head = struct.pack("<Ii7iB", 0x616B3432, v, *struct.unpack("<7i", raw[:28]), 1)
        buf = bytearray(head + b"\0" * (256 - len(head)) + raw[28:])
        mutation = ("version", v)
    else:
        flips = data.draw(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 255)), min_size=1, max_size=4))
        for pos, x in flips:
            buf[pos] ^= x
        mutation = ("flip", tuple(flips))
    p = _write_variant(tmp_path, "m.bin", bytes(buf))
    assert_clean("llama2c", mutation, bounded(load_and_build, p))


# ------------------------------------------------------------------------------------------------
# GGUF: bytes, counts, and hostile metadata values

def _gguf_boundaries(path) -> list[int]:
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    cuts = {0, 4, 8, 16, 24}
    for f in r.fields.values():
        cuts.add(int(f.offset))
    for t in r.tensors:
        cuts.add(int(t.field.offset))
        cuts.add(int(t.data_offset))
        cuts.add(int(t.data_offset) + int(t.n_bytes) // 2)
    return sorted(cuts)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["m-f32.gguf", "m-q8_0.gguf"]))
def test_gguf_bytes(originals, tmp_path, data, which):
    raw = (originals / which).read_bytes()
    buf = bytearray(raw)
    how = data.draw(st.sampled_from(["cut", "flip", "count"]))
    if how == "cut":
        cut = data.draw(st.sampled_from(_gguf_boundaries(originals / which)) | st.integers(0, len(raw)))
        buf = buf[:cut]
        mutation = ("cut", cut)
    elif how == "count":
        at = data.draw(st.sampled_from([8, 16, 24]))               # tensor count, kv count, first key's length
        v = data.draw(st.sampled_from([0, 1, 2 ** 20, 2 ** 40, 2 ** 63]))
        buf[at:at + 8] = struct.pack("<Q", v)
        mutation = ("count", at, v)
    else:
        flips = data.draw(st.lists(st.tuples(st.integers(0, min(len(raw) - 1, 200000)), st.integers(1, 255)),
                                   min_size=1, max_size=6))
        for pos, x in flips:
            buf[pos] ^= x
        mutation = ("flip", tuple(flips))
    p = _write_variant(tmp_path, which, bytes(buf))
    assert_clean("gguf bytes", (which, mutation), bounded(load_and_build, p))


GGUF_KEYS = ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
             "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.architecture"]


def _gguf_with(path, key, value, weights_cfg=CFG, nan=False, drop=None):
    """A GGUF like ours, with metadata `key` set to `value` (any GGUF type), NaN weights, or a tensor dropped."""
    import gguf
    from llama_ref import gguf_io
    weights = random_weights(weights_cfg, 1, scale=0.05)
    if nan:
        weights["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    tensors = gguf_io._gguf_tensors(weights_cfg, weights, "f32")
    w = gguf.GGUFWriter(str(path), "llama" if key != "general.architecture" else str(value))
    c = weights_cfg
    meta = {"llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
            "llama.feed_forward_length": c.hidden_dim, "llama.attention.head_count": c.n_heads,
            "llama.attention.head_count_kv": c.n_kv_heads, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": c.head_dim}
    if key is not None and key != "general.architecture":
        meta[key] = value
    for k, v in meta.items():
        if v is None:
            continue
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        elif v < 0:
            w.add_int64(k, v)
        else:
            w.add_uint64(k, v) if v >= 2 ** 32 else w.add_uint32(k, v)
    for name, arr, raw in tensors:
        if name != drop:
            w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@FUZZ
@given(key=st.sampled_from(GGUF_KEYS),
       value=st.sampled_from([None, 0, 1, 3, 2 ** 40, -5, "32", "", True, 1.5, float("nan"), [1, 2], "mistral"]))
def test_gguf_metadata(tmp_path, key, value):
    p = _gguf_with(tmp_path / "m.gguf", key, value)
    assert_clean("gguf metadata", (key, repr(value)), bounded(load_and_build, p))


def test_gguf_is_validated_like_every_format(tmp_path):
    """NaN weights, a missing tensor and a config that disagrees with the shapes are errors, not a model."""
    from llama_ref.loader import read_checkpoint
    cases = {"nan": _gguf_with(tmp_path / "nan.gguf", None, None, nan=True),
             "missing": _gguf_with(tmp_path / "missing.gguf", None, None, drop="blk.1.ffn_up.weight"),
             "shape": _gguf_with(tmp_path / "shape.gguf", "llama.feed_forward_length", 96)}
    for what, p in cases.items():
        status, detail = bounded(lambda q=p: read_checkpoint(q))
        assert status == "llamaref", f"{what}: {status} {detail}"


# ------------------------------------------------------------------------------------------------
# tokenizer and chat JSON

@FUZZ
@given(data=st.data())
def test_tokenizer_file(tmp_path, data):
    from llama_ref.tokenizer import Tokenizer
    raw = Path(paths.DEFAULT_TOKENIZER).read_bytes()
    buf = bytearray(raw)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw)))
        buf = buf[:cut]
        mutation = ("cut", cut)
    else:
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                   max_size=8))
        for pos, x in flips:
            buf[pos] ^= x
        mutation = ("flip", tuple(flips))
    p = _write_variant(tmp_path, "tokenizer.model", bytes(buf))
    impl = data.draw(st.sampled_from(["sentencepiece", "python"]))

    def use():
        tok = Tokenizer(p, impl=impl)
        tok.decode(tok.encode("Once upon a time, Mia 😀", bos=True))
    assert_clean("tokenizer", (impl, mutation), bounded(use))


CHAT_VALUES = [None, 1, "", "x" * 10, [], {}, [{"role": "user"}], [{"role": "user", "content": 5}],
               [{"role": "robot", "content": "hi"}], [{"role": "user", "content": "[INST] hi"}],
               [{"role": "user", "content": "\ud800"}], [{"role": "assistant", "content": "hi"}],
               [{"role": "system", "content": "s"}, {"role": "system", "content": "s"}],
               [{"role": "user", "content": "hi"}] * 3, [{"role": "user", "content": "hi" * 5000}]]


@FUZZ
@given(dialog=st.sampled_from(CHAT_VALUES) | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                                          lambda c: st.lists(c, max_size=3) | st.dictionaries(
                                                              st.sampled_from(["role", "content", "x"]), c,
                                                              max_size=3), max_leaves=8))
def test_chat_dialogs(dialog):
    from llama_ref import chat
    from llama_ref.tokenizer import Tokenizer

    def use():
        tok = Tokenizer(paths.DEFAULT_TOKENIZER)
        chat.format_dialog(chat.read_dialog_json(json.dumps(dialog)), tok)
    assert_clean("chat json", repr(dialog)[:80], bounded(use))


# ------------------------------------------------------------------------------------------------
# the CLI: a sample of bad files as real subprocesses

def test_cli_answers_bad_files_with_one_error_line(originals, tmp_path):
    import shutil
    cases = {}
    d = tmp_path / "cfg"
    shutil.copytree(originals / "hf", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": "32"}))
    cases["config string"] = d
    raw = (originals / "m-q8_0.gguf").read_bytes()
    cases["gguf cut in tensor infos"] = _write_variant(tmp_path, "cut.gguf", raw[:_gguf_boundaries(
        originals / "m-q8_0.gguf")[-6]])
    cases["gguf head_count 0"] = _gguf_with(tmp_path / "h0.gguf", "llama.attention.head_count", 0)
    cases["llama2c cut"] = _write_variant(tmp_path, "cut.bin", (originals / "m.bin").read_bytes()[:1000])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases["fifo"] = fifo
    for what, path in cases.items():
        assert_error(cli("generate", "--model", path, "--prompt-ids", "1,2", "--max-new-tokens", "2",
                         "--temperature", "0", timeout=60))
    assert_error(cli("tokenize", "--text", "ab\udcff", timeout=60))                    # a lone surrogate


# ------------------------------------------------------------------------------------------------
# interrupted writers

# ------------------------------------------------------------------------------------------------
# JSON: every JSON the package reads, in hostile forms (one reader: inputs.parse_json / read_json)

def _json_forms():
    return {"deep": b"[" * 100000 + b"]" * 100000, "digits": b'{"a": ' + b"9" * 5000 + b"}",
            "nan": b'{"a": NaN}', "utf8": b'{"a": "\xff"}', "bom": b"\xef\xbb\xbf{}", "empty": b"",
            "cut": b'{"hidden_size": 6', "list": b"[1]", "str": b'"x"', "big": b" " * (65 * 2 ** 20) + b"{}"}


JSON_FILES = {"config.json": "config.json", "shard index": "model.safetensors.index.json",
              "tokenizer_config.json": "tokenizer_config.json"}


@FUZZ
@given(which=st.sampled_from(sorted(JSON_FILES)), form=st.sampled_from(sorted(_json_forms()) + ["fifo", "zero", "dir"]),
       extra=st.binary(max_size=40))
def test_every_json_the_package_reads(originals, tmp_path, which, form, extra):
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(dir=tmp_path)) / "m"             # fresh per example: the last one may be a FIFO
    shutil.copytree(originals / "hf", d)
    f = d / JSON_FILES[which]
    if f.exists():
        f.unlink()
    if form == "fifo":
        os.mkfifo(f)
    elif form == "zero":
        os.symlink("/dev/zero", f)
    elif form == "dir":
        f.mkdir()
    else:
        f.write_bytes(_json_forms()[form] + (extra if form in ("cut", "empty") else b""))

    def use():
        from llama_ref.loader import find_tokenizer, read_chat_template, read_checkpoint
        read_checkpoint(d)
        find_tokenizer(d)
        read_chat_template(d)
    assert_clean(which, (form, extra), bounded(use, timeout=60))


# ------------------------------------------------------------------------------------------------
# .npz archives: names, dtypes and shapes from the headers first (inputs.npz_members)

@FUZZ
@given(data=st.data())
def test_npz_members_are_checked_before_loading(tmp_path, data):
    import zipfile
    from llama_ref.inspect import compare, load_reference
    p = tmp_path / "ref.npz"
    how = data.draw(st.sampled_from(["dtype", "claim", "member", "cut", "flip"]))
    ours = {"logits": np.zeros((1, 2, 8), np.float32)}
    if how == "dtype":
        dtype = data.draw(st.sampled_from(["U3", "S2", "O", "c8", "V4", "M8[s]", "f2", "i8", "?"]))
        a = np.zeros((1, 2, 8), dtype=dtype) if dtype != "O" else np.array([None] * 16, dtype=object).reshape(1, 2, 8)
        np.savez(p, logits=a)
    elif how == "claim":                                        # a header claiming more (or less) than the bytes
        n = data.draw(st.sampled_from([0, 1, 15, 17, 2 ** 31, 2 ** 40, 2 ** 62]))
        with zipfile.ZipFile(p, "w") as z, z.open("logits.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
            f.write(bytes(64))
    elif how == "member":
        name = data.draw(st.sampled_from(["readme.txt", "a/b.npy", "logits", "../x.npy", ""]))
        with zipfile.ZipFile(p, "w") as z:
            z.writestr(name or "x", b"not an array")
    else:
        np.savez(p, logits=np.ones((1, 2, 8), np.float32), tokens=np.array([[1, 2]]))
        raw = bytearray(p.read_bytes())
        if how == "cut":
            raw = raw[:data.draw(st.integers(0, len(raw)))]
        else:
            for pos, x in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)),
                                             min_size=1, max_size=4)):
                raw[pos] ^= x
        p.write_bytes(bytes(raw))

    def use():
        compare(ours, load_reference(p))
    assert_clean("npz", how, bounded(use))


# ------------------------------------------------------------------------------------------------
# GGUF counts: a file whose counts lie about the bytes it holds

@FUZZ
@given(kind=st.sampled_from(["array", "strings", "string", "key", "tensors", "dims", "type"]),
       count=st.sampled_from([0, 1, 7, 2 ** 20, 10 ** 9, 2 ** 40, 2 ** 62, 2 ** 64 - 1]))
def test_gguf_counts_against_the_bytes_left(tmp_path, kind, count):
    def s(b):
        return struct.pack("<Q", len(b)) + b
    head = lambda n_t, n_kv: b"GGUF" + struct.pack("<IQQ", 3, n_t, n_kv)            # noqa: E731
    if kind == "array":
        data = head(0, 1) + s(b"x") + struct.pack("<IIQ", 9, 4, count)
    elif kind == "strings":
        data = head(0, 1) + s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, count) + bytes(64)
    elif kind == "string":
        data = head(0, 1) + s(b"general.name") + struct.pack("<IQ", 8, count)
    elif kind == "key":
        data = head(0, 1) + struct.pack("<Q", count)
    elif kind == "tensors":
        data = head(count, 0)
    elif kind == "dims":
        data = head(1, 0) + s(b"t") + struct.pack("<I", count % 2 ** 32) + struct.pack("<QIQ", 4, 0, 0)
    else:
        data = head(1, 0) + s(b"t") + struct.pack("<IQIQ", 1, count, 0, 0)
    p = _write_variant(tmp_path, "m.gguf", data + bytes(32))
    assert_clean("gguf counts", (kind, count), bounded(load_and_build, p))


# ------------------------------------------------------------------------------------------------
# interrupted writers: every writer the CLI has x SIGINT, SIGTERM, SIGHUP, SIGQUIT

def writer_commands():
    """The CLI's writers, found in its parser (every command with --out or --save): a new writer fails the
    completeness check below until it has a case here."""
    import argparse
    from llama_ref.__main__ import build_parser
    found = set()
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                if any(o in ("--out", "--save") for a in sub._actions for o in a.option_strings):
                    found.add(command)
    return found


WRITERS = {                                                    # name -> (kind, argv given the model and --out)
    "export gguf": ("file", lambda m, out: ["export", "--model", m, "--format", "gguf-f32", "--out", out]),
    "export llama2c": ("file", lambda m, out: ["export", "--model", m, "--format", "llama2c", "--out", out]),
    "export onnx": ("dir", lambda m, out: ["export", "--model", m, "--format", "onnx", "--out", out]),
    "quantize gguf": ("file", lambda m, out: ["quantize", "--model", m, "--scheme", "q8_0", "--out", out]),
    "quantize dir": ("dir", lambda m, out: ["quantize", "--model", m, "--scheme", "q8_0", "--out", out]),
    "inspect --save": ("file", lambda m, out: ["inspect", "--model", m, "--prompt-ids", ",".join(["1"] * 48),
                                               "--save", out]),
    "train": ("dir", lambda m, out: ["train", "--out", out, "--steps", "3", "--batch-size", "2", "--seq-len", "64",
                                     "--tokens", "3000", "--eval-tokens", "64", "--samples", "1", "--qa", "1"]),
    "save_model (Python; make gatt, make rlhf)": ("dir", None),
}


def test_every_cli_writer_has_a_signal_case():
    assert writer_commands() <= {name.split()[0] for name in WRITERS}


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    from llama_ref.checkpoint import save_model
    big = LlamaConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1536, vocab_size=1024, max_seq_len=64)
    d = tmp_path_factory.mktemp("big") / "big"
    save_model(d, big, random_weights(big, 0, scale=0.02), tokenizer_path=paths.DEFAULT_TOKENIZER)
    return d


SAVE_MODEL = """
import sys
import numpy as np
from llama_ref.checkpoint import save_model
from llama_ref.loader import read_checkpoint
config, weights = read_checkpoint(sys.argv[1])
save_model(sys.argv[2], config, {k: np.array(v) for k, v in weights.items()}, force=True)
"""


def _temporaries(d: Path) -> list[str]:
    from llama_ref.output import TEMP_PREFIX
    return [str(p.relative_to(d)) for p in d.rglob("*") if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT],
                         ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_an_interrupted_writer_leaves_the_old_output_and_no_temporary(big_model, tmp_path, writer, sig):
    """The signal arrives as soon as a temporary exists (whichever thread the kernel gives it to: the cleanup works
    from the registry of temporaries). The old output must be as it was and nothing of the write left behind."""
    if writer == "export onnx":
        pytest.importorskip("onnx")
    kind, argv = WRITERS[writer]
    out = tmp_path / "out" / ("keep" if kind == "dir" else "keep.bin")
    out.parent.mkdir()
    if kind == "dir":                                          # an earlier output of the same writer (ours)
        from llama_ref.output import atomic_dir
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("the user's old model")
        if writer == "train":
            (tmp_path / "out" / "keep.train-state").mkdir()
    else:
        out.write_bytes(b"the user's file")
    before = sorted(p.name for p in out.iterdir()) if kind == "dir" else out.read_bytes()
    cmd = [sys.executable, "-c", SAVE_MODEL, big_model, out] if argv is None else \
        [sys.executable, "-m", "llama_ref", *map(str, argv(big_model, out)), "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not _temporaries(out.parent):
        time.sleep(0.002)
    proc.send_signal(sig)
    proc.wait(120)
    left = _temporaries(out.parent)
    assert not left, f"{writer} left temporaries after {signal.Signals(sig).name}: {left}"
    if proc.returncode != 0:                                   # interrupted: the old output is as it was
        now = sorted(p.name for p in out.iterdir()) if kind == "dir" else out.read_bytes()
        assert now == before, "the old output was touched"
        if argv is not None:                                   # the CLI ends quietly (a Python caller sees the
            assert "Traceback" not in proc.stderr.read().decode("utf-8", "replace")   # KeyboardInterrupt)
