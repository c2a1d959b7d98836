"""How good is a trained model? Losses against n-gram baselines, grammar of sampled text, answers to held-out questions.

Chapter 07 prints these for the embedded model; `scripts/train_model.py` computes them with the same functions
and writes them to the model's metrics.json and model card. Every score uses the synthetic world's own checkers
(`corpus.is_grammatical`, `corpus.check_fact`), so nothing is judged by hand.

    token_stream(split, tokenizer, n)          BOS + ids + EOS of the split's documents, concatenated
    stream_loss(model, ids)                    mean next-token loss (nats) over non-overlapping windows
    ngram_losses(train_ids, eval_ids, V)       unigram and bigram baselines with the same tokenizer
    sample_continuations / grammar_report      200 samples at temperature 0.8 / top-p 0.9, share of grammatical sentences
    qa_report                                  greedy answers to held-out questions, exact-match accuracy

and what quantization costs (chapter 12, benchmarks/quant_accuracy.py): compare_logits (KL, top-1, perplexity of two
models' next-token distributions), validation_batches (held-out documents as token batches), accuracy_study (every
scheme of quant.py against float32).

and how sure a measured rate is (every chapter that prints one): rate (k of n, or 0/1 outcomes) -> an Estimate with its
binomial standard error and n, mean_estimate for a mean score, difference(a, b) for two rates or means (paired when given
the outcomes of the same items), called a real difference only beyond twice its standard error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import corpus, paths, quant
from .errors import InputError
from .generate import generate_batch
from .model import Llama
from .trainer import sequential_windows, tokenize_documents

F32 = np.float32


# ------------------------------------------------------------------------------------------------
# losses

def token_stream(split: str, tokenizer, n_tokens: int, seed: int = 0) -> np.ndarray:
    """The first n_tokens of the split's document stream (corpus.iter_training_text), each document BOS ... EOS."""
    return tokenize_documents(corpus.iter_training_text(split, seed=seed), tokenizer, n_tokens, progress=False)


def stream_loss(model: Llama, ids: np.ndarray, seq_len: int = 512, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping windows of `ids`, via the inference forward
    (a progress bar over the batches of windows when `progress`)."""
    from tqdm.auto import tqdm
    seq_len = min(seq_len, model.config.max_seq_len)
    total, count = 0.0, 0
    n_batches = -(-((len(ids) - 1) // seq_len) // batch_size)
    for x, y in tqdm(sequential_windows(ids, batch_size, seq_len), total=n_batches, desc="loss", unit="batch",
                     disable=not progress):
        logits = model.forward(x)                                                     # (B, T, V)
        z = logits - logits.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        total -= float(np.take_along_axis(logp, y[..., None], axis=-1).sum(dtype=np.float64))
        count += y.size
    return total / max(1, count)


def ngram_losses(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int, k: float = 0.01) -> dict:
    """Cross-entropy (nats/token) of count-based baselines fit on train_ids, scored on eval_ids.

    unigram: p(b) = (c(b) + 1) / (N + V) (add-one); bigram: p(b | a) = (c(a, b) + k) / (c(a) + k V) (add-k, k=0.01).
    A transformer that learned anything beyond word frequencies and word pairs must beat both.
    """
    V = vocab_size
    tr = np.asarray(train_ids, np.int64)
    ev = np.asarray(eval_ids, np.int64)
    uni = np.bincount(tr, minlength=V).astype(np.float64)
    p_uni = (uni + 1) / (uni.sum() + V)
    pairs = np.bincount(tr[:-1] * V + tr[1:], minlength=V * V).reshape(V, V).astype(np.float64)
    ctx = pairs.sum(axis=1)
    a, b = ev[:-1], ev[1:]
    p_bi = (pairs[a, b] + k) / (ctx[a] + k * V)
    return {"unigram_loss": float(-np.mean(np.log(p_uni[b]))), "bigram_loss": float(-np.mean(np.log(p_bi)))}


# ------------------------------------------------------------------------------------------------
# sampled text: does it follow the world's grammar, and are its facts true?

def story_prompts(n: int, split: str = "val", seed: int = 0) -> list[str]:
    """The first sentence of n stories of the split ("Once upon a time, there was a kind boy named Tom.")."""
    world = corpus.make_world()
    stories = corpus.generate_stories(world, split, n, seed=seed)
    return [corpus.split_sentences(s.text)[0] for s in stories]


def sample_continuations(model: Llama, tokenizer, prompts: list[str], max_new_tokens: int = 96,
                         temperature: float = 0.8, top_p: float | None = 0.9, seed: int = 0,
                         batch_size: int = 25) -> list[str]:
    """Continue each prompt (BOS + prompt) by sampling; returns the new text only (stops at EOS)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in chunk]
        new = generate_batch(model, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                             seeds=[seed * 100003 + i + j for j in range(len(chunk))])
        out += [tokenizer.decode([t for t in n if t != tokenizer.eos_id]) for n in new]
    return out


def complete_sentences(text: str) -> list[str]:
    """The sentences of a generated text, without the last one if generation stopped in the middle of it."""
    sents = corpus.split_sentences(text)
    if sents and not sents[-1].rstrip().endswith((".", "!", "?")):
        sents = sents[:-1]
    return sents


def grammar_report(texts: list[str], world=None) -> dict:
    """Share of complete generated sentences the world's grammar accepts, and share of checkable facts that are true."""
    world = world or corpus.make_world()
    n = ok = n_facts = true_facts = 0
    bad = []
    for t in texts:
        for s in complete_sentences(t):
            n += 1
            if corpus.is_grammatical(s):
                ok += 1
            elif len(bad) < 20:
                bad.append(s)
            f = corpus.check_fact(world, s)
            if f is not None:
                n_facts += 1
                true_facts += bool(f)
    return {"sentences": n, "grammar_valid_share": ok / max(1, n), "facts_stated": n_facts,
            "fact_true_share": true_facts / max(1, n_facts), "ungrammatical_examples": bad}


# ------------------------------------------------------------------------------------------------
# answers to held-out questions

def answer_questions(model: Llama, tokenizer, questions: list[str], max_new_tokens: int = 24,
                     batch_size: int = 50) -> list[str]:
    """Greedy answer of the base model to "User: <q>\\nAssistant:", up to the end of the line."""
    out = []
    for i in range(0, len(questions), batch_size):
        ids = [[tokenizer.bos_id] + tokenizer.encode(f"User: {q}\nAssistant:") for q in questions[i:i + batch_size]]
        new = generate_batch(model, ids, max_new_tokens, temperature=0.0)
        out += [tokenizer.decode([t for t in n if t != tokenizer.eos_id]).split("\n")[0].strip() for n in new]
    return out


def qa_report(model: Llama, tokenizer, n: int = 200, split: str = "test", seed: int = 0) -> dict:
    """Exact-match accuracy on n held-out questions (keys never asked in training dialogues; the facts are only
    stated in training stories), and the share of answers that state a true fact at all."""
    world = corpus.make_world()
    pairs = corpus.qa_pairs(world, split, n, seed=seed)
    answers = answer_questions(model, tokenizer, [q for q, _ in pairs])
    exact = [" ".join(a.split()) == " ".join(ref.split()) for a, (_, ref) in zip(answers, pairs)]
    facts = [corpus.check_fact(world, a) for a in answers]
    wrong = [{"question": q, "expected": ref, "answer": a} for (q, ref), a, e in zip(pairs, answers, exact) if not e]
    return {"qa_accuracy": float(np.mean(exact)), "qa_n": n, "qa_split": split,
            "qa_answer_true_share": float(np.mean([f is True for f in facts])), "qa_wrong_examples": wrong[:20]}


# ------------------------------------------------------------------------------------------------
# What quantization costs: the accuracy study of chapter 12 and benchmarks/quant_accuracy.py

def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_logits(ref_logits, q_logits, targets=None, ref_logprobs=None) -> dict:
    """KL(ref || quant) of next-token distributions (nats, mean over positions), top-1 agreement, and, with
    targets, both models' mean negative log-likelihood (perplexity = exp of it). Computed in float64."""
    lp = log_softmax(ref_logits) if ref_logprobs is None else ref_logprobs
    lq = log_softmax(q_logits)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    top1 = float(np.mean(np.argmax(lp, -1) == np.argmax(lq, -1)))
    out = {"kl": kl, "top1": top1}
    if targets is not None:
        t = np.asarray(targets)[..., None]
        out["nll_ref"] = float(-np.mean(np.take_along_axis(lp, t, -1)))
        out["nll"] = float(-np.mean(np.take_along_axis(lq, t, -1)))
    return out


def validation_batches(tokenizer_path=None, n_docs=32, seq_len=128, split="val", seed=0):
    """Token batches (n_docs, seq_len) of held-out text: the first n_docs documents of the corpus' split, each
    encoded with BOS, cut or EOS-padded to seq_len (padding positions are masked out by `study_mask`)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path or paths.DEFAULT_TOKENIZER))
    docs = corpus.iter_training_text(split=split, seed=seed)
    rows, lengths = [], []
    for _ in range(n_docs):
        ids = [sp.bos_id()] + sp.encode(next(docs)) + [sp.eos_id()]
        ids = ids[:seq_len]
        lengths.append(len(ids))
        rows.append(ids + [sp.eos_id()] * (seq_len - len(ids)))
    return np.array(rows, np.int64), np.array(lengths)


def f16_weights(weights: dict) -> dict:
    """Every 2-D weight rounded to float16 and back (what a GGUF F16 file holds); norms stay float32."""
    return {k: (np.asarray(v, np.float32).astype(np.float16).astype(np.float32) if np.ndim(v) == 2 else v) for k, v in weights.items()}


def accuracy_study(model: Llama, tokens, lengths, schemes=("f16", *quant.SCHEMES), batch=8) -> list[dict]:
    """For each scheme: bits/weight (all weights held, and the block matmuls alone), KL(f32 || scheme) of the next-token
    distributions, top-1 agreement with float32, and validation perplexity; means over the real (unpadded) positions.

    tokens (N, T) int, lengths (N,): predictions at positions t < length-1 are scored against tokens[t+1].
    """
    cfg = model.config
    n_params = sum(int(np.prod(w.shape)) for w in model.weights.values())
    layer_names = [n for n in model.weights if ".layers." in n and n.endswith("proj.weight")]
    n_layer = sum(int(np.prod(model.weights[n].shape)) for n in layer_names)
    valid = np.arange(tokens.shape[1] - 1)[None, :] < (lengths - 1)[:, None]          # (N, T-1)
    targets = tokens[:, 1:][valid]

    def logits_of(m):                                                                  # (positions, V)
        return np.concatenate([m.forward(tokens[i:i + batch]) for i in range(0, len(tokens), batch)])[:, :-1][valid]

    ref = logits_of(model)
    ref_lp = log_softmax(ref)

    def score(m):
        return compare_logits(ref, ref if m is model else logits_of(m), targets, ref_logprobs=ref_lp)

    rows = []
    for s in ("f32", *schemes):
        if s == "f32":
            m, held, held_layer = model, 4 * n_params, 4 * n_layer
        elif s == "f16":
            m, held, held_layer = Llama(cfg, f16_weights(model.weights)), 2 * n_params, 2 * n_layer
        else:
            m = quant.quantize_model(model, s)
            held = sum(w.nbytes for w in m.weights.values())
            held_layer = sum(m.weights[n].nbytes for n in layer_names)
        r = score(m)
        rows.append({"scheme": s, "bpw": 8 * held / n_params, "bpw_layers": 8 * held_layer / n_layer,
                     "weight_bytes": int(held), "kl": r["kl"], "top1": r["top1"],
                     "ppl": float(np.exp(r["nll"])), "ppl_f32": float(np.exp(r["nll_ref"]))})
    for r in rows:
        r["ppl_change"] = r["ppl"] / rows[0]["ppl"] - 1
    return rows


# ------------------------------------------------------------------------------------------------
# How sure is a measured rate? Standard errors, n, and when a difference is real

REAL_DIFFERENCE_SE = 2.0        # a difference is called real beyond 2 standard errors (about a 95% interval)


@dataclass(frozen=True)
class Estimate:
    """A measured value with its standard error and the n it was measured on (percent: print it as a rate)."""
    value: float
    se: float
    n: int
    percent: bool = False
    k: int | None = None         # successes, for a rate

    def __str__(self) -> str:
        if not self.percent:
            return f"{self.value:.3g} ± {self.se:.2g} (n = {self.n})"
        if self.k in (0, self.n) and self.n:                   # p = 0 or 1: the SE is 0; give the 95% bound (3/n)
            bound = 100 * min(1.0, 3 / self.n)                  # in percent
            if self.k == 0:
                side = f"<= {bound:.2g}%"
            else:                                               # floored, so the bound is never overstated
                d = min(2, max(1, math.ceil(-math.log10(bound)) + 1))
                side = f">= {math.floor((100 - bound) * 10 ** d) / 10 ** d:.{d}f}%"
            return f"{100 * self.value:.0f}% (n = {self.n}; 95% interval {side})"
        return f"{100 * self.value:.1f}% ± {100 * self.se:.1f} (n = {self.n})"


def rate(k_or_outcomes, n: int | None = None) -> Estimate:
    """A rate with its binomial standard error sqrt(p (1 - p) / n): rate(k, n) or rate(outcomes of 0/1 or bools)."""
    if n is None:
        x = np.asarray(k_or_outcomes, dtype=np.float64).ravel()
        if x.size == 0 or not np.all((x == 0) | (x == 1)):
            raise InputError("rate(outcomes) takes a non-empty sequence of 0/1 or booleans; or call rate(k, n)")
        k, n = int(x.sum()), int(x.size)
    else:
        k, n = int(k_or_outcomes), int(n)
        if n <= 0 or not 0 <= k <= n:
            raise InputError(f"rate(k={k}, n={n}) needs 0 <= k <= n and n > 0")
    p = k / n
    return Estimate(p, math.sqrt(p * (1 - p) / n), n, percent=True, k=k)


def mean_estimate(values) -> Estimate:
    """The mean of per-item scores with its standard error std / sqrt(n) (sample std, ddof=1)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise InputError("mean_estimate needs at least two values")
    return Estimate(float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)), int(x.size))


@dataclass(frozen=True)
class Difference:
    """b - a with its standard error; `real` when it exceeds REAL_DIFFERENCE_SE standard errors."""
    value: float
    se: float
    n: int
    paired: bool
    percent: bool

    @property
    def real(self) -> bool:
        return abs(self.value) > REAL_DIFFERENCE_SE * self.se

    def __str__(self) -> str:
        scale, unit = (100, " points") if self.percent else (1, "")
        how = "paired, " if self.paired else ""
        verdict = "a real difference" if self.real else "no difference"
        return (f"{scale * self.value:+.1f} ± {scale * self.se:.1f}{unit} ({how}n = {self.n}): {verdict} "
                f"(|difference| {'>' if self.real else '<='} {REAL_DIFFERENCE_SE:g} standard errors)")


def difference(a, b) -> Difference:
    """b - a, for two Estimates (independent samples: se = sqrt(se_a^2 + se_b^2)) or for two equal-length arrays of
    per-item outcomes on the same items (paired: se = std(b - a) / sqrt(n), which the shared items make smaller)."""
    if isinstance(a, Estimate) and isinstance(b, Estimate):
        return Difference(b.value - a.value, math.hypot(a.se, b.se), min(a.n, b.n), False, a.percent and b.percent)
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise InputError("difference(a, b) takes two Estimates, or per-item outcomes of the same items (equal lengths)")
    d = y - x
    binary = bool(np.all((x == 0) | (x == 1)) and np.all((y == 0) | (y == 1)))
    return Difference(float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size), True, binary)
