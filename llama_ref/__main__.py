"""Command line: `python -m llama_ref <command> --help`. All CLI code lives here; each command calls the library.

Chapter 14 runs `inspect --save / --compare`; chapter 08 shows `chat`.

  generate   continue a prompt (text or ids) with a model; prefill and decode timed separately
  tokenize   show the ids and pieces of a text
  inspect    run a prompt and print/save named activations (taps) to compare with another engine
  chat       talk to a chat model in the Llama 2 chat format
  quantize   write a quantized copy of a model (q8_0, q4_0, w4a16-g64, int8-channel)
  export     write a model as GGUF, llama2.c .bin, or ONNX (ONNX Runtime GenAI, int4, on-device graphs)
  train      train a model with the NumPy trainer

Every command takes --help. Errors in what you give (paths, ids, settings, option values) print one `error:` line
and exit 2; nothing is written before the inputs and the output are checked. Output written with `|` to a program
that stops reading (`| head`) ends quietly (exit 141, as Unix tools do); a full disk is one `error:` line.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .errors import ChatFormatError, ConfigError, InputError, LlamaRefError, OutputError, TokenizerError, TrainingError
from . import gguf_io, inspect as ins, paths, quant, tinyworld, trace as tr
from .chat import default_chat_model, format_dialog, read_dialog_json, read_stdin, reply
from .generate import MAX_TEMPERATURE
from .output import check_output
from .generate import GenerationResult, check_sampling, stream
from .gguf_io import read_gguf_vocab
from .llama2c import save_llama2c
from .loader import find_tokenizer, load, read_chat_template, read_checkpoint, tokenizer_source
from .memory import require, training_bytes
from .model import Llama
from .tokenizer import Tokenizer, proto_from_vocab


# ------------------------------------------------------------------------------------------------
# shared helpers

def load_model(args, n_tokens=None):
    """The one loader (llama_ref.load) with the command's --pack/--memory-budget. The plan it chose is kept as
    model.memory (--json reports it; say_plan prints it once the inputs are known to be good)."""
    budget = None if args.memory_budget is None else int(args.memory_budget * 2 ** 30)
    return load(args.model, pack=args.pack, memory_budget=budget, n_tokens=n_tokens)


def say_plan(args, model) -> None:
    """One stderr line: which path the loader took and the memory it expects (not with --json: that reports it)."""
    if not getattr(args, "json", False):
        print(f"[{model.source}: {model.memory}]", file=sys.stderr)


def model_tokenizer(args, model):
    """--tokenizer, else the one beside the model or inside its .gguf; checked against the model's vocabulary."""
    tok = find_tokenizer(args.model, args.tokenizer)
    if tok is not None and tok.vocab_size != model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
                          f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    return tok


def prompt_token_bound(args) -> int:
    """At most how many tokens the prompt becomes, known before the model is loaded (for the memory plan): ids as
    given, or one per UTF-8 byte plus BOS (SentencePiece with byte fallback never makes more)."""
    if getattr(args, "prompt_ids", None) is not None:
        return max(1, len(parse_ids(args.prompt_ids)))
    return len((args.prompt or "").encode("utf-8", "replace")) + 2


def parse_ids(text: str, vocab_size: int | None = None) -> list[int]:
    """--prompt-ids "1,450,3290" -> [1, 450, 3290], each checked against the model's vocabulary."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers like 1,450,3290; got {text!r}") from None
    bad = [i for i in ids if vocab_size is not None and not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"prompt token id {bad[0]} is out of range: the model's vocabulary has ids 0..{vocab_size - 1}")
    return ids


def writer_tokenizer(args):
    """The tokenizer a writer puts beside the weights (the one find_tokenizer finds: a .model path, or a GGUF's
    vocabulary), loaded once first so a missing or corrupt one is refused before any work."""
    src = tokenizer_source(args.model, args.tokenizer)
    if src is None or find_tokenizer(args.model, args.tokenizer) is None:
        return None
    return read_gguf_vocab(src) if src.suffix == ".gguf" else src


def check_out(path, force, kind="file", inputs=()) -> bool:
    """The output policy's check of an output option, before any work (output.check_output, with the inputs the
    command reads). Returns the force to write with: True only when it replaces what is there now, so a path that
    appears while the command works is never replaced (the writer's rename refuses it)."""
    path = check_output(path, force=force, kind=kind, inputs=[p for p in inputs if p is not None])
    return bool(force) and os.path.lexists(path)


def model_path(args) -> Path:
    return Path(args.model) if args.model is not None else paths.DEFAULT_MODEL


def print_json(obj) -> None:
    """One JSON object on stdout, strict: a value that is not a finite number (a rate over zero tokens) is null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    print(json.dumps(clean(obj), allow_nan=False))


# ------------------------------------------------------------------------------------------------
# commands: each parses nothing itself and calls the library

def cmd_generate(args) -> int:
    """Encode the prompt, prefill, decode; print text (streamed) or one JSON object."""
    check_sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model = load_model(args, prompt_token_bound(args) + args.max_new_tokens)
    tok = model_tokenizer(args, model)
    if args.prompt_ids is not None:
        prompt_ids = parse_ids(args.prompt_ids, model.config.vocab_size)
    else:
        if tok is None:
            raise TokenizerError("this model has no tokenizer (no tokenizer.model beside it, no vocabulary in the "
                                 "GGUF): pass --tokenizer PATH, or give the prompt as ids with --prompt-ids 1,2,3")
        prompt_ids = tok.encode(args.prompt, bos=True)
    result = GenerationResult([], [], "length", 0.0, 0.0)
    steps = stream(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                   stop_at_eos=not args.no_stop, result=result)
    say_plan(args, model)
    if args.json:
        for _ in steps:
            pass
        out = {"prompt_ids": result.prompt_ids, "ids": result.ids, "stop_reason": result.stop_reason,
               "prefill_s": result.prefill_s, "decode_s": result.decode_s,
               "prefill_tok_s": result.prefill_tok_s, "decode_tok_s": result.decode_tok_s,   # null: no tokens decoded
               "n_prompt": len(result.prompt_ids), "n_decode": result.n_decode, "memory": model.memory.to_json()}
        if tok is not None:
            out["text"] = tok.decode(prompt_ids + result.ids)[len(tok.decode(prompt_ids)):]   # the continuation
        print_json(out)
        return 0
    if tok is None:
        for t in steps:
            print(t, end=" ", flush=True)
        print()
    else:
        printed = tok.decode(prompt_ids)
        print(printed, end="", flush=True)
        for _ in steps:          # decode prompt + reply each time: a piece's leading space survives, bytes join up
            text = tok.decode(prompt_ids + result.ids)
            print(text[len(printed):], end="", flush=True)
            printed = text
        print()
    print(f"[prefill {len(result.prompt_ids)} tokens: {result.prefill_tok_s:.1f} tok/s, time to first token "
          f"{result.prefill_s * 1000:.1f} ms | decode {result.n_decode} tokens: {result.decode_tok_s:.1f} tok/s | "
          f"stop: {result.stop_reason}]", file=sys.stderr)
    return 0


def cmd_tokenize(args) -> int:
    """Print the ids and pieces of --text (one JSON object with --json)."""
    tok = Tokenizer(args.tokenizer or paths.DEFAULT_TOKENIZER, impl=args.impl)
    ids = tok.encode(args.text, bos=args.bos, eos=args.eos)
    pieces = tok.pieces(ids)
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    else:
        print(f"{len(ids)} tokens ({tok.impl}, {tok.path.name}, vocab {tok.vocab_size})")
        width = max([len(str(i)) for i in ids] + [2])
        for i, p in zip(ids, pieces):
            print(f"{i:>{width}}  {p!r}")
    return 0


def cmd_inspect(args) -> int:
    """Run the prompt once, print shape and statistics of every tap matching --tap, save them as .npz."""
    save_force = check_out(args.save, args.force, "file", [model_path(args), args.tokenizer, args.compare]) \
        if args.save else False
    ref = ins.load_reference(args.compare) if args.compare else None    # headers checked: nothing loaded yet
    model = load_model(args, prompt_token_bound(args))
    patterns = args.tap or ["*"]
    names = tr.match_taps(model.config, patterns)                 # a pattern matching nothing is an error
    if args.prompt_ids is not None:
        ids = parse_ids(args.prompt_ids, model.config.vocab_size)
    else:
        tok = model_tokenizer(args, model)
        if tok is None:
            raise TokenizerError("this model has no tokenizer (no tokenizer.model beside it, no vocabulary in the "
                                 "GGUF): pass --tokenizer PATH, or give the prompt as ids with --prompt-ids 1,2,3")
        ids = tok.encode(args.prompt, bos=True)
    if ref is not None and "tokens" in ref:                       # a bad reference is refused before the forward
        shape = ref.shapes["tokens"] if isinstance(ref, ins.NpzArchive) else np.shape(ref["tokens"])
        made = np.asarray(ref["tokens"]).reshape(-1).tolist() if math.prod(shape) == len(ids) else None
        if made != ids:
            raise InputError(f"{args.compare} was made from other tokens ({'shape ' + str(tuple(shape)) if made is None else made}"
                             f") than this prompt's {ids}; run the same prompt (--prompt-ids)")
    trace = tr.Trace(*patterns)
    model.forward(np.asarray([ids], dtype=np.int64), trace=trace)  # (1, T): taps keep the batch axis
    stats = {n: ins.summarize(trace[n], args.values) for n in names}
    out = {"model": str(model.source), "tokens": ids, "taps": stats, "memory": model.memory.to_json()}
    if args.compare:
        rows = ins.compare(trace, ref, names)
        out["compare"] = [{k: (list(v) if isinstance(v, tuple) else None if isinstance(v, float) and not np.isfinite(v)
                               else v) for k, v in r.items()} for r in rows]       # strict JSON: no Infinity/NaN
    if args.save:
        ins.save_npz(args.save, {**{n: trace[n] for n in names}, "tokens": np.asarray([ids], dtype=np.int64)},
                     force=save_force)
        out["saved"] = str(args.save)
    if args.json:
        print_json(out)
        return 0
    print(f"model {model.source}: {model.memory}")
    print(f"tokens ({len(ids)}): {ids}")
    print(f"{'tap':28s} {'shape':>18s} {'mean':>11s} {'std':>10s} {'min':>11s} {'max':>11s}  first values")
    for n, s in stats.items():
        print(f"{n:28s} {'x'.join(map(str, s['shape'])):>18s} {s['mean']:11.4e} {s['std']:10.4e} "
              f"{s['min']:11.4e} {s['max']:11.4e}  {' '.join(f'{v:.4g}' for v in s['first'])}")
    if args.compare:
        print(f"\nagainst {args.compare}:")
        print(ins.format_table(rows))
    if args.save:
        print(f"saved {len(names)} taps and 'tokens' to {args.save}")
    return 0


def cmd_chat(args) -> int:
    """`python -m llama_ref chat`: --format-only prints prompt ids; stdin JSON -> one answer; a TTY -> a chat."""

    if args.format_only:
        tok = find_tokenizer(args.model, args.tokenizer) or Tokenizer(paths.DEFAULT_TOKENIZER)
        dialog = read_dialog_json(read_stdin())
        if args.system is not None:
            if isinstance(dialog, list) and dialog and isinstance(dialog[0], dict) and dialog[0].get("role") == "system":
                raise ChatFormatError("the dialogue on stdin already has a system message: drop --system or that message")
            if isinstance(dialog, list):
                dialog = [{"role": "system", "content": args.system}] + dialog
        ids = format_dialog(dialog, tok)
        if args.json:
            print_json({"ids": ids, "pieces": tok.pieces(ids), "n_tokens": len(ids)})
        else:
            print(" ".join(str(i) for i in ids))
        return 0

    check_sampling(args.temperature, args.top_k, args.top_p, args.seed)
    args.model = args.model or default_chat_model()
    if args.model is None:
        raise InputError("no chat model found (data/models/tinyworld-gatt or tinyworld-chat): build them with "
                         "`make gatt`, or pass --model PATH")
    source = args.model
    model = load_model(args)
    tok = model_tokenizer(args, model)
    if tok is None:
        raise TokenizerError("this model has no tokenizer (none beside it, no vocabulary in the GGUF): pass "
                             "--tokenizer PATH")
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, policy=args.policy)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []

    if sys.stdin is None or sys.stdin.closed or not sys.stdin.isatty():   # scripting: one dialogue in, one answer out
        dialog = read_dialog_json(read_stdin())
        if system and isinstance(dialog, list) and dialog and isinstance(dialog[0], dict) \
                and dialog[0].get("role") == "system":
            raise ChatFormatError("the dialogue on stdin already has a system message: drop --system or that message")
        dialog = system + list(dialog) if system and isinstance(dialog, list) else dialog
        text, res, dropped = reply(model, tok, dialog, seed=args.seed, **kw)
        if args.json:
            print_json({"role": "assistant", "content": text, "ids": res.ids, "prompt_ids": res.prompt_ids,
                        "stop_reason": res.stop_reason, "dropped_pairs": dropped,
                        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "n_decode": res.n_decode,
                        "memory": model.memory.to_json()})
        else:
            print(text)
        return 0

    print(f"chatting with {source} (empty line or /quit ends, /reset starts over)", file=sys.stderr)
    dialog = list(system)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except UnicodeDecodeError:
            print("error: that line is not valid UTF-8; type it again", file=sys.stderr)
            continue
        except EOFError:
            break
        if line.strip() in ("", "/quit"):
            break
        if line.strip() == "/reset":
            dialog, turn = list(system), 0
            continue
        dialog.append({"role": "user", "content": line})
        shown, got = "", []
        print("assistant> ", end="", flush=True)

        def show(t):
            nonlocal shown
            got.append(t)
            text = tok.decode([i for i in got if i != tok.eos_id]).lstrip()
            print(text[len(shown):], end="", flush=True)
            shown = text
        try:
            text, res, dropped = reply(model, tok, dialog, seed=args.seed + turn, on_token=show, **kw)
        except ChatFormatError:
            dialog.pop()
            raise
        print()
        if dropped:
            print(f"[the oldest {dropped} exchange(s) no longer fit the {model.config.max_seq_len}-token window "
                  "and were dropped; the system message is kept]", file=sys.stderr)
        dialog.append({"role": "assistant", "content": text})
        turn += 1
    return 0


def cmd_quantize(args) -> int:
    """Quantize every matmul weight; write GGUF (q8_0/q4_0, --out *.gguf) or our quantized directory format."""
    args.scheme = args.scheme.lower()
    policy = quant.parse_scheme(args.scheme)
    if str(args.out).endswith(".gguf") and args.scheme not in ("q8_0", "q4_0"):
        raise InputError(f"GGUF has no type for {args.scheme}; write it as a directory (an --out without .gguf) "
                         "or choose --scheme q8_0 / q4_0")
    force = check_out(args.out, args.force, "file" if str(args.out).endswith(".gguf") else "dir",
                      [model_path(args), args.tokenizer])
    tok = writer_tokenizer(args)
    template = read_chat_template(args.model)                         # a chat model's export stays a chat model
    config, weights = read_checkpoint(args.model)
    qweights = quant.quantize_weights(config, weights, args.scheme)
    if str(args.out).endswith(".gguf"):
        gguf_io.save_gguf(args.out, config, qweights, tok, args.scheme, force=force, chat_template=template)
    else:
        if isinstance(tok, gguf_io.GGUFVocab):                       # a .gguf's vocabulary, as a .model's bytes
            tok = proto_from_vocab(*tok)
        quant.save_quantized(args.out, Llama(config, qweights), args.scheme, tokenizer_path=tok, force=force,
                             chat_template=template)
    n = sum(math.prod(w.shape) for w in qweights.values())
    held = sum(w.nbytes for w in qweights.values())
    summary = {"out": str(args.out), "scheme": args.scheme, "policy": policy, "bytes": held,
               "bits_per_weight": 8 * held / n, "tokenizer": str(tok) if isinstance(tok, Path) else bool(tok)}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: {args.scheme}, {held / 2**20:.2f} MiB of weights, {8 * held / n:.2f} bits/weight")
    return 0


def cmd_export(args) -> int:
    """Write a model as GGUF (f32/f16/q8_0/q4_0), a llama2.c .bin (float32), or ONNX: a decoder for ONNX Runtime
    (GenAI) in float32 or int4, or Qualcomm-style on-device graphs (W4A16, 2 static graphs per part)."""
    if args.format.startswith(("onnx", "qnn")):
        return export_onnx_formats(args)
    force = check_out(args.out, args.force, "file", [model_path(args), args.tokenizer])
    tok = writer_tokenizer(args) if args.format != "llama2c" else None
    config, weights = read_checkpoint(args.model)
    if args.format == "llama2c":
        floats = {k: (v.dequantize() if isinstance(v, quant.QuantizedMatrix) else v) for k, v in weights.items()}
        save_llama2c(args.out, config, floats, force=force)             # the old file stays until the new one is whole
    else:
        gguf_io.save_gguf(args.out, config, weights, tok, args.format.removeprefix("gguf-"), force=force,
                          chat_template=read_chat_template(args.model))
    if args.json:
        print_json({"out": str(args.out), "format": args.format})
    else:
        print(f"wrote {args.out} ({args.format})")
    return 0


def export_onnx_formats(args) -> int:
    """--format onnx / onnx-int4 / qnn-onnx: every input is checked (the extra, --out, the tokenizer, --parts, int4
    block shapes) before a file is written."""
    from . import ondevice_onnx, onnx_export
    onnx_export.require_onnx()
    force = check_out(args.out, args.force, "dir", [model_path(args), args.tokenizer])
    tok = writer_tokenizer(args)
    if isinstance(tok, gguf_io.GGUFVocab):
        tok = proto_from_vocab(*tok)
    template = read_chat_template(args.model)
    config, weights = read_checkpoint(args.model)
    if args.format != "onnx":
        onnx_export.check_int4_shapes(config)
    model = Llama(config, weights, pack=False)
    if args.format == "qnn-onnx":
        if tok is None:
            raise InputError("qnn-onnx calibrates its int16 activation scales on text: give --tokenizer")
        cal = ondevice_onnx.calibration_prompts_for(Tokenizer(None, data=tok) if isinstance(tok, bytes)
                                                    else Tokenizer(tok))
        ondevice_onnx.export_qnn_onnx(model, args.out, cal, n_parts=args.parts, prompt_len=args.prompt_len,
                                      context=args.context, tokenizer=tok, force=force, chat_template=template)
    else:
        onnx_export.export_onnx(model, args.out, int4=args.format == "onnx-int4", tokenizer=tok, force=force,
                                chat_template=template)
    files = sorted(p.name for p in Path(args.out).iterdir() if not p.name.startswith("."))
    if args.json:
        print_json({"out": str(args.out), "format": args.format, "files": files})
    else:
        print(f"wrote {args.out} ({args.format}): {', '.join(files)}")
    return 0


def train_output(args) -> Path:
    """Where `train` writes, checked before any work: --out, or a fresh runs/train-<time> directory. data/models/
    (the shipped models) needs --force, and so does an existing directory (only one llama_ref wrote), or an earlier
    run's <out>.train-state; --resume and --eval-only continue in an existing --out of ours."""
    continuing = args.resume or args.eval_only
    if args.out is None:
        if continuing:
            raise InputError("--resume and --eval-only work on an existing model: give its directory with --out")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out, n = paths.RUNS_DIR / f"train-{stamp}", 1
        while os.path.lexists(out):
            n += 1
            out = paths.RUNS_DIR / f"train-{stamp}-{n}"
        args.out = str(out)
    out = Path(args.out)
    state = out.parent / (out.name + ".train-state")
    if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(paths.MODELS_DIR)) and not args.force:
        raise OutputError(f"{out} is inside data/models/, where the shipped models live; pass --force to write there "
                          "(`make model` does), or choose another --out")
    if args.eval_only and not (out / "config.json").is_file():
        raise InputError(f"--eval-only measures the model in --out, and {out} holds none")
    if args.resume and not (state / "optimizer.npz").is_file():
        raise TrainingError(f"nothing to resume: {state / 'optimizer.npz'} does not exist (start without --resume)")
    check_out(out, args.force or continuing, "update")
    try:                                     # the state directory beside it obeys the same policy (its name too)
        check_out(state, True, "update")
    except OutputError as e:
        raise OutputError(f"train keeps its optimizer state in <out>.train-state beside --out: {e}") from None
    if not continuing and os.path.lexists(state) and not args.force:
        raise OutputError(f"{state} holds an earlier run's training state; pass --resume to continue it, or --force "
                          "to start over")
    return out


def cmd_train(args) -> int:
    """Train the embedded model's recipe (config, corpus, NumPy trainer) into --out, then measure it. Every setting,
    the output and the memory the run needs are checked before the corpus is tokenized."""
    if args.warmup is None:
        args.warmup = min(100, args.steps)
    elif args.warmup > args.steps:
        raise TrainingError(f"--warmup {args.warmup} is longer than --steps {args.steps}: warmup must fit in the run")
    config = tinyworld.model_config(Tokenizer(paths.DEFAULT_TOKENIZER).vocab_size)
    if args.seq_len > config.max_seq_len:
        raise TrainingError(f"--seq-len {args.seq_len} is longer than the model's context ({config.max_seq_len})")
    train_output(args)
    need = training_bytes(config, args.batch_size, args.seq_len) + 8 * (args.tokens + 2 * args.eval_tokens)
    require(need, f"training with batches of {args.batch_size} x {args.seq_len} on {args.tokens:,} tokens",
            "lower --batch-size, --seq-len, --tokens or --eval-tokens", TrainingError)
    return tinyworld.run(args)


# ------------------------------------------------------------------------------------------------
# the parser: every numeric option has a checked type (Number), so a value outside its range is one `error:` line

class Number:
    """An argparse type for a finite int or float in a range: `Number(int, low=1)` accepts 1, 2, ...; refuses nan,
    inf, -1, 1e300 for an int, '', 'a' with a message naming the range. `help_range` is what --help says."""

    def __init__(self, kind, low=None, high=None, above=None):
        self.kind, self.low, self.high, self.above = kind, low, high, above
        self.__name__ = kind.__name__                           # argparse names the type in its messages

    def help_range(self) -> str:
        what, show = ("an integer", "{:,}".format) if self.kind is int else ("a number", "{:g}".format)
        parts = [f"{op} {show(v)}" for op, v in (("> ", self.above), (">=", self.low), ("<=", self.high)) if v is not None]
        return what + (" " + " and ".join(p.replace("  ", " ") for p in parts) if parts else "")

    def __call__(self, text):
        try:
            value = int(text) if self.kind is int else float(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {self.help_range()}; got {text!r}") from None
        if (self.kind is float and not math.isfinite(value)) or (self.low is not None and value < self.low) or \
                (self.high is not None and value > self.high) or (self.above is not None and not value > self.above):
            raise argparse.ArgumentTypeError(f"must be {self.help_range()}; got {text!r}")
        return value


def add_number(p, flag, kind, default, help="", **bounds) -> None:
    """A numeric option with a checked range, stated in --help."""
    t = Number(kind, **bounds)
    shown = "" if default is None else f"; default: {default}"
    p.add_argument(flag, type=t, default=default, help=f"{help} ({t.help_range()}{shown})".replace("( ", "("))


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one `error:` line on stderr, exit 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


MAX_TOKENS = 2 ** 40                  # beyond any context: refused while parsing, not after a model is loaded
MAX_COUNT = 10 ** 6                   # evaluation samples and questions


def add_load_arguments(p) -> None:
    """--pack and --memory-budget: how the one loader may hold the weights (see llama_ref/loader.py)."""
    p.add_argument("--pack", choices=["auto", "always", "never"], default="auto",
                   help="pack float weights as float32 copies (fastest; needs 4 bytes per weight) or keep every "
                        "weight as stored, memory-mapped, expanding one tile per matmul; auto decides by "
                        "--memory-budget (default: %(default)s)")
    add_number(p, "--memory-budget", float, None, above=0,
               help="GiB the packed copies may take (default: half of the memory available)")


def add_sampling_arguments(p, temperature, top_p, note="") -> None:
    add_number(p, "--max-new-tokens", int, 64, low=0, high=MAX_TOKENS, help="tokens to generate at most")
    add_number(p, "--temperature", float, temperature, low=0, high=MAX_TEMPERATURE, help=f"0 = greedy{note}")
    add_number(p, "--top-p", float, top_p, above=0, high=1, help=f"nucleus sampling mass{note}")
    add_number(p, "--top-k", int, None, low=0, help="keep only the k most likely tokens (0 or unset: off)")
    add_number(p, "--seed", int, 0, low=0, help="the sampling seed: same seed, same output")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m llama_ref", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    g = sub.add_parser("generate", help="continue a prompt with a model",
                       description="Continue a prompt. --model takes an HF directory (config.json + model.safetensors), "
                                   "a llama2.c .bin or a .gguf; default: the embedded model data/models/tinyworld. "
                                   "Prefill (the prompt) and decode (new tokens) are timed separately.")
    g.add_argument("--model", default=None, help="model path (default: %(default)s -> data/models/tinyworld)")
    g.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: tokenizer.model beside the model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with BOS)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,450,3290 (no tokenizer needed)")
    add_sampling_arguments(g, 0.8, 0.9)
    g.add_argument("--no-stop", action="store_true", help="do not stop at EOS")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: prompt_ids, ids, text, prefill_tok_s, decode_tok_s (null when no "
                        "token was decoded), ...")
    add_load_arguments(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tokenize", help="show ids and pieces of a text",
                       description="Encode text with a Llama-2-family SentencePiece model (default: ours).")
    t.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: data/tokenizer/tokenizer.model)")
    t.add_argument("--impl", choices=["python", "sentencepiece"], default="sentencepiece",
                   help="pure-Python BPE or the sentencepiece library (same ids)")
    t.add_argument("--bos", action="store_true", help="prepend BOS")
    t.add_argument("--eos", action="store_true", help="append EOS")
    t.add_argument("--text", required=True)
    t.add_argument("--json", action="store_true", help='print {"ids": [...], "pieces": [...]}')
    t.set_defaults(func=cmd_tokenize)

    i = sub.add_parser("inspect", help="print and save named activations (taps) for a prompt",
                       description="Run one forward over the prompt and print shape, mean, std, min, max and the "
                                   "first values of every tap matching --tap (fnmatch patterns on names like "
                                   "embed, layers.0.attn.q, layers.3.attn.probs, norm.out, logits; see "
                                   "DEVELOPING.md). --save writes them to an .npz keyed by tap name, plus 'tokens' "
                                   "(1, T), so a port of Llama elsewhere can compare tensor by tensor.")
    i.add_argument("--model", default=None, help="model path (default: the embedded model data/models/tinyworld)")
    i.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: tokenizer.model beside the model)")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with BOS)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,450,3290")
    i.add_argument("--tap", action="append", metavar="PATTERN",
                   help="tap name or fnmatch pattern, repeatable (default: every tap), e.g. 'layers.0.*'")
    i.add_argument("--save", metavar="OUT.npz", help="write the matching taps and 'tokens' to this .npz")
    i.add_argument("--force", action="store_true", help="replace --save if it exists")
    i.add_argument("--compare", metavar="REF.npz",
                   help="compare the taps with another .npz of the same names (max abs error per tap)")
    add_number(i, "--values", int, 4, low=0, help="how many leading values to show per tap")
    i.add_argument("--json", action="store_true",
                   help='print one JSON object {"model", "tokens", "taps": {name: {shape, mean, std, ...}}}')
    add_load_arguments(i)
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("chat", help="talk to a chat model in the Llama 2 chat format",
                       description="Chat in Meta's Llama 2 format ([INST], <<SYS>>). Interactive when stdin is a "
                                   "terminal; otherwise reads a dialogue as JSON (a list of {\"role\", \"content\"}, "
                                   "last message the user's) and prints the answer. --format-only prints the prompt "
                                   "token ids without a model.")
    c.add_argument("--model", default=None, help="chat model (default: data/models/tinyworld-gatt, else tinyworld-chat)")
    c.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: beside the model; "
                   "with --format-only: data/tokenizer/tokenizer.model). Any Llama-2-family tokenizer works.")
    c.add_argument("--system", default=None, help="system message (merged into the first user message)")
    c.add_argument("--format-only", action="store_true",
                   help="read a dialogue (JSON list of {role, content}) on stdin, print its prompt ids, run no model")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_sampling_arguments(c, 0.6, 0.9, note="; the defaults are Meta's")
    c.add_argument("--policy", choices=["drop_oldest", "error"], default="drop_oldest",
                   help="a chat longer than the context window: drop the oldest exchanges keeping the system "
                        "message (default), or stop with an error")
    add_load_arguments(c)
    c.set_defaults(func=cmd_chat)

    q = sub.add_parser("quantize", help="write a quantized copy of a model",
                       description="Quantize every matmul weight of a model (norms stay float32; the classifier is "
                                   "8-bit in 4-bit schemes; see llama_ref/quant.py). --out NAME.gguf writes GGUF "
                                   "(q8_0, q4_0: llama.cpp runs it); any other --out is a directory in llama_ref's "
                                   "quantized format (config.json with a 'quantization' block + model.safetensors).")
    q.add_argument("--model", default=None, help="HF directory, llama2.c .bin, .gguf or quantized directory")
    q.add_argument("--scheme", required=True, help="q8_0 | q4_0 | w4a16-g32 | w4a16-g64 | w4a16-g128 | int8-channel")
    q.add_argument("--out", required=True)
    q.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: tokenizer.model beside the model)")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("export", help="write a model as GGUF, llama2.c .bin or ONNX",
                       description="Export a model: GGUF with llama.cpp's names, Llama metadata and the tokenizer; "
                                   "a llama2.c .bin (float32, what run.c reads); or ONNX (needs the [onnx] extra: "
                                   "pip install -e '.[onnx]'): 'onnx' / 'onnx-int4' write a directory ONNX Runtime "
                                   "GenAI runs (model.onnx + external data, genai_config.json, tokenizer files; "
                                   "int4 = MatMulNBits, block 32), 'qnn-onnx' writes Qualcomm-style on-device graphs "
                                   "(W4A16 QDQ, 1x1 convs, single-head attention, --parts parts x {prompt processor, "
                                   "token generator}, static shapes).")
    e.add_argument("--model", default=None)
    e.add_argument("--format", required=True, choices=["gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "llama2c",
                                                       "onnx", "onnx-int4", "qnn-onnx"])
    e.add_argument("--out", required=True, help="a file (gguf, llama2c) or a directory (onnx formats)")
    add_number(e, "--parts", int, 4, low=1, help="qnn-onnx: parts the layers are split into (at most the layers)")
    add_number(e, "--prompt-len", int, None, low=1, high=MAX_TOKENS,
               help="qnn-onnx: the prompt processor's fixed length (default: min(64, context))")
    add_number(e, "--context", int, None, low=2, high=MAX_TOKENS,
               help="qnn-onnx: the token generator's KV-cache length incl. the new token (default: the model's)")
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--force", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser("train", help="train a model with the NumPy trainer (the embedded model's recipe)",
                       description="Train tinyworld (dim 256, 6 layers, GQA 8/4 heads, context 512) from scratch on "
                                   "freshly generated corpus text with llama_ref.trainer, checkpointing atomically "
                                   "(--resume continues exactly), then write metrics.json, loss_curve.csv and a model "
                                   "card. The shipped model was made with the defaults (`make model`).")
    t.add_argument("--out", default=None,
                   help="model directory to write (default: a fresh runs/train-<date>-<time>/). An existing directory "
                        "(only one llama_ref wrote) and anything inside data/models/ need --force")
    t.add_argument("--force", action="store_true", help="replace --out (and its .train-state) if they exist")
    add_number(t, "--steps", int, 2400, low=1, help="optimizer steps (the cosine schedule's length)")
    add_number(t, "--batch-size", int, 8, low=1, help="sequences per step")
    add_number(t, "--seq-len", int, 512, low=1, help="tokens per sequence (at most the model's context, 512)")
    add_number(t, "--lr", float, 1.5e-3, above=0, high=10, help="peak learning rate")
    add_number(t, "--warmup", int, None, low=0, help="warmup steps, at most --steps (default: 100 or --steps)")
    add_number(t, "--tokens", int, 10_000_000, low=2, help="size of the fresh training token stream")
    add_number(t, "--time-budget-min", float, 80.0, above=0,
               help="stop training cleanly (with a checkpoint) after this many minutes")
    add_number(t, "--eval-tokens", int, 200_000, low=1, help="tokens of val and of test text to score")
    add_number(t, "--samples", int, 200, low=1, high=MAX_COUNT, help="sampled continuations for the grammar score")
    add_number(t, "--qa", int, 300, low=1, high=MAX_COUNT, help="held-out questions to answer")
    add_number(t, "--seed", int, 0, low=0, help="seed of the weights, the corpus stream and the batches")
    t.add_argument("--resume", action="store_true", help="continue from <out>.train-state/")
    t.add_argument("--eval-only", action="store_true", help="measure the model in --out without training")
    t.add_argument("--quick", action="store_true", help="small evaluation (a smoke test)")
    t.set_defaults(func=cmd_train)
    return p


def _stdout_gone() -> None:
    """After EPIPE or ENOSPC on stdout: point it at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args) or 0
        if sys.stdout is not None:
            sys.stdout.flush()                                   # a full disk shows here, not at exit
        return code
    except LlamaRefError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                                    # Ctrl-C: the temporaries are gone (output.py);
        sys.unraisablehook = lambda *_: None                     # a half-closed writer's __del__ says nothing more
        return 130
    except BrokenPipeError:                                      # `| head`: the reader is gone; end as Unix tools do
        _stdout_gone()
        return 141
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        _stdout_gone()
        print(f"error: cannot write the output ({e.strerror}); free space or write it elsewhere", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
