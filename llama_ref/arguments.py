"""Checking a public function's arguments: the rule every function of `llama_ref.__all__` and every function a chapter
calls follows, so that `load(123)` or `generate(model, [1.9, 2.7])` is an InputError naming the argument, not a
TypeError from deep inside pathlib or NumPy, or a silent int() of 1.9.

No chapter teaches it; DEVELOPING.md states the rule. `@checked` reads the function's signature once, when the module
is imported: each parameter's annotation (`int`, `float`, `bool`, `str`, a path, `list[int]`, `np.ndarray`, a class
such as `Llama` or `LlamaConfig`, `X | None`) or, without one, the type of its default, or a few names every module
uses alike (`model`, `tokenizer`, `config`, `tokens`, `x`). On every call it checks the arguments given (defaults are
trusted) and raises InputError(f"{function}: {argument}={value!r} must be {what it accepts}"). It checks kinds, not
ranges: a negative count is the function's own business (and its own InputError). A dataclass decorated with
`@checked` checks its fields the same way when it is built.

    @checked
    def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int = 64, ...): ...
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import types
import typing

import numpy as np

from .errors import InputError

_NUMBERS = (int, float, np.integer, np.floating)


# ------------------------------------------------------------------------------------------------
# What a kind accepts: a test and the words an error uses

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, _NUMBERS) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)


def _is_path(v) -> bool:
    if isinstance(v, bytes) or not isinstance(v, (str, os.PathLike)):
        return False
    text = os.fspath(v)
    return isinstance(text, str) and bool(text.strip()) and "\0" not in text


def _is_ids(v) -> bool:
    """Token ids: a list/tuple of ints, or an integer array (any shape); never floats, bools or a string."""
    if isinstance(v, np.ndarray):
        return v.dtype.kind in "iu"
    if not isinstance(v, (list, tuple)):
        return False
    return all(_is_int(t) or (isinstance(t, (list, tuple, np.ndarray)) and _is_ids(t)) for t in v)


def _is_array(v) -> bool:
    """Numbers in an array or nested lists (NumPy would take it), at least one axis: not a bare number, a string,
    bytes, None, a dict or objects."""
    if isinstance(v, np.ndarray):
        return v.dtype.kind in "biuf" and v.ndim >= 1
    if not isinstance(v, (list, tuple)):
        return False
    try:
        a = np.asarray(v)
    except (ValueError, TypeError):
        return False
    return a.dtype.kind in "biuf" and a.ndim >= 1


def _is_texts(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v)


def _is_config(v) -> bool:
    return all(hasattr(v, a) for a in ("dim", "n_layers", "n_heads", "vocab_size", "head_dim"))


KINDS = {                                          # kind -> (test, what it accepts)
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, (bool, np.bool_)), "True or False"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "path": (_is_path, "a path (a str or pathlib.Path)"),
    "ids": (_is_ids, "token ids (a list of ints or an integer array)"),
    "array": (_is_array, "an array of numbers"),
    "list": (lambda v: isinstance(v, (list, tuple)), "a list"),
    "texts": (_is_texts, "a list of strings"),
    "config": (_is_config, "a LlamaConfig"),
    "dict": (lambda v: isinstance(v, dict), "a dict"),
    "model": (lambda v: hasattr(v, "forward") and hasattr(v, "config"), "a model (llama_ref.Llama)"),
    "tokenizer": (lambda v: (hasattr(v, "encode") and hasattr(v, "decode")) or _is_path(v),   # exporters take its file
                  "a tokenizer (llama_ref.tokenizer.Tokenizer) or its file"),
}
NAMES = {"model": "model", "tokenizer": "tokenizer", "tok": "tokenizer", "config": "config", "cfg": "config",
         "tokens": "ids", "ids": "ids", "prompt_ids": "ids",
         **dict.fromkeys(("path", "model_path", "out_dir"), "path"),      # not tokenizer_path: bytes are fine there
         **dict.fromkeys(("x", "w", "logits", "data", "values", "probs", "dout", "dy", "dh", "gate", "up", "cos", "sin",
                          "ref_logits", "q_logits", "ref_logprobs"), "array"),
         **dict.fromkeys(("texts", "questions", "sentences"), "texts"),
         **dict.fromkeys(("n", "n_tokens", "max_new_tokens", "max_len", "seq_len", "batch_size", "head_dim", "n_heads",
                          "n_layers", "layer", "steps", "seed", "top_k", "prompt_len", "context", "threads",
                          "n_parts", "group_size", "max_pos"), "int"),
         **dict.fromkeys(("top_p", "lr", "eps", "theta", "beta", "std", "noise", "time_budget_s"),
                         "float")}


# ------------------------------------------------------------------------------------------------
# From a signature to checks

def _kind_of(annotation, default, name, env):
    """(test, words) for one parameter, or None when nothing is known about it."""
    allow_none = default is None                                    # None is what the default means
    ann = annotation
    if isinstance(ann, str):
        try:
            ann = eval(ann, env)                                    # noqa: S307 - the module's own annotations
        except Exception:                                           # noqa: BLE001 - a name only a type checker sees
            ann = inspect.Parameter.empty
    if ann is not inspect.Parameter.empty:
        return _from_annotation(ann, allow_none)
    if name in NAMES:
        return _optional(KINDS[NAMES[name]], allow_none)
    for t, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if type(default) is t:
            return KINDS[kind]
    if isinstance(default, os.PathLike):
        return KINDS["path"]
    if isinstance(default, tuple) and default and all(_is_number(d) for d in default):   # thetas=(10000.0,)
        return ((lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_number(d) for d in v)),
                "a list of numbers")
    return None


def _optional(kind, allow_none):
    if kind is None or not allow_none:
        return kind
    test, words = kind
    return (lambda v: v is None or test(v)), f"{words} or None"


def _from_annotation(ann, allow_none):
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        allow_none = allow_none or len(parts) < len(args)
        kinds = [_from_annotation(a, False) for a in parts]
        if any(k is None for k in kinds):
            return None
        tests, words = [k[0] for k in kinds], " or ".join(k[1] for k in kinds)
        return _optional(((lambda v: any(t(v) for t in tests)), words), allow_none)
    if ann in (int, np.integer):
        return _optional(KINDS["int"], allow_none)
    if ann is float:
        return _optional(KINDS["float"], allow_none)
    if ann is bool:
        return _optional(KINDS["bool"], allow_none)
    if ann is str:
        return _optional(KINDS["str"], allow_none)
    if ann in (os.PathLike, os.PathLike[str]) or (isinstance(ann, type) and issubclass(ann, os.PathLike)):
        return _optional(KINDS["path"], allow_none)
    if ann is np.ndarray:
        return _optional(KINDS["array"], allow_none)
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        inner = args[0] if args else None
        return _optional(KINDS["ids"] if inner is int else KINDS["list"], allow_none)
    if origin is dict or ann is dict:
        return _optional(KINDS["dict"], allow_none)
    if isinstance(ann, type) and ann.__module__.startswith("llama_ref"):
        return _optional(((lambda v: isinstance(v, ann)), f"a {ann.__name__}"), allow_none)
    return None


def _specs(fn, skip_first=False):
    sig = inspect.signature(fn)
    module = inspect.getmodule(fn)
    env = dict(vars(module) if module else {}, np=np, os=os)
    own = OWN_CHECKS.get(f"{module.__name__.rpartition('.')[2] if module else ''}.{fn.__name__}", "").split()
    specs = []
    for i, p in enumerate(sig.parameters.values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (skip_first and i == 0) or p.name in own:
            continue
        kind = _kind_of(p.annotation, p.default, p.name, env)        # a required parameter's default: empty
        if kind is not None:
            specs.append((i if p.kind != p.KEYWORD_ONLY else None, p.name, kind))
    return specs


def _fail(where, name, value, words):
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise InputError(f"{where}: {name}={shown} must be {words}")


def checked(obj):
    """Check a function's (or a dataclass's) arguments against its signature on every call (module docstring)."""
    if isinstance(obj, type):                      # a class: its __init__ checks, self skipped
        init = obj.__init__
        specs = _specs(init, skip_first=True)
        where = obj.__name__ if dataclasses.is_dataclass(obj) else obj.__qualname__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            _check(where, specs, (self,) + args, kwargs)
            init(self, *args, **kwargs)
        obj.__init__ = __init__
        return obj
    fn = obj
    specs = _specs(fn, skip_first="." in fn.__qualname__.split("<locals>")[-1])     # a method skips self
    where = obj.__qualname__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _check(where, specs, args, kwargs)
        return fn(*args, **kwargs)
    return wrapper


def _check(where, specs, args, kwargs):
    for i, name, (test, words) in specs:
        if i is not None and i < len(args):
            value = args[i]
        elif name in kwargs:
            value = kwargs[name]
        else:
            continue
        if not test(value):
            _fail(where, name, value, words)


# ------------------------------------------------------------------------------------------------
# The boundary: every function of llama_ref.__all__ and every function a chapter calls, by module. Checked when the
# module is imported (install), so the modules themselves carry no decorators; tests/test_arguments.py fails when a
# chapter calls a function that is not listed here, and generates hostile arguments for each one from its signature.

BOUNDARY = {
    "__main__": "build_parser",
    "backprop": "AdamW attention_backward attention_forward clip_grad_norm cross_entropy_backward cross_entropy_forward "
                "embedding_backward forward_backward init_weights linear_backward linear_forward lr_schedule "
                "rmsnorm_backward rmsnorm_forward rope_backward rope_forward swiglu_backward swiglu_forward",
    "chat": "encode_dialog fit_dialog format_dialog turn_strings reply",
    "config": "RopeScaling",
    "corpus": "check_fact generate_dialogues generate_stories is_grammatical iter_training_text make_world qa_pairs "
              "split_sentences",
    "evaluate": "accuracy_study answer_questions compare_logits complete_sentences difference mean_estimate ngram_losses "
                "rate sample_continuations story_prompts stream_loss token_stream validation_batches",
    "gatt": "Instruction answer_accuracy baseline_sft_data corpus_dialogues eval_dialogues eval_references "
            "gatt_examples last_turn_example make_batches run_chat run_chats sample_gatt_dialogue strip_instruction "
            "system_attention",
    "generate": "generate sampling_probs stream generate_batch",
    "gguf_io": "save_gguf",
    "inspect": "Checks ablate_heads compare format_table forward_patched logit_lens residual_stream summarize load_reference",
    "llama2c": "save_llama2c",
    "loader": "checkpoint_bytes find_tokenizer load read_chat_template read_checkpoint",
    "matrices": "bf16_to_f32 f16_to_f32",
    "memory": "kv_cache_bytes plan_memory",
    "model": "KVCache Llama Llama.forward causal_attention rope_freqs",
    # causal_attention (once per layer) has one checked argument, `block`, which the forward never passes; the
    # primitives in UNCHECKED stay out (below)
    "ondevice": "OnDeviceLlama StaticA16 calibrate conv1x1 conv_layers decode_bytes_per_token from_nchw linear_to_conv "
                "measure_bandwidth measure_decode single_head_attention to_nchw tokens_per_second_bound",
    "ondevice_onnx": "OnnxOnDeviceLlama calibration_prompts_for export_qnn_onnx op_census quantized_for_device",
    "onnx_export": "export_onnx int4_reference run session",
    "plots": "activation_histograms adherence_curves attention_heatmaps best_of_n_curves head_gain logit_lens_grid "
             "loss_by_position ppo_curves q4_0_block residual_norms reward_model_accuracy rope_frequencies "
             "rope_relative_scores rope_rotations split_graphs",
    "ppo": "PPOSettings gae kl_rewards ppo_loss ppo_step rollout token_logprobs",
    "preferences": "Annotator judge make_prompts read_preferences true_quality",
    "quant": "Q8_0Matrix dequantize_q4_0 dequantize_q8_0 dequantize_w4 fake_quantize_activations held_nbytes matmul_q8_0_int "
             "q4_0_split q8_0_split quantize_int8 quantize_matrix quantize_model quantize_q4_0 quantize_q8_0 "
             "quantize_w4 round_half_away save_quantized set_integer_dot vec_dot_q8_0",
    "reward_model": "load_reward_model ranking_loss ranking_loss_backward reward_backward reward_forward",
    "rlhf": "rejection_sampling_examples reply_logprobs sample_replies",
    "synthetic": "q4_k_m_type vocabulary_for write_gguf write_hf",
    "tokenizer": "BPETokenizer Tokenizer load_model_proto proto_from_vocab",
    "trace": "Trace",
    "trainer": "TrainSettings tokenize_documents train",
    "weights": "permute_qk_hf_to_meta permute_qk_meta_to_hf weight_shapes",
    "widgets": "annotator_explorer annotator_view attention_explorer attention_view beta_explorer chat_box "
               "device_explorer generation_step generation_stepper reward_probe reward_probe_box rmsnorm_explorer "
               "rmsnorm_view rope_explorer rope_view side_by_side_chat training_explorer",
}

# Chapters call these too, but the forward calls them per layer per token, and checking them cost 2-3% of decode
# (measured interleaved): Llama.forward checks what reaches them. tests/test_arguments.py leaves them out.
UNCHECKED = {"model": "rms_norm softmax silu apply_rope_hf apply_rope_meta attention causal_mask",
             "ondevice": "fake_quant16",     # the twin's per-tensor rounding: arrays or numpy scalars, as its callers pass
             "ppo": "Rollout"}    # a record of arrays (tests leave None where a loss reads nothing); its users check it

# Parameters a function checks itself, with its own error class (chapters catch SamplingError from generate), or of a
# wider kind than the default says (sample_replies takes one temperature or a (low, high) range).
OWN_CHECKS = {"generate.generate": "temperature top_k top_p seed", "generate.stream": "temperature top_k top_p seed",
              "generate.sampling_probs": "temperature top_k top_p", "generate.generate_batch": "temperature top_k top_p",
              "rlhf.sample_replies": "temperature",
              "quant.quantize_model": "model"}        # a weights dict is told to use quantize_weights (QuantizationError)


def guard_module(module) -> None:
    """Wrap the module's boundary functions and classes (BOUNDARY) with `checked`, in place."""
    for name in BOUNDARY.get(module.__name__.rpartition(".")[2], "").split():
        owner, _, attr = name.rpartition(".")
        holder = getattr(module, owner, None) if owner else module
        obj = getattr(holder, attr, None) if holder is not None else None
        if obj is None or (vars(obj) if isinstance(obj, type) else getattr(obj, "__dict__", {})).get(
                "__llama_ref_checked__", False):                  # a class's own mark, not its base class's
            continue
        if owner and inspect.getmodule(obj) is not module:
            continue
        if not owner and getattr(obj, "__module__", None) != module.__name__:
            continue                                               # imported from elsewhere: checked there
        wrapped = checked(obj)
        wrapped.__llama_ref_checked__ = True
        setattr(holder, attr, wrapped)


class _Finder:
    """Finds llama_ref's modules as Python would, and guards each one when it has been executed."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("llama_ref.") or name.rpartition(".")[2] not in BOUNDARY:
            return None
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        guard_module(module)

    def __getattr__(self, name):                                    # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


def install() -> None:
    """Guard every llama_ref module imported from now on (llama_ref/__init__.py calls it first)."""
    import sys
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
