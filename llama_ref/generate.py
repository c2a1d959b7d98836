"""Generation: sampling (greedy, temperature, top-k, top-p) and the prefill / decode loop with a KV cache.

Chapter 06 teaches it. Generation has two phases with very different costs, and we time them separately:
  prefill  one forward over the whole prompt (matrix-matrix products; fills the KV cache), ends with the
           first new token: its time is the *time to first token*;
  decode   one step per new token (matrix-vector products over the cache): *tokens per second*.
Both are the same Llama.forward: the prompt's T tokens at once, then T = 1 per step with the KV cache.
Counting prompt tokens as generated tokens overstates decode speed, so we never do.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import ContextLengthError, InputError, SamplingError
from .memory import kv_cache_bytes, require
from .model import Llama, softmax

F32 = np.float32


# ------------------------------------------------------------------------------------------------
# Sampling: logits -> a filtered probability distribution -> one token

def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


MAX_TEMPERATURE = 100.0       # above this, logits spread over ~10 nats differ by < 10%: uniform noise


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, seed=0) -> None:
    """Raise SamplingError for settings that do not define a distribution (or a reproducible draw)."""
    if not _is_number(temperature) or not np.isfinite(temperature) or temperature < 0:
        raise SamplingError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if temperature > MAX_TEMPERATURE:
        raise SamplingError(f"temperature={temperature!r} is above {MAX_TEMPERATURE:g}: every token becomes about "
                            "equally likely and the text is noise; use 0 (greedy) to ~2")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0):
        raise SamplingError(f"top_k={top_k!r} must be a non-negative integer (0 or None disables it)")
    if top_p is not None and (not _is_number(top_p) or not np.isfinite(top_p) or not 0.0 < top_p <= 1.0):
        raise SamplingError(f"top_p={top_p!r} must be in (0, 1] (1 or None disables it; for greedy use temperature 0)")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise SamplingError(f"seed={seed!r} must be a non-negative integer (or None for a fresh random draw)")


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution we sample from, built the way transformers' logits warpers build it, in their order:

      1. temperature (TemperatureLogitsWarper): z = logits / T;
      2. top-k (TopKLogitsWarper): drop every token whose z is below the k-th largest (ties with it stay);
      3. top-p (TopPLogitsWarper): sort ascending, drop the tokens whose cumulative probability is
         <= 1 - top_p (the unlikely tail holding at most 1 - top_p of the mass), always keep the most likely one;
      4. softmax over what is left.
    Meta's `sample_top_p` keeps a token when the mass strictly above it is <= p (HF: < p); they differ only
    when a cumulative sum lands exactly on p. logits (V,) -> probs (V,) float32, zero outside the kept set.
    temperature 0 is greedy: all mass on the argmax (top-k/top-p cannot change the argmax).
    """
    check_sampling(temperature, top_k, top_p)
    return _warped_probs(logits, temperature, top_k, top_p)


def _warped_probs(logits, temperature, top_k, top_p):
    """sampling_probs for settings already checked (the decode loop checks them once, not per token)."""
    logits = np.asarray(logits, dtype=F32)
    if logits.ndim != 1 or logits.size == 0:
        raise InputError(f"logits must be a non-empty (V,) vector, got shape {logits.shape}")
    if temperature == 0:                                   # greedy: all mass on the argmax
        probs = np.zeros_like(logits)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    # shift by the max first, in float64: a tiny temperature (1e-40) then sends every other token to -inf instead of
    # overflowing float32 into inf - inf = NaN. Same distribution: softmax does not see a constant shift.
    with np.errstate(over="ignore"):                       # -1e40 -> -inf in float32 is what we want
        z = ((logits.astype(np.float64) - float(np.max(logits))) / temperature).astype(F32)   # (V,)
    if top_k:
        k = min(int(top_k), z.size)
        kth = np.partition(z, -k)[-k]                      # the k-th largest value
        z = np.where(z < kth, F32(-np.inf), z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(z, kind="stable")               # ascending: least likely first
        cum = np.cumsum(softmax(z[order]))                 # (V,) cumulative mass from the tail up
        remove = cum <= F32(1.0 - top_p)
        remove[-1] = False                                 # min_tokens_to_keep = 1: the argmax always survives
        z[order[remove]] = F32(-np.inf)
    return softmax(z).astype(F32)


def sample(logits, rng: np.random.Generator, temperature=1.0, top_k=None, top_p=None) -> int:
    """One token id from logits (V,). temperature 0 is greedy (argmax) and uses no randomness."""
    check_sampling(temperature, top_k, top_p)
    return _draw(logits, rng, temperature, top_k, top_p)


def _draw(logits, rng, temperature, top_k, top_p) -> int:
    """sample for settings already checked."""
    if temperature == 0:
        return int(np.argmax(logits))
    probs = _warped_probs(logits, temperature, top_k, top_p).astype(np.float64)
    return int(rng.choice(probs.size, p=probs / probs.sum()))


# ------------------------------------------------------------------------------------------------
# The loop

@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int]                       # new tokens only
    stop_reason: str                     # "eos" | "length"
    prefill_s: float                     # time to first token (prompt forward + first sample)
    decode_s: float                      # time for the remaining new tokens
    n_decode: int = 0                    # tokens produced by decode steps (= len(ids) - 1 when ids)
    logits: list = field(default_factory=list, repr=False)   # per new token (V,), when keep_logits

    @property
    def time_to_first_token_s(self) -> float:
        return self.prefill_s

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        return self.n_decode / self.decode_s if self.decode_s > 0 else float("nan")


def generate(model: Llama, prompt_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, seed=0,
             stop_at_eos=True, on_token: Callable[[int], None] | None = None, keep_logits=False) -> GenerationResult:
    """Continue prompt_ids by up to max_new_tokens tokens: one prefill forward, then one decode forward per token.

    Same seed, same output. on_token(id) is called as each token is chosen (streaming).
    """
    result = GenerationResult([], [], "length", 0.0, 0.0)
    for token in stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                        keep_logits, result=result):
        if on_token is not None:
            on_token(token)
    return result


def check_memory(model: Llama, batch_size: int, length: int) -> None:
    """Refuse, before anything is allocated, a generation whose KV cache and RoPE tables for `length` positions
    (float32) would not fit in the memory this process may still take (memory.require). The cache grows as tokens
    come, so this is the worst case of the request, not what is taken up front."""
    need = kv_cache_bytes(model.config, batch_size, length) + length * model.config.head_dim * 4   # + cos/sin
    require(need, f"{length:,} positions (a KV cache for batch {batch_size})", "ask for fewer tokens",
            ContextLengthError)


def stream(model: Llama, prompt_ids, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, seed=0,
           stop_at_eos=True, keep_logits=False, result: GenerationResult | None = None) -> Iterator[int]:
    """Yield new token ids as they are chosen; timings and ids are filled into `result` if given.

    Every setting is checked when stream() is called, not at the first token, so a caller that prints the prompt
    first never prints it before an error."""
    check_sampling(temperature, top_k, top_p, seed)
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise InputError("the prompt is empty: give at least one token (e.g. BOS)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    model.check_tokens(prompt_ids)                     # ids in the vocabulary: the forward's own check, done now
    limit = model.config.context_len
    if len(prompt_ids) + max_new_tokens > limit:
        raise ContextLengthError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = "
                                 f"{len(prompt_ids) + max_new_tokens} exceeds the context window of {limit} tokens; "
                                 "shorten the prompt or ask for fewer tokens")
    check_memory(model, 1, len(prompt_ids) + max_new_tokens)
    result = result if result is not None else GenerationResult([], [], "length", 0.0, 0.0)
    result.prompt_ids = prompt_ids
    return _steps(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, keep_logits, result)


def _steps(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, keep_logits, result):
    """The generator behind stream(): prefill, then one decode step per token asked for."""
    if max_new_tokens == 0:
        return
    rng = np.random.default_rng(seed)
    cache = model.new_cache(batch_size=1, max_len=len(prompt_ids) + max_new_tokens)

    t0 = time.perf_counter()
    logits = model.forward(prompt_ids, 0, cache, last_only=True)                 # prefill: (V,)
    token = _draw(logits, rng, temperature, top_k, top_p)                         # settings checked by stream()
    result.prefill_s = time.perf_counter() - t0

    pos = len(prompt_ids)
    decode_s = 0.0
    while True:
        result.ids.append(token)
        if keep_logits:
            result.logits.append(logits)
        yield token                                   # time spent by the consumer is not counted
        if stop_at_eos and token == model.config.eos_id:
            result.stop_reason = "eos"
            break
        if len(result.ids) == max_new_tokens:
            break
        t1 = time.perf_counter()
        logits = model.forward([token], pos, cache, last_only=True)                # decode: one token in
        token = _draw(logits, rng, temperature, top_k, top_p)
        decode_s += time.perf_counter() - t1
        pos += 1
        result.n_decode += 1
        result.decode_s = decode_s


# ------------------------------------------------------------------------------------------------
# Many prompts at once: left padding + a key mask

def padded_mask(key_ok, start_pos, S):
    """The additive attention mask (B, 1, 1, T, S) of a left-padded batch: causal, and no query sees a padding key
    (key_ok (B, >=S) is False there). A padding query may see itself, so no row is all -inf (NaN in the cache).
    RoPE depends only on the distance between positions, so a row shifted right by its padding gives the same
    logits as alone (up to float rounding)."""
    q_pos = np.arange(start_pos, S)[:, None]                                    # (T, 1)
    k_pos = np.arange(S)[None, :]                                               # (1, S)
    allowed = (k_pos <= q_pos)[None] & (key_ok[:, None, :S] | (k_pos == q_pos)[None])   # (B, T, S)
    return np.where(allowed, F32(0.0), F32(-np.inf))[:, None, None]             # (B, 1, 1, T, S)


def generate_batch(model: Llama, prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, seeds=None,
                   stop_at_eos=True) -> list[list[int]]:
    """generate() for many prompts at once: one padded prefill, then one decode step per new token for all rows.

    Decode is memory-bound (every weight is read once per forward), so B rows cost little more than one. Row b
    samples with its own default_rng(seeds[b]); a row stops at its EOS (included in its ids). Returns new ids per row.
    """
    check_sampling(temperature, top_k, top_p)
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise InputError("generate_batch needs a non-empty list of non-empty prompts")
    B, P = len(prompts), max(len(p) for p in prompts)
    if P + max_new_tokens > model.config.context_len:
        raise ContextLengthError(f"the longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                 f"context window of {model.config.context_len} tokens")
    check_memory(model, B, P + max_new_tokens)
    seeds = list(range(B)) if seeds is None else list(seeds)
    rngs = [np.random.default_rng(s) for s in seeds]
    tokens = np.zeros((B, P), np.int64)
    key_ok = np.ones((B, P + max_new_tokens), bool)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = p
        key_ok[b, :P - len(p)] = False
    cache = model.new_cache(batch_size=B, max_len=P + max_new_tokens)
    out = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    if max_new_tokens == 0:
        return out
    logits = model.forward(tokens, 0, cache, last_only=True, mask=padded_mask(key_ok, 0, P))    # prefill (B, V)
    for step in range(max_new_tokens):
        nxt = np.zeros(B, np.int64)
        for b in range(B):
            if done[b]:
                continue
            nxt[b] = _draw(logits[b], rngs[b], temperature, top_k, top_p)        # checked once above
            out[b].append(int(nxt[b]))
            if stop_at_eos and nxt[b] == model.config.eos_id:
                done[b] = True
        if done.all() or step == max_new_tokens - 1:
            break
        logits = model.forward(nxt[:, None], P + step, cache, last_only=True,
                               mask=padded_mask(key_ok, P + step, P + step + 1))                 # (B, V)
    return out


def generate_parallel(model: Llama, prompts, max_new_tokens: int, temperature: float, seeds, workers: int = 2):
    """generate_batch with the rows split across `workers` threads, each with one BLAS thread (as training splits a
    batch, backprop.data_parallel): the decode step's matmuls are small, and two BLAS threads on them spend more time
    handing work over than computing, worse still when other processes share the cores. Rows are independent (each
    its own seed), so the split changes no reply. RLHF's sampling (rlhf.sample_replies, ppo.rollout) runs on it."""
    from threadpoolctl import threadpool_limits
    parts = [p for p in np.array_split(np.arange(len(prompts)), workers) if len(p)]
    if len(parts) < 2:
        with threadpool_limits(1, user_api="blas"):
            return generate_batch(model, prompts, max_new_tokens, temperature, seeds=seeds)
    run = lambda rows: generate_batch(model, [prompts[i] for i in rows], max_new_tokens, temperature,
                                      seeds=[seeds[i] for i in rows])
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(parts)) as pool:
        return [ids for part in pool.map(run, parts) for ids in part]
