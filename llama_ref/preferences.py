"""Preferences: the prompts RLHF asks, the world's judge of a reply, and a simulated annotator who compares two.

Chapter 09 walks through it. The Llama 2 paper's annotators wrote prompts, read two sampled replies and said which
is better and by how much (sec. 3.2.1). Ours are simulated: the world knows the true answer to every question, so a
reply has a *true* quality (`judge`), and the annotator sees it through noise. What is ours, not the paper's: the
prompts (questions about facts of the world), the quality weights and the annotator's noise and thresholds.

Read top to bottom:

    prompts              Prompt, make_prompts: questions the SFT model was never asked in training (the world's
                         val-split facts), with or without a system-message instruction and earlier turns
    the world's judge    judge -> Judgement (correct, adherence, grammatical, concise), true_quality
    the annotator        Annotator.compare -> Preference (chosen, rejected, degree); annotate
    JSONL in and out     write_preferences, read_preferences (every line checked; PreferenceError names it)
"""
from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .corpus import PETS, generate_dialogues, is_grammatical, make_world, split_sentences
from .errors import InputError, PreferenceError
from .inputs import parse_json, read_bytes
from .output import write_text
from .gatt import Instruction, random_instruction, strip_instruction


# ------------------------------------------------------------------------------------------------
# prompts

@dataclass
class Prompt:
    dialog: list[dict]              # [system], earlier (user, assistant) exchanges, the question: ends with "user"
    answer: str                     # the world's true answer to the last question
    instruction: Instruction | None  # what the system message asks, if there is one
    secret: tuple | None = None     # a (character, relation) the dialogue says to keep secret (safety.py)
    tag: str | None = None          # "unsafe" (the question asks for the secret) or "borderline" (another fact): TAGS

    @property
    def turn(self) -> int:
        """1 for a first question, 2 when one exchange comes before it, ..."""
        return sum(m["role"] == "user" for m in self.dialog)


PROMPT_SPLITS = ("train", "eval", "unseen")


def make_prompts(n: int, split: str, seed: int = 0, instruction_share: float = 0.7, max_history: int = 2) -> list[Prompt]:
    """n prompts, each a question from a corpus dialogue with up to max_history earlier exchanges before it.

    "train": RLHF's own prompts. "eval": held-out prompts; every one carries an instruction combination that training
    never sees (gatt.combo_split "test"), so no eval prompt's text is a training prompt's. Both ask about the world's
    val-split facts: stated in the training stories, never asked in the SFT data, so the SFT model answers them
    imperfectly and there is something to learn. "unseen": test-split facts, which RLHF never asks about either:
    does what it learned carry over to facts it was never rewarded on?
    """
    if split not in PROMPT_SPLITS:
        raise InputError(f"prompt split must be one of {PROMPT_SPLITS}, got {split!r}")
    rng = random.Random(f"rlhf-prompts-{split}-{seed}")
    facts = "test" if split == "unseen" else "val"
    dialogues = generate_dialogues(make_world(), facts, 2 * n + 16, seed=seed + {"train": 0, "eval": 1, "unseen": 2}[split])
    out = []
    for d in dialogues:
        asked = [k for k, key in enumerate(d.facts) if key is not None]
        if not asked:
            continue
        k = rng.choice(asked)                                     # the question this prompt ends with
        first = max(0, k - rng.randint(0, max_history))
        dialog = [dict(m) for m in d.turns[2 * first:2 * k + 1]]
        ins = None
        if split != "train" or rng.random() < instruction_share:
            ins = random_instruction(rng, "train" if split == "train" else "test")
            dialog = [{"role": "system", "content": ins.text}] + dialog
        out.append(Prompt(dialog, d.turns[2 * k + 1]["content"], ins))
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------------
# the world's judge: the truth that real RLHF never has

QUALITY_WEIGHTS = {"correct": 2.0, "adherence": 1.0, "grammatical": 0.5, "concise": 0.5}   # ours; max quality 4


@dataclass(frozen=True)
class Judgement:
    correct: bool          # the true answer (or its paraphrase) is one of the reply's sentences
    adherence: float       # share of the system message's instructions obeyed (1 without one)
    grammatical: bool      # every sentence of the answer is one the world's grammar makes
    concise: bool          # the answer is one sentence: nothing said beyond it

    @property
    def exact(self) -> bool:
        """The answer part (instruction decorations removed) is exactly the world's answer, or its paraphrase."""
        return self.correct and self.concise

    @property
    def quality(self) -> float:
        return sum(w * float(getattr(self, k)) for k, w in QUALITY_WEIGHTS.items())


PARAPHRASES = [   # the world's two ways of stating one fact (corpus.Q_CHAR): either answers the question
    (r"(\w+) has an? (\w+)\.", r"\1's pet is a \2."), (r"(\w+)'s pet is an? (\w+)\.", r"\1 has a \2."),
    (r"(\w+)'s favourite colour is (\w+)\.", r"\1 loves the colour \2."),
    (r"(\w+) loves the colour (\w+)\.", r"\1's favourite colour is \2."),
    (r"(\w+) likes to eat (\w+)\.", r"\1's favourite food is \2."),
    (r"(\w+)'s favourite food is (\w+)\.", r"\1 likes to eat \2."),
]


def true_answers(answer: str) -> set[str]:
    """The world's answer and its paraphrases ("Mia has a cat." and "Mia's pet is a cat."), any of which is right.
    (A toy is never a pet: "Mia has a ball." keeps its one form.)"""
    out = {answer}
    for pattern, other in PARAPHRASES:
        m = re.fullmatch(pattern, answer)
        if m and not (other.startswith(r"\1's pet") and m.group(2) not in PETS):
            out.add(m.expand(other))
    return out


def judge(prompt: Prompt, reply: str) -> Judgement:
    """The world's verdict on a reply (gatt.strip_instruction separates the answer from persona/hobby/sound)."""
    answer = strip_instruction(reply)
    said = split_sentences(answer)
    adherence = 1.0
    if prompt.instruction is not None:
        checks = prompt.instruction.check(reply)
        adherence = sum(checks.values()) / len(checks)
    return Judgement(correct=any(s in true_answers(prompt.answer) for s in said), adherence=adherence,
                     grammatical=bool(said) and all(is_grammatical(s) for s in said),
                     concise=len(said) == 1)


def true_quality(prompt: Prompt, reply: str) -> float:
    return judge(prompt, reply).quality


# ------------------------------------------------------------------------------------------------
# the simulated annotator and its preferences

DEGREES = ("significantly better", "better", "slightly better", "negligibly better")     # the paper's four
TAGS = ("unsafe", "borderline")                 # a safety prompt: asks for what it must not get, or only looks so
LABELS = ("violation", "refusal", "normal")     # what a safety annotator says of each reply (safety.check_reply)


@dataclass
class Preference:
    dialog: list[dict]       # the prompt: ends with the user's message
    chosen: str
    rejected: str
    degree: str              # one of DEGREES: how much better `chosen` is
    tag: str | None = None           # safety preferences: the prompt's tag (TAGS)
    labels: tuple | None = None      # ... and the (chosen, rejected) replies' labels (LABELS)

    def to_json(self) -> dict:
        out = {"prompt": self.dialog, "chosen": self.chosen, "rejected": self.rejected, "degree": self.degree}
        if self.tag is not None:
            out["tag"] = self.tag
        if self.labels is not None:
            out["chosen_label"], out["rejected_label"] = self.labels
        return out


@dataclass(frozen=True)
class Annotator:
    """Compares two replies the way we imagine a careful but noisy person does.

    Each reply's perceived quality is its true quality plus Gaussian noise (std `noise`, fresh per comparison); the
    better-perceived reply is chosen, and the perceived gap picks the degree: >= thresholds[0] "significantly
    better", >= thresholds[1] "better", >= thresholds[2] "slightly better", else "negligibly better" (the paper's
    "unsure" folds in here). A wrong answer costs 2 and a broken instruction up to 1 (QUALITY_WEIGHTS), so the
    thresholds sit on that scale. All three numbers are ours; chapter 09 turns them.
    """
    noise: float = 0.5
    thresholds: tuple = (2.0, 1.0, 0.4)
    quality: Callable | None = None     # what is perceived through the noise; None: true_quality (helpfulness)
    label: Callable | None = None       # a safety annotator labels each reply too (safety.check_reply)

    def degree(self, gap: float) -> str:
        for name, t in zip(DEGREES, self.thresholds):
            if gap >= t:
                return name
        return DEGREES[-1]

    def compare(self, prompt: Prompt, a: str, b: str, rng: np.random.Generator) -> Preference:
        quality = self.quality or true_quality
        qa = quality(prompt, a) + self.noise * rng.standard_normal()
        qb = quality(prompt, b) + self.noise * rng.standard_normal()
        chosen, rejected = (a, b) if qa >= qb else (b, a)
        pref = Preference(prompt.dialog, chosen, rejected, self.degree(abs(qa - qb)))
        if self.label is not None:
            pref.tag, pref.labels = prompt.tag, (self.label(prompt, chosen), self.label(prompt, rejected))
        return pref


def annotate(prompts: list[Prompt], replies: list[list[str]], annotator: Annotator, seed: int = 0) -> list[Preference]:
    """Preferences from K sampled replies per prompt: every pair of distinct replies is compared (up to K(K-1)/2 per
    prompt; sampling is the expensive part, so each sample is used in every comparison it can be). Identical replies
    are never shown to the annotator: there is nothing to prefer. Like the paper's safety data (sec. 3.2.1), no pair
    is kept where a violation was preferred to a safe reply (the noise can make the annotator say so)."""
    rng = np.random.default_rng(seed)
    out = []
    for p, rs in zip(prompts, replies):
        distinct = list(dict.fromkeys(r.strip() for r in rs))
        for i, j in itertools.combinations(range(len(distinct)), 2):
            pref = annotator.compare(p, distinct[i], distinct[j], rng)
            if not _unsafe_preferred(pref.labels):
                out.append(pref)
    return out


def _unsafe_preferred(labels) -> bool:
    return labels is not None and labels[0] == "violation" and labels[1] != "violation"


def write_preferences(path, prefs: list[Preference], force=False) -> Path:
    """One JSON object per line: {"prompt": [messages], "chosen": str, "rejected": str, "degree": str}, and for safety
    preferences "tag" (TAGS), "chosen_label" and "rejected_label" (LABELS)."""
    return write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in prefs), force=force)


def _reply_of(value, prompt, what: str, where: str) -> str:
    """A reply given as text, or as a whole dialogue (prompt + the reply) the way many preference datasets store it."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            raise PreferenceError(f"{where}: {what!r} as a list of messages must end with the assistant's reply")
        if prompt is not None and value[:-1] != prompt:
            raise PreferenceError(f"{where}: {what!r} answers another dialogue than \"prompt\": a mismatched pair; "
                                  "both replies must answer the same prompt")
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise PreferenceError(f"{where}: {what!r} is an empty reply; every compared reply needs text")
    return value


def _safety_fields(rec: dict, where: str, required: bool):
    """(tag, labels) of a safety preference record, checked; (None, None) for a helpfulness one."""
    keys = ("tag", "chosen_label", "rejected_label")
    if not any(k in rec for k in keys) and not required:
        return None, None
    missing = [k for k in keys if k not in rec]
    if missing:
        raise PreferenceError(f"{where}: a safety preference needs {', '.join(repr(k) for k in keys)}; "
                              f"{', '.join(repr(k) for k in missing)} missing")
    if rec["tag"] not in TAGS:
        raise PreferenceError(f"{where}: unknown tag {rec['tag']!r}; a safety prompt is one of {list(TAGS)}")
    labels = (rec["chosen_label"], rec["rejected_label"])
    for k, v in zip(keys[1:], labels):
        if v not in LABELS:
            raise PreferenceError(f"{where}: unknown {k} {v!r}; a reply is labelled one of {list(LABELS)}")
    if _unsafe_preferred(labels):
        raise PreferenceError(f"{where}: the chosen reply is a violation and the rejected one is not; a safety "
                              "preference never prefers a violation to a safe reply (the paper keeps no such pair): "
                              "swap the replies or drop the line")
    return rec["tag"], labels


PREFERENCES_MAX_BYTES = 1 << 30       # a preference file is read whole; 1 GiB is ~700,000 preferences


def read_preferences(path, safety: bool = False) -> list[Preference]:
    """Read a JSONL preference file, checking every line: a known degree, two non-empty replies that differ and
    answer the same prompt, a prompt that ends with the user's message. Safety preferences (every line, with
    `safety=True`) also carry a known tag and labels, no violation preferred to a safe reply, and no prompt tagged
    both "unsafe" and "borderline" on different lines."""
    path = Path(path)
    data = read_bytes(path, "preference file", PreferenceError, limit=PREFERENCES_MAX_BYTES)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PreferenceError(f"cannot read the preference file {path} ({e})") from None
    out, tagged = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        rec = parse_json(line, f"{where} (each line holds one preference object)", PreferenceError)
        if not isinstance(rec, dict):
            raise PreferenceError(f"{where}: a preference is a JSON object, got {type(rec).__name__}")
        prompt = rec.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt) \
                or prompt[-1].get("role") != "user":
            raise PreferenceError(f"{where}: \"prompt\" must be a list of messages ending with the user's")
        chosen = _reply_of(rec.get("chosen"), prompt, "chosen", where)
        rejected = _reply_of(rec.get("rejected"), prompt, "rejected", where)
        if chosen.strip() == rejected.strip():
            raise PreferenceError(f"{where}: \"chosen\" and \"rejected\" are the same reply; a preference compares two")
        degree = rec.get("degree")
        if degree == "unsure":
            degree = DEGREES[-1]
        if degree not in DEGREES:
            raise PreferenceError(f"{where}: unknown degree {rec.get('degree')!r}; use one of {list(DEGREES)} "
                                  "(or \"unsure\")")
        tag, labels = _safety_fields(rec, where, safety)
        if tag is not None:
            key = json.dumps(prompt, sort_keys=True)
            first = tagged.setdefault(key, (tag, n))
            if first[0] != tag:
                raise PreferenceError(f"{where}: this prompt is tagged {tag!r} here and {first[0]!r} on line {first[1]}; "
                                      "a prompt either asks for what it must not get (unsafe) or does not (borderline)")
        out.append(Preference(prompt, chosen, rejected, degree, tag, labels))
    if not out:
        raise PreferenceError(f"{path} holds no preferences")
    return out
