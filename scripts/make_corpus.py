"""Write data/corpus/{train,val,test}.jsonl.gz and world.json from llama_ref.corpus, and print statistics.

    python scripts/make_corpus.py                     # the committed files (world seed 0)
    python scripts/make_corpus.py --train-stories 200000 --out /tmp/big   # more data, same generator

One JSON object per line and per document: {"kind": "story", "text", "characters", "plot"} or
{"kind": "dialogue", "text", "turns", "facts"}. The files are gzipped with a zero timestamp, so the same
arguments give the same bytes. What is committed is a sample: the trainer draws fresh documents from
`llama_ref.corpus.iter_training_text` (same generator, same world).
"""
import argparse
import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_ref import corpus  # noqa: E402
from llama_ref.output import atomic_file, write_text  # noqa: E402
from llama_ref.paths import CORPUS_DIR  # noqa: E402


def write_jsonl_gz(path: Path, records) -> None:
    """Byte-reproducible (gzip header without name or time), written by the package's one output policy."""
    with atomic_file(path, force=True) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


def world_json(world) -> dict:
    """The world's facts and held-out splits, readable by a person."""
    return {
        "seed": world.seed,
        "characters": {n: vars(c) for n, c in world.characters.items()},
        "animals": world.animals,
        "story_pairs": {s: [list(p) for p in ps] for s, ps in world.story_pairs.items()},
        "question_keys": {s: [list(k) for k in ks] for s, ks in world.question_keys.items()},
    }


def stats(records) -> dict:
    """Documents, sentences, words and word types of a list of records."""
    words = Counter()
    n_sent = 0
    for r in records:
        words.update(re.findall(r"[A-Za-z']+", r["text"]))
        n_sent += len(corpus.split_sentences(r["text"]))
    return {"stories": sum(r["kind"] == "story" for r in records),
            "dialogues": sum(r["kind"] == "dialogue" for r in records),
            "sentences": n_sent, "words": sum(words.values()), "word_types": len(words),
            "chars": sum(len(r["text"]) for r in records)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-seed", type=int, default=corpus.WORLD_SEED)
    p.add_argument("--seed", type=int, default=0, help="seed of the documents (the world has its own)")
    p.add_argument("--train-stories", type=int, default=20000)
    p.add_argument("--train-dialogues", type=int, default=8000)
    p.add_argument("--eval-stories", type=int, default=400, help="stories in val and in test each")
    p.add_argument("--eval-dialogues", type=int, default=200, help="dialogues in val and in test each")
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--splits", nargs="+", choices=corpus.SPLITS, default=list(corpus.SPLITS))
    p.add_argument("--out", type=Path, default=CORPUS_DIR)
    args = p.parse_args(argv)

    world = corpus.make_world(args.world_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": (args.train_stories, args.train_dialogues),
             "val": (args.eval_stories, args.eval_dialogues), "test": (args.eval_stories, args.eval_dialogues)}
    write_text(args.out / "world.json", json.dumps(world_json(world), indent=1) + "\n", force=True)
    for split in args.splits:
        n_stories, n_dialogues = sizes[split]
        stories = corpus.generate_stories(world, split, n_stories, seed=args.seed)
        dialogues = corpus.generate_dialogues(world, split, n_dialogues, seed=args.seed, max_turns=args.max_turns)
        # interleave so any prefix of the file has both kinds in proportion
        records, j = [], 0
        for i, s in enumerate(stories):
            records.append(s.to_json())
            while j < len(dialogues) and (j + 1) * n_stories <= (i + 1) * n_dialogues:
                records.append(dialogues[j].to_json())
                j += 1
        records += [d.to_json() for d in dialogues[j:]]
        path = args.out / f"{split}.jsonl.gz"
        write_jsonl_gz(path, records)
        st = stats(records)
        print(f"{split:5s} {path.name}: {st['stories']} stories, {st['dialogues']} dialogues, {st['sentences']} sentences, "
              f"{st['words']} words, {st['word_types']} word types, {st['chars']} chars, {path.stat().st_size / 1e6:.2f} MB gz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
