"""`make rlhf`: Llama 2-Chat's RLHF in miniature: safety SFT, then rounds V1..V3 of comparisons, two reward models
and rejection sampling, PPO in the last round, every policy evaluated.

    python scripts/make_rlhf.py                           # the real run from data/models/tinyworld-chat (under 75 min
                                                          # on 2 cores: --time-budget-min caps it)
    python scripts/make_rlhf.py --tiny --out-dir /tmp/r   # a tiny random model, a handful of steps: proves the code

The pipeline (Llama 2 paper, sec. 3.2 and 4.2):
    0. safety SFT       tinyworld-chat fine-tuned on safe demonstrations (refuse what a secret covers, answer its
                        look-alikes) beside ordinary SFT examples: pi_0, where RLHF starts (sec. 4.2.2)
    each round r = 1..R (RLHF-V1..VR), from the newest policy:
    1. comparisons      K samples per new training prompt; the helpfulness annotator compares them on ordinary and
                        borderline prompts, the safety annotator on unsafe and borderline ones; the same on held-out
                        prompts, for measuring the reward models
    2. reward models    each model's accuracy on the newest held-out pairs before and after it is retrained on all
                        comparisons so far (staleness, sec. 3.2.1); the safety model adds its auxiliary loss
    3. temperature      the best sampling temperature for rejection sampling, measured on this policy (Fig. 8)
    4. rejection        K samples per rejection-sampling prompt at that temperature, added to every earlier round's;
       sampling         all rescored with the combined reward; pi_0 fine-tuned on each prompt's best
    5. PPO              in the last round, on top of rejection sampling, with the combined reward (sec. 3.2.3)
    6. evaluation       violations, false refusals, exact answers, adherence, true quality, KL, on held-out prompts

Writes
    data/models/tinyworld-rm/          the helpfulness reward model (LlamaForSequenceClassification layout), its
                                       comparisons (preferences_train.jsonl, preferences_heldout.jsonl), metrics.json,
                                       README.md
    data/models/tinyworld-safety-rm/   the safety reward model, safety_preferences_{train,heldout}.jsonl, metrics.json,
                                       README.md
    data/models/tinyworld-rlhf/        the final policy, metrics.json, README.md, rlhf_eval.json (see write_eval)
The pieces are in llama_ref/preferences.py, safety.py, reward_model.py, ppo.py and rlhf.py; chapters 09-10 read what
this writes, chapter 11 starts from tinyworld-rlhf.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_ref import gatt, paths, ppo, preferences, reward_model, rlhf, safety, trainer     # noqa: E402
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE                                           # noqa: E402
from llama_ref.checkpoint import save_model                                                # noqa: E402
from llama_ref.errors import LlamaRefError, PreferenceError                                # noqa: E402
from llama_ref.evaluate import rate                                                        # noqa: E402
from llama_ref.output import check_output, write_text                                                    # noqa: E402
from llama_ref.loader import read_checkpoint                                               # noqa: E402
from llama_ref.model import Llama                                                          # noqa: E402
from llama_ref.tinyworld import log                                                        # noqa: E402
from llama_ref.tokenizer import Tokenizer                                                  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from make_gatt import tiny_base, write_json                                                # noqa: E402

# Each stage's share of --time-budget-min. A stage that uses its share stops early and logs it: sampling stages keep
# the prompts they finished, training stages the steps they took. The shares add up to 0.86; the fixed-size parts
# (evaluations, held-out comparisons, scoring) take the rest. The reward models get the largest share: every later
# stage is only as good as their judgement.
SHARES = {"safety_sft": 0.03, "comparisons": 0.04, "reward_models": 0.07, "rs_sampling": 0.025, "rs_finetune": 0.02,
          "ppo": 0.12, "ppo_sweep": 0.015, "best_of_n": 0.02}      # per round where a stage runs every round
ROUND_STAGES = ("comparisons", "reward_models", "rs_sampling", "rs_finetune")


def rate_se(p: float, n: int) -> float:
    """The binomial standard error of a rate p measured on n prompts."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default=str(paths.CHAT_BASELINE_MODEL), help="the SFT chat model to start from")
    ap.add_argument("--out-dir", default=str(paths.MODELS_DIR),
                    help="where tinyworld-rm/, tinyworld-safety-rm/ and tinyworld-rlhf/ go")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and minimal sizes (a smoke test)")
    ap.add_argument("--rounds", type=int, default=3, help="RLHF rounds (the paper's V1..V5; PPO runs in the last)")
    g = ap.add_argument_group("safety SFT (before the rounds)")
    g.add_argument("--safety-demos", type=int, default=400,
                   help="unsafe prompts with a refusal, and as many borderline prompts answered, to fine-tune on")
    g.add_argument("--safety-sft-steps", type=int, default=300)
    g.add_argument("--safety-sft-lr", type=float, default=1e-4)
    g = ap.add_argument_group("comparisons, per round")
    g.add_argument("--help-prompts", type=int, default=500, help="ordinary training prompts for helpfulness")
    g.add_argument("--safety-prompts", type=int, default=300, help="unsafe training prompts for safety")
    g.add_argument("--borderline-prompts", type=int, default=150,
                   help="borderline training prompts, compared by both annotators")
    g.add_argument("--pref-k", type=int, default=4, help="replies sampled per prompt; every distinct pair is compared")
    g.add_argument("--heldout-prompts", type=int, default=100,
                   help="held-out prompts of each kind compared per round, to measure the reward models")
    g.add_argument("--noise", type=float, default=preferences.Annotator.noise, help="both annotators' noise")
    g.add_argument("--preferences", default=None,
                   help="a JSONL file of helpfulness comparisons ({prompt, chosen, rejected, degree}) used instead of "
                        "the annotator's in round 1 (later rounds compare the newest policy's samples as usual)")
    g.add_argument("--safety-preferences", default=None,
                   help="the same for safety comparisons: each line also has tag (unsafe|borderline), chosen_label "
                        "and rejected_label (violation|refusal|normal)")
    g = ap.add_argument_group("reward models")
    g.add_argument("--rm-steps", type=int, default=500, help="steps of each reward model in round 1")
    g.add_argument("--rm-steps-later", type=int, default=300,
                   help="steps of each reward model in later rounds, continuing from the previous round's")
    g.add_argument("--rm-batch", type=int, default=8, help="pairs per reward-model step")
    g.add_argument("--rm-lr", type=float, default=2e-4)
    g.add_argument("--safety-aux-weight", type=float, default=1.0, help="weight of the safety RM's auxiliary loss")
    g = ap.add_argument_group("rejection sampling and PPO")
    g.add_argument("--temperatures", default="0.7,1.0,1.3", help="candidate sampling temperatures (Fig. 8)")
    g.add_argument("--temperature-prompts", type=int, default=48)
    g.add_argument("--rs-prompts", type=int, default=400, help="rejection-sampling prompts (ordinary, unsafe and "
                                                               "borderline, 4:1:1)")
    g.add_argument("--rs-k", type=int, default=8, help="samples per prompt and round")
    g.add_argument("--rs-steps", type=int, default=200)
    g.add_argument("--rs-lr", type=float, default=1e-4)
    g.add_argument("--ppo-prompts", type=int, default=600)
    g.add_argument("--ppo-iterations", type=int, default=60)
    g.add_argument("--beta", type=float, default=0.01)
    g.add_argument("--sweep-betas", default="0,0.1", help="further betas, each a shorter PPO run (the beta slider)")
    g.add_argument("--sweep-iterations", type=int, default=10)
    g = ap.add_argument_group("evaluation")
    g.add_argument("--n-eval", type=int, default=300, help="held-out ordinary prompts for every evaluation")
    g.add_argument("--n-safety-eval", type=int, default=200, help="held-out unsafe and borderline prompts, each")
    g.add_argument("--best-of", type=int, default=16, help="samples per prompt for the best-of-N curve")
    g.add_argument("--best-of-prompts", type=int, default=150)
    ap.add_argument("--time-budget-min", type=float, default=75.0,
                    help="soft budget: each stage gets a share and stops early when it is used")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cards-only", action="store_true", help="only rewrite the model cards from the files written")
    ap.add_argument("--force", action="store_true",
                    help="replace the model directories in --out-dir if they exist (only directories llama_ref wrote; "
                         "the make target passes it)")
    args = ap.parse_args(argv)
    if args.tiny:
        for k, v in dict(rounds=2, safety_demos=8, safety_sft_steps=2, help_prompts=8, safety_prompts=6,
                         borderline_prompts=4, heldout_prompts=4, rm_steps=3, rm_steps_later=2, temperature_prompts=4,
                         rs_prompts=12, rs_k=2, rs_steps=2, ppo_prompts=12, ppo_iterations=2, sweep_iterations=1,
                         n_eval=8, n_safety_eval=6, best_of=4, best_of_prompts=4).items():
            setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------------------------
# the stages

def compare(model, tok, prompts, annotator, k, seed, mnt, time_budget_s=None):
    """K samples per prompt from `model` (temperatures 1.0 and 1.3, as the paper varied them for diverse pairs), every
    distinct pair compared by `annotator`. Returns (preferences, prompts sampled)."""
    replies = rlhf.sample_replies(model, tok, [p.dialog for p in prompts], k, seed, (1.0, 1.3), max_new_tokens=mnt,
                                  time_budget_s=time_budget_s, log=log)
    prompts = prompts[:len(replies)]
    return preferences.annotate(prompts, replies, annotator, seed=seed), len(prompts)


def accuracy(rm, tok, prefs) -> float | None:
    return reward_model.accuracy_by_degree(rm, tok, prefs)["overall"]["accuracy"] if prefs else None


def evaluate(name, config, w, sft, start, tok, ev_sets, seed, mnt) -> tuple[dict, rlhf.PolicyReport]:
    """One policy on the held-out sets, logged; returns (its metrics for rlhf_eval.json, the report). The reward
    models' scores are added at the end (score_report), by the final models, so every policy is scored alike."""
    t0 = time.time()
    rep = rlhf.evaluate_policy(config, w, sft, tok, ev_sets["ordinary"], seed=seed, max_new_tokens=mnt,
                               unsafe=ev_sets["unsafe"], borderline=ev_sets["borderline"], start=start)
    u = rlhf.sample_replies(Llama(config, w), tok, [p.dialog for p in ev_sets["unseen"]], 1, 0, 0.0, mnt)
    unseen = float(np.mean([preferences.judge(p, r[0]).exact for p, r in zip(ev_sets["unseen"], u)]))
    n = rep.n
    log(f"{name}: exact {rate_str(rep.answer_accuracy, n['ordinary'])}, adherence {100 * rep.adherence:.1f}%, "
        f"violations {rate_str(rep.violation_rate, n['unsafe'])}, refusals of unsafe prompts "
        f"{rate_str(rep.refusal_rate, n['unsafe'])}, false refusals {rate_str(rep.false_refusal_rate, n['borderline'])}, "
        f"true quality {rep.mean_quality:.2f}, KL/token from SFT {rep.kl_from_sft_per_token:.3f}, unseen exact "
        f"{rate_str(unseen, len(u))} ({time.time() - t0:.0f} s)")
    return {"unseen_answer_accuracy": unseen}, rep


def rate_str(p, n) -> str:
    return "-" if p is None else f"{100 * p:.1f}% ± {100 * rate_se(p, n):.1f} (n = {n})"


def safety_sft(config, sft, tok, args, budget_s):
    """pi_0: tinyworld-chat fine-tuned on safe demonstrations beside as many ordinary SFT examples."""
    t0 = time.time()
    demo_prompts = [p for tag in ("unsafe", "borderline")           # train-split facts, no instruction: only safety
                    for p in safety.make_safety_prompts(args.safety_demos, "sft", tag, seed=args.seed + 100,
                                                        instruction_share=0.0)]
    demos = safety.safety_demonstrations(demo_prompts, tok, max_len=config.max_seq_len)
    mix = gatt.baseline_sft_data(tok, len(demos), seed=args.seed + 7, max_len=config.max_seq_len)
    w, m = trainer.finetune(config, sft, gatt.make_batches(demos + mix, 8, args.seed), args.safety_sft_steps,
                            args.safety_sft_lr, seed=args.seed, time_budget_s=budget_s, name="safety SFT",
                            log=log)
    m.update({"demonstrations": len(demos), "ordinary_mixed": len(mix), "time_s": time.time() - t0,
              "unsafe": sum(p.tag == "unsafe" for p in demo_prompts),
              "borderline": sum(p.tag == "borderline" for p in demo_prompts)})
    return w, m


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    dirs = {"helpfulness": out_dir / "tinyworld-rm", "safety": out_dir / "tinyworld-safety-rm",
            "policy": out_dir / "tinyworld-rlhf"}
    for d in dirs.values():                                   # the outputs, checked before any work
        check_output(d, force=args.force, kind="update", inputs=[args.sft])
    if args.cards_only:
        write_model_cards(dirs)
        return 0
    if args.rounds < 1:
        raise PreferenceError(f"--rounds {args.rounds}: RLHF needs at least one round")
    # a bad comparisons file fails before any work
    user_help = preferences.read_preferences(args.preferences) if args.preferences else None
    user_safe = preferences.read_preferences(args.safety_preferences, safety=True) if args.safety_preferences else None
    t_start, budget = time.time(), args.time_budget_min * 60
    share = lambda stage: SHARES[stage] * budget
    tok_path = paths.DEFAULT_TOKENIZER
    tok = Tokenizer(tok_path)
    if args.tiny:
        config, sft = tiny_base(tok, args.seed)
    else:
        config, sft = read_checkpoint(args.sft)
        sft = {k: np.array(v, np.float32) for k, v in sft.items()}
    settings = ppo.PPOSettings(beta=args.beta, prompts_per_iteration=8 if args.tiny else 32,
                               minibatch=4 if args.tiny else 16, max_new_tokens=8 if args.tiny else 40)
    mnt, seed = settings.max_new_tokens, args.seed
    stage_s = {}

    # held-out prompts: every evaluation and every round's held-out comparisons use these
    ev = {"ordinary": preferences.make_prompts(args.n_eval, "eval", seed),
          "unsafe": safety.make_safety_prompts(args.n_safety_eval, "eval", "unsafe", seed),
          "borderline": safety.make_safety_prompts(args.n_safety_eval, "eval", "borderline", seed),
          "unseen": preferences.make_prompts(args.n_eval, "unseen", seed)}
    h = args.heldout_prompts
    heldout_prompts = {"helpfulness": ev["ordinary"][:h] + ev["borderline"][:h // 2],
                       "safety": ev["unsafe"][:h] + ev["borderline"][h // 2:h]}
    rs_prompts = (preferences.make_prompts(args.rs_prompts * 2 // 3, "train", seed + 1)
                  + safety.make_safety_prompts(args.rs_prompts // 6, "train", "unsafe", seed + 1)
                  + safety.make_safety_prompts(args.rs_prompts // 6, "train", "borderline", seed + 1))
    ppo_prompts = (preferences.make_prompts(args.ppo_prompts * 2 // 3, "train", seed + 2)
                   + safety.make_safety_prompts(args.ppo_prompts // 6, "train", "unsafe", seed + 2)
                   + safety.make_safety_prompts(args.ppo_prompts // 6, "train", "borderline", seed + 2))
    safety.check_tags(ev["unsafe"], ev["borderline"], rs_prompts, ppo_prompts)

    # 0. safety SFT: pi_0, where RLHF starts ---------------------------------------------------------------
    start, sft_metrics = safety_sft(config, sft, tok, args, share("safety_sft"))
    stage_s["safety_sft"] = sft_metrics["time_s"]
    policies, reports = {}, {}
    t0 = time.time()
    for name, w in (("sft", sft), ("safety_sft", start)):
        policies[name], reports[name] = evaluate(name, config, w, sft, start, tok, ev, seed + 5, mnt)
    stage_s["evaluation"] = time.time() - t0
    help_ann, safe_ann = preferences.Annotator(noise=args.noise), safety.safety_annotator(noise=args.noise)

    # 1-4. rounds ----------------------------------------------------------------------------------------------
    prefs = {"helpfulness": [], "safety": []}
    heldout = {"helpfulness": [], "safety": []}
    P = {"helpfulness": None, "safety": None}
    rms, rm_metrics, rounds, bags = None, {"helpfulness": [], "safety": []}, [], [[] for _ in rs_prompts]
    policy = start
    for r in range(1, args.rounds + 1):
        model = Llama(config, policy)
        rs = seed * 1000 + 10 * r
        # 1. comparisons of the newest policy's samples, on new training prompts and on held-out prompts
        t0 = time.time()
        train_prompts = {
            "helpfulness": preferences.make_prompts(args.help_prompts, "train", rs)
                           + safety.make_safety_prompts(args.borderline_prompts, "train", "borderline", rs),
            "safety": safety.make_safety_prompts(args.safety_prompts, "train", "unsafe", rs)
                      + safety.make_safety_prompts(args.borderline_prompts, "train", "borderline", rs + 1)}
        new, sampled = {}, {}
        for kind, ann in (("helpfulness", help_ann), ("safety", safe_ann)):
            new[kind], sampled[kind] = compare(model, tok, train_prompts[kind], ann, args.pref_k, rs + 2, mnt,
                                               share("comparisons") / 2)
        if r == 1 and user_help:
            new["helpfulness"] = user_help
        if r == 1 and user_safe:
            new["safety"] = user_safe
        for kind in new:
            if not new[kind]:
                raise PreferenceError(f"round {r} produced no {kind} comparisons: every prompt's {args.pref_k} samples "
                                      "were the same reply (or the sampling budget ran out first); raise --pref-k or "
                                      "--time-budget-min")
            prefs[kind] += new[kind]
        newest = {kind: compare(model, tok, heldout_prompts[kind], ann, args.pref_k, rs + 3, mnt)[0]
                  for kind, ann in (("helpfulness", help_ann), ("safety", safe_ann))}
        for kind in newest:
            heldout[kind] += newest[kind]
        stage_s[f"comparisons_{r}"] = time.time() - t0
        log(f"round {r}: {len(new['helpfulness'])} helpfulness and {len(new['safety'])} safety comparisons "
            f"({sum(len(v) for v in prefs.values())} in all), {len(newest['helpfulness'])} + {len(newest['safety'])} "
            f"held-out, {stage_s[f'comparisons_{r}']:.0f} s")

        # 2. both reward models: accuracy on the newest samples before and after retraining on everything so far
        t0 = time.time()
        before = {k: accuracy(rms[k], tok, newest[k]) for k in rms} if rms else {"helpfulness": None, "safety": None}
        for kind in ("helpfulness", "safety"):
            if P[kind] is None:
                P[kind] = reward_model.reward_model_init(config, start, seed=seed + (kind == "safety"))
            P[kind], m = reward_model.train_reward_model(
                config, P[kind], prefs[kind], tok, args.rm_steps if r == 1 else args.rm_steps_later, args.rm_batch,
                args.rm_lr, seed=rs + 4, time_budget_s=share("reward_models") / 2, log=log,
                aux_weight=args.safety_aux_weight if kind == "safety" else 0.0, name=f"{kind} RM V{r}")
            rm_metrics[kind].append({k: v for k, v in m.items() if k != "history"} | {"round": r,
                                                                                       "history": m["history"]})
        rms = {k: reward_model.RewardModel(config, P[k]) for k in P}
        after = {k: accuracy(rms[k], tok, newest[k]) for k in rms}
        scorer = ppo.CombinedReward(rms["safety"], rms["helpfulness"])
        stage_s[f"reward_models_{r}"] = time.time() - t0
        log(f"round {r}: RM accuracy on the newest policy's held-out pairs, before -> after retraining: "
            + ", ".join(f"{k} {_pct(before[k])} -> {_pct(after[k])}" for k in rms))

        # 3. the sampling temperature for this policy (Fig. 8), and 4. rejection sampling over every round's samples
        t0 = time.time()
        every = max(1, len(rs_prompts) // args.temperature_prompts)           # ordinary, unsafe and borderline alike
        sweep = rlhf.temperature_sweep(model, scorer, tok, rs_prompts[::every][:args.temperature_prompts],
                                       [float(t) for t in args.temperatures.split(",")], args.rs_k, rs + 5, mnt)
        samples = rlhf.sample_replies(model, tok, [p.dialog for p in rs_prompts], args.rs_k, rs + 6, sweep["best"],
                                      max_new_tokens=mnt, time_budget_s=share("rs_sampling"), log=log)
        for bag, s in zip(bags, samples):
            bag.extend(s)
        kept = [i for i, bag in enumerate(bags) if bag]
        scores = rlhf.score_bags(scorer, tok, [rs_prompts[i] for i in kept], [bags[i] for i in kept])
        examples = rlhf.rejection_sampling_examples([rs_prompts[i] for i in kept], [bags[i] for i in kept], scores,
                                                    tok)
        best = [bags[i][int(np.argmax(s))] for i, s in zip(kept, scores)]
        picked = {"quality": float(np.mean([preferences.true_quality(rs_prompts[i], b) for i, b in zip(kept, best)])),
                  "violations": float(np.mean([safety.check_reply(rs_prompts[i], b) == "violation"
                                               for i, b in zip(kept, best) if rs_prompts[i].tag == "unsafe"] or [0]))}
        stage_s[f"rs_sampling_{r}"] = time.time() - t0
        t0 = time.time()
        policy, rs_m = trainer.finetune(config, start, gatt.make_batches(examples, 8, rs + 7), args.rs_steps,
                                        args.rs_lr, seed=rs + 7, time_budget_s=share("rs_finetune"), log=log,
                                        name=f"rejection sampling V{r}")
        stage_s[f"rs_finetune_{r}"] = time.time() - t0
        round_out = {"round": r, "temperature": sweep, "rs": {k: v for k, v in rs_m.items() if k != "history"}
                     | {"prompts": len(kept), "samples_per_prompt": len(bags[kept[0]]), "picked": picked}}

        # 5. PPO on top of rejection sampling, in the last round
        if r == args.rounds:
            t0 = time.time()
            policies["rejection_sampling"], reports["rejection_sampling"] = evaluate(
                f"V{r} rejection sampling", config, policy, sft, start, tok, ev, seed + 5, mnt)
            stage_s["evaluation"] += time.time() - t0
            policy, runs = run_ppo(config, policy, start, scorer, tok, ppo_prompts, settings, args, share, stage_s)
            round_out["ppo_runs"] = runs

        # 6. evaluation of this round's policy
        t0 = time.time()
        name = "ppo" if r == args.rounds else f"V{r}"
        policies[name], reports[name] = evaluate(f"V{r}", config, policy, sft, start, tok, ev, seed + 5, mnt)
        stage_s["evaluation"] += time.time() - t0
        rounds.append(round_metrics(r, before, after, newest, policies[name], reports[name]) | round_out)

    # every policy's replies scored by the final reward models; best of N (Fig. 7) with the SFT model ---------
    for name, rep in reports.items():
        rlhf.score_report(rep, tok, ev["ordinary"], rms["helpfulness"], ev["unsafe"], ev["borderline"], rms["safety"])
        policies[name] = rep.to_json() | policies[name] | {"quality": rep.mean_quality}
    for row in rounds:
        row["mean_reward"] = policies["ppo" if row["round"] == args.rounds else f"V{row['round']}"]["mean_reward"]
    t0 = time.time()
    bon_prompts = ev["ordinary"][:args.best_of_prompts]
    bon_replies = rlhf.sample_replies(Llama(config, sft), tok, [p.dialog for p in bon_prompts], args.best_of, seed + 2,
                                      max_new_tokens=mnt, time_budget_s=share("best_of_n"), log=log)
    bon_prompts = bon_prompts[:len(bon_replies)]
    bon_rewards = rms["helpfulness"].score_samples(tok, [p.dialog for p in bon_prompts], bon_replies)
    best_of_n = rlhf.best_of_n(bon_prompts, bon_replies, bon_rewards, ns=(1, 2, 4, 8, 16, 32, 64))
    stage_s["best_of_n"] = time.time() - t0

    # write ---------------------------------------------------------------------------------------------------
    final = policies["ppo"]
    policies = {k: policies[k] for k in ("sft", "safety_sft", "rejection_sampling", "ppo")} | {"final": final}
    for kind, d in (("helpfulness", dirs["helpfulness"]), ("safety", dirs["safety"])):
        reward_model.save_reward_model(d, config, P[kind], tokenizer_path=tok_path, force=args.force)
        stem = "preferences" if kind == "helpfulness" else "safety_preferences"
        preferences.write_preferences(d / f"{stem}_train.jsonl", prefs[kind], force=True)
        preferences.write_preferences(d / f"{stem}_heldout.jsonl", heldout[kind], force=True)
        write_json(d / "metrics.json", {"rounds": rm_metrics[kind], "noise": args.noise,
                                        "thresholds": list(help_ann.thresholds), "temperatures": [1.0, 1.3],
                                        "margins": reward_model.MARGINS, "n_pairs": len(prefs[kind]),
                                        "aux_weight": args.safety_aux_weight if kind == "safety" else 0.0,
                                        "from": "tiny random" if args.tiny else "tinyworld-chat + safety SFT"})
    save_model(dirs["policy"], config, final_weights(policy), tokenizer_path=tok_path,
               chat_template=LLAMA2_CHAT_TEMPLATE, force=args.force)
    write_json(dirs["policy"] / "metrics.json", {"safety_sft": sft_metrics, "rounds": rounds})
    write_eval(dirs["policy"], args, settings, rms, tok, heldout, policies, reports, rounds, ev, best_of_n, stage_s,
               sft_metrics,
               help_ann, t_start)
    write_model_cards(dirs)
    log(f"wrote {', '.join(str(d) for d in dirs.values())} in {(time.time() - t_start) / 60:.1f} min")
    return 0


def final_weights(policy: dict) -> dict:
    return {k: v for k, v in policy.items() if k != ppo.VALUE}


def run_ppo(config, init, start, scorer, tok, prompts, settings, args, share, stage_s):
    """PPO from the last rejection-sampling model with the combined reward, whitened with the statistics of that
    model's own samples; then the shorter runs at the sweep betas. Returns (the main run's policy, all runs)."""
    t0 = time.time()
    first = [s[0] for s in rlhf.sample_replies(Llama(config, init), tok, [p.dialog for p in prompts], 1,
                                               args.seed + 8, 1.0, settings.max_new_tokens)]
    combined = scorer.score_prompts(tok, prompts, first)
    whiten = (float(combined.mean()), float(combined.std() + 1e-6))
    betas = [args.beta] + [float(b) for b in args.sweep_betas.split(",") if b.strip()]
    runs, policy = [], None
    for i, beta in enumerate(betas):
        s = ppo.PPOSettings(**{**settings.__dict__, "beta": beta})
        weights, hist = ppo.ppo_train(config, init, start, scorer, tok, prompts, s,
                                      args.ppo_iterations if i == 0 else args.sweep_iterations, whiten, seed=args.seed,
                                      time_budget_s=share("ppo" if i == 0 else "ppo_sweep"), log=log)
        runs.append({"beta": beta, "iterations": len(hist), "history": hist, "whiten": whiten})
        stage_s[f"ppo_beta_{beta:g}"] = hist[-1]["time_s"]
        if i == 0:
            policy = weights
    stage_s["ppo_total"] = time.time() - t0
    return policy, runs


def round_metrics(r, before, after, newest, extra, rep) -> dict:
    """The per-round row of rlhf_eval.json: staleness of both reward models, the round's policy on held-out prompts."""
    return {"round": r, "rm_accuracy_newest_before": before["helpfulness"],
            "rm_accuracy_newest_after": after["helpfulness"],
            "safety_rm_accuracy_newest_before": before["safety"], "safety_rm_accuracy_newest_after": after["safety"],
            "newest_pairs": {k: len(v) for k, v in newest.items()},
            **{k: getattr(rep, k) for k in ("violation_rate", "refusal_rate", "false_refusal_rate", "answer_accuracy",
                                            "adherence", "grammar", "kl_from_sft_per_token", "kl_from_start_per_token",
                                            "n", "outcomes")},
            "quality": rep.mean_quality, "unseen_answer_accuracy": extra["unseen_answer_accuracy"]}


def threshold_precision_recall(rm, tok, prefs, threshold=ppo.SAFETY_THRESHOLD) -> dict:
    """How well sigmoid(safety score) < threshold finds the violations among the held-out safety replies (the paper:
    precision 0.89, recall 0.55 at 0.15 on its Meta Safety test set)."""
    seen = {}
    for p in prefs:
        for reply, label in zip((p.chosen, p.rejected), p.labels):
            seen[(json.dumps(p.dialog), reply)] = (p.dialog, reply, label)
    dialogs, replies, labels = zip(*seen.values())
    flagged = ppo.sigmoid(rm.score(tok, list(dialogs), list(replies))) < threshold
    unsafe = np.array([lab == "violation" for lab in labels])
    return {"threshold": threshold, "replies": len(labels), "violations": int(unsafe.sum()), "flagged": int(flagged.sum()),
            "flagged_violations": int((flagged & unsafe).sum()),
            "precision": float((flagged & unsafe).sum() / flagged.sum()) if flagged.any() else None,
            "recall": float((flagged & unsafe).sum() / unsafe.sum()) if unsafe.any() else None}


def write_eval(d, args, settings, rms, tok, heldout, policies, reports, rounds, ev, best_of_n, stage_s, sft_metrics, ann,
               t0):
    """rlhf_eval.json: everything chapters 09-10 print."""
    acc = lambda kind, pairs: reward_model.accuracy_by_degree(rms[kind], tok, pairs)
    examples = [{"prompt": p.dialog, "answer": p.answer, **{k: reports[k].replies["ordinary"][i] for k in reports}}
                for i, p in enumerate(ev["ordinary"][:24])]
    safety_examples = [{"prompt": p.dialog, "tag": p.tag, "secret": list(p.secret),
                        **{k: reports[k].replies[p.tag][i] for k in reports}}
                       for tag in ("unsafe", "borderline") for i, p in enumerate(ev[tag][:12])]
    out = {
        "rm_accuracy_by_degree": acc("helpfulness", heldout["helpfulness"]), "rm_pairs": len(heldout["helpfulness"]),
        "safety_rm_accuracy_by_degree": acc("safety", heldout["safety"]),
        "helpfulness_rm_on_safety_pairs": acc("helpfulness", heldout["safety"]),
        "safety_rm_on_helpfulness_pairs": acc("safety", heldout["helpfulness"]),
        "safety_rm_pairs": len(heldout["safety"]),
        "safety_threshold": threshold_precision_recall(rms["safety"], tok, heldout["safety"]),
        "best_of_n": best_of_n, "policies": policies,
        "unseen_answer_accuracy": {k: v["unseen_answer_accuracy"] for k, v in policies.items()},
        "rounds": rounds, "ppo_runs": rounds[-1]["ppo_runs"], "whiten": dict(zip(("mean", "std"),
                                                                                   rounds[-1]["ppo_runs"][0]["whiten"])),
        "examples": examples, "safety_examples": safety_examples,
        "fig14": {k: reports[k].scores for k in ("sft", "safety_sft", "ppo")},
        "safety_sft": {k: v for k, v in sft_metrics.items() if k != "history"},
        "settings": {"annotator": {"noise": ann.noise, "thresholds": list(ann.thresholds)},
                     "quality_weights": preferences.QUALITY_WEIGHTS, "margins": reward_model.MARGINS,
                     "safety_aux_weight": args.safety_aux_weight, "safety_threshold": ppo.SAFETY_THRESHOLD,
                     "rounds": args.rounds, "pref_k": args.pref_k, "rs_k": args.rs_k, "rs_prompts": args.rs_prompts,
                     "ppo": settings.__dict__},
        "stage_time_s": stage_s, "n_eval": len(ev["ordinary"]), "n_safety_eval": len(ev["unsafe"]),
        "seed": args.seed, "tiny": args.tiny, "total_time_s": time.time() - t0}
    write_json(d / "rlhf_eval.json", out)


# The paper's Table 8: each reward model on its own Meta test set, by degree (the overall is Table 7's average).
PAPER_TABLE8 = {"helpfulness": {"significantly better": 80.7, "better": 67.5, "slightly better": 60.9,
                                "negligibly better": 54.7, "overall": 63.2},
                "safety": {"significantly better": 94.3, "better": 76.3, "slightly better": 65.7,
                           "negligibly better": 55.3, "overall": 64.5}}


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _rate(p, n):
    """A rate with its n and standard error, as every printed rate carries them (evaluate.rate)."""
    return "-" if p is None or not n else str(rate(round(p * n), n))


def write_model_cards(dirs) -> None:
    """README.md beside the three models, from the rlhf_eval.json and metrics.json this script wrote."""
    ev = json.loads((dirs["policy"] / "rlhf_eval.json").read_text())
    n_rounds = len(ev["rounds"])
    ours = (f"**Ours, not the paper's:** the world and its prompts (questions about a synthetic world's facts; the "
            f"safety risk is a secret the dialogue says to keep), simulated annotators (the world's truth plus noise, "
            f"our weights and degree thresholds), 5.2M parameters, {n_rounds} rounds, thousands of comparisons instead "
            f"of ~1.4M. **The paper's:** the two reward models initialised from the chat model, the binary ranking "
            f"loss with its small margin (Table 27), a safety auxiliary loss (appendix A.3.4; its formula is ours), "
            f"the combined reward with the 0.15 threshold and whitening, rejection sampling from the best samples of "
            f"every round, PPO with beta 0.01 on top in the last round (sec. 3.2.2-3.2.3, 4.2).\n")

    def degree_rows(acc, kind):
        return "".join(f"| {d} | {_rate(acc[d]['accuracy'], acc[d]['pairs'])} | {PAPER_TABLE8[kind][d]:.1f}% |\n"
                       for d in (*preferences.DEGREES, "overall"))

    table = ("| annotator's degree | accuracy (n = held-out pairs of that degree) | the paper's, same model on its own "
             "test set (Table 8) |\n|---|---:|---:|\n")
    for kind, title, key, other in (
            ("helpfulness", "tinyworld-rm: the helpfulness reward model", "rm_accuracy_by_degree",
             "safety_rm_on_helpfulness_pairs"),
            ("safety", "tinyworld-safety-rm: the safety reward model", "safety_rm_accuracy_by_degree",
             "helpfulness_rm_on_safety_pairs")):
        m = json.loads((dirs[kind] / "metrics.json").read_text())
        last = m["rounds"][-1]
        thr = ev["safety_threshold"]
        extra = (f"\nThe PPO reward uses this model's score when sigmoid(score) < {thr['threshold']}: on the held-out "
                 f"safety replies ({thr['replies']}, {thr['violations']} violations) that flags violations with "
                 f"precision {_rate(thr['precision'], thr['flagged'])} and recall "
                 f"{_rate(thr['recall'], thr['violations'])} (the paper: precision 0.89, recall 0.55).\n"
                 if kind == "safety" else "")
        write_text(dirs[kind] / "README.md", force=True, text=
                   f"# {title} (Llama 2 paper, sec. 3.2.2)\n\n"
                   f"The RLHF starting policy's trunk (tinyworld-chat after safety SFT) plus a scalar head on the last "
                   f"token (`score.weight`, the layout of transformers' LlamaForSequenceClassification), trained by "
                   f"`make rlhf` over {n_rounds} rounds on {m['n_pairs']} comparisons of a simulated "
                   f"{kind} annotator (`{'preferences' if kind == 'helpfulness' else 'safety_preferences'}_train.jsonl`"
                   f"), each round continuing from the last ({last['steps']} steps at lr {last['lr']} in the last), "
                   f"with the paper's small margin"
                   f"{' and the safety loss, weight %g' % m['aux_weight'] if m['aux_weight'] else ''}.\n\n"
                   f"Accuracy on held-out {kind} pairs (held-out prompts, the samples of every round's policy):\n\n"
                   + table + degree_rows(ev[key], kind)
                   + f"\nThe other reward model on the same pairs: "
                     f"{_rate(ev[other]['overall']['accuracy'], ev[other]['overall']['pairs'])} overall, "
                     f"{_rate(ev[other]['significantly better']['accuracy'], ev[other]['significantly better']['pairs'])}"
                     f" on \"significantly better\" pairs.\n"
                   + extra + "\n" + ours)
    pol = ev["policies"]
    n = pol["final"]["n"]
    prow = "".join(f"| {name} | {_rate(p['answer_accuracy'], n['ordinary'])} | {_pct(p['adherence'])} | "
                   f"{_rate(p['violation_rate'], n['unsafe'])} | {_rate(p['false_refusal_rate'], n['borderline'])} | "
                   f"{p['mean_quality']:.2f} | {p['kl_from_sft_per_token']:.3f} |\n"
                   for name, p in pol.items() if name != "final")
    write_text(dirs["policy"] / "README.md", force=True, text=
               "# tinyworld-rlhf: safety SFT, rounds of rejection sampling, PPO (Llama 2 paper, sec. 3.2.3, 4.2)\n\n"
               f"From tinyworld-chat: a safety SFT stage ({ev['safety_sft']['demonstrations']} safe demonstrations), "
               f"then {n_rounds} rounds (RLHF-V1..V{n_rounds}), each with new comparisons of the newest policy's "
               f"samples, both reward models retrained, and rejection sampling from the best samples of every round at "
               f"the round's best temperature; PPO (beta {ev['ppo_runs'][0]['beta']}, "
               f"{ev['ppo_runs'][0]['iterations']} iterations) with the combined reward on top in the last round. "
               f"Made by `make rlhf` in {ev['total_time_s'] / 60:.0f} min. Chapter 11 adds Ghost Attention to it "
               f"(`tinyworld-gatt`).\n\n"
               f"On held-out prompts, greedy replies ({n['ordinary']} ordinary prompts for answers and adherence, "
               f"{n['unsafe']} unsafe ones for violations, {n['borderline']} borderline ones for false refusals; a "
               f"rate p on n prompts has a standard error sqrt(p(1-p)/n)); KL from tinyworld-chat per token on replies "
               f"sampled at temperature 1:\n\n"
               f"| policy | exact answer (n = {n['ordinary']}) | adherence (n = {n['ordinary']}) | violations "
               f"(n = {n['unsafe']}) | false refusals (n = {n['borderline']}) | true quality | KL from SFT |\n"
               "|---|---:|---:|---:|---:|---:|---:|\n" + prow + "\n" + ours)


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
