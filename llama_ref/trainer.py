"""The training loop: one loop (`training_loop`) that every trainer here runs, and what runs in it: pre-training on a
token stream (warmup + cosine, clipping, AdamW, validation, atomic checkpoints and exact resume) and fine-tuning on
masked batches. backprop.py holds what a step computes (the layer pairs and AdamW).

Chapter 07 trains a mini model live with `train`; `make model` (tinyworld.py) trains the embedded model with it;
`make gatt` and `make rlhf` use `finetune` (chat SFT, Ghost Attention, rejection sampling). The reward model
(reward_model.train_reward_model) and PPO (ppo.ppo_train) run their steps in `training_loop` too: one progress bar,
one log line every tenth step, one time budget, written once.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import save_model
from .config import LlamaConfig
from .errors import InputError, TrainingError
from .inputs import read_json, read_npz
from .output import ensure_dir, save_npz, write_text
from .model import rope_tables
from .backprop import AdamW, clip_grad_norm, forward_backward_parallel, global_norm, loss_only, lr_schedule

F32 = np.float32


# ------------------------------------------------------------------------------------------------
# Data: a stream of token ids cut into (B, T+1) windows

def tokenize_documents(docs, tokenizer, n_tokens: int, progress: bool = True) -> np.ndarray:
    """BOS + ids + EOS of each document, concatenated until n_tokens ids (uint16 when the vocabulary fits)."""
    from tqdm.auto import tqdm
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
    out, have = [], 0
    with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for doc in docs:
            ids = [tokenizer.bos_id] + tokenizer.encode(doc) + [tokenizer.eos_id]
            out.append(np.asarray(ids, dtype))
            have += len(ids)
            bar.update(len(ids))
            if have >= n_tokens:
                break
    return np.concatenate(out)[:n_tokens]


def random_windows(data: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int):
    """Batch number `step`: B windows at random offsets (a function of (seed, step), so a resumed run sees the
    same batches as an uninterrupted one). Returns tokens (B, T) and targets (B, T) = tokens shifted by one."""
    if len(data) < seq_len + 2:
        raise InputError(f"the token stream holds {len(data)} tokens, fewer than one window of {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
    win = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)           # (B, T+1)
    return win[:, :-1], win[:, 1:]


def sequential_windows(data: np.ndarray, batch_size: int, seq_len: int):
    """Non-overlapping windows covering `data` in order (for validation loss): yields (tokens, targets)."""
    n = (len(data) - 1) // seq_len
    for b in range(0, n, batch_size):
        idx = range(b, min(n, b + batch_size))
        win = np.stack([data[i * seq_len:i * seq_len + seq_len + 1] for i in idx]).astype(np.int64)
        yield win[:, :-1], win[:, 1:]


def evaluate_loss(config: LlamaConfig, P: dict, data: np.ndarray, batch_size: int, seq_len: int,
                  max_batches: int | None = None) -> float:
    """Mean next-token loss over non-overlapping windows of `data` (token-weighted)."""
    total, count = 0.0, 0
    rope = rope_tables(config, seq_len)
    for b, (x, y) in enumerate(sequential_windows(data, batch_size, seq_len)):
        if max_batches is not None and b >= max_batches:
            break
        total += loss_only(config, P, x, y, rope=rope) * x.size
        count += x.size
    return total / max(1, count)


# ------------------------------------------------------------------------------------------------
# The one loop: steps, a progress bar, a log line every tenth step, a time budget

def training_loop(step, steps: int, name: str, start: int = 0, history: list | None = None, after=None,
                  summary=None, postfix=None, every: int | None = None, time_budget_s: float | None = None,
                  stop_after: int | None = None, log=print, progress: bool = True, unit: str = "step") -> list:
    """Run step(i) for i = start .. steps - 1 and return the history (`history` extended, or a new list).

        step(i) -> row           one update; the row (a dict of numbers) is appended to the history
        after(i, row, last)      what follows an update once the row is in the history (validation, a checkpoint);
                                 `last` is True on the final step, whether the schedule, stop_after or the time
                                 budget (seconds since this call) ended the run
        summary(rows) -> str     the log line, every `every` steps (default: a tenth of `steps`) and at the end,
                                 over the rows since the previous line
        postfix(row) -> dict     the numbers beside the progress bar

    The loop only orders these calls: what a step computes is the caller's, so every trainer's arithmetic is its own.
    """
    from tqdm.auto import tqdm
    history = [] if history is None else history
    every = every or max(1, steps // 10)
    t0 = time.time()
    bar = tqdm(total=steps, initial=start, desc=name, unit=unit, disable=not progress)
    recent = []
    try:
        for i in range(start, steps):
            row = step(i)
            out_of_time = time_budget_s is not None and time.time() - t0 > time_budget_s
            stopped = stop_after is not None and i + 1 >= stop_after
            last = i + 1 == steps or out_of_time or stopped
            history.append(row)
            if after is not None:
                after(i, row, last)
            recent.append(row)
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(postfix(row))
            if summary is not None and ((i + 1) % every == 0 or last):
                log(f"{name} {unit} {i + 1}/{steps}: {summary(recent)}")
                recent = []
            if last and i + 1 < steps:
                log(f"{name}: stopped after {i + 1} of {steps} {unit}s "
                    f"({'the time budget of %.0f s is used' % time_budget_s if out_of_time else 'stop_after'})")
                break
    finally:
        bar.close()
    return history


# ------------------------------------------------------------------------------------------------
# Pre-training: warmup + cosine, clipping, AdamW, validation, atomic checkpoints and resume

@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    seed: int = 0
    time_budget_s: float | None = None          # stop early (cleanly, with a checkpoint) when this is used up
    workers: int = 2                            # threads the batch is split across (backprop.forward_backward_parallel);
                                                # fixed, not the core count, so every machine sums in the same order

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "ckpt_every", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise TrainingError(f"training setting {name}={v!r} must be a positive integer")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"learning rate {self.lr!r} must be a positive number (try 1e-3)")
        if not 0 <= self.warmup <= self.steps:
            raise TrainingError(f"warmup={self.warmup} must be between 0 and steps={self.steps}")


def save_training_state(out_dir: Path, config: LlamaConfig, params: dict, opt: AdamW, step: int, history: list,
                        tokenizer_path=None) -> None:
    """The model (an HF dir, written atomically by save_model) plus optimizer moments and history for resume.
    Order: state first, model second, so a crash in between leaves a resumable pair (the state's step says which)."""
    out_dir = Path(out_dir)
    state_dir = ensure_dir(out_dir.parent / (out_dir.name + ".train-state"))
    save_npz(state_dir / "optimizer.npz", {**opt.state(), "step": np.array(step),
                                                **{f"p/{k}": v for k, v in params.items()}}, force=True)
    write_text(state_dir / "history.json", json.dumps(history), force=True)
    save_model(out_dir, config, params, tokenizer_path=tokenizer_path, force=True)   # train's caller checked out_dir


def load_training_state(out_dir: Path, params: dict, opt: AdamW):
    """Resume: parameters, optimizer moments, step and history saved by save_training_state."""
    state_dir = Path(out_dir).parent / (Path(out_dir).name + ".train-state")
    f = state_dir / "optimizer.npz"
    if not f.exists():
        raise TrainingError(f"nothing to resume: {f} does not exist (start without --resume)")
    st = read_npz(f, TrainingError)                    # headers checked (numbers, sizes) before anything is loaded
    wrong = [k for k in params if np.shape(st.get(f"p/{k}")) != params[k].shape]
    if wrong or "step" not in st:
        raise TrainingError(f"{f} does not hold this model's training state (e.g. {(wrong or ['step'])[0]!r} is "
                            "missing or has another shape); start without --resume")
    opt.load_state(st)
    for k in params:
        params[k][...] = st[f"p/{k}"]
    step = int(st["step"])
    history = read_json(state_dir / "history.json", "training history", TrainingError)
    return step, history


def train(config: LlamaConfig, params: dict, train_data: np.ndarray, val_data: np.ndarray | None,
          settings: TrainSettings, out_dir=None, resume: bool = False, tokenizer_path=None, log=print,
          progress: bool = True, stop_after: int | None = None):
    """Pre-train on a token stream. Returns (params, history); history rows are dicts per step
    ({"step", "tokens", "lr", "train_loss", "grad_norm", "val_loss"?, "time_s"}).

    With out_dir, writes the model there every ckpt_every steps and at the end (atomically), and keeps optimizer
    state beside it in <out_dir>.train-state/ so `resume=True` continues exactly where it stopped. `stop_after`
    ends the run (with a checkpoint) after that many steps of the `settings.steps` schedule."""
    settings.check()
    s = settings
    opt = AdamW(params, betas=s.betas, weight_decay=s.weight_decay)
    start, history = 0, []
    if resume:
        start, history = load_training_state(out_dir, params, opt)
        log(f"resumed at step {start}")
    rope = rope_tables(config, s.seq_len)
    t0 = time.time() - (history[-1]["time_s"] if history else 0.0)

    def step(i):
        lr = lr_schedule(i, s.lr, s.warmup, s.steps, s.min_lr_ratio)
        x, y = random_windows(train_data, s.batch_size, s.seq_len, s.seed, i)
        loss, grads = forward_backward_parallel(config, params, x, y, rope=rope, workers=s.workers)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {i}: lower the learning rate ({s.lr}) "
                                "or raise warmup, then resume from the last checkpoint")
        norm = clip_grad_norm(grads, s.grad_clip) if s.grad_clip else global_norm(grads)
        opt.step(params, grads, lr)
        return {"step": i + 1, "tokens": (i + 1) * s.batch_size * s.seq_len, "lr": lr, "train_loss": loss,
                "grad_norm": norm, "time_s": time.time() - t0}

    def after(i, row, last):
        if val_data is not None and (row["step"] % s.eval_every == 0 or last):
            row["val_loss"] = evaluate_loss(config, params, val_data, s.batch_size, s.seq_len, s.eval_batches)
        if out_dir is not None and (row["step"] % s.ckpt_every == 0 or last):
            save_training_state(out_dir, config, params, opt, row["step"], history, tokenizer_path)

    def summary(rows):
        val = f", val loss {rows[-1]['val_loss']:.4f}" if "val_loss" in rows[-1] else ""
        return (f"train loss {np.mean([r['train_loss'] for r in rows]):.4f} (mean of the last {len(rows)} steps){val}, "
                f"lr {rows[-1]['lr']:.2e}, {rows[-1]['time_s'] / 60:.1f} min")

    training_loop(step, s.steps, "train", start=start, history=history, after=after, summary=summary,
                  postfix=lambda r: {"loss": f"{r['train_loss']:.3f}", "lr": f"{r['lr']:.1e}"}, every=s.eval_every,
                  time_budget_s=s.time_budget_s, stop_after=stop_after, log=log, progress=progress)
    return params, history


def finetune(config: LlamaConfig, weights: dict, batches, steps: int, lr: float, seed: int = 0,
             time_budget_s: float | None = None, warmup: int | None = None, weight_decay: float = 0.0,
             grad_clip: float = 1.0, log=print, progress: bool = True, workers: int = 2, name: str = "finetune"):
    """Fine-tune on an iterator of (tokens, targets, mask) batches with a loss mask (chat SFT, Ghost Attention,
    rejection sampling). Returns (weights, metrics) with the loss curve in metrics["history"]. Weights are copied,
    never modified in place. `name` labels the progress bar and the log lines.
    """
    params = {k: np.array(v, dtype=F32) for k, v in weights.items()}
    opt = AdamW(params, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    max_len = max(config.max_seq_len, 1)
    rope = rope_tables(config, max_len)
    t0, seen = time.time(), {"tokens": 0, "smooth": None}

    def step(i):
        x, y, m = next(batches)
        if x.shape[1] > max_len:
            raise InputError(f"a batch of length {x.shape[1]} exceeds the context window {max_len}")
        lr_now = lr_schedule(i, lr, warmup, steps)
        loss, grads = forward_backward_parallel(config, params, x, y, m, rope=rope, workers=workers)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at fine-tuning step {i}: lower the learning rate ({lr})")
        norm = clip_grad_norm(grads, grad_clip)
        opt.step(params, grads, lr_now)
        seen["tokens"] += int(np.asarray(m).sum())
        seen["smooth"] = loss if seen["smooth"] is None else 0.9 * seen["smooth"] + 0.1 * loss
        return {"step": i + 1, "loss": loss, "lr": lr_now, "grad_norm": norm, "time_s": time.time() - t0}

    history = training_loop(step, steps, name, summary=lambda rows: f"loss {seen['smooth']:.4f}",
                            postfix=lambda r: {"loss": f"{seen['smooth']:.3f}"}, time_budget_s=time_budget_s,
                            log=log, progress=progress)
    metrics = {"steps": len(history), "final_loss": seen["smooth"], "target_tokens": seen["tokens"], "lr": lr,
               "wall_time_s": time.time() - t0, "history": history}
    return params, metrics
