"""Train data/tokenizer/tokenizer.model: a SentencePiece BPE model with Llama 2's settings, on our corpus.

    python scripts/train_tokenizer.py                  # reads data/corpus/train.jsonl.gz
    python scripts/train_tokenizer.py --vocab-size 2048 --out /tmp/tok

Llama 2's settings. Meta's tokenizer.model carries its own trainer_spec and normalizer_spec (print them
with `sentencepiece_model_pb2.ModelProto.FromString(open(path, "rb").read())`). The ones that shape the ids:

    model_type BPE                 merges by score, no unigram LM
    vocab_size 32000               (ours: see VOCAB_SIZE below)
    byte_fallback true             an unknown character becomes its UTF-8 bytes <0x00>..<0xFF>, never <unk>
    split_digits true              every digit is its own piece: "2024" -> 2 0 2 4
    split_by_unicode_script true   no piece mixes scripts (Latin / Han / ...)
    split_by_whitespace true       pieces do not span words; the space goes at the front: "▁the"
    split_by_number true           no piece mixes digits and letters
    treat_whitespace_as_suffix false
    allow_whitespace_only_pieces true   runs of spaces may become pieces "▁▁", "▁▁▁▁" (code indentation)
    max_sentencepiece_length 16
    character_coverage 0.99995     the rarest 0.005% of characters are left to byte fallback
    unk/bos/eos/pad ids 0/1/2/-1   "<unk>", "<s>", "</s>", no pad piece
    normalization_rule_name identity    no NFKC: text is kept byte for byte
    add_dummy_prefix true          a space is put in front of the text: "Hello" is encoded as " Hello"
    remove_extra_whitespaces false leading, trailing and repeated spaces are kept

Vocabulary size. Ours is 1024 (Llama 2's is 32000). Our world has about 350 word types; 256 ids go to
byte pieces and 3 to <unk>/<s>/</s>, which leaves ~765 for characters and merges: enough for every word
of the world to be one piece (plus its capitalised and line-initial forms), so a whitespace-separated
word is about 1.3 tokens (punctuation and "'s" are pieces of their own; the script prints the figure) and
a context of 256 tokens holds a whole story. A bigger vocabulary would only add pieces the corpus
cannot train (its embedding rows would stay near their initialisation) and cost vocab_size x dim
parameters in the embedding and again in the output layer: at dim 256, 1024 ids cost 0.26M parameters each,
4096 would cost 1M each, a large share of a 3-5M parameter model. The script prints tokens per word.

What a "sentence" is. SentencePiece trains on sentences, and Llama 2 fed it lines, so a newline never
became a piece there ("\n" is the byte piece <0x0A>) and a word at the start of a line was only ever seen
with the dummy-prefix space in front. We feed whole documents instead (a story, a "User:/Assistant:"
dialogue, and Llama 2 chat turns "[INST] ... [/INST] ..."), because that is how the trainer encodes
them: the settings are Llama 2's, the pieces are learned from the text our model will read. So ".\n\n",
"User" and "Assistant" (after a newline, without a space) and "[INST]" parts become pieces; characters
our world never writes (digits, emoji, CJK) still go to byte fallback, exactly like Llama 2.

Training is deterministic: the input is read in file order (no sampling, one thread), and the model is
written through `model_writer`, so no temporary path ends up inside the file.
"""
import argparse
import gzip
import io
import json
import sys
from pathlib import Path

import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_ref.output import write_bytes  # noqa: E402
from llama_ref.paths import CORPUS_DIR, TOKENIZER_DIR  # noqa: E402

VOCAB_SIZE = 1024

LLAMA2_SPEC = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    character_coverage=0.99995,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
)
# Ours differs only where a corpus of a few MB needs it: read every line in order (Llama 2 sampled 200M
# shuffled sentences with 80 threads), so the same corpus always gives the same model.
OUR_RUN = dict(input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, max_sentence_length=4192,
               minloglevel=2)


SYSTEM = "You are a helpful assistant."  # only to show the trainer the <<SYS>> markers


def chat_turns(turns: list, with_system: bool):
    """Llama 2 chat strings of a dialogue, one per finished turn: "[INST] {user} [/INST] {answer}"."""
    for i in range(0, len(turns) - 1, 2):
        user, answer = turns[i]["content"], turns[i + 1]["content"]
        if i == 0 and with_system:
            user = f"<<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{user}"
        yield f"[INST] {user} [/INST] {answer}"


def training_sentences(path: Path):
    """Every document's text; every 4th dialogue also as Llama 2 chat turns (every 8th with a system prompt)."""
    n_dialogues = 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for record in f:
            r = json.loads(record)
            yield r["text"]
            if r["kind"] == "dialogue":
                if n_dialogues % 4 == 0:
                    yield from chat_turns(r["turns"], with_system=n_dialogues % 8 == 0)
                n_dialogues += 1


def train(corpus: Path, vocab_size: int, out_dir: Path) -> Path:
    """Train; write out_dir/tokenizer.model and a readable tokenizer.vocab ("piece<TAB>score" per id, newline as \\n)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=training_sentences(corpus), model_writer=model,
                                   vocab_size=vocab_size, **LLAMA2_SPEC, **OUR_RUN)
    path = out_dir / "tokenizer.model"
    write_bytes(path, model.getvalue(), force=True)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i).replace(chr(10), chr(92) + 'n')}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    write_bytes(out_dir / "tokenizer.vocab", vocab.encode("utf-8"), force=True)
    return path


def report(model_path: Path, corpus: Path, n_docs: int = 2000) -> None:
    """Print the pieces per word and tokens per document on the first n_docs documents."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    words = tokens = docs = 0
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for docs, record in enumerate(f, 1):
            text = json.loads(record)["text"]
            words += len(text.split())
            tokens += len(sp.encode(text))
            if docs == n_docs:
                break
    print(f"{model_path}: vocab {sp.vocab_size()}, {tokens / words:.3f} tokens per word, "
          f"{tokens / docs:.1f} tokens per document (first {docs} documents of {corpus.name})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=CORPUS_DIR / "train.jsonl.gz")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    p.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = p.parse_args(argv)
    if not args.corpus.exists():
        sys.exit(f"error: {args.corpus} not found: run `python scripts/make_corpus.py` first")
    path = train(args.corpus, args.vocab_size, args.out)
    report(path, args.corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
