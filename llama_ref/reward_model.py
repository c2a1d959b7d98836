"""The reward model: the chat model's trunk and a scalar head on the last token, trained on preferences.

Chapter 09 walks through it (Llama 2 paper, sec. 3.2.2). The reward is a linear function of the last token's final
hidden state (`score.weight`, Hugging Face's LlamaForSequenceClassification layout), initialised from the chat model;
the loss is the paper's binary ranking loss with a margin that grows with the annotator's degree. The backward runs
through backprop.py's trunk, unchanged.

Read top to bottom:

    reward_forward / reward_backward      the trunk (backprop.trunk_forward) + the score head
    ranking_loss (+ backward), MARGINS    -log sigmoid(r_chosen - r_rejected - m(degree))
    encode_preferences, preference_batch  the sequences a reward model reads, right-padded
    ranking_step (+ parallel), length_grouped_batches, reward_model_init, train_reward_model
    RewardModel                           scoring: r(prompt, reply)
    save_reward_model / load_reward_model an HF LlamaForSequenceClassification directory
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .backprop import (AdamW, HEAD, clip_grad_norm, data_parallel, lr_schedule, split_rows, trunk_backward,
                       trunk_forward)
from .chat import encode_dialog
from .checkpoint import save_model
from .config import LlamaConfig
from .errors import CheckpointError, InputError
from .loader import read_checkpoint
from .preferences import DEGREES, Preference
from .trainer import training_loop

F32 = np.float32
MARGINS = dict(zip(DEGREES, (1.0, 2 / 3, 1 / 3, 0.0)))          # the paper's "small" margin m(degree), its Table 27
MARGINS_LARGE = dict(zip(DEGREES, (3.0, 2.0, 1.0, 0.0)))        # ... and its "large" one (Table 27, Table 28)



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


def safety_loss(r, safe):
    """The Safety RM's auxiliary loss (paper, appendix A.3.4): a binary cross-entropy that pushes a safe reply's reward
    above 0 and a violation's below, so sigmoid(r) reads as "how safe" and a threshold on it (0.15 in the PPO reward)
    means something; the ranking loss alone leaves the rewards' offset free. The paper names the term and its effect
    (Table 29: recall of unsafe replies at 0.5 from 73% to 90%), not its formula; this is ours:

        mean over replies of -log sigmoid(r) if safe, -log sigmoid(-r) if a violation

    r (M,) rewards, safe (M,) bool. Returns (loss, cache)."""
    z = np.where(safe, r, -r)
    return float(np.mean(np.logaddexp(0.0, -z))), (z, np.asarray(safe))


def safety_loss_backward(cache):
    """d loss / d r = -sigmoid(-z) / M, with the sign of z's r (+ for a safe reply, - for a violation)."""
    z, safe = cache
    dz = -0.5 * (1.0 - np.tanh(0.5 * z)) / len(z)
    return np.where(safe, dz, -dz)


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


def preference_batch(pairs: list[tuple[list[int], list[int]]], degrees: list[str], margins: dict = MARGINS):
    """(tokens (2N, T), last (2N,), margins (N,)) of N encoded pairs (encode_preferences) and their degrees: the N
    chosen sequences, then the N rejected ones."""
    tokens, last = pad_right([c for c, _ in pairs] + [r for _, r in pairs])
    return tokens, last, np.array([margins[d] for d in degrees], F32)


def ranking_step(config: LlamaConfig, P: dict, tokens, last, margins, safe=None, aux_weight: float = 0.0):
    """Loss, gradients and the pairs ranked right (N,) of one batch of N pairs (tokens: the N chosen rows, then the N
    rejected ones, as preference_batch lays them out). With `safe` (2N,) bool and aux_weight > 0, the Safety RM's
    auxiliary loss is added: loss = ranking + aux_weight * safety_loss."""
    n = len(margins)
    r, cache = reward_forward(config, P, tokens, last)
    loss, z = ranking_loss(r[:n], r[n:], margins)
    dc, dr = ranking_loss_backward(z)
    dr = np.concatenate([dc, dr])
    if safe is not None and aux_weight:
        aux, aux_cache = safety_loss(r, safe)
        loss += aux_weight * aux
        dr = dr + aux_weight * safety_loss_backward(aux_cache)
    return loss, reward_backward(config, P, dr.astype(F32), cache), r[:n] > r[n:]


def ranking_step_parallel(config: LlamaConfig, P: dict, tokens, last, margins, workers: int = 2, safe=None,
                          aux_weight: float = 0.0):
    """ranking_step with the pairs split across threads (backprop.data_parallel), each pair's two rows kept together
    (every part's mean is over its pairs, or its pairs' two rows, so parts weigh by their pairs)."""
    n = len(margins)
    parts = split_rows(n, workers)
    if len(parts) < 2:
        return ranking_step(config, P, tokens, last, margins, safe, aux_weight)

    def part(pairs):
        rows = np.concatenate([pairs, n + pairs])                                     # its chosen, then its rejected
        return ranking_step(config, P, tokens[rows], last[rows], margins[pairs],
                            None if safe is None else safe[rows], aux_weight)

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
                       log=print, progress: bool = True, workers: int = 2, margins: dict = MARGINS,
                       aux_weight: float = 0.0, name: str = "reward model"):
    """Train reward-model parameters P (from reward_model_init, or an earlier round's) on preferences with the margin
    ranking loss (`margins`: MARGINS or MARGINS_LARGE), plus aux_weight times the safety loss on the replies' labels
    (safety preferences only: a Safety RM).

    AdamW with warmup and cosine decay, gradient clipping 1.0, no weight decay; the chat model's lm_head rides along
    untouched (the reward model never reads it). Batches hold pairs of similar length (length_grouped_batches), and
    each batch's pairs are split across `workers` threads (ranking_step_parallel). Returns (P, metrics) with the loss
    and pair accuracy per step.
    """
    if not prefs:
        raise InputError("no preferences to train the reward model on")
    if aux_weight and any(p.labels is None for p in prefs):
        raise InputError("the safety loss needs every preference's reply labels (a safety preference file: "
                         "\"chosen_label\", \"rejected_label\"); train without aux_weight on helpfulness preferences")
    trainable = {k: v for k, v in P.items() if k != HEAD}
    opt = AdamW(trainable, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pairs = encode_preferences(prefs, tokenizer, config.max_seq_len)
    lengths = [max(len(c), len(r)) for c, r in pairs]
    batches, t0 = [], time.time()

    def step(i):
        if not batches:
            batches.extend(length_grouped_batches(lengths, min(batch_size, len(prefs)), rng))
        rows = batches.pop()
        tokens, last, m = preference_batch([pairs[r] for r in rows], [prefs[r].degree for r in rows], margins)
        safe = None
        if aux_weight:
            safe = np.array([prefs[r].labels[0] != "violation" for r in rows] +
                            [prefs[r].labels[1] != "violation" for r in rows])
        loss, grads, right = ranking_step_parallel(config, P, tokens, last, m, workers, safe, aux_weight)
        norm = clip_grad_norm(grads, 1.0)
        opt.step(trainable, grads, lr_schedule(i, lr, max(1, steps // 20), steps))
        return {"step": i + 1, "loss": loss, "accuracy": float(np.mean(right)), "grad_norm": norm}

    def summary(rows):
        return (f"loss {np.mean([h['loss'] for h in rows]):.4f}, "
                f"pair accuracy {np.mean([h['accuracy'] for h in rows]):.3f}")

    history = training_loop(step, steps, name, summary=summary, postfix=lambda r: {"loss": f"{r['loss']:.3f}"},
                            time_budget_s=time_budget_s, log=log, progress=progress)
    return P, {"steps": len(history), "lr": lr, "batch_size": batch_size, "n_pairs": len(prefs),
               "margins": dict(margins), "aux_weight": aux_weight, "time_s": time.time() - t0, "history": history}


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

    def score_prompts(self, tokenizer, prompts, replies, batch_size: int = 32) -> np.ndarray:
        """Rewards (N,) of replies[i] to prompts[i] (preferences.Prompt): what PPO and rejection sampling call, the
        same for one reward model and for the combined reward of two (ppo.CombinedReward)."""
        return self.score(tokenizer, [p.dialog for p in prompts], replies, batch_size)

    def score_samples(self, tokenizer, dialogs, samples, batch_size: int = 32) -> np.ndarray:
        """Rewards (P, K) of K sampled replies per prompt (samples[i] answers dialogs[i]), scored batch_size at a time
        across prompts."""
        K = len(samples[0])
        flat = self.score(tokenizer, [d for d, s in zip(dialogs, samples) for _ in s], [r for s in samples for r in s],
                          batch_size)
        return flat.reshape(len(dialogs), K)


def accuracy_by_degree(rm: RewardModel, tokenizer, prefs: list[Preference]) -> dict:
    """The paper's Table 8: the share of pairs whose chosen reply the reward model scores higher, per degree and
    overall: {degree: {"accuracy": float or None, "pairs": int}}."""
    rc = rm.score(tokenizer, [p.dialog for p in prefs], [p.chosen for p in prefs])
    rr = rm.score(tokenizer, [p.dialog for p in prefs], [p.rejected for p in prefs])
    degrees = np.array([p.degree for p in prefs])
    out = {}
    for d in DEGREES:
        sel = degrees == d
        out[d] = {"accuracy": float(np.mean(rc[sel] > rr[sel])) if sel.any() else None, "pairs": int(sel.sum())}
    out["overall"] = {"accuracy": float(np.mean(rc > rr)) if len(prefs) else None, "pairs": len(prefs)}
    return out


def save_reward_model(path, config: LlamaConfig, P: dict, tokenizer_path=None, extra_files=None, force=False) -> Path:
    """An HF LlamaForSequenceClassification directory (num_labels 1, score.weight), atomically (save_model). The
    chat model's lm_head is kept beside the score head, unused."""
    return save_model(path, config, {k: v for k, v in P.items() if k != SCORE}, tokenizer_path=tokenizer_path,
                      extra_files=extra_files, force=force,
                      extra_tensors={SCORE: P[SCORE]},
                      config_extra={"architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
                                    "pad_token_id": 0})


def load_reward_model(path) -> RewardModel:
    """The reward model save_reward_model wrote, read by the one loader (loader.read_checkpoint) with its score head."""
    config, weights = read_checkpoint(path, heads={SCORE: "a reward model's score head (LlamaForSequenceClassification"
                                                          ", num_labels 1)"})
    if tuple(weights[SCORE].shape) != (1, config.dim):
        raise CheckpointError(f"{path}: {SCORE} has shape {tuple(weights[SCORE].shape)}, not (1, {config.dim}): it is "
                              "not a one-label reward model of this config")
    return RewardModel(config, {k: np.array(v, F32) for k, v in weights.items()})
