"""`make gatt`: chat SFT baseline -> Ghost Attention data by rejection sampling -> GAtt fine-tune -> evaluation.

    python scripts/make_gatt.py                       # the real run from data/models/tinyworld (~15 min on 2 cores;
                                                      # --time-budget-min caps it, default 60)
    python scripts/make_gatt.py --tiny --out-dir /tmp/g   # a tiny random model, a handful of steps: proves the code

Writes
    data/models/tinyworld-chat/   the baseline: ordinary SFT (multi-turn dialogues without a system message,
                                  instructions only in single-turn examples); metrics.json, README.md (model card)
    data/models/tinyworld-gatt/   baseline + GAtt fine-tune; metrics.json, README.md, gatt_samples.json (accepted dialogues and
                                  rejected samples), gatt_eval.json (written by the evaluation below):
        {"turns": [1..8], "baseline": [...], "gatt": [...], "n_dialogues": N, "per_family": ..., "attention": ...,
         "dropped": ..., "failures": ...}   adherence as fractions, attention as (layers, turns) shares.
The steps are in llama_ref/gatt.py (data, sampling, evaluation) and llama_ref/trainer.py (the NumPy training loop).
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

from llama_ref import gatt, paths                                    # noqa: E402
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE                      # noqa: E402
from llama_ref.checkpoint import save_model
from llama_ref.loader import read_checkpoint              # noqa: E402
from llama_ref.config import LlamaConfig                             # noqa: E402
from llama_ref.model import Llama  # noqa: E402
from llama_ref.weights import weight_shapes
from llama_ref.tokenizer import Tokenizer                            # noqa: E402
from llama_ref.tinyworld import log                                   # noqa: E402
from llama_ref.output import write_text as write_text_atomic            # noqa: E402


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
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=1) + "\n")


def _shown_path(p) -> str:
    """A path relative to the repository when it is inside it (metrics.json should not record this machine's paths)."""
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def write_model_cards(base_dir: Path, gatt_dir: Path) -> None:
    """README.md beside each chat model, built from the metrics.json and gatt_eval.json this script wrote."""
    sft = json.loads((base_dir / "metrics.json").read_text())
    gm = json.loads((gatt_dir / "metrics.json").read_text())
    ev = json.loads((gatt_dir / "gatt_eval.json").read_text())
    samp = ev["sampling"]
    pct = lambda xs: " | ".join("-" if x is None else f"{100 * x:.0f}%" for x in xs)
    table = ("| turn | " + " | ".join(str(t) for t in ev["turns"]) + " |\n|---|" + "---:|" * len(ev["turns"]) + "\n"
             f"| baseline (tinyworld-chat) | {pct(ev['baseline'])} |\n| GAtt (tinyworld-gatt) | {pct(ev['gatt'])} |\n")
    common = (f"Made by `make gatt` (`scripts/make_gatt.py`) from `{sft.get('from', 'data/models/tinyworld')}`, with the "
              f"NumPy trainer (`llama_ref/trainer.py`). Same architecture and tokenizer as the base model. Chat format: "
              f"Llama 2's (`llama_ref/chat.py`).\n\n"
              f"Instruction adherence per turn on {ev['n_dialogues']} held-out dialogues ({ev['eval']['split']}), "
              f"{ev['eval']['decoding']} decoding, the instruction only in the system message "
              f"(`tinyworld-gatt/gatt_eval.json`, chapter 11):\n\n{table}")
    write_text_atomic(base_dir / "README.md",
        "# tinyworld-chat: the SFT baseline\n\n"
        f"Ordinary supervised fine-tuning: {sft['n_examples']} examples (multi-turn corpus dialogues without a system "
        f"message, and single-turn examples with an instruction), {sft['steps']} steps at lr {sft['lr']}, loss on "
        f"assistant tokens only ({sft['target_tokens']:,} target tokens), {sft['time_s'] / 60:.1f} min. "
        f"Final training loss {sft['final_loss']:.4f}.\n\n" + common)
    write_text_atomic(gatt_dir / "README.md",
        "# tinyworld-gatt: Ghost Attention (Llama 2 paper, sec. 3.3)\n\n"
        f"Fine-tuned from tinyworld-chat on {gm['n_gatt_examples']} GAtt examples rejection-sampled from it "
        f"({samp['dialogues']} training dialogues, {samp['accepted_replies']} replies accepted, "
        f"{samp['rejected_samples']} rejected) mixed with {gm['n_sft_mixed']} ordinary SFT examples: {gm['steps']} "
        f"steps at lr {gm['lr']}, {gm['time_s'] / 60:.1f} min. The instruction is only in the system message and the "
        f"loss only on the last reply of each example.\n\n" + common)


def tiny_base(tok, seed=0):
    """A tiny random model for --tiny runs and tests."""
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=384)
    rng = np.random.default_rng(seed)
    w = {k: (np.ones(s) if len(s) == 1 else rng.standard_normal(s) * 0.05).astype(np.float32)
         for k, s in weight_shapes(cfg).items()}
    return cfg, w


def finetune(config, weights, examples, steps, batch_size, lr, seed, time_budget_s, what):
    """Fine-tune with the NumPy trainer (loss only where the example's mask is set); returns (weights, metrics)."""
    from llama_ref import trainer
    batches = gatt.make_batches(examples, batch_size, seed, pad_id=0)
    return trainer.finetune(config, weights, batches, steps=steps, lr=lr, seed=seed, time_budget_s=time_budget_s,
                          log=lambda m: log(f"{what}: {m}"))


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(paths.DEFAULT_MODEL), help="the pre-trained model to start from")
    ap.add_argument("--out-dir", default=str(paths.MODELS_DIR),
                    help="where tinyworld-chat/ and tinyworld-gatt/ are written (default: data/models)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random base model and minimal sizes (a smoke test)")
    ap.add_argument("--sft-examples", type=int, default=8000)
    ap.add_argument("--sft-steps", type=int, default=2000,
                    help="600 steps at 3e-4 left the baseline unable to map a style to its sound even at turn 1")
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--gatt-dialogues", type=int, default=400, help="dialogues to sample for GAtt")
    ap.add_argument("--gatt-min-turns", type=int, default=8,
                    help="sample 8-turn dialogues: late turns are what GAtt must teach")
    ap.add_argument("--gatt-max-turns", type=int, default=8)
    ap.add_argument("--gatt-steps", type=int, default=700)
    ap.add_argument("--gatt-lr", type=float, default=5e-4)
    ap.add_argument("--gatt-mix", type=float, default=0.3, help="share of ordinary SFT examples mixed into the GAtt fine-tune")
    ap.add_argument("--max-tries", type=int, default=4, help="samples per turn before a dialogue is cut")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sample-batch", type=int, default=16, help="dialogues decoded together when sampling/evaluating")
    ap.add_argument("--eval-dialogues", type=int, default=100)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--time-budget-min", type=float, default=60.0,
                    help="soft budget: training stages stop early and sampling stops when their share is used")
    ap.add_argument("--reuse-baseline", action="store_true", help="start from an existing tinyworld-chat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cards-only", action="store_true",
                    help="only (re)write the README.md model cards from the metrics already in --out-dir")
    args = ap.parse_args(argv)
    if args.cards_only:
        write_model_cards(Path(args.out_dir) / "tinyworld-chat", Path(args.out_dir) / "tinyworld-gatt")
        return 0

    t_start = time.time()
    budget = args.time_budget_min * 60
    out_dir = Path(args.out_dir)
    base_dir, gatt_dir = out_dir / "tinyworld-chat", out_dir / "tinyworld-gatt"
    tok_path = paths.DEFAULT_TOKENIZER
    tok = Tokenizer(tok_path)
    if args.tiny:
        args.sft_examples, args.sft_steps, args.gatt_dialogues, args.gatt_steps = 24, 3, 3, 3
        args.eval_dialogues, args.turns, args.max_new_tokens, args.max_tries, args.batch_size = 2, 3, 8, 2, 4
        config, weights = tiny_base(tok, args.seed)
    else:
        if not (Path(args.base) / "config.json").exists():
            print(f"error: the base model {args.base} does not exist: train it first (`make model`)", file=sys.stderr)
            return 2
        config, weights = read_checkpoint(args.base)
        weights = {k: np.array(v, np.float32) for k, v in weights.items()}
    log(f"base: {config.n_params() / 1e6:.2f}M parameters, context {config.max_seq_len}")
    max_len = config.max_seq_len

    # 1. baseline SFT ---------------------------------------------------------------------------------
    if args.reuse_baseline and (base_dir / "config.json").exists():
        config, weights = read_checkpoint(base_dir)
        weights = {k: np.array(v, np.float32) for k, v in weights.items()}
        sft_data = gatt.baseline_sft_data(tok, args.sft_examples, seed=args.seed, max_len=max_len)
        sft_metrics = json.loads((base_dir / "metrics.json").read_text()) if (base_dir / "metrics.json").exists() else {}
        log("baseline reused from " + str(base_dir))
    else:
        sft_data = gatt.baseline_sft_data(tok, args.sft_examples, seed=args.seed, max_len=max_len)
        log(f"baseline SFT: {len(sft_data)} examples "
            f"({sum(e.kind == 'sft-instruction' for e in sft_data)} single-turn with an instruction)")
        t0 = time.time()
        weights, sft_metrics = finetune(config, weights, sft_data, args.sft_steps, args.batch_size, args.sft_lr,
                                        args.seed, 0.35 * budget, "sft")
        sft_metrics.update({"stage": "baseline SFT", "n_examples": len(sft_data), "time_s": time.time() - t0,
                            "from": "tiny random" if args.tiny else _shown_path(args.base)})
        save_model(base_dir, config, weights, tokenizer_path=tok_path, chat_template=LLAMA2_CHAT_TEMPLATE)
        write_json(base_dir / "metrics.json", sft_metrics)
        log(f"baseline saved to {base_dir}")
    baseline = Llama(config, weights)

    # 2. GAtt data by rejection sampling from the baseline -------------------------------------------
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
        print("error: rejection sampling accepted no reply; the baseline does not follow instructions "
              "(train it longer: --sft-steps)", file=sys.stderr)
        if not args.tiny:
            return 1
        ins = items[0][0]                                  # --tiny: one hand-made example keeps the code path running
        examples = gatt.gatt_examples(gatt.SampledDialogue(ins, [{"role": "system", "content": ins.text},
                                                                 {"role": "user", "content": "Hi!"},
                                                                 {"role": "assistant", "content": ins.apply("Hi!")}]),
                                      tok)
    n_mix = int(args.gatt_mix / max(1e-9, 1 - args.gatt_mix) * len(examples))
    mix = [sft_data[i] for i in np.random.default_rng(args.seed).permutation(len(sft_data))[:n_mix]]

    # 3. GAtt fine-tune ----------------------------------------------------------------------------------
    t0 = time.time()
    remaining = budget - (time.time() - t_start)
    gatt_weights, gatt_metrics = finetune(config, dict(weights), examples + mix, args.gatt_steps, args.batch_size,
                                          args.gatt_lr, args.seed + 1, max(60.0, 0.6 * remaining), "gatt")
    gatt_metrics.update({"stage": "GAtt fine-tune from the baseline", "n_gatt_examples": len(examples),
                         "n_sft_mixed": len(mix), "time_s": time.time() - t0, "sampling": sampling})
    save_model(gatt_dir, config, gatt_weights, tokenizer_path=tok_path, chat_template=LLAMA2_CHAT_TEMPLATE)
    write_json(gatt_dir / "metrics.json", gatt_metrics)
    write_json(gatt_dir / "gatt_samples.json",
               [{"instruction": s.instruction.text, "dialog": s.dialog, "n_tries": s.n_tries,
                 "rejected": s.rejected} for s in sampled[:50]])
    log(f"GAtt model saved to {gatt_dir}")
    gatt_model = Llama(config, gatt_weights)

    # 4. evaluation ---------------------------------------------------------------------------------------
    t0 = time.time()
    ev_set = gatt.eval_dialogues(args.eval_dialogues, seed=args.seed + 1000, n_turns=args.turns)
    res_b = evaluate(baseline, tok, ev_set, args.max_new_tokens, args.sample_batch)
    log(f"baseline adherence per turn: {np.round(res_b[0]['all'], 2).tolist()}")
    res_g = evaluate(gatt_model, tok, ev_set, args.max_new_tokens, args.sample_batch)
    log(f"GAtt adherence per turn:     {np.round(res_g[0]['all'], 2).tolist()}")
    out = {
        "turns": list(range(1, args.turns + 1)),
        "baseline": res_b[0]["all"], "gatt": res_g[0]["all"], "n_dialogues": len(ev_set),
        "per_family": {"baseline": {f: res_b[0][f] for f in gatt.FAMILIES}, "gatt": {f: res_g[0][f] for f in gatt.FAMILIES}},
        "attention": {"baseline": res_b[1], "gatt": res_g[1],
                      "what": "mean share of attention mass that the positions predicting reply tokens put on "
                              "system-message tokens; (layers, turns), averaged over heads, tokens and dialogues"},
        "dropped": {"baseline": res_b[3], "gatt": res_g[3],
                    "what": "share of dialogues whose oldest exchanges were dropped to fit the context, per turn"},
        "failures": {"baseline": res_b[2][:40], "gatt": res_g[2][:40]},
        "examples": {"baseline": res_b[4], "gatt": res_g[4]},
        "eval": {"split": "test questions, test instruction combinations", "decoding": "greedy",
                 "max_new_tokens": args.max_new_tokens, "time_s": time.time() - t0},
        "sampling": sampling, "tiny": args.tiny, "total_time_s": time.time() - t_start,
    }
    write_json(gatt_dir / "gatt_eval.json", out)
    write_model_cards(base_dir, gatt_dir)
    log(f"wrote {gatt_dir / 'gatt_eval.json'} in {time.time() - t_start:.0f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
