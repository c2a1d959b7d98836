"""Run the on-device graphs on Qualcomm's HTP and store what chapter 13 shows of the run.

The HTP (Hexagon Tensor Processor) is the NPU of Snapdragon chips. onnxruntime-qnn's Linux x86_64 wheel carries a
simulator of it, which runs here in ONNX Runtime's QNN execution provider with CPU fallback disabled: every node must
be placed on the HTP or the session is refused. This script

  1. exports the embedded model with `python -m llama_ref export --format qnn-onnx` at its defaults (8 graphs),
  2. opens the 8 graphs on the HTP (onnx_export.session(provider="qnn-htp")), with the EP writing its op trace,
  3. runs the host loop (OnnxOnDeviceLlama.generate) over the chapter's two prompts, 32 greedy tokens each,

and writes data/ondevice/htp_run.json (versions, provider options, the EP's placement report per graph, prompts and
greedy ids) and data/ondevice/htp_logits.npz (the logits of every step). Chapter 13 compares them with the NumPy twin
it computes itself; tests/test_interop.py repeats the run and asserts. A simulator's timings say nothing about a
phone's, so none are recorded.

    .venv-interop/bin/python scripts/qnn_htp_run.py       # `make interop-env` makes .venv-interop (about 10 minutes)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama_ref import ondevice_onnx as QO, onnx_export as OX, paths                 # noqa: E402
from llama_ref.errors import LlamaRefError                                          # noqa: E402
from llama_ref.output import save_npz, write_text                                   # noqa: E402
from llama_ref.tokenizer import Tokenizer                                           # noqa: E402

PROMPTS = ("Once upon a time, there was a happy girl named", "[INST] What does a cow say? [/INST]")
NEW_TOKENS = 32
OUT_DIR = paths.DATA_DIR / "ondevice"


def run(out_dir: Path, force: bool) -> dict:
    OX.qnn_htp_devices()                        # onnxruntime-qnn and its HTP backend, or an error naming the install
    import onnxruntime
    import onnxruntime_qnn
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "dev"
        proc = subprocess.run([sys.executable, "-m", "llama_ref", "export", "--format", "qnn-onnx", "--out",
                               str(export)], capture_output=True, text=True, cwd=paths.REPO_DIR)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        manifest = json.loads((export / "ondevice.json").read_text())
        htp = QO.OnnxOnDeviceLlama(export, provider="qnn-htp", op_trace_dir=Path(tmp) / "trace")
        placement = QO.htp_placement(Path(tmp) / "trace")
        tok = Tokenizer(export / "tokenizer.model")
        runs, logits = [], {}
        for k, text in enumerate(PROMPTS):
            prompt = tok.encode(text, bos=True)
            ids, step_logits = htp.generate(prompt, NEW_TOKENS)
            runs.append({"text": text, "prompt": prompt, "ids": ids})
            logits[f"prompt{k}"] = np.stack(step_logits)                        # (NEW_TOKENS, V)
            print(f"{text!r} -> {tok.decode(ids)!r}", flush=True)
    report = {"model": str(paths.DEFAULT_MODEL.relative_to(paths.REPO_DIR)),
              "export": {k: manifest[k] for k in ("parts", "prompt_len", "context", "scheme", "graphs")},
              "provider_options": OX.QNN_HTP_OPTIONS, "cpu_fallback": "disabled",
              "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_qnn": onnxruntime_qnn.__version__},
              "placement": placement, "new_tokens": NEW_TOKENS, "runs": runs}
    write_text(out_dir / "htp_run.json", json.dumps(report, indent=1) + "\n", force=force)
    save_npz(out_dir / "htp_logits.npz", logits, force=force)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT_DIR, help="directory for htp_run.json and htp_logits.npz")
    p.add_argument("--force", action="store_true", help="replace the stored run")
    args = p.parse_args(argv)
    try:
        run(args.out, args.force)
    except LlamaRefError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
