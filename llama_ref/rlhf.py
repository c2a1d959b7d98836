"""RLHF in miniature: how Llama 2-Chat was made from its SFT model (Llama 2 paper, sec. 3.2), on our tiny world.

Chapters 09 (preferences, reward model) and 10 (rejection sampling, PPO) walk through it; `make rlhf`
(scripts/make_rlhf.py) runs it. The paper's pipeline, and ours:

    paper                                              here
    human annotators compare two replies and say       a simulated annotator compares two sampled replies by their
    how much better one is (4 degrees)                 *true* quality (the world's own checkers) plus noise
    reward model = chat model + a scalar head,         the same, trained with the same loss, backward by hand
    binary ranking loss with a margin
    RLHF-V1..V5: rejection sampling (best of K by      1 round of rejection sampling, then PPO on top of it, with a
    the reward model, fine-tune on it) up to V4,       per-token KL leash to the SFT model and a value head
    then PPO on top of it in V5

What is ours, not the paper's: the annotator (its noise and degree thresholds), the model sizes (5M parameters), the
prompt set (questions about facts of the world) and the number of rounds. What we can do that real RLHF cannot: every
reply has a true quality, so what the reward model *believes* is measured against what is *true*, and reward hacking
shows up as reward rising while truth does not.

Where each part lives:

    preferences.py       prompts, the world's judge, the simulated annotator, preference files
    reward_model.py      the reward model: forward/backward, the margin ranking loss, training, scoring, saving
    ppo.py               PPO: rollouts, KL rewards, GAE, the clipped loss and its backward, the PPO loop
    rlhf.py (this)       sampling replies, best of N, rejection sampling, evaluating a policy on held-out prompts
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backprop import model_forward
from .chat import format_dialog
from .config import LlamaConfig
from .gatt import Example, last_turn_example
from .generate import generate_batch
from .model import Llama
from .ppo import token_logprobs
from .preferences import Prompt, judge, true_quality
from .reward_model import RewardModel, encode_reply, pad_right


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
