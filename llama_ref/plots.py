"""Figures for the chapters: attention heatmaps, RoPE and its scaling past the context, residual norms, histograms, logit lens (02-05), the reward model,
best-of-N and PPO (09-10), Ghost Attention's adherence and attention (11), a Q4_0 block and bits per weight (12), the
on-device split (13).

Every function takes NumPy arrays (usually what a `Trace` recorded) and returns a matplotlib `Figure`. None calls
plt.show and none touches pyplot's global state: a notebook shows the figure where it displays it (the last
expression of a cell, or `display(fig)`), and tests can build many without leaking figures. Nothing in the core
modules imports this one.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .errors import InputError


def _labels(labels, n):
    """Tick labels: the given strings (token pieces) or positions 0..n-1."""
    return [str(i) for i in range(n)] if labels is None else [str(s) for s in labels][:n]


def _grid(n, ncols, size=(3.2, 3.0)):
    """A figure with n axes on a grid of ncols columns; unused cells are switched off."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


# ------------------------------------------------------------------------------------------------
# Attention

def attention_heatmap(ax, probs, labels=None, title=None, query=None):
    """Draw one head's attention (T, S) on ax: queries down, keys across; optionally outline one query row."""
    T, S = probs.shape
    im = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    kl = _labels(labels, S)
    ql = kl[S - T:] if labels is not None else [str(i) for i in range(S - T, S)]
    fs = 7 if S <= 48 else 5
    if S <= 80:
        ax.set_xticks(range(S), kl, rotation=90, fontsize=fs)
        ax.set_yticks(range(T), ql, fontsize=fs)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, fontsize=9)
    if query is not None:
        ax.axhline(query - 0.5, color="red", lw=1)
        ax.axhline(query + 0.5, color="red", lw=1)
    return im


def attention_heatmaps(probs, labels=None, heads=None, layer=None, ncols=4, size=3.2) -> Figure:
    """One heatmap per head of one layer and one sequence.

    probs (nh, T, S) (a `layers.{i}.attn.probs` tap without its batch axis); labels: S token pieces for the axes;
    heads: which heads to draw (default all). Row t is where query t looks; every row sums to 1.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise InputError(f"attention_heatmaps wants probs (nh, T, S), got shape {probs.shape}; "
                         "take one sequence of the tap: trace[name][0]")
    heads = list(range(probs.shape[0])) if heads is None else list(heads)
    fig, axes = _grid(len(heads), ncols, (size, size))
    for ax, h in zip(axes, heads):
        name = f"layer {layer}, head {h}" if layer is not None else f"head {h}"
        im = attention_heatmap(ax, probs[h], labels, name)
    fig.colorbar(im, ax=list(axes), shrink=0.6, label="attention weight")
    return fig


# ------------------------------------------------------------------------------------------------
# RoPE

def _inv_freq(head_dim, theta):
    """theta^(-2i/hs) for each pair i: the same angles per position as model.rope_freqs (float64)."""
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_rotations(head_dim, theta=10000.0, positions=16, pairs=None) -> Figure:
    """Where RoPE sends the vector (1, 0) of a few dimension pairs as the position grows.

    Pair i turns by theta^(-2i/hs) radians per position: the first pair runs round the circle every ~6 tokens,
    the last one barely moves. One panel per pair, a dot per position 0..positions-1 coloured by position.
    """
    n_pairs = head_dim // 2
    pairs = [0, 1, n_pairs // 2, n_pairs - 1] if pairs is None else list(pairs)
    pairs = sorted(set(p for p in pairs if 0 <= p < n_pairs))
    inv = _inv_freq(head_dim, theta)
    pos = np.arange(positions)
    fig, axes = _grid(len(pairs), 4, (2.8, 2.9))
    circle = np.linspace(0, 2 * np.pi, 200)
    for ax, i in zip(axes, pairs):
        ang = pos * inv[i]
        ax.plot(np.cos(circle), np.sin(circle), color="lightgrey", lw=1)
        sc = ax.scatter(np.cos(ang), np.sin(ang), c=pos, cmap="plasma", s=18, zorder=3)
        ax.plot([0, np.cos(ang[-1])], [0, np.sin(ang[-1])], color="black", lw=1)
        ax.set_aspect("equal")
        ax.set_xlim(-1.2, 1.2)
        ax.set_ylim(-1.2, 1.2)
        ax.set_title(f"pair {i}: {inv[i]:.3g} rad/token", fontsize=9)
        ax.set_xlabel(f"dim {2 * i} (Meta) / {i} (HF)", fontsize=8)
        ax.set_ylabel(f"dim {2 * i + 1} (Meta) / {i + n_pairs} (HF)", fontsize=8)
    fig.colorbar(sc, ax=list(axes), shrink=0.7, label="position")
    return fig


def rope_frequencies(head_dim, thetas=(10000.0,), max_pos=512) -> Figure:
    """Left: the wavelength 2*pi/theta_i (tokens per full turn) of every pair, one line per rope_theta.
    Right: cos(p * theta_i) for positions p < max_pos and every pair, for the first theta."""
    thetas = list(thetas)
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    i = np.arange(head_dim // 2)
    for th in thetas:
        ax1.semilogy(i, 2 * np.pi / _inv_freq(head_dim, th), marker=".", label=f"rope_theta={th:g}")
    ax1.axhline(max_pos, color="grey", ls="--", lw=1, label=f"{max_pos} tokens")
    ax1.set_xlabel("pair index i")
    ax1.set_ylabel("wavelength (tokens per turn)")
    ax1.set_title(f"RoPE wavelengths, head size {head_dim}")
    ax1.legend(fontsize=8)
    ang = np.outer(np.arange(max_pos), _inv_freq(head_dim, thetas[0]))
    im = ax2.imshow(np.cos(ang).T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax2.set_xlabel("position p")
    ax2.set_ylabel("pair index i")
    ax2.set_title(f"cos(p * theta_i), rope_theta={thetas[0]:g}")
    fig.colorbar(im, ax=ax2, shrink=0.8)
    return fig


def rope_relative_scores(scores, title="q.k after RoPE") -> Figure:
    """scores (P, P): the dot product of one q placed at position m (rows) with one k at position n (columns).

    RoPE makes it a function of m - n only, so the picture is constant along every diagonal.
    """
    scores = np.asarray(scores)
    fig = Figure(figsize=(4.6, 3.9), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(scores, cmap="RdBu_r", aspect="equal", interpolation="nearest")
    ax.set_xlabel("key position n")
    ax.set_ylabel("query position m")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


# ------------------------------------------------------------------------------------------------
# The residual stream and activations

def loss_by_position(curves: dict, trained_len: int, window: int = 32) -> Figure:
    """Next-token loss against position (a moving average over `window` positions), one line per curve name, with the
    trained context marked: what RoPE scaling does past it."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.subplots()
    for name, nll in curves.items():
        nll = np.asarray(nll, np.float64)
        smooth = np.convolve(nll, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window // 2, smooth, label=name)
    ax.axvline(trained_len, color="gray", ls="--", lw=1)
    ax.text(trained_len, ax.get_ylim()[1], " trained context", va="top", fontsize=8, color="gray")
    ax.set_xlabel("position")
    ax.set_ylabel(f"loss (mean over {window} positions)")
    ax.legend(fontsize=8)
    return fig


def residual_norms(norms, names=None, labels=None) -> Figure:
    """The residual stream's L2 norm per token after each block.

    norms (L+1, T): row 0 the embeddings, row i+1 after block i (see inspect.residual_stream); labels: T token pieces.
    Left: mean over tokens per layer, with the min-max band. Right: every (layer, token) as a heatmap.
    """
    norms = np.asarray(norms, dtype=np.float64)
    L1, T = norms.shape
    names = names or ["embed"] + [f"block {i}" for i in range(L1 - 1)]
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 2])
    x = np.arange(L1)
    ax1.plot(x, norms.mean(1), marker="o", label="mean over tokens")
    ax1.fill_between(x, norms.min(1), norms.max(1), alpha=0.25, label="min..max")
    ax1.set_xticks(x, names, rotation=45, fontsize=8)
    ax1.set_ylabel("||x||_2 per token")
    ax1.set_title("residual stream norm by depth")
    ax1.legend(fontsize=8)
    im = ax2.imshow(norms, aspect="auto", cmap="magma", interpolation="nearest")
    ax2.set_yticks(x, names, fontsize=8)
    if T <= 80:
        ax2.set_xticks(range(T), _labels(labels, T), rotation=90, fontsize=6)
    ax2.set_xlabel("token")
    ax2.set_title("norm per token and depth")
    fig.colorbar(im, ax=ax2, shrink=0.8)
    return fig


def activation_histograms(tensors: dict, bins=80, ncols=3, log=True) -> Figure:
    """One histogram per named tensor (e.g. trace.select("layers.0.*")), titled with its name, std and max |x|."""
    names = list(tensors)
    fig, axes = _grid(len(names), ncols, (3.8, 2.6))
    for ax, name in zip(axes, names):
        a = np.asarray(tensors[name], dtype=np.float64).ravel()
        ax.hist(a, bins=bins, color="C0", log=log)
        ax.set_title(f"{name}\nstd {a.std():.3g}, max|x| {np.abs(a).max():.3g}", fontsize=8)
        ax.set_xlabel("value", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


# ------------------------------------------------------------------------------------------------
# The logit lens

def logit_lens_grid(probs, pieces, layer_names=None, token_labels=None, title="logit lens") -> Figure:
    """A grid with one row per depth and one column per position: the lens's top token and its probability.

    probs (L+1, T) the probability of the top token, pieces (L+1, T) its text, layer_names the row labels,
    token_labels the input token at each column (the lens predicts the token after it).
    """
    probs = np.asarray(probs, dtype=np.float64)
    L1, T = probs.shape
    layer_names = layer_names or ["embed"] + [f"block {i}" for i in range(L1 - 1)]
    fig = Figure(figsize=(max(6.0, 0.62 * T + 2), 0.45 * L1 + 1.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for r in range(L1):
        for c in range(T):
            ax.text(c, r, str(pieces[r][c]).replace("▁", "_")[:7], ha="center", va="center", fontsize=6.5,
                    color="white" if probs[r, c] > 0.6 else "black")
    ax.set_yticks(range(L1), layer_names, fontsize=8)
    ax.set_xticks(range(T), _labels(token_labels, T), rotation=90, fontsize=7)
    ax.set_xlabel("input token (the lens predicts the next one)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label="probability of the top token")
    return fig


# ------------------------------------------------------------------------------------------------
# Ghost Attention (chapter 11)

def adherence_curves(turns, adherence: dict, attention: dict) -> Figure:
    """Left: share of replies obeying the system message per turn, one line per model ({name: (turns,) in [0, 1]}).
    Right: the replies' attention mass on system tokens per turn, mean over layers ({name: (layers, turns)})."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for name, share in adherence.items():
        ax.plot(turns, 100 * np.asarray(share, float), "o-", label=name)
    ax.set(xlabel="turn", ylabel="replies obeying the system message (%)", ylim=(-5, 105),
           title="instruction adherence per turn (held-out)")
    ax.legend()
    for name, att in attention.items():
        att = np.asarray(att, float)                                            # (layers, turns)
        ax2.plot(np.arange(1, att.shape[1] + 1), 100 * np.nanmean(att, axis=0), "o-", label=name)
    ax2.set(xlabel="turn", ylabel="attention mass on system tokens (%)",
            title="replies' attention to the system message (mean over layers)")
    ax2.legend()
    return fig


def head_gain(gain, per_head: dict, layer: int, head: int) -> Figure:
    """Left: what one model gained over another per (layer, head), in percentage points (gain (L, H) as fractions).
    Right: one head's attention to system tokens per turn for each model ({name: (L, H, turns)})."""
    fig = Figure(figsize=(12, 3.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    lim = 100 * float(np.abs(gain).max())
    im = ax.imshow(100 * np.asarray(gain), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title="GAtt - baseline, turns 4-8 (percentage points)")
    fig.colorbar(im, ax=ax)
    for name, a in per_head.items():
        ax2.plot(np.arange(1, a.shape[-1] + 1), 100 * a[layer, head], "o-", label=name)
    ax2.set(xlabel="turn", ylabel="attention on system tokens (%)", title=f"layer {layer}, head {head}, same dialogues")
    ax2.legend()
    return fig


# ------------------------------------------------------------------------------------------------
# Quantization (chapter 12) and on-device graphs (chapter 13)

def q4_0_block(block, d, formats) -> Figure:
    """Top: the 18 bytes of one Q4_0 block (fp16 d, then 16 bytes of two nibbles each). Bottom: bits per weight of
    each format, value bits plus the share of its scale ([(name, value bits, scale bits per weight)])."""
    from matplotlib.patches import Rectangle
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 1.4]})
    ax1.add_patch(Rectangle((0, 0), 2, 1, color="tab:orange", alpha=0.7))
    ax1.text(1, 0.5, f"d (fp16)\n{float(d):.2e}", ha="center", va="center", fontsize=8)
    for j in range(16):
        lo, hi = block[2 + j] & 15, block[2 + j] >> 4
        ax1.add_patch(Rectangle((2 + j, 0), 0.5, 1, color="tab:green", alpha=0.35 + 0.04 * hi))   # bits 7..4
        ax1.add_patch(Rectangle((2.5 + j, 0), 0.5, 1, color="tab:blue", alpha=0.35 + 0.04 * lo))   # bits 3..0
        ax1.text(2.25 + j, 0.5, f"{hi}", ha="center", va="center", fontsize=7)
        ax1.text(2.75 + j, 0.5, f"{lo}", ha="center", va="center", fontsize=7)
    ax1.set(xlim=(0, 18), ylim=(0, 1), yticks=[])
    ax1.set_xticks(np.arange(18) + 0.5, [f"b{i}" for i in range(18)], fontsize=7)
    ax1.set_title("a Q4_0 block: byte j = q[j+16] (high nibble, green) | q[j] (low nibble, blue); w = d (q - 8)",
                  fontsize=9)
    names = [f[0] for f in formats]
    ax2.barh(names, [f[1] for f in formats], color="tab:blue", label="value bits")
    ax2.barh(names, [f[2] for f in formats], left=[f[1] for f in formats], color="tab:orange",
             label="scale bits (shared)")
    for i, f in enumerate(formats):
        ax2.text(f[1] + f[2] + 0.3, i, f"{f[1] + f[2]:.3g}", va="center", fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("bits per weight")
    ax2.legend(fontsize=8, loc="lower right")
    return fig


def split_graphs(prompt_len: int) -> Figure:
    """The 4-part split as two static graphs: the prompt processor (P tokens at once) and the token generator (one
    token, the KV cache in, the new key/value out), with what flows between the parts."""
    from matplotlib.patches import Rectangle
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax = fig.subplots()

    def row(y, title, tok_shape, t_label, kv_in, kv_out):
        boxes = ["tokens " + tok_shape, "part 1\nembed + layers", "part 2\nlayers", "part 3\nlayers",
                 "part 4\nlayers + norm\n+ lm_head", "logits\n(" + t_label + ", V)"]
        for i, b in enumerate(boxes):
            ax.add_patch(Rectangle((i * 2.1, y), 1.7, 1, color="tab:blue" if 0 < i < 5 else "tab:gray", alpha=0.25))
            ax.text(i * 2.1 + 0.85, y + 0.5, b, ha="center", va="center", fontsize=8)
            if i:
                ax.annotate("", (i * 2.1, y + 0.5), (i * 2.1 - 0.4, y + 0.5), arrowprops=dict(arrowstyle="->"))
        ax.text(-0.2, y + 0.5, title, ha="right", va="center", fontsize=9, weight="bold")
        ax.text(5.2, y - 0.35, f"hidden (1, C, 1, {t_label}) between parts;  cos/sin ({t_label}, hs/2) and mask in",
                ha="center", fontsize=8)
        if kv_in:
            ax.text(5.2, y + 1.25, kv_in, ha="center", fontsize=8, color="tab:green")
        ax.text(5.2, y - 0.75, kv_out, ha="center", fontsize=8, color="tab:red")

    row(2.6, "prompt\nprocessor", f"(P={prompt_len})", "P", None,
        "out per layer: keys (nkv, hs, P) [transposed], values (nkv, P, hs)")
    row(0, "token\ngenerator", "(1)", "1", "in per layer: past keys (nkv, hs, ctx-1), past values (nkv, ctx-1, hs)",
        "out per layer: new key (nkv, hs, 1), new value (nkv, 1, hs)")
    ax.set(xlim=(-2.2, 12.6), ylim=(-1.1, 4.2))
    ax.axis("off")
    return fig


# ------------------------------------------------------------------------------------------------
# RLHF (chapters 09-10)

def reward_model_accuracy(acc: dict, degrees) -> Figure:
    """Held-out pair accuracy of the reward model per annotator degree (the paper's Table 8 as bars), chance at 50%."""
    fig = Figure(figsize=(6.5, 3), layout="constrained")
    ax = fig.subplots()
    vals = [100 * (acc[d]["accuracy"] or 0) for d in degrees]
    ax.bar(range(len(degrees)), vals, color="tab:blue")
    for i, d in enumerate(degrees):
        ax.text(i, vals[i] + 1, f"{vals[i]:.0f}%\n({acc[d]['pairs']})", ha="center", fontsize=8)
    ax.axhline(50, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(degrees)), degrees, fontsize=8)
    ax.set(ylim=(0, 115), ylabel="accuracy on held-out pairs (%)", title="reward model accuracy by how much better")
    return fig


def best_of_n_curves(bon: list[dict]) -> Figure:
    """Left: the reward of the reward model's favourite of N samples (the paper's Figure 7). Right: the true quality of
    that pick against the best pick an oracle could make from the same N, and the mean of all N."""
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ns = [b["n"] for b in bon]
    ax1.plot(ns, [b["rm_pick_reward"] for b in bon], "o-")
    ax1.set(xscale="log", xlabel="N samples", ylabel="reward of the best", title="max reward among N (Figure 7)")
    ax2.plot(ns, [b["oracle_pick_quality"] for b in bon], "o-", label="oracle's pick")
    ax2.plot(ns, [b["rm_pick_quality"] for b in bon], "o-", label="reward model's pick")
    ax2.plot(ns, [b["mean_quality"] for b in bon], "o--", color="grey", label="a random sample")
    ax2.set(xscale="log", xlabel="N samples", ylabel="true quality (max 4)", title="what the pick is really worth")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(ns, [str(n) for n in ns])
    return fig


def ppo_curves(runs: list[dict], smooth: int = 5) -> Figure:
    """Reward, KL from the SFT model per token, and true quality per PPO iteration, one line per beta (a moving
    average over `smooth` iterations: each point is one batch of samples)."""
    fig = Figure(figsize=(12, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for run in runs:
        h = run["history"]
        it = [x["iteration"] for x in h]
        for ax, key in zip(axes, ("reward", "kl_per_token", "quality")):
            y = np.array([x[key] for x in h], float)
            k = min(smooth, len(y))
            ys = np.convolve(y, np.ones(k) / k, mode="valid") if k > 1 else y
            ax.plot(it[len(it) - len(ys):], ys, label=f"beta = {run['beta']:g}")
    for ax, t in zip(axes, ("reward model's score", "KL from SFT per token", "true quality (the world's judge)")):
        ax.set(xlabel="PPO iteration", title=t)
    axes[0].legend(fontsize=8)
    return fig
