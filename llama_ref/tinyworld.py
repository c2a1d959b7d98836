"""The embedded model's recipe: train `tinyworld` from scratch with llama_ref's NumPy trainer, then measure it.

Chapter 07 prints the model card this writes and trains a small model the same way, live.

`make model` and `python -m llama_ref train` run it (scripts/train_model.py is the same entry point):

    python -m llama_ref train --out data/models/tinyworld          # the shipped model (<= ~90 min on 2 cores)
    python -m llama_ref train --out /tmp/m --steps 20 --tokens 200000 --quick   # a smoke test
    python -m llama_ref train --out data/models/tinyworld --resume  # continue an interrupted run
    python -m llama_ref train --out data/models/tinyworld --eval-only   # re-measure a trained model

1. Data: documents of the synthetic world (llama_ref.corpus, train split: stories and "User:/Assistant:" dialogues),
   each BOS ... EOS, tokenized with data/tokenizer/tokenizer.model and concatenated; fresh documents, no download.
2. Model: a Llama 2 with grouped-query attention (8 query heads, 4 key/value heads), 512-token context.
3. Training: llama_ref.trainer (AdamW as torch's, warmup + cosine, clipping), random 512-token windows; the model and
   optimizer state are checkpointed atomically, so --resume continues exactly.
4. Measurement (llama_ref.evaluate): val and test (held-out combinations) loss vs unigram/bigram baselines, the grammar
   of 200 sampled continuations (temperature 0.8, top-p 0.9), exact-match accuracy on held-out questions.
Writes into --out: config.json, model.safetensors, tokenizer.model, loss_curve.csv, metrics.json, README.md (card).
Optimizer state lives beside it in <out>.train-state/ (not shipped).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from . import backprop, corpus, evaluate, paths, trainer
from .loader import read_checkpoint
from .config import LlamaConfig
from .inputs import read_json
from .output import atomic_file, write_text
from .model import Llama
from .tokenizer import Tokenizer


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_config(vocab_size: int) -> LlamaConfig:
    """5.2M parameters: dim 256, 6 layers, 8 query heads sharing 4 key/value heads (GQA, as Llama 2 70B), untied
    classifier (as Llama 2), context 512. SwiGLU hidden 768: Llama's rule, 8/3 dim rounded up to a multiple of 256
    (Meta's `multiple_of`), which also keeps every matrix row a multiple of 32, 64 and 128, so Q8_0, Q4_0 and W4A16
    with any group size quantize every weight (688, the bare 8/3 dim, would leave down_proj unquantizable)."""
    return LlamaConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, hidden_dim=768, vocab_size=vocab_size,
                       max_seq_len=512, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)


def write_loss_curve(out: Path, history: list) -> None:
    with atomic_file(out / "loss_curve.csv", force=True) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "lr", "train_loss", "val_loss", "grad_norm", "time_s"])
        for r in history:
            w.writerow([r["step"], r["tokens"], f"{r['lr']:.6g}", f"{r['train_loss']:.5f}",
                        f"{r['val_loss']:.5f}" if "val_loss" in r else "", f"{r['grad_norm']:.4f}", f"{r['time_s']:.1f}"])


def measure(model: Llama, tok: Tokenizer, train_ids: np.ndarray, n_eval_tokens: int, n_samples: int, n_qa: int) -> dict:
    """Every quality figure of the model card (llama_ref.evaluate)."""
    val_ids = evaluate.token_stream("val", tok, n_eval_tokens)
    test_ids = evaluate.token_stream("test", tok, n_eval_tokens)
    m = {"val_loss": evaluate.stream_loss(model, val_ids), "test_loss": evaluate.stream_loss(model, test_ids)}
    log(f"val loss {m['val_loss']:.4f}, test loss {m['test_loss']:.4f}")
    m.update(evaluate.ngram_losses(train_ids, val_ids, model.config.vocab_size))
    log(f"baselines on val: unigram {m['unigram_loss']:.4f}, bigram {m['bigram_loss']:.4f}")
    texts = evaluate.sample_continuations(model, tok, evaluate.story_prompts(n_samples))
    g = evaluate.grammar_report(texts)
    m.update({k: g[k] for k in ("grammar_valid_share", "fact_true_share", "sentences", "facts_stated")})
    m["ungrammatical_examples"] = g["ungrammatical_examples"]
    m["sample_examples"] = texts[:5]
    log(f"grammar: {g['grammar_valid_share']:.1%} of {g['sentences']} sampled sentences; "
        f"{g['fact_true_share']:.1%} of {g['facts_stated']} stated facts true")
    qa = evaluate.qa_report(model, tok, n=n_qa)
    m.update(qa)
    log(f"held-out questions: {qa['qa_accuracy']:.1%} exact answers ({qa['qa_answer_true_share']:.1%} state a true fact)")
    m["eval"] = {"eval_tokens": int(len(val_ids)), "samples": n_samples, "sampling": "temperature 0.8, top-p 0.9, "
                 "96 new tokens after the first sentence of a val story", "qa_questions": n_qa,
                 "bigram_smoothing": "add-k, k=0.01; unigram add-one; fit on the training stream"}
    return m


def share(value: float, n: int) -> str:
    """A measured share of n as a rate with its binomial standard error (evaluate.rate); none measured when n = 0
    (a smoke-test run can sample no sentence that states a fact)."""
    return str(evaluate.rate(round(value * n), n)) if n > 0 else "none measured (n = 0)"


def model_card(config: LlamaConfig, m: dict, s: trainer.TrainSettings) -> str:
    return f"""# tinyworld: the embedded model of llama_ref

A Llama 2 architecture model trained from scratch by llama_ref's NumPy trainer (`make model`, i.e.
`python -m llama_ref train`, code in `llama_ref/tinyworld.py`) on the synthetic world of `llama_ref/corpus.py`, with the SentencePiece tokenizer in
`data/tokenizer/`. It exists so every chapter can run a real, trained model on a laptop CPU. All figures below were
written by that run into `metrics.json` and here; chapter 07 recomputes them with the same functions.

| | |
|---|---|
| parameters | {m['params']:,} |
| shape | dim {config.dim}, {config.n_layers} layers, {config.n_heads} query heads, {config.n_kv_heads} key/value heads (GQA), head size {config.head_dim}, SwiGLU hidden {config.hidden_dim}, vocab {config.vocab_size}, context {config.max_seq_len}, untied classifier |
| training | {m['steps']} steps of {s.batch_size} x {s.seq_len} tokens, AdamW (betas {s.betas}, weight decay {s.weight_decay}), lr {s.lr:g} warmup {s.warmup} then cosine to {s.lr * s.min_lr_ratio:g}, clip {s.grad_clip} |
| tokens seen | {m['tokens_seen']:,} |
| wall time | {m['wall_time_s'] / 60:.1f} min training + {m['eval_time_s'] / 60:.1f} min measuring, {m['machine']} |
| validation loss | {m['val_loss']:.4f} nats/token (perplexity {np.exp(m['val_loss']):.2f}) |
| test loss (held-out combinations) | {m['test_loss']:.4f} |
| unigram / bigram baseline (val) | {m['unigram_loss']:.4f} / {m['bigram_loss']:.4f} |
| grammatical sampled sentences | {share(m['grammar_valid_share'], m['sentences'])} (200 continuations, temperature 0.8, top-p 0.9) |
| true stated facts in samples | {share(m['fact_true_share'], m['facts_stated'])} |
| held-out questions answered exactly | {share(m['qa_accuracy'], m['qa_n'])}; {share(m['qa_answer_true_share'], m['qa_n'])} of the answers state a true fact |

Files: `config.json` + `model.safetensors` (a Hugging Face Llama directory: transformers' `LlamaForCausalLM`
loads it), `tokenizer.model`, `loss_curve.csv` (step, tokens, lr, train/val loss, gradient norm, time),
`metrics.json` (everything above, machine-readable, with examples of wrong answers and ungrammatical samples).

Prompting: stories continue from a first sentence; questions are asked as `User: <question>\\nAssistant:`.
The chat models `tinyworld-chat` and `tinyworld-gatt` are fine-tuned from this one (`make gatt`).
"""


def run(args) -> int:
    """Train (or, with eval_only, only measure) the recipe; args are `python -m llama_ref train`'s."""
    out = Path(args.out)
    tok = Tokenizer(paths.DEFAULT_TOKENIZER)
    config = model_config(tok.vocab_size)
    s = trainer.TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                            warmup=min(args.warmup, args.steps), eval_every=max(1, min(100, args.steps // 4)),
                            eval_batches=4, ckpt_every=max(1, min(200, args.steps)), seed=args.seed,
                            time_budget_s=args.time_budget_min * 60)
    s.check()                                                   # settings are refused before the corpus is read
    if args.quick:
        args.eval_tokens, args.samples, args.qa = 20_000, 20, 20

    log(f"model: {config.n_params():,} parameters; tokenizer {tok.vocab_size} pieces")
    t0 = time.time()
    train_ids = trainer.tokenize_documents(corpus.iter_training_text("train", seed=args.seed), tok, args.tokens)
    log(f"training stream: {len(train_ids):,} tokens in {time.time() - t0:.1f} s")

    if args.eval_only:
        config, weights = read_checkpoint(out)
        metrics_prev = read_json(out / "metrics.json", "metrics.json") if (out / "metrics.json").exists() else {}
        history = []
    else:
        val_ids = evaluate.token_stream("val", tok, 40_000)
        params = backprop.init_weights(config, seed=args.seed)
        t_train = time.time()
        params, history = trainer.train(config, params, train_ids, val_ids, s, out_dir=out, resume=args.resume,
                                      tokenizer_path=paths.DEFAULT_TOKENIZER, log=log)
        weights = params
        write_loss_curve(out, history)
        metrics_prev = {}
        log(f"trained {history[-1]['step']} steps in {(time.time() - t_train) / 60:.1f} min this run")

    model = Llama(config, weights)
    t_eval = time.time()
    m = measure(model, tok, train_ids, args.eval_tokens, args.samples, args.qa)
    steps_done = history[-1]["step"] if history else metrics_prev.get("steps", 0)
    m.update({
        "params": config.n_params(),
        "steps": steps_done,
        "tokens_seen": steps_done * s.batch_size * s.seq_len if history else metrics_prev.get("tokens_seen", 0),
        "wall_time_s": history[-1]["time_s"] if history else metrics_prev.get("wall_time_s", 0.0),
        "eval_time_s": time.time() - t_eval,
        "settings": {k: v for k, v in vars(s).items()},
        "training_stream_tokens": int(len(train_ids)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}",
        "generator": "llama_ref/tinyworld.py (make model)",
    })
    write_text(out / "metrics.json", json.dumps(m, indent=1, default=float) + "\n", force=True)   # inside out: ours
    write_text(out / "README.md", model_card(config, m, s), force=True)
    log(f"wrote {out}/metrics.json and README.md")
    return 0

