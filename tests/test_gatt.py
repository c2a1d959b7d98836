"""llama_ref.gatt: instruction checkers, held-out combinations, loss masks, rejection sampling, evaluation and the
attention-to-system share, on a tiny random model (the real runs are scripts/make_chat.py and make_gatt.py)."""
import random

import numpy as np
import pytest

from llama_ref.chat import ASSISTANT, SYSTEM, encode_dialog
from llama_ref.config import LlamaConfig
from llama_ref.gatt import (HOBBIES, PERSONAS, SOUNDS, STYLE_ANIMALS, Instruction, adherence,
                            baseline_sft_data, combo_split, corpus_dialogues, eval_dialogues, gatt_examples,
                            last_turn_example, random_instruction, run_chat, sample_gatt_dialogue, sft_example,
                            system_attention)
from llama_ref.model import Llama
from conftest import random_weights  # noqa: E402


@pytest.fixture(scope="module")
def model(tok):
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size,
                      max_seq_len=256)
    return Llama(cfg, random_weights(cfg, 0, scale=0.2))


# ------------------------------------------------------------------------------------------------
# checkers

def test_each_family_checker():
    tom = Instruction(persona="Tom")
    assert tom.text == "Act as Tom." and Instruction(persona="Tom", short=True).text == "Figure: Tom."
    assert tom.obeyed("I am Tom. Mia has a cat.")
    assert not tom.obeyed("Mia has a cat. I am Tom.")             # the persona opens the reply
    assert not tom.obeyed("I am Tim. Mia has a cat.")
    kites = Instruction(hobby="kites")
    assert kites.text == "You love kites." and Instruction(hobby="kites", short=True).text == "Hobby: kites."
    assert kites.obeyed("Mia has a cat. I love kites.") and kites.obeyed("I love kites. Mia has a cat.")
    assert not kites.obeyed("Mia has a kite.")                    # mentioning the toy is not the hobby sentence
    assert not kites.obeyed("Mia has a cat. I love kites")
    cow = Instruction(style="cow")
    assert cow.text == "Speak like a cow." and Instruction(style="cow", short=True).text == "Style: cow."
    assert cow.obeyed("Mia has a cat. Moo!") and not cow.obeyed("Moo! Mia has a cat.")
    assert not cow.obeyed("Mia has a cat. Woof!")
    assert set(SOUNDS) == set(STYLE_ANIMALS) and SOUNDS["dog"] == "Woof!"


def test_combined_instruction_apply_is_accepted_and_partial_is_not():
    ins = Instruction(persona="Mia", hobby="drums", style="duck", order=("style", "persona", "hobby"))
    assert ins.text == "Speak like a duck. Act as Mia. You love drums."
    good = ins.apply("Tom has a dog.")
    assert good == "I am Mia. Tom has a dog. I love drums. Quack!"
    assert ins.check(good) == {"persona": True, "hobby": True, "style": True} and ins.obeyed(good)
    partial = "I am Mia. Tom has a dog. Quack!"
    assert ins.check(partial) == {"persona": True, "hobby": False, "style": True} and not ins.obeyed(partial)
    rng = random.Random(0)
    for _ in range(200):                                          # apply() always satisfies check()
        i = random_instruction(rng, rng.choice(["train", "test"]))
        assert i.obeyed(i.apply("Ben is six years old."))
        assert not i.obeyed("Ben is six years old.")


def test_held_out_combinations():
    rng = random.Random(1)
    train = {random_instruction(rng, "train").key() for _ in range(500)}
    test = {random_instruction(rng, "test").key() for _ in range(500)}
    assert not train & test
    assert all(sum(v is not None for v in k) >= 2 for k in test)
    assert all(combo_split(*k) == "test" for k in test)
    # every single value still appears in training combinations
    assert {k[0] for k in train} >= set(PERSONAS) and {k[1] for k in train} >= set(HOBBIES)
    shares = [random_instruction(rng, "train").short for _ in range(400)]
    assert 0.4 < np.mean(shares) < 0.6                           # shortened half the time, as in the paper
    assert {len(random_instruction(rng, "train").families()) for _ in range(100)} == {1, 2, 3}


# ------------------------------------------------------------------------------------------------
# data and loss masks

def test_sft_mask_covers_every_answer(tok):
    d = [{"role": "user", "content": "How old is Tim?"}, {"role": "assistant", "content": "Tim is five years old."},
         {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome!"}]
    ex = sft_example(d, tok)
    trained = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    assert tok.decode(trained).split() == "Tim is five years old. You are welcome!".split()
    assert trained.count(tok.eos_id) == 2                         # the model learns to stop


def test_gatt_mask_zero_for_previous_turns_assistant_included(tok):
    d = [{"role": "system", "content": "Act as Tom."},
         {"role": "user", "content": "How old is Tim?"}, {"role": "assistant", "content": "I am Tom. Tim is five years old."},
         {"role": "user", "content": "What pet does Mia have?"}, {"role": "assistant", "content": "I am Tom. Mia has a cat."}]
    ex = last_turn_example(d, tok)
    enc = encode_dialog(d, tok)
    mask = np.array(ex.loss_mask)
    assert ex.ids == enc.ids
    assert tok.decode([i for i, m in zip(ex.ids, mask) if m]).strip() == "I am Tom. Mia has a cat."
    assert not mask[np.array(enc.turns) == 0].any()              # turn 1, its assistant reply included: no loss
    assert mask[-1] and ex.ids[-1] == tok.eos_id
    # the instruction sits only in the system message of the first turn
    assert tok.decode(ex.ids).count("Act as Tom.") == 1


def test_baseline_data_has_instructions_only_in_single_turn_examples(tok):
    data = baseline_sft_data(tok, 120, seed=3, max_len=256)
    kinds = {e.kind for e in data}
    assert kinds == {"sft-instruction", "sft-dialogue"}
    for e in data:
        text = tok.decode(e.ids)
        assert len(e) <= 256
        if e.kind == "sft-instruction":
            assert text.count("[INST]") == 1                      # single turn
        else:
            assert "<<SYS>>" not in text


def test_corpus_and_eval_dialogues():
    ds = corpus_dialogues("train", 10, seed=0, min_turns=8, max_turns=8)
    assert all(len(d) == 16 for d in ds)
    ev = eval_dialogues(6, seed=0, n_turns=8)
    assert len(ev) == 6 and all(len(q) == 8 for _, q in ev)
    assert all(combo_split(*ins.key()) == "test" for ins, _ in ev)
    assert eval_dialogues(6, seed=0) == ev                       # deterministic


# ------------------------------------------------------------------------------------------------
# rejection sampling, evaluation and attention, on a random model

def test_rejection_sampling_keeps_only_accepted_replies(model, tok, monkeypatch):
    import llama_ref.generate as gen
    ins = Instruction(persona="Tom", style="cow")
    users = [{"role": "user", "content": q} for q in ("How old is Tim?", "What pet does Mia have?", "Hi!")]
    dialog = [users[0], {"role": "assistant", "content": "x"}, users[1], {"role": "assistant", "content": "y"},
              users[2], {"role": "assistant", "content": "z"}]
    calls = []

    def fake_generate_batch(m, prompts, max_new_tokens, temperature, top_k, top_p, seeds=None, **kw):
        out = []
        for ids in prompts:
            calls.append(ids)
            n = len(calls)
            # turn 1: first try disobeys, second obeys; turn 2: obeys; turn 3: never obeys
            text = {1: "Tim is five.", 2: "I am Tom. Tim is five. Moo!", 3: "I am Tom. Mia has a cat. Moo!"}.get(n, "No.")
            out.append(tok.encode(text) + [tok.eos_id])
        return out
    monkeypatch.setattr(gen, "generate_batch", fake_generate_batch)
    s = sample_gatt_dialogue(model, tok, ins, dialog, seed=0, max_tries=3)
    # every sampling prompt carried the instruction in the CURRENT user message
    assert all(tok.decode(ids).rstrip().endswith("[/INST]") for ids in calls)
    assert "Act as Tom. Speak like a cow. How old is Tim?" in tok.decode(calls[0])
    assert tok.decode(calls[2]).count("Act as Tom.") == 2          # turn 2 prompt: instruction in both user messages
    assert s.n_tries == [2, 1] and s.n_rejected == 1 + 3 and s.rejected[0] == "Tim is five."
    assert s.dialog == [{"role": "system", "content": ins.text},
                        {"role": "user", "content": "How old is Tim?"},
                        {"role": "assistant", "content": "I am Tom. Tim is five. Moo!"},
                        {"role": "user", "content": "What pet does Mia have?"},
                        {"role": "assistant", "content": "I am Tom. Mia has a cat. Moo!"}]
    exs = gatt_examples(s, tok)
    assert len(exs) == 2
    for k, ex in enumerate(exs):
        trained = tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m]).strip()
        assert trained == s.dialog[2 + 2 * k]["content"]
        assert tok.decode(ex.ids).count(ins.text) == 1            # instruction only in the system message


def test_sampling_with_a_real_random_model_runs(model, tok):
    ins = Instruction(hobby="kites")
    d = corpus_dialogues("train", 1, seed=0, min_turns=3, max_turns=3)[0]
    s = sample_gatt_dialogue(model, tok, ins, d, seed=0, max_tries=2, max_new_tokens=8)
    assert s.dialog[0] == {"role": "system", "content": "You love kites."}
    assert s.n_rejected >= 2 or len(s.dialog) > 1                # a random model (almost surely) never obeys


def test_run_chat_adherence_and_attention(model, tok):
    ev = eval_dialogues(2, seed=0, n_turns=3)
    runs = [run_chat(model, tok, ins, qs, max_new_tokens=6) for ins, qs in ev]
    assert all(len(r.obeyed) == 3 and len(r.dialog) == 7 for r in runs)
    a = adherence(runs)
    assert len(a["all"]) == 3 and all(0.0 <= x <= 1.0 for x in a["all"])
    att = system_attention(model, tok, runs[0].dialog)
    assert att.shape == (2, 3) and np.all((att >= 0) & (att <= 1 + 1e-6))
    # by hand for layer 0, turn 0: mass on system keys from the queries predicting the first reply
    from llama_ref.trace import Trace
    enc = encode_dialog(runs[0].dialog, tok)
    tr = Trace("layers.0.attn.probs")
    model.forward(enc.ids, trace=tr)
    roles, turns = np.array(enc.roles), np.array(enc.turns)
    q = np.nonzero((roles == ASSISTANT) & (turns == 0))[0] - 1
    p = tr["layers.0.attn.probs"][0][:, q][:, :, roles == SYSTEM].sum(-1).mean()
    assert att[0, 0] == pytest.approx(p)
    heads = system_attention(model, tok, runs[0].dialog, per_head=True)          # (layers, heads, turns)
    assert heads.shape == (2, model.config.n_heads, 3)
    assert heads[0, :, 0] == pytest.approx(tr["layers.0.attn.probs"][0][:, q][:, :, roles == SYSTEM].sum(-1).mean(-1))
    np.testing.assert_allclose(heads.mean(axis=1), att, rtol=1e-6)


def test_run_chat_survives_the_context_window(tok):
    cfg = LlamaConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=tok.vocab_size, max_seq_len=64)
    m = Llama(cfg, random_weights(cfg, 1, scale=0.2))
    ins, qs = eval_dialogues(1, seed=0, n_turns=6)[0]
    r = run_chat(m, tok, ins, qs, max_new_tokens=8)
    assert len(r.obeyed) == 6 and max(r.dropped) > 0               # old exchanges dropped, the chat goes on


def test_batched_chats_equal_single_chats(model, tok):
    from llama_ref.gatt import run_chats
    ev = eval_dialogues(3, seed=2, n_turns=2)
    batched = run_chats(model, tok, ev, max_new_tokens=5, batch_size=2)
    single = [run_chat(model, tok, ins, qs, max_new_tokens=5) for ins, qs in ev]
    assert [r.dialog for r in batched] == [r.dialog for r in single]


def test_make_chat_and_make_gatt_tiny_run_end_to_end(tmp_path):
    """scripts/make_chat.py --tiny (SFT) and scripts/make_gatt.py --tiny (rejection sampling, GAtt fine-tune with the
    model's own safe replies mixed in, evaluation) on a tiny random model; the checkpoints load, the cards are
    written, and gatt_eval.json has the contract's keys, adherence as fractions per turn."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    from llama_ref.loader import read_checkpoint
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    for script in ("make_chat.py", "make_gatt.py"):
        r = subprocess.run([sys.executable, str(scripts / script), "--tiny", "--out-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    read_checkpoint(tmp_path / "tinyworld-chat")
    assert "supervised fine-tuning" in (tmp_path / "tinyworld-chat" / "README.md").read_text()
    read_checkpoint(tmp_path / "tinyworld-gatt")
    assert "Instruction adherence per turn" in (tmp_path / "tinyworld-gatt" / "README.md").read_text()
    ev = json.loads((tmp_path / "tinyworld-gatt" / "gatt_eval.json").read_text())
    assert ev["turns"] == list(range(1, len(ev["baseline"]) + 1)) and len(ev["gatt"]) == len(ev["turns"])
    assert all(0.0 <= x <= 1.0 for x in ev["baseline"] + ev["gatt"] + ev["sft"]) and ev["n_dialogues"] >= 1
    assert {"violation_rate", "false_refusal_rate", "n"} <= set(ev["safety"]["gatt"])


def test_make_gatt_needs_the_rlhf_model(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_gatt.py"
    r = subprocess.run([sys.executable, str(script), "--base", str(tmp_path / "nothing"), "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "make rlhf" in r.stderr and "Traceback" not in r.stderr


def test_strip_instruction_recovers_the_answer_of_every_obedient_reply():
    from llama_ref.gatt import strip_instruction
    rng = random.Random(3)
    answers = ["Ben has a dog.", "Hello! What would you like to know?", "Lily is younger than Anna.", "No, it is not."]
    for _ in range(200):
        ins, a = random_instruction(rng, rng.choice(["train", "test"])), rng.choice(answers)
        assert strip_instruction(ins.apply(a)) == a
    # decorations that are not the instructed ones are removed too; the answer's own words are not
    assert strip_instruction("I am Tim. Ben's pet is a cat. I love dolls. Buzz!") == "Ben's pet is a cat."
    assert strip_instruction("A cow says moo.") == "A cow says moo."


def test_answer_accuracy_compares_the_stripped_reply_with_the_corpus_answer():
    from llama_ref.gatt import ChatRun, answer_accuracy, eval_dialogues, eval_references
    items, refs = eval_dialogues(3, seed=5, n_turns=4), eval_references(3, seed=5, n_turns=4)
    assert [len(r) for r in refs] == [4, 4, 4]
    runs = []
    for (ins, qs), ref in zip(items, refs):
        dialog = [{"role": "system", "content": ins.text}]
        for k, (q, a) in enumerate(zip(qs, ref)):
            reply = ins.apply(a) if k != 1 else "I am Tom. Something else entirely."     # turn 2 is always wrong
            dialog += [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]
        runs.append(ChatRun(ins, dialog, [True] * 4, [{}] * 4, [0] * 4))
    assert answer_accuracy(runs, refs) == [1.0, 0.0, 1.0, 1.0]
