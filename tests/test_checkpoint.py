"""checkpoint.py: HF directories (single and sharded), our safetensors reader/writer, llama2.c .bin, validation.

Round trips compare with exact equality: nothing here does arithmetic on weights except the q/k permutation, which
only moves float32 values around.
"""
import json
import os
import struct

import numpy as np
import pytest

from llama_ref import checkpoint as ck
from llama_ref import weights as weights_mod
from llama_ref import loader, paths
from llama_ref.checkpoint import check_weights, save_model
from llama_ref.llama2c import save_llama2c
from llama_ref.safetensors import read_safetensors, read_safetensors_header, save_safetensors
from llama_ref.loader import read_checkpoint
from llama_ref.matrices import BFloat16Matrix, RowPermuted, bf16_to_f32
from llama_ref.config import LlamaConfig
from llama_ref.output import MARKER
from llama_ref.errors import (CheckpointError, LlamaRefError, NonFiniteWeightsError, OutputError, ShapeMismatchError,
                              TokenizerError)
from llama_ref.model import permute_qk_hf_to_meta
from llama_ref.weights import weight_shapes
from conftest import random_weights  # noqa: E402

GQA = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40, max_seq_len=16)
MHA_TIED = LlamaConfig(dim=24, n_layers=3, n_heads=3, hidden_dim=40, vocab_size=30, max_seq_len=8,
                       tie_embeddings=True)





def assert_same(got, want):
    assert list(got) == list(want)
    for k in want:
        g = np.asarray(got[k])                # stored matrices (bfloat16, q/k in a RowPermuted view) expand to float32
        assert g.dtype == np.float32 and g.shape == want[k].shape, k
        np.testing.assert_array_equal(g, want[k], err_msg=k)


def write_raw_safetensors(path, header, data: bytes, pad=True):
    """A safetensors file from a hand-written header: for files our writer would never produce."""
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


# ------------------------------------------------------------------------------------------------
# HF directories

@pytest.mark.parametrize("cfg", [GQA, MHA_TIED], ids=["gqa-untied", "mha-tied"])
def test_hf_round_trip_is_exact(tmp_path, cfg):
    w = random_weights(cfg, scale=1.0)
    save_model(tmp_path / "m", cfg, w)
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == [MARKER, "config.json", "generation_config.json", "model.safetensors"]     # MARKER: llama_ref wrote it
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                  "eos_token_id": 2}
    config, got = read_checkpoint(tmp_path / "m")
    assert config == cfg
    assert_same(got, w)
    assert ("lm_head.weight" in got) == (not cfg.tie_embeddings)


def test_sharded_round_trip(tmp_path):
    w = random_weights(GQA, scale=1.0)
    limit = 3 * 48 * 32 * 4                                   # about three MLP matrices per shard
    save_model(tmp_path / "m", GQA, w, max_shard_bytes=limit)
    d = tmp_path / "m"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert not (d / "model.safetensors").exists() and len(shards) > 2
    assert shards == sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    assert set(index["weight_map"]) == set(w)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in w.values())
    for s in shards:                                           # each shard respects the limit (no tensor exceeds it)
        tensors, _ = read_safetensors(d / s)
        assert sum(a.nbytes for a in tensors.values()) <= limit
    config, got = read_checkpoint(d)
    assert config == GQA
    assert_same(got, w)


def test_loaded_arrays_are_views_of_the_file(tmp_path):
    """Proof of memory mapping: the arrays are np.memmap views, and changing the file's bytes changes them."""
    w = random_weights(GQA, scale=1.0)
    save_model(tmp_path / "m", GQA, w)
    _, got = read_checkpoint(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    norm = got["model.norm.weight"]
    assert isinstance(norm, np.memmap) and os.path.samefile(norm.filename, f)
    assert not norm.flags.writeable                            # read-only: a notebook cannot corrupt the checkpoint
    assert np.shares_memory(got["model.embed_tokens.weight"], got["model.embed_tokens.weight"].base)
    header, _, data_start, _ = read_safetensors_header(f)
    begin = header["model.norm.weight"][2][0]
    with open(f, "r+b") as fh:                                 # write the file behind the array's back
        fh.seek(data_start + begin)
        fh.write(struct.pack("<f", 123.5))
    assert norm[0] == np.float32(123.5)


def test_saving_over_a_loaded_model_keeps_the_old_arrays_valid(tmp_path):
    """os.replace swaps in a new file; the memory-mapped old one is never written into."""
    w, w2 = random_weights(GQA, 0, scale=1.0), random_weights(GQA, 1, scale=1.0)
    save_model(tmp_path / "m", GQA, w)
    _, old = read_checkpoint(tmp_path / "m")
    save_model(tmp_path / "m", GQA, w2, force=True)
    assert_same(old, w)
    assert_same(read_checkpoint(tmp_path / "m")[1], w2)


def test_save_over_existing_dir_keeps_user_files_and_drops_stale_shards(tmp_path):
    d = tmp_path / "m"
    w = random_weights(GQA, scale=1.0)
    save_model(d, GQA, w, max_shard_bytes=20_000)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists; pass --force"):
        save_model(d, GQA, w, extra_files={"README.md": "# tiny"})
    save_model(d, GQA, w, extra_files={"README.md": "# tiny"}, force=True)
    names = sorted(p.name for p in d.iterdir())
    assert names == [MARKER, "README.md", "config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    assert (d / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".llama_ref-tmp-*"))
    save_model(d, GQA, w, max_shard_bytes=20_000, force=True)
    (d / "model.safetensors").write_text("the user's, not ours")                # a name save_model writes
    with pytest.raises(OutputError, match="model.safetensors that llama_ref did not write"):
        save_model(d, GQA, w, force=True)
    assert (d / "model.safetensors").read_text() == "the user's, not ours"


def test_failed_save_leaves_the_existing_model_untouched(tmp_path, monkeypatch):
    d = tmp_path / "m"
    save_model(d, GQA, random_weights(GQA, 0, scale=1.0))
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "_write_safetensors", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        save_model(d, GQA, random_weights(GQA, 1, scale=1.0), force=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the temporary directory is cleaned up


def test_save_model_refuses_bad_input(tmp_path):
    w = random_weights(GQA, scale=1.0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_model(tmp_path / "file", GQA, w)
    bad = dict(w, **{"model.norm.weight": np.full(32, np.nan, np.float32)})
    with pytest.raises(NonFiniteWeightsError, match="model.norm.weight"):
        save_model(tmp_path / "nan", GQA, bad)
    assert not (tmp_path / "nan").exists()
    with pytest.raises(CheckpointError, match="plain file name"):
        save_model(tmp_path / "x", GQA, w, extra_files={"config.json": "{}"})
    with pytest.raises(LlamaRefError, match="tokenizer"):
        save_model(tmp_path / "x", GQA, w, tokenizer_path=tmp_path / "missing.model")


def test_tokenizer_is_copied_and_checked_first(tmp_path):
    cfg = GQA.replace(vocab_size=1024)                               # the size of data/tokenizer's model
    save_model(tmp_path / "m", cfg, random_weights(cfg, scale=1.0), tokenizer_path=paths.DEFAULT_TOKENIZER)
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == paths.DEFAULT_TOKENIZER.read_bytes()
    bad = tmp_path / "t.model"
    bad.write_bytes(b"\x00sentencepiece bytes\xff")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece"):
        save_model(tmp_path / "n", cfg, random_weights(cfg, scale=1.0), tokenizer_path=bad)
    with pytest.raises(TokenizerError, match="1024 pieces but the model's vocab_size is 40"):
        save_model(tmp_path / "n", GQA, random_weights(GQA, scale=1.0), tokenizer_path=paths.DEFAULT_TOKENIZER)
    assert not (tmp_path / "n").exists()


# ------------------------------------------------------------------------------------------------
# safetensors reader and writer

def test_reader_and_writer_agree_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
               "c": rng.standard_normal((2, 2, 2)), "scalar": np.array(2.5, np.float32),
               "empty": np.zeros((0, 4), np.float32)}
    st.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    ours, meta = read_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"format": "pt"} and set(ours) == set(tensors)
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape
        np.testing.assert_array_equal(ours[k], v)
    save_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = st.load_file(tmp_path / "ours.safetensors")
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and theirs[k].shape == v.shape
        np.testing.assert_array_equal(theirs[k], v)
    raw = (tmp_path / "ours.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}   # padded, as the spec says


def test_bf16_is_converted_to_float32_exactly(tmp_path):
    # bfloat16 = the top 16 bits of a float32: 0x3F80 -> 1.0, 0xC020 -> -2.5, 0x4049 -> 3.140625, 0x7F7F -> max bf16
    bits = np.array([0x3F80, 0xC020, 0x4049, 0x0000, 0x7F7F], dtype="<u2")
    want = np.array([1.0, -2.5, 3.140625, 0.0, 3.3895313892515355e38], dtype=np.float32)
    np.testing.assert_array_equal(bf16_to_f32(bits), want)
    f = write_raw_safetensors(tmp_path / "bf.safetensors",
                              {"x": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}}, bits.tobytes())
    got, _ = read_safetensors(f)
    assert got["x"].dtype == np.float32                       # a vector (a norm) becomes float32
    np.testing.assert_array_equal(got["x"], want)
    f = write_raw_safetensors(tmp_path / "bf2.safetensors",
                              {"x": {"dtype": "BF16", "shape": [1, 5], "data_offsets": [0, 10]}}, bits.tobytes())
    got, _ = read_safetensors(f)
    assert isinstance(got["x"], BFloat16Matrix) and isinstance(got["x"].data.base, np.memmap)   # stays bf16, mapped
    np.testing.assert_array_equal(got["x"].dequantize(), want[None])


def test_hf_dir_in_bf16_f16_f64_loads_as_float(tmp_path):
    """A model saved in bf16 (as most hub checkpoints are), f16 or f64 loads; f16 stays a zero-copy view."""
    pytest.importorskip("safetensors.numpy")
    import safetensors.numpy as st
    w = random_weights(GQA, scale=1.0)
    d = tmp_path / "m"
    d.mkdir()
    GQA.save(d / "config.json", force=True)
    # bf16 by hand: truncate the float32 bits (exactly representable after we round w to bf16 first)
    w_bf = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in w.items()}
    names = list(w_bf)
    header, data, pos = {}, b"", 0
    for k in names:
        b = (w_bf[k].view(np.uint32) >> 16).astype("<u2").tobytes()
        header[k] = {"dtype": "BF16", "shape": list(w_bf[k].shape), "data_offsets": [pos, pos + len(b)]}
        data, pos = data + b, pos + len(b)
    write_raw_safetensors(d / "model.safetensors", header, data)
    _, got = read_checkpoint(d)
    assert_same(got, w_bf)
    st.save_file({k: v.astype(np.float16) for k, v in w.items()}, d / "model.safetensors", metadata={"format": "pt"})
    _, got16 = read_checkpoint(d)
    assert got16["model.norm.weight"].dtype == np.float16 and isinstance(got16["model.norm.weight"], np.memmap)
    assert isinstance(got["model.layers.0.mlp.up_proj.weight"], BFloat16Matrix)
    st.save_file({k: v.astype(np.float64) for k, v in w.items()}, d / "model.safetensors", metadata={"format": "pt"})
    _, got64 = read_checkpoint(d)
    assert_same(got64, w)                                     # float32 -> float64 -> float32 is exact


GOOD = {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "u": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "does not exist"),
    (lambda p: p.write_bytes(b"\x01\x02\x03"), "too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 1000) + b"{}"), "header claims 1000 bytes"),
    (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json"), "not valid JSON"),
    (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"[1, 2]  "), "must be a JSON object"),
    (lambda p: write_raw_safetensors(p, GOOD, bytes(20)), "'u' ends at data byte 24 .* truncated"),
    (lambda p: write_raw_safetensors(p, dict(GOOD, u={"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}),
                                     bytes(24)), "'u' .*overlaps tensor 't'"),
    (lambda p: write_raw_safetensors(p, dict(GOOD, u={"dtype": "F32", "shape": [3], "data_offsets": [16, 24]}),
                                     bytes(24)), "'u': header says F32 \\(3,\\) = 12 bytes .* header lies"),
    (lambda p: write_raw_safetensors(p, dict(GOOD, u={"dtype": "I4", "shape": [2], "data_offsets": [16, 24]}),
                                     bytes(24)), "'u' has dtype 'I4'"),
    (lambda p: write_raw_safetensors(p, dict(GOOD, u={"dtype": "F32", "shape": [-2], "data_offsets": [16, 24]}),
                                     bytes(24)), "'u' has shape"),
    (lambda p: write_raw_safetensors(p, dict(GOOD, u={"dtype": "F32", "shape": [2], "data_offsets": [24, 16]}),
                                     bytes(24)), "'u' has data_offsets \\[24, 16\\]"),
    (lambda p: write_raw_safetensors(p, {"u": GOOD["u"]}, bytes(24)), "belong to no tensor"),
    (lambda p: write_raw_safetensors(p, GOOD, bytes(32)), "trailing bytes"),
    (lambda p: write_raw_safetensors(p, dict(GOOD, u={"dtype": "F32"}), bytes(24)), "'u': header entry must have"),
    (lambda p: write_raw_safetensors(p, dict(GOOD, __metadata__={"format": 1}), bytes(24)), "__metadata__"),
], ids=["missing", "short", "header-too-long", "not-json", "not-object", "truncated", "overlap", "size-lie",
        "dtype", "neg-shape", "reversed-offsets", "gap", "trailing", "incomplete-entry", "metadata"])
def test_corrupt_safetensors_raise_clear_errors(tmp_path, make, message):
    f = tmp_path / "bad.safetensors"
    make(f)
    with pytest.raises(CheckpointError, match=message) as e:
        read_safetensors(f)
    assert str(f) in str(e.value)
    assert any(fix in str(e.value) for fix in ("re-", "check the path", "convert"))


def test_the_valid_twin_of_the_corrupt_files_loads(tmp_path):
    """The corruption cases above differ from this file in one field only; it must load."""
    data = np.arange(6, dtype="<f4").tobytes()
    got, _ = read_safetensors(write_raw_safetensors(tmp_path / "ok.safetensors", GOOD, data, pad=False))
    np.testing.assert_array_equal(got["t"], [[0, 1], [2, 3]])
    np.testing.assert_array_equal(got["u"], [4, 5])


def test_truncated_model_file_names_file_and_tensor(tmp_path):
    save_model(tmp_path / "m", GQA, random_weights(GQA, scale=1.0))
    f = tmp_path / "m" / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="'lm_head.weight' ends at .* truncated; re-download"):
        read_checkpoint(tmp_path / "m")


def test_broken_shard_index(tmp_path):
    d = tmp_path / "m"
    save_model(d, GQA, random_weights(GQA, scale=1.0), max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (d / first).rename(d / "moved.safetensors")
    with pytest.raises(CheckpointError, match=f"lists shard {first} but .* does not exist"):
        read_checkpoint(d)
    (d / "moved.safetensors").rename(d / first)
    index["weight_map"]["model.norm.weight"] = first           # the index now lies about where a tensor is
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index is out of date|shards and the index disagree"):
        read_checkpoint(d)


# ------------------------------------------------------------------------------------------------
# Validation against the config

def test_config_and_weights_disagree_on_shape(tmp_path):
    save_model(tmp_path / "m", GQA, random_weights(GQA, scale=1.0))
    GQA.replace(hidden_dim=64).save(tmp_path / "m" / "config.json", force=True)
    with pytest.raises(ShapeMismatchError) as e:
        read_checkpoint(tmp_path / "m")
    msg = str(e.value)
    assert "'model.layers.0.mlp.gate_proj.weight'" in msg and "(48, 32)" in msg and "(64, 32)" in msg
    assert "config.json and the weights disagree" in msg and "intermediate_size" in msg


def test_vocab_mismatch_names_embedding(tmp_path):
    save_model(tmp_path / "m", GQA, random_weights(GQA, scale=1.0))
    GQA.replace(vocab_size=41).save(tmp_path / "m" / "config.json", force=True)
    with pytest.raises(ShapeMismatchError, match="'model.embed_tokens.weight' .* \\(40, 32\\) .* \\(41, 32\\)"):
        read_checkpoint(tmp_path / "m")


def test_nan_weight_is_named(tmp_path):
    w = random_weights(GQA, scale=1.0)
    w["model.layers.1.self_attn.v_proj.weight"][3, 5] = np.inf
    w["model.layers.1.self_attn.v_proj.weight"][4, 0] = np.nan
    d = tmp_path / "m"
    d.mkdir()
    GQA.save(d / "config.json", force=True)
    save_safetensors(d / "model.safetensors", w)              # the low-level writer does not validate
    with pytest.raises(NonFiniteWeightsError, match="'model.layers.1.self_attn.v_proj.weight' .* 2 NaN/Inf values "
                                                    "\\(first at index \\(3, 5\\)\\)"):
        read_checkpoint(d)
    cfg, got = read_checkpoint(d, check_finite=False)              # opt-out for inspecting a broken checkpoint
    assert np.isnan(got["model.layers.1.self_attn.v_proj.weight"][4, 0])


def test_finite_check_works_in_chunks(monkeypatch):
    a = np.ones(1000, np.float16)
    a[999] = np.nan
    with pytest.raises(NonFiniteWeightsError, match="1 NaN/Inf values \\(first at index \\(999,\\)\\)"):
        weights_mod.check_finite_array("x", a, chunk=64)
    weights_mod.check_finite_array("x", np.ones((7, 9), np.float32), chunk=5)


def test_untied_config_without_lm_head(tmp_path):
    tied = GQA.replace(tie_embeddings=True)
    save_model(tmp_path / "m", tied, random_weights(tied, scale=1.0))
    GQA.save(tmp_path / "m" / "config.json", force=True)                  # now says untied
    with pytest.raises(CheckpointError, match="'lm_head.weight' is missing .*tie_word_embeddings=false"):
        read_checkpoint(tmp_path / "m")


def test_tied_config_ignores_lm_head_and_inv_freq(tmp_path):
    w = random_weights(GQA, scale=1.0)                                    # has lm_head.weight
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    d = tmp_path / "m"
    d.mkdir()
    tied = GQA.replace(tie_embeddings=True)
    tied.save(d / "config.json", force=True)
    save_safetensors(d / "model.safetensors", w)
    cfg, got = read_checkpoint(d)
    assert cfg.tie_embeddings and set(got) == set(weight_shapes(tied))


def test_unexpected_tensors_are_refused(tmp_path):
    w = random_weights(GQA, scale=1.0)
    w["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    with pytest.raises(CheckpointError, match="unexpected tensor.*q_proj.bias.*different architecture"):
        check_weights(GQA, w)
    w = random_weights(GQA.replace(n_layers=3), scale=1.0)
    with pytest.raises(CheckpointError, match="weights hold 3 layers but config.json says num_hidden_layers=2"):
        check_weights(GQA, w)
    with pytest.raises(CheckpointError, match="weights hold 2 layers but config.json says num_hidden_layers=3"):
        check_weights(GQA.replace(n_layers=3), random_weights(GQA, scale=1.0))


def test_meta_names_get_a_conversion_hint():
    with pytest.raises(CheckpointError, match="Meta's original checkpoint format"):
        check_weights(GQA, {"tok_embeddings.weight": np.zeros((40, 32), np.float32)})


# ------------------------------------------------------------------------------------------------
# llama2.c .bin

@pytest.mark.parametrize("cfg", [GQA, MHA_TIED, GQA.replace(tie_embeddings=True)], ids=["gqa-unshared",
                                                                                       "mha-shared", "gqa-shared"])
@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_round_trip(tmp_path, cfg, version):
    w = random_weights(cfg, scale=1.0)
    f = save_llama2c(tmp_path / "m.bin", cfg, w, version=version)
    config, got = read_checkpoint(f)
    assert config == cfg
    assert_same(got, w)
    assert isinstance(got["model.layers.0.mlp.down_proj.weight"], np.memmap)    # views of the file
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, RowPermuted) and isinstance(q.inner.data.base, np.memmap)   # q/k too: reordered, not copied


def test_llama2c_v0_byte_layout(tmp_path):
    """Read the file the way run.c does (independent of our loader): header, then fixed offsets, Meta q/k rows."""
    cfg, w = GQA, random_weights(GQA, scale=1.0)
    f = save_llama2c(tmp_path / "m.bin", cfg, w)
    raw = f.read_bytes()
    C, H, V, L, nh, nkv, hs, T = 32, 48, 40, 2, 4, 2, 8, 16
    assert struct.unpack("<7i", raw[:28]) == (C, H, L, nh, nkv, -V, T)          # negative vocab: unshared
    floats = np.frombuffer(raw[28:], "<f4")
    n_total = V * C + L * C + L * (nh * hs) * C + 2 * L * (nkv * hs) * C + L * C * (nh * hs) + L * C \
        + 3 * L * C * H + C + 2 * T * (hs // 2) + V * C
    assert floats.size == n_total
    np.testing.assert_array_equal(floats[:V * C].reshape(V, C), w["model.embed_tokens.weight"])
    wq0 = floats[V * C + L * C:][:nh * hs * C].reshape(nh * hs, C)
    np.testing.assert_array_equal(wq0, permute_qk_hf_to_meta(w["model.layers.0.self_attn.q_proj.weight"], nh))
    assert not np.array_equal(wq0, w["model.layers.0.self_attn.q_proj.weight"])  # the permutation did something
    np.testing.assert_array_equal(floats[-V * C:].reshape(V, C), w["lm_head.weight"])
    cos = floats[-V * C - 2 * T * (hs // 2):][:T * (hs // 2)].reshape(T, hs // 2)   # legacy freq_cis_real
    np.testing.assert_allclose(cos[3, 1], np.cos(3 * 10000.0 ** (-2 / hs)), rtol=1e-6)


def test_llama2c_v1_byte_layout(tmp_path):
    """export.py --version 1: 256-byte "ak42" header, then norms first, then the embedding and the matrices."""
    cfg, w = MHA_TIED, random_weights(MHA_TIED, scale=1.0)
    raw = save_llama2c(tmp_path / "m.bin", cfg, w, version=1).read_bytes()
    C, H, V, L, nh = 24, 40, 30, 3, 3
    assert raw[:4] == b"24ka"                            # uint32 0x616b3432 little-endian: "ak42" reversed
    assert struct.unpack("<i7iB", raw[4:37]) == (1, C, H, L, nh, nh, V, 8, 1)
    assert raw[37:256] == bytes(219)
    floats = np.frombuffer(raw[256:], "<f4")
    assert floats.size == 2 * L * C + C + V * C + 4 * L * C * C + 3 * L * C * H           # shared: no wcls
    np.testing.assert_array_equal(floats[C:2 * C], w["model.layers.1.input_layernorm.weight"])
    np.testing.assert_array_equal(floats[L * C:L * C + C], w["model.layers.0.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(floats[2 * L * C:2 * L * C + C], w["model.norm.weight"])
    emb = floats[2 * L * C + C:][:V * C].reshape(V, C)
    np.testing.assert_array_equal(emb, w["model.embed_tokens.weight"])
    w3_last = floats[-C * H:].reshape(H, C)                                                # up_proj of the last layer
    np.testing.assert_array_equal(w3_last, w["model.layers.2.mlp.up_proj.weight"])


def test_llama2c_truncated_or_padded(tmp_path):
    f = save_llama2c(tmp_path / "m.bin", GQA, random_weights(GQA, scale=1.0))
    size = f.stat().st_size
    os.truncate(f, size - 4)
    with pytest.raises(CheckpointError, match=f"implies {size} bytes but the file has {size - 4}: it is truncated"):
        read_checkpoint(f)
    with open(f, "ab") as fh:
        fh.write(bytes(12))
    with pytest.raises(CheckpointError, match="longer than its header says"):
        read_checkpoint(f)


def test_llama2c_bad_headers(tmp_path):
    f = tmp_path / "m.bin"
    f.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="too short for a llama2.c header"):
        read_checkpoint(f)
    f.write_bytes(struct.pack("<7i", 30, 64, 2, 4, 4, 32, 16) + bytes(100))     # 30 % 4 != 0
    with pytest.raises(CheckpointError, match="does not describe a Llama model"):
        read_checkpoint(f)
    f.write_bytes(struct.pack("<Ii7iBi", 0x616B3432, 2, 32, 48, 2, 4, 2, 40, 16, 1, 64).ljust(256, b"\0"))
    with pytest.raises(CheckpointError, match="version-2 \\(Q8_0"):
        read_checkpoint(f)
    f.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="PyTorch zip"):
        read_checkpoint(f)


def test_llama2c_refuses_configs_it_cannot_store(tmp_path):
    with pytest.raises(CheckpointError, match="rope_theta=500000"):
        save_llama2c(tmp_path / "m.bin", GQA.replace(rope_theta=500000.0), random_weights(GQA, scale=1.0))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# Dispatch, memory

def test_load_model_dispatch_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; give an HF model directory"):
        read_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_checkpoint(tmp_path)
    GQA.save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="PyTorch pickle"):
        read_checkpoint(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_checkpoint(tmp_path / "x.txt")


def test_gguf_dispatch(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(20))
    monkeypatch.setattr(loader.gguf_io, "load_gguf", lambda path, check_finite=True: ("called", path))
    assert read_checkpoint(f) == ("called", f)


def test_safetensors_file_path_loads_its_directory(tmp_path):
    w = random_weights(GQA, scale=1.0)
    save_model(tmp_path / "m", GQA, w)
    assert_same(read_checkpoint(tmp_path / "m" / "model.safetensors")[1], w)


# ------------------------------------------------------------------------------------------------
# transformers loads what we save

@pytest.mark.parametrize("cfg, shard", [(GQA, None), (MHA_TIED, None), (GQA, 20_000)],
                         ids=["gqa-untied", "mha-tied", "gqa-sharded"])
def test_transformers_loads_our_directory(tmp_path, cfg, shard):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    w = random_weights(cfg, scale=1.0)
    save_model(tmp_path / "m", cfg, w, max_shard_bytes=shard)
    model, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    sd = model.state_dict()
    for k, v in w.items():
        np.testing.assert_array_equal(sd[k].to(torch.float32).numpy(), v, err_msg=k)
    if cfg.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
