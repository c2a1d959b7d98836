"""`make model`: train the embedded model data/models/tinyworld from scratch and measure it.

The recipe is llama_ref/tinyworld.py (also `python -m llama_ref train`); `--help` lists the options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama_ref.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
