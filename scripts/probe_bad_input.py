"""Probe llama_ref with the neighbours of every bad input, family by family, and count what fails.

    python scripts/probe_bad_input.py                       # this checkout, every family
    python scripts/probe_bad_input.py --repo /tmp/old       # another checkout (e.g. `git worktree add /tmp/old REV`)
    python scripts/probe_bad_input.py --families output,options --json results.json

Cases are generated from the code under test, not listed by hand: the numeric options from its argparse parser, the
API cases from the signatures of `llama_ref.__all__` and of every function the chapters call, the writers x every
kind of output path, every JSON the package reads x hostile forms, archive members, hostile file bytes. Each case runs
in a child process (the CLI, or a snippet importing the checkout under test) with its address space capped
(RLIMIT_AS, MEMORY_CAP) and a time limit, and ends in one outcome:

    ok          a clear `error:` line and exit 2 (a LlamaRefError from Python), or a correct result
    traceback   any other exception, a dirty exit, an error that is not one line
    clobbered   a file the user owns changed, vanished or lost its mode, or an input was written into
    silent      exit 0 where the input had to be refused, or output that is not what it claims (NaN in JSON)
    memory      the memory cap was hit (MemoryError, killed)
    leftover    a temporary file or directory stayed behind
    hang        no answer within the time limit
    refused     a valid input refused

The table printed at the end (and --json) is what the report on bad input quotes: cases tried and failures per
family. The probe writes only inside a temporary directory (and runs/ of the checkout for `train` without --out).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

GIB = 2 ** 30
MEMORY_CAP = 3 * GIB          # RLIMIT_AS of every child: the failures the probe looks for reached 4-8 GB
TIMEOUT = 90.0
HOSTILE_NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e300", str(2 ** 70), "", "a"]
PY = sys.executable

# What each numeric option of the CLI may be (the specification the probe holds the code to): (low, high, kind).
# A value outside must be refused with one error line; inside, the command must run (or refuse for a resource).
OPTION_RANGES = {
    "--max-new-tokens": (0, None, int), "--temperature": (0, 100, float), "--top-p": (1e-300, 1, float),
    "--top-k": (0, None, int), "--seed": (0, None, int), "--memory-budget": (1e-300, None, float),
    "--values": (0, None, int), "--parts": (1, None, int), "--prompt-len": (1, None, int), "--context": (2, None, int),
    "--steps": (1, None, int), "--batch-size": (1, None, int), "--seq-len": (1, 512, int), "--lr": (1e-300, 10, float),
    "--warmup": (0, 1, int), "--tokens": (2, None, int), "--time-budget-min": (1e-300, None, float),
    "--eval-tokens": (1, None, int), "--samples": (1, 10 ** 6, int), "--qa": (1, 10 ** 6, int),
}
MUST_RUN = {("--seed", str(2 ** 70)), ("--memory-budget", "1e300"), ("--top-k", "0"), ("--max-new-tokens", "0"),
            ("--values", "0"), ("--time-budget-min", "1e300")}


# ------------------------------------------------------------------------------------------------
# running a child

class Result:
    def __init__(self, rc, out, err, elapsed, timed_out):
        self.rc, self.out, self.err, self.elapsed, self.timed_out = rc, out, err, elapsed, timed_out


def _limits(cap, fsize=None, close_stdin=False):
    def pre():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if close_stdin:
            os.close(0)
    return pre


class Probe:
    def __init__(self, repo: Path, work: Path):
        self.repo, self.work = repo, work
        self.env = dict(os.environ, PYTHONPATH=str(repo), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                        PYTHONDONTWRITEBYTECODE="1")
        self.results = []

    def run(self, argv, stdin=None, timeout=TIMEOUT, cap=MEMORY_CAP, fsize=None, close_stdin=False, stdout=None,
            cwd=None):
        t0 = time.monotonic()
        if cwd is not None:
            Path(cwd).mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen(argv, cwd=cwd or self.repo, env=self.env, preexec_fn=_limits(cap, fsize, close_stdin),
                             stdin=None if close_stdin else subprocess.PIPE, stdout=stdout or subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(None if close_stdin else (stdin or b""), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            timed_out = True
        dec = lambda b: (b or b"").decode("utf-8", "replace")                    # noqa: E731
        return Result(p.returncode, dec(out), dec(err), time.monotonic() - t0, timed_out)

    def cli(self, *args, **kw):
        return self.run([PY, "-m", "llama_ref", *map(str, args)], **kw)

    def py(self, code, **kw):
        return self.run([PY, "-c", textwrap.dedent(code)], **kw)

    def record(self, family, name, outcome, detail=""):
        self.results.append({"family": family, "case": name, "outcome": outcome, "detail": detail[-600:]})
        mark = "." if outcome == "ok" else outcome[0].upper()
        print(mark, end="", flush=True)


def outcome_of(r: Result, expect: str = "either") -> tuple[str, str]:
    """expect: 'refuse' (a clean exit 2), 'succeed' (exit 0), 'either'."""
    err = r.err
    if r.timed_out:
        return "hang", f"no answer within the time limit ({r.elapsed:.0f} s)"
    if "MemoryError" in err or "Cannot allocate memory" in err or "Unable to allocate" in err or r.rc == -9:
        return "memory", err[-400:]
    if "Traceback" in err or r.rc not in (0, 2, 141):
        return "traceback", f"exit {r.rc}: {err[-500:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error") or ": error: " in line]   # argparse's own error
    if r.rc == 2 and not (len(errors) == 1 and (lines[-1].startswith("error: ") or ": error: " in lines[-1])):
        return "traceback", f"exit 2 without one error line: {err[-400:]}"     # (progress lines may come first)
    if expect == "refuse" and r.rc == 0:
        return "silent", f"exit 0; stdout {r.out[-200:]!r}"
    if expect == "succeed" and r.rc != 0:
        return "refused", err[-300:]
    return "ok", ""


def digest(p: Path) -> str:
    """What is at p: kind, mode and content hash (directories: their entries' digests)."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return f"link:{os.readlink(p)}"
    if stat.S_ISDIR(st.st_mode):
        return "dir:" + ",".join(f"{c.name}={digest(c)}" for c in sorted(p.iterdir()))
    if stat.S_ISREG(st.st_mode):
        return f"file:{oct(st.st_mode & 0o777)}:{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"
    return f"special:{stat.S_IFMT(st.st_mode)}"


def temporaries(d: Path, known: set) -> list[str]:
    if not d.is_dir():
        return []
    return sorted(c.name for c in d.iterdir() if c.name not in known and (".tmp" in c.name or "tmp-" in c.name
                                                                          or c.name.endswith(".old")))


# ------------------------------------------------------------------------------------------------
# fixtures, made by the checkout under test

SETUP = """
import sys, json, numpy as np
from pathlib import Path
from llama_ref import paths, gguf_io
from llama_ref.checkpoint import save_model
from llama_ref.config import LlamaConfig
from llama_ref.llama2c import save_llama2c
from llama_ref.weights import weight_shapes
w = Path(sys.argv[1])

def weights(cfg, seed, scale):
    rng = np.random.default_rng(seed)
    out = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in weight_shapes(cfg).items()}
    for k in out:
        if out[k].ndim == 1:
            out[k] = (1 + 0.1 * rng.standard_normal(out[k].shape)).astype(np.float32)
    return out
cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=1024, max_seq_len=64)
ws = weights(cfg, 0, 0.05)
save_model(w / "hf", cfg, ws, tokenizer_path=paths.DEFAULT_TOKENIZER)
gguf_io.save_gguf(w / "m.gguf", cfg, ws, paths.DEFAULT_TOKENIZER, "q8_0")
save_llama2c(w / "m.bin", cfg, ws)
big = LlamaConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1536, vocab_size=1024, max_seq_len=64)
save_model(w / "big", big, weights(big, 1, 0.02), tokenizer_path=paths.DEFAULT_TOKENIZER)
print(json.dumps({"hf": str(w / "hf")}))
"""


def setup(probe: Probe):
    r = probe.run([PY, "-c", SETUP, str(probe.work)], timeout=600, cap=8 * GIB)
    if r.rc != 0:
        sys.exit(f"setup failed: {r.err[-2000:]}")
    tok = probe.repo / "data" / "tokenizer" / "tokenizer.model"
    return {"hf": probe.work / "hf", "gguf": probe.work / "m.gguf", "bin": probe.work / "m.bin",
            "big": probe.work / "big", "tok": tok}


# ------------------------------------------------------------------------------------------------
# 1. the output policy: every writer x every kind of path

def writers(fx, probe):
    """name -> (kind, argv(out, force) , input the writer reads). The CLI's writers, found by their --out/--save."""
    tiny_train = ["--steps", 1, "--batch-size", 1, "--seq-len", 16, "--tokens", 400, "--eval-tokens", 64,
                  "--samples", 1, "--qa", 1, "--time-budget-min", 5]
    has_force = "--force" in probe.cli("train", "--help").out
    f = lambda force: ["--force"] if force else []                                   # noqa: E731
    return {
        "export gguf": ("file", lambda out, force, src=fx["gguf"]: ["export", "--model", src, "--format", "gguf-q8_0",
                                                                   "--out", out] + f(force)),
        "export llama2c": ("file", lambda out, force, src=fx["gguf"]: ["export", "--model", src, "--format", "llama2c",
                                                                      "--out", out] + f(force)),
        "quantize gguf": ("file", lambda out, force, src=fx["gguf"]: ["quantize", "--model", src, "--scheme", "q8_0",
                                                                     "--out", out] + f(force)),
        "inspect --save": ("file", lambda out, force, src=fx["hf"]: ["inspect", "--model", src, "--prompt-ids", "1,2",
                                                                    "--tap", "logits", "--save", out] + f(force)),
        "export onnx": ("dir", lambda out, force, src=fx["hf"]: ["export", "--model", src, "--format", "onnx",
                                                                "--out", out] + f(force)),
        "quantize dir": ("dir", lambda out, force, src=fx["hf"]: ["quantize", "--model", src, "--scheme", "q4_0",
                                                                 "--out", out] + f(force)),
        "train": ("dir", lambda out, force, src=None: ["train", "--out", out, *tiny_train]
                  + (f(force) if has_force else [])),
    }


def probe_output(probe: Probe, fx):
    fam = "output"
    for wname, (kind, argv) in writers(fx, probe).items():
        base = probe.work / "out" / wname.replace(" ", "_").replace("-", "")
        base.mkdir(parents=True)
        ext = ".gguf" if "gguf" in wname else ".bin" if "llama2c" in wname else ".npz" if "inspect" in wname else ""
        n = [0]

        def fresh(name="o"):
            n[0] += 1
            d = base / f"c{n[0]}"
            d.mkdir()
            return d, d / (name + ext)

        def case(name, out, force, expect, keep=None, cap=MEMORY_CAP, fsize=None, timeout=TIMEOUT, argv_=None):
            """Run the writer; `keep`: paths whose digest must not change (user files, inputs)."""
            keep = keep or []
            before = {p: digest(p) for p in keep}
            known = set(os.listdir(out.parent)) if out.parent.is_dir() else set()
            r = probe.cli(*(argv_ or argv(out, force)), cap=cap, fsize=fsize, timeout=timeout)
            outcome, detail = outcome_of(r, expect)
            changed = [str(p) for p in keep if digest(p) != before[p]]
            left = temporaries(out.parent, known)
            if changed:                                            # whatever the exit said
                outcome, detail = "clobbered", f"changed: {changed}; {detail}"
            elif outcome == "ok" and left:
                outcome, detail = "leftover", f"left: {left}"
            probe.record(fam, f"{wname}: {name}", outcome, detail)
            return r

        d, out = fresh()
        case("new path", out, False, "succeed")
        d, out = fresh()
        case("new path in missing parents", d / "a" / "b" / out.name, False, "succeed")
        d, out = fresh()
        _user_file(out, kind)
        case("existing path without --force", out, False, "refuse", keep=[out])
        if kind == "file":
            d, out = fresh()
            out.write_bytes(b"the user's old file")
            os.chmod(out, 0o600)
            r = case("existing 0600 file with --force", out, True, "succeed")
            if r.rc == 0 and out.is_file() and stat.S_IMODE(out.stat().st_mode) != 0o600:
                probe.results[-1].update(outcome="clobbered", detail=f"mode became {oct(out.stat().st_mode & 0o777)}")
        d, out = fresh()
        out.mkdir()
        (out / "notes.txt").write_text("the user's notes")
        case("a directory of the user's with --force", out, True, "refuse", keep=[out])
        d, out = fresh()
        os.symlink(d / "nowhere", out)
        case("dangling link without --force", out, False, "refuse", keep=[out])
        d, out = fresh()
        os.mkfifo(out)
        case("FIFO with --force", out, True, "refuse", keep=[out], timeout=30)
        if os.geteuid() == 0:
            d, out = fresh()
            os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))               # a /dev/null of our own
            case("character device with --force", out, True, "refuse", keep=[out], timeout=30)
        d, out = fresh()
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(out))
            case("socket with --force", out, True, "refuse", keep=[out], timeout=30)
        finally:
            sock.close()
        d, out = fresh()
        os.symlink("/proc/self/fd/1", out)
        case("link to /proc/self/fd/1 with --force", out, True, "refuse", keep=[out], timeout=30)
        if wname != "train":
            src = probe.work / "inputs" / wname.replace(" ", "_")
            src.mkdir(parents=True)
            model = src / ("m.gguf" if "gguf" in str(argv(Path("x"), False)) or kind == "file" else "hf")
            if wname == "inspect --save" or kind == "dir":
                shutil.copytree(fx["hf"], src / "hf")
                model = src / "hf"
            else:
                shutil.copy(fx["gguf"], model)
            if kind == "file" and wname != "inspect --save":
                case("--out is the input (--force)", model, True, "refuse", keep=[model],
                     argv_=argv(model, True, src=model))
            if kind == "dir":
                case("--out is the input (--force)", model, True, "refuse", keep=[model],
                     argv_=argv(model, True, src=model))
                case("--out holds the input (--force)", src, True, "refuse", keep=[model],
                     argv_=argv(src, True, src=model))
            hf = src / "hf2"
            shutil.copytree(fx["hf"], hf)
            case("--out inside the input", hf / ("inside" + ext), False, "refuse", keep=[hf],
                 argv_=argv(hf / ("inside" + ext), False, src=hf))
            if wname == "inspect --save":
                ref = src / "ref.npz"
                probe.cli(*argv(ref, False, src=hf))
                case("--save is the --compare reference (--force)", ref, True, "refuse", keep=[ref],
                     argv_=argv(ref, True, src=hf) + ["--compare", ref])
        d, out = fresh()
        case("a 250-byte file name", d / ("n" * (250 - len(ext)) + ext), False, "succeed")
        d, out = fresh()
        case("a 300-byte file name", d / ("n" * 300 + ext), False, "refuse")
        d, out = fresh()
        (d / "afile").write_text("x")
        case("a parent that is a file", d / "afile" / out.name, False, "refuse", keep=[d / "afile"])
        d, out = fresh()
        _user_file(out, kind)
        case("full disk (RLIMIT_FSIZE 64 KiB) over an existing output", out, True, "refuse", keep=[out],
             fsize=64 * 1024)
        d, out = fresh()
        r = case("full disk into missing parents", d / "p" / "q" / out.name, False, "refuse", fsize=64 * 1024)
        if (d / "p").exists() and probe.results[-1]["outcome"] == "ok":
            probe.results[-1].update(outcome="leftover", detail="the directories created for the output stayed")
        # two writers at once into one new path: one must win, the other must say so
        d, out = fresh()
        ps = [subprocess.Popen([PY, "-m", "llama_ref", *map(str, argv(out, False))], cwd=probe.repo, env=probe.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limits(MEMORY_CAP))
              for _ in range(2)]
        rs = [(p.wait(TIMEOUT * 2), p.stderr.read().decode("utf-8", "replace")) for p in ps]
        codes = sorted(rc for rc, _ in rs)
        clean = all(rc == 0 or (rc == 2 and err.strip().startswith("error:")) for rc, err in rs)
        left = temporaries(d, {out.name})
        outcome = ("ok" if codes == [0, 2] and clean and not left else "leftover" if left else
                   "silent" if codes == [0, 0] else "traceback")
        probe.record(fam, f"{wname}: two writers into one new path", outcome, f"exits {codes}; {rs[1][1][-300:]}")


def _user_file(out: Path, kind: str):
    if kind == "file":
        out.write_bytes(b"the user's old file")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("the user's notes")


def probe_train_defaults(probe: Probe, fx):
    """train without --out, and into data/models/ without --force (the shipped models)."""
    models = probe.repo / "data" / "models" / "tinyworld"
    before = digest(models)
    runs_before = set(os.listdir(probe.repo / "runs")) if (probe.repo / "runs").is_dir() else set()
    tiny = ["--steps", 1, "--batch-size", 1, "--seq-len", 16, "--tokens", 400, "--eval-tokens", 64, "--samples", 1,
            "--qa", 1]
    r = probe.cli("train", *tiny)
    outcome, detail = outcome_of(r, "either")
    if digest(models) != before:
        outcome, detail = "clobbered", "train without --out replaced data/models/tinyworld"
    probe.record("output", "train: no --out", outcome, detail)
    r = probe.cli("train", "--out", models, *tiny)
    outcome, detail = outcome_of(r, "refuse")
    if digest(models) != before:
        outcome, detail = "clobbered", "train --out data/models/tinyworld without --force replaced it"
    probe.record("output", "train: --out data/models/tinyworld without --force", outcome, detail)
    if (probe.repo / "runs").is_dir():
        for name in set(os.listdir(probe.repo / "runs")) - runs_before:
            shutil.rmtree(probe.repo / "runs" / name, ignore_errors=True)
    if digest(models) != before:                          # the scratch checkout's model: put it back from git
        subprocess.run(["git", "checkout", "--", "data/models/tinyworld"], cwd=probe.repo, capture_output=True)


# ------------------------------------------------------------------------------------------------
# 8. signals: every writer x SIGINT, SIGTERM, SIGHUP, SIGQUIT midway; then SIGKILL and the next write

def probe_signals(probe: Probe, fx):
    fam = "signals"
    big = fx["big"]
    specs = {
        "export gguf": ("file", ".gguf", lambda out: ["export", "--model", big, "--format", "gguf-f32", "--out", out]),
        "export llama2c": ("file", ".bin", lambda out: ["export", "--model", big, "--format", "llama2c", "--out", out]),
        "quantize dir": ("dir", "", lambda out: ["quantize", "--model", big, "--scheme", "q8_0", "--out", out]),
        "inspect --save": ("file", ".npz", lambda out: ["inspect", "--model", big, "--prompt-ids", ",".join(["1"] * 60),
                                                        "--save", out]),
    }
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT]
    for wname, (kind, ext, argv) in specs.items():
        for sig in sigs + ["SIGKILL, then the next write"]:
            d = probe.work / "sig" / f"{wname.replace(' ', '_')}-{sig}"
            d.mkdir(parents=True)
            out = d / ("o" + ext)
            _user_file(out, kind)
            keep = digest(out)
            if kind == "dir":
                shutil.rmtree(out)
                probe.cli(*argv(out))                                            # a directory llama_ref wrote
                keep = digest(out)
            p = subprocess.Popen([PY, "-m", "llama_ref", *map(str, argv(out)), "--force"], cwd=probe.repo,
                                 env=probe.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 preexec_fn=_limits(MEMORY_CAP))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and p.poll() is None and not temporaries(d, {out.name}):
                time.sleep(0.002)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL if isinstance(sig, str) else sig)
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                probe.record(fam, f"{wname}: {sig}", "hang", "did not end after the signal")
                continue
            name = sig if isinstance(sig, str) else signal.Signals(sig).name
            if isinstance(sig, str):                                              # the next write cleans up
                probe.cli(*argv(out), "--force")
            finished = p.returncode == 0
            left = temporaries(d, {out.name})
            if left:
                outcome, detail = "leftover", f"left: {left} (exit {p.returncode})"
            elif not finished and not isinstance(sig, str) and digest(out) != keep:
                outcome, detail = "clobbered", "the old output changed though the write was interrupted"
            else:
                outcome, detail = "ok", f"exit {p.returncode}"
            probe.record(fam, f"{wname}: {name}", outcome, detail)


# ------------------------------------------------------------------------------------------------
# 2. every numeric option of every command, from the parser of the checkout under test

PARSER_WALK = """
import argparse, json
from llama_ref.__main__ import build_parser
out = []
for action in build_parser()._actions:
    if isinstance(action, argparse._SubParsersAction):
        for command, sub in action.choices.items():
            for a in sub._actions:
                t = a.type
                numeric = t in (int, float) or type(t).__name__ == "Number" or isinstance(a.default, (int, float)) \\
                    and not isinstance(a.default, bool) and a.nargs is None and a.option_strings and t is not None
                if a.option_strings and numeric:
                    out.append([command, a.option_strings[0]])
print(json.dumps(out))
"""


def probe_options(probe: Probe, fx):
    fam = "options"
    r = probe.py(PARSER_WALK)
    options = json.loads(r.out)
    chat = json.dumps([{"role": "user", "content": "What pet does Mia have?"}]).encode()
    for command, flag in options:
        for value in HOSTILE_NUMBERS:
            out = probe.work / "opt" / f"{command}{flag}{abs(hash(value))}"
            base = {
                "generate": ["--model", fx["hf"], "--prompt-ids", "1,2", "--max-new-tokens", 2, "--temperature", 0],
                "inspect": ["--model", fx["hf"], "--prompt-ids", "1,2", "--tap", "logits"],
                "chat": ["--model", fx["hf"], "--max-new-tokens", 2],
                "export": ["--model", fx["hf"], "--format", "qnn-onnx", "--parts", 1, "--out", out],
                "train": ["--out", out, "--steps", 2, "--batch-size", 1, "--seq-len", 16, "--tokens", 400,
                          "--eval-tokens", 64, "--samples", 1, "--qa", 1, "--warmup", 1],
            }.get(command, [])
            args = [command]
            for i in range(0, len(base), 2):                     # the option under test replaces its base value
                if base[i] != flag:
                    args += [base[i], base[i + 1]]
            args += [flag, value]
            r = probe.cli(*args, stdin=chat if command == "chat" else None, timeout=180)
            low, high, kind = OPTION_RANGES.get(flag, (None, None, float))
            expect = _expected(value, low, high, kind)
            if expect == "either" and (flag, value) in MUST_RUN:
                expect = "succeed"
            outcome, detail = outcome_of(r, expect)
            probe.record(fam, f"{command} {flag} {value!r}", outcome, detail)
            shutil.rmtree(out, ignore_errors=True)


def _expected(text, low, high, kind):
    try:
        v = int(text) if kind is int else float(text)
    except ValueError:
        return "refuse"
    if kind is float and v != v or v in (float("inf"), float("-inf")):
        return "refuse"
    if (low is not None and v < low) or (high is not None and v > high):
        return "refuse"
    return "either"


# ------------------------------------------------------------------------------------------------
# 3. every JSON the package reads x hostile forms

def json_forms():
    return {
        "nested 100,000 deep": b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        "a 5000-digit number": b'{"hidden_size": ' + b"9" * 5000 + b"}",
        "NaN and Infinity": b'{"hidden_size": NaN, "rms_norm_eps": Infinity}',
        "invalid UTF-8": b'{"model_type": "\xff\xfe"}',
        "a UTF-8 BOM": b"\xef\xbb\xbf{}",
        "empty": b"",
        "truncated": b'{"hidden_size": 64, "num_hid',
        "a list, not an object": b"[1, 2, 3]",
        "a string": b'"hello"',
        "70 MB of spaces and an object": b" " * (70 * 2 ** 20) + b"{}",
        "duplicate keys": b'{"hidden_size": 64, "hidden_size": "64"}',
    }


def _special(kind: str, path: Path):
    """Put a FIFO, a link to /dev/zero, or a directory where a file belongs."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        os.symlink("/dev/zero", path)
    elif kind == "directory":
        path.mkdir()


def probe_json(probe: Probe, fx):
    fam = "json"
    targets = {                                          # which file, and the command that reads it
        "config.json": ("hf", "config.json", ["generate", "--prompt-ids", "1,2", "--max-new-tokens", 1]),
        "tokenizer_config.json": ("hf", "tokenizer_config.json", ["export", "--format", "gguf-f32", "--out", "OUT"]),
        "shard index": ("sharded", "model.safetensors.index.json", ["generate", "--prompt-ids", "1,2",
                                                                   "--max-new-tokens", 1]),
        "quantized config.json": ("quant", "config.json", ["generate", "--prompt-ids", "1,2", "--max-new-tokens", 1]),
    }
    sharded = probe.work / "sharded"
    r = probe.py(f"""
        from llama_ref.loader import read_checkpoint
        from llama_ref.checkpoint import save_model
        c, w = read_checkpoint({str(fx['hf'])!r})
        save_model({str(sharded)!r}, c, dict(w), max_shard_bytes=100000)""")
    quantdir = probe.work / "quant"
    probe.cli("quantize", "--model", fx["hf"], "--scheme", "q8_0", "--out", quantdir)
    sources = {"hf": fx["hf"], "sharded": sharded, "quant": quantdir}
    forms = dict(json_forms(), **{k: None for k in ("FIFO", "link to /dev/zero", "directory")})
    for tname, (src, fname, argv) in targets.items():
        if not (sources[src] / fname).exists() and fname != "tokenizer_config.json":
            continue
        for form, data in forms.items():
            d = probe.work / "json" / f"{tname}-{form}".replace(" ", "_").replace("/", "")
            shutil.copytree(sources[src], d)
            if data is None:
                _special(form, d / fname)
            else:
                (d / fname).write_bytes(data)
            args = [a if a != "OUT" else probe.work / "json" / f"out-{abs(hash(d))}.gguf" for a in argv]
            r = probe.cli(*args[:1], "--model", d, *args[1:], timeout=60)
            probe.record(fam, f"{tname}: {form}", *outcome_of(r, "either"))
    # a dialogue on standard input, the preference file and the safetensors header
    for form, data in json_forms().items():
        r = probe.cli("chat", "--format-only", stdin=data, timeout=60)
        probe.record(fam, f"chat stdin: {form}", *outcome_of(r, "refuse"))
        f = probe.work / "json" / f"prefs-{abs(hash(form))}.jsonl"
        f.write_bytes(data.replace(b"\n", b" ") + b"\n")
        r = probe.py(f"""
            import sys
            from llama_ref.errors import LlamaRefError
            try:
                from llama_ref.preferences import read_preferences
            except ImportError:
                from llama_ref.rlhf import read_preferences
            try:
                read_preferences({str(f)!r})
            except LlamaRefError as e:
                print('error:', e, file=sys.stderr); sys.exit(2)""", timeout=60)
        probe.record(fam, f"preference file: {form}", *outcome_of(r, "refuse"))
        d = probe.work / "json" / f"st-{abs(hash(form))}"
        shutil.copytree(fx["hf"], d)
        body = data + b" " * (-len(data) % 8)
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
        r = probe.cli("generate", "--model", d, "--prompt-ids", "1", "--max-new-tokens", 1, timeout=60)
        probe.record(fam, f"safetensors header: {form}", *outcome_of(r, "refuse"))


# ------------------------------------------------------------------------------------------------
# 4. archive members: inspect --compare with every kind of .npz

def probe_archives(probe: Probe, fx):
    fam = "archive"
    import numpy as np
    import zipfile
    d = probe.work / "npz"
    d.mkdir()
    ref = d / "ref.npz"
    probe.cli("inspect", "--model", fx["hf"], "--prompt-ids", "1,2", "--tap", "logits", "--save", ref)
    good = dict(np.load(ref))
    cases = {}
    cases["the reference itself"] = ("succeed", lambda p: shutil.copy(ref, p))
    cases["a member of strings"] = ("refuse", lambda p: np.savez(p, logits=np.array(["a", "b"]), tokens=good["tokens"]))
    cases["a member of objects"] = ("refuse", lambda p: np.savez(p, logits=np.array([{"x": 1}], dtype=object)))
    cases["a tap of strings with the right shape"] = ("refuse", lambda p: np.savez(
        p, tokens=good["tokens"], logits=np.full(good["logits"].shape, "x")))
    cases["a tap of another shape"] = ("either", lambda p: np.savez(p, tokens=good["tokens"], logits=np.zeros((3, 3))))
    cases["tokens of another prompt"] = ("refuse", lambda p: np.savez(p, tokens=np.array([[7, 7, 7]]),
                                                                    logits=good["logits"]))
    cases["tokens of strings"] = ("refuse", lambda p: np.savez(p, tokens=np.array(["1", "2"]), logits=good["logits"]))
    cases["complex numbers"] = ("refuse", lambda p: np.savez(p, tokens=good["tokens"],
                                                            logits=good["logits"].astype(np.complex64)))

    def bomb(p, gib=8):                                    # 8 GiB of zeros claimed, a few MB compressed
        header = {"descr": "<f4", "fortran_order": False, "shape": (gib * 2 ** 28,)}
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
            with z.open("logits.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                chunk = bytes(2 ** 24)
                for _ in range(gib * 2 ** 30 // len(chunk)):
                    f.write(chunk)
    cases["4 MB inflating to 8 GiB"] = ("either", bomb)

    def lying(p):                                          # a header claiming more than the member holds
        with zipfile.ZipFile(p, "w") as z:
            with z.open("logits.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                         "shape": (2 ** 40,)})
                f.write(bytes(64))
    cases["a header claiming 4 TiB over 64 bytes"] = ("refuse", lying)
    cases["not a zip"] = ("refuse", lambda p: p.write_bytes(b"PK\x03\x04 not really"))
    cases["a single .npy"] = ("refuse", lambda p: np.save(open(p, "wb"), np.zeros(3)))
    cases["an empty archive"] = ("either", lambda p: zipfile.ZipFile(p, "w").close())
    cases["a member that is not .npy"] = ("refuse", lambda p: _zip_with(p, "readme.txt", b"hello"))
    cases["10,000 members"] = ("either", lambda p: np.savez(p, **{f"t{i}": np.zeros(1) for i in range(10000)}))
    cases["truncated archive"] = ("refuse", lambda p: p.write_bytes(ref.read_bytes()[:len(ref.read_bytes()) // 2]))
    cases["FIFO"] = ("refuse", lambda p: os.mkfifo(p))
    cases["link to /dev/zero"] = ("refuse", lambda p: os.symlink("/dev/zero", p))
    cases["directory"] = ("refuse", lambda p: p.mkdir())
    for name, (expect, make) in cases.items():
        p = d / f"{abs(hash(name))}.npz"
        make(p)
        r = probe.cli("inspect", "--model", fx["hf"], "--prompt-ids", "1,2", "--tap", "logits", "--compare", p,
                      "--json", timeout=120)
        outcome, detail = outcome_of(r, expect)
        if outcome == "ok" and r.rc == 0 and "NaN" in r.out:
            outcome, detail = "silent", "--json printed NaN"
        probe.record(fam, f"--compare {name}", outcome, detail)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _zip_with(p, name, data):
    import zipfile
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(name, data)


# ------------------------------------------------------------------------------------------------
# 5. hostile files: what a model, a tokenizer, standard input can be instead of what they claim

def _gguf_bytes(kvs, n_tensors=0, tensors=b""):
    """A GGUF v3 built by hand: kvs = [(key, type, payload bytes)], so counts can lie."""
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs))
    for key, vtype, payload in kvs:
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload
    return out + tensors


def _gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def probe_files(probe: Probe, fx):
    fam = "files"
    d = probe.work / "files"
    d.mkdir()
    gen = lambda model, *extra: probe.cli("generate", "--model", model, "--prompt-ids", "1,2",  # noqa: E731
                                          "--max-new-tokens", 2, "--temperature", 0, *extra, timeout=60)
    # where the model is not a model
    for kind in ("FIFO", "link to /dev/zero", "directory"):
        for fname in ("model.safetensors", "tokenizer.model"):
            m = d / f"{kind}-{fname}".replace(" ", "_").replace("/", "")
            shutil.copytree(fx["hf"], m)
            _special(kind, m / fname)
            probe.record(fam, f"{fname} is a {kind}", *outcome_of(gen(m, "--prompt", "hi") if fname ==
                                                                 "tokenizer.model" else gen(m), "refuse"))
        p = d / f"{kind}.gguf".replace(" ", "_").replace("/", "")
        _special(kind, p)
        probe.record(fam, f"a .gguf that is a {kind}", *outcome_of(gen(p), "refuse"))
        t = d / f"tok-{kind}".replace(" ", "_").replace("/", "")
        _special(kind, t)
        r = probe.cli("tokenize", "--tokenizer", t, "--text", "hi", timeout=60)
        probe.record(fam, f"--tokenizer is a {kind}", *outcome_of(r, "refuse"))
    # GGUF counts that lie
    arr = lambda etype, count, body=b"": struct.pack("<IQ", etype, count) + body          # noqa: E731
    ggufs = {
        "an array claiming 10^9 uint32 in 118 bytes": [("general.architecture", 8, _gstr(b"llama")),
                                                       ("x", 9, arr(4, 10 ** 9))],
        "an array claiming 10^9 strings": [("tokenizer.ggml.tokens", 9, arr(8, 10 ** 9))],
        "2M empty strings (16 MB)": [("tokenizer.ggml.model", 8, _gstr(b"llama")),
                                     ("tokenizer.ggml.tokens", 9, arr(8, 2 * 10 ** 6, bytes(8 * 2 * 10 ** 6)))],
        "a key length of 2^62": [("k", 8, b"")],
        "a string length of 2^40": [("general.name", 8, struct.pack("<Q", 2 ** 40))],
        "a nested array type": [("x", 9, arr(9, 3))],
        "an unknown value type": [("x", 77, b"\0" * 8)],
    }
    for name, kvs in ggufs.items():
        p = d / f"g{abs(hash(name))}.gguf"
        data = _gguf_bytes(kvs)
        if name == "a key length of 2^62":
            data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2 ** 62)
        p.write_bytes(data)
        probe.record(fam, f"GGUF: {name}", *outcome_of(gen(p), "refuse"))
    p = d / "tensors.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2 ** 40, 0))
    probe.record(fam, "GGUF: 2^40 tensors claimed", *outcome_of(gen(p), "refuse"))
    # a GGUF vocabulary with tokens but no scores/types, and one with a repeated token
    for name, change in (("tokens without scores or types", "drop"), ("a repeated token", "repeat")):
        p = d / f"v-{change}.gguf"
        r = probe.py(f"""
            import gguf, numpy as np
            from gguf import GGUFReader
            src = GGUFReader({str(fx['gguf'])!r})
            w = gguf.GGUFWriter({str(p)!r}, "llama")
            for f in src.fields.values():
                if f.name.startswith("GGUF.") or f.name == "general.architecture":
                    continue
                if {change!r} == "drop" and f.name in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                    continue
                v = f.contents()
                if {change!r} == "repeat" and f.name == "tokenizer.ggml.tokens":
                    v = list(v); v[5] = v[6]
                t = f.types[0]
                if t == gguf.GGUFValueType.ARRAY:
                    w.add_array(f.name, v)
                elif t == gguf.GGUFValueType.STRING:
                    w.add_string(f.name, v)
                else:
                    w.add_key_value(f.name, v, t)
            for t in src.tensors:
                w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(int(x) for x in reversed(t.shape)),
                             raw_dtype=t.tensor_type)
            w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()""")
        if r.rc != 0:
            probe.record(fam, f"GGUF vocabulary: {name} (not built)", "ok", r.err[-300:])
            continue
        probe.record(fam, f"GGUF vocabulary: {name}: generate", *outcome_of(gen(p, "--prompt", "hi"), "either"))
        out = d / f"exported-{change}.gguf"
        r = probe.cli("export", "--model", p, "--format", "gguf-q8_0", "--out", out, timeout=120)
        outcome, detail = outcome_of(r, "either")
        if outcome == "ok" and r.rc == 0:
            back = gen(out, "--prompt", "hi")
            if back.rc != 0:
                outcome, detail = "silent", f"export exit 0 wrote a file the loader refuses: {back.err[-300:]}"
        probe.record(fam, f"GGUF vocabulary: {name}: export", outcome, detail)
    # safetensors and config fields
    m = d / "shape"
    shutil.copytree(fx["hf"], m)
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [0, 10 ** 30], "data_offsets": [0, 0]}})
    body = header.encode() + b" " * (-len(header) % 8)
    (m / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    probe.record(fam, "safetensors shape [0, 10^30]", *outcome_of(gen(m), "refuse"))
    for name, change, expect in [("rope_scaling dynamic factor 1e308",
                                  {"rope_scaling": {"rope_type": "dynamic", "factor": 1e308}}, "refuse"),
                                 ("rms_norm_eps 1e308", {"rms_norm_eps": 1e308}, "refuse"),
                                 ("rope_theta 1e308", {"rope_theta": 1e308}, "either"),
                                 ("max_position_embeddings 2^62", {"max_position_embeddings": 2 ** 62}, "either")]:
        m = d / f"cfg{abs(hash(name))}"
        shutil.copytree(fx["hf"], m)
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(change)
        (m / "config.json").write_text(json.dumps(cfg))
        probe.record(fam, f"config.json {name}", *outcome_of(gen(m), expect))
    q = d / "q"
    probe.cli("quantize", "--model", fx["hf"], "--scheme", "q8_0", "--out", q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization"]["tensors"]["model.norm.weight"] = "q8_0"
    (q / "config.json").write_text(json.dumps(cfg))
    probe.record(fam, "a quantized directory labelling model.norm.weight q8_0", *outcome_of(gen(q), "refuse"))
    # standard input
    for name, source in (("/dev/zero", "/dev/zero"), ("/dev/urandom", "/dev/urandom")):
        for extra in ([], ["--format-only"]):
            with open(source, "rb") as src:
                t0 = time.monotonic()
                p = subprocess.Popen([PY, "-m", "llama_ref", "chat", "--model", str(fx["hf"]), *extra],
                                     cwd=probe.repo, env=probe.env, stdin=src, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=_limits(MEMORY_CAP))
                try:
                    out, err = p.communicate(timeout=60)
                    r = Result(p.returncode, out.decode(), err.decode("utf-8", "replace"), time.monotonic() - t0, False)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.communicate()
                    r = Result(None, "", "", 60, True)
            probe.record(fam, f"chat {' '.join(extra)} < {name}", *outcome_of(r, "refuse"))
    # chat's window: 1,000 turns must take about as long as one forward, not a re-tokenization per dropped pair
    dialog = []
    for i in range(500):
        dialog += [{"role": "user", "content": f"What pet does Mia have? {i}"}, {"role": "assistant", "content": "A cat."}]
    dialog.append({"role": "user", "content": "And Tom?"})
    r = probe.cli("chat", "--model", fx["hf"], "--max-new-tokens", 1, "--temperature", 0,
                  stdin=json.dumps(dialog).encode(), timeout=30)
    probe.record(fam, "chat with 1,000 turns (within 30 s)", *outcome_of(r, "succeed"))
    # training sizes and memory caps
    r = probe.cli("train", "--out", d / "t", "--batch-size", 20000, "--seq-len", 512, "--steps", 1, "--tokens", 400,
                  cap=3 * GIB, timeout=120)
    probe.record(fam, "train --batch-size 20000 --seq-len 512 (3 GiB cap)", *outcome_of(r, "refuse"))
    r = probe.py(f"""
        import resource, sys
        from llama_ref.errors import LlamaRefError
        from llama_ref import load
        vm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + 700 * 2 ** 20, vm + 700 * 2 ** 20))
        try:
            m = load({str(fx['big'])!r})                     # 100 MB file, packed copies fit; then a bigger ask
            m.forward([1, 2, 3])
            m = load({str(fx['big'])!r}, n_tokens=64, memory_budget=2 ** 40)
            m.forward(list(range(1, 60)))
        except LlamaRefError as e:
            print('error:', e, file=sys.stderr); sys.exit(2)""", cap=8 * GIB)
    probe.record(fam, "a model under RLIMIT_AS (+700 MiB) with --memory-budget far above it", *outcome_of(r, "either"))


# ------------------------------------------------------------------------------------------------
# 6. valid output and clean exits

def probe_exits(probe: Probe, fx):
    fam = "exits"
    for n in (0, 1):
        r = probe.cli("generate", "--model", fx["hf"], "--prompt-ids", "1,2", "--max-new-tokens", n, "--json")
        outcome, detail = outcome_of(r, "succeed")
        if outcome == "ok":
            try:
                json.loads(r.out, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
            except ValueError as e:
                outcome, detail = "silent", f"not JSON: {e}"
        probe.record(fam, f"generate --json --max-new-tokens {n}", outcome, detail)
    pipes = {"generate | head -c 5": (["generate", "--model", fx["hf"], "--prompt", "Once", "--max-new-tokens", 40],
                                      ["head", "-c", "5"]),
             "tokenize | head -n 1": (["tokenize", "--text", "Mia has a cat. " * 200], ["head", "-n", "1"]),
             "inspect | head -n 1": (["inspect", "--model", fx["hf"], "--prompt-ids", "1,2"], ["head", "-n", "1"]),
             "chat --format-only --json | head -c 1": (["chat", "--format-only", "--json"], ["head", "-c", "1"])}
    for name, (argv, head) in pipes.items():
        h = subprocess.Popen(head, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        r = probe.run([PY, "-m", "llama_ref", *map(str, argv)], stdout=h.stdin,
                      stdin=json.dumps([{"role": "user", "content": "hi " * 3000}]).encode())
        h.stdin.close()
        h.wait()
        outcome, detail = outcome_of(r, "either")
        noise = [line for line in r.err.splitlines() if line.strip() and not line.startswith("[")]
        if outcome == "ok" and noise:
            outcome, detail = "traceback", f"stderr after EPIPE: {r.err[-300:]}"
        probe.record(fam, name, outcome, detail)
    for name, argv in {"generate > /dev/full": ["generate", "--model", fx["hf"], "--prompt", "Once", "--max-new-tokens", 8],
                       "tokenize > /dev/full": ["tokenize", "--text", "Mia"],
                       "inspect --json > /dev/full": ["inspect", "--model", fx["hf"], "--prompt-ids", "1", "--json"]
                       }.items():
        with open("/dev/full", "wb") as full:
            r = probe.run([PY, "-m", "llama_ref", *map(str, argv)], stdout=full)
        probe.record(fam, name, *outcome_of(r, "refuse"))
    r = probe.cli("chat", "--model", fx["hf"], close_stdin=True)
    probe.record(fam, "chat <&- (stdin closed)", *outcome_of(r, "refuse"))
    r = probe.cli("chat", "--format-only", close_stdin=True)
    probe.record(fam, "chat --format-only <&-", *outcome_of(r, "refuse"))


# ------------------------------------------------------------------------------------------------
# 7. the Python API: every public function (llama_ref.__all__ and what the chapters call) x hostile arguments,
#    generated from the signatures; required arguments get a valid value by name, others keep their defaults

CHAPTER_FUNCTIONS = r"""
import glob, json, re
found = set()
for nb in sorted(glob.glob('notebooks/*.ipynb')):
    d = json.load(open(nb))
    src = "\n".join("".join(c['source']) for c in d['cells'] if c['cell_type'] == 'code')
    imports = {}
    for m in re.finditer(r'from llama_ref(?:\.(\w+))? import ([^\n]+)', src):
        for name in m.group(2).replace('(', '').replace(')', '').split(','):
            name = name.strip().split(' as ')
            if name[0]:
                imports[name[-1].strip()] = (m.group(1), name[0].strip())
    for m in re.finditer(r'(?<![\w.])(\w+)\.(\w+)\(', src):
        a, b = m.groups()
        if a in imports and imports[a][0] is None:
            found.add((imports[a][1], b))
    for m in re.finditer(r'(?<![\w.])(\w+)\(', src):
        a = m.group(1)
        if a in imports and imports[a][0] is not None:
            found.add(imports[a])
import llama_ref
found |= {("", n) for n in llama_ref.__all__ if callable(getattr(llama_ref, n))}
print(json.dumps(sorted(found)))
"""

API_CHILD = r"""
import importlib, inspect, json, math, signal, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
from llama_ref import load, paths
from llama_ref.errors import LlamaRefError
from llama_ref.tokenizer import Tokenizer
from llama_ref.trace import Trace
mod, fn, hf = sys.argv[1], sys.argv[2], sys.argv[3]
model = load(hf)
tok = Tokenizer(paths.DEFAULT_TOKENIZER)
cfg = model.config
rng = np.random.default_rng(0)
def world():
    from llama_ref import corpus
    return corpus.make_world()
VALID = {
    "model": lambda: model, "tokenizer": lambda: tok, "tok": lambda: tok, "config": lambda: cfg, "cfg": lambda: cfg,
    "x": lambda: rng.standard_normal((1, 3, cfg.dim)).astype(np.float32), "w": lambda: np.ones(cfg.dim, np.float32),
    "path": lambda: hf, "n": lambda: 3, "tokens": lambda: [1, 5, 9], "ids": lambda: [1, 5, 9],
    "prompt_ids": lambda: [1, 5, 9], "dialog": lambda: [{"role": "user", "content": "What pet does Mia have?"}],
    "seed": lambda: 0, "cache": lambda: model.new_cache(), "split": lambda: "val", "prompts": lambda: ["Mia has"],
    "trace": lambda: Trace(), "logits": lambda: rng.standard_normal(cfg.vocab_size).astype(np.float32),
    "weights": lambda: dict(model.weights), "params": lambda: dict(model.weights), "layer": lambda: 0,
    "head_dim": lambda: cfg.head_dim, "prompt": lambda: "Once upon a time", "text": lambda: "Mia has a cat.",
    "sentence": lambda: "Mia has a cat.", "questions": lambda: ["What pet does Mia have?"], "world": world,
    "n_tokens": lambda: 8, "scheme": lambda: "q8_0", "values": lambda: [1.0, 2.0, 3.0], "eps": lambda: 1e-5,
    "data": lambda: (np.arange(2000) % cfg.vocab_size).astype(np.int64), "n_heads": lambda: cfg.n_heads,
    "reference": lambda: {}, "heads": lambda: [0], "patterns": lambda: ["logits"], "kind": lambda: "q8_0",
    "factor": lambda: 2.0, "max_tokens": lambda: 32, "dialogs": lambda: [[{"role": "user", "content": "hi"}]],
}
HOSTILE = [("None", None), ("'a'", "a"), ("b'x'", b"x"), ("1.5", 1.5), ("nan", float("nan")), ("-1", -1),
           ("2**70", 2 ** 70), ("[]", []), ("{}", {}), ("object()", object())]
IDS_HOSTILE = [("[1.9, 2.7]", [1.9, 2.7]), ("'1,2'", "1,2"), ("[1, -5]", [1, -5]), ("[[1], [2]]", [[1], [2]]),
               ("[True, False]", [True, False])]
class Timeout(Exception):
    pass
def on_alarm(*_):
    raise Timeout()
signal.signal(signal.SIGALRM, on_alarm)
f = getattr(importlib.import_module("llama_ref" + (f".{mod}" if mod else "")), fn)
sig = inspect.signature(f)
def call(kwargs):
    signal.alarm(20)
    try:
        f(**kwargs)
        return "returned"
    except LlamaRefError as e:
        return "llamaref"
    except Timeout:
        return "hang"
    except MemoryError:
        return "memory"
    except BaseException as e:
        return f"exception {type(e).__name__}: {str(e)[:160]}"
    finally:
        signal.alarm(0)
base = {}
for p in sig.parameters.values():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
    if p.default is inspect.Parameter.empty:
        if p.name not in VALID:
            print(json.dumps({"skip": f"no valid value for {p.name!r}"})); sys.exit(0)
        base[p.name] = VALID[p.name]
first = call({k: v() for k, v in base.items()})
if first != "returned":
    print(json.dumps({"skip": f"the valid call did not return ({first})"})); sys.exit(0)
for p in sig.parameters.values():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("self", "log", "progress", "on_token"):
        continue
    valid = base[p.name]() if p.name in base else p.default
    values = HOSTILE + (IDS_HOSTILE if p.name in ("tokens", "ids", "prompt_ids") else [])
    for label, value in values:
        if value is None and p.default is None:
            continue                                          # None is what the default means
        if type(valid) is type(value) and not (isinstance(value, float) and math.isnan(value)) \
                and label not in dict(IDS_HOSTILE):
            continue                                          # the same type: a value, not a hostile kind
        kwargs = {k: v() for k, v in base.items()}
        kwargs[p.name] = value
        got = call(kwargs)
        print(json.dumps({"param": p.name, "value": label, "got": got,
                          "valid_type": type(valid).__name__}), flush=True)
"""


def probe_api(probe: Probe, fx):
    fam = "api"
    functions = json.loads(probe.py(CHAPTER_FUNCTIONS).out)
    skipped = 0
    for mod, fn in functions:
        r = probe.run([PY, "-c", API_CHILD, mod, fn, str(fx["hf"])], timeout=600, cwd=probe.work / "api")
        lines = [json.loads(line) for line in r.out.splitlines() if line.startswith("{")]
        if lines and "skip" in lines[0]:
            skipped += 1
            continue
        if r.timed_out or (r.rc not in (0, None) and not lines):
            probe.record(fam, f"{mod}.{fn}", "hang" if r.timed_out else "traceback", r.err[-300:])
            continue
        for x in lines:
            got = x["got"]
            outcome = ("ok" if got == "llamaref" else "hang" if got == "hang" else "memory" if got == "memory" else
                       "silent" if got == "returned" else "traceback")
            probe.record(fam, f"{mod + '.' if mod else ''}{fn}({x['param']}={x['value']})", outcome,
                         got if outcome != "ok" else "")
    probe.results.append({"family": fam, "case": "(functions without a generated valid call)",
                          "outcome": "skipped", "detail": str(skipped)})


# ------------------------------------------------------------------------------------------------

FAMILIES = {"output": [probe_output, probe_train_defaults], "signals": [probe_signals], "options": [probe_options],
            "json": [probe_json], "archive": [probe_archives], "files": [probe_files], "exits": [probe_exits],
            "api": [probe_api]}


def summary(results) -> str:
    outcomes = ["traceback", "clobbered", "silent", "memory", "leftover", "hang", "refused"]
    rows = collections.OrderedDict()
    for r in results:
        if r["outcome"] == "skipped":
            continue
        row = rows.setdefault(r["family"], collections.Counter())
        row["tried"] += 1
        if r["outcome"] != "ok":
            row[r["outcome"]] += 1
            row["failed"] += 1
    lines = [f"{'family':10s} {'tried':>6s} {'failed':>7s}  " + " ".join(f"{o:>9s}" for o in outcomes)]
    total = collections.Counter()
    for fam, c in rows.items():
        total.update(c)
        lines.append(f"{fam:10s} {c['tried']:6d} {c['failed']:7d}  " + " ".join(f"{c[o]:9d}" for o in outcomes))
    lines.append(f"{'all':10s} {total['tried']:6d} {total['failed']:7d}  " + " ".join(f"{total[o]:9d}" for o in outcomes))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="the checkout to probe")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--json", default=None, help="write every case and its outcome here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llama_ref-probe-") as work:
        probe = Probe(Path(args.repo).resolve(), Path(work))
        which = probe.py("import llama_ref; print(llama_ref.__file__)").out.strip()
        print(f"probing {which}")
        fx = setup(probe)
        for fam in args.families.split(","):
            print(f"\n{fam}: ", end="", flush=True)
            for fn in FAMILIES[fam]:
                fn(probe, fx)
        print("\n\n" + summary(probe.results))
        if args.json:
            Path(args.json).write_text(json.dumps(probe.results, indent=1) + "\n")
        for r in probe.results:
            if r["outcome"] not in ("ok", "skipped"):
                print(f"  [{r['family']}] {r['outcome']:9s} {r['case']}: {r['detail'][:200]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
