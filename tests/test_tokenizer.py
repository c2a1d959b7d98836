"""The tokenizer: the pure-Python BPE gives the sentencepiece library's ids, on our model and on others.

Every expected value comes from the real sentencepiece library (or from the Llama 2 spec), never from
our own output.
"""
import gzip
import json
import random
import subprocess
import sys

import pytest
import sentencepiece as spm

from llama_ref.errors import LlamaRefError, TokenizerError
from llama_ref.paths import CORPUS_DIR, DEFAULT_TOKENIZER, REPO_DIR
from llama_ref.__main__ import main as cli_main
from llama_ref.tokenizer import BPETokenizer, Tokenizer, load_model_proto

HARD_STRINGS = [
    "", " ", "  ", "   leading", "trailing   ", "multiple   spaces  here", "\n", "\n\n", "\t", "a\tb\nc\r\nd",
    " \n \t ", "0", "2024", "3.14159 and 1,000,000", "x1y22z333", "!?.,;:'\"()[]{}<>/\\|@#$%^&*-_=+~`",
    "café naïve résumé Ångström", "日本語のテキスト", "中文 和 English", "한국어", "emoji 😀👍🏽 family 👨‍👩‍👧",
    "[INST] What pet does Mia have? [/INST]", "[INST] <<SYS>>\nSpeak like a pirate.\n<</SYS>>\n\nHi! [/INST] Arr. ",
    "<s>not a control token</s> <unk> <0x41>", "\u2581already\u2581escaped \u2581\u2581", "\x00\x01\x7f\x1b[0m",
    "Mia's cat said \"meow\"!", "Once upon a time, there was a little girl named Mia.", "Ω≈ç√∫ ﬁ ½ ²", "\ufeffBOM",
    "a" * 300, " ".join(["the"] * 50),
]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER))


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer(DEFAULT_TOKENIZER)


def _random_text(rng, alphabet, max_len=40):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


# ------------------------------------------------------------------------------------------------
# our model: exact agreement

@pytest.mark.parametrize("text", HARD_STRINGS)
def test_hard_strings_match_sentencepiece_and_round_trip(sp, bpe, text):
    ids = sp.encode(text)
    assert bpe.encode(text) == ids
    assert bpe.decode(ids) == sp.decode(ids)
    # identity normalization + byte fallback lose nothing, except that a literal "▁" in the input is
    # SentencePiece's own space symbol and comes back as " " (the library does the same, see above)
    assert bpe.decode(ids) == text.replace("\u2581", " ")


def test_entire_validation_split_matches_sentencepiece(sp, bpe):
    n_docs = n_tokens = 0
    with gzip.open(CORPUS_DIR / "val.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            ids = bpe.encode(text)
            assert ids == sp.encode(text), text[:80]
            assert bpe.decode(ids) == text
            n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
    assert n_docs >= 500 and n_tokens > 50_000


def test_random_strings_match_sentencepiece(sp, bpe):
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzMTBAL     .,!?'\"\n\t0123456789éü日本😀\u2581<>[]/"
    for _ in range(3000):
        text = _random_text(rng, alphabet)
        assert bpe.encode(text) == sp.encode(text), repr(text)


def test_random_words_of_the_corpus_match_sentencepiece(sp, bpe):
    """Shuffled corpus words exercise the merge order far from the texts the merges were learned on."""
    rng = random.Random(1)
    words = "Once upon a time Mia's cat said meow User: Assistant: [INST] [/INST] <<SYS>> favourite colour .\n\n ?\n".split(" ")
    for _ in range(2000):
        text = "".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(1, 12)))
        assert bpe.encode(text) == sp.encode(text), repr(text)


def test_random_ids_decode_like_sentencepiece(sp, bpe):
    """Includes runs of byte pieces that are not valid UTF-8 (each bad byte becomes U+FFFD)."""
    rng = random.Random(2)
    for _ in range(3000):
        ids = [rng.randrange(sp.vocab_size()) for _ in range(rng.randint(0, 10))]
        ids += [rng.randrange(3, 259) for _ in range(rng.randint(0, 6))]   # byte pieces
        rng.shuffle(ids)
        assert bpe.decode(ids) == sp.decode(ids), ids


def test_parsed_model_file_agrees_with_sentencepiece(sp, bpe):
    assert bpe.vocab_size == sp.vocab_size()
    for i in range(sp.vocab_size()):
        assert bpe.id_to_piece(i) == sp.id_to_piece(i)
        assert bpe.scores[i] == pytest.approx(sp.get_score(i), abs=0)
        assert (bpe.types[i] == 3) == sp.is_control(i)
        assert (bpe.types[i] == 6) == sp.is_byte(i)
        assert (bpe.types[i] == 2) == sp.is_unknown(i)


# ------------------------------------------------------------------------------------------------
# our model has Llama 2's settings

def test_shipped_model_has_llama2_settings(sp):
    m = load_model_proto(DEFAULT_TOKENIZER)
    assert m["model_type"] == "bpe" and m["byte_fallback"]
    assert m["normalizer_name"] == "identity" and m["precompiled_charsmap"] == b""
    assert m["add_dummy_prefix"] and not m["remove_extra_whitespaces"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]   # Llama 2's byte pieces sit at 3..258
    assert sp.vocab_size() == 1024
    # split_digits: no piece holds a digit together with anything else
    assert not any(any(c.isdigit() for c in p) and len(p) > 1 and not sp.is_byte(i)
                   for i, p in enumerate(map(sp.id_to_piece, range(sp.vocab_size()))))
    # the dummy prefix: "Mia" and " Mia" both start with the "▁"-piece
    assert sp.encode("Mia") == sp.encode(" Mia")[1:] or sp.encode("Mia")[0] == sp.encode(" Mia")[-1]


def test_tokenizer_file_is_reproducible(tmp_path):
    """scripts/train_tokenizer.py on the committed corpus rebuilds the committed model byte for byte."""
    subprocess.run([sys.executable, str(REPO_DIR / "scripts" / "train_tokenizer.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    assert (tmp_path / "tokenizer.model").read_bytes() == DEFAULT_TOKENIZER.read_bytes()


# ------------------------------------------------------------------------------------------------
# other Llama-2-family models: user-defined symbols, no byte fallback, whitespace-only pieces

def _train(tmp_path, name, lines, **overrides):
    spec = dict(model_type="bpe", vocab_size=380, hard_vocab_limit=False, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
                max_sentencepiece_length=16, num_threads=1, minloglevel=2)
    spec.update(overrides)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / name), **spec)
    return tmp_path / f"{name}.model"


def _code_like_lines(n=3000, seed=0):
    """Indented code and prose: makes whitespace-only pieces ("▁▁▁▁") and digits appear in the vocab."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "the", "cat", "naïve", "über", "for", "in", "range", "print", "x", "y"]
    lines = []
    for _ in range(n):
        indent = " " * rng.choice([0, 2, 4, 8])
        lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + f" {rng.randint(0, 999)}")
    return lines


@pytest.mark.parametrize("variant", ["llama2_like", "user_defined", "no_byte_fallback", "remove_extra_whitespaces"])
def test_other_models_match_sentencepiece(tmp_path, variant):
    overrides = {"user_defined": dict(user_defined_symbols=["<|tool|>", "[INST]"]),
                 "no_byte_fallback": dict(byte_fallback=False, vocab_size=150),
                 "remove_extra_whitespaces": dict(remove_extra_whitespaces=True)}.get(variant, {})
    path = _train(tmp_path, variant, _code_like_lines(), **overrides)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    bpe = BPETokenizer(path)
    rng = random.Random(3)
    alphabet = "defrunvalthcäöüï    \n\t0123456789😀日<|>[]INST"
    texts = HARD_STRINGS + _code_like_lines(200, seed=1) + [_random_text(rng, alphabet) for _ in range(1500)]
    texts += ["<|tool|>[INST]  x<|tool|>", "[INST][INST]"]
    for text in texts:
        ids = sp.encode(text)
        assert bpe.encode(text) == ids, (variant, repr(text))
        assert bpe.decode(ids) == sp.decode(ids), (variant, repr(text))


# ------------------------------------------------------------------------------------------------
# the Tokenizer interface

@pytest.mark.parametrize("impl", ["sentencepiece", "python"])
def test_tokenizer_interface(impl, sp):
    tok = Tokenizer(impl=impl)
    text = "Mia was happy. She has cats"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids == [1] + sp.encode(text) + [2]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, sp.vocab_size())
    assert tok.decode(ids) == text           # BOS/EOS dropped by id: the trailing "s" survives
    assert tok.decode(tok.encode("<s>cats</s>")) == "<s>cats</s>"   # text that looks like a control piece stays
    assert tok.id_to_piece(1) == "<s>" and tok.pieces(ids[:1]) == ["<s>"]
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.id_to_piece(-1)
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(b"bytes")


def test_unknown_impl_is_refused():
    with pytest.raises(TokenizerError, match="impl"):
        Tokenizer(impl="tiktoken")


# ------------------------------------------------------------------------------------------------
# missing and corrupt files

@pytest.mark.parametrize("impl", ["sentencepiece", "python"])
def test_missing_model_file(tmp_path, impl):
    path = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="not found") as e:
        Tokenizer(path, impl=impl)
    assert str(path) in str(e.value) and isinstance(e.value, LlamaRefError)


@pytest.mark.parametrize("impl", ["sentencepiece", "python"])
@pytest.mark.parametrize("content", ["empty", "text", "truncated", "random"])
def test_corrupt_model_file(tmp_path, impl, content):
    good = DEFAULT_TOKENIZER.read_bytes()
    data = {"empty": b"", "text": b"this is not a tokenizer\n", "truncated": good[: len(good) // 2],
            "random": random.Random(0).randbytes(5000)}[content]
    path = tmp_path / "bad.model"
    path.write_bytes(data)
    with pytest.raises(TokenizerError, match="not a valid SentencePiece") as e:
        Tokenizer(path, impl=impl)
    assert str(path) in str(e.value)


def test_python_impl_refuses_a_unigram_model(tmp_path):
    path = _train(tmp_path, "uni", _code_like_lines(500), model_type="unigram", vocab_size=100, byte_fallback=False)
    with pytest.raises(TokenizerError, match="unigram"):
        BPETokenizer(path)
    assert Tokenizer(path).encode("x")     # the library handles it


# ------------------------------------------------------------------------------------------------
# command line

@pytest.mark.parametrize("impl", ["sentencepiece", "python"])
def test_cli_tokenize_json(capsys, sp, impl):
    text = "Hello [INST] 😀"
    assert cli_main(["tokenize", "--impl", impl, "--bos", "--text", text, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == [1] + sp.encode(text)
    assert out["pieces"] == [sp.id_to_piece(i) for i in out["ids"]]


def test_cli_tokenize_text(capsys, sp):
    assert cli_main(["tokenize", "--tokenizer", str(DEFAULT_TOKENIZER), "--impl", "python", "--eos", "--text", "Mia"]) == 0
    out = capsys.readouterr().out
    ids = sp.encode("Mia") + [2]
    assert f"{len(ids)} tokens" in out and repr("</s>") in out


def test_cli_subprocess():
    r = subprocess.run([sys.executable, "-m", "llama_ref", "tokenize", "--text", "Mia has a cat.", "--json", "--bos"],
                       capture_output=True, text=True, cwd=REPO_DIR)
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER))
    assert json.loads(r.stdout)["ids"] == [1] + sp.encode("Mia has a cat.")
    r = subprocess.run([sys.executable, "-m", "llama_ref", "tokenize", "--tokenizer", "/no/such.model", "--text", "x"],
                       capture_output=True, text=True, cwd=REPO_DIR)
    assert r.returncode == 2 and "error:" in r.stderr and "/no/such.model" in r.stderr
