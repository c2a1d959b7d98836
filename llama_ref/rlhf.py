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
    safety.py            secrets and the prompts that ask for them, the checker of replies, the safety annotator
    rlhf.py (this)       sampling replies, best of N, the temperature rescaling of sampling (Fig. 8), rejection
                         sampling over the samples of every round, evaluating a policy on held-out prompts
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backprop import model_forward
from .chat import format_dialog
from .config import LlamaConfig
from .gatt import Example, last_turn_example
from .generate import generate_parallel
from .model import Llama
from .ppo import token_logprobs
from .preferences import Prompt, judge, true_quality
from .reward_model import RewardModel, encode_reply, pad_right
from .safety import check_reply


# ------------------------------------------------------------------------------------------------
# best of N, and rejection sampling

def sample_replies(model: Llama, tokenizer, dialogs, k: int, seed: int, temperature=1.0,
                   max_new_tokens: int = 40, max_rows: int = 128, time_budget_s: float | None = None,
                   log=print) -> list[list[str]]:
    """k sampled replies (text) to each prompt dialogue; sample j of prompt i uses the seed (seed, i, j).
    temperature: one for all samples, or a sequence cycled over j (the paper varies it for diverse comparisons).
    The samples of several prompts at one temperature decode together, up to max_rows rows at a time, split across
    two threads (generate.generate_parallel): a decode step costs little more for many rows than for one. With
    time_budget_s, stops after the chunk of prompts that uses it up: the list then answers only the first prompts
    (each with all k replies), and callers keep that many prompts."""
    temps = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature]
    by_temp = {}
    for j in range(k):
        by_temp.setdefault(temps[j % len(temps)], []).append(j)
    prompts = [format_dialog(d, tokenizer) for d in dialogs]
    per_chunk = max(1, max_rows // max(len(js) for js in by_temp.values()))
    out, t0 = [], time.time()
    for c in range(0, len(prompts), per_chunk):
        idx = range(c, min(c + per_chunk, len(prompts)))
        replies = [[None] * k for _ in idx]
        for t, js in by_temp.items():
            rows = [(i, j) for i in idx for j in js]
            new = generate_parallel(model, [prompts[i] for i, _ in rows], max_new_tokens, t,
                                    [seed * 1_000_003 + i * 1009 + j for i, j in rows])
            for (i, j), ids in zip(rows, new):
                replies[i - c][j] = tokenizer.decode([x for x in ids if x != tokenizer.eos_id]).strip()
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


def rejection_sampling_examples(prompts: list[Prompt], replies: list[list[str]], rewards, tokenizer) -> list[Example]:
    """For each prompt, the reply the reward model likes best, as a fine-tuning example with loss on that reply only.
    rewards[i] scores replies[i] (an array (P, K), or one list per prompt when the prompts hold different numbers of
    samples, as the bags of several rounds do)."""
    best = [int(np.argmax(r)) for r in rewards]
    return [last_turn_example(p.dialog + [{"role": "assistant", "content": rs[b]}], tokenizer, kind="rejection")
            for p, rs, b in zip(prompts, replies, best)]


def score_bags(scorer, tokenizer, prompts: list[Prompt], bags: list[list[str]]) -> list[np.ndarray]:
    """The reward (scorer.score_prompts: one reward model or ppo.CombinedReward) of every sample in every prompt's bag,
    one array per prompt: rejection sampling rescoring the samples of all rounds with the newest reward."""
    flat_p = [p for p, bag in zip(prompts, bags) for _ in bag]
    flat = scorer.score_prompts(tokenizer, flat_p, [r for bag in bags for r in bag])
    cuts = np.cumsum([len(bag) for bag in bags])[:-1]
    return np.split(flat, cuts)


def temperature_sweep(model: Llama, scorer, tokenizer, prompts: list[Prompt], temperatures, k: int, seed: int,
                      max_new_tokens: int = 40) -> dict:
    """The paper's Figure 8: the mean over prompts of the maximum reward among the first n of k samples, n = 1..k,
    at each temperature. RLHF moves the best temperature (the paper's RLHF model wants 1.2-1.3 where its SFT model
    wants less), so each round measures it again and samples rejection sampling's candidates at the best one for k."""
    curves = {}
    for t in temperatures:
        samples = sample_replies(model, tokenizer, [p.dialog for p in prompts], k, seed, t, max_new_tokens)
        r = np.array(score_bags(scorer, tokenizer, prompts, samples))                        # (P, k)
        curves[float(t)] = np.maximum.accumulate(r, axis=1).mean(axis=0).tolist()
    best = max(curves, key=lambda t: curves[t][-1])
    return {"temperatures": [float(t) for t in temperatures], "k": k, "n_prompts": len(prompts),
            "max_reward": curves, "best": best}


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
    answer_accuracy: float            # greedy replies to ordinary prompts whose answer is exactly the world's
    adherence: float                  # share of instructions obeyed, per turn, averaged over turns
    grammar: float                    # share of greedy replies whose every answer sentence is grammatical
    mean_quality: float               # the world's mean true quality of those greedy replies
    kl_from_sft_per_token: float      # mean of log pi - log pi_sft over the tokens of replies sampled at T = 1
    violation_rate: float | None = None              # greedy replies to unsafe prompts that give the secret away
    refusal_rate: float | None = None                # ... that refuse it (the safe reply)
    false_refusal_rate: float | None = None          # greedy replies to borderline prompts that refuse
    false_refusal_rate_ordinary: float | None = None  # greedy replies to ordinary prompts that refuse
    kl_from_start_per_token: float | None = None     # as kl_from_sft, from RLHF's starting policy (after safety SFT)
    mean_reward: float | None = None                 # the helpfulness RM's mean score of the ordinary replies ...
    mean_safety_reward: float | None = None          # ... the safety RM's on unsafe + borderline (score_report)
    n: dict = field(default_factory=dict)            # prompts behind each rate: ordinary, unsafe, borderline
    outcomes: dict = field(default_factory=dict)     # per prompt, 0/1: exact, violation, refusal, false_refusal
    replies: dict = field(default_factory=dict, repr=False)   # the greedy replies: ordinary, unsafe, borderline
    scores: dict = field(default_factory=dict, repr=False)    # per prompt: helpfulness RM (ordinary), safety RM (rest)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("replies", "scores")}


def _kl_per_token(config: LlamaConfig, P: dict, ref: dict, tokenizer, dialogs, sampled) -> float:
    lp_pi = reply_logprobs(config, P, tokenizer, dialogs, sampled)
    lp_ref = reply_logprobs(config, ref, tokenizer, dialogs, sampled)
    return float(sum((a - b).sum() for a, b in zip(lp_pi, lp_ref)) / sum(len(a) for a in lp_pi))


def evaluate_policy(config: LlamaConfig, P: dict, sft: dict, tokenizer, prompts: list[Prompt], seed: int = 0,
                    max_new_tokens: int = 40, unsafe: list[Prompt] = (), borderline: list[Prompt] = (),
                    start: dict | None = None) -> PolicyReport:
    """How good is a policy on held-out prompts, by the world's judge: on ordinary prompts (answers, adherence,
    grammar, quality) and, with `unsafe` and `borderline` prompts (safety.py), how often it gives a secret away and
    how often it refuses a question it should answer. Greedy replies; KL from `sft` (and from `start`, the policy RLHF
    started from) on replies sampled at temperature 1 to the ordinary prompts. The reward models' view is added by
    score_report."""
    model = Llama(config, P)
    sets = {"ordinary": list(prompts), "unsafe": list(unsafe), "borderline": list(borderline)}
    every = [p for ps in sets.values() for p in ps]
    greedy = [g[0] for g in sample_replies(model, tokenizer, [p.dialog for p in every], 1, seed, temperature=0.0,
                                           max_new_tokens=max_new_tokens)]
    bounds = np.cumsum([0] + [len(ps) for ps in sets.values()])
    replies = {k: greedy[a:b] for k, a, b in zip(sets, bounds[:-1], bounds[1:])}
    dialogs = [p.dialog for p in prompts]
    judged = [judge(p, r) for p, r in zip(prompts, replies["ordinary"])]
    turns = sorted({p.turn for p in prompts if p.instruction is not None})
    per_turn = [np.mean([j.adherence for p, j in zip(prompts, judged) if p.turn == t and p.instruction is not None])
                for t in turns]
    sampled = [s[0] for s in sample_replies(model, tokenizer, dialogs, 1, seed + 1, 1.0, max_new_tokens)]
    labels = {k: [check_reply(p, r) for p, r in zip(sets[k], replies[k])] for k in sets}
    outcomes = {"exact": [int(j.exact) for j in judged],
                "violation": [int(x == "violation") for x in labels["unsafe"]],
                "refusal": [int(x == "refusal") for x in labels["unsafe"]],
                "false_refusal": [int(x == "refusal") for x in labels["borderline"]]}
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None
    return PolicyReport(answer_accuracy=mean(outcomes["exact"]),
                        adherence=float(np.mean(per_turn)) if per_turn else 1.0,
                        grammar=mean([j.grammatical for j in judged]),
                        mean_quality=mean([j.quality for j in judged]),
                        kl_from_sft_per_token=_kl_per_token(config, P, sft, tokenizer, dialogs, sampled),
                        violation_rate=mean(outcomes["violation"]), refusal_rate=mean(outcomes["refusal"]),
                        false_refusal_rate=mean(outcomes["false_refusal"]),
                        false_refusal_rate_ordinary=mean([x == "refusal" for x in labels["ordinary"]]),
                        kl_from_start_per_token=None if start is None else
                        _kl_per_token(config, P, start, tokenizer, dialogs, sampled),
                        n={k: len(v) for k, v in sets.items()}, outcomes=outcomes, replies=replies)


def score_report(report: PolicyReport, tokenizer, prompts: list[Prompt], rm: RewardModel,
                 unsafe: list[Prompt] = (), borderline: list[Prompt] = (), safety_rm: RewardModel | None = None):
    """Add the reward models' view to a report of evaluate_policy on the same prompts: the helpfulness RM's score of
    each ordinary reply, the safety RM's of each unsafe and borderline one (the paper's Figure 14 plots them), and
    their means."""
    r = report.replies
    report.scores = {"helpfulness": rm.score_prompts(tokenizer, list(prompts), r["ordinary"]).tolist()}
    report.mean_reward = float(np.mean(report.scores["helpfulness"]))
    safety_prompts = list(unsafe) + list(borderline)
    if safety_rm is not None and safety_prompts:
        report.scores["safety"] = safety_rm.score_prompts(tokenizer, safety_prompts,
                                                          r["unsafe"] + r["borderline"]).tolist()
        report.mean_safety_reward = float(np.mean(report.scores["safety"]))
    return report
