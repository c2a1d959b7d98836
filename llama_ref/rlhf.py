"""RLHF in miniature: how Llama 2-Chat was made from its SFT model (Llama 2 paper, sec. 3.2), on our tiny world.

Chapters 09 (preferences, reward model) and 10 (rejection sampling, PPO) walk through it; `make rlhf` (scripts/make_rlhf.py) runs it. The paper's pipeline, and ours:

    paper                                              here
    human annotators compare two replies and say       a simulated annotator compares two sampled replies by their
    how much better one is (4 degrees)                 *true* quality (the world's own checkers) plus noise
    reward model = chat model + a scalar head,         the same, trained with the same loss, backward by hand
    binary ranking loss with a margin
    5 rounds: rejection sampling (best of K by the     1 round of rejection sampling, then PPO on top of it, with a
    reward model, fine-tune on it), then PPO           per-token KL leash to the SFT model and a value head

What is ours, not the paper's: the annotator (its noise and degree thresholds below are our choice), the model sizes
(5M parameters), the prompt set (questions about facts of the world) and the number of rounds. What we can do that
real RLHF cannot: every reply has a true quality, so what the reward model *believes* is measured against what is
*true*, and reward hacking shows up as reward rising while truth does not.

Read top to bottom:

    prompts              make_prompts: questions the SFT model was never asked in training (the world's val-split
                         facts), with or without a system-message instruction and earlier turns
    the world's judge    judge -> Judgement (correct, adherence, grammatical, concise), true_quality
    the annotator        Annotator.compare -> Preference (chosen, rejected, degree); JSONL in and out
    the reward model     reward_forward / reward_backward (backprop.py's trunk + a score head), ranking_loss,
                         train_reward_model, RewardModel (scoring), save / load
    best of N            sample_replies, best_of_n
    rejection sampling   rejection_sampling_examples (fine-tuned with trainer.finetune)
    PPO                  token_logprobs, rollout, kl_rewards, gae, ppo_loss (+ backward), ppo_step, ppo_train
    evaluation           evaluate_policy
"""
from __future__ import annotations

import itertools
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chat import encode_dialog, format_dialog
from .checkpoint import save_model
from .config import LlamaConfig
from .corpus import PETS, generate_dialogues, is_grammatical, make_world, split_sentences
from .errors import InputError, PreferenceError
from .files import write_text
from .gatt import Example, Instruction, last_turn_example, random_instruction, strip_instruction
from .generate import generate_batch
from .model import Llama, rope_tables
from .safetensors import read_safetensors
from .backprop import (AdamW, HEAD, clip_grad_norm, data_parallel, linear_backward, lr_schedule, model_backward,
                    model_forward, split_rows, trunk_backward, trunk_forward)
from .weights import check_weights, weight_shapes

F32 = np.float32


# ------------------------------------------------------------------------------------------------
# prompts

@dataclass
class Prompt:
    dialog: list[dict]              # [system], earlier (user, assistant) exchanges, the question: ends with "user"
    answer: str                     # the world's true answer to the last question
    instruction: Instruction | None  # what the system message asks, if there is one

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
MARGINS = dict(zip(DEGREES, (1.0, 2 / 3, 1 / 3, 0.0)))          # the paper's "small" margin m(degree), its Table 27


@dataclass
class Preference:
    dialog: list[dict]       # the prompt: ends with the user's message
    chosen: str
    rejected: str
    degree: str              # one of DEGREES: how much better `chosen` is

    def to_json(self) -> dict:
        return {"prompt": self.dialog, "chosen": self.chosen, "rejected": self.rejected, "degree": self.degree}


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

    def degree(self, gap: float) -> str:
        for name, t in zip(DEGREES, self.thresholds):
            if gap >= t:
                return name
        return DEGREES[-1]

    def compare(self, prompt: Prompt, a: str, b: str, rng: np.random.Generator) -> Preference:
        qa = true_quality(prompt, a) + self.noise * rng.standard_normal()
        qb = true_quality(prompt, b) + self.noise * rng.standard_normal()
        chosen, rejected = (a, b) if qa >= qb else (b, a)
        return Preference(prompt.dialog, chosen, rejected, self.degree(abs(qa - qb)))


def annotate(prompts: list[Prompt], replies: list[list[str]], annotator: Annotator, seed: int = 0) -> list[Preference]:
    """Preferences from K sampled replies per prompt: every pair of distinct replies is compared (up to K(K-1)/2 per
    prompt; sampling is the expensive part, so each sample is used in every comparison it can be). Identical replies
    are never shown to the annotator: there is nothing to prefer."""
    rng = np.random.default_rng(seed)
    out = []
    for p, rs in zip(prompts, replies):
        distinct = list(dict.fromkeys(r.strip() for r in rs))
        for i, j in itertools.combinations(range(len(distinct)), 2):
            out.append(annotator.compare(p, distinct[i], distinct[j], rng))
    return out


def write_preferences(path, prefs: list[Preference]) -> Path:
    """One JSON object per line: {"prompt": [messages], "chosen": str, "rejected": str, "degree": str}."""
    return write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in prefs))


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


def read_preferences(path) -> list[Preference]:
    """Read a JSONL preference file, checking every line: a known degree, two non-empty replies that differ and
    answer the same prompt, a prompt that ends with the user's message."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PreferenceError(f"cannot read the preference file {path} ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PreferenceError(f"{where}: not JSON ({e.msg}); each line holds one preference object") from None
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
        out.append(Preference(prompt, chosen, rejected, degree))
    if not out:
        raise PreferenceError(f"{path} holds no preferences")
    return out


# ------------------------------------------------------------------------------------------------
# the reward model: the Llama trunk, and a scalar head on the last token's final hidden state

SCORE = "score.weight"      # (1, C), as Hugging Face's LlamaForSequenceClassification names its head


def reward_forward(config: LlamaConfig, P: dict, tokens, last):
    """Rewards (B,) of right-padded sequences tokens (B, T) whose last real tokens sit at `last` (B,)."""
    xn, trunk = trunk_forward(config, P, tokens)                                # (B, T, C)
    h = xn[np.arange(len(last)), last]                                          # (B, C)
    r = h @ P[SCORE][0]                                                         # (B,)
    return r, (xn.shape, last, h, trunk)


def reward_backward(config: LlamaConfig, P: dict, dr, cache) -> dict:
    """Gradients of the trunk and the score head given d loss / d rewards (B,)."""
    shape, last, h, trunk = cache
    dxn = np.zeros(shape, F32)
    dxn[np.arange(len(last)), last] = dr[:, None] * P[SCORE][0]                  # only the last token is read
    grads = trunk_backward(config, P, dxn, trunk, {})
    grads[SCORE] = (dr @ h)[None, :].astype(F32)                                 # (1, C)
    return grads


def ranking_loss(r_chosen, r_rejected, margins):
    """The paper's eq. 2 with a margin: mean of -log sigmoid(r_chosen - r_rejected - m(degree)). Returns (loss, cache).

    -log sigmoid(z) = log(1 + e^-z), computed as logaddexp(0, -z) so a large |z| neither overflows nor rounds to 0.
    """
    z = r_chosen - r_rejected - margins                                          # (N,)
    return float(np.mean(np.logaddexp(0.0, -z))), z


def ranking_loss_backward(z):
    """d loss / d r_chosen = -sigmoid(-z) / N and d loss / d r_rejected is its negative."""
    dz = -0.5 * (1.0 - np.tanh(0.5 * z)) / len(z)                                # -sigmoid(-z) / N, stable
    return dz, -dz


def encode_reply(dialog, reply: str, tokenizer) -> list[int]:
    """Token ids of a prompt dialogue finished by `reply` (ending with its EOS), the sequence a reward model reads."""
    return encode_dialog(list(dialog) + [{"role": "assistant", "content": reply}], tokenizer, final="assistant").ids


def pad_right(seqs, pad_id: int = 0):
    """tokens (B, T) right-padded with pad_id, and the index of each row's last real token (B,)."""
    T = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), T), pad_id, np.int64)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
    return tokens, np.array([len(s) - 1 for s in seqs], np.int64)


def encode_preferences(prefs: list[Preference], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of every preference, the sequences the reward model reads; a preference longer than
    the model's context max_len is refused before any training."""
    pairs = [(encode_reply(p.dialog, p.chosen, tokenizer), encode_reply(p.dialog, p.rejected, tokenizer)) for p in prefs]
    longest = max(len(s) for pair in pairs for s in pair)
    if longest > max_len:
        raise InputError(f"a preference is {longest} tokens long, more than the reward model's context of {max_len}; "
                         "shorten the prompt")
    return pairs


def preference_batch(pairs: list[tuple[list[int], list[int]]], degrees: list[str]):
    """(tokens (2N, T), last (2N,), margins (N,)) of N encoded pairs (encode_preferences) and their degrees: the N
    chosen sequences, then the N rejected ones."""
    tokens, last = pad_right([c for c, _ in pairs] + [r for _, r in pairs])
    return tokens, last, np.array([MARGINS[d] for d in degrees], F32)


def ranking_step(config: LlamaConfig, P: dict, tokens, last, margins):
    """Loss, gradients and the pairs ranked right (N,) of one batch of N pairs (tokens: the N chosen rows, then the N
    rejected ones, as preference_batch lays them out)."""
    n = len(margins)
    r, cache = reward_forward(config, P, tokens, last)
    loss, z = ranking_loss(r[:n], r[n:], margins)
    dc, dr = ranking_loss_backward(z)
    return loss, reward_backward(config, P, np.concatenate([dc, dr]).astype(F32), cache), r[:n] > r[n:]


def ranking_step_parallel(config: LlamaConfig, P: dict, tokens, last, margins, workers: int = 2):
    """ranking_step with the pairs split across threads (train.data_parallel), each pair's two rows kept together."""
    n = len(margins)
    parts = split_rows(n, workers)
    if len(parts) < 2:
        return ranking_step(config, P, tokens, last, margins)

    def part(pairs):
        rows = np.concatenate([pairs, n + pairs])                                     # its chosen, then its rejected
        return ranking_step(config, P, tokens[rows], last[rows], margins[pairs])

    loss, grads, right = data_parallel(part, parts, [len(pairs) for pairs in parts])
    return loss, grads, np.concatenate(right)


def length_grouped_batches(lengths, batch_size: int, rng, group: int = 32) -> list[np.ndarray]:
    """One epoch of batches (arrays of indices) whose rows have similar lengths: shuffle, sort each run of
    group * batch_size by length, cut it into batches, shuffle the batches. Every row of a batch is padded to its
    longest, and random batches of our preferences were a third padding; grouped, each batch is still a random draw
    from the data, with little padding. The few rows that do not fill a last batch sit out that epoch."""
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    order = order[:len(order) // batch_size * batch_size]
    span = group * batch_size
    for s in range(0, len(order), span):
        run = order[s:s + span]
        order[s:s + span] = run[np.argsort(lengths[run], kind="stable")]
    batches = order.reshape(-1, batch_size)
    return list(batches[rng.permutation(len(batches))])


def reward_model_init(config: LlamaConfig, chat_weights: dict, seed: int = 0) -> dict:
    """The paper initialises its reward models from the chat model: its weights, and a small random score head."""
    P = {k: np.array(v, F32) for k, v in chat_weights.items()}
    P[SCORE] = (np.random.default_rng(seed).standard_normal((1, config.dim)) * (0.1 / math.sqrt(config.dim))).astype(F32)
    return P


def train_reward_model(config: LlamaConfig, P: dict, prefs: list[Preference], tokenizer, steps: int,
                       batch_size: int = 16, lr: float = 5e-5, seed: int = 0, time_budget_s: float | None = None,
                       log=print, progress: bool = True, workers: int = 2):
    """Train reward-model parameters P (from reward_model_init) on preferences with the margin ranking loss.

    AdamW with warmup and cosine decay, gradient clipping 1.0, no weight decay; the chat model's lm_head rides along
    untouched (the reward model never reads it). Batches hold pairs of similar length (length_grouped_batches), and
    each batch's pairs are split across `workers` threads (ranking_step_parallel). Returns (P, metrics) with the loss
    and pair accuracy per step.
    """
    from tqdm.auto import tqdm
    if not prefs:
        raise InputError("no preferences to train the reward model on")
    trainable = {k: v for k, v in P.items() if k != HEAD}
    opt = AdamW(trainable, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pairs = encode_preferences(prefs, tokenizer, config.max_seq_len)
    lengths = [max(len(c), len(r)) for c, r in pairs]
    batches, history, t0 = [], [], time.time()
    bar = tqdm(total=steps, desc="reward model", unit="step", disable=not progress)
    for step in range(steps):
        if not batches:
            batches = length_grouped_batches(lengths, min(batch_size, len(prefs)), rng)
        rows = batches.pop()
        tokens, last, margins = preference_batch([pairs[i] for i in rows], [prefs[i].degree for i in rows])
        loss, grads, right = ranking_step_parallel(config, P, tokens, last, margins, workers)
        norm = clip_grad_norm(grads, 1.0)
        opt.step(trainable, grads, lr_schedule(step, lr, max(1, steps // 20), steps))
        history.append({"step": step + 1, "loss": loss, "accuracy": float(np.mean(right)), "grad_norm": norm})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % max(1, steps // 10) == 0:
            recent = history[-max(1, steps // 10):]
            log(f"reward model step {step + 1}/{steps}: loss {np.mean([h['loss'] for h in recent]):.4f}, "
                f"pair accuracy {np.mean([h['accuracy'] for h in recent]):.3f}")
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            log(f"reward model: time budget used after {step + 1} of {steps} steps")
            break
    bar.close()
    return P, {"steps": len(history), "lr": lr, "batch_size": batch_size, "n_pairs": len(prefs),
               "time_s": time.time() - t0, "history": history}


class RewardModel:
    """A trained reward model, for scoring: r(prompt, reply) is a float, higher is better."""

    def __init__(self, config: LlamaConfig, P: dict):
        self.config, self.P = config, P

    def score_ids(self, seqs, batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(seqs), batch_size):
            tokens, last = pad_right(seqs[i:i + batch_size])
            out.append(reward_forward(self.config, self.P, tokens, last)[0])
        return np.concatenate(out).astype(np.float64)

    def score(self, tokenizer, dialogs, replies, batch_size: int = 32) -> np.ndarray:
        """Rewards (N,) of replies[i] to dialogs[i]."""
        return self.score_ids([encode_reply(d, r, tokenizer) for d, r in zip(dialogs, replies)], batch_size)

    def score_samples(self, tokenizer, dialogs, samples, batch_size: int = 32) -> np.ndarray:
        """Rewards (P, K) of K sampled replies per prompt (samples[i] answers dialogs[i]), scored batch_size at a time
        across prompts."""
        K = len(samples[0])
        flat = self.score(tokenizer, [d for d, s in zip(dialogs, samples) for _ in s], [r for s in samples for r in s],
                          batch_size)
        return flat.reshape(len(dialogs), K)


def save_reward_model(path, config: LlamaConfig, P: dict, tokenizer_path=None, extra_files=None) -> Path:
    """An HF LlamaForSequenceClassification directory (num_labels 1, score.weight), atomically (save_model). The
    chat model's lm_head is kept beside the score head, unused."""
    return save_model(path, config, {k: v for k, v in P.items() if k != SCORE}, tokenizer_path=tokenizer_path,
                      extra_files=extra_files,
                      extra_tensors={SCORE: P[SCORE]},
                      config_extra={"architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
                                    "pad_token_id": 0})


def load_reward_model(path) -> RewardModel:
    """The reward model save_reward_model wrote."""
    path = Path(path)
    config = LlamaConfig.load(path / "config.json")
    tensors, _ = read_safetensors(path / "model.safetensors")
    if SCORE not in tensors or tuple(tensors[SCORE].shape) != (1, config.dim):
        raise InputError(f"{path} is not a reward model: its model.safetensors has no {SCORE} of shape (1, {config.dim})")
    weights = {k: np.array(tensors[k], F32) for k in weight_shapes(config)}
    check_weights(config, weights, source=path / "model.safetensors")
    return RewardModel(config, {**weights, SCORE: np.array(tensors[SCORE], F32)})


# ------------------------------------------------------------------------------------------------
# best of N, and rejection sampling

def sample_replies(model: Llama, tokenizer, dialogs, k: int, seed: int, temperature=1.0,
                   max_new_tokens: int = 40, batch_size: int = 32, time_budget_s: float | None = None,
                   log=print) -> list[list[str]]:
    """k sampled replies (text) to each prompt dialogue; sample j of prompt i uses the seed (seed, i, j).
    temperature: one for all samples, or a sequence cycled over j (the paper varies it for diverse comparisons).
    With time_budget_s, stops after the batch of prompts that uses it up: the list then answers only the first
    prompts (each with all k replies), and callers keep that many prompts."""
    temps = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature]
    prompts = [format_dialog(d, tokenizer) for d in dialogs]
    out, t0 = [], time.time()
    for c in range(0, len(prompts), batch_size):
        idx = range(c, min(c + batch_size, len(prompts)))
        replies = [[] for _ in idx]
        for j in range(k):
            new = generate_batch(model, [prompts[i] for i in idx], max_new_tokens, temps[j % len(temps)],
                                 seeds=[seed * 1_000_003 + i * 1009 + j for i in idx])
            for r, ids in zip(replies, new):
                r.append(tokenizer.decode([t for t in ids if t != tokenizer.eos_id]).strip())
        out += replies
        if time_budget_s is not None and time.time() - t0 > time_budget_s and len(out) < len(prompts):
            log(f"sampling: time budget used after {len(out)} of {len(prompts)} prompts")
            break
    return out


def best_of_n(prompts: list[Prompt], replies: list[list[str]], rewards: np.ndarray, ns=(1, 2, 4, 8, 16)) -> list[dict]:
    """The paper's Figure 7, and what it cannot show: for each N, the reward of the reward model's favourite among the
    first N samples, the true quality of that pick, and the true quality of the best pick an oracle could make."""
    quality = np.array([[true_quality(p, r) for r in rs] for p, rs in zip(prompts, replies)])    # (P, K)
    rewards = np.asarray(rewards)
    out = []
    for n in ns:
        if n > quality.shape[1]:
            break
        pick = rewards[:, :n].argmax(axis=1)
        rows = np.arange(len(prompts))
        out.append({"n": n, "rm_pick_reward": float(rewards[rows, pick].mean()),
                    "rm_pick_quality": float(quality[rows, pick].mean()),
                    "oracle_pick_quality": float(quality[:, :n].max(axis=1).mean()),
                    "mean_quality": float(quality[:, :n].mean())})
    return out


def rejection_sampling_examples(prompts: list[Prompt], replies: list[list[str]], rewards: np.ndarray,
                                tokenizer) -> list[Example]:
    """For each prompt, the reply the reward model likes best, as a fine-tuning example with loss on that reply only."""
    best = np.asarray(rewards).argmax(axis=1)
    return [last_turn_example(p.dialog + [{"role": "assistant", "content": rs[b]}], tokenizer, kind="rejection")
            for p, rs, b in zip(prompts, replies, best)]


# ------------------------------------------------------------------------------------------------
# PPO: maximise R(reply) - beta * KL(policy || SFT) with a clipped surrogate, a value head and GAE

VALUE = "value_head.weight"   # (1, C): the value of a state, read from the policy's final hidden state there


@dataclass
class PPOSettings:
    beta: float = 0.01            # KL penalty per token; the paper's value for 7B and 13B
    clip: float = 0.2             # the surrogate's clipping range, the paper's epsilon
    gamma: float = 1.0            # no discount within a reply
    lam: float = 0.95             # GAE's lambda
    vf_coef: float = 0.1          # weight of the value loss beside the policy loss
    lr: float = 2e-5
    prompts_per_iteration: int = 32
    epochs: int = 2               # passes over each rollout
    minibatch: int = 16
    temperature: float = 1.0
    max_new_tokens: int = 40
    grad_clip: float = 1.0
    workers: int = 2              # threads each minibatch's rows are split across (train.data_parallel)

    def check(self) -> None:
        for name in ("beta", "clip", "vf_coef", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"PPO setting {name}={v!r} must be a finite number >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise InputError(f"gamma={self.gamma} and lam={self.lam} must lie in [0, 1]")
        for name in ("prompts_per_iteration", "epochs", "minibatch", "max_new_tokens", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"PPO setting {name}={getattr(self, name)!r} must be a positive integer")


def token_logprobs(logits, actions):
    """log p(actions[b, t]) under logits[b, t] (B, T, V) -> (B, T), and the softmax (B, T, V) the backward needs."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=-1, keepdims=True)
    logp = np.take_along_axis(z, actions[..., None], axis=-1)[..., 0] - np.log(s[..., 0])
    return logp, e / s


def value_forward(xn, w):
    """V(state at each position) = xn . w: xn (B, T, C), w (1, C) -> (B, T)."""
    return xn @ w[0]


@dataclass
class Rollout:
    tokens: np.ndarray            # (B, T + 1) prompt + reply ids, right-padded: inputs tokens[:, :-1], actions [:, 1:]
    mask: np.ndarray              # (B, T) True where the action is a reply token
    logp_old: np.ndarray          # (B, T) log-probability of each action under the policy that sampled it
    logp_ref: np.ndarray          # (B, T) ... under the frozen reference (SFT) model
    values: np.ndarray            # (B, T) the value head's estimate before each action
    scores: np.ndarray            # (B,) the reward model's score of each finished reply (raw)
    replies: list[str]
    quality: np.ndarray           # (B,) the world's true quality of each reply (never seen by PPO; for the record)
    correct: np.ndarray           # (B,) bool


def rollout(config: LlamaConfig, P: dict, ref: dict, rm: RewardModel, tokenizer, prompts: list[Prompt],
            settings: PPOSettings, seed: int) -> Rollout:
    """Sample one reply per prompt from the policy P, then score everything PPO needs about it."""
    policy = Llama(config, {k: v for k, v in P.items() if k != VALUE})
    prompt_ids = [format_dialog(p.dialog, tokenizer) for p in prompts]
    new = generate_batch(policy, prompt_ids, settings.max_new_tokens, settings.temperature,
                         seeds=[seed * 1_000_003 + i for i in range(len(prompts))])
    seqs = [p + n for p, n in zip(prompt_ids, new)]
    tokens, _ = pad_right(seqs)                                                    # (B, T + 1)
    inputs, actions = tokens[:, :-1], tokens[:, 1:]
    mask = np.zeros(actions.shape, bool)
    for b, (p, n) in enumerate(zip(prompt_ids, new)):
        mask[b, len(p) - 1:len(p) - 1 + len(n)] = True                            # positions that predict the reply
    logits, cache = model_forward(config, P, inputs)
    logp_old, _ = token_logprobs(logits, actions)
    values = value_forward(cache[0], P[VALUE])
    logp_ref, _ = token_logprobs(model_forward(config, ref, inputs)[0], actions)
    replies = [tokenizer.decode([t for t in n if t != tokenizer.eos_id]).strip() for n in new]
    scores = rm.score(tokenizer, [p.dialog for p in prompts], replies)
    judged = [judge(p, r) for p, r in zip(prompts, replies)]
    return Rollout(tokens, mask, logp_old, logp_ref, values, scores, replies,
                   np.array([j.quality for j in judged]), np.array([j.exact for j in judged]))


def kl_rewards(ro: Rollout, beta: float, whiten: tuple[float, float]):
    """Per-token rewards (B, T): -beta * (log pi - log pi_ref) at every reply token (a sample of the KL), plus the
    reward model's score, whitened with the fixed (mean, std) of the SFT model's replies, at the reply's last token."""
    mean, std = whiten
    r = np.where(ro.mask, -beta * (ro.logp_old - ro.logp_ref), 0.0)
    last = ro.mask.shape[1] - 1 - np.argmax(ro.mask[:, ::-1], axis=1)              # (B,) last reply position
    r[np.arange(len(last)), last] += (ro.scores - mean) / std
    return r


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over each row's masked positions (one contiguous reply per row).

        delta_t = r_t + gamma V_{t+1} - V_t       (V after the last reply token is 0: the episode ends)
        A_t = delta_t + gamma lam A_{t+1}         returns_t = A_t + V_t
    """
    B, T = rewards.shape
    adv = np.zeros((B, T))
    next_value, next_adv = np.zeros(B), np.zeros(B)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = np.where(m, a, 0.0)
        next_value = np.where(m, values[:, t], 0.0)
        next_adv = np.where(m, a, 0.0)
    return adv, adv + values * mask


def ppo_loss(logits, values, actions, mask, logp_old, adv, returns, clip: float, vf_coef: float):
    """The clipped surrogate plus the value loss, means over reply tokens. Returns (loss, stats, cache).

        ratio = exp(log pi(a) - log pi_old(a))
        policy loss = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
        value loss  = mean((V - returns)^2) / 2
    """
    n = int(mask.sum())
    if n == 0:
        raise InputError("the rollout has no reply tokens: nothing for PPO to learn from")
    logp, probs = token_logprobs(logits, actions)
    ratio = np.exp(logp - logp_old)
    unclipped, clipped = -adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)
    pg = np.maximum(unclipped, clipped)
    pg_loss = float((pg * mask).sum() / n)
    vf_loss = float((0.5 * (values - returns) ** 2 * mask).sum() / n)
    stats = {"pg_loss": pg_loss, "vf_loss": vf_loss,
             "clipfrac": float(((unclipped < clipped) & mask).sum() / n),
             "approx_kl": float(((logp_old - logp) * mask).sum() / n)}
    return pg_loss + vf_coef * vf_loss, stats, (probs, actions, mask, n, adv, ratio, unclipped >= clipped,
                                               values, returns, vf_coef)


def ppo_loss_backward(cache):
    """d loss / d logits (B, T, V) and d loss / d values (B, T).

    Where the unclipped term is the max, d/d logp = -A ratio; where the clipped one is, the ratio sits outside the
    clip range and the gradient is 0. d logp / d logits = onehot(action) - softmax.
    """
    probs, actions, mask, n, adv, ratio, unclipped_max, values, returns, vf_coef = cache
    dlogp = np.where(mask & unclipped_max, -adv * ratio, 0.0) / n                  # (B, T)
    dlogits = -probs * dlogp[..., None]
    np.put_along_axis(dlogits, actions[..., None],
                      np.take_along_axis(dlogits, actions[..., None], axis=-1) + dlogp[..., None], axis=-1)
    dvalues = vf_coef * (values - returns) * mask / n
    return dlogits.astype(F32), dvalues.astype(F32)


def ppo_step(config: LlamaConfig, P: dict, ro: Rollout, rows, adv, returns, settings: PPOSettings, rope=None):
    """Loss, gradients and stats of one minibatch (rows of the rollout), through the policy and its value head."""
    inputs, actions = ro.tokens[rows, :-1], ro.tokens[rows, 1:]
    logits, cache = model_forward(config, P, inputs, rope)
    xn = cache[0]
    values = value_forward(xn, P[VALUE])
    loss, stats, c = ppo_loss(logits, values, actions, ro.mask[rows], ro.logp_old[rows], adv[rows], returns[rows],
                              settings.clip, settings.vf_coef)
    dlogits, dvalues = ppo_loss_backward(c)
    dxn_value, dw = linear_backward(dvalues[..., None], xn, P[VALUE])             # values = xn @ w.T
    grads = model_backward(config, P, dlogits, cache, dxn_extra=dxn_value)
    grads[VALUE] = dw
    return loss, grads, stats


def ppo_step_parallel(config: LlamaConfig, P: dict, ro: Rollout, rows, adv, returns, settings: PPOSettings, rope=None):
    """ppo_step with the minibatch's rows split across settings.workers threads (train.data_parallel). The loss and
    every stat are means over reply tokens, so the parts are weighted by their reply tokens."""
    rows = np.asarray(rows)
    parts = [rows[i] for i in split_rows(len(rows), settings.workers) if ro.mask[rows[i]].any()]
    if len(parts) < 2:
        return ppo_step(config, P, ro, rows, adv, returns, settings, rope)
    weights = [int(ro.mask[part].sum()) for part in parts]
    loss, grads, stats = data_parallel(lambda part: ppo_step(config, P, ro, part, adv, returns, settings, rope),
                                       parts, weights)
    total = sum(weights)
    return loss, grads, {k: sum(w * st[k] for w, st in zip(weights, stats)) / total for k in stats[0]}


def ppo_train(config: LlamaConfig, init: dict, ref: dict, rm: RewardModel, tokenizer, prompts: list[Prompt],
              settings: PPOSettings, iterations: int, whiten: tuple[float, float], seed: int = 0,
              time_budget_s: float | None = None, log=print, progress: bool = True):
    """PPO from `init` (the rejection-sampling model), with the frozen `ref` (SFT) as the KL anchor.

    Each iteration samples one reply for each of prompts_per_iteration prompts, computes per-token rewards, GAE
    advantages (whitened over the batch) and returns, then takes `epochs` passes of minibatch steps. Returns
    (policy weights without the value head, history) with reward, KL, true quality and losses per iteration.
    """
    from tqdm.auto import tqdm
    settings.check()
    P = {k: np.array(v, F32) for k, v in init.items()}
    P[VALUE] = np.zeros((1, config.dim), F32)
    opt = AdamW(P, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    rope = rope_tables(config, config.max_seq_len)
    history, t0 = [], time.time()
    bar = tqdm(total=iterations, desc=f"PPO beta={settings.beta:g}", unit="it", disable=not progress)
    for it in range(iterations):
        batch = [prompts[i] for i in rng.choice(len(prompts), settings.prompts_per_iteration, replace=False)]
        ro = rollout(config, P, ref, rm, tokenizer, batch, settings, seed=seed * 100_003 + it)
        rewards = kl_rewards(ro, settings.beta, whiten)
        adv, returns = gae(rewards, ro.values, ro.mask, settings.gamma, settings.lam)
        m = ro.mask
        mu, sd = adv[m].mean(), adv[m].std() + 1e-8
        adv = np.where(m, (adv - mu) / sd, 0.0)                                    # whitened advantages
        stats = []
        for _ in range(settings.epochs):
            order = rng.permutation(len(batch))
            for c in range(0, len(order), settings.minibatch):
                rows = order[c:c + settings.minibatch]
                loss, grads, st = ppo_step_parallel(config, P, ro, rows, adv, returns, settings, rope)
                clip_grad_norm(grads, settings.grad_clip)
                opt.step(P, grads, settings.lr)
                stats.append({"loss": loss, **st})
        kl = float((ro.logp_old - ro.logp_ref)[m].sum() / m.sum())
        history.append({"iteration": it + 1, "reward": float(ro.scores.mean()), "kl_per_token": kl,
                        "quality": float(ro.quality.mean()), "exact": float(ro.correct.mean()),
                        **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}, "time_s": time.time() - t0})
        bar.update(1)
        bar.set_postfix(reward=f"{history[-1]['reward']:.2f}", kl=f"{kl:.3f}")
        if (it + 1) % max(1, iterations // 10) == 0:
            h = history[-1]
            log(f"PPO beta={settings.beta:g} iteration {it + 1}/{iterations}: reward {h['reward']:.3f}, "
                f"KL/token {kl:.4f}, true quality {h['quality']:.3f}, exact {h['exact']:.2f}")
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            log(f"PPO: time budget used after {it + 1} of {iterations} iterations")
            break
    bar.close()
    return {k: v for k, v in P.items() if k != VALUE}, history


# ------------------------------------------------------------------------------------------------
# evaluation on held-out prompts

def reply_logprobs(config: LlamaConfig, P: dict, tokenizer, dialogs, replies, batch_size: int = 32) -> list[np.ndarray]:
    """log p of each reply token (its EOS included) given its prompt, under weights P: one array per reply."""
    out = []
    for c in range(0, len(dialogs), batch_size):
        prompt_ids = [format_dialog(d, tokenizer) for d in dialogs[c:c + batch_size]]
        seqs = [encode_reply(d, r, tokenizer) for d, r in zip(dialogs[c:c + batch_size], replies[c:c + batch_size])]
        tokens, _ = pad_right(seqs)
        logp, _ = token_logprobs(model_forward(config, P, tokens[:, :-1])[0], tokens[:, 1:])
        out += [logp[b, len(p) - 1:len(s) - 1] for b, (p, s) in enumerate(zip(prompt_ids, seqs))]
    return out


@dataclass
class PolicyReport:
    answer_accuracy: float            # greedy replies whose answer is exactly the world's
    adherence: float                  # share of instructions obeyed, per turn, averaged over turns
    grammar: float                    # share of greedy replies whose every answer sentence is grammatical
    mean_reward: float                # the reward model's mean score of the greedy replies
    mean_quality: float               # the world's mean true quality of the greedy replies
    kl_from_sft_per_token: float      # mean of log pi - log pi_sft over the tokens of replies sampled at T = 1
    replies: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "replies"}


def evaluate_policy(config: LlamaConfig, P: dict, sft: dict, rm: RewardModel, tokenizer, prompts: list[Prompt],
                    seed: int = 0, max_new_tokens: int = 40) -> PolicyReport:
    """How good is a policy on held-out prompts, by the world's judge and by the reward model."""
    model = Llama(config, P)
    dialogs = [p.dialog for p in prompts]
    greedy = sample_replies(model, tokenizer, dialogs, 1, seed, temperature=0.0, max_new_tokens=max_new_tokens)
    greedy = [g[0] for g in greedy]
    judged = [judge(p, r) for p, r in zip(prompts, greedy)]
    turns = sorted({p.turn for p in prompts if p.instruction is not None})
    per_turn = [np.mean([j.adherence for p, j in zip(prompts, judged) if p.turn == t and p.instruction is not None])
                for t in turns]
    sampled = [s[0] for s in sample_replies(model, tokenizer, dialogs, 1, seed + 1, 1.0, max_new_tokens)]
    lp_pi = reply_logprobs(config, P, tokenizer, dialogs, sampled)
    lp_sft = reply_logprobs(config, sft, tokenizer, dialogs, sampled)
    kl = float(sum((a - b).sum() for a, b in zip(lp_pi, lp_sft)) / sum(len(a) for a in lp_pi))
    return PolicyReport(answer_accuracy=float(np.mean([j.exact for j in judged])),
                        adherence=float(np.mean(per_turn)) if per_turn else 1.0,
                        grammar=float(np.mean([j.grammatical for j in judged])),
                        mean_reward=float(rm.score(tokenizer, dialogs, greedy).mean()),
                        mean_quality=float(np.mean([j.quality for j in judged])),
                        kl_from_sft_per_token=kl, replies=greedy)
