"""Reference fixtures, the llm.c way: what transformers' LlamaForCausalLM computes, tensor by tensor.

This script imports torch and transformers only (never llama_ref's maths), so the fixtures are an independent
check of our NumPy forward. For each config below it
  1. builds a seeded random LlamaForCausalLM (float32, eager attention so attention probabilities are returned),
     with weights scaled up from HF's tiny default init so attention is peaky and norm gains matter;
  2. saves it as an ordinary HF directory data/reference/<name>/ (config.json + model.safetensors);
  3. runs it on seeded random tokens and writes data/reference/<name>.npz: `tokens` (B, T) and every activation
     under llama_ref's tap names (embed, layers.{i}.attn_norm, .attn.q/.k (after RoPE), .attn.v, .attn.probs,
     .attn.heads, .attn.out, .attn_residual, .ffn_norm, .ffn.gate, .ffn.up, .ffn.hidden, .ffn.out, .out,
     norm.out, logits), captured with forward hooks on transformers' own modules and its own RoPE function;
  4. for the configs in GRAD_CONFIGS, trains the llm.c way: PyTorch autograd writes data/reference/grads_<name>.npz
     with the cross-entropy loss and the gradient of every parameter, with and without a per-token loss mask, and
     the parameters after a few torch.optim.AdamW steps (weight decay on matrices only, gradient clipping);
  5. for the configs in RLHF_CONFIGS, the RLHF losses (data/reference/rlhf_<name>.npz): a reward model
     (LlamaForSequenceClassification, num_labels 1, on right-padded pairs) with the margin ranking loss
     -logsigmoid(r_chosen - r_rejected - m), and PPO's clipped surrogate + value loss on a LlamaForCausalLM with a
     value head on the final hidden states; each with its loss and the gradient of every parameter;
  6. when the embedded model data/models/tinyworld/ exists: loads it with LlamaForCausalLM.from_pretrained, tokenizes
     real text with sentencepiece and writes data/reference/tinyworld.npz (logits, every layer's output, attention
     probabilities, final norm), so the trained model is checked too;
  7. writes data/reference/manifest.json: this script's sha256, library versions, seeds, configs, file sha256s.

    python scripts/make_reference.py            # (re)write data/reference/
    python scripts/make_reference.py --check    # regenerate into a temp dir and compare with the committed files
    python scripts/make_reference.py --only rope_linear   # write one (new) config, keep the rest

Note: transformers' `hidden_states[-1]` is taken *after* the final norm, so layer outputs are recorded with hooks
on the decoder layers instead.
"""
import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.llama import modeling_llama

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "data" / "reference"

# name -> (HF config changes, batch, seq len, seed). Llama 2 uses rms_norm_eps 1e-5 and rope_theta 10000.
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=176, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "mha":        (dict(), 1, 24, 1),
    "gqa":        (dict(num_key_value_heads=2), 1, 24, 2),
    "rope_theta": (dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-6), 1, 32, 3),
    "untied":     (dict(tie_word_embeddings=False, num_hidden_layers=3), 1, 20, 4),
    "tied":       (dict(tie_word_embeddings=True, num_key_value_heads=2), 1, 20, 5),
    "odd_seq":    (dict(num_key_value_heads=1), 1, 37, 6),            # odd length, multi-query (one k/v head)
    "batch":      (dict(num_key_value_heads=2), 3, 19, 7),
    # RoPE scaling, the three types llama_ref implements; T reaches past the trained length where it matters
    "rope_linear":  (dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}), 1, 40, 8),
    "rope_dynamic": (dict(max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 1, 48, 9),
    "rope_llama3":  (dict(num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64}), 1, 40, 10),
}

# Gradients (llama_ref/backprop.py is checked against these): name -> seed of the batch (tokens, targets, loss mask).
GRAD_CONFIGS = {"mha": 101, "gqa": 102, "tied": 103, "odd_seq": 104}
GRAD_BATCH = (2, 16)                       # (B, T) of the training batch
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, steps=3, grad_clip=1.0)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_model(changes, seed):
    """A seeded random LlamaForCausalLM with weights large enough that every part of the model matters."""
    cfg = transformers.LlamaConfig(**{**BASE, **changes})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))      # gains visibly not 1
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5))  # std 1.5/sqrt(fan_in)
    return model


def capture(model, tokens):
    """Run the model once and return every tap as float32 numpy arrays, keyed by llama_ref's tap names."""
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hs = cfg.hidden_size // nh
    B, T = tokens.shape
    taps, hooks = {}, []

    def heads(x, n):                                       # (B, T, n*hs) -> (B, n, T, hs)
        return x.view(B, T, n, hs).transpose(1, 2)

    def out_hook(name, fn=lambda t: t):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            taps[name] = fn(out)
        return hook

    def in_hook(name, fn=lambda t: t):
        def hook(module, args):
            taps[name] = fn(args[0])
        return hook

    m = model.model
    hooks.append(m.embed_tokens.register_forward_hook(out_hook("embed")))
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}."
        at, mlp = layer.self_attn, layer.mlp
        hooks += [
            layer.input_layernorm.register_forward_hook(out_hook(p + "attn_norm")),
            at.q_proj.register_forward_hook(out_hook(p + "_q", lambda t: heads(t, nh))),
            at.k_proj.register_forward_hook(out_hook(p + "_k", lambda t: heads(t, nkv))),
            at.v_proj.register_forward_hook(out_hook(p + "attn.v", lambda t: heads(t, nkv))),
            at.o_proj.register_forward_pre_hook(in_hook(p + "attn.heads", lambda t: heads(t, nh))),
            at.o_proj.register_forward_hook(out_hook(p + "attn.out")),
            layer.post_attention_layernorm.register_forward_pre_hook(in_hook(p + "attn_residual")),
            layer.post_attention_layernorm.register_forward_hook(out_hook(p + "ffn_norm")),
            mlp.gate_proj.register_forward_hook(out_hook(p + "ffn.gate")),
            mlp.up_proj.register_forward_hook(out_hook(p + "ffn.up")),
            mlp.down_proj.register_forward_pre_hook(in_hook(p + "ffn.hidden")),
            mlp.down_proj.register_forward_hook(out_hook(p + "ffn.out")),
            layer.register_forward_hook(out_hook(p + "out")),
        ]
    hooks.append(m.norm.register_forward_hook(out_hook("norm.out")))
    with torch.no_grad():
        tok = torch.tensor(tokens)
        out = model(tok, output_attentions=True, output_hidden_states=True)
        # q and k after RoPE: transformers' own rotary embedding and apply_rotary_pos_emb on the captured projections
        pos = torch.arange(T)[None].expand(B, T)
        cos, sin = m.rotary_emb(taps["embed"], pos)
        for i in range(cfg.num_hidden_layers):
            q, k = modeling_llama.apply_rotary_pos_emb(taps.pop(f"layers.{i}._q"), taps.pop(f"layers.{i}._k"), cos, sin)
            taps[f"layers.{i}.attn.q"], taps[f"layers.{i}.attn.k"] = q, k
            taps[f"layers.{i}.attn.probs"] = out.attentions[i]
        taps["logits"] = out.logits
        # consistency with transformers' own outputs: hidden_states[i] is the input of layer i
        for i in range(1, cfg.num_hidden_layers):
            assert torch.equal(out.hidden_states[i], taps[f"layers.{i - 1}.out"])
    for h in hooks:
        h.remove()
    return {k: v.detach().numpy().astype(np.float32) for k, v in taps.items()}


def training_batch(vocab_size, seed):
    """Seeded tokens, next-token targets and a loss mask (B, T); the mask keeps about 60% of the positions."""
    rng = np.random.default_rng(seed)
    B, T = GRAD_BATCH
    tokens = rng.integers(0, vocab_size, (B, T)).astype(np.int64)
    targets = rng.integers(0, vocab_size, (B, T)).astype(np.int64)
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = True
    return tokens, targets, mask


def masked_loss(model, tokens, targets, mask):
    """Mean cross-entropy over the positions where mask is True (masked-out targets set to ignore_index=-100)."""
    logits = model(torch.tensor(tokens)).logits                                      # (B, T, V)
    labels = torch.tensor(np.where(mask, targets, -100))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)


def gradients(changes, model_seed, batch_seed, record_step_grads=False):
    """Loss and every parameter's gradient (with and without the mask), and parameters after AdamW steps."""
    model = build_model(changes, model_seed).train()
    tokens, targets, mask = training_batch(model.config.vocab_size, batch_seed)
    out = {"tokens": tokens, "targets": targets, "mask": mask}
    for tag, m in (("", mask), ("_nomask", np.ones_like(mask))):
        model.zero_grad()
        loss = masked_loss(model, tokens, targets, m)
        loss.backward()
        out["loss" + tag] = np.array(loss.item(), np.float64)
        for n, p in model.named_parameters():      # a tied classifier is one parameter: its gradient has both uses
            out[f"grad{tag}/{n}"] = p.grad.detach().numpy().astype(np.float32)
    # AdamW: decay matrices, not the 1-D norm gains; clip the global gradient norm before each step
    model.zero_grad()
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])
    for step in range(ADAMW["steps"]):
        opt.zero_grad()
        masked_loss(model, tokens, targets, mask).backward()
        if record_step_grads:                  # so the optimizer alone can be checked on torch's own gradients
            for n, p in model.named_parameters():
                out[f"adamw_grad{step}/{n}"] = p.grad.detach().numpy().astype(np.float32)
        torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["grad_clip"])
        opt.step()
    for n, p in model.named_parameters():
        out[f"adamw/{n}"] = p.detach().numpy().astype(np.float32)
    return out


# RLHF losses (llama_ref/reward_model.py and ppo.py are checked against these): name -> seed of the batch.
RLHF_CONFIGS = {"gqa": 201, "tied": 202}
RLHF_PAIRS, RLHF_BATCH = 3, (3, 14)           # preference pairs; (B, T) of the PPO batch
PPO = dict(clip=0.2, vf_coef=0.1)
SAFETY_AUX = 0.5                              # the Safety RM's auxiliary loss weight in the fixture
SAFE = [True, True, True, False, True, False]   # chosen rows, then rejected rows: two rejected replies are violations
PAD = 0


def reward_model_loss(changes, model_seed, batch_seed):
    """transformers' LlamaForSequenceClassification (the trunk of the seeded model, a seeded score head) on N chosen
    and N rejected right-padded sequences; loss = mean -logsigmoid(r_c - r_r - margin); every parameter's gradient;
    and the same with the Safety RM's auxiliary loss added (safety_loss, safety_grad/...)."""
    lm = build_model(changes, model_seed)
    cfg = lm.config
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    rm.model.load_state_dict(lm.model.state_dict())
    rng = np.random.default_rng(batch_seed)
    with torch.no_grad():
        rm.score.weight.copy_(torch.tensor(rng.standard_normal((1, cfg.hidden_size)).astype(np.float32)))
    N, T = RLHF_PAIRS, RLHF_BATCH[1]
    lengths = rng.integers(T // 2, T + 1, 2 * N)
    lengths[0] = T                                                   # at least one row without padding
    tokens = np.full((2 * N, T), PAD, np.int64)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(3, cfg.vocab_size, n)           # no pad id inside a sequence
    margins = np.array([1.0, 2 / 3, 0.0], np.float32)[:N]
    rewards = rm(torch.tensor(tokens)).logits[:, 0]                  # (2N,): HF picks each row's last non-pad token
    loss = -torch.nn.functional.logsigmoid(rewards[:N] - rewards[N:] - torch.tensor(margins)).mean()
    loss.backward()
    out = {"tokens": tokens, "last": lengths - 1, "margins": margins, "rewards": rewards.detach().numpy(),
           "loss": np.array(loss.item(), np.float64), "score.weight": rm.score.weight.detach().numpy()}
    for n, p in rm.named_parameters():
        out[f"grad/{n}"] = p.grad.detach().numpy().astype(np.float32)
    # the Safety RM's loss: the same ranking loss + SAFETY_AUX * binary cross-entropy of each reward (as a logit)
    # against the reply being safe (torch's own binary_cross_entropy_with_logits, mean over the 2N replies)
    rm.zero_grad()
    rewards = rm(torch.tensor(tokens)).logits[:, 0]
    safe = np.array(SAFE[:2 * N])
    ranking = -torch.nn.functional.logsigmoid(rewards[:N] - rewards[N:] - torch.tensor(margins)).mean()
    aux = torch.nn.functional.binary_cross_entropy_with_logits(rewards, torch.tensor(safe, dtype=torch.float32))
    loss = ranking + SAFETY_AUX * aux
    loss.backward()
    out.update({"safe": safe, "aux_weight": np.array(SAFETY_AUX), "safety_loss": np.array(loss.item(), np.float64)})
    for n, p in rm.named_parameters():
        out[f"safety_grad/{n}"] = p.grad.detach().numpy().astype(np.float32)
    return out


def ppo_loss(changes, model_seed, batch_seed):
    """PPO's loss on the seeded LlamaForCausalLM with a seeded value head reading the final (normed) hidden states:
    ratio = exp(logp - logp_old), policy loss = mean over masked tokens of max(-A ratio, -A clip(ratio, 1-e, 1+e)),
    value loss = mean (V - R)^2 / 2, loss = policy + vf_coef * value; every parameter's gradient."""
    model = build_model(changes, model_seed).train()
    V = model.config.vocab_size
    rng = np.random.default_rng(batch_seed)
    B, T = RLHF_BATCH
    seq = rng.integers(0, V, (B, T + 1)).astype(np.int64)             # inputs seq[:, :-1], actions seq[:, 1:]
    tokens, actions = seq[:, :-1], seq[:, 1:]
    mask = np.zeros((B, T), bool)
    for b in range(B):                                               # one contiguous reply per row
        start = rng.integers(1, T // 2)
        mask[b, start:rng.integers(start + 2, T + 1)] = True
    adv = rng.standard_normal((B, T)).astype(np.float32)
    returns = rng.standard_normal((B, T)).astype(np.float32)
    w_value = torch.tensor((rng.standard_normal((1, model.config.hidden_size)) * 0.3).astype(np.float32),
                           requires_grad=True)
    out_ = model(torch.tensor(tokens), output_hidden_states=True)
    logp = torch.log_softmax(out_.logits, -1).gather(-1, torch.tensor(actions)[..., None])[..., 0]
    logp_old = (logp.detach().numpy() + rng.normal(0, 0.3, (B, T))).astype(np.float32)   # some ratios leave the range
    values = out_.hidden_states[-1] @ w_value[0]                     # hidden_states[-1]: after the final norm
    m, a, r = torch.tensor(mask), torch.tensor(adv), torch.tensor(returns)
    ratio = torch.exp(logp - torch.tensor(logp_old))
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - PPO["clip"], 1 + PPO["clip"]))
    n = m.sum()
    loss = (pg * m).sum() / n + PPO["vf_coef"] * (0.5 * (values - r) ** 2 * m).sum() / n
    loss.backward()
    out = {"seq": seq, "mask": mask, "adv": adv, "returns": returns, "logp_old": logp_old,
           "value_head.weight": w_value.detach().numpy(), "loss": np.array(loss.item(), np.float64),
           "clip": np.array(PPO["clip"]), "vf_coef": np.array(PPO["vf_coef"]),
           "clipped_share": np.array(float(((torch.abs(ratio - 1) > PPO["clip"]) & m).sum() / n))}
    for name, p in model.named_parameters():
        out[f"grad/{name}"] = p.grad.detach().numpy().astype(np.float32)
    out["grad/value_head.weight"] = w_value.grad.detach().numpy()
    return out


EMBEDDED = REPO / "data" / "models" / "tinyworld"
EMBEDDED_TEXT = [                               # written out here, not taken from llama_ref: two texts of the world
    "Once upon a time, there was a brave girl named Mia. Mia had a pet cat. The cat liked to eat fish. "
    "One day, Mia went to the park with her friend Tom.",
    "User: What does a cow say?\nAssistant: A cow says moo.\nUser: How many legs does a bird have?\n"
    "Assistant: A bird has two legs.",
]
EMBEDDED_TAPS = ("embed", "norm.out", "logits")


def embedded_model_fixture(out_dir: Path):
    """Transformers runs the shipped model on real text; returns (arrays, manifest entry) or None if not trained."""
    if not (EMBEDDED / "config.json").exists():
        print("data/models/tinyworld does not exist yet (make model): no embedded-model fixture")
        return None
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(EMBEDDED / "tokenizer.model"))
    rows = [[sp.bos_id()] + sp.encode(t) for t in EMBEDDED_TEXT]
    T = min(len(r) for r in rows)
    tokens = np.array([r[:T] for r in rows], np.int64)                     # (2, T): same length, no padding
    model = transformers.LlamaForCausalLM.from_pretrained(EMBEDDED, attn_implementation="eager").eval()
    taps = capture(model, tokens)
    keep = {k: v for k, v in taps.items()
            if k in EMBEDDED_TAPS or k.endswith((".out", ".attn.probs")) and not k.endswith((".attn.out", ".ffn.out"))}
    np.savez_compressed(out_dir / "tinyworld.npz", tokens=tokens, **keep)
    entry = {"model_dir": "data/models/tinyworld", "texts": EMBEDDED_TEXT, "tokens_shape": list(tokens.shape),
             "model_sha256": sha256(EMBEDDED / "model.safetensors"), "taps": sorted(keep),
             "sha256": sha256(out_dir / "tinyworld.npz")}
    print(f"tinyworld  B=2 T={T} {len(keep)} taps  max|logit|={np.abs(keep['logits']).max():.2f}")
    return entry


def generate(out_dir: Path, only=None):
    """Write every fixture into out_dir; with `only` (config names), just those, merged into the existing manifest
    (the other fixtures stay as they are)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)                     # one thread: the same summation order on every run
    old = json.loads((out_dir / "manifest.json").read_text()) if only else None
    manifest = {
        "generator": "scripts/make_reference.py",
        "generator_sha256": sha256(__file__),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
        "torch_threads": 1,
        "note": "random LlamaForCausalLM models (float32, eager attention); taps captured with forward hooks",
        "configs": {},
    }
    if old is not None:
        manifest = {**old, "generator_sha256": sha256(__file__), "versions": manifest["versions"],
                    "configs": {n: old["configs"][n] for n in CONFIGS if n in old["configs"]}}
    for name, (changes, B, T, seed) in CONFIGS.items():
        if only and name not in only:
            continue
        model = build_model(changes, seed)
        model.save_pretrained(out_dir / name, safe_serialization=True)
        tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (B, T)).astype(np.int64)
        taps = capture(model, tokens)
        np.savez_compressed(out_dir / f"{name}.npz", tokens=tokens, **taps)
        files = [f"{name}.npz"] + sorted(f"{name}/{p.name}" for p in (out_dir / name).iterdir())
        manifest["configs"][name] = {
            "hf_config": {**json.loads((out_dir / name / "config.json").read_text()),
                          "rope_theta": model.config.rope_parameters["rope_theta"]},   # v5 nests it
            "seed": seed, "tokens_shape": [B, T], "n_taps": len(taps),
            "sha256": {f: sha256(out_dir / f) for f in files},
        }
        print(f"{name:10s} B={B} T={T:3d} {len(taps):3d} taps  max|logit|={np.abs(taps['logits']).max():.2f}")
        if name in GRAD_CONFIGS:
            g = gradients(changes, seed, GRAD_CONFIGS[name], record_step_grads=name == "gqa")
            np.savez_compressed(out_dir / f"grads_{name}.npz", **g)
            manifest["configs"][name]["grads"] = {"batch_seed": GRAD_CONFIGS[name], "batch": list(GRAD_BATCH),
                                                  "adamw": ADAMW, "loss": float(g["loss"]),
                                                  "sha256": sha256(out_dir / f"grads_{name}.npz")}
            print(f"{'':10s} gradients: loss {float(g['loss']):.4f} (masked), {float(g['loss_nomask']):.4f} (all)")
        if name in RLHF_CONFIGS:
            rm, ppo = reward_model_loss(changes, seed, RLHF_CONFIGS[name]), ppo_loss(changes, seed, RLHF_CONFIGS[name])
            np.savez_compressed(out_dir / f"rlhf_{name}.npz", **{f"rm/{k}": v for k, v in rm.items()},
                                **{f"ppo/{k}": v for k, v in ppo.items()})
            manifest["configs"][name]["rlhf"] = {"batch_seed": RLHF_CONFIGS[name], "pairs": RLHF_PAIRS,
                                                 "ppo_batch": list(RLHF_BATCH), "ppo": PPO, "safety_aux": SAFETY_AUX,
                                                 "sha256": sha256(out_dir / f"rlhf_{name}.npz")}
            print(f"{'':10s} RLHF: reward-model loss {float(rm['loss']):.4f}, PPO loss {float(ppo['loss']):.4f} "
                  f"({float(ppo['clipped_share']):.0%} of ratios outside the clip range)")
    embedded = embedded_model_fixture(out_dir) if not only else None
    if embedded is not None:
        manifest["embedded_model"] = embedded
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file() and not p.name.startswith(("grads", "rlhf", "sampling", "tinyworld")))
    print(f"wrote {out_dir} ({size / 1e6:.2f} MB)")


def compare_npz(new_path: Path, old_path: Path, bad: list) -> None:
    """Append to `bad` every tensor of the committed `old_path` that the regenerated `new_path` does not reproduce.

    Same library, same thread count: identical bits on one machine. Another CPU may pick other float32 kernels
    (AVX2 vs AVX-512), so allow 1e-5 of the tensor's scale. Parameters after AdamW steps (`adamw/...`) get one
    more allowance: Adam divides each gradient by its own running rms, so an element whose gradient is float32
    noise (|g| ~ 1e-9) takes a step set by that noise, and another CPU's noise moves it differently. Up to 0.1% of
    such elements may differ by up to 1e-3 of the scale (measured across CPUs: 1-2 of 4096-11264, at most 8.4e-5);
    a wrong optimizer moves every element."""
    f = old_path.name
    new, old = np.load(new_path), np.load(old_path)
    if set(new.files) != set(old.files):
        bad.append(f"{f}: tensor names differ: {sorted(set(new.files) ^ set(old.files))}")
        return
    for k in new.files:
        a, b = new[k], old[k]
        scale = max(1.0, float(np.abs(b).max()))
        if a.shape != b.shape:
            bad.append(f"{f}[{k}] differs in shape: {a.shape} vs {b.shape}")
            continue
        diff = np.abs(a.astype(np.float64) - b)
        off = diff > 1e-5 * scale
        if k.startswith("adamw/") and off.mean() <= 1e-3 and diff.max() <= 1e-3 * scale:
            continue
        if off.any():
            bad.append(f"{f}[{k}] differs ({int(off.sum())} of {off.size} elements, max {diff.max():.1e})")


def check():
    """Regenerate into a temp dir; every tensor must match the committed one (and the weights byte for byte)."""
    committed = json.loads((OUT / "manifest.json").read_text())
    bad = []
    if committed["generator_sha256"] != sha256(__file__):
        print("note: this script changed since the fixtures were written; comparing the outputs anyway")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in CONFIGS:
            for f in sorted((Path(tmp) / name).iterdir()):
                if f.name == "model.safetensors" and f.read_bytes() != (OUT / name / f.name).read_bytes():
                    bad.append(f"{name}/{f.name}: weights differ")
            for f in [f"{name}.npz"] + ([f"grads_{name}.npz"] if name in GRAD_CONFIGS else []) \
                    + ([f"rlhf_{name}.npz"] if name in RLHF_CONFIGS else []):
                compare_npz(Path(tmp) / f, OUT / f, bad)
        if (OUT / "tinyworld.npz").exists():
            if not (Path(tmp) / "tinyworld.npz").exists():
                bad.append("tinyworld.npz: committed, but the embedded model is missing")
            else:
                compare_npz(Path(tmp) / "tinyworld.npz", OUT / "tinyworld.npz", bad)
    if bad:
        print("MISMATCH between regenerated and committed fixtures:\n  " + "\n  ".join(bad))
        return 1
    print("regenerated fixtures match the committed ones")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare; exit 1 on mismatch")
    ap.add_argument("--only", default=None, help="comma-separated config names: write just these (new fixtures), "
                                                 "keeping the others and merging them into the manifest")
    args = ap.parse_args()
    sys.exit(check() if args.check else generate(OUT, args.only.split(",") if args.only else None))
