"""The synthetic world: deterministic, held out where it says so, grammatical, and true to its facts."""
import gzip
import itertools
import json
import re
import subprocess
import sys

import pytest

from llama_ref import corpus
from llama_ref.corpus import (NAMES, SPLITS, check_fact, generate_dialogues, generate_stories, is_grammatical,
                              iter_training_text, make_world, qa_pairs, split_sentences)
from llama_ref.paths import CORPUS_DIR, REPO_DIR


@pytest.fixture(scope="module")
def world():
    return make_world(0)


@pytest.fixture(scope="module")
def docs(world):
    """A few hundred documents of every split."""
    return {s: (generate_stories(world, s, 400, seed=7), generate_dialogues(world, s, 200, seed=7, max_turns=8))
            for s in SPLITS}


def _names_in(text):
    return set(re.findall(r"\b(" + "|".join(NAMES) + r")\b", text))


def _message_sentences(dialogue):
    return [s for t in dialogue.turns for s in split_sentences(t["content"])]


# ------------------------------------------------------------------------------------------------
# determinism

def test_same_seed_same_world_and_documents(world):
    again = make_world(0)
    assert again.characters == world.characters and again.question_keys == world.question_keys
    assert make_world(1).characters != world.characters
    a = [s.text for s in generate_stories(world, "train", 50, seed=3)]
    assert a == [s.text for s in generate_stories(again, "train", 50, seed=3)]
    assert a != [s.text for s in generate_stories(world, "train", 50, seed=4)]
    d = [x.turns for x in generate_dialogues(world, "val", 50, seed=3)]
    assert d == [x.turns for x in generate_dialogues(again, "val", 50, seed=3)]
    assert qa_pairs(world, "test", 30, seed=1) == qa_pairs(again, "test", 30, seed=1)


def test_training_stream_is_deterministic_and_endless():
    first = list(itertools.islice(iter_training_text("train", seed=5), 300))
    assert first == list(itertools.islice(iter_training_text("train", seed=5), 300))
    assert first != list(itertools.islice(iter_training_text("train", seed=6), 300))
    assert len(set(first)) > 290                                   # fresh documents, not a loop over a few
    kinds = [d.startswith("User: ") for d in first]
    assert 0.15 < sum(kinds) / len(kinds) < 0.45                   # ~30% dialogues


def test_make_corpus_same_bytes_and_matches_committed_files(tmp_path):
    """Running the script twice gives the same bytes, and the committed val/test/world files are its output."""
    script = str(REPO_DIR / "scripts" / "make_corpus.py")
    for out in ("a", "b"):
        subprocess.run([sys.executable, script, "--splits", "val", "test", "--out", str(tmp_path / out)],
                       check=True, capture_output=True)
    for name in ("val.jsonl.gz", "test.jsonl.gz", "world.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == (CORPUS_DIR / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------
# held-out combinations

def test_split_units_are_disjoint(world):
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(world.story_pairs[a]) & set(world.story_pairs[b])
        assert not set(world.question_keys[a]) & set(world.question_keys[b])
    assert len(set().union(*[set(world.story_pairs[s]) for s in SPLITS])) == len(NAMES) * (len(NAMES) - 1) // 2


def test_test_stories_put_together_characters_never_together_in_training(world, docs):
    """Read from the text: every story names exactly its two characters; no test pair meets in training."""
    pairs_seen = {s: set() for s in SPLITS}
    for s in SPLITS:
        for story in docs[s][0]:
            names = _names_in(story.text)
            assert names == set(story.characters), story.text
            pairs_seen[s].add(tuple(sorted(names)))
    assert pairs_seen["test"] and pairs_seen["val"]
    assert not pairs_seen["test"] & pairs_seen["train"]
    assert not pairs_seen["val"] & pairs_seen["train"]


def test_committed_files_hold_out_test_pairs_and_questions(world):
    def read(split):
        with gzip.open(CORPUS_DIR / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    files = {s: read(s) for s in SPLITS}
    pairs = {s: {tuple(sorted(_names_in(r["text"]))) for r in files[s] if r["kind"] == "story"} for s in SPLITS}
    keys = {s: {tuple(k) for r in files[s] if r["kind"] == "dialogue" for k in r["facts"] if k} for s in SPLITS}
    assert not pairs["test"] & pairs["train"] and not pairs["val"] & pairs["train"]
    assert not keys["test"] & keys["train"] and not keys["val"] & keys["train"]
    assert len(files["train"]) > 10_000 and len(files["val"]) >= 500


def test_test_questions_never_asked_in_training(world, docs):
    """No test question text appears among the questions of training dialogues."""
    train_questions = {t["content"] for d in generate_dialogues(world, "train", 2000, seed=1) for t in d.turns
                       if t["role"] == "user"}
    test_questions = [q for q, _ in qa_pairs(world, "test", 300, seed=2)]
    assert not set(test_questions) & train_questions
    for d in docs["train"][1]:
        assert not set(k for k in d.facts if k) & set(world.question_keys["test"])


def test_training_stories_state_the_facts_test_questions_ask(world):
    """A held-out question is answerable: its character fact is stated in some training story."""
    stated = set()
    for story in generate_stories(world, "train", 3000, seed=11):
        stated.update(story.facts)
    test_keys = [k for k in world.question_keys["test"] if len(k) == 2 and k[0] in world.characters]
    assert test_keys
    for name, rel in test_keys:
        assert (name, "toy" if rel == "toy_colour" else rel) in stated, (name, rel)


# ------------------------------------------------------------------------------------------------
# grammar and facts

def test_every_generated_sentence_is_grammatical_and_no_fact_is_false(world, docs):
    n_true = 0
    for s in SPLITS:
        stories, dialogues = docs[s]
        sentences = [x for st in stories for x in split_sentences(st.text)]
        sentences += [x for d in dialogues for x in _message_sentences(d)]
        for sentence in sentences:
            assert is_grammatical(sentence), sentence
            verdict = check_fact(world, sentence)
            assert verdict is not False, sentence
            n_true += verdict is True
    assert n_true > 5000


def test_grammar_rejects_what_the_world_cannot_say():
    assert is_grammatical("Once upon a time, there was a little girl named Mia.")
    assert is_grammatical("  Mia had a pet cat.  ")
    for bad in ["", "Mia had a pet cat", "Mia had a pet dragon.", "cat a had Mia.", "Mia had a apple.",
                "Mia has a cat and a dog.", "The cat said meow. The dog said woof.", "mia had a pet cat.",
                "Mia had a pet cat!", "Mia went to the moon."]:
        assert not is_grammatical(bad), bad


def test_check_fact_against_the_world(world):
    mia = world.characters["Mia"]
    other_pet = next(p for p in corpus.PETS if p != mia.pet)
    assert check_fact(world, f"Mia has a {mia.pet}.") is True
    assert check_fact(world, f"Mia had a pet {other_pet}.") is False
    assert check_fact(world, f"No, Mia has a {mia.pet}.") is True
    assert check_fact(world, f"Mia's {mia.toy} is {mia.toy_colour}.") is True
    assert check_fact(world, f"Mia is {corpus.NUMBERS[mia.age]} years old.") is True
    assert check_fact(world, f"Mia is {corpus.NUMBERS[mia.age + 1]} years old.") is False
    old, young = sorted(world.characters.values(), key=lambda c: c.age)[-1], sorted(world.characters.values(),
                                                                                      key=lambda c: c.age)[0]
    assert check_fact(world, f"{old.name} is older than {young.name}.") is True
    assert check_fact(world, f"{old.name} is younger than {young.name}.") is False
    assert check_fact(world, "A cow says moo.") is True and check_fact(world, "A cow says woof.") is False
    assert check_fact(world, "A horse is bigger than a mouse.") is True
    assert check_fact(world, "Yes, a mouse is bigger than a horse.") is False
    assert check_fact(world, "A duck has two legs.") is True and check_fact(world, "A duck has four legs.") is False
    assert check_fact(world, "It was a sunny day.") is None
    assert check_fact(world, "Mia went home.") is None


def test_split_sentences_keeps_quotes_together():
    text = 'Mia was sad. Ben said, "Do not worry, I will help you!" They looked.\n\nThe end? Yes.'
    assert split_sentences(text) == ["Mia was sad.", 'Ben said, "Do not worry, I will help you!"', "They looked.",
                                      "The end?", "Yes."]


def test_answers_are_true_statements(world):
    for q, a in qa_pairs(world, "test", 300, seed=3):
        assert is_grammatical(split_sentences(q)[-1]) and is_grammatical(a)
        if not q.endswith("have now?"):                 # counting answers are local arithmetic, not world facts
            assert check_fact(world, a) is True, (q, a)
        else:
            nums = [corpus.NUMBERS.index(w) for w in re.findall(r"\b(" + "|".join(corpus.NUMBERS[1:]) + r")\b", q + " " + a)]
            assert nums[0] + nums[1] == nums[2], (q, a)


# ------------------------------------------------------------------------------------------------
# shapes of the documents

def test_dialogues_alternate_and_reach_eight_turns(world, docs):
    lengths = []
    for d in docs["train"][1]:
        roles = [t["role"] for t in d.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert len(d.facts) == len(roles) // 2 <= 8
        lengths.append(len(d.facts))
        assert d.text.count("\nUser: ") + 1 == len(roles) // 2
    assert max(lengths) == 8 and min(lengths) == 1


def test_stories_have_paragraphs_and_plain_words(docs):
    for story in docs["train"][0][:100]:
        assert 3 <= story.text.count("\n\n") + 1 <= 6
        assert 40 <= len(story.text.split()) <= 250
    vocab = {w for st in docs["train"][0] for w in re.findall(r"[A-Za-z']+", st.text)}
    assert len(vocab) < 500                       # a small language a tiny model can learn


def test_bad_split_is_refused(world):
    with pytest.raises(ValueError, match="split"):
        generate_stories(world, "dev", 1, seed=0)
