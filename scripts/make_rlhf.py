"""`make rlhf`: preference data -> reward model -> best of N -> rejection sampling -> PPO -> evaluation.

    python scripts/make_rlhf.py                        # the real run from data/models/tinyworld-chat (under 45 min
                                                       # on 2 cores; --time-budget-min caps it, default 45)
    python scripts/make_rlhf.py --tiny --out-dir /tmp/r   # a tiny random model, a handful of steps: proves the code

Writes
    data/models/tinyworld-rm/     the reward model (LlamaForSequenceClassification layout), preferences_train.jsonl
                                  and preferences_heldout.jsonl (the simulated annotator's), metrics.json, README.md
    data/models/tinyworld-rlhf/   the PPO policy (a causal LM like tinyworld-chat), metrics.json, README.md and
                                  rlhf_eval.json: rm_accuracy_by_degree, rm_pairs, best_of_n, policies (sft,
                                  rejection_sampling, ppo), ppo_runs (one history per beta), examples, n_eval, seed.
The steps are in llama_ref/preferences.py, reward_model.py, ppo.py and rlhf.py; chapters 09-10 read what this writes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_ref import gatt, paths, ppo, preferences, reward_model, rlhf, trainer    # noqa: E402
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE                                  # noqa: E402
from llama_ref.checkpoint import save_model                                       # noqa: E402
from llama_ref.errors import LlamaRefError                                        # noqa: E402
from llama_ref.output import write_text                                            # noqa: E402
from llama_ref.loader import read_checkpoint                                      # noqa: E402
from llama_ref.model import Llama                                                 # noqa: E402
from llama_ref.tinyworld import log                                               # noqa: E402
from llama_ref.tokenizer import Tokenizer                                         # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from make_gatt import tiny_base, write_json                                       # noqa: E402


def rm_accuracy_by_degree(rm, tok, prefs) -> dict:
    """Share of held-out pairs where the reward model scores the annotator's choice higher, per degree."""
    rc = rm.score(tok, [p.dialog for p in prefs], [p.chosen for p in prefs])
    rr = rm.score(tok, [p.dialog for p in prefs], [p.rejected for p in prefs])
    out = {}
    for d in preferences.DEGREES:
        sel = np.array([p.degree == d for p in prefs])
        out[d] = {"accuracy": float(np.mean(rc[sel] > rr[sel])) if sel.any() else None, "pairs": int(sel.sum())}
    out["overall"] = {"accuracy": float(np.mean(rc > rr)), "pairs": len(prefs)}
    return out


def write_model_cards(rm_dir: Path, rlhf_dir: Path) -> None:
    """README.md beside both models, from the rlhf_eval.json and metrics.json this script wrote."""
    ev = json.loads((rlhf_dir / "rlhf_eval.json").read_text())
    rmm = json.loads((rm_dir / "metrics.json").read_text())
    acc = ev["rm_accuracy_by_degree"]
    rows = "".join(f"| {d} | {acc[d]['pairs']} | " + ("-" if acc[d]["accuracy"] is None else f"{100 * acc[d]['accuracy']:.0f}%")
                   + " |\n" for d in (*preferences.DEGREES, "overall"))
    write_text(rm_dir / "README.md",
        "# tinyworld-rm: a reward model (Llama 2 paper, sec. 3.2.2)\n\n"
        f"tinyworld-chat's trunk plus a scalar head on the last token (`score.weight`, the layout of transformers' "
        f"LlamaForSequenceClassification), trained by `make rlhf` with the binary ranking loss and the paper's small "
        f"margin on {rmm['n_pairs']} preferences of a simulated annotator (`preferences_train.jsonl`), {rmm['steps']} "
        f"steps at lr {rmm['lr']}, {rmm['time_s'] / 60:.1f} min.\n\n"
        f"Accuracy on {ev['rm_pairs']} held-out pairs (held-out prompts, `preferences_heldout.jsonl`):\n\n"
        "| annotator's degree | pairs | accuracy |\n|---|---:|---:|\n" + rows)
    pol = ev["policies"]
    prow = "".join(f"| {name} | {100 * p['answer_accuracy']:.1f}% | {100 * p['adherence']:.1f}% | "
                   f"{100 * p['grammar']:.1f}% | {p['mean_reward']:.2f} | {p['kl_from_sft_per_token']:.3f} |\n"
                   for name, p in pol.items())
    write_text(rlhf_dir / "README.md",
        "# tinyworld-rlhf: rejection sampling, then PPO (Llama 2 paper, sec. 3.2.3)\n\n"
        f"From tinyworld-chat: one round of rejection sampling (best of {ev['settings']['rs_k']} by tinyworld-rm), then "
        f"PPO with beta {ev['settings']['ppo']['beta']} against the SFT model, {ev['ppo_runs'][0]['iterations']} "
        f"iterations. Made by `make rlhf` in {ev['total_time_s'] / 60:.0f} min.\n\n"
        f"On {ev['n_eval']} held-out prompts (greedy replies; KL on replies sampled at temperature 1):\n\n"
        "| policy | exact answer | adherence | grammar | mean reward | KL from SFT per token |\n"
        "|---|---:|---:|---:|---:|---:|\n" + prow +
        "\nOn facts RLHF never asked about (`unseen` prompts), exact answers: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in ev["unseen_answer_accuracy"].items()) + ".\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default=str(paths.CHAT_BASELINE_MODEL), help="the SFT chat model to start from")
    ap.add_argument("--out-dir", default=str(paths.MODELS_DIR), help="where tinyworld-rm/ and tinyworld-rlhf/ go")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and minimal sizes (a smoke test)")
    ap.add_argument("--pref-prompts", type=int, default=2000, help="training prompts the annotator compares")
    ap.add_argument("--pref-k", type=int, default=6,
                    help="replies sampled per prompt; every pair of distinct ones is compared")
    ap.add_argument("--rm-steps", type=int, default=1600,
                    help="reward-model steps, about three passes over the preferences: its held-out accuracy "
                         "kept rising with more passes")
    ap.add_argument("--rm-batch", type=int, default=8, help="pairs per reward-model step")
    ap.add_argument("--rm-lr", type=float, default=2e-4)
    ap.add_argument("--preferences", default=None,
                    help="train the reward model on this JSONL file of preferences ({prompt, chosen, rejected, degree} "
                         "per line) instead of the simulated annotator's")
    ap.add_argument("--noise", type=float, default=preferences.Annotator.noise, help="the annotator's noise")
    ap.add_argument("--n-eval", type=int, default=300, help="held-out prompts for every evaluation")
    ap.add_argument("--best-of", type=int, default=16, help="samples per prompt for the best-of-N curve")
    ap.add_argument("--rs-prompts", type=int, default=800)
    ap.add_argument("--rs-k", type=int, default=8, help="samples per prompt in rejection sampling")
    ap.add_argument("--rs-steps", type=int, default=300)
    ap.add_argument("--rs-lr", type=float, default=1e-4)
    ap.add_argument("--ppo-iterations", type=int, default=80)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--sweep-betas", default="0,0.1", help="further betas, each a shorter PPO run (the beta slider)")
    ap.add_argument("--sweep-iterations", type=int, default=15)
    ap.add_argument("--time-budget-min", type=float, default=45.0,
                    help="soft budget: each stage gets a share and stops early when it is used")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cards-only", action="store_true", help="only rewrite the model cards from the files written")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    rm_dir, rlhf_dir = out_dir / "tinyworld-rm", out_dir / "tinyworld-rlhf"
    if args.cards_only:
        write_model_cards(rm_dir, rlhf_dir)
        return 0
    t_start, budget = time.time(), args.time_budget_min * 60
    # Each stage gets a share of the budget and stops early (logging it) when that is used: sampling stages keep the
    # prompts they finished, training stages the steps they took. With the two default sweep betas (ppo_sweep each)
    # the shares add up to 0.81; the held-out sampling and the evaluation, the same size whatever the settings, take
    # the rest. The reward model gets the largest share: every later stage is only as good as its judgement.
    share = {"preferences": 0.14, "reward_model": 0.30, "best_of_n": 0.05, "rs_sampling": 0.05, "rs_finetune": 0.03,
             "ppo": 0.18, "ppo_sweep": 0.03}
    user_prefs = preferences.read_preferences(args.preferences) if args.preferences else None     # a bad file fails first
    tok_path = paths.DEFAULT_TOKENIZER
    tok = Tokenizer(tok_path)
    if args.tiny:
        args.pref_prompts, args.rm_steps, args.n_eval, args.best_of, args.rs_prompts, args.rs_k = 16, 3, 8, 4, 8, 2
        args.rs_steps, args.ppo_iterations, args.sweep_iterations = 2, 2, 1
        config, sft = tiny_base(tok, args.seed)
    else:
        config, sft = read_checkpoint(args.sft)
        sft = {k: np.array(v, np.float32) for k, v in sft.items()}
    sft_model = Llama(config, sft)
    ppo_settings = ppo.PPOSettings(beta=args.beta, prompts_per_iteration=8 if args.tiny else 32,
                           minibatch=4 if args.tiny else 16, max_new_tokens=8 if args.tiny else 40)
    mnt = ppo_settings.max_new_tokens

    # 1. preference data -----------------------------------------------------------------------------
    t0 = time.time()
    annotator = preferences.Annotator(noise=args.noise)
    train_prompts = preferences.make_prompts(args.pref_prompts, "train", args.seed)
    eval_prompts = preferences.make_prompts(args.n_eval, "eval", args.seed)
    log(f"sampling {args.pref_k} replies to {len(train_prompts)} training and {len(eval_prompts)} held-out prompts")
    temps = (1.0, 1.3)                                  # varied, as the paper did, for more distinct pairs
    train_replies = rlhf.sample_replies(sft_model, tok, [p.dialog for p in train_prompts], args.pref_k, args.seed,
                                        temps, max_new_tokens=mnt, time_budget_s=share["preferences"] * budget, log=log)
    train_prompts = train_prompts[:len(train_replies)]
    heldout_replies = rlhf.sample_replies(sft_model, tok, [p.dialog for p in eval_prompts], args.pref_k,
                                          args.seed + 1, temps, max_new_tokens=mnt)
    prefs = preferences.annotate(train_prompts, train_replies, annotator, seed=args.seed)
    if user_prefs:
        prefs = user_prefs
        log(f"training the reward model on {len(prefs)} preferences from {args.preferences}")
    heldout = preferences.annotate(eval_prompts, heldout_replies, annotator, seed=args.seed + 1)
    log(f"{len(prefs)} training and {len(heldout)} held-out preferences in {time.time() - t0:.0f} s")
    stage_s = {"preferences": time.time() - t0}

    # 2. reward model ------------------------------------------------------------------------------------
    P = reward_model.reward_model_init(config, sft, seed=args.seed)
    P, rm_metrics = reward_model.train_reward_model(config, P, prefs, tok, args.rm_steps, args.rm_batch, args.rm_lr,
                                            seed=args.seed, time_budget_s=share["reward_model"] * budget, log=log)
    stage_s["reward_model"] = rm_metrics["time_s"]
    rm = reward_model.RewardModel(config, P)
    rm_acc = rm_accuracy_by_degree(rm, tok, heldout)
    log("reward model accuracy on held-out pairs: "
        + ", ".join(f"{d} {v['accuracy']}" for d, v in rm_acc.items()))
    rm_metrics.update({"temperatures": list(temps), "noise": annotator.noise, "thresholds": list(annotator.thresholds), "margins": reward_model.MARGINS,
                       "accuracy_by_degree": rm_acc, "from": "tiny random" if args.tiny else "tinyworld-chat"})

    # 3. best of N on held-out prompts, and the whitening statistics of the SFT model's rewards -------------
    t0 = time.time()
    bon_replies = rlhf.sample_replies(sft_model, tok, [p.dialog for p in eval_prompts], args.best_of,
                                      args.seed + 2, max_new_tokens=mnt, time_budget_s=share["best_of_n"] * budget,
                                      log=log)
    bon_prompts = eval_prompts[:len(bon_replies)]
    bon_rewards = rm.score_samples(tok, [p.dialog for p in bon_prompts], bon_replies)
    best_of_n = rlhf.best_of_n(bon_prompts, bon_replies, bon_rewards, ns=(1, 2, 4, 8, 16, 32, 64))
    whiten = (float(bon_rewards.mean()), float(bon_rewards.std() + 1e-6))
    stage_s["best_of_n"] = time.time() - t0
    log(f"best of N ({stage_s['best_of_n']:.0f} s): {best_of_n}")

    # 4. rejection sampling fine-tune --------------------------------------------------------------------
    t0 = time.time()
    rs_prompts = preferences.make_prompts(args.rs_prompts, "train", args.seed + 1)
    rs_replies = rlhf.sample_replies(sft_model, tok, [p.dialog for p in rs_prompts], args.rs_k, args.seed + 3,
                                     max_new_tokens=mnt, time_budget_s=share["rs_sampling"] * budget, log=log)
    rs_prompts = rs_prompts[:len(rs_replies)]
    rs_rewards = rm.score_samples(tok, [p.dialog for p in rs_prompts], rs_replies)
    examples = rlhf.rejection_sampling_examples(rs_prompts, rs_replies, rs_rewards, tok)
    rs_weights, rs_metrics = trainer.finetune(config, sft, gatt.make_batches(examples, 8, args.seed), args.rs_steps,
                                              args.rs_lr, seed=args.seed, time_budget_s=share["rs_finetune"] * budget,
                                              log=lambda m: log(f"rejection sampling: {m}"))
    rs_metrics.update({"prompts": len(rs_prompts), "k": args.rs_k, "time_s": time.time() - t0,
                       "picked_quality": float(np.mean([preferences.true_quality(p, rs[b]) for p, rs, b in
                                                        zip(rs_prompts, rs_replies, rs_rewards.argmax(1))]))})
    stage_s["rejection_sampling"] = time.time() - t0
    log(f"rejection sampling done in {stage_s['rejection_sampling']:.0f} s")

    # 5. PPO on top of rejection sampling, one run per beta -------------------------------------------------
    ppo_prompts = preferences.make_prompts(args.rs_prompts, "train", args.seed + 2)
    betas = [args.beta] + [float(b) for b in args.sweep_betas.split(",") if b.strip()]
    runs, policy = [], None
    for i, beta in enumerate(betas):
        s = ppo.PPOSettings(**{**ppo_settings.__dict__, "beta": beta})
        iters = args.ppo_iterations if i == 0 else args.sweep_iterations
        weights, hist = ppo.ppo_train(config, rs_weights, sft, rm, tok, ppo_prompts, s, iters, whiten, seed=args.seed,
                                       time_budget_s=share["ppo" if i == 0 else "ppo_sweep"] * budget, log=log)
        runs.append({"beta": beta, "iterations": len(hist), "history": hist})
        stage_s[f"ppo_beta_{beta:g}"] = hist[-1]["time_s"]
        if i == 0:
            policy = weights

    # 6. evaluation on held-out prompts --------------------------------------------------------------------
    t0 = time.time()
    unseen = preferences.make_prompts(args.n_eval, "unseen", args.seed)
    policies, unseen_acc, replies = {}, {}, {}
    for name, w in (("sft", sft), ("rejection_sampling", rs_weights), ("ppo", policy)):
        rep = rlhf.evaluate_policy(config, w, sft, rm, tok, eval_prompts, seed=args.seed + 5, max_new_tokens=mnt)
        policies[name], replies[name] = rep.to_json(), rep.replies
        u = rlhf.sample_replies(Llama(config, w), tok, [p.dialog for p in unseen], 1, 0, 0.0, mnt)
        unseen_acc[name] = float(np.mean([preferences.judge(p, r[0]).exact for p, r in zip(unseen, u)]))
        log(f"{name}: {policies[name]}, unseen facts exact {unseen_acc[name]:.3f}")
    stage_s["evaluation"] = time.time() - t0
    examples_out = [{"prompt": p.dialog, "answer": p.answer, **{k: replies[k][i] for k in replies}}
                    for i, p in enumerate(eval_prompts[:24])]

    # 7. write -----------------------------------------------------------------------------------------------
    reward_model.save_reward_model(rm_dir, config, P, tokenizer_path=tok_path)
    preferences.write_preferences(rm_dir / "preferences_train.jsonl", prefs)
    preferences.write_preferences(rm_dir / "preferences_heldout.jsonl", heldout)
    write_json(rm_dir / "metrics.json", rm_metrics)
    save_model(rlhf_dir, config, policy, tokenizer_path=tok_path, chat_template=LLAMA2_CHAT_TEMPLATE)
    write_json(rlhf_dir / "metrics.json", {"rejection_sampling": rs_metrics, "ppo": runs[0]})
    out = {"rm_accuracy_by_degree": rm_acc, "rm_pairs": len(heldout), "best_of_n": best_of_n, "policies": policies,
           "unseen_answer_accuracy": unseen_acc, "ppo_runs": runs, "examples": examples_out,
           "whiten": {"mean": whiten[0], "std": whiten[1]},
           "settings": {"annotator": {"noise": annotator.noise, "thresholds": list(annotator.thresholds)},
                        "quality_weights": preferences.QUALITY_WEIGHTS, "margins": reward_model.MARGINS, "pref_k": args.pref_k,
                        "rs_k": args.rs_k, "rs_prompts": args.rs_prompts, "ppo": ppo_settings.__dict__},
           "stage_time_s": stage_s, "prompts_used": {"preferences": len(train_prompts), "best_of_n": len(bon_prompts),
                                                     "rejection_sampling": len(rs_prompts)},
           "n_eval": len(eval_prompts), "seed": args.seed, "tiny": args.tiny, "total_time_s": time.time() - t_start}
    write_json(rlhf_dir / "rlhf_eval.json", out)
    write_model_cards(rm_dir, rlhf_dir)
    log(f"wrote {rm_dir} and {rlhf_dir} in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LlamaRefError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
