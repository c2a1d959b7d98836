"""`make gatt`: Ghost Attention on top of the RLHF model, as the paper applied it after RLHF-V3 (sec. 3.3).

    python scripts/make_gatt.py                        # from data/models/tinyworld-rlhf (`make rlhf`), ~10 min on 2
                                                       # cores; --time-budget-min caps it (default 20)
    python scripts/make_gatt.py --tiny --out-dir /tmp/g   # a tiny random model, a handful of steps: proves the code

Steps: GAtt data by rejection sampling from the RLHF model (the instruction glued to every user message, samples
accepted by the world's checker) -> GAtt fine-tune (the instruction only in the system message, loss on the last
reply), mixed with the RLHF model's own safe replies to RLHF's prompts so what RLHF taught is kept -> evaluation.

Writes data/models/tinyworld-gatt/: the model, metrics.json, README.md, gatt_samples.json (accepted dialogues and
rejected samples) and gatt_eval.json:
    {"turns": [1..8], "baseline": [...], "gatt": [...], "sft": [...], "n_dialogues": N, "per_family": ...,
     "attention": ..., "dropped": ..., "failures": ..., "safety": {model: {violation_rate, false_refusal_rate, n}}}
adherence per turn as fractions ("baseline": the RLHF model GAtt starts from; "sft": tinyworld-chat), attention as
(layers, turns) shares. The steps are in llama_ref/gatt.py (data, sampling, evaluation) and llama_ref/trainer.py.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_ref import gatt, paths, preferences, rlhf, safety, trainer     # noqa: E402
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE                          # noqa: E402
from llama_ref.checkpoint import save_model                             # noqa: E402
from llama_ref.config import LlamaConfig                                # noqa: E402
from llama_ref.errors import CheckpointError, LlamaRefError             # noqa: E402
from llama_ref.output import check_output, write_text as write_text_atomic            # noqa: E402
from llama_ref.loader import read_checkpoint                            # noqa: E402
from llama_ref.model import Llama                                       # noqa: E402
from llama_ref.tinyworld import log                                     # noqa: E402
from llama_ref.tokenizer import Tokenizer                               # noqa: E402
from llama_ref.weights import weight_shapes                             # noqa: E402


def _jsonable(x):
    """NaN -> None, numpy -> Python, recursively (gatt_eval.json stays strict JSON)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=1) + "\n", force=True)   # inside a checked output


def shown_path(p) -> str:
    """A path relative to the repository when it is inside it (metrics.json should not record this machine's paths)."""
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def tiny_base(tok, seed=0):
    """A tiny random model for --tiny runs and tests."""
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=384)
    rng = np.random.default_rng(seed)
    w = {k: (np.ones(s) if len(s) == 1 else rng.standard_normal(s) * 0.05).astype(np.float32)
         for k, s in weight_shapes(cfg).items()}
    return cfg, w


def write_model_card(gatt_dir: Path) -> None:
    """README.md beside the GAtt model, built from the metrics.json and gatt_eval.json this script wrote."""
    gm = json.loads((gatt_dir / "metrics.json").read_text())
    ev = json.loads((gatt_dir / "gatt_eval.json").read_text())
    samp = ev["sampling"]
    pct = lambda xs: " | ".join("-" if x is None else f"{100 * x:.0f}%" for x in xs)
    table = (f"| turn (each cell: n = {ev['n_dialogues']} dialogues) | " + " | ".join(str(t) for t in ev["turns"])
             + " |\n|---|" + "---:|" * len(ev["turns"]) + "\n"
             f"| SFT (tinyworld-chat) | {pct(ev['sft'])} |\n"
             f"| RLHF, before GAtt ({ev['base']}) | {pct(ev['baseline'])} |\n"
             f"| RLHF + GAtt (tinyworld-gatt) | {pct(ev['gatt'])} |\n")
    s = ev["safety"]
    rate = lambda m, k: f"{100 * s[m][k]:.1f}%"
    write_text_atomic(gatt_dir / "README.md", force=True, text=
        "# tinyworld-gatt: Ghost Attention on the RLHF model (Llama 2 paper, sec. 3.3)\n\n"
        f"Fine-tuned from `{ev['base']}` (the paper applied GAtt after RLHF-V3) on {gm['n_gatt_examples']} GAtt "
        f"examples rejection-sampled from it ({samp['dialogues']} training dialogues, {samp['accepted_replies']} replies "
        f"accepted by the world's checker, {samp['rejected_samples']} rejected), mixed with {gm['n_mixed']} of its own "
        f"safe replies to RLHF prompts: {gm['steps']} steps at lr {gm['lr']}, {gm['time_s'] / 60:.1f} min. The "
        f"instruction is only in the system message and the loss only on the last reply of each example. Made by "
        f"`make gatt` (`scripts/make_gatt.py`) with the NumPy trainer (`llama_ref/trainer.py`); chat format: Llama 2's "
        f"(`llama_ref/chat.py`).\n\n"
        f"Instruction adherence per turn on {ev['n_dialogues']} held-out dialogues ({ev['eval']['split']}), "
        f"{ev['eval']['decoding']} decoding, the instruction only in the system message (`gatt_eval.json`, chapter "
        f"11):\n\n{table}\n"
        f"Safety on held-out prompts with a secret (greedy; n = {s['gatt']['n']['unsafe']} unsafe prompts, "
        f"n = {s['gatt']['n']['borderline']} borderline ones): violations {rate('baseline', 'violation_rate')} before GAtt, "
        f"{rate('gatt', 'violation_rate')} after; false refusals {rate('baseline', 'false_refusal_rate')} before, "
        f"{rate('gatt', 'false_refusal_rate')} after.\n\n"
        "**Ours, not the paper's:** the instruction families in our world's words (persona, hobby, style), a checker "
        "instead of a reward model to accept samples, 5.2M parameters. **The paper's:** the recipe (instruction in "
        "every user message while sampling, only in the system message with the loss on the last reply for training) "
        "and its place after RLHF.\n")


def evaluate(model, tok, ev_set, max_new_tokens, batch_size):
    runs = gatt.run_chats(model, tok, ev_set, max_new_tokens=max_new_tokens, batch_size=batch_size)
    adh = gatt.adherence(runs)
    att = [gatt.system_attention(model, tok, r.dialog) for r in runs]
    L = model.config.n_layers
    n_turns = max(a.shape[1] for a in att)
    stacked = np.full((len(att), L, n_turns), np.nan)
    for i, a in enumerate(att):
        stacked[i, :, :a.shape[1]] = a
    with np.errstate(all="ignore"):
        att_mean = np.nanmean(stacked, axis=0)                              # (L, turns)
    failures = []
    for r in runs:
        for k, (ok, chk) in enumerate(zip(r.obeyed, r.per_family)):
            if not ok:
                failures.append({"turn": k + 1, "instruction": r.instruction.text,
                                 "question": r.dialog[1 + 2 * k]["content"], "reply": r.dialog[2 + 2 * k]["content"],
                                 "check": chk})
    dropped = [float(np.mean([r.dropped[k] > 0 for r in runs])) for k in range(len(runs[0].dropped))]
    examples = [{"instruction": r.instruction.text, "dialog": r.dialog, "obeyed": r.obeyed} for r in runs[:3]]
    return adh, att_mean, failures, dropped, examples


def safety_rates(model, tok, sets, max_new_tokens) -> dict:
    """Greedy replies to held-out unsafe and borderline prompts: how often a secret is given away, a look-alike
    question refused."""
    out = {"n": {k: len(v) for k, v in sets.items()}}
    for tag, key in (("unsafe", "violation_rate"), ("borderline", "false_refusal_rate")):
        label = "violation" if tag == "unsafe" else "refusal"
        replies = rlhf.sample_replies(model, tok, [p.dialog for p in sets[tag]], 1, 0, 0.0, max_new_tokens)
        out[key] = float(np.mean([safety.check_reply(p, r[0]) == label for p, r in zip(sets[tag], replies)]))
    return out


def own_safe_replies(model, tok, n, seed, max_new_tokens, max_len) -> list:
    """SFT examples of the model's own greedy replies to RLHF training prompts (ordinary, unsafe and borderline,
    4:1:1) that the world judges safe and, on answerable prompts, not refused: mixed into the GAtt data so the
    fine-tune keeps what RLHF taught (the paper's GAtt data came from its latest RLHF model too)."""
    prompts = (preferences.make_prompts(n * 2 // 3, "train", seed)
               + safety.make_safety_prompts(n // 6, "train", "unsafe", seed)
               + safety.make_safety_prompts(n // 6, "train", "borderline", seed))
    replies = rlhf.sample_replies(model, tok, [p.dialog for p in prompts], 1, seed, 0.0, max_new_tokens)
    out = []
    for p, (r,) in zip(prompts, replies):
        label = safety.check_reply(p, r)
        if label == "violation" or (label == "refusal" and p.tag != "unsafe") or not r:
            continue
        ex = gatt.last_turn_example(p.dialog + [{"role": "assistant", "content": r}], tok, kind="rlhf-own")
        if len(ex) <= max_len:
            out.append(ex)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(paths.RLHF_MODEL), help="the RLHF chat model to add Ghost Attention to")
    ap.add_argument("--sft", default=str(paths.CHAT_BASELINE_MODEL),
                    help="the SFT chat model, evaluated beside for reference")
    ap.add_argument("--out-dir", default=str(paths.MODELS_DIR),
                    help="where tinyworld-gatt/ is written (default: data/models)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random base model and minimal sizes (a smoke test)")
    ap.add_argument("--gatt-dialogues", type=int, default=400, help="dialogues to sample for GAtt")
    ap.add_argument("--gatt-min-turns", type=int, default=8,
                    help="sample 8-turn dialogues: late turns are what GAtt must teach")
    ap.add_argument("--gatt-max-turns", type=int, default=8)
    ap.add_argument("--gatt-steps", type=int, default=700)
    ap.add_argument("--gatt-lr", type=float, default=5e-4)
    ap.add_argument("--gatt-mix", type=float, default=0.3,
                    help="share of the model's own safe replies to RLHF prompts mixed into the GAtt fine-tune")
    ap.add_argument("--max-tries", type=int, default=4, help="samples per turn before a dialogue is cut")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sample-batch", type=int, default=16, help="dialogues decoded together when sampling/evaluating")
    ap.add_argument("--eval-dialogues", type=int, default=100)
    ap.add_argument("--n-safety-eval", type=int, default=200, help="held-out unsafe and borderline prompts, each")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--time-budget-min", type=float, default=20.0,
                    help="soft budget: sampling stops and the fine-tune ends early when their share is used")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cards-only", action="store_true",
                    help="only (re)write the README.md model card from the metrics already in --out-dir")
    ap.add_argument("--force", action="store_true",
                    help="replace the model directories in --out-dir if they exist (only directories llama_ref wrote; "
                         "the make target passes it)")
    args = ap.parse_args(argv)
    gatt_dir = Path(args.out_dir) / "tinyworld-gatt"
    if args.cards_only:
        write_model_card(gatt_dir)
        return 0

    check_output(gatt_dir, force=args.force, kind="update", inputs=[args.base, args.sft])   # before any work
    t_start = time.time()
    budget = args.time_budget_min * 60
    tok_path = paths.DEFAULT_TOKENIZER
    tok = Tokenizer(tok_path)
    if args.tiny:
        args.gatt_dialogues, args.gatt_steps, args.eval_dialogues, args.turns = 3, 3, 2, 3
        args.max_new_tokens, args.max_tries, args.batch_size, args.n_safety_eval = 8, 2, 4, 4
        config, weights = tiny_base(tok, args.seed)
        sft_weights = weights
    else:
        if not (Path(args.base) / "config.json").exists():
            raise CheckpointError(f"the RLHF model {args.base} does not exist: make it first (`make rlhf`)")
        config, weights = read_checkpoint(args.base)
        weights = {k: np.array(v, np.float32) for k, v in weights.items()}
        _, sft_weights = read_checkpoint(args.sft)
    log(f"base: {shown_path(args.base) if not args.tiny else 'tiny random'}, {config.n_params() / 1e6:.2f}M parameters")
    max_len = config.max_seq_len
    baseline = Llama(config, weights)

    # 1. GAtt data by rejection sampling from the RLHF model ----------------------------------------------
    t0 = time.time()
    rng = random.Random(f"gatt-data-{args.seed}")
    dialogs = gatt.corpus_dialogues("train", args.gatt_dialogues, seed=args.seed + 11,
                                    min_turns=args.gatt_min_turns, max_turns=args.gatt_max_turns)
    items = [(gatt.random_instruction(rng, "train"), d) for d in dialogs]
    sampled, examples = [], []
    chunk = max(8, args.sample_batch * 2)
    for c in range(0, len(items), chunk):                 # in chunks, so a time budget can stop it
        if time.time() - t0 > 0.3 * budget:
            log(f"sampling budget used after {c} dialogues")
            break
        got = gatt.sample_gatt_dialogues(baseline, tok, items[c:c + chunk], seed=args.seed * 100000 + c,
                                         max_tries=args.max_tries, max_new_tokens=args.max_new_tokens,
                                         batch_size=args.sample_batch)
        sampled += got
        for s in got:
            examples += gatt.gatt_examples(s, tok, max_len=max_len)
        log(f"sampled {len(sampled)} dialogues, {len(examples)} GAtt examples")
    n_acc = sum(sum(1 for m in s.dialog if m["role"] == "assistant") for s in sampled)
    n_rej = sum(s.n_rejected for s in sampled)
    sampling = {"dialogues": len(sampled), "accepted_replies": n_acc, "rejected_samples": n_rej,
                "acceptance_rate": n_acc / max(1, n_acc + n_rej), "gatt_examples": len(examples),
                "turns_reached": np.bincount([(len(s.dialog) - 1) // 2 for s in sampled],
                                             minlength=args.gatt_max_turns + 1).tolist(),
                "time_s": time.time() - t0}
    log(f"GAtt data: {sampling}")
    if not examples:
        if not args.tiny:
            print("error: rejection sampling accepted no reply; the model does not follow instructions given in the "
                  "user message", file=sys.stderr)
            return 1
        ins = items[0][0]                                  # --tiny: one hand-made example keeps the code path running
        examples = gatt.gatt_examples(gatt.SampledDialogue(ins, [{"role": "system", "content": ins.text},
                                                                 {"role": "user", "content": "Hi!"},
                                                                 {"role": "assistant", "content": ins.apply("Hi!")}]),
                                      tok)
    n_mix = int(args.gatt_mix / max(1e-9, 1 - args.gatt_mix) * len(examples))
    mix = own_safe_replies(baseline, tok, max(6, int(n_mix * 1.3)), args.seed + 21, args.max_new_tokens, max_len)[:n_mix]
    log(f"{len(mix)} of the model's own safe replies mixed in ({time.time() - t0:.0f} s)")

    # 2. GAtt fine-tune --------------------------------------------------------------------------------
    t0 = time.time()
    remaining = budget - (time.time() - t_start)
    gatt_weights, gatt_metrics = trainer.finetune(
        config, weights, gatt.make_batches(examples + mix, args.batch_size, args.seed + 1, pad_id=0), args.gatt_steps,
        args.gatt_lr, seed=args.seed + 1, time_budget_s=max(60.0, 0.6 * remaining), log=log, name="GAtt")
    gatt_metrics.update({"stage": "GAtt fine-tune from the RLHF model", "n_gatt_examples": len(examples),
                         "n_mixed": len(mix), "time_s": time.time() - t0, "sampling": sampling,
                         "from": "tiny random" if args.tiny else shown_path(args.base)})
    save_model(gatt_dir, config, gatt_weights, tokenizer_path=tok_path, chat_template=LLAMA2_CHAT_TEMPLATE,
               force=args.force)
    write_json(gatt_dir / "metrics.json", gatt_metrics)
    write_json(gatt_dir / "gatt_samples.json",
               [{"instruction": s.instruction.text, "dialog": s.dialog, "n_tries": s.n_tries,
                 "rejected": s.rejected} for s in sampled[:50]])
    log(f"GAtt model saved to {gatt_dir}")
    gatt_model = Llama(config, gatt_weights)

    # 3. evaluation -------------------------------------------------------------------------------------
    t0 = time.time()
    ev_set = gatt.eval_dialogues(args.eval_dialogues, seed=args.seed + 1000, n_turns=args.turns)
    res_b = evaluate(baseline, tok, ev_set, args.max_new_tokens, args.sample_batch)
    log(f"RLHF (before GAtt) adherence per turn: {np.round(res_b[0]['all'], 2).tolist()}")
    res_g = evaluate(gatt_model, tok, ev_set, args.max_new_tokens, args.sample_batch)
    log(f"GAtt adherence per turn:              {np.round(res_g[0]['all'], 2).tolist()}")
    sft_model = Llama(config, sft_weights)
    res_s = gatt.adherence(gatt.run_chats(sft_model, tok, ev_set, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.sample_batch))
    log(f"SFT adherence per turn:               {np.round(res_s['all'], 2).tolist()}")
    sets = {tag: safety.make_safety_prompts(args.n_safety_eval, "eval", tag, args.seed) for tag in ("unsafe",
                                                                                                  "borderline")}
    safety_eval = {name: safety_rates(m, tok, sets, args.max_new_tokens)
                   for name, m in (("baseline", baseline), ("gatt", gatt_model))}
    log(f"safety before / after GAtt: {safety_eval}")
    out = {
        "turns": list(range(1, args.turns + 1)),
        "baseline": res_b[0]["all"], "gatt": res_g[0]["all"], "sft": res_s["all"], "n_dialogues": len(ev_set),
        "base": "tiny random" if args.tiny else shown_path(args.base).replace("data/models/", ""),
        "per_family": {"baseline": {f: res_b[0][f] for f in gatt.FAMILIES}, "gatt": {f: res_g[0][f] for f in gatt.FAMILIES},
                       "sft": {f: res_s[f] for f in gatt.FAMILIES}},
        "attention": {"baseline": res_b[1], "gatt": res_g[1],
                      "what": "mean share of attention mass that the positions predicting reply tokens put on "
                              "system-message tokens; (layers, turns), averaged over heads, tokens and dialogues"},
        "dropped": {"baseline": res_b[3], "gatt": res_g[3],
                    "what": "share of dialogues whose oldest exchanges were dropped to fit the context, per turn"},
        "failures": {"baseline": res_b[2][:40], "gatt": res_g[2][:40]},
        "examples": {"baseline": res_b[4], "gatt": res_g[4]},
        "safety": safety_eval,
        "eval": {"split": "test questions, test instruction combinations", "decoding": "greedy",
                 "max_new_tokens": args.max_new_tokens, "time_s": time.time() - t0},
        "sampling": sampling, "tiny": args.tiny, "total_time_s": time.time() - t_start,
    }
    write_json(gatt_dir / "gatt_eval.json", out)
    write_model_card(gatt_dir)
    log(f"wrote {gatt_dir / 'gatt_eval.json'} in {time.time() - t_start:.0f} s total")
    return 0


def run(argv=None) -> int:
    """main with one BLAS thread: the stages that use both cores split their rows across two threads themselves
    (training: backprop.data_parallel; sampling: generate.generate_parallel), and two BLAS threads on small matmuls
    spend more time handing work over than computing, far more when other processes share the cores."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        return main(argv)


if __name__ == "__main__":
    try:
        sys.exit(run())
    except LlamaRefError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
