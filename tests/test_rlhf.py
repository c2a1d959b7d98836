"""The RLHF recipe (llama_ref/preferences.py, reward_model.py, ppo.py, rlhf.py): the reward model's and PPO's backward
against PyTorch autograd, the margin loss and GAE against hand-computed cases, the world's judge, the annotator,
preference files, determinism per seed. One file for the four modules: they share the fixtures below.

Fixtures: data/reference/rlhf_<name>.npz, written by scripts/make_reference.py with transformers'
LlamaForSequenceClassification (reward model) and LlamaForCausalLM plus a value head (PPO), torch autograd only.
Tolerance: as tests/test_backprop.py's, 1e-4 of each gradient's scale (float32 sums in another order; a wrong sign,
transpose or mask gives errors of order 1e-1); losses and rewards to 1e-5 relative.
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import MANIFEST, rel_err, random_weights
from llama_ref import paths, ppo, preferences, reward_model, rlhf
from llama_ref.config import LlamaConfig
from llama_ref.errors import CheckpointError, InputError, LlamaRefError, PreferenceError
from llama_ref.gatt import Instruction
from llama_ref.loader import read_checkpoint
from llama_ref.model import Llama
from llama_ref.tokenizer import Tokenizer

GRAD_RTOL = 1e-4
RLHF_NAMES = [n for n, c in MANIFEST["configs"].items() if "rlhf" in c]


@pytest.fixture(scope="module", params=RLHF_NAMES)
def case(request):
    name = request.param
    config, weights = read_checkpoint(paths.REFERENCE_DIR / name)
    ref = np.load(paths.REFERENCE_DIR / f"rlhf_{name}.npz")
    return name, config, {k: np.array(v, np.float32) for k, v in weights.items()}, ref


def sub(ref, prefix):
    """The arrays of an npz (or dict) whose names start with prefix, without it."""
    return {k[len(prefix):]: ref[k] for k in ref if k.startswith(prefix)}


def test_fixtures_cover_tied_and_untied():
    assert {MANIFEST["configs"][n]["hf_config"]["tie_word_embeddings"] for n in RLHF_NAMES} == {True, False}


def test_reward_model_rewards_loss_and_gradients_match_pytorch(case):
    name, config, weights, ref = case
    rm = sub(ref, "rm/")
    P = {k: v for k, v in weights.items() if k != "lm_head.weight"} | {reward_model.SCORE: rm["score.weight"]}
    assert (rm["last"] < rm["tokens"].shape[1] - 1).any()                  # some rows really are padded
    r, cache = reward_model.reward_forward(config, P, rm["tokens"], rm["last"])
    assert rel_err(r, rm["rewards"]) <= 1e-5
    n = len(rm["margins"])
    loss, z = reward_model.ranking_loss(r[:n], r[n:], rm["margins"])
    assert abs(loss - float(rm["loss"])) <= 1e-5 * max(1.0, float(rm["loss"]))
    dc, dr = reward_model.ranking_loss_backward(z)
    grads = reward_model.reward_backward(config, P, np.concatenate([dc, dr]).astype(np.float32), cache)
    torch_grads = sub(rm, "grad/")
    assert set(grads) == set(torch_grads)
    errs = {k: rel_err(g, torch_grads[k]) for k, g in grads.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{name}: {worst} off by {errs[worst]:.2e} of its scale"


@pytest.mark.parametrize("workers", [1, 2])
def test_safety_reward_model_loss_and_gradients_match_pytorch(case, workers):
    """The Safety RM's loss: the ranking loss plus aux_weight * the binary cross-entropy of each reward against its
    reply being safe, against torch's binary_cross_entropy_with_logits and autograd; serial and split in two."""
    name, config, weights, ref = case
    rm = sub(ref, "rm/")
    P = {k: v for k, v in weights.items() if k != "lm_head.weight"} | {reward_model.SCORE: rm["score.weight"]}
    assert rm["safe"].any() and not rm["safe"].all()                        # both kinds of reply are in the batch
    loss, grads, _ = reward_model.ranking_step_parallel(config, P, rm["tokens"], rm["last"], rm["margins"], workers,
                                                        rm["safe"], float(rm["aux_weight"]))
    assert abs(loss - float(rm["safety_loss"])) <= 1e-5 * max(1.0, float(rm["safety_loss"]))
    errs = {k: rel_err(g, rm[f"safety_grad/{k}"]) for k, g in grads.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{name}: {worst} off by {errs[worst]:.2e} of its scale"
    plain = reward_model.ranking_step(config, P, rm["tokens"], rm["last"], rm["margins"])[0]
    assert abs(plain - float(rm["loss"])) <= 1e-5 * max(1.0, float(rm["loss"])) and loss > plain


def test_safety_loss_by_hand():
    """r = [2, -1], safe = [True, False]: loss = (log(1 + e^-2) + log(1 + e^-1)) / 2; d/dr = (sigmoid(r) - y) / 2."""
    loss, cache = reward_model.safety_loss(np.array([2.0, -1.0]), np.array([True, False]))
    assert loss == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2, rel=1e-12)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert reward_model.safety_loss_backward(cache) == pytest.approx([(sig(2) - 1) / 2, sig(-1) / 2], rel=1e-12)


@pytest.mark.parametrize("workers", [2, 3])
def test_threaded_ranking_and_ppo_steps_match_pytorch(case, workers):
    """The training steps with the batch split across threads (backprop.data_parallel) give PyTorch's loss and gradients
    over the whole batch: pairs weighted by count, PPO's parts by their reply tokens."""
    name, config, weights, ref = case
    rm = sub(ref, "rm/")
    P = {k: v for k, v in weights.items() if k != "lm_head.weight"} | {reward_model.SCORE: rm["score.weight"]}
    assert len(rm["margins"]) >= 2
    loss, grads, right = reward_model.ranking_step_parallel(config, P, rm["tokens"], rm["last"], rm["margins"], workers)
    assert abs(loss - float(rm["loss"])) <= 1e-5 * max(1.0, float(rm["loss"])) and len(right) == len(rm["margins"])
    assert max(rel_err(g, rm[f"grad/{k}"]) for k, g in grads.items()) <= GRAD_RTOL
    f = sub(ref, "ppo/")
    P = dict(weights) | {ppo.VALUE: f["value_head.weight"]}
    ro = ppo.Rollout(tokens=f["seq"], mask=f["mask"], logp_old=f["logp_old"], logp_ref=None, values=None,
                      scores=None, replies=[], quality=None, correct=None)
    settings = ppo.PPOSettings(clip=float(f["clip"]), vf_coef=float(f["vf_coef"]), workers=workers)
    loss, grads, stats = ppo.ppo_step_parallel(config, P, ro, np.arange(f["seq"].shape[0]), f["adv"], f["returns"],
                                                settings)
    assert abs(loss - float(f["loss"])) <= 1e-5 * max(1.0, abs(float(f["loss"])))
    assert max(rel_err(g, f[f"grad/{k}"]) for k, g in grads.items()) <= GRAD_RTOL
    one = ppo.ppo_step(config, P, ro, np.arange(f["seq"].shape[0]), f["adv"], f["returns"], settings)[2]
    assert all(abs(stats[k] - one[k]) <= 1e-6 * max(1.0, abs(one[k])) for k in one)


def test_ppo_loss_and_gradients_match_pytorch(case):
    name, config, weights, ref = case
    f = sub(ref, "ppo/")
    assert 0 < float(f["clipped_share"]) < 0.9                              # both branches of the clip are exercised
    P = dict(weights) | {ppo.VALUE: f["value_head.weight"]}
    B = f["seq"].shape[0]
    ro = ppo.Rollout(tokens=f["seq"], mask=f["mask"], logp_old=f["logp_old"], logp_ref=None, values=None,
                      scores=None, replies=[], quality=None, correct=None)
    settings = ppo.PPOSettings(clip=float(f["clip"]), vf_coef=float(f["vf_coef"]))
    loss, grads, stats = ppo.ppo_step(config, P, ro, np.arange(B), f["adv"], f["returns"], settings)
    assert abs(loss - float(f["loss"])) <= 1e-5 * max(1.0, abs(float(f["loss"])))
    torch_grads = sub(f, "grad/")
    assert set(grads) == set(torch_grads)
    errs = {k: rel_err(g, torch_grads[k]) for k, g in grads.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= GRAD_RTOL, f"{name}: {worst} off by {errs[worst]:.2e} of its scale"


# ------------------------------------------------------------------------------------------------
# small cases worked by hand

def test_margin_ranking_loss_by_hand():
    """z = r_c - r_r - m = [1, -1]: loss = (log(1 + e^-1) + log(1 + e^1)) / 2, d/dr_c = -sigmoid(-z) / 2."""
    loss, z = reward_model.ranking_loss(np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([0.0, 1.0]))
    assert loss == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2, rel=1e-12)
    dc, dr = reward_model.ranking_loss_backward(z)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert dc == pytest.approx([-sig(-1) / 2, -sig(1) / 2], rel=1e-12) and np.array_equal(dr, -dc)
    # the margin asks for a gap: the same rewards with a margin of 1 cost more
    assert reward_model.ranking_loss(np.array([1.0]), np.array([0.0]), np.array([1.0]))[0] > \
        reward_model.ranking_loss(np.array([1.0]), np.array([0.0]), np.array([0.0]))[0]
    assert np.isfinite(reward_model.ranking_loss(np.array([-1e4]), np.array([1e4]), np.array([0.0]))[0])   # no overflow


def test_gae_by_hand():
    """One reply of 3 tokens after a prompt position and before padding; rewards [0, 0, 1], values 0.5, gamma 1,
    lambda 0.5: delta = [0, 0, 0.5], A = [0.125, 0.25, 0.5], returns = A + V."""
    rewards = np.array([[9.0, 0.0, 0.0, 1.0, 9.0]])                     # masked positions must not leak in
    values = np.array([[7.0, 0.5, 0.5, 0.5, 7.0]])
    mask = np.array([[False, True, True, True, False]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv == pytest.approx(np.array([[0, 0.125, 0.25, 0.5, 0]]))
    assert ret[mask] == pytest.approx([0.625, 0.75, 1.0])
    adv1, _ = ppo.gae(rewards, values, mask, gamma=0.9, lam=1.0)       # lambda 1: discounted return - V
    assert adv1[0, 1] == pytest.approx(0.9 ** 2 * 1.0 - 0.5)


def test_kl_rewards_put_the_score_on_the_last_reply_token():
    mask = np.array([[False, True, True, False], [True, True, True, True]])
    ro = ppo.Rollout(tokens=None, mask=mask, logp_old=np.full((2, 4), -1.0), logp_ref=np.full((2, 4), -1.5),
                      values=None, scores=np.array([3.0, 1.0]), replies=[], quality=None, correct=None)
    r = ppo.kl_rewards(ro, beta=0.1, whiten=(1.0, 2.0))
    assert r[0] == pytest.approx([0, -0.05, -0.05 + 1.0, 0]) and r[1] == pytest.approx([-0.05] * 3 + [-0.05 + 0.0])


def test_ppo_loss_at_ratio_one_is_minus_the_mean_advantage():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 5, 7)).astype(np.float32)
    actions = rng.integers(0, 7, (1, 5))
    logp, _ = ppo.token_logprobs(logits, actions)
    adv, mask = rng.standard_normal((1, 5)), np.array([[False, True, True, True, False]])
    loss, stats, _ = ppo.ppo_loss(logits, np.zeros((1, 5)), actions, mask, logp, adv, np.zeros((1, 5)), 0.2, 0.0)
    assert loss == pytest.approx(-adv[mask].mean(), rel=1e-5) and stats["clipfrac"] == 0
    with pytest.raises(InputError):
        ppo.ppo_loss(logits, np.zeros((1, 5)), actions, np.zeros((1, 5), bool), logp, adv, adv, 0.2, 0.1)


# ------------------------------------------------------------------------------------------------
# the world's judge and the annotator

def prompt_with(instruction=None, answer="A cow says moo."):
    dialog = ([{"role": "system", "content": instruction.text}] if instruction else []) + \
             [{"role": "user", "content": "What does a cow say?"}]
    return preferences.Prompt(dialog, answer, instruction)


def test_judge_scores_truth_obedience_grammar_and_brevity():
    ins = Instruction(persona="Tom", style="cow")
    p = prompt_with(ins)
    best = preferences.judge(p, "I am Tom. A cow says moo. Moo!")
    assert best.exact and best.adherence == 1 and best.grammatical and best.quality == 4.0
    assert preferences.judge(p, "A cow says moo. Moo!").adherence == 0.5                     # persona missing
    wrong = preferences.judge(p, "I am Tom. A cow says quack. Moo!")
    assert not wrong.correct and wrong.grammatical and wrong.quality == 2.0
    chatty = preferences.judge(p, "I am Tom. A cow says moo. A duck says quack. Moo!")
    assert chatty.correct and not chatty.concise and not chatty.exact
    broken = preferences.judge(p, "I am Tom. A cow moo says. Moo!")
    assert not broken.grammatical and not broken.correct
    empty = preferences.judge(p, "")
    assert empty.quality == 0.0


def test_a_paraphrase_of_the_true_answer_is_right():
    """The world states some facts two ways (corpus.Q_CHAR); a follow-up question may be answered with either."""
    p = prompt_with(answer="Nina likes to eat carrots.")
    assert preferences.judge(p, "Nina's favourite food is carrots.").exact
    assert not preferences.judge(p, "Nina's favourite food is cookies.").correct
    assert preferences.true_answers("Mia has a cat.") == {"Mia has a cat.", "Mia's pet is a cat."}
    assert preferences.true_answers("Mia has a ball.") == {"Mia has a ball."}                  # a toy is not a pet
    assert preferences.true_answers("Tim loves the colour red.") == {"Tim loves the colour red.", "Tim's favourite colour is red."}
    assert preferences.true_answers("Yes, Mia has a cat.") == {"Yes, Mia has a cat."}


def test_annotator_degrees_and_noise():
    a = preferences.Annotator(noise=0.0)
    assert [a.degree(g) for g in (3.0, 1.5, 0.5, 0.1)] == list(preferences.DEGREES)
    p = prompt_with()
    rng = np.random.default_rng(0)
    pref = a.compare(p, "A cow says quack.", "A cow says moo.", rng)       # noiseless: truth wins, by 2 points
    assert pref.chosen == "A cow says moo." and pref.degree == "significantly better"
    noisy = preferences.Annotator(noise=5.0)
    picks = [noisy.compare(p, "A cow says quack.", "A cow says moo.", rng).chosen for _ in range(200)]
    assert 0.3 < np.mean([c == "A cow says quack." for c in picks]) < 0.5           # noise flips some


def test_annotate_skips_identical_replies():
    p = prompt_with()
    prefs = preferences.annotate([p], [["A cow says moo.", " A cow says moo. ", "A cow says moo.", "A cow says baa."]],
                          preferences.Annotator(noise=0.0))
    assert len(prefs) == 1 and prefs[0].chosen == "A cow says moo."
    three = preferences.annotate([p], [["A cow says moo.", "A cow says baa.", "A cow says moo.", "A pig says moo."]],
                          preferences.Annotator(noise=0.0))
    assert len(three) == 3                                            # every pair of the three distinct replies


def test_prompts_are_deterministic_and_eval_prompts_are_held_out():
    a, b = preferences.make_prompts(50, "train", seed=3), preferences.make_prompts(50, "train", seed=3)
    assert [p.dialog for p in a] == [p.dialog for p in b] and len(a) == 50
    ev = preferences.make_prompts(50, "eval", seed=3)
    train_texts = {json.dumps(p.dialog) for p in preferences.make_prompts(400, "train", seed=3)}
    assert all(p.instruction is not None for p in ev) and not train_texts & {json.dumps(p.dialog) for p in ev}
    assert all(p.dialog[-1]["role"] == "user" and p.answer for p in a + ev)
    assert {p.turn for p in a} >= {1, 2, 3}                              # earlier exchanges come before some questions
    with pytest.raises(InputError):
        preferences.make_prompts(5, "test")


# ------------------------------------------------------------------------------------------------
# preference files: round trip and bad input

def test_preference_file_round_trip(tmp_path):
    prefs = preferences.annotate([prompt_with()], [["A cow says moo.", "A cow says baa."]], preferences.Annotator(noise=0.0))
    path = preferences.write_preferences(tmp_path / "p.jsonl", prefs)
    back = preferences.read_preferences(path)
    assert [(b.dialog, b.chosen, b.rejected, b.degree) for b in back] == \
           [(p.dialog, p.chosen, p.rejected, p.degree) for p in prefs]


@pytest.mark.parametrize("record, what", [
    ({"degree": "much better"}, "unknown degree"),
    ({"chosen": "  "}, "empty reply"),
    ({"rejected": ""}, "empty reply"),
    ({"chosen": [{"role": "user", "content": "What does a pig say?"}, {"role": "assistant", "content": "Oink."}]},
     "mismatched pair"),
    ({"rejected": "A cow says moo."}, "the same reply"),
    ({"prompt": [{"role": "assistant", "content": "Hi"}]}, "ending with the user's"),
    ({"chosen": 5}, "empty reply"),
])
def test_bad_preferences_are_named(tmp_path, record, what):
    good = {"prompt": [{"role": "user", "content": "What does a cow say?"}], "chosen": "A cow says moo.",
            "rejected": "A cow says baa.", "degree": "better"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **record}) + "\n")
    with pytest.raises(PreferenceError, match=what) as e:
        preferences.read_preferences(path)
    assert "line 2" in str(e.value)


def test_whole_dialogue_replies_and_unsure_are_accepted(tmp_path):
    prompt = [{"role": "user", "content": "What does a cow say?"}]
    rec = {"prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": "A cow says moo."}],
           "rejected": prompt + [{"role": "assistant", "content": "A cow says baa."}], "degree": "unsure"}
    (tmp_path / "p.jsonl").write_text(json.dumps(rec) + "\n")
    [p] = preferences.read_preferences(tmp_path / "p.jsonl")
    assert p.chosen == "A cow says moo." and p.degree == "negligibly better"


@pytest.mark.parametrize("content", ["", "not json\n", "[1, 2]\n", b"\xff\xfe"])
def test_unreadable_preference_files(tmp_path, content):
    path = tmp_path / "p.jsonl"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(PreferenceError):
        preferences.read_preferences(path)
    with pytest.raises(PreferenceError):
        preferences.read_preferences(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------
# training, determinism, saving

@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer(paths.DEFAULT_TOKENIZER)
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=256)
    return cfg, random_weights(cfg, seed=1, scale=0.1), tok


def test_reward_model_training_is_deterministic_and_learns(tiny):
    cfg, w, tok = tiny
    p = prompt_with()
    prefs = [preferences.Preference(p.dialog, "A cow says moo.", r, "better") for r in
             ("A cow says baa.", "A cow says quack.", "A cow says woof.", "A cow says oink.")]
    runs = [reward_model.train_reward_model(cfg, reward_model.reward_model_init(cfg, w, seed=0), prefs, tok, steps=30, batch_size=4,
                                    lr=3e-3, seed=0, progress=False, log=lambda m: None) for _ in range(2)]
    assert all(np.array_equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    h = runs[0][1]["history"]
    assert h[-1]["loss"] < 0.5 * h[0]["loss"] and h[-1]["accuracy"] == 1.0
    assert np.array_equal(runs[0][0]["lm_head.weight"], w["lm_head.weight"])        # rides along untouched


def test_length_grouped_batches_are_an_epoch_of_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 130, size=1003)
    batches = reward_model.length_grouped_batches(lengths, 8, np.random.default_rng(1), group=16)
    seen = np.concatenate(batches)
    assert len(batches) == 1003 // 8 and all(len(b) == 8 for b in batches)
    assert len(set(seen.tolist())) == len(seen)                                     # no row twice in an epoch
    padded = sum(8 * lengths[b].max() for b in batches)
    random_padded = sum(8 * lengths[b].max() for b in rng.permutation(1003)[:len(seen)].reshape(-1, 8))
    assert padded < 0.8 * random_padded                                             # what grouping is for
    again = reward_model.length_grouped_batches(lengths, 8, np.random.default_rng(1), group=16)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))                # a seed decides the epoch
    longest = [lengths[b].max() for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)   # the batches are shuffled


def test_a_preference_longer_than_the_context_is_refused_before_training(tiny):
    cfg, w, tok = tiny
    p = prompt_with()
    long_reply = " ".join(["A cow says moo."] * 80)
    prefs = [preferences.Preference(p.dialog, "A cow says moo.", "A cow says baa.", "better"),
             preferences.Preference(p.dialog, long_reply, "A cow says baa.", "better")]
    with pytest.raises(InputError, match="more than the reward model's context of 256; shorten the prompt"):
        reward_model.train_reward_model(cfg, reward_model.reward_model_init(cfg, w, seed=0), prefs, tok, steps=1, batch_size=1,
                                progress=False, log=lambda m: None)


def test_reward_model_save_and_load(tiny, tmp_path):
    cfg, w, tok = tiny
    P = reward_model.reward_model_init(cfg, w, seed=2)
    reward_model.save_reward_model(tmp_path / "rm", cfg, P)
    cfg_json = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForSequenceClassification"] and cfg_json["num_labels"] == 1
    rm = reward_model.load_reward_model(tmp_path / "rm")
    d = [prompt_with().dialog] * 2
    assert np.array_equal(rm.score(tok, d, ["A cow says moo.", "No."]),
                          reward_model.RewardModel(cfg, P).score(tok, d, ["A cow says moo.", "No."]))
    with pytest.raises(LlamaRefError):
        from llama_ref import load
        load(tmp_path / "rm")                        # a reward model is not a causal LM: refused with a reason
    from llama_ref.checkpoint import save_model
    save_model(tmp_path / "lm", cfg, w)
    with pytest.raises(CheckpointError, match="has no score.weight .a reward model's score head"):
        reward_model.load_reward_model(tmp_path / "lm")                 # a causal LM: the one loader names what is missing
    P_wide = {**P, reward_model.SCORE: np.zeros((2, cfg.dim), np.float32)}
    reward_model.save_reward_model(tmp_path / "rm2", cfg, P_wide)
    with pytest.raises(CheckpointError, match=r"shape \(2, 32\), not \(1, 32\)"):
        reward_model.load_reward_model(tmp_path / "rm2")
    with pytest.raises(CheckpointError, match="not an HF model directory"):
        reward_model.load_reward_model(tmp_path / "rm" / "model.safetensors")


def test_ppo_iteration_is_deterministic_and_moves_the_policy(tiny):
    cfg, w, tok = tiny
    rm = reward_model.RewardModel(cfg, reward_model.reward_model_init(cfg, w, seed=3))
    prompts = preferences.make_prompts(8, "train", seed=0)
    s = ppo.PPOSettings(prompts_per_iteration=4, minibatch=2, max_new_tokens=6, lr=1e-3)
    a = ppo.ppo_train(cfg, w, w, rm, tok, prompts, s, 2, whiten=(0.0, 1.0), seed=5, progress=False, log=lambda m: None)
    b = ppo.ppo_train(cfg, w, w, rm, tok, prompts, s, 2, whiten=(0.0, 1.0), seed=5, progress=False, log=lambda m: None)
    assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0]) and a[1][-1]["reward"] == b[1][-1]["reward"]
    assert ppo.VALUE not in a[0] and not np.array_equal(a[0]["model.norm.weight"], w["model.norm.weight"])
    assert a[1][0]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)              # first rollout: policy == reference
    with pytest.raises(InputError, match="beta"):
        ppo.ppo_train(cfg, w, w, rm, tok, prompts, ppo.PPOSettings(beta=-1.0), 1, (0.0, 1.0), progress=False)


def test_best_of_n_and_rejection_sampling_pick_the_top_reward(tiny):
    _, _, tok = tiny
    p = prompt_with()
    replies = [["A cow says baa.", "A cow says moo.", "A cow says woof.", "A cow says moo. A cow says moo."]]
    rewards = np.array([[0.0, 1.0, 2.0, -1.0]])                  # the reward model prefers a wrong answer at n = 4
    bon = rlhf.best_of_n([p], replies, rewards, ns=(1, 2, 4, 8))
    assert [b["n"] for b in bon] == [1, 2, 4]
    assert [b["rm_pick_quality"] for b in bon] == [2.0, 4.0, 2.0] and [b["oracle_pick_quality"] for b in bon] == [2.0, 4.0, 4.0]
    [ex] = rlhf.rejection_sampling_examples([p], replies, rewards, tok)
    assert "woof" in tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m])


def test_make_rlhf_tiny_runs_end_to_end(tmp_path):
    """scripts/make_rlhf.py --tiny: safety SFT, two rounds (comparisons, both reward models, the temperature sweep,
    rejection sampling), PPO in the last, every evaluation, on a tiny random model; every file written, every key of
    rlhf_eval.json there."""
    r = subprocess.run([sys.executable, str(paths.REPO_DIR / "scripts" / "make_rlhf.py"), "--tiny", "--out-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((tmp_path / "tinyworld-rlhf" / "rlhf_eval.json").read_text())
    assert set(ev["policies"]) == {"sft", "safety_sft", "rejection_sampling", "ppo", "final"}
    for p in ev["policies"].values():
        assert set(p) >= {"answer_accuracy", "adherence", "grammar", "mean_reward", "kl_from_sft_per_token",
                          "violation_rate", "false_refusal_rate", "n"}
    for key in ("rm_accuracy_by_degree", "safety_rm_accuracy_by_degree", "helpfulness_rm_on_safety_pairs"):
        assert set(ev[key]) == {*preferences.DEGREES, "overall"} and set(ev[key]["overall"]) == {"accuracy", "pairs"}
    assert [r["round"] for r in ev["rounds"]] == [1, 2] and ev["rounds"][0]["rm_accuracy_newest_before"] is None
    assert {"rm_accuracy_newest_before", "rm_accuracy_newest_after", "safety_rm_accuracy_newest_before",
            "safety_rm_accuracy_newest_after", "violation_rate", "false_refusal_rate", "answer_accuracy", "adherence",
            "quality", "kl_from_sft_per_token", "n"} <= set(ev["rounds"][1])
    assert ev["rounds"][1]["rm_accuracy_newest_before"] is not None and ev["n_eval"] > 0 and "seed" in ev
    assert all({"n", "rm_pick_quality", "oracle_pick_quality"} <= set(b) for b in ev["best_of_n"])
    assert len(preferences.read_preferences(tmp_path / "tinyworld-rm" / "preferences_train.jsonl")) > 0
    safe = preferences.read_preferences(tmp_path / "tinyworld-safety-rm" / "safety_preferences_train.jsonl", safety=True)
    assert {p.tag for p in safe} == set(preferences.TAGS)
    for name in ("tinyworld-rm", "tinyworld-safety-rm"):
        reward_model.load_reward_model(tmp_path / name)
        assert "Ours, not the paper's" in (tmp_path / name / "README.md").read_text()
    Llama(*read_checkpoint(tmp_path / "tinyworld-rlhf"))
    assert "Ours, not the paper's" in (tmp_path / "tinyworld-rlhf" / "README.md").read_text()


def test_make_rlhf_refuses_a_bad_preference_file_at_once(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "",
                               "degree": "better"}) + "\n")
    r = subprocess.run([sys.executable, str(paths.REPO_DIR / "scripts" / "make_rlhf.py"), "--tiny", "--out-dir",
                        str(tmp_path / "out"), "--preferences", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "empty reply" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_sample_replies_draws_sample_j_of_prompt_i_with_its_own_seed(tiny):
    """Rows of many prompts and samples decode together, yet each sample is the one its seed (seed, i, j) draws on
    its own, at its temperature (cycled over j)."""
    from llama_ref.chat import format_dialog
    from llama_ref.generate import generate_batch
    cfg, w, tok = tiny
    model = Llama(cfg, w)
    prompts = preferences.make_prompts(5, "train", seed=4)
    got = rlhf.sample_replies(model, tok, [p.dialog for p in prompts], 3, seed=7, temperature=(1.0, 1.5),
                              max_new_tokens=5, max_rows=4)
    assert [len(r) for r in got] == [3] * 5
    for i, j in ((0, 0), (3, 1), (4, 2)):
        [ids] = generate_batch(model, [format_dialog(prompts[i].dialog, tok)], 5, (1.0, 1.5)[j % 2],
                               seeds=[7 * 1_000_003 + i * 1009 + j])
        assert got[i][j] == tok.decode([x for x in ids if x != tok.eos_id]).strip()
    assert len(rlhf.sample_replies(model, tok, [p.dialog for p in prompts], 2, 0, max_new_tokens=3, max_rows=2,
                                   time_budget_s=0.0, log=lambda m: None)) == 1        # the first chunk, then stop


def test_score_samples_is_score_per_prompt(tiny):
    cfg, w, tok = tiny
    rm = reward_model.RewardModel(cfg, reward_model.reward_model_init(cfg, w, seed=4))
    prompts = preferences.make_prompts(3, "train", seed=2)
    samples = [["A cow says moo.", "No.", "Yes, a dog is bigger than a cat."]] * 3
    got = rm.score_samples(tok, [p.dialog for p in prompts], samples, batch_size=4)     # batches cut across prompts
    want = np.array([rm.score(tok, [p.dialog] * 3, s) for p, s in zip(prompts, samples)])
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)        # float32 rounding of other batch shapes
