"""`make chat`: the SFT chat model, tinyworld-chat: the first stage of Llama 2-Chat (paper, sec. 3.1) on our world.

    python scripts/make_chat.py                         # from data/models/tinyworld (~7 min on 2 cores)
    python scripts/make_chat.py --tiny --out-dir /tmp/c # a tiny random model, a handful of steps: proves the code

Writes data/models/tinyworld-chat/ (metrics.json, README.md). Ordinary supervised fine-tuning: multi-turn corpus
dialogues without a system message (loss on every answer) and single-turn examples with an instruction
(gatt.baseline_sft_data), so the model never sees an instruction beyond turn 1. The chat models after it:
`make rlhf` (safety SFT, RLHF rounds: tinyworld-rlhf), then `make gatt` (Ghost Attention on top: tinyworld-gatt).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama_ref import gatt, paths, trainer                           # noqa: E402
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE                      # noqa: E402
from llama_ref.checkpoint import save_model                          # noqa: E402
from llama_ref.errors import LlamaRefError                           # noqa: E402
from llama_ref.output import check_output, write_text                              # noqa: E402
from llama_ref.loader import read_checkpoint                         # noqa: E402
from llama_ref.tinyworld import log                                  # noqa: E402
from llama_ref.tokenizer import Tokenizer                            # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from make_gatt import shown_path, tiny_base, write_json              # noqa: E402


def write_model_card(chat_dir: Path) -> None:
    sft = json.loads((chat_dir / "metrics.json").read_text())
    write_text(chat_dir / "README.md", force=True, text=
               "# tinyworld-chat: the SFT baseline\n\n"
               f"Ordinary supervised fine-tuning of `{sft.get('from', 'data/models/tinyworld')}`: {sft['n_examples']} "
               f"examples (multi-turn corpus dialogues without a system message, and single-turn examples with an "
               f"instruction), {sft['steps']} steps at lr {sft['lr']}, loss on assistant tokens only "
               f"({sft['target_tokens']:,} target tokens), {sft['time_s'] / 60:.1f} min. Final training loss "
               f"{sft['final_loss']:.4f}.\n\n"
               "Made by `make chat` (`scripts/make_chat.py`) with the NumPy trainer (`llama_ref/trainer.py`). Same "
               "architecture and tokenizer as the base model. Chat format: Llama 2's (`llama_ref/chat.py`). The "
               "chat models built on it: `tinyworld-rlhf` (`make rlhf`: safety SFT, RLHF rounds; its card and "
               "`rlhf_eval.json` measure this model beside them) and `tinyworld-gatt` (`make gatt`: Ghost Attention "
               "on the RLHF model; `gatt_eval.json` holds this model's instruction adherence per turn too).\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(paths.DEFAULT_MODEL), help="the pre-trained model to start from")
    ap.add_argument("--out-dir", default=str(paths.MODELS_DIR), help="where tinyworld-chat/ is written")
    ap.add_argument("--tiny", action="store_true", help="a tiny random base model and minimal sizes (a smoke test)")
    ap.add_argument("--sft-examples", type=int, default=8000)
    ap.add_argument("--sft-steps", type=int, default=2000,
                    help="600 steps at 3e-4 left the baseline unable to map a style to its sound even at turn 1")
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--time-budget-min", type=float, default=20.0, help="soft budget: training stops when it is used")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cards-only", action="store_true", help="only rewrite README.md from the metrics.json written")
    ap.add_argument("--force", action="store_true",
                    help="replace the model directories in --out-dir if they exist (only directories llama_ref wrote; "
                         "the make target passes it)")
    args = ap.parse_args(argv)
    chat_dir = Path(args.out_dir) / "tinyworld-chat"
    if args.cards_only:
        write_model_card(chat_dir)
        return 0
    check_output(chat_dir, force=args.force, kind="update", inputs=[args.base])             # before any work
    tok_path = paths.DEFAULT_TOKENIZER
    tok = Tokenizer(tok_path)
    if args.tiny:
        args.sft_examples, args.sft_steps, args.batch_size = 24, 3, 4
        config, weights = tiny_base(tok, args.seed)
    else:
        config, weights = read_checkpoint(args.base)
        weights = {k: np.array(v, np.float32) for k, v in weights.items()}
    log(f"base: {config.n_params() / 1e6:.2f}M parameters, context {config.max_seq_len}")
    sft_data = gatt.baseline_sft_data(tok, args.sft_examples, seed=args.seed, max_len=config.max_seq_len)
    log(f"SFT: {len(sft_data)} examples ({sum(e.kind == 'sft-instruction' for e in sft_data)} single-turn with an "
        "instruction)")
    t0 = time.time()
    weights, metrics = trainer.finetune(config, weights, gatt.make_batches(sft_data, args.batch_size, args.seed, pad_id=0),
                                        steps=args.sft_steps, lr=args.sft_lr, seed=args.seed,
                                        time_budget_s=args.time_budget_min * 60, log=log, name="SFT")
    metrics.update({"stage": "baseline SFT", "n_examples": len(sft_data), "time_s": time.time() - t0,
                    "from": "tiny random" if args.tiny else shown_path(args.base)})
    save_model(chat_dir, config, weights, tokenizer_path=tok_path, chat_template=LLAMA2_CHAT_TEMPLATE,
               force=args.force)
    write_json(chat_dir / "metrics.json", metrics)
    write_model_card(chat_dir)
    log(f"wrote {chat_dir} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LlamaRefError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
