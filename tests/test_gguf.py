"""Tests of llama_ref.gguf_io: what GGUFReader (gguf-py) sees in our files, the round trip into our forward, and an
independent reader (transformers' GGUF loader: its own dequantization and q/k un-permutation) on the same files."""
import io
import random
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
from gguf import GGMLQuantizationType as GT, GGUFReader  # noqa: E402

from llama_ref import gguf_io as G, quant as Q  # noqa: E402
from llama_ref.config import LlamaConfig  # noqa: E402
from llama_ref.errors import CheckpointError, OutputError, QuantizationError  # noqa: E402
from llama_ref.loader import load  # noqa: E402
from llama_ref.model import Llama  # noqa: E402
from llama_ref.weights import weight_shapes
from conftest import random_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:GGUF written without a tokenizer")

CFG = LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=320, max_seq_len=64,
                  norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A tiny Llama-style SentencePiece model (BPE, byte fallback, unk/bos/eos = 0/1/2) with 320 pieces."""
    random.seed(0)
    words = "the cat dog sat on a mat and ran to big red blue house tree sun moon star fish bird".split()
    text = [" ".join(random.choice(words) for _ in range(12)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2, hard_vocab_limit=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, random_weights(CFG, 0, scale=0.1))


def convert_hf_to_gguf_permute(weights, n_head, n_head_kv=None):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, transcribed (the HF -> Meta q/k row order)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


EXPECTED_2D_TYPE = {"f32": GT.F32, "f16": GT.F16, "q8_0": GT.Q8_0, "q4_0": GT.Q4_0}


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_reader_sees_llama_metadata_and_types(model, tokenizer_path, tmp_path, file_type):
    path = G.save_gguf(tmp_path / f"m-{file_type}.gguf", CFG, model, tokenizer_path, file_type)
    r = GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "llama"
    assert kv["general.file_type"] == {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}[file_type]   # LlamaFileType
    assert kv["llama.context_length"] == 64 and kv["llama.embedding_length"] == 128
    assert kv["llama.block_count"] == 2 and kv["llama.feed_forward_length"] == 256
    assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.rope.dimension_count"] == 32 and kv["llama.vocab_size"] == 320
    assert kv["llama.rope.freq_base"] == 10000.0
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    # tokenizer as convert_hf_to_gguf writes it for SentencePiece models
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(320)]
    np.testing.assert_allclose(kv["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(320)])
    types = kv["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE and sp.id_to_piece(3) == "<0x00>"
    assert types[-1] == gguf.TokenType.NORMAL
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    # tensors: llama.cpp names, ne = [in, out] (fastest axis first), types per file type
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(weight_shapes(CFG))
    assert list(tensors["blk.1.attn_k.weight"].shape) == [128, 64]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [256, 128]
    assert list(tensors["token_embd.weight"].shape) == [128, 320]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GT.F32
    assert tensors["output_norm.weight"].tensor_type == GT.F32
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight", "token_embd.weight"):
        assert tensors[name].tensor_type == EXPECTED_2D_TYPE[file_type], name
    expected_out = GT.Q8_0 if file_type == "q4_0" else EXPECTED_2D_TYPE[file_type]   # policy: classifier 8-bit
    assert tensors["output.weight"].tensor_type == expected_out


def test_q_k_rows_in_meta_layout(model, tmp_path):
    path = G.save_gguf(tmp_path / "m.gguf", CFG, model, None, "f32")
    tensors = {t.name: t.data for t in GGUFReader(str(path)).tensors}
    wq = model.weights["model.layers.1.self_attn.q_proj.weight"]
    wk = model.weights["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], convert_hf_to_gguf_permute(wq, 4, 4))
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], convert_hf_to_gguf_permute(wk, 4, 2))
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], model.weights["model.layers.1.self_attn.v_proj.weight"])


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_quantized_bytes_in_file_equal_gguf_py(model, tmp_path, file_type):
    path = G.save_gguf(tmp_path / "m.gguf", CFG, model, None, file_type)
    tensors = {t.name: t.data for t in GGUFReader(str(path)).tensors}
    qt = GT.Q8_0 if file_type == "q8_0" else GT.Q4_0
    wk = model.weights["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"],
                                  gguf.quants.quantize(convert_hf_to_gguf_permute(wk, 4, 2), qt))
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"],
                                  gguf.quants.quantize(model.weights["model.layers.0.mlp.down_proj.weight"], qt))


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0", "q4_0"])
def test_round_trip_logits(model, tmp_path, file_type):
    path = G.save_gguf(tmp_path / "m.gguf", CFG, model, None, file_type)
    config, weights = G.load_gguf(path)
    assert config == CFG
    loaded = Llama(config, weights)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 16)
    if file_type in ("q8_0", "q4_0"):
        expected = Q.quantize_model(model, file_type).forward(tokens)
        for layer in loaded.params["layers"]:                   # runs quantized, not expanded
            assert isinstance(layer["w_up"], Q.QuantizedMatrix) and layer["w_up"].kind == file_type
        np.testing.assert_array_equal(loaded.forward(tokens), expected)   # same bytes, same operations
    elif file_type == "f32":
        np.testing.assert_array_equal(loaded.forward(tokens), model.forward(tokens))
    else:
        f16 = Llama(CFG, {k: (v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v)
                          for k, v in model.weights.items()})
        np.testing.assert_allclose(loaded.forward(tokens), f16.forward(tokens), atol=1e-5, rtol=0)
    # Llama() also accepts the loaded dict (quantized matrices expand through __array__): same logits
    np.testing.assert_allclose(Llama(config, weights).forward(tokens), loaded.forward(tokens), atol=1e-5, rtol=0)


def test_tied_embeddings_round_trip(tmp_path):
    cfg = CFG.replace(tie_embeddings=True)
    w = random_weights(cfg, 3, scale=0.1)
    m = Llama(cfg, w)
    path = G.save_gguf(tmp_path / "t.gguf", cfg, m, None, "q4_0")
    assert "output.weight" not in {t.name for t in GGUFReader(str(path)).tensors}
    config, weights = G.load_gguf(path)
    assert config.tie_embeddings
    tokens = np.arange(9)
    np.testing.assert_array_equal(Llama(config, weights).forward(tokens),
                                  Q.quantize_model(m, "q4_0").forward(tokens))


def test_transformers_reads_our_gguf_with_same_logits(model, tokenizer_path, tmp_path):
    """An independent reader: transformers dequantizes and un-permutes GGUF tensors with its own code."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, 20)
    for file_type in ("f32", "q8_0", "q4_0"):
        path = G.save_gguf(tmp_path / f"m-{file_type}.gguf", CFG, model, tokenizer_path, file_type)
        hf_cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        hf = LlamaForCausalLM(HFConfig(**hf_cfg)).eval()
        sd = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
        hf.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
        with torch.no_grad():
            theirs = hf(torch.tensor(tokens)[None]).logits[0].numpy()
        ours = load(path).forward(tokens)
        # float32 both sides, different kernels: ~1e-6 relative. A q/k layout mix-up gives errors of order 1.
        np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0, err_msg=file_type)


def test_unsupported_types_and_architectures(tmp_path):
    # Q8_1 (llama.cpp's activation format) has no dequantization, in ggml's CPU backend or in gguf-py
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for k, v in {"embedding_length": 256, "block_count": 1, "attention.head_count": 2,
                 "feed_forward_length": 256, "context_length": 16}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((8, 8 * 40), np.uint8), raw_dtype=GT.Q8_1)   # 8 rows of 256 values
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()   # noqa: E702
    with pytest.raises(CheckpointError, match="type Q8_1, which neither llama_ref nor gguf-py can dequantize"):
        G.load_gguf(tmp_path / "k.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()   # noqa: E702
    with pytest.raises(CheckpointError, match="gpt2"):
        G.load_gguf(tmp_path / "g.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError):
        G.load_gguf(tmp_path / "junk.gguf")


def test_refuses_overwrite_and_bad_types(model, tmp_path):
    path = G.save_gguf(tmp_path / "m.gguf", CFG, model, None, "q8_0")
    with pytest.raises(OutputError, match="exists"):
        G.save_gguf(path, CFG, model, None, "q8_0")
    G.save_gguf(path, CFG, model, None, "q4_0", force=True)
    assert GGUFReader(str(path)).get_field("general.file_type").contents() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]          # no temp file left behind
    with pytest.raises(QuantizationError, match="q3_k"):
        G.save_gguf(tmp_path / "x.gguf", CFG, model, None, "q3_k")
    # a W4A16 model has no GGUF type: its dequantized values are written (F16 here: a 2^-11 relative rounding)
    w4 = Q.quantize_model(model, "w4a16-g64")
    G.save_gguf(tmp_path / "w4.gguf", CFG, w4, None, "f16")
    _, back = G.load_gguf(tmp_path / "w4.gguf")
    np.testing.assert_allclose(back["model.layers.0.mlp.up_proj.weight"],
                               w4.weights["model.layers.0.mlp.up_proj.weight"].dequantize(), rtol=2 ** -11, atol=0)


def test_rows_not_multiple_of_32_fall_back_to_f16(tmp_path):
    cfg = CFG.replace(hidden_dim=200)
    w = random_weights(cfg, 4, scale=0.1)
    path = G.save_gguf(tmp_path / "m.gguf", cfg, w, None, "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == GT.F16 and types["blk.0.ffn_up.weight"] == GT.Q8_0
    config, weights = G.load_gguf(path)
    Llama(config, weights).forward([1, 2, 3])


def test_cli_quantize_and_export(model, tokenizer_path, tmp_path, capsys):
    import json
    from llama_ref.__main__ import main
    from llama_ref.checkpoint import save_model
    src = tmp_path / "m"
    save_model(src, CFG, model.weights, tokenizer_path=tokenizer_path)
    assert main(["quantize", "--model", str(src), "--scheme", "q4_0", "--out", str(tmp_path / "m.gguf"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scheme"] == "q4_0" and out["tokenizer"].endswith("tokenizer.model")
    r = GGUFReader(str(tmp_path / "m.gguf"))
    assert r.get_field("general.file_type").contents() == 2 and len(r.get_field("tokenizer.ggml.tokens").data) == 320
    tokens = np.arange(12)
    np.testing.assert_array_equal(load(tmp_path / "m.gguf").forward(tokens),
                                  Q.quantize_model(model, "q4_0").forward(tokens))
    # refuses to overwrite without --force; GGUF cannot hold W4A16
    assert main(["quantize", "--model", str(src), "--scheme", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["quantize", "--model", str(src), "--scheme", "w4a16-g64", "--out", str(tmp_path / "w.gguf")]) == 2
    assert main(["quantize", "--model", str(src), "--scheme", "w4a16-g64", "--out", str(tmp_path / "w4")]) == 0
    np.testing.assert_array_equal(load(tmp_path / "w4").forward(tokens),
                                  Q.quantize_model(model, "w4a16-g64").forward(tokens))
    # export from the GGUF (its vocabulary carried over) and to llama2.c
    assert main(["export", "--model", str(tmp_path / "m.gguf"), "--format", "gguf-f32", "--out", str(tmp_path / "e.gguf")]) == 0
    assert G.read_gguf_vocab(tmp_path / "e.gguf") == G.read_gguf_vocab(tmp_path / "m.gguf")
    assert main(["export", "--model", str(src), "--format", "llama2c", "--out", str(tmp_path / "m.bin")]) == 0
    from llama_ref.loader import read_checkpoint
    config, weights = read_checkpoint(tmp_path / "m.bin")
    np.testing.assert_allclose(Llama(config, weights).forward(tokens), model.forward(tokens), atol=1e-5, rtol=0)


def test_linear_rope_scaling_round_trips_and_other_scalings_are_refused(tmp_path):
    """llama.cpp keeps linear RoPE scaling as llama.rope.scaling.type/factor: written and read back, so a long-context
    fine-tune keeps its positions; dynamic/llama3 have no Llama GGUF form and are refused, as a GGUF with yarn is."""
    from llama_ref.config import RopeScaling
    from llama_ref.llama2c import save_llama2c
    cfg = CFG.replace(rope_scaling=RopeScaling("linear", 4.0))
    weights = random_weights(cfg, seed=5)
    path = G.save_gguf(tmp_path / "lin.gguf", cfg, weights, None, "f32")
    r = G._open_gguf(path)
    assert G._field(r, "llama.rope.scaling.type") == "linear" and G._field(r, "llama.rope.scaling.factor") == 4.0
    config, loaded = G.load_gguf(path)
    assert config == cfg
    tokens = np.arange(40) % cfg.vocab_size
    np.testing.assert_array_equal(Llama(config, loaded).forward(tokens), Llama(cfg, weights).forward(tokens))
    assert np.abs(Llama(CFG, weights).forward(tokens) - Llama(cfg, weights).forward(tokens)).max() > 1e-2
    for kind in ("dynamic", "llama3"):
        with pytest.raises(CheckpointError, match=kind):
            G.save_gguf(tmp_path / f"{kind}.gguf", cfg.replace(rope_scaling=RopeScaling(kind, 2.0)), weights, None, "f32")
        assert not (tmp_path / f"{kind}.gguf").exists()
    with pytest.raises(CheckpointError, match="RoPE scaling"):
        save_llama2c(tmp_path / "lin.bin", cfg, weights)
    w = gguf.GGUFWriter(str(tmp_path / "yarn.gguf"), "llama")                  # metadata only: what is read first
    G.add_llama_metadata(w, CFG, 0, quantized=False)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="yarn"):
        G.gguf_config(G._open_gguf(tmp_path / "yarn.gguf"))


# ------------------------------------------------------------------------------------------------
# Our header reader (GGUFHeader) against gguf-py's GGUFReader, and what it refuses

@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
def test_header_reader_equals_gguf_py(model, tokenizer_path, tmp_path, file_type):
    path = G.save_gguf(tmp_path / "m.gguf", CFG, model, tokenizer_path, file_type)
    ours, theirs = G.GGUFHeader(path), GGUFReader(str(path))
    assert ours.kv == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == [int(x) for x in b.shape]
        np.testing.assert_array_equal(a.data.view(np.uint8), np.asarray(b.data).view(np.uint8))


def _header(n_tensors, n_kv, body=b""):
    import struct
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


@pytest.mark.parametrize("raw, says", [
    (b"GGML" + bytes(20), "magic"),
    (b"GGUF" + bytes([1, 0, 0, 0]) + bytes(16), "version 0x1"),
    (_header(0, 2 ** 40), "metadata count is 1,099,511,627,776, more than"),
    (_header(2 ** 40, 0), "tensor count is 1,099,511,627,776, more than"),
    (_header(0, 1, b"\xff" * 8 + bytes(16)), "the length of a metadata key is"),
    (_header(0, 1, (3).to_bytes(8, "little") + b"abc" + (9).to_bytes(4, "little") + (6).to_bytes(4, "little")
             + (2 ** 50).to_bytes(8, "little")), "the length of 'abc' is"),
    (_header(0, 1, (3).to_bytes(8, "little") + b"abc" + (77).to_bytes(4, "little")), "value type 77"),
    (_header(0, 2, ((3).to_bytes(8, "little") + b"abc" + (4).to_bytes(4, "little") + bytes(4)) * 2), "twice"),
    (_header(0, 1, (2).to_bytes(8, "little") + b"\xff\xfe" + (4).to_bytes(4, "little") + bytes(4)), "not UTF-8"),
    (_header(1, 0, (1).to_bytes(8, "little") + b"t" + (9).to_bytes(4, "little") + bytes(16)), "9 dimensions"),
    (_header(1, 0, (1).to_bytes(8, "little") + b"t" + (1).to_bytes(4, "little") + (64).to_bytes(8, "little")
             + (0).to_bytes(4, "little") + (0).to_bytes(8, "little")), "past the end"),
    (_header(1, 0, (1).to_bytes(8, "little") + b"t" + (1).to_bytes(4, "little") + (64).to_bytes(8, "little")
             + (8888).to_bytes(4, "little") + (0).to_bytes(8, "little")), "type 8888"),
])
def test_header_reader_refuses_a_lying_header_by_name(tmp_path, raw, says):
    p = tmp_path / "bad.gguf"
    p.write_bytes(raw)
    with pytest.raises(CheckpointError, match=re.escape(says)):
        G.GGUFHeader(p)
