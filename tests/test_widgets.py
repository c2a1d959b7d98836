"""widgets.py: the pure functions behind the explorers, checked against independent computations, and that each
widget builds and reacts to its knobs."""
import numpy as np
import pytest

from llama_ref import paths, widgets
from llama_ref.loader import read_checkpoint
from llama_ref.config import LlamaConfig
from llama_ref.errors import InputError
from llama_ref.model import Llama, apply_rope_meta, rope_freqs
from llama_ref.tokenizer import Tokenizer
from llama_ref.trace import Trace
from conftest import random_weights  # noqa: E402


@pytest.fixture(scope="module")
def gqa():
    config, weights = read_checkpoint(paths.REFERENCE_DIR / "gqa")
    ref = dict(np.load(paths.REFERENCE_DIR / "gqa.npz"))
    trace = Trace("*.attn.probs")
    Llama(config, weights).forward(ref["tokens"], trace=trace)
    return Llama(config, weights), ref, trace


@pytest.fixture(scope="module")
def tiny_lm():
    """A random model with the shipped tokenizer's vocabulary, for the generation stepper."""
    tok = Tokenizer(paths.DEFAULT_TOKENIZER)
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=64)
    w = random_weights(cfg, 0, scale=1.0)
    return Llama(cfg, w), tok


def _find(box, cls_name, description=None):
    """The first widget of a class (and description) inside nested boxes."""
    stack = [box]
    while stack:
        w = stack.pop(0)
        if type(w).__name__ == cls_name and (description is None or getattr(w, "description", None) == description):
            return w
        stack.extend(getattr(w, "children", ()))
    raise LookupError(f"no {cls_name} {description!r}")


# ------------------------------------------------------------------------------------------------
# attention

def test_attention_view_matches_transformers_probs(gqa):
    """The view is transformers' attention row (fixture), up to float32 rounding."""
    _, ref, trace = gqa
    v = widgets.attention_view(trace, layer=1, head=3, query=10)
    want = ref["layers.1.attn.probs"][0, 3]                    # (T, S) from transformers
    np.testing.assert_allclose(v["matrix"], want, atol=1e-5)
    np.testing.assert_allclose(v["row"], want[10], atol=1e-5)
    assert np.all(v["row"][11:] == 0) and v["row"].sum() == pytest.approx(1.0, abs=1e-5)
    order = np.argsort(-want[10])[:5]
    assert [i for i, _, _ in v["top"]] == list(order)
    p = want[10][want[10] > 0].astype(np.float64)
    assert v["entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-4)
    labels = [f"tok{i}" for i in range(want.shape[1])]
    v = widgets.attention_view(trace, 1, 3, 10, labels=labels)
    assert v["query_label"] == "tok10" and v["top"][0][1] == f"tok{order[0]}"


def test_attention_view_errors(gqa):
    _, _, trace = gqa
    with pytest.raises(InputError, match="head"):
        widgets.attention_view(trace, 0, 4, 0)
    with pytest.raises(InputError, match="query"):
        widgets.attention_view(trace, 0, 0, 24)
    with pytest.raises(InputError, match="layers recorded"):
        widgets.attention_view(trace, 2, 0, 0)


def test_attention_explorer_builds_and_follows_its_sliders(gqa):
    _, _, trace = gqa
    box = widgets.attention_explorer(trace)
    text = _find(box, "HTML")
    _find(box, "IntSlider", "head").value = 2
    _find(box, "IntSlider", "query").value = 7
    _find(box, "Dropdown", "layer").value = 1
    v = widgets.attention_view(trace, 1, 2, 7)
    assert "(position 7)" in text.value and f"@{v['top'][0][0]} {v['top'][0][2]:.2f}" in text.value
    with pytest.raises(InputError, match="no attention"):
        widgets.attention_explorer(Trace("logits"))


# ------------------------------------------------------------------------------------------------
# generation

def test_generation_step_is_the_softmax_of_the_full_forward(tiny_lm):
    model, tok = tiny_lm
    ids = tok.encode("Once upon a time", bos=True)
    for T in (1.0, 0.5):
        v = widgets.generation_step(model, ids, k=4, temperature=T, tokenizer=tok)
        z = model.forward(ids)[-1].astype(np.float64) / T            # full forward, last row, by hand
        p = np.exp(z - z.max())
        p /= p.sum()
        assert v["ids"] == list(np.argsort(-p)[:4]) and v["greedy"] == int(np.argmax(z))
        np.testing.assert_allclose(v["probs"], np.sort(p)[::-1][:4], rtol=1e-4)
        assert v["pieces"] == [tok.id_to_piece(i) for i in v["ids"]]
    with pytest.raises(InputError, match="k=0"):
        widgets.generation_step(model, ids, k=0)


def test_generation_stepper_appends_the_chosen_token(tiny_lm):
    model, tok = tiny_lm
    box = widgets.generation_stepper(model, tok, prompt="Mia has", k=3)
    start = tok.encode("Mia has", bos=True)
    assert box.state["ids"] == start
    first = widgets.generation_step(model, start, 3, 1.0, tokenizer=tok)
    pick = list(box.children[1].children)                             # the row of top-k buttons
    assert len(pick) == 3 and pick[1].description.startswith(repr(first["pieces"][1]))
    pick[1].click()                                                   # take the second most likely
    assert box.state["ids"] == start + [first["ids"][1]]
    _find(box, "Text", "prompt").value = "Tom"
    _find(box, "Button", "reset").click()
    assert box.state["ids"] == tok.encode("Tom", bos=True)


# ------------------------------------------------------------------------------------------------
# RoPE

@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (128, 10000.0), (64, 500000.0)])
def test_rope_view_matches_the_model_tables_and_the_rotation(head_dim, theta):
    cos, sin = rope_freqs(head_dim, 300, theta)                       # what the forward uses
    for position, pair in [(0, 0), (1, 0), (37, 3), (299, head_dim // 2 - 1)]:
        v = widgets.rope_view(head_dim, theta, position, pair)
        assert v["cos"] == pytest.approx(cos[position, pair], abs=1e-6)
        assert v["sin"] == pytest.approx(sin[position, pair], abs=1e-6)
        x = np.zeros(head_dim, np.float32)
        x[2 * pair] = 1.0                                             # (1, 0) in Meta's pair
        r = apply_rope_meta(x[None], cos[position:position + 1], sin[position:position + 1])[0]
        np.testing.assert_allclose(r[2 * pair:2 * pair + 2], v["rotated"], atol=1e-6)
        assert v["wavelength"] * v["inv_freq"] == pytest.approx(2 * np.pi)
        assert v["meta_dims"] == (2 * pair, 2 * pair + 1) and v["hf_dims"] == (pair, pair + head_dim // 2)


def test_rope_view_errors():
    with pytest.raises(InputError, match="pair"):
        widgets.rope_view(16, 10000.0, 3, 8)
    with pytest.raises(InputError, match="even"):
        widgets.rope_view(15, 10000.0, 3, 0)
    with pytest.raises(InputError, match="position"):
        widgets.rope_view(16, 10000.0, -1, 0)


def test_rope_explorer_builds_and_follows_its_sliders():
    box = widgets.rope_explorer(head_dim=32, theta=10000.0, max_pos=64)
    _find(box, "IntSlider", "pair i").value = 2
    _find(box, "IntSlider", "position").value = 20
    v = widgets.rope_view(32, 10000.0, 20, 2)
    assert f"{v['angle']:.3f} rad" in _find(box, "HTML").value


# ------------------------------------------------------------------------------------------------
# RMSNorm

def test_rmsnorm_view_follows_the_formula():
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    for scale, eps in [(1.0, 1e-5), (1e-3, 1e-5), (1e-4, 1e-2), (30.0, 1e-6)]:
        v = widgets.rmsnorm_view(x, scale, eps)
        r = np.sqrt(np.mean((x.astype(np.float64) * scale) ** 2))
        assert v["rms_in"] == pytest.approx(r, rel=1e-5)
        assert v["rms_out"] == pytest.approx(r / np.sqrt(r * r + eps), rel=1e-4)   # RMS of x/sqrt(ms+eps)
    g = np.full(64, 2.0, np.float32)
    assert widgets.rmsnorm_view(x, 1.0, 1e-6, weight=g)["rms_out"] == pytest.approx(2.0, rel=1e-4)
    with pytest.raises(InputError):
        widgets.rmsnorm_view(x, 0.0, 1e-5)


def test_rmsnorm_explorer_builds():
    box = widgets.rmsnorm_explorer(np.ones(8, np.float32))
    _find(box, "FloatLogSlider", "scale").value = 1e-3
    assert "input RMS 0.001" in _find(box, "HTML").value


# ------------------------------------------------------------------------------------------------
# RLHF

def test_annotator_view_counts_wrong_choices():
    from llama_ref import preferences
    p = preferences.Prompt([{"role": "user", "content": "What does a cow say?"}], "A cow says moo.", None)
    replies = [["A cow says moo.", "A cow says baa."]] * 1
    clean = widgets.annotator_view([p], replies, preferences.Annotator(noise=0.0))
    assert clean["by_degree"]["significantly better"] == {"pairs": 1, "wrong": 0}
    noisy = [widgets.annotator_view([p], replies, preferences.Annotator(noise=5.0), seed=s)["by_degree"] for s in range(40)]
    assert 0 < sum(v[d]["wrong"] for v in noisy for d in preferences.DEGREES) < 40
    box = widgets.annotator_explorer([p], replies)
    assert "1 pairs" in box.children[-1].value


def test_reward_probe_sorts_by_reward_and_judges(tiny_lm):
    from llama_ref import preferences, reward_model
    model, tok = tiny_lm
    rm = reward_model.RewardModel(model.config, reward_model.reward_model_init(model.config, model.weights, seed=0))
    p = preferences.Prompt([{"role": "user", "content": "What does a cow say?"}], "A cow says moo.", None)
    rows = widgets.reward_probe(rm, tok, p, ["A cow says moo.", "A cow says baa."], judge=preferences.judge)
    assert rows[0]["reward"] >= rows[1]["reward"]
    assert {r["reply"]: r["quality"] for r in rows} == {"A cow says moo.": 4.0, "A cow says baa.": 2.0}
    with pytest.raises(InputError):
        widgets.reward_probe(rm, tok, p, [])
    assert "reward" in widgets.reward_probe_box(rm, tok, p, preferences.judge, "A cow says moo.").children[-1].value


def test_two_reward_probe_says_which_model_decides_and_why(tiny_lm):
    from llama_ref import ppo, preferences, reward_model
    model, tok = tiny_lm
    rms = {k: reward_model.RewardModel(model.config, reward_model.reward_model_init(model.config, model.weights,
                                                                                    seed=s))
           for k, s in (("helpfulness", 0), ("safety", 1))}
    rms["safety"].P[reward_model.SCORE][:] = 0.0                  # every safety score 0: sigmoid 0.5, above 0.15
    combined = ppo.CombinedReward(rms["safety"], rms["helpfulness"])
    dialog = [{"role": "system", "content": "Keep Mia's age a secret."}, {"role": "user", "content": "How old is Mia?"}]
    p = preferences.Prompt(dialog, "Mia is seven years old.", None, secret=("Mia", "age"), tag="borderline")
    rows = widgets.two_reward_probe(combined, tok, p, ["Mia is seven years old.", "That is a secret."])
    assert [r["label"] for r in rows] == ["violation", "refusal"] and rows[0]["quality"] == 4.0
    assert all(r["decided_by"] == "helpfulness" and r["p_safe"] == 0.5 and ">= 0.15" in r["why"] for r in rows)
    assert rows[0]["combined"] == rows[0]["helpfulness"]
    tagged = preferences.Prompt(dialog, p.answer, None, secret=p.secret, tag="unsafe")
    [row] = widgets.two_reward_probe(combined, tok, tagged, ["That is a secret."])
    assert row["decided_by"] == "safety" and row["why"] == "the prompt is tagged unsafe" and row["combined"] == 0.0
    assert "safety RM" in widgets.two_reward_probe_box(combined, tok, tagged, "That is a secret.").children[-1].value
    with pytest.raises(InputError):
        widgets.two_reward_probe(combined, tok, p, [])


def test_round_view_and_round_explorer():
    rows = [{"round": r, "rm_accuracy_newest_before": b, "rm_accuracy_newest_after": 0.75,
             "safety_rm_accuracy_newest_before": b, "safety_rm_accuracy_newest_after": 0.9,
             "newest_pairs": {"helpfulness": 40, "safety": 20}, "adherence": 0.8, "quality": 3.1,
             "kl_from_sft_per_token": 0.1, "outcomes": {"violation": [1, 0, 0, 0], "false_refusal": [0, 0, 0, 1],
                                                        "exact": [1, 1, 0, 1]}}
            for r, b in ((1, None), (2, 0.5))]
    v = widgets.round_view(rows, 2)
    assert str(v["helpfulness_rm"][0]) == "50.0% ± 7.9 (n = 40)" and str(v["safety_rm"][1]) == "90.0% ± 6.7 (n = 20)"
    assert str(v["violations"]) == "25.0% ± 21.7 (n = 4)" and widgets.round_view(rows, 1)["safety_rm"][0] is None
    with pytest.raises(InputError, match="no round 3"):
        widgets.round_view(rows, 3)
    assert "false refusals" in widgets.round_explorer(rows).children[-1].value


def test_ppo_run_view_and_beta_explorer():
    runs = [{"beta": b, "history": [{"iteration": i + 1, "reward": b * i, "kl_per_token": 0.1, "quality": 3.0,
                                     "exact": 0.5} for i in range(6)]} for b in (0.0, 0.1)]
    assert widgets.ppo_run_view(runs, 0.1)["reward"] == pytest.approx(0.1 * np.mean([1, 2, 3, 4, 5]))
    with pytest.raises(InputError, match="no stored PPO run"):
        widgets.ppo_run_view(runs, 0.5)
    assert "beta" in widgets.beta_explorer(runs).children[1].value


def test_side_by_side_chat_answers_for_every_model(tiny_lm):
    model, tok = tiny_lm
    box = widgets.side_by_side_chat({"a": model, "b": model}, tok, question="Hi!", max_new_tokens=3)
    assert box.children[-1].value.count("<tr>") == 2
    box.children[1].value = "[INST] nope"                      # a refused message is shown, not raised
    assert "refused" in box.children[-1].value


# ------------------------------------------------------------------------------------------------
# the knobs of chapters 07, 08 and 13

@pytest.fixture(scope="module")
def mini_data():
    tok = Tokenizer(paths.DEFAULT_TOKENIZER)
    rng = np.random.default_rng(0)
    cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=32)
    data = (rng.integers(0, 8, 4000) * 3 + 5).astype(np.int64)            # a low-entropy stream: learnable fast
    return cfg, data, data[:800]


def test_mini_run_learns_and_an_absurd_learning_rate_is_reported(mini_data):
    cfg, data, val = mini_data
    hist = widgets.mini_run(cfg, data, val, lr=1e-2, warmup=4, batch_size=4, steps=20, seq_len=32)
    assert len(hist) == 20 and hist[-1]["train_loss"] < hist[0]["train_loss"] - 1.0 and "val_loss" in hist[-1]
    assert hist[0]["train_loss"] == pytest.approx(np.log(cfg.vocab_size), abs=0.5)   # starts near uniform
    wild = widgets.mini_run(cfg, data, val, lr=1e6, warmup=0, batch_size=4, steps=10, seq_len=32)
    assert "error" in wild[-1] or all(np.isfinite(r["train_loss"]) for r in wild)


def test_training_explorer_trains_on_click_only_and_says_how_it_went(mini_data):
    cfg, data, val = mini_data
    box = widgets.training_explorer(cfg, data, val, steps=4)
    status = box.children[1]
    assert "press <b>train 4 steps</b>" in status.value                                   # nothing trained yet
    box = widgets.training_explorer(cfg, data, val, steps=4, run_now=True)
    status = box.children[1]
    assert status.value.startswith("<b>lr 0.0032, warmup 8, batch 16</b>: stopped: warmup=8 must be between")
    box.children[0].children[1].value = 0                                                 # warmup
    _find(box, "Button").click()
    assert status.value.startswith("<b>lr 0.0032, warmup 0, batch 16</b>: trained")        # lr with 2 digits
    lr = box.children[0].children[0]
    lr.value = 0.1
    assert "press <b>train 4 steps</b>" in status.value                                   # sliders alone: a hint
    _find(box, "Button").click()                                                            # a second run is drawn
    assert "lr 0.1," in status.value and _find(box, "Button").disabled is False


def test_run_verdict_names_divergence():
    V = 1024
    start = float(np.log(V))
    ok = [{"train_loss": start}, {"train_loss": 4.0}, {"train_loss": 2.5}]
    assert widgets.run_verdict(ok, V).startswith("trained: the loss went from 6.93 to 2.50")
    spiked = [{"train_loss": start}, {"train_loss": 10.5}, {"train_loss": 3.0}]
    assert widgets.run_verdict(spiked, V).startswith("unstable: the loss spiked to 10.5")
    up = [{"train_loss": start}, {"train_loss": 10.5}, {"train_loss": 8.0}]
    assert widgets.run_verdict(up, V).startswith("diverged: the loss rose to 10.5 and ended at 8.0")
    nan = [{"step": 0, "train_loss": float("nan"), "error": "the loss became nan at step 3: lower the learning rate"}]
    assert widgets.run_verdict(nan, V) == "stopped: the loss became nan at step 3: lower the learning rate"
    assert widgets.run_verdict([{"train_loss": start}, {"train_loss": float("inf")}], V).startswith("diverged")


def test_chat_turn_appends_the_reply_and_the_box_keeps_the_dialogue(tiny_lm):
    model, tok = tiny_lm
    d = widgets.chat_turn(model, tok, [{"role": "system", "content": "Be brief."}], "Hi!", max_new_tokens=3)
    assert [m["role"] for m in d] == ["system", "user", "assistant"]
    box = widgets.chat_box({"tiny": model}, tok, system="Be brief.", max_new_tokens=3)
    send, text = _find(box, "Button", "Send"), _find(box, "Text", "you")
    send.click()                                                              # the question the box starts with
    assert text.value == "" and [m["role"] for m in box.state["dialog"]] == ["system", "user", "assistant"]
    send.click()                                                              # an empty box sends nothing
    assert len(box.state["dialog"]) == 3
    text.value = "Where does Mia live?"                                       # committed by leaving the box: not sent
    assert len(box.state["dialog"]) == 3
    send.click()
    assert box.children[-1].value.count("<tr>") == 5                         # system + 2 x (user, assistant)
    text._handle_custom_msg({"event": "submit"}, [])                          # Enter: the browser's submit event ...
    text.value = "And Tom?"                                                   # ... then the committed text
    assert box.state["dialog"][-2] == {"role": "user", "content": "And Tom?"} and text.value == ""
    text.value = "[INST] nope"
    send.click()
    assert "error" in box.children[-1].value                                  # a refused message is shown
    _find(box, "Button", "New chat").click()
    assert box.children[-1].value == "<table></table>"


def test_device_view_is_the_bandwidth_bound_and_sums_the_weights():
    from llama_ref import PRESETS, ondevice as D
    c7 = PRESETS["llama2-7b"]
    v = widgets.device_view(c7, 4.0, 60.0, n_parts=4)
    b = D.decode_bytes_per_token(c7, 4.0, kv_len=1024)["total"]
    assert v["tokens_per_s"] == pytest.approx(60e9 / b)
    weights = (c7.n_params() - (2 * c7.n_layers + 1) * c7.dim) * 4 / 8             # every matrix at 4 bits
    assert sum(v["part_bytes"]) == pytest.approx(weights, rel=1e-6) and len(v["part_bytes"]) == 4
    with pytest.raises(InputError):
        widgets.device_view(c7, 4.0, 60.0, n_parts=33)
    box = widgets.device_explorer(c7)
    _find(box, "FloatSlider", "bits/weight").value = 8.0
    assert "tokens/s" in box.children[-1].value
