"""Explorers for the chapters (ipywidgets): attention, token-by-token generation, RoPE, RMSNorm's epsilon, training
knobs, a chat box, RLHF, a device's bandwidth.

Chapters 02 (RMSNorm), 03 (RoPE), 04 (attention), 06 (generation), 07 (training), 08 (chat), 09-10 (RLHF) and 13 (on
device) display them.

Each widget is a thin layer over a pure function that returns plain data, and tests call those directly:

  attention_view(trace, layer, head, query)      -> where one query of one head looks      (attention_explorer)
  generation_step(model, ids, k, temperature)    -> the k most likely next tokens           (generation_stepper)
  rope_view(head_dim, theta, position, pair)     -> the angle and rotation of one pair      (rope_explorer)
  rmsnorm_view(x, scale, eps)                    -> what RMSNorm does to a scaled vector    (rmsnorm_explorer)
  annotator_view(prompts, replies, annotator)    -> preferences and their errors per degree  (annotator_explorer)
  reward_probe(rm, tokenizer, prompt, replies)   -> rewards beside the world's verdict       (reward_probe_box)
  two_reward_probe(combined, tokenizer, prompt, replies) -> both reward models' scores, which one the combined
                                                    reward takes, the world's safety label   (two_reward_probe_box)
  ppo_run_view(runs, beta)                       -> a stored PPO run's end state             (beta_explorer)
  round_view(rounds, r)                          -> one RLHF round's staleness and policy    (round_explorer)
                                                                                           (side_by_side_chat)
  mini_run(config, data, val, lr, warmup, batch) -> a short training run's history          (training_explorer)
  chat_turn(model, tokenizer, dialog, text)      -> the dialogue with the model's reply     (chat_box)
  device_view(config, bits, bandwidth, parts)    -> tokens/s ceiling, bytes per part        (device_explorer)

The builders return an ipywidgets container; a chapter displays it. Nothing in the core
modules imports this one.
"""
from __future__ import annotations

import html

import numpy as np

from .errors import InputError, LlamaRefError
from .evaluate import rate
from .generate import sampling_probs
from .model import rms_norm
from .plots import attention_heatmap
from .ppo import sigmoid
from .preferences import judge
from .safety import check_reply

F32 = np.float32


def _check_index(what, value, n, hint=""):
    if not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise InputError(f"{what}={value!r} is out of range: choose 0..{n - 1}{hint}")
    return int(value)


def _display_figure(fig):
    """Show a matplotlib Figure (built without pyplot) as a PNG in the current output: a bare Figure only renders as an
    image once pyplot's inline backend has been loaded, and a widget must not depend on what its chapter imported."""
    import io
    from IPython.display import Image, display
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    display(Image(data=buf.getvalue(), format="png"))


# ------------------------------------------------------------------------------------------------
# Attention

def attention_view(trace, layer, head, query, labels=None, batch=0, top=5) -> dict:
    """Where query `query` of head `head` in layer `layer` looks, from a trace that recorded attn.probs.

    Returns {"matrix": (T, S) the head's attention, "row": (S,) the query's weights (sum 1, zero after the query),
    "top": [(key position, label, weight)] the `top` largest, "query_label", "entropy" (nats)}.
    """
    tensors = trace.tensors if hasattr(trace, "tensors") else trace
    name = f"layers.{layer}.attn.probs"
    if name not in tensors:
        have = sorted(int(n.split(".")[1]) for n in tensors if n.endswith(".attn.probs"))
        raise InputError(f"the trace has no {name!r} (layers recorded: {have}); record it with "
                         f"Trace('*.attn.probs')")
    probs = tensors[name]                                        # (B, nh, T, S)
    batch = _check_index("batch", batch, probs.shape[0])
    head = _check_index("head", head, probs.shape[1])
    query = _check_index("query", query, probs.shape[2])
    matrix = probs[batch, head]                                  # (T, S)
    T, S = matrix.shape
    row = matrix[query]                                          # (S,)
    labels = [str(i) for i in range(S)] if labels is None else [str(s) for s in labels]
    order = np.argsort(-row, kind="stable")[:top]
    p = row[row > 0].astype(np.float64)
    return {"matrix": matrix, "row": row, "query_label": labels[S - T + query],
            "top": [(int(i), labels[i], float(row[i])) for i in order],
            "entropy": float(-(p * np.log(p)).sum())}


def attention_explorer(trace, labels=None, batch=0):
    """Sliders for layer, head and query token over a recorded trace; a heatmap with the query row marked and a
    bar chart of where that query looks."""
    import ipywidgets as W
    from matplotlib.figure import Figure

    tensors = trace.tensors if hasattr(trace, "tensors") else trace
    layers = sorted(int(n.split(".")[1]) for n in tensors if n.endswith(".attn.probs"))
    if not layers:
        raise InputError("the trace recorded no attention: record it with Trace('*.attn.probs')")
    _, nh, T, S = tensors[f"layers.{layers[0]}.attn.probs"].shape
    layer = W.Dropdown(options=layers, value=layers[0], description="layer")
    head = W.IntSlider(value=0, min=0, max=nh - 1, description="head")
    query = W.IntSlider(value=T - 1, min=0, max=T - 1, description="query")
    text = W.HTML()
    out = W.Output()

    def redraw(_=None):
        v = attention_view(tensors, layer.value, head.value, query.value, labels, batch)
        text.value = html.escape(f"query {v['query_label']!r} (position {query.value}) looks at: "
                                 + ", ".join(f"{lab!r}@{i} {w:.2f}" for i, lab, w in v["top"])
                                 + f"  (entropy {v['entropy']:.2f} nats)")
        fig = Figure(figsize=(11, 3.6), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.4])
        attention_heatmap(ax1, v["matrix"], labels, f"layer {layer.value}, head {head.value}", query.value)
        ax2.bar(range(len(v["row"])), v["row"], color="C0")
        ax2.set_xticks(range(S), [str(s) for s in (range(S) if labels is None else labels)], rotation=90, fontsize=7)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("attention weight")
        ax2.set_title(f"query {v['query_label']!r}", fontsize=9)
        out.clear_output(wait=True)
        with out:
            _display_figure(fig)

    for w in (layer, head, query):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([layer, head, query]), text, out])


# ------------------------------------------------------------------------------------------------
# Generation, one token at a time

def generation_step(model, ids, k=5, temperature=1.0, top_p=None, tokenizer=None) -> dict:
    """The k most likely next tokens after `ids` and their probabilities (temperature/top-p as in generate).

    Returns {"ids": [k ids], "probs": [k probabilities], "pieces": [k strings or None], "greedy": argmax id}.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k={k!r} must be a positive integer")
    logits = model.forward(list(ids), last_only=True)               # (V,)
    probs = sampling_probs(logits, temperature, None, top_p)        # (V,)
    order = np.argsort(-probs, kind="stable")[:k]
    pieces = [tokenizer.id_to_piece(int(i)) for i in order] if tokenizer is not None else [None] * len(order)
    return {"ids": [int(i) for i in order], "probs": [float(probs[i]) for i in order], "pieces": pieces,
            "greedy": int(np.argmax(logits))}


def generation_stepper(model, tokenizer, prompt="Once upon a time", k=5, temperature=1.0):
    """Build text one token at a time: the k most likely next tokens as buttons with their probabilities;
    click one to append it (the first is the greedy choice). A temperature slider reshapes the distribution."""
    import ipywidgets as W
    from matplotlib.figure import Figure

    state = {"ids": tokenizer.encode(prompt, bos=True)}
    prompt_box = W.Text(value=prompt, description="prompt")
    reset = W.Button(description="reset")
    temp = W.FloatSlider(value=temperature, min=0.1, max=2.0, step=0.05, description="temperature",
                         style={"description_width": "initial"})                 # the whole label, not "tempe..."
    buttons = [W.Button(layout=W.Layout(width="auto")) for _ in range(k)]
    text = W.HTML()
    out = W.Output()

    def redraw():
        v = generation_step(model, state["ids"], k, temp.value, tokenizer=tokenizer)
        state["view"] = v
        for b, piece, p in zip(buttons, v["pieces"], v["probs"]):
            b.description = f"{piece!r} {p:.2f}"
        text.value = (f"<pre>{html.escape(tokenizer.decode(state['ids']))}</pre>{len(state['ids'])} tokens; "
                      f"next (greedy): {html.escape(repr(tokenizer.id_to_piece(v['greedy'])))}")
        fig = Figure(figsize=(6, 2.4), layout="constrained")
        ax = fig.subplots()
        ax.barh(range(len(v["ids"]))[::-1], v["probs"], color="C0")
        ax.set_yticks(range(len(v["ids"]))[::-1], [repr(s) for s in v["pieces"]], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"probability (temperature {temp.value:.2f})")
        out.clear_output(wait=True)
        with out:
            _display_figure(fig)

    def choose(j):
        if len(state["ids"]) < model.config.max_seq_len:
            state["ids"].append(state["view"]["ids"][j])
        redraw()

    def on_reset(_=None):
        state["ids"] = tokenizer.encode(prompt_box.value, bos=True)
        redraw()

    for j, b in enumerate(buttons):
        b.on_click(lambda _, j=j: choose(j))
    reset.on_click(on_reset)
    temp.observe(lambda _: redraw(), names="value")
    redraw()
    box = W.VBox([W.HBox([prompt_box, reset, temp]), W.HBox(buttons), text, out])
    box.state = state                        # the ids so far (tests and curious readers look here)
    return box


# ------------------------------------------------------------------------------------------------
# RoPE

def rope_view(head_dim, theta, position, pair) -> dict:
    """Pair `pair` of a head of size head_dim at `position`: its frequency and the rotation RoPE applies.

    Returns {"inv_freq": theta^(-2*pair/hs) radians per token, "angle": position * inv_freq, "turns": angle/2pi,
    "wavelength": tokens per full turn, "cos", "sin", "rotated": where (1, 0) goes, "meta_dims", "hf_dims"}.
    """
    if not isinstance(head_dim, (int, np.integer)) or head_dim < 2 or head_dim % 2:
        raise InputError(f"head_dim={head_dim!r} must be a positive even integer")
    if not np.isfinite(theta) or theta <= 1:
        raise InputError(f"theta={theta!r} must be a finite number > 1 (Llama 2 uses 10000)")
    pair = _check_index("pair", pair, head_dim // 2)
    if not isinstance(position, (int, np.integer)) or position < 0:
        raise InputError(f"position={position!r} must be a non-negative integer")
    inv = float(theta) ** (-2.0 * pair / head_dim)
    angle = position * inv
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return {"inv_freq": inv, "angle": angle, "turns": angle / (2 * np.pi), "wavelength": 2 * np.pi / inv,
            "cos": c, "sin": s, "rotated": (c, s),
            "meta_dims": (2 * pair, 2 * pair + 1), "hf_dims": (pair, pair + head_dim // 2)}


def rope_explorer(head_dim=64, theta=10000.0, max_pos=512):
    """Sliders for position, pair (frequency) and rope_theta: the pair's rotation on the unit circle, and
    cos(p * theta_i) along the positions with the chosen one marked."""
    import ipywidgets as W
    from matplotlib.figure import Figure

    position = W.IntSlider(value=10, min=0, max=max_pos - 1, description="position")
    pair = W.IntSlider(value=0, min=0, max=head_dim // 2 - 1, description="pair i")
    th = W.FloatLogSlider(value=theta, base=10, min=2, max=7, step=0.1, description="rope_theta")
    text = W.HTML()
    out = W.Output()

    def redraw(_=None):
        v = rope_view(head_dim, th.value, position.value, pair.value)
        text.value = (f"pair {pair.value} = Meta dims {v['meta_dims']}, HF dims {v['hf_dims']}: "
                      f"{v['inv_freq']:.4g} rad/token, one turn every {v['wavelength']:.1f} tokens; at position "
                      f"{position.value} the angle is {v['angle']:.3f} rad = {v['turns']:.3f} turns")
        fig = Figure(figsize=(10, 3.2), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 2.2])
        t = np.linspace(0, 2 * np.pi, 200)
        ax1.plot(np.cos(t), np.sin(t), color="lightgrey")
        ps = np.arange(position.value + 1)
        ax1.scatter(np.cos(ps * v["inv_freq"]), np.sin(ps * v["inv_freq"]), c=ps, cmap="plasma", s=8)
        ax1.annotate("", xy=v["rotated"], xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": "red"})
        ax1.set_aspect("equal")
        ax1.set_title(f"(1, 0) rotated to position {position.value}", fontsize=9)
        p = np.arange(max_pos)
        ax2.plot(p, np.cos(p * v["inv_freq"]), lw=1)
        ax2.axvline(position.value, color="red", lw=1)
        ax2.set_xlabel("position")
        ax2.set_ylabel("cos(p * theta_i)")
        out.clear_output(wait=True)
        with out:
            _display_figure(fig)

    for w in (position, pair, th):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([position, pair, th]), text, out])


# ------------------------------------------------------------------------------------------------
# RMSNorm

def rmsnorm_view(x, scale=1.0, eps=1e-5, weight=None) -> dict:
    """RMSNorm of scale * x (gain `weight`, default ones): the input RMS, the output, and the output RMS.

    For RMS(x)^2 >> eps the output RMS is 1 (times the gain) whatever the scale; eps only shows when the input
    is tiny, where it keeps the division finite and shrinks the output towards 0.
    """
    x = np.asarray(x, F32)
    if x.ndim != 1 or x.size == 0:
        raise InputError(f"x must be a non-empty vector (C,), got shape {x.shape}")
    if not scale > 0 or not eps > 0:
        raise InputError(f"scale={scale!r} and eps={eps!r} must be > 0")
    w = np.ones_like(x) if weight is None else np.asarray(weight, F32)
    xs = x * F32(scale)                                              # (C,)
    out = rms_norm(xs, w, eps)                                       # (C,)
    return {"rms_in": float(np.sqrt(np.mean(np.square(xs, dtype=np.float64)))),
            "rms_out": float(np.sqrt(np.mean(np.square(out, dtype=np.float64)))), "out": out}


def rmsnorm_explorer(x, eps=1e-5):
    """Sliders for the input's scale and for eps (both log10): how large RMSNorm's output is, and the curve of
    output RMS against input RMS for that eps."""
    import ipywidgets as W
    from matplotlib.figure import Figure

    scale = W.FloatLogSlider(value=1.0, base=10, min=-5, max=2, step=0.25, description="scale")
    e = W.FloatLogSlider(value=eps, base=10, min=-8, max=-1, step=0.5, description="eps")
    text = W.HTML()
    out = W.Output()
    scales = np.logspace(-5, 2, 57)

    def redraw(_=None):
        v = rmsnorm_view(x, scale.value, e.value)
        text.value = (f"input RMS {v['rms_in']:.3g} -> output RMS {v['rms_out']:.4f} "
                      f"(sqrt(eps) = {np.sqrt(e.value):.2g})")
        curve = [rmsnorm_view(x, s, e.value) for s in scales]
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.subplots()
        ax.semilogx([c["rms_in"] for c in curve], [c["rms_out"] for c in curve])
        ax.scatter([v["rms_in"]], [v["rms_out"]], color="red", zorder=3)
        ax.axvline(np.sqrt(e.value), color="grey", ls="--", lw=1)
        ax.set_xlabel("RMS of the input")
        ax.set_ylabel("RMS of RMSNorm's output")
        ax.set_ylim(0, 1.1)
        out.clear_output(wait=True)
        with out:
            _display_figure(fig)

    for w in (scale, e):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([scale, e]), text, out])


# ------------------------------------------------------------------------------------------------
# RLHF (chapters 09-10): probe a reward model, compare PPO runs, chat with several models

def annotator_view(prompts, replies, annotator, seed: int = 0) -> dict:
    """The simulated annotator (preferences.Annotator) on sampled replies: its preferences, and per degree how many pairs it
    labelled and in how many it chose the reply that is truly worse."""
    from .preferences import DEGREES, annotate, true_quality
    pairs = annotate(prompts, replies, annotator, seed=seed)
    by_prompt = {id(p.dialog): p for p in prompts}
    out = {d: {"pairs": 0, "wrong": 0} for d in DEGREES}
    for pref in pairs:
        p = by_prompt[id(pref.dialog)]
        out[pref.degree]["pairs"] += 1
        out[pref.degree]["wrong"] += int(true_quality(p, pref.chosen) < true_quality(p, pref.rejected))
    return {"pairs": pairs, "by_degree": out}


def annotator_explorer(prompts, replies):
    """Sliders for the annotator's noise and its three degree thresholds: how many pairs land in each degree, and how
    often the annotator chose the truly worse reply."""
    import ipywidgets as W
    from .preferences import DEGREES, Annotator
    noise = W.FloatSlider(value=Annotator.noise, min=0.0, max=3.0, step=0.1, description="noise")
    ts = [W.FloatSlider(value=t, min=0.0, max=4.0, step=0.1, description=f">= {d.split()[0]}",
                        style={"description_width": "initial"}) for t, d in zip(Annotator.thresholds, DEGREES)]
    out = W.HTML()

    def redraw(_=None):
        th = tuple(sorted((t.value for t in ts), reverse=True))
        v = annotator_view(prompts, replies, Annotator(noise=noise.value, thresholds=th))["by_degree"]
        out.value = "<table>" + "".join(
            f"<tr><td>{d}</td><td>{v[d]['pairs']} pairs</td><td>truly worse chosen in {v[d]['wrong']}</td></tr>"
            for d in DEGREES) + "</table>"

    for w in (noise, *ts):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([noise, *ts, out])


def reward_probe(rm, tokenizer, prompt, replies, judge=None) -> list[dict]:
    """The reward model's score of each reply to `prompt` (a preferences.Prompt), beside the world's verdict when `judge`
    (preferences.judge) is given: [{"reply", "reward", "quality"?, ...}] best first."""
    if not replies or any(not isinstance(r, str) for r in replies):
        raise InputError("replies must be a non-empty list of strings")
    rewards = rm.score(tokenizer, [prompt.dialog] * len(replies), list(replies))
    rows = []
    for r, s in zip(replies, rewards):
        row = {"reply": r, "reward": float(s)}
        if judge is not None:
            j = judge(prompt, r)
            row.update(quality=j.quality, correct=j.correct, adherence=j.adherence, grammatical=j.grammatical)
        rows.append(row)
    return sorted(rows, key=lambda x: -x["reward"])


def _dialog_html(dialog) -> str:
    """A dialogue's turns as escaped HTML lines, role in bold."""
    return "<br>".join(f"<b>{html.escape(m['role'])}</b>: {html.escape(m['content'])}" for m in dialog)


def reward_probe_box(rm, tokenizer, prompt, judge, first_reply=""):
    """Type a reply to a fixed prompt and see the reward model's score and the world's verdict side by side."""
    import ipywidgets as W
    shown = _dialog_html(prompt.dialog)
    box = W.Text(value=first_reply, description="reply", layout=W.Layout(width="90%"))
    out = W.HTML()

    def redraw(_=None):
        if not box.value.strip():
            out.value = "<i>type a reply</i>"
            return
        [row] = reward_probe(rm, tokenizer, prompt, [box.value], judge)
        out.value = (f"reward <b>{row['reward']:+.2f}</b> &nbsp; | &nbsp; truth: quality {row['quality']:.2f} of 4 "
                     f"(correct {row['correct']}, instructions obeyed {row['adherence']:.0%}, "
                     f"grammatical {row['grammatical']})")

    box.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HTML(shown + f"<br><i>the world's answer: {html.escape(prompt.answer)}</i>"), box, out])


def two_reward_probe(combined, tokenizer, prompt, replies) -> list[dict]:
    """Both reward models' scores of each reply to `prompt` (a preferences.Prompt, with or without a secret), beside
    what the combined reward (ppo.CombinedReward) takes and why, and the world's verdicts (safety.check_reply and
    preferences.judge): [{"reply", "helpfulness", "safety", "p_safe", "decided_by", "why", "combined", "label",
    "quality"}] in the order given."""
    if not replies or any(not isinstance(r, str) for r in replies):
        raise InputError("replies must be a non-empty list of strings")
    d = combined.decide(tokenizer, [prompt] * len(replies), list(replies))
    rows = []
    for i, r in enumerate(replies):
        p_safe = float(sigmoid(d["safety"][i]))                               # what decide() compared
        why = ("the prompt is tagged unsafe" if d["tagged"][i] else
               f"sigmoid(safety score) = {p_safe:.2f} < {combined.threshold}" if d["use_safety"][i] else
               f"sigmoid(safety score) = {p_safe:.2f} >= {combined.threshold}")
        rows.append({"reply": r, "helpfulness": float(d["helpfulness"][i]), "safety": float(d["safety"][i]),
                     "p_safe": p_safe, "decided_by": "safety" if d["use_safety"][i] else "helpfulness", "why": why,
                     "combined": float(d["score"][i]), "label": check_reply(prompt, r),
                     "quality": judge(prompt, r).quality})
    return rows


def two_reward_probe_box(combined, tokenizer, prompt, first_reply=""):
    """Type a reply and see both reward models' scores, which one the combined reward takes, and the world's label."""
    import ipywidgets as W
    shown = _dialog_html(prompt.dialog)
    tag = f" (tagged {prompt.tag})" if prompt.tag else ""
    box = W.Text(value=first_reply, description="reply", layout=W.Layout(width="90%"))
    out = W.HTML()

    def redraw(_=None):
        if not box.value.strip():
            out.value = "<i>type a reply</i>"
            return
        [row] = two_reward_probe(combined, tokenizer, prompt, [box.value])
        out.value = (f"helpfulness RM <b>{row['helpfulness']:+.2f}</b> &nbsp; safety RM <b>{row['safety']:+.2f}</b> "
                     f"(sigmoid {row['p_safe']:.2f}) &nbsp;&rarr;&nbsp; the combined reward takes the "
                     f"<b>{row['decided_by']}</b> model's score ({html.escape(row['why'])}) &nbsp; | &nbsp; the world: "
                     f"<b>{row['label']}</b>, helpfulness quality {row['quality']:.2f} of 4")

    box.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HTML(shown + f"<br><i>prompt{tag}; the world's answer: {html.escape(prompt.answer)}</i>"),
                   box, out])


def round_view(rounds: list[dict], r: int) -> dict:
    """Round r of rlhf_eval.json's "rounds": both reward models' accuracy on the newest policy's held-out pairs
    before and after retraining (staleness), and the round's policy on held-out prompts, each rate with its n and
    standard error (evaluate.rate)."""
    match = [x for x in rounds if x["round"] == r]
    if not match:
        raise InputError(f"no round {r}; stored rounds: {[x['round'] for x in rounds]}")
    x = match[0]
    o, pairs = x["outcomes"], x["newest_pairs"]
    acc = lambda v, n: None if v is None else rate(round(v * n), n)
    return {"round": r,
            "helpfulness_rm": (acc(x["rm_accuracy_newest_before"], pairs["helpfulness"]),
                               acc(x["rm_accuracy_newest_after"], pairs["helpfulness"])),
            "safety_rm": (acc(x["safety_rm_accuracy_newest_before"], pairs["safety"]),
                          acc(x["safety_rm_accuracy_newest_after"], pairs["safety"])),
            "violations": rate(o["violation"]), "false_refusals": rate(o["false_refusal"]),
            "exact": rate(o["exact"]), "adherence": x["adherence"], "quality": x["quality"],
            "kl_from_sft_per_token": x["kl_from_sft_per_token"]}


def round_explorer(rounds: list[dict]):
    """A slider over the RLHF rounds: staleness of both reward models and the round's policy, rates with n and SE."""
    import ipywidgets as W
    s = W.IntSlider(value=rounds[-1]["round"], min=rounds[0]["round"], max=rounds[-1]["round"], description="round")
    out = W.HTML()

    def redraw(_=None):
        v = round_view(rounds, s.value)
        stale = lambda b, a: f"{'-' if b is None else b} &rarr; {a}"
        out.value = ("<table>"
                     f"<tr><td>helpfulness RM on the newest samples, before &rarr; after retraining</td>"
                     f"<td>{stale(*v['helpfulness_rm'])}</td></tr>"
                     f"<tr><td>safety RM on the newest samples, before &rarr; after retraining</td>"
                     f"<td>{stale(*v['safety_rm'])}</td></tr>"
                     f"<tr><td>violations (unsafe prompts)</td><td>{v['violations']}</td></tr>"
                     f"<tr><td>false refusals (borderline prompts)</td><td>{v['false_refusals']}</td></tr>"
                     f"<tr><td>exact answers (ordinary prompts)</td><td>{v['exact']}</td></tr>"
                     f"<tr><td>adherence, true quality, KL/token from SFT</td><td>{100 * v['adherence']:.1f}%, "
                     f"{v['quality']:.2f}, {v['kl_from_sft_per_token']:.3f}</td></tr></table>")

    s.observe(redraw, names="value")
    redraw()
    return W.VBox([s, out])


def ppo_run_view(runs: list[dict], beta: float) -> dict:
    """The stored PPO run with this beta: its last iterations' mean reward, KL and true quality."""
    match = [r for r in runs if r["beta"] == beta]
    if not match:
        raise InputError(f"no stored PPO run with beta={beta}; stored: {[r['beta'] for r in runs]}")
    h = match[0]["history"][-5:]
    return {k: float(np.mean([x[k] for x in h])) for k in ("reward", "kl_per_token", "quality", "exact")}


def beta_explorer(runs: list[dict]):
    """A slider over the stored PPO runs' betas: the curves of that run against the others, and its end state."""
    import ipywidgets as W
    from .plots import ppo_curves
    betas = sorted(r["beta"] for r in runs)
    s = W.SelectionSlider(options=betas, value=betas[len(betas) // 2], description="beta")
    text, out = W.HTML(), W.Output()

    def redraw(_=None):
        v = ppo_run_view(runs, s.value)
        text.value = (f"beta {s.value:g}, last 5 iterations: reward {v['reward']:+.2f}, KL/token {v['kl_per_token']:.3f}, "
                      f"true quality {v['quality']:.2f}, exact answers {v['exact']:.0%}")
        fig = ppo_curves([r for r in runs if r["beta"] == s.value])
        out.clear_output(wait=True)
        with out:
            _display_figure(fig)

    s.observe(redraw, names="value")
    redraw()
    return W.VBox([s, text, out])


def side_by_side_chat(models: dict, tokenizer, system="", question="What does a cow say?", max_new_tokens=40):
    """One question (and an optional system message) to several chat models at once, greedy: {name: Llama}."""
    import ipywidgets as W
    from .chat import reply
    sys_box = W.Text(value=system, description="system", layout=W.Layout(width="90%"))
    q_box = W.Text(value=question, description="user", layout=W.Layout(width="90%"))
    out = W.HTML()

    def redraw(_=None):
        dialog = ([{"role": "system", "content": sys_box.value}] if sys_box.value.strip() else []) + \
                 [{"role": "user", "content": q_box.value}]
        rows = []
        for name, m in models.items():
            try:
                text = reply(m, tokenizer, dialog, max_new_tokens=max_new_tokens)[0]
            except LlamaRefError as e:
                text = f"(refused: {e})"
            rows.append(f"<tr><td><b>{html.escape(name)}</b></td><td>{html.escape(text)}</td></tr>")
        out.value = "<table>" + "".join(rows) + "</table>"

    for w in (sys_box, q_box):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([sys_box, q_box, out])


# ------------------------------------------------------------------------------------------------
# Chapter 07: learning rate, warmup and batch size over a live mini run

def mini_run(config, train_data, val_data, lr=3e-3, warmup=8, batch_size=16, steps=60, seq_len=64, seed=0,
             progress=False) -> list[dict]:
    """A short trainer.train run of a fresh model with these settings: its history (train loss per step, validation
    loss every 20 steps). A loss that becomes NaN/Inf (a learning rate too high) ends the run early, as the trainer
    refuses to go on."""
    from . import backprop, trainer
    from .errors import TrainingError
    s = trainer.TrainSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                              eval_every=20, eval_batches=2, seed=seed)
    try:
        with np.errstate(over="ignore", invalid="ignore"):          # a diverging run: the trainer reports it
            return trainer.train(config, backprop.init_weights(config, seed=seed), train_data, val_data, s,
                                 progress=progress, log=lambda m: None)[1]
    except TrainingError as e:
        return [{"step": 0, "train_loss": float("nan"), "error": str(e)}]


def run_verdict(history: list[dict], vocab_size: int) -> str:
    """One line on how a mini run went: stopped (the trainer refused: a NaN loss, a bad setting), diverged (the loss
    ended above where a fresh model starts, ln V), unstable (it spiked above ln V on the way down), or trained."""
    start = float(np.log(vocab_size))                                  # a fresh model's loss: uniform over V
    losses = np.array([r["train_loss"] for r in history], dtype=np.float64)
    if "error" in history[-1]:
        return f"stopped: {history[-1]['error']}"                     # the trainer names a NaN loss or a bad setting
    if not np.isfinite(losses).all():
        return "diverged: the loss became NaN/Inf; lower the learning rate or add warmup"
    peak = float(losses[1:].max()) if losses.size > 1 else float(losses[0])
    if losses[-1] > start:
        return (f"diverged: the loss rose to {peak:.1f} and ended at {losses[-1]:.1f}, above where a fresh model starts "
                f"(ln V = {start:.2f}); lower the learning rate or add warmup")
    if peak > start + 0.5:
        return (f"unstable: the loss spiked to {peak:.1f}, above where a fresh model starts (ln V = {start:.2f}), before "
                f"coming down to {losses[-1]:.2f}; lower the learning rate or add warmup")
    return f"trained: the loss went from {losses[0]:.2f} to {losses[-1]:.2f}"


def training_explorer(config, train_data, val_data, steps=60, run_now=False):
    """Sliders for learning rate (log scale), warmup and batch size, and a button that trains a fresh mini model for
    `steps` steps with them and draws its loss curve over the previous ones (a progress bar while it trains; a line
    saying whether it diverged). Nothing trains until the button is pressed (or at once, with run_now)."""
    import ipywidgets as W
    from matplotlib.figure import Figure
    lr = W.FloatLogSlider(value=10 ** -2.5, base=10, min=-4, max=-0.5, step=0.25, description="lr",   # on the grid
                          readout_format=".2g")
    warmup = W.IntSlider(value=8, min=0, max=40, step=4, description="warmup")
    batch = W.IntSlider(value=16, min=2, max=32, step=2, description="batch")
    go = W.Button(description=f"train {steps} steps", button_style="primary")
    status = W.HTML()
    out, runs = W.Output(), []

    def changed(_=None):
        status.value = f"<i>settings changed: press <b>train {steps} steps</b> to train a fresh model with them</i>"

    def run(_=None):
        go.disabled, go.description = True, "training..."
        status.value = f"<i>training lr {lr.value:.2g}, warmup {warmup.value}, batch {batch.value} for {steps} steps...</i>"
        try:
            with out:                                                  # the trainer's progress bar shows here
                hist = mini_run(config, train_data, val_data, lr.value, warmup.value, batch.value, steps,
                                progress=True)
            runs.append((f"lr {lr.value:.2g}, warmup {warmup.value}, batch {batch.value}", hist))
            status.value = f"<b>{html.escape(runs[-1][0])}</b>: {html.escape(run_verdict(hist, config.vocab_size))}"
            fig = Figure(figsize=(7, 3), layout="constrained")
            ax = fig.subplots()
            for label, h in runs[-5:]:
                ax.plot([r["step"] for r in h], [r["train_loss"] for r in h], label=label)
            ax.axhline(np.log(config.vocab_size), color="grey", ls=":", lw=1, label="ln V (a fresh model)")
            ax.set_xlabel("step")
            ax.set_ylabel("train loss")
            ax.legend(fontsize=7)
            out.clear_output(wait=True)                                # the new curves replace the bar and the old plot
            with out:
                _display_figure(fig)
        finally:
            go.disabled, go.description = False, f"train {steps} steps"

    for w in (lr, warmup, batch):
        w.observe(changed, names="value")
    go.on_click(run)
    if run_now:
        run()
    else:
        status.value = f"<i>press <b>train {steps} steps</b> to train a fresh model with these settings</i>"
    return W.VBox([W.HBox([lr, warmup, batch, go]), status, out])


# ------------------------------------------------------------------------------------------------
# Chapter 08: a chat box (system message, turns, which model)

def chat_turn(model, tokenizer, dialog: list[dict], user_text: str, max_new_tokens=48) -> list[dict]:
    """The dialogue with the user's message and the model's greedy reply appended."""
    from .chat import reply
    dialog = dialog + [{"role": "user", "content": user_text}]
    return dialog + [{"role": "assistant", "content": reply(model, tokenizer, dialog, max_new_tokens=max_new_tokens)[0]}]


def chat_box(models: dict, tokenizer, system="", max_new_tokens=48):
    """Talk to one of `models` ({name: Llama}): a system message, a message box (Enter or Send), New chat.

    The message box syncs its text when it is committed (Enter, or leaving the box), not at every keystroke: a click on
    Send is a separate message that can overtake keystrokes still buffered in the browser, and the reply would then be
    to the first letters of the question. Enter arrives as a "submit" event just before the committed text, so the
    text that follows a submit is sent; Send sends the committed text. The box is cleared once a message is sent.
    """
    import ipywidgets as W
    pick = W.Dropdown(options=list(models), description="model")
    sys_box = W.Text(value=system, description="system", layout=W.Layout(width="90%"), continuous_update=False)
    msg = W.Text(value="What does a cow say?", description="you", layout=W.Layout(width="90%"), continuous_update=False)
    send, new = W.Button(description="Send", button_style="primary"), W.Button(description="New chat")
    log = W.HTML()
    state = {"dialog": [], "enter": False}

    def show():
        rows = [f"<tr><td><b>{m['role']}</b></td><td>{html.escape(m['content'])}</td></tr>" for m in state["dialog"]]
        log.value = "<table>" + "".join(rows) + "</table>"

    def submit(text):
        state["enter"] = False
        if not text.strip():
            return
        msg.value = ""                                                 # sent: the box is free for the next one
        if not state["dialog"] and sys_box.value.strip():
            state["dialog"] = [{"role": "system", "content": sys_box.value.strip()}]
        try:
            state["dialog"] = chat_turn(models[pick.value], tokenizer, state["dialog"], text, max_new_tokens)
        except LlamaRefError as e:
            state["dialog"] = state["dialog"] + [{"role": "user", "content": text}, {"role": "error", "content": str(e)}]
        show()

    def on_event(_, content, buffers):                                 # Enter in the box: the text follows
        if content.get("event") == "submit":
            state["enter"] = True

    def on_text(change):
        if state["enter"]:
            submit(change["new"])

    def on_new(_=None):
        state["dialog"], state["enter"] = [], False
        show()

    msg.on_msg(on_event)
    msg.observe(on_text, names="value")
    send.on_click(lambda _: submit(msg.value))
    new.on_click(on_new)
    pick.observe(lambda _: state.update(enter=False), names="value")
    box = W.VBox([pick, sys_box, W.HBox([msg, send, new]), log])
    box.state = state                        # the dialogue so far (tests and curious readers look here)
    return box


# ------------------------------------------------------------------------------------------------
# Chapter 13: bits per weight and device bandwidth -> tokens/s and memory per part

def device_view(config, bits_per_weight: float, bandwidth_gb_s: float, n_parts: int = 4, kv_len: int = 1024) -> dict:
    """What a device can do with a model at a given weight precision: bytes per decoded token, the tokens/s ceiling,
    and the weight bytes of each part (layers split evenly; part 0 carries the embedding, the last the classifier)."""
    from .ondevice import decode_bytes_per_token, split_layers, tokens_per_second_bound
    layers = split_layers(config.n_layers, n_parts)
    b = decode_bytes_per_token(config, bits_per_weight, kv_len=kv_len)
    per_layer = config.layer_matrix_params() * bits_per_weight / 8
    table = config.vocab_size * config.dim * bits_per_weight / 8
    parts = [len(part) * per_layer for part in layers]
    parts[0] += table                                                 # the embedding
    parts[-1] += table                                                # the classifier
    return {"bytes_per_token": b["total"], "tokens_per_s": tokens_per_second_bound(b["total"], bandwidth_gb_s),
            "part_bytes": parts}


def device_explorer(config, name="Llama 2 7B"):
    """Sliders for bits per weight, bandwidth and parts -> the decode ceiling and memory per part."""
    import ipywidgets as W
    bits = W.FloatSlider(value=4.5, min=2, max=16, step=0.5, description="bits/weight")
    bw = W.FloatSlider(value=60, min=5, max=200, step=5, description="GB/s")
    parts = W.IntSlider(value=4, min=1, max=min(8, config.n_layers), description="parts")
    out = W.HTML()

    def redraw(_=None):
        v = device_view(config, bits.value, bw.value, parts.value)
        sizes = ", ".join(f"{b / 2**30:.2f}" for b in v["part_bytes"])
        out.value = (f"<b>{name}</b> at {bits.value:g} bits/weight on {bw.value:g} GB/s: "
                     f"{v['bytes_per_token'] / 1e9:.2f} GB read per token &rarr; at most "
                     f"<b>{v['tokens_per_s']:.1f} tokens/s</b>; parts of {sizes} GiB")

    for w in (bits, bw, parts):
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([bits, bw, parts]), out])
