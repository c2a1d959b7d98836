"""The one loader: every format a user downloads, memory-mapped, run as stored or packed, with its own tokenizer.

Small random-weight files of real formats (llama_ref.synthetic); the 7B-shaped measurements are benchmarks/big_model.py.
"""
import json
import sys
import warnings

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from llama_ref import loader, quant, synthetic  # noqa: E402
from llama_ref.config import LlamaConfig  # noqa: E402
from llama_ref.errors import CheckpointError, MemoryBudgetError  # noqa: E402
from llama_ref.gguf_io import GGUFMatrix, gguf_to_hf_name  # noqa: E402
from llama_ref.matrices import StoredMatrix, f16_to_f32  # noqa: E402
from llama_ref.model import Llama, permute_qk_meta_to_hf  # noqa: E402
from llama_ref.tokenizer import Tokenizer  # noqa: E402
from llama_ref import paths  # noqa: E402
from conftest import cli  # noqa: E402

# rows a multiple of 256 (K-quant super-blocks); GQA; a vocabulary larger than our tokenizer's 1024 pieces
CFG = LlamaConfig(dim=256, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=1100, max_seq_len=64)
TOKENS = [1, 393, 481, 261, 454, 978, 5, 1099]
BLOCK_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    out = {mix: synthetic.write_gguf(d / f"{mix}.gguf", CFG, mix) for mix in ("f32", "f16", "q8_0", "q4_k_m")}
    for dtype in ("float32", "float16", "bfloat16"):
        out[dtype] = synthetic.write_hf(d / dtype, CFG, dtype, max_shard_bytes=1_000_000)    # sharded
    return out


def gguf_py_weights(path):
    """The GGUF's weights decoded by gguf-py alone (an implementation independent of ours), in HF names and q/k order."""
    r = gguf.GGUFReader(str(path))
    w = {}
    for t in r.tensors:
        name = gguf_to_hf_name(t.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        if "q_proj" in name or "k_proj" in name:
            a = permute_qk_meta_to_hf(a, CFG.n_heads if "q_proj" in name else CFG.n_kv_heads)
        w[name] = a
    return w


# ------------------------------------------------------------------------------------------------
# Decoders

@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0", "Q4_0"])
def test_our_decoders_equal_gguf_py(kind):
    raw = synthetic.random_blocks(kind, 64, 512, np.random.default_rng(0))
    ours = {"Q4_K": quant.dequantize_q4_k, "Q6_K": quant.dequantize_q6_k,
            "Q8_0": quant.dequantize_q8_0, "Q4_0": quant.dequantize_q4_0}[kind](raw)
    np.testing.assert_array_equal(ours, dequantize(raw, GT[kind]))                 # bit for bit
    assert 0.01 < float(np.std(ours)) < 0.04                                         # "sane scales": std ~0.02


def test_f16_bit_conversion_is_exact():
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]                                              # subnormals and -0 included
    np.testing.assert_array_equal(f16_to_f32(finite), finite.astype(np.float32))
    assert np.signbit(f16_to_f32(np.float16(-0.0)))


# ------------------------------------------------------------------------------------------------
# Every format loads and runs; as stored equals packed

@pytest.mark.parametrize("mix", BLOCK_TYPES)
def test_every_gguf_block_type_runs(tmp_path, mix):
    path = synthetic.write_gguf(tmp_path / f"{mix}.gguf", CFG, mix)
    model = loader.load(path)
    assert model.memory.kinds[mix] == 7 * CFG.n_layers + 1 + (not CFG.tie_embeddings)
    ours = model.forward(TOKENS)
    theirs = Llama(CFG, gguf_py_weights(path)).forward(TOKENS)
    # the same weights (gguf-py decodes them independently); float32 sums grouped differently: ~1e-6 of the scale
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=0)


@pytest.mark.parametrize("name", ["f32", "f16", "q8_0", "q4_k_m", "float32", "float16", "bfloat16"])
def test_as_stored_equals_packed_and_holds_no_copies(files, name):
    stored = loader.load(files[name], pack="never")
    packed = loader.load(files[name], pack="always")
    assert stored.memory.path == "as stored"
    assert packed.memory.path == ("packed" if packed.memory.packed_bytes else "as stored")   # quantized: nothing to pack
    # expansion is exact, so both paths multiply the same float32 numbers; only BLAS's grouping differs
    ref = packed.forward(TOKENS)
    np.testing.assert_allclose(stored.forward(TOKENS), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    for layer in stored.params["layers"]:
        for key in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            w = layer[key]
            assert isinstance(w, StoredMatrix)
            for a in w.arrays().values():                      # every weight byte is the file's, not a copy
                base = a
                while not isinstance(base, np.memmap) and getattr(base, "base", None) is not None:
                    base = base.base
                assert isinstance(base, np.memmap) or isinstance(a, np.memmap), (name, key, type(a))


def test_formats_agree_with_each_other(files):
    """f32 GGUF, f32 HF directory: the same seeded weights through two readers give the same logits; f16 and bf16
    differ from them only by their own rounding."""
    hf = loader.load(files["float32"]).forward(TOKENS)
    gg = loader.load(files["f32"]).forward(TOKENS)
    np.testing.assert_allclose(gg, hf, atol=1e-5 * np.abs(hf).max(), rtol=0)
    for name, tol in (("float16", 2e-3), ("f16", 2e-3), ("bfloat16", 2e-2)):      # f16: 11 bits, bf16: 8 bits
        got = loader.load(files[name]).forward(TOKENS)
        assert np.abs(got - hf).max() < tol * np.abs(hf).max(), name


def test_memory_plan_is_reported_and_budget_chooses(files):
    small = loader.load(files["float16"])
    assert small.memory.path == "packed" and small.memory.packed_bytes > 0
    tight = loader.load(files["float16"], memory_budget=1)
    assert tight.memory.path == "as stored"
    q = loader.load(files["q4_k_m"])
    assert q.memory.path == "as stored" and q.memory.packed_bytes == 0       # nothing to pack: quantized stays
    assert all(isinstance(layer["w_up"], GGUFMatrix) for layer in q.params["layers"])
    assert "Q4_K" not in str(q.memory) and "q4_k x" in str(q.memory)


# ------------------------------------------------------------------------------------------------
# The tokenizer that comes with the model

@pytest.mark.parametrize("impl", ["sentencepiece", "python"])
def test_gguf_tokenizer_equals_sentencepiece(files, impl):
    """The GGUF's vocabulary (tokenizer.ggml.*) becomes a tokenizer; both our encoders on it equal the sentencepiece
    library on the original .model (the GGUF vocabulary is ours, padded with unused pieces)."""
    tok = loader.find_tokenizer(files["q4_k_m"], impl=impl)
    ref = Tokenizer(paths.DEFAULT_TOKENIZER)
    assert tok.vocab_size == CFG.vocab_size
    for text in ["Mia has a cat.", "  two  spaces\n\tand a tab", "😀 ü ß 中文", "", "</s> is text here"]:
        assert tok.encode(text, bos=True) == ref.encode(text, bos=True), text
        assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    assert loader.find_tokenizer(files["float16"]).vocab_size == CFG.vocab_size      # tokenizer.model beside it


# ------------------------------------------------------------------------------------------------
# The command line runs every format through the one loader

@pytest.mark.parametrize("name", ["q8_0", "q4_k_m", "bfloat16"])
def test_cli_generate_inspect_chat_on_every_format(files, name, tmp_path):
    r = cli("generate", "--model", files[name], "--prompt", "Mia has", "--max-new-tokens", 3, "--temperature", 0,
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["ids"]) == 3 and out["memory"]["path"] in ("packed", "as stored") and "text" in out
    r = cli("generate", "--model", files[name], "--prompt-ids", "1,5,9", "--max-new-tokens", 2, "--pack", "never")
    assert r.returncode == 0 and "weights as stored, memory-mapped" in r.stderr, r.stderr
    r = cli("inspect", "--model", files[name], "--prompt", "Mia has", "--tap", "logits", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["taps"]["logits"]["shape"][-1] == CFG.vocab_size, r.stderr
    r = cli("chat", "--model", files[name], "--max-new-tokens", 2, "--json", stdin='[{"role": "user", "content": "Hi"}]')
    assert r.returncode == 0 and json.loads(r.stdout)["role"] == "assistant", r.stderr


def test_cli_generate_runs_what_quantize_wrote(files, tmp_path):
    out = tmp_path / "w4"
    r = cli("quantize", "--model", files["float16"], "--scheme", "w4a16-g64", "--out", out)
    assert r.returncode == 0, r.stderr
    r = cli("generate", "--model", out, "--prompt", "Mia has", "--max-new-tokens", 2, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["memory"]["kinds"]["w4-g64"] == 7 * CFG.n_layers


def test_cli_refuses_what_cannot_fit_before_loading(tmp_path):
    huge = LlamaConfig(dim=256, n_layers=2, n_heads=4, hidden_dim=512, vocab_size=1100, max_seq_len=2 ** 24)
    path = synthetic.write_gguf(tmp_path / "long.gguf", huge, "q8_0")
    r = cli("generate", "--model", path, "--prompt-ids", "1", "--max-new-tokens", 2 ** 23)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error: this model needs ~" in r.stderr, r.stderr
    assert "ask for fewer tokens" in r.stderr


def test_missing_shard_and_unreadable_type_are_clear(files, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(files["float16"], d)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-.* does not exist; copy all shards"):
        loader.load(d)
    r = cli("inspect", "--model", d, "--prompt-ids", "1")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_memory_budget_error_is_a_checkpoint_error():
    assert issubclass(MemoryBudgetError, CheckpointError)


# ------------------------------------------------------------------------------------------------
# llama.cpp on the same Q4_K_M file (needs llama-cpp-python, which is not a dependency: see benchmarks/)

def test_llama_cpp_agrees_on_a_q4_k_m_file(files):
    """llama.cpp rounds activations to Q8_K (blocks of 256, 8 bits) before every K-quant dot product; we multiply the
    float32 activations. With that rounding reproduced (set_integer_dot) the logits agree to float32 summation order,
    1e-5 of the largest logit; without it they differ by the activation rounding itself, which a random model's peaked
    attention amplifies to about 2% (measured 0.4%) of the largest logit: the bound here is 5%."""
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(paths.REPO_DIR / "benchmarks"))
    from llamacpp_check import llamacpp_logits
    theirs = llamacpp_logits(files["q4_k_m"], TOKENS)
    scale = np.abs(theirs).max()
    matched = quant.set_integer_dot(loader.load(files["q4_k_m"])).forward(TOKENS)
    assert np.abs(matched - theirs).max() < 1e-5 * scale
    plain = loader.load(files["q4_k_m"]).forward(TOKENS)
    assert np.abs(plain - theirs).max() < 5e-2 * scale
    assert np.abs(plain - theirs).max() > 1e-5 * scale               # the rounding is real: the two runs differ


def test_writers_carry_the_tokenizer_find_tokenizer_finds(files, tmp_path):
    """One rule for which tokenizer came with a model (loader.tokenizer_source): quantizing a .gguf into a directory
    writes the GGUF's own vocabulary as tokenizer.model, and chat --format-only reads the GGUF's vocabulary too."""
    out = tmp_path / "q"
    r = cli("quantize", "--model", files["q8_0"], "--scheme", "q8_0", "--out", out)
    assert r.returncode == 0, r.stderr
    want = loader.find_tokenizer(files["q8_0"])
    got = Tokenizer(out / "tokenizer.model")
    text = "Mia has a cat."
    assert got.vocab_size == want.vocab_size == CFG.vocab_size and got.encode(text) == want.encode(text)
    r = cli("chat", "--format-only", "--model", files["q8_0"], stdin=json.dumps([{"role": "user", "content": text}]))
    assert r.returncode == 0, r.stderr
    assert [int(i) for i in r.stdout.split()] == want.encode(f"[INST] {text} [/INST]", bos=True)
