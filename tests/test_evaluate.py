"""llama_ref/evaluate.py: the measures on the model card, checked on inputs whose answers are known."""
import math

import numpy as np
import pytest

from llama_ref import backprop, corpus, evaluate, paths, trainer
from llama_ref.config import LlamaConfig
from llama_ref.model import Llama


def test_ngram_losses_on_a_known_sequence():
    """A period-4 cycle over 4 of 8 symbols: unigram add-one = ln((N+8)/(N/4+1)); bigram is nearly certain."""
    train_ids = np.tile([0, 1, 2, 3], 1000)
    eval_ids = np.tile([0, 1, 2, 3], 50)
    out = evaluate.ngram_losses(train_ids, eval_ids, vocab_size=8, k=0.01)
    N = len(train_ids)
    assert out["unigram_loss"] == pytest.approx(math.log((N + 8) / (N / 4 + 1)), rel=1e-9)
    # every context predicts its successor; symbol 3 ends the training stream, so it is a context 999 times, not 1000
    per_pair = {a: -math.log((c + 0.01) / (c + 0.08)) for a, c in ((0, 1000), (1, 1000), (2, 1000), (3, 999))}
    expected = np.mean([per_pair[a] for a in eval_ids[:-1]])
    assert out["bigram_loss"] == pytest.approx(expected, rel=1e-9)


def test_stream_loss_equals_the_training_forward(tok):
    """Two implementations of the same number: the inference forward (evaluate) and the training forward (train)."""
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=tok.vocab_size, max_seq_len=64)
    params = backprop.init_weights(cfg, seed=3, std=0.1)
    ids = evaluate.token_stream("val", tok, 3000)
    assert ids[0] == tok.bos_id and len(ids) == 3000
    a = evaluate.stream_loss(Llama(cfg, params), ids, seq_len=64, batch_size=4)
    b = trainer.evaluate_loss(cfg, params, ids, batch_size=4, seq_len=64)
    assert a == pytest.approx(b, rel=1e-5)


def test_corpus_text_scores_perfectly():
    """The world's own stories are 100% grammatical and every fact they state is true; a broken one is caught."""
    world = corpus.make_world()
    texts = [s.text for s in corpus.generate_stories(world, "val", 20, seed=1)]
    r = evaluate.grammar_report(texts, world)
    assert r["sentences"] > 100 and r["grammar_valid_share"] == 1.0
    assert r["facts_stated"] > 20 and r["fact_true_share"] == 1.0
    good = corpus.split_sentences(texts[0])[0]
    bad = evaluate.grammar_report([f"Mia had a pet elephant. {good}"], world)
    assert bad["grammar_valid_share"] == 0.5 and bad["ungrammatical_examples"] == ["Mia had a pet elephant."]


def test_complete_sentences_drops_an_unfinished_tail():
    assert evaluate.complete_sentences(" Mia was happy. Tom went to") == ["Mia was happy."]
    assert evaluate.complete_sentences("Mia was happy.") == ["Mia was happy."]


def test_story_prompts_are_first_sentences_of_the_split():
    p = evaluate.story_prompts(3, "val", seed=0)
    assert len(p) == 3 and all(corpus.is_grammatical(s) for s in p)


def test_rates_carry_their_standard_error_and_n():
    from llama_ref.evaluate import difference, mean_estimate, rate
    r = rate(250, 300)
    assert abs(r.se - np.sqrt(r.value * (1 - r.value) / 300)) < 1e-12 and str(r) == "83.3% ± 2.2 (n = 300)"
    assert rate([1, 0, 1, 1]).k == 3 and rate([True, False]).n == 2
    assert str(rate(0, 200)) == "0% (n = 200; 95% interval <= 1.5%)"                  # rule of three, not "± 0"
    assert str(rate(200, 200)) == "100% (n = 200; 95% interval >= 98.5%)"
    assert str(rate(34043, 34043)) == "100% (n = 34043; 95% interval >= 99.99%)"          # never ">= 100.0%"
    from llama_ref.errors import InputError
    for bad in [(5, 3), (-1, 3), (0, 0)]:
        with pytest.raises(InputError, match="needs 0 <= k <= n"):
            rate(*bad)
    with pytest.raises(InputError, match="0/1 or booleans"):
        rate([0, 2])
    # two rates of 300 prompts 1.7 points apart (SE 3.8): no difference; 20 points apart: real
    assert not difference(rate(202, 300), rate(207, 300)).real
    assert difference(rate(150, 300), rate(210, 300)).real
    assert "no difference" in str(difference(rate(202, 300), rate(207, 300)))
    # paired outcomes of the same items: the shared items shrink the standard error
    a = np.random.default_rng(0).random(300) < 0.67
    b = a.copy()
    b[np.flatnonzero(~a)[:10]] = True                                 # 10 items fixed, nothing broken
    paired, unpaired = difference(a, b), difference(rate(a), rate(b))
    assert paired.paired and paired.se < unpaired.se and paired.real and not unpaired.real
    m = mean_estimate([3, 4, 3, 2, 4])
    assert m.n == 5 and abs(m.value - 3.2) < 1e-12 and abs(m.se - np.std([3, 4, 3, 2, 4], ddof=1) / np.sqrt(5)) < 1e-12
