"""Ghost Attention (GAtt, Llama 2 paper sec. 3.3 / appendix A.3.5) reproduced on our tiny chat model.

Chapter 11 walks through it. The problem: a chat model told something in the system message ("Act as Tom")
obeys at turn 1 and forgets a few turns later. The paper's fix is a *data* trick, not an architecture change:

  1. take multi-turn dialogues and an instruction; concatenate the instruction to EVERY user message;
  2. sample the assistant replies from the current chat model (it obeys an instruction it can see in the
     current message) and keep only samples a checker accepts (rejection sampling);
  3. build the training example with the instruction ONLY in the first turn's system message, and set the loss
     to zero for every token of the previous turns, assistant replies included: only the last reply is learned;
  4. fine-tune on it. The model learns to produce obedient late replies while the instruction is far away,
     which it can only do by attending back to the system message ("ghost" attention).

Our instructions live in the synthetic world's language, three families like the paper's, combined at random
(half the time in a shortened form, like the paper's "Figure: Napoleon"):

    family   instruction (full / short)               an obedient reply          checker
    persona  "Act as Tom." / "Figure: Tom."          starts "I am Tom."         reply starts with it
    hobby    "You love kites." / "Hobby: kites."     contains "I love kites."   the sentence is in the reply
    style    "Speak like a cow." / "Style: cow."     ends with "Moo!"           reply ends with the sound

Held-out: combinations of two or three families are split by a hash into train and test, so evaluation uses
instruction combinations never seen in training (every single value is seen), asked in test-split dialogues.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

import numpy as np

from .chat import ASSISTANT, SYSTEM, encode_dialog, fit_dialog, format_dialog
from .corpus import ANIMALS, NAMES, TOYS, generate_dialogues, make_world
from .errors import InputError
from . import generate as gen
from .trace import Trace

FAMILIES = ("persona", "hobby", "style")
HOBBIES = [t + "s" for t in TOYS]                                      # "kites", "balls", ...
STYLE_ANIMALS = list(ANIMALS)                                          # "Speak like a cow." -> "Moo!"
SOUNDS = {k: v[1].capitalize() + "!" for k, v in ANIMALS.items()}    # "cow" -> "Moo!"
PERSONAS = list(NAMES)


# ------------------------------------------------------------------------------------------------
# instructions and their checkers

@dataclass(frozen=True)
class Instruction:
    """A combination of instructions from up to three families (None = family absent)."""
    persona: str | None = None
    hobby: str | None = None
    style: str | None = None
    short: bool = False                      # "Figure: Tom." instead of "Act as Tom."
    order: tuple = FAMILIES                  # order of the sentences in the system message

    def families(self) -> list[str]:
        return [f for f in FAMILIES if getattr(self, f) is not None]

    def sentence(self, family: str) -> str:
        v = getattr(self, family)
        if self.short:
            return {"persona": f"Figure: {v}.", "hobby": f"Hobby: {v}.", "style": f"Style: {v}."}[family]
        return {"persona": f"Act as {v}.", "hobby": f"You love {v}.", "style": f"Speak like a {v}."}[family]

    @property
    def text(self) -> str:
        """The system message."""
        return " ".join(self.sentence(f) for f in self.order if getattr(self, f) is not None)

    def apply(self, answer: str) -> str:
        """The obedient version of a plain answer: persona first, then the answer, the hobby, the sound."""
        parts = []
        if self.persona:
            parts.append(f"I am {self.persona}.")
        parts.append(answer.strip())
        if self.hobby:
            parts.append(f"I love {self.hobby}.")
        if self.style:
            parts.append(SOUNDS[self.style])
        return " ".join(parts)

    def check(self, reply: str) -> dict[str, bool]:
        """Per family: does `reply` obey it?"""
        r = reply.strip()
        out = {}
        if self.persona:
            out["persona"] = r.startswith(f"I am {self.persona}.")
        if self.hobby:
            out["hobby"] = re.search(rf"(^|\s)I love {re.escape(self.hobby)}\.(\s|$)", r) is not None
        if self.style:
            out["style"] = r.endswith(SOUNDS[self.style])
        return out

    def obeyed(self, reply: str) -> bool:
        return all(self.check(reply).values())

    def key(self) -> tuple:
        return (self.persona, self.hobby, self.style)


def combo_split(persona, hobby, style) -> str:
    """'train' or 'test' for a combination: combinations of >= 2 families are held out by a hash (1 in 4)."""
    if sum(v is not None for v in (persona, hobby, style)) < 2:
        return "train"
    h = hashlib.sha256(f"{persona}|{hobby}|{style}".encode()).digest()
    return "test" if h[0] % 4 == 0 else "train"


def random_instruction(rng: random.Random, split: str = "train", min_families: int = 1) -> Instruction:
    """A random combination of families whose combination belongs to `split`; short form half the time."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    min_families = max(min_families, 2 if split == "test" else 1)
    while True:
        k = rng.randint(min_families, 3)
        fams = rng.sample(FAMILIES, k)
        vals = {"persona": None, "hobby": None, "style": None}
        if "persona" in fams:
            vals["persona"] = rng.choice(PERSONAS)
        if "hobby" in fams:
            vals["hobby"] = rng.choice(HOBBIES)
        if "style" in fams:
            vals["style"] = rng.choice(STYLE_ANIMALS)
        if combo_split(**vals) == split:
            order = list(FAMILIES)
            rng.shuffle(order)
            return Instruction(**vals, short=rng.random() < 0.5, order=tuple(order))


# ------------------------------------------------------------------------------------------------
# dialogues from the corpus

def corpus_dialogues(split: str, n: int, seed: int, min_turns: int = 1, max_turns: int = 8) -> list[list[dict]]:
    """n user/assistant dialogues (lists of messages) from the corpus, each with min_turns..max_turns exchanges.

    Short corpus dialogues are extended with exchanges of further ones (same split) until min_turns is reached.
    """
    world = make_world()
    pool = generate_dialogues(world, split, max(4 * n, 64), seed=seed, max_turns=max_turns)
    out, i = [], 0
    while len(out) < n:
        msgs = []
        while len(msgs) // 2 < min_turns:
            msgs += pool[i % len(pool)].turns
            i += 1
        out.append([dict(m) for m in msgs[:2 * max_turns]])
    return out


# ------------------------------------------------------------------------------------------------
# training examples: (ids, loss mask)

@dataclass
class Example:
    ids: list[int]
    loss_mask: list[bool]        # loss_mask[t]: the token ids[t] is a training target (predicted from ids[:t])
    kind: str = ""

    def __len__(self):
        return len(self.ids)


def sft_example(dialog, tokenizer, kind="sft") -> Example:
    """Ordinary SFT: a finished dialogue, loss on every assistant token of every turn."""
    enc = encode_dialog(dialog, tokenizer, final="assistant")
    return Example(enc.ids, enc.mask(ASSISTANT).tolist(), kind)


def last_turn_example(dialog, tokenizer, kind="gatt") -> Example:
    """GAtt: a finished dialogue whose loss covers ONLY the last assistant reply; every token of the previous
    turns (system, user and assistant) has loss zero."""
    enc = encode_dialog(dialog, tokenizer, final="assistant")
    last = enc.n_turns - 1
    return Example(enc.ids, enc.mask(ASSISTANT, turns=[last]).tolist(), kind)


def baseline_sft_data(tokenizer, n: int, seed: int = 0, instruction_fraction: float = 0.5,
                      max_len: int | None = None) -> list[Example]:
    """The baseline chat data, trained the ordinary way.

    Plain multi-turn corpus dialogues (no system message, loss on every answer) and SINGLE-TURN instruction
    examples: the instruction in the system message (or, a third of the time, written in front of the user's
    question), one question, the obedient answer. So the baseline never sees an instruction beyond turn 1.
    """
    rng = random.Random(f"sft-{seed}")
    dialogs = corpus_dialogues("train", n, seed=seed + 1)
    out = []
    for d in dialogs:
        if rng.random() < instruction_fraction:
            ins = random_instruction(rng, "train")
            k = rng.randrange(len(d) // 2)
            q, a = d[2 * k]["content"], d[2 * k + 1]["content"]
            if rng.random() < 2 / 3:
                dialog = [{"role": "system", "content": ins.text}, {"role": "user", "content": q}]
            else:
                dialog = [{"role": "user", "content": f"{ins.text} {q}"}]
            ex = sft_example(dialog + [{"role": "assistant", "content": ins.apply(a)}], tokenizer, "sft-instruction")
        else:
            ex = sft_example(d, tokenizer, "sft-dialogue")
            while max_len and len(ex) > max_len and len(d) > 2:      # too long for the window: drop the last turn
                d = d[:-2]
                ex = sft_example(d, tokenizer, "sft-dialogue")
        if not max_len or len(ex) <= max_len:
            out.append(ex)
    return out


# ------------------------------------------------------------------------------------------------
# rejection sampling from the current model

@dataclass
class SampledDialogue:
    instruction: Instruction
    dialog: list[dict]                   # with the instruction ONLY in the system message, original user messages
    n_tries: list[int] = field(default_factory=list)   # samples drawn per turn (the last one accepted)
    n_rejected: int = 0
    rejected: list[str] = field(default_factory=list)  # a few rejected replies, to show


def sample_gatt_dialogues(model, tokenizer, items, seed: int, max_tries: int = 4, max_new_tokens: int = 40,
                          temperature: float = 0.7, top_p: float = 0.95, batch_size: int = 16) -> list[SampledDialogue]:
    """Steps 1-2 of GAtt for many dialogues: items are (Instruction, dialog) pairs.

    Turn by turn, the instruction is concatenated to the user message, every open dialogue is prompted with its
    history (instruction in every user message, its accepted replies) and a reply is sampled from `model`; a reply
    the checker rejects (or that does not end with EOS) is drawn again, up to max_tries times. A dialogue ends at the
    first turn where no sample is accepted, or when the next prompt would not fit the context window.
    The dialogues of one turn are sampled together (generate_batch), batch_size at a time.
    """
    limit = model.config.max_seq_len
    states = []
    for ins, dialog in items:
        states.append({"ins": ins, "users": [m["content"] for m in dialog if m["role"] == "user"], "shown": [],
                       "replies": [], "tries": [], "n_rej": 0, "rejected": [], "open": True})
    n_turns = max((len(st["users"]) for st in states), default=0)
    for k in range(n_turns):
        pending = []
        for i, st in enumerate(states):
            if not st["open"] or k >= len(st["users"]):
                st["open"] = False
                continue
            st["shown"].append({"role": "user", "content": f"{st['ins'].text} {st['users'][k]}"})
            ids = format_dialog(st["shown"], tokenizer)
            if len(ids) + max_new_tokens > limit:
                st["shown"].pop()
                st["open"] = False
                continue
            pending.append((i, ids))
        for t in range(max_tries):
            pending.sort(key=lambda p: len(p[1]))
            still = []
            for c in range(0, len(pending), batch_size):
                chunk = pending[c:c + batch_size]
                outs = gen.generate_batch(model, [ids for _, ids in chunk], max_new_tokens, temperature, None, top_p,
                                          seeds=[seed * 7919 + i * 101 + k * 11 + t for i, _ in chunk])
                for (i, ids), new in zip(chunk, outs):
                    st = states[i]
                    text = tokenizer.decode([x for x in new if x != tokenizer.eos_id]).strip()
                    if new and new[-1] == tokenizer.eos_id and st["ins"].obeyed(text):
                        st["shown"].append({"role": "assistant", "content": text})
                        st["replies"].append(text)
                        st["tries"].append(t + 1)
                    else:
                        st["n_rej"] += 1
                        if len(st["rejected"]) < 3:
                            st["rejected"].append(text)
                        still.append((i, ids))
            pending = still
        for i, _ in pending:                                  # no accepted sample: the dialogue ends here
            states[i]["shown"].pop()
            states[i]["open"] = False
    out = []
    for st in states:
        d = [{"role": "system", "content": st["ins"].text}]
        for q, r in zip(st["users"], st["replies"]):
            d += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        out.append(SampledDialogue(st["ins"], d, st["tries"], st["n_rej"], st["rejected"]))
    return out


def sample_gatt_dialogue(model, tokenizer, instruction: Instruction, dialog, seed: int, **kw) -> SampledDialogue:
    """sample_gatt_dialogues for one dialogue."""
    return sample_gatt_dialogues(model, tokenizer, [(instruction, dialog)], seed, **kw)[0]


def gatt_examples(sampled: SampledDialogue, tokenizer, max_len: int | None = None) -> list[Example]:
    """Step 3: for every prefix that ends with an accepted reply, an example with the instruction only in the
    system message and loss only on that last reply."""
    msgs = sampled.dialog
    out = []
    for k in range(1, (len(msgs) - 1) // 2 + 1):
        ex = last_turn_example(msgs[:1 + 2 * k], tokenizer)
        if max_len is None or len(ex) <= max_len:
            out.append(ex)
    return out


# ------------------------------------------------------------------------------------------------
# evaluation: adherence per turn, attention to the system message

def eval_dialogues(n: int, seed: int = 0, n_turns: int = 8) -> list[tuple[Instruction, list[str]]]:
    """Held-out evaluation set: test-split questions (n_turns of them) and test-split instruction combinations."""
    rng = random.Random(f"gatt-eval-{seed}")
    return [(random_instruction(rng, "test"), [m["content"] for m in d if m["role"] == "user"][:n_turns])
            for d in _eval_corpus_dialogues(n, seed, n_turns)]


def _eval_corpus_dialogues(n: int, seed: int, n_turns: int) -> list[list[dict]]:
    """The test-split dialogues behind eval_dialogues and eval_references (one definition keeps them paired)."""
    return corpus_dialogues("test", n, seed=seed + 77, min_turns=n_turns, max_turns=n_turns)


@dataclass
class ChatRun:
    instruction: Instruction
    dialog: list[dict]                   # system + user/assistant, the model's own replies
    obeyed: list[bool]                   # per turn
    per_family: list[dict]               # per turn: {family: bool}
    dropped: list[int]                   # per turn: exchanges dropped by the context policy


def run_chats(model, tokenizer, items, max_new_tokens: int = 40, batch_size: int = 16) -> list[ChatRun]:
    """Greedy chats, items = (Instruction, questions): the instruction in the system message only, one question per
    turn, the model's own replies kept in the history (the oldest exchanges dropped when the window is full; the
    system message stays, see chat.fit_dialog). All dialogues of one turn are decoded together."""
    runs = [ChatRun(ins, [{"role": "system", "content": ins.text}], [], [], []) for ins, _ in items]
    questions = [list(qs) for _, qs in items]
    for k in range(max(len(q) for q in questions)):
        todo = []
        for i, r in enumerate(runs):
            if k < len(questions[i]):
                r.dialog.append({"role": "user", "content": questions[i][k]})
                fitted, n_drop = fit_dialog(r.dialog, tokenizer, model.config.max_seq_len, reserve=max_new_tokens)
                r.dropped.append(n_drop)
                todo.append((i, format_dialog(fitted, tokenizer)))
        todo.sort(key=lambda p: len(p[1]))
        for c in range(0, len(todo), batch_size):
            chunk = todo[c:c + batch_size]
            outs = gen.generate_batch(model, [ids for _, ids in chunk], max_new_tokens, 0.0)
            for (i, _), new in zip(chunk, outs):
                r = runs[i]
                text = tokenizer.decode([x for x in new if x != tokenizer.eos_id]).strip()
                r.dialog.append({"role": "assistant", "content": text})
                r.per_family.append(r.instruction.check(text))
                r.obeyed.append(all(r.per_family[-1].values()))
    return runs


def run_chat(model, tokenizer, instruction: Instruction, questions, max_new_tokens: int = 40) -> ChatRun:
    """run_chats for one dialogue."""
    return run_chats(model, tokenizer, [(instruction, questions)], max_new_tokens)[0]


def adherence(runs: list[ChatRun]) -> dict:
    """Fractions per turn: all families obeyed, and per family."""
    n_turns = max(len(r.obeyed) for r in runs)
    out = {"all": [], **{f: [] for f in FAMILIES}}
    for k in range(n_turns):
        rs = [r for r in runs if len(r.obeyed) > k]
        out["all"].append(float(np.mean([r.obeyed[k] for r in rs])))
        for f in FAMILIES:
            v = [r.per_family[k][f] for r in rs if f in r.per_family[k]]
            out[f].append(float(np.mean(v)) if v else None)
    return out


def eval_references(n: int, seed: int = 0, n_turns: int = 8) -> list[list[str]]:
    """The corpus' own answers to the questions of eval_dialogues(n, seed, n_turns), dialogue by dialogue."""
    return [[m["content"] for m in d if m["role"] == "assistant"][:n_turns]
            for d in _eval_corpus_dialogues(n, seed, n_turns)]


_DECORATIONS = re.compile(r"^I am [A-Z][a-z]+\.\s*|\s*(?<!\S)I love [a-z]+\.(?=\s|$)|\s*(?:"
                          + "|".join(re.escape(v) for v in sorted(set(SOUNDS.values()))) + r")$")


def strip_instruction(reply: str) -> str:
    """The answer inside a reply: any persona sentence ("I am Tom."), hobby sentence ("I love kites.") and closing
    sound ("Moo!") removed, whether or not they are the instructed ones (answer quality, apart from adherence)."""
    prev, r = None, reply.strip()
    while prev != r:                                           # the sound may sit after the hobby sentence
        prev, r = r, _DECORATIONS.sub("", r).strip()
    return " ".join(r.split())


def answer_accuracy(runs: list[ChatRun], references: list[list[str]]) -> list[float]:
    """Per turn: share of replies whose answer (strip_instruction) is exactly the corpus' answer. Does following an
    instruction cost the content? Turns after a wrong answer still count: the model carries its own history."""
    n_turns = max(len(r.obeyed) for r in runs)
    out = []
    for k in range(n_turns):
        pairs = [(r.dialog[2 + 2 * k]["content"], ref[k]) for r, ref in zip(runs, references) if len(r.obeyed) > k]
        out.append(float(np.mean([strip_instruction(a) == " ".join(b.split()) for a, b in pairs])))
    return out


def system_attention(model, tokenizer, dialog, per_head: bool = False) -> np.ndarray:
    """Share of attention mass that the reply tokens put on the system-message tokens, per layer and per turn.

    One forward over the finished dialogue, recording `layers.{i}.attn.probs`. For turn k the queries are the
    positions that PREDICT its reply tokens (each assistant token's previous position); the share is the
    probability mass on key positions labelled "system", averaged over heads and those queries.
    Returns (n_layers, n_turns) float, or (n_layers, n_heads, n_turns) with per_head (the mean over heads hides
    the few heads that carry an instruction); NaN for a turn that does not fit the context window.
    """
    enc = encode_dialog(dialog, tokenizer, final="assistant")
    T = min(len(enc.ids), model.config.max_seq_len)
    ids = enc.ids[:T]
    trace = Trace("layers.*.attn.probs")
    model.forward(ids, trace=trace)
    roles = np.array(enc.roles[:T])
    turns = np.array(enc.turns[:T])
    is_sys = roles == SYSTEM                                              # (T,) keys
    L = model.config.n_layers
    out = np.full((L, model.config.n_heads, enc.n_turns), np.nan)
    for k in range(enc.n_turns):
        targets = np.nonzero((roles == ASSISTANT) & (turns == k))[0]
        q = targets[targets >= 1] - 1                                      # positions that predict them
        if len(q) == 0 or (k == enc.n_turns - 1 and len(enc.ids) > T):
            continue
        for i in range(L):
            p = trace[f"layers.{i}.attn.probs"][0]                         # (nh, T, T)
            out[i, :, k] = p[:, q][:, :, is_sys].sum(-1).mean(-1)            # (nh,)
    return out if per_head else out.mean(axis=1)


# ------------------------------------------------------------------------------------------------
# batches for the trainer

def make_batches(examples: list[Example], batch_size: int, seed: int, pad_id: int = 0):
    """Endless stream of (tokens (B, T), targets (B, T), mask (B, T)) from examples, in shuffled epochs.

    tokens[b, t] predicts targets[b, t] = ids[t + 1]; mask[b, t] = loss_mask[t + 1] (is the NEXT token a training
    target). Examples of similar length share a batch (less padding); padding sits at the right end, where the
    causal mask keeps it from changing any real position, and its mask is False.
    """
    if not examples:
        raise InputError("no training examples")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        chunks = [order[i:i + batch_size * 8] for i in range(0, len(order), batch_size * 8)]
        batches = []
        for ch in chunks:                                         # sort within a chunk by length, then cut
            ch = sorted(ch, key=lambda i: len(examples[i]))
            batches += [ch[i:i + batch_size] for i in range(0, len(ch), batch_size)]
        for bi in rng.permutation(len(batches)):
            b = [examples[i] for i in batches[bi]]
            T = max(len(e) for e in b) - 1
            tokens = np.full((len(b), T), pad_id, np.int64)
            targets = np.full((len(b), T), pad_id, np.int64)
            mask = np.zeros((len(b), T), bool)
            for r, e in enumerate(b):
                n = len(e) - 1
                tokens[r, :n] = e.ids[:-1]
                targets[r, :n] = e.ids[1:]
                mask[r, :n] = e.loss_mask[1:]
            yield tokens, targets, mask
