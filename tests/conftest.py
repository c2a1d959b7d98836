"""What many test files share, written once: random weights, the CLI runner and its error check, the relative error,
the reference fixtures' manifest, and the default tokenizer.

`from conftest import random_weights, cli, assert_error, bounded, rel_err, MANIFEST, REPO` (pytest puts tests/ on
sys.path);
`tok` is a fixture every test file can ask for. random_weights is a plain function rather than a fixture, because
module-scoped fixtures and parametrize lists need weights when the module is collected.
"""
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from llama_ref import paths
from llama_ref.errors import LlamaRefError
from llama_ref.tokenizer import Tokenizer
from llama_ref.weights import weight_shapes

REPO = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((paths.REFERENCE_DIR / "manifest.json").read_text())      # what the reference fixtures hold


def random_weights(cfg, seed=0, scale=0.3):
    """HF-named float32 weights of `cfg`: matrices N(0, scale^2), norm gains 1 + N(0, 0.1^2) (a trained model's look:
    gains near one, not zero). The same seed gives the same weights in every test file."""
    rng = np.random.default_rng(seed)
    w = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in weight_shapes(cfg).items()}
    for k in w:
        if w[k].ndim == 1:
            w[k] = (1.0 + 0.1 * rng.standard_normal(w[k].shape)).astype(np.float32)
    return w


def rel_err(a, b):
    """max |a - b| relative to max |b|, in float64 (the tolerance convention of the reference comparisons)."""
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def cli(*args, stdin=None, timeout=300, env=None):
    """`python -m llama_ref ARGS` as a subprocess from the repository root. stdin: text or bytes (bytes reach the
    command unchanged, e.g. invalid UTF-8); stdout and stderr come back as text (undecodable bytes replaced)."""
    data = stdin.encode("utf-8", "surrogatepass") if isinstance(stdin, str) else stdin
    r = subprocess.run([sys.executable, "-m", "llama_ref", *map(str, args)], input=data, capture_output=True,
                       timeout=timeout, cwd=REPO, env=env)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                       r.stderr.decode("utf-8", "replace"))


def assert_error(proc, message=""):
    """The CLI's answer to bad input: exit 2 and exactly one stderr line `error: ...` containing `message`."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, f"exit {proc.returncode}: {err[-1500:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-1500:]
    assert "Traceback" not in err and message in lines[0], lines[0]


def genai_greedy(og, model, prompt, max_new_tokens):
    """ONNX Runtime GenAI's own greedy loop (its Generator) on an og.Model: the new ids, up to max_new_tokens or EOS."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    ids = []
    while not generator.is_done():
        generator.generate_next_token()
        ids.append(int(generator.get_next_tokens()[0]))
    return ids


@pytest.fixture(scope="session")
def tok():
    """The project's SentencePiece tokenizer (data/tokenizer/tokenizer.model)."""
    return Tokenizer(paths.DEFAULT_TOKENIZER)


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def bounded(fn, *args, timeout=20.0):
    """Run fn(*args) in a forked child with RLIMIT_AS = our size + 1 GiB. Returns ("ok", None),
    ("llamaref", message) or ("bad", description) for any other exception, a crash, or a timeout."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                                   # child
        os.close(r)
        try:
            limit = _vm_bytes() + (1 << 30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            try:
                fn(*args)
                out = ("ok", None)
            except LlamaRefError as e:
                out = ("llamaref", str(e))
            except BaseException as e:                             # noqa: BLE001 - that is the finding
                out = ("bad", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            data = pickle.dumps(out)
            os.write(w, data[:60000])
        finally:
            os._exit(0)
    os.close(w)
    deadline, chunks = time.monotonic() + timeout, []
    os.set_blocking(r, False)
    while True:
        try:
            chunk = os.read(r, 65536)
            if chunk:
                chunks.append(chunk)
            else:
                break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(r)
                return ("bad", f"hang: no answer within {timeout} s")
            time.sleep(0.005)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return ("bad", f"child died (wait status {status})")
    return pickle.loads(b"".join(chunks))
