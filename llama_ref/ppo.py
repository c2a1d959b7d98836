"""PPO: maximise R(reply) - beta * KL(policy || SFT) with a clipped surrogate, a value head and GAE.

Chapter 10 walks through it (Llama 2 paper, sec. 3.2.3, "PPO"). Every backward is written by hand: the policy's
through backprop.model_backward, the value head's as an extra gradient on the final hidden states.

Read top to bottom:

    CombinedReward                     the paper's reward from two reward models: safety's if the prompt is tagged
                                       or its safety score is below 0.15, else helpfulness's
    token_logprobs, value_forward      log pi(action) and V(state) from one forward
    rollout -> Rollout                 sample one reply per prompt, score it, record what PPO needs
    kl_rewards, gae                    per-token rewards (the KL leash, the score at the end), advantages
    ppo_loss (+ backward)              the clipped surrogate and the value loss
    ppo_step (+ parallel), ppo_train   minibatch steps over each rollout
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .backprop import (AdamW, clip_grad_norm, data_parallel, linear_backward, model_backward, model_forward,
                       split_rows)
from .chat import format_dialog
from .config import LlamaConfig
from .errors import InputError
from .generate import generate_parallel
from .model import Llama, rope_tables
from .preferences import Prompt, judge
from .reward_model import RewardModel, pad_right
from .trainer import training_loop

F32 = np.float32



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


SAFETY_THRESHOLD = 0.15      # the paper's: precision 0.89, recall 0.55 of unsafe replies on its Meta Safety test set


def sigmoid(r):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(r, np.float64)))


@dataclass
class CombinedReward:
    """The reward PPO and rejection sampling maximise when there are two reward models (paper, sec. 3.2.3):

        R_c(g | p) = R_s(g | p)  if IS_SAFETY(p) or R_s(g | p) < 0.15,   else R_h(g | p)
        R~_c(g | p) = WHITEN(LOGIT(R_c(g | p)))

    R_s and R_h are the safety and helpfulness reward models' scores read as probabilities, sigmoid(r); IS_SAFETY(p)
    is the prompt's tag ("unsafe"). LOGIT undoes the sigmoid, so score_prompts returns the deciding model's raw score
    r, and kl_rewards whitens it with fixed statistics (a mean and a standard deviation measured on the policy's
    samples before PPO starts)."""
    safety: RewardModel
    helpfulness: RewardModel
    threshold: float = SAFETY_THRESHOLD

    def decide(self, tokenizer, prompts: list[Prompt], replies: list[str]) -> dict:
        """Both models' raw scores, the tag, which model decided and the combined raw score, per reply."""
        rs = self.safety.score_prompts(tokenizer, prompts, replies)
        rh = self.helpfulness.score_prompts(tokenizer, prompts, replies)
        tagged = np.array([p.tag == "unsafe" for p in prompts])
        use_safety = tagged | (sigmoid(rs) < self.threshold)
        return {"safety": rs, "helpfulness": rh, "tagged": tagged, "use_safety": use_safety,
                "score": np.where(use_safety, rs, rh)}

    def score_prompts(self, tokenizer, prompts: list[Prompt], replies: list[str]) -> np.ndarray:
        return self.decide(tokenizer, prompts, replies)["score"]


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


def rollout(config: LlamaConfig, P: dict, ref: dict, rm: RewardModel | CombinedReward, tokenizer,
            prompts: list[Prompt], settings: PPOSettings, seed: int) -> Rollout:
    """Sample one reply per prompt from the policy P, then score everything PPO needs about it."""
    policy = Llama(config, {k: v for k, v in P.items() if k != VALUE})
    prompt_ids = [format_dialog(p.dialog, tokenizer) for p in prompts]
    new = generate_parallel(policy, prompt_ids, settings.max_new_tokens, settings.temperature,
                            [seed * 1_000_003 + i for i in range(len(prompts))], settings.workers)
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
    scores = rm.score_prompts(tokenizer, prompts, replies)
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


def ppo_train(config: LlamaConfig, init: dict, ref: dict, rm: RewardModel | CombinedReward, tokenizer,
              prompts: list[Prompt], settings: PPOSettings, iterations: int, whiten: tuple[float, float], seed: int = 0,
              time_budget_s: float | None = None, log=print, progress: bool = True):
    """PPO from `init` (the rejection-sampling model), with the frozen `ref` (SFT) as the KL anchor.

    Each iteration samples one reply for each of prompts_per_iteration prompts, computes per-token rewards, GAE
    advantages (whitened over the batch) and returns, then takes `epochs` passes of minibatch steps. Returns
    (policy weights without the value head, history) with reward, KL, true quality and losses per iteration.
    """
    settings.check()
    P = {k: np.array(v, F32) for k, v in init.items()}
    P[VALUE] = np.zeros((1, config.dim), F32)
    opt = AdamW(P, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    rope = rope_tables(config, config.max_seq_len)
    t0 = time.time()

    def iteration(it):
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
        return {"iteration": it + 1, "reward": float(ro.scores.mean()), "kl_per_token": kl,
                "quality": float(ro.quality.mean()), "exact": float(ro.correct.mean()),
                **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}, "time_s": time.time() - t0}

    def summary(rows):
        h = rows[-1]
        return (f"reward {h['reward']:.3f}, KL/token {h['kl_per_token']:.4f}, true quality {h['quality']:.3f}, "
                f"exact {h['exact']:.2f}")

    history = training_loop(iteration, iterations, f"PPO beta={settings.beta:g}", summary=summary,
                            postfix=lambda h: {"reward": f"{h['reward']:.2f}", "kl": f"{h['kl_per_token']:.3f}"},
                            time_budget_s=time_budget_s, log=log, progress=progress, unit="iteration")
    return {k: v for k, v in P.items() if k != VALUE}, history
