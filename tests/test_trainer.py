"""The training loop (llama_ref/trainer.py): the one loop every trainer runs (its calls, time budget, log cadence),
pre-training that learns, exact resume, clear errors."""
import time

import numpy as np
import pytest

from llama_ref import backprop, trainer
from llama_ref.config import LlamaConfig
from llama_ref.errors import LlamaRefError, TrainingError


def tiny_config():
    return LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=40, max_seq_len=32)


def test_training_loop_orders_step_after_and_summary():
    calls, logs = [], []
    step = lambda i: calls.append(("step", i)) or {"i": i}
    after = lambda i, row, last: calls.append(("after", i, last, row in hist))
    hist = []
    out = trainer.training_loop(step, 25, "demo", start=3, history=hist, after=after,
                                summary=lambda rows: f"{[r['i'] for r in rows]}", every=10, log=logs.append,
                                progress=False)
    assert out is hist and [r["i"] for r in hist] == list(range(3, 25))
    assert calls[:2] == [("step", 3), ("after", 3, False, True)]              # the row is in the history for after
    assert calls[-1] == ("after", 24, True, True)                             # the schedule's end is the last step
    assert logs == ["demo step 10/25: [3, 4, 5, 6, 7, 8, 9]", "demo step 20/25: [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]",
                    "demo step 25/25: [20, 21, 22, 23, 24]"]                  # and at the end
    assert len(trainer.training_loop(lambda i: {}, 25, "d", summary=lambda r: "", log=logs.append, progress=False)) == 25
    assert logs[3:5] == ["d step 2/25: ", "d step 4/25: "]                     # by default every tenth of the steps


def test_training_loop_stops_on_the_time_budget_and_on_stop_after():
    logs, lasts = [], []
    def slow(i):
        time.sleep(0.03)
        return {"i": i}
    hist = trainer.training_loop(slow, 1000, "slow", after=lambda i, r, last: lasts.append(last), time_budget_s=0.05,
                                 log=logs.append, progress=False)
    assert 1 <= len(hist) < 10 and lasts[-1] and not any(lasts[:-1])
    assert "slow: stopped after" in logs[-1] and "time budget" in logs[-1]
    hist = trainer.training_loop(lambda i: {"i": i}, 10, "s", stop_after=4, log=logs.append, progress=False)
    assert len(hist) == 4 and logs[-1] == "s: stopped after 4 of 10 steps (stop_after)"


def test_training_reduces_loss_and_stays_float32():
    """A tiny model learns a repeating sequence: the loss must fall far below uniform (log V)."""
    cfg = tiny_config()
    data = np.tile(np.arange(10, dtype=np.uint16), 200)
    params = backprop.init_weights(cfg, seed=0)
    s = trainer.TrainSettings(steps=60, batch_size=4, seq_len=16, lr=3e-3, warmup=5, eval_every=30, eval_batches=2)
    params, hist = trainer.train(cfg, params, data, data[:400], s, progress=False, log=lambda m: None)
    assert hist[0]["train_loss"] > 3.0 and hist[-1]["val_loss"] < 0.5
    assert all(p.dtype == np.float32 for p in params.values())


def test_resume_continues_exactly(tmp_path):
    """Stopping after 5 of 12 steps and resuming gives bit-identical weights to 12 uninterrupted steps
    (batches are a function of (seed, step), and the optimizer moments are saved with the weights)."""
    cfg = tiny_config()
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, 2000).astype(np.uint16)
    s = dict(steps=12, batch_size=2, seq_len=8, lr=1e-3, warmup=2, eval_every=100, ckpt_every=100)
    quiet = dict(progress=False, log=lambda m: None)
    full, _ = trainer.train(cfg, backprop.init_weights(cfg, 1), data, None, trainer.TrainSettings(**s), **quiet)
    out = tmp_path / "m"
    _, h1 = trainer.train(cfg, backprop.init_weights(cfg, 1), data, None, trainer.TrainSettings(**s), out_dir=out,
                        stop_after=5, **quiet)
    assert len(h1) == 5 and (out / "config.json").exists()
    resumed, h2 = trainer.train(cfg, backprop.init_weights(cfg, 99), data, None, trainer.TrainSettings(**s), out_dir=out,
                              resume=True, **quiet)
    assert len(h2) == 12 and [r["step"] for r in h2] == list(range(1, 13))
    assert all(np.array_equal(full[k], resumed[k]) for k in full)


def test_bad_settings_are_clear_errors():
    with pytest.raises(LlamaRefError, match="learning rate"):
        trainer.TrainSettings(lr=-1.0).check()
    with pytest.raises(LlamaRefError, match="warmup"):
        trainer.TrainSettings(steps=10, warmup=20).check()
    with pytest.raises(LlamaRefError, match="workers=0"):
        trainer.TrainSettings(workers=0).check()
    with pytest.raises(LlamaRefError, match="nothing to resume"):
        trainer.train(tiny_config(), backprop.init_weights(tiny_config()), np.zeros(100, np.uint16), None,
                    trainer.TrainSettings(steps=2, warmup=1), out_dir="/nonexistent/x", resume=True, progress=False)


def test_diverging_loss_stops_with_advice():
    cfg = tiny_config()
    params = backprop.init_weights(cfg)
    params["model.norm.weight"][:] = np.nan
    with pytest.raises(TrainingError, match="learning rate"):
        trainer.train(cfg, params, np.zeros(100, np.uint16), None, trainer.TrainSettings(steps=2, warmup=1, seq_len=8),
                    progress=False)
