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
import pickle
import resource
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from llama_ref import paths  # noqa: E402
from llama_ref.config import LlamaConfig  # noqa: E402
from llama_ref.errors import LlamaRefError  # noqa: E402
from conftest import assert_error, cli, random_weights  # noqa: E402

EXAMPLES = int(os.environ.get("LLAMA_REF_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
TIME_LIMIT = 20.0                     # seconds per load (a valid tiny model loads in well under one)

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=1024, max_seq_len=64)


# ------------------------------------------------------------------------------------------------
# running a load in a bounded child

def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def bounded(fn, *args, timeout=TIME_LIMIT):
    """Run fn(*args) in a forked child with RLIMIT_AS = our size + 1 GiB. Returns ("ok", None),
    ("llamaref", message) or ("bad", description) for any other exception, a crash, or a timeout."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                                   # child
        os.close(r)
        try:
            limit = _vm_bytes() + (1 << 30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            try:
                fn(*args)
                out = ("ok", None)
            except LlamaRefError as e:
                out = ("llamaref", str(e))
            except BaseException as e:                             # noqa: BLE001 - that is the finding
                out = ("bad", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            data = pickle.dumps(out)
            os.write(w, data[:60000])
        finally:
            os._exit(0)
    os.close(w)
    deadline, chunks = time.monotonic() + timeout, []
    os.set_blocking(r, False)
    while True:
        try:
            chunk = os.read(r, 65536)
            if chunk:
                chunks.append(chunk)
            else:
                break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(r)
                return ("bad", f"hang: no answer within {timeout} s")
            time.sleep(0.005)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return ("bad", f"child died (wait status {status})")
    return pickle.loads(b"".join(chunks))


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

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("fmt", ["llama2c", "gguf-f32"])
def test_an_interrupted_export_leaves_the_old_file_and_no_temporary(originals, tmp_path, sig, fmt):
    from llama_ref.checkpoint import save_model
    big = LlamaConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1536, vocab_size=1024, max_seq_len=64)
    save_model(tmp_path / "big", big, random_weights(big, 0, scale=0.02), tokenizer_path=paths.DEFAULT_TOKENIZER)
    out = tmp_path / "out" / "keep.bin"
    out.parent.mkdir()
    out.write_bytes(b"the user's file")
    proc = subprocess.Popen([sys.executable, "-m", "llama_ref", "export", "--model", tmp_path / "big", "--format",
                             fmt, "--out", out, "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:     # wait until the temporary file exists
        if [p for p in out.parent.iterdir() if p.name != "keep.bin"]:
            break
        time.sleep(0.002)
    proc.send_signal(sig)
    proc.wait(60)
    left = sorted(p.name for p in out.parent.iterdir())
    if proc.returncode == 0:                                       # it finished before the signal: a new file
        assert left == ["keep.bin"]
        return
    assert out.read_bytes() == b"the user's file", "the old target was touched"
    assert left == ["keep.bin"], f"temporary files left behind: {left}"
