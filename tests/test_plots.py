"""plots.py: every function returns a Figure with the expected axes, titles and labels, and leaves pyplot alone."""
import numpy as np
import pytest
from matplotlib.figure import Figure

from llama_ref import paths, plots
from llama_ref.errors import InputError
from llama_ref.loader import read_checkpoint
from llama_ref.model import Llama
from llama_ref.inspect import logit_lens, residual_stream
from llama_ref.trace import Trace


@pytest.fixture(scope="module")
def traced():
    config, weights = read_checkpoint(paths.REFERENCE_DIR / "gqa")
    model = Llama(config, weights)
    tokens = np.load(paths.REFERENCE_DIR / "gqa.npz")["tokens"][:, :12]
    trace = Trace()
    model.forward(tokens, trace=trace)
    return model, tokens, trace


def _image_axes(fig):
    """The axes that hold data (colorbars are axes too; they carry no title)."""
    return [ax for ax in fig.axes if ax.get_title()]


def test_no_pyplot_state_is_touched(traced):
    import matplotlib.pyplot as plt
    before = plt.get_fignums()
    _, _, trace = traced
    plots.attention_heatmaps(trace["layers.0.attn.probs"][0])
    plots.rope_frequencies(16)
    assert plt.get_fignums() == before


def test_attention_heatmaps(traced):
    model, tokens, trace = traced
    labels = [f"t{t}" for t in tokens[0]]
    probs = trace["layers.1.attn.probs"][0]                          # (nh, T, S)
    fig = plots.attention_heatmaps(probs, labels, layer=1)
    assert isinstance(fig, Figure)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == [f"layer 1, head {h}" for h in range(model.config.n_heads)]
    ax = axes[2]
    assert ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    np.testing.assert_array_equal(ax.images[0].get_array(), probs[2])     # the picture is head 2's matrix
    sub = plots.attention_heatmaps(probs, heads=[3])
    assert [ax.get_title() for ax in _image_axes(sub)] == ["head 3"]
    with pytest.raises(InputError, match="nh, T, S"):
        plots.attention_heatmaps(trace["layers.1.attn.probs"])        # batch axis left on


def test_rope_rotations_points_lie_on_the_unit_circle_at_the_right_angles():
    fig = plots.rope_rotations(16, theta=10000.0, positions=9, pairs=[0, 7])
    axes = _image_axes(fig)
    assert [ax.get_title().split(":")[0] for ax in axes] == ["pair 0", "pair 7"]
    pts = axes[0].collections[0].get_offsets()                          # (positions, 2)
    angles = np.arange(9) * 1.0                                        # pair 0 turns 1 radian per token
    np.testing.assert_allclose(pts, np.stack([np.cos(angles), np.sin(angles)], 1), atol=1e-12)
    assert "Meta" in axes[0].get_xlabel() and "HF" in axes[0].get_ylabel()


def test_rope_frequencies():
    fig = plots.rope_frequencies(128, thetas=(10000.0, 500000.0), max_pos=256)
    ax1, ax2 = _image_axes(fig)
    assert ax1.get_yscale() == "log" and ax1.get_xlabel() == "pair index i"
    assert "wavelength" in ax1.get_ylabel()
    lines = [l for l in ax1.get_lines() if l.get_label().startswith("rope_theta")]
    assert [l.get_label() for l in lines] == ["rope_theta=10000", "rope_theta=500000"]
    # wavelength of pair i: 2 pi theta^(2i/hs); the first pair turns once per 2 pi tokens
    np.testing.assert_allclose(lines[0].get_ydata()[[0, 32]], [2 * np.pi, 2 * np.pi * 100.0])
    assert ax2.images[0].get_array().shape == (64, 256)
    assert ax2.get_xlabel() == "position p"


def test_rope_relative_scores():
    fig = plots.rope_relative_scores(np.eye(5))
    (ax,) = _image_axes(fig)
    assert ax.get_xlabel() == "key position n" and ax.get_ylabel() == "query position m"


def test_residual_norms(traced):
    model, tokens, trace = traced
    names, x = residual_stream(trace)
    norms = np.linalg.norm(x[:, 0], axis=-1)                          # (L+1, T)
    fig = plots.residual_norms(norms, labels=[str(t) for t in tokens[0]])
    ax1, ax2 = _image_axes(fig)
    # the figure averages in float64, this in float32: a float32 rounding (2^-23), not allclose's default 1e-7
    np.testing.assert_allclose(ax1.get_lines()[0].get_ydata(), norms.mean(1), rtol=1e-6)
    assert [t.get_text() for t in ax1.get_xticklabels()] == ["embed", "block 0", "block 1"]
    assert ax2.images[0].get_array().shape == norms.shape


def test_activation_histograms(traced):
    _, _, trace = traced
    sel = trace.select("layers.0.ffn.*")
    fig = plots.activation_histograms(sel, bins=20)
    axes = _image_axes(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == list(sel)
    counts = [p.get_height() for p in axes[0].patches]
    assert len(counts) == 20 and sum(counts) == sel["layers.0.ffn.gate"].size


def test_logit_lens_grid(traced):
    model, tokens, trace = traced
    _, lens = logit_lens(model, trace)
    z = lens[:, 0].astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top, pieces = p.max(-1), p.argmax(-1)
    fig = plots.logit_lens_grid(top, pieces, token_labels=[str(t) for t in tokens[0]])
    (ax,) = _image_axes(fig)
    assert ax.get_title() == "logit lens"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "block 0", "block 1"]
    assert len(ax.texts) == top.size and ax.texts[0].get_text() == str(pieces[0, 0])
    np.testing.assert_allclose(ax.images[0].get_array(), top)


def test_chapter_figures_of_10_11_12():
    """The figures chapters 11 (Ghost Attention), 12 (a Q4_0 block) and 13 (the split) draw, on small made-up data."""
    turns = [1, 2, 3]
    fig = plots.adherence_curves(turns, {"a": [1.0, 0.5, 0.0], "b": [1.0, 1.0, 1.0]},
                                 {"a": np.full((2, 3), 0.2), "b": np.full((2, 3), 0.4)})
    assert [ax.get_ylabel() for ax in fig.axes] == ["replies obeying the system message (%)",
                                                    "attention mass on system tokens (%)"]
    gain = np.zeros((2, 4))
    gain[1, 3] = 0.3
    fig = plots.head_gain(gain, {"baseline": np.zeros((2, 4, 3)), "GAtt": np.ones((2, 4, 3))}, 1, 3)
    assert _image_axes(fig)[1].get_title() == "layer 1, head 3, same dialogues"
    from llama_ref import quant
    block = quant.quantize_q4_0(np.linspace(-1, 1, 32, dtype=np.float32))
    fig = plots.q4_0_block(block, 0.125, [("float32", 32, 0), ("Q4_0", 4, 0.5)])
    assert "Q4_0 block" in _image_axes(fig)[0].get_title() and len(fig.axes[1].patches) == 4   # two bars per format
    fig = plots.split_graphs(64)
    assert any("P=64" in t.get_text() for t in fig.axes[0].texts)


def test_rlhf_figures():
    """Chapters 09-10's figures on made-up numbers: bars per degree, best-of-N curves, PPO curves per beta."""
    degrees = ("significantly better", "better")
    fig = plots.reward_model_accuracy({"significantly better": {"accuracy": 0.9, "pairs": 10},
                                       "better": {"accuracy": 0.6, "pairs": 5}}, degrees)
    assert [round(p.get_height()) for p in fig.axes[0].patches] == [90, 60]
    bon = [{"n": n, "rm_pick_reward": n / 10, "rm_pick_quality": 2 + n / 10, "oracle_pick_quality": 3 + n / 10,
            "mean_quality": 2.0} for n in (1, 2, 4)]
    fig = plots.best_of_n_curves(bon)
    assert [len(ax.lines) for ax in fig.axes] == [1, 3]
    np.testing.assert_allclose(fig.axes[1].lines[1].get_ydata(), [2.1, 2.2, 2.4])
    runs = [{"beta": b, "history": [{"iteration": i + 1, "reward": i * b, "kl_per_token": 0.1, "quality": 3.0}
                                    for i in range(8)]} for b in (0.0, 0.1)]
    fig = plots.ppo_curves(runs, smooth=4)
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2] and len(fig.axes[0].lines[1].get_xdata()) == 5
