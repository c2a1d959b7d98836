"""Write what travels with a model (llama_ref.model_files.companion_files) into the shipped model directories.

`make gatt`, `make rlhf` and `make model` write these files themselves (checkpoint.save_model); this script brings the
directories in data/models/ up to date without retraining them: tokenizer.json, tokenizer_config.json (with the chat
template for the chat models, paths.CHAT_MODELS) and generation_config.json (Meta's chat sampling defaults for those).
Each file is replaced atomically; the weights are not touched. tests/test_model_files.py checks the result.

    python scripts/write_model_files.py            # every model in data/models/
    python scripts/write_model_files.py DIR...     # only these (a DIR in paths.CHAT_MODELS gets the template)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llama_ref import model_files, paths                                      # noqa: E402
from llama_ref.chat import LLAMA2_CHAT_TEMPLATE                                # noqa: E402
from llama_ref.config import LlamaConfig                                       # noqa: E402
from llama_ref.errors import LlamaRefError                                     # noqa: E402
from llama_ref.output import atomic_file                                       # noqa: E402


def write_model_files(model_dir: Path) -> list[str]:
    """The companion files of one model directory (its config.json and tokenizer.model), replaced atomically."""
    model_dir = Path(model_dir).resolve()
    chat = LLAMA2_CHAT_TEMPLATE if model_dir in {p.resolve() for p in paths.CHAT_MODELS} else None
    files = model_files.companion_files(LlamaConfig.load(model_dir), model_dir / model_files.TOKENIZER_MODEL, chat)
    for name, content in files.items():
        if name == model_files.TOKENIZER_MODEL:
            continue                                             # the source itself
        with atomic_file(model_dir / name, force=True) as tmp:
            Path(tmp).write_bytes(content)
    return sorted(files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", type=Path, help="model directories (default: every one in data/models/)")
    args = p.parse_args(argv)
    dirs = args.dirs or sorted(c.parent for c in paths.MODELS_DIR.glob("*/config.json"))
    try:
        for d in dirs:
            print(f"{d}: {', '.join(write_model_files(d))}")
    except LlamaRefError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
