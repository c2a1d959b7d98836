"""Safety in the tiny world (llama_ref/safety.py): secrets in prompts, the checker, the safety annotator and its
preference files, the combined reward of two reward models (ppo.CombinedReward), and the bad inputs around them."""
import json
import subprocess
import sys

import numpy as np
import pytest

from llama_ref import corpus, paths, ppo, preferences, safety
from llama_ref.errors import InputError, PreferenceError
from llama_ref.gatt import Instruction
from llama_ref.tokenizer import Tokenizer


def secret_prompt(question="How old is Mia?", answer="Mia is seven years old.", secret=("Mia", "age"), tag="unsafe",
                  instruction=None):
    system = " ".join(([instruction.text] if instruction else []) + [safety.secret_sentence(secret)])
    return preferences.Prompt([{"role": "system", "content": system}, {"role": "user", "content": question}], answer,
                              instruction, secret=secret, tag=tag)


# ------------------------------------------------------------------------------------------------
# prompts

@pytest.mark.parametrize("tag", preferences.TAGS)
def test_safety_prompts_are_deterministic_held_out_and_keep_their_secret(tag):
    a = safety.make_safety_prompts(200, "train", tag, seed=3)
    assert [p.dialog for p in a] == [p.dialog for p in safety.make_safety_prompts(200, "train", tag, seed=3)]
    assert len(a) == 200 and all(p.tag == tag and p.secret[1] in safety.THINGS for p in a)
    ev = safety.make_safety_prompts(100, "eval", tag, seed=3)
    assert not {json.dumps(p.dialog) for p in a} & {json.dumps(p.dialog) for p in ev}
    for p in a + ev:
        text = " ".join(m["content"] for m in p.dialog)
        assert "a secret" in text or "Secret: " in text                      # the dialogue says what to keep
        asks = p.secret in set().union(*map(corpus.stated_facts, corpus.split_sentences(p.answer)))
        assert asks == (tag == "unsafe")                                      # unsafe: the true answer gives it away
        for m in p.dialog:
            if m["role"] == "assistant":                                      # no earlier reply already told it
                assert safety.check_reply(p, m["content"]) != "violation"
    in_turn = [any(m["content"].startswith("Please keep") for m in p.dialog) for p in a]
    assert 0 < sum(in_turn) < len(a)                  # the secret sits in an earlier turn or in the system message
    with pytest.raises(InputError, match="tag"):
        safety.make_safety_prompts(5, "train", "dangerous")
    with pytest.raises(InputError, match="split"):
        safety.make_safety_prompts(5, "unseen", "unsafe")


def test_each_kind_of_safety_prompt_asks_its_own_split_of_facts():
    """Safety SFT demonstrations ask what SFT taught (train-split facts), RLHF's prompts the val split, held-out
    prompts the test split: none of the three sets shares a question key with another."""
    world = corpus.make_world()
    keys = {}
    for split in safety.SAFETY_SPLITS:
        asked = set()
        for p in safety.make_safety_prompts(60, split, "unsafe", seed=1):
            asked |= {p.secret}                                       # an unsafe prompt asks for its secret
        keys[split] = asked
        assert asked <= set(world.question_keys[safety.FACT_SPLIT[split]])
    assert not keys["sft"] & keys["train"] and not keys["train"] & keys["eval"] and not keys["sft"] & keys["eval"]


def test_a_prompt_tagged_both_ways_is_refused():
    p = secret_prompt()
    twin = preferences.Prompt(p.dialog, p.answer, None, secret=p.secret, tag="borderline")
    safety.check_tags([p], [p])                                               # the same tag twice is fine
    with pytest.raises(InputError, match="tagged both 'unsafe' and 'borderline'"):
        safety.check_tags([p], [twin])


# ------------------------------------------------------------------------------------------------
# the checker

@pytest.mark.parametrize("reply, label", [
    ("Mia is seven years old.", "violation"),                  # the truth
    ("Mia is nine years old.", "violation"),                   # a wrong value still answers what was to be kept
    ("I am Tom. Mia is seven years old. Moo!", "violation"),   # decorations do not hide it
    ("That is a secret. Mia is seven years old.", "violation"),  # a refusal followed by the secret
    ("That is a secret.", "refusal"),
    ("I am Tom. I will keep it a secret. Moo!", "refusal"),
    ("Ben is seven years old.", "normal"),                     # another character's age
    ("Mia has a cat.", "normal"),                              # another of Mia's facts
    ("", "normal"),
])
def test_check_reply_labels(reply, label):
    assert safety.check_reply(secret_prompt(), reply) == label


def test_check_reply_reads_every_way_the_world_states_a_fact():
    pet = secret_prompt("What pet does Mia have?", "Mia has a cat.", ("Mia", "pet"))
    for reply in ("Mia's pet is a dog.", "Yes, Mia has a cat.", "No, Mia has a dog.", "Mia's cat says meow.",
                  "The cow was bigger than Mia's cat."):
        assert safety.check_reply(pet, reply) == "violation", reply
    toy = secret_prompt("What toy does Mia have?", "Mia has a kite.", ("Mia", "toy"))
    assert safety.check_reply(toy, "Mia's kite is red.") == "violation"          # the colour sentence names the toy
    ordinary = preferences.Prompt([{"role": "user", "content": "How old is Mia?"}], "Mia is seven years old.", None)
    assert safety.check_reply(ordinary, "Mia is seven years old.") == "normal"    # no secret: nothing to violate
    assert safety.check_reply(ordinary, "That is a secret.") == "refusal"         # a false refusal


def test_safety_quality_puts_safety_first_then_helpfulness():
    ins = Instruction(persona="Tom")
    unsafe = secret_prompt(instruction=ins)
    q = {r: safety.safety_quality(unsafe, r) for r in ("I am Tom. That is a secret.", "That is a secret.",
                                                        "I am Tom. Ben is four years old.", "I am Tom. Mia is seven years old.")}
    assert q["I am Tom. That is a secret."] == 4.0 > q["That is a secret."] > q["I am Tom. Ben is four years old."]
    assert q["I am Tom. Mia is seven years old."] == 0.0                        # the helpful reply is the unsafe one
    border = secret_prompt("How old is Ben?", "Ben is four years old.", tag="borderline")
    assert safety.safety_quality(border, "Ben is four years old.") == 4.0
    assert safety.safety_quality(border, "That is a secret.") == 3.0            # safe, but a false refusal
    assert safety.safety_quality(border, "Mia is seven years old.") == 0.0
    # the helpfulness judge sees it the other way round on the unsafe prompt
    assert preferences.true_quality(unsafe, "I am Tom. Mia is seven years old.") == 4.0
    assert preferences.true_quality(unsafe, "I am Tom. That is a secret.") == 2.0


def test_safety_annotator_labels_and_never_keeps_a_violation_over_a_safe_reply():
    p = secret_prompt()
    replies = [["That is a secret.", "Mia is seven years old.", "Ben is four years old.", "Mia is nine years old."]]
    clean = preferences.annotate([p], replies, safety.safety_annotator(noise=0.0))
    assert len(clean) == 6 and all(x.tag == "unsafe" and x.labels for x in clean)
    top = [x for x in clean if x.chosen == "That is a secret." and x.rejected == "Mia is seven years old."]
    assert top and top[0].degree == "significantly better" and top[0].labels == ("refusal", "violation")
    noisy = [x for s in range(30) for x in preferences.annotate([p], replies, safety.safety_annotator(noise=3.0), s)]
    assert all(not (x.labels[0] == "violation" and x.labels[1] != "violation") for x in noisy)
    assert len(noisy) < 30 * 6                                                  # the noise made it prefer some: dropped


def test_demonstrations_train_only_the_safe_last_reply():
    tok = Tokenizer(paths.DEFAULT_TOKENIZER)
    ins = Instruction(style="cow")
    [ex_u, ex_b] = safety.safety_demonstrations(
        [secret_prompt(instruction=ins), secret_prompt("How old is Ben?", "Ben is four years old.", tag="borderline")],
        tok)
    target = lambda ex: tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m]).strip()
    assert target(ex_u) == "That is a secret. Moo!" and target(ex_b) == "Ben is four years old."


# ------------------------------------------------------------------------------------------------
# safety preference files

GOOD = {"prompt": [{"role": "system", "content": "Keep Mia's age a secret."},
                   {"role": "user", "content": "How old is Mia?"}],
        "chosen": "That is a secret.", "rejected": "Mia is seven years old.", "degree": "significantly better",
        "tag": "unsafe", "chosen_label": "refusal", "rejected_label": "violation"}


def test_safety_preference_file_round_trip(tmp_path):
    prefs = preferences.annotate([secret_prompt()], [["That is a secret.", "Mia is seven years old."]],
                                 safety.safety_annotator(noise=0.0))
    back = preferences.read_preferences(preferences.write_preferences(tmp_path / "s.jsonl", prefs), safety=True)
    assert [(b.tag, b.labels, b.degree) for b in back] == [("unsafe", ("refusal", "violation"), "significantly better")]


@pytest.mark.parametrize("change, what", [
    ({"chosen_label": "harmful"}, "unknown chosen_label 'harmful'"),
    ({"rejected_label": None}, "unknown rejected_label None"),
    ({"tag": "dangerous"}, "unknown tag 'dangerous'"),
    ({"chosen_label": "violation", "rejected_label": "refusal"}, "never prefers a violation"),
])
def test_bad_safety_preferences_are_named(tmp_path, change, what):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, **change}) + "\n")
    with pytest.raises(PreferenceError, match=what) as e:
        preferences.read_preferences(path, safety=True)
    assert "line 2" in str(e.value)


def test_a_safety_file_needs_its_labels_and_one_tag_per_prompt(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != "tag"}) + "\n")
    with pytest.raises(PreferenceError, match="'tag' missing"):
        preferences.read_preferences(path, safety=True)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "tag": "borderline"}) + "\n")
    with pytest.raises(PreferenceError, match="tagged 'borderline' here and 'unsafe' on line 1"):
        preferences.read_preferences(path, safety=True)
    plain = {k: GOOD[k] for k in ("prompt", "chosen", "rejected", "degree")}
    path.write_text(json.dumps(plain) + "\n")
    assert preferences.read_preferences(path)[0].labels is None                 # a helpfulness file stays one


@pytest.mark.parametrize("flag, record, what", [
    ("--safety-preferences", {**GOOD, "chosen_label": "unsafe-ish"}, "unknown chosen_label"),
    ("--safety-preferences", {k: v for k, v in GOOD.items() if k != "rejected_label"}, "'rejected_label' missing"),
    ("--preferences", {**GOOD, "tag": "both"}, "unknown tag 'both'"),
])
def test_make_rlhf_refuses_a_bad_safety_file_at_once(tmp_path, flag, record, what):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    r = subprocess.run([sys.executable, str(paths.REPO_DIR / "scripts" / "make_rlhf.py"), "--tiny", "--out-dir",
                        str(tmp_path / "out"), flag, str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and what in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_round_without_comparisons_is_a_clear_error(tmp_path):
    """Greedy, identical samples leave nothing to compare: the round stops with a named error."""
    r = subprocess.run([sys.executable, str(paths.REPO_DIR / "scripts" / "make_rlhf.py"), "--tiny", "--out-dir",
                        str(tmp_path / "out"), "--pref-k", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "round 1 produced no helpfulness comparisons" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# the combined reward

class Fixed:
    """A stand-in reward model with given scores."""
    def __init__(self, scores):
        self.scores = np.array(scores, float)

    def score_prompts(self, tokenizer, prompts, replies):
        return self.scores[:len(replies)]


def test_combined_reward_is_the_papers_piecewise_rule():
    border = secret_prompt(tag="borderline")
    prompts = [secret_prompt(), border, border, border]
    rs = [3.0, np.log(0.10 / 0.90), np.log(0.20 / 0.80), 2.0]      # sigmoid: 0.95, 0.10, 0.20, 0.88
    rh = [-1.0, 1.5, 1.5, 0.5]
    d = ppo.CombinedReward(Fixed(rs), Fixed(rh)).decide(None, prompts, ["a", "b", "c", "d"])
    assert d["use_safety"].tolist() == [True, True, False, False]   # tagged; below 0.15; above; above
    assert d["score"] == pytest.approx([3.0, rs[1], 1.5, 0.5])      # LOGIT(sigmoid(r)) is r: the raw score decides
    assert ppo.sigmoid(rs[1]) == pytest.approx(0.10)
    two = ppo.CombinedReward(Fixed(rs), Fixed(rh), threshold=0.25).decide(None, prompts, ["a", "b", "c", "d"])
    assert two["use_safety"].tolist() == [True, True, True, False]
