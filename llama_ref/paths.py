"""Where the project's own data lives: corpus, tokenizer, the embedded model, reference fixtures.

Every chapter starts from these paths.

Paths resolve relative to the repository checkout (the package is installed editable), so the CLI and
the notebooks find `data/` wherever the clone is.
"""
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_DIR / "data"
CORPUS_DIR = DATA_DIR / "corpus"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
DEFAULT_TOKENIZER = TOKENIZER_DIR / "tokenizer.model"
MODELS_DIR = DATA_DIR / "models"
DEFAULT_MODEL = MODELS_DIR / "tinyworld"          # the embedded model trained by llama_ref.trainer
CHAT_BASELINE_MODEL = MODELS_DIR / "tinyworld-chat"  # SFT baseline (chapter 08: chat format; 09: RLHF; 10: Ghost Attention)
CHAT_GATT_MODEL = MODELS_DIR / "tinyworld-gatt"      # SFT + Ghost Attention
REWARD_MODEL = MODELS_DIR / "tinyworld-rm"           # the reward model of chapter 09
RLHF_MODEL = MODELS_DIR / "tinyworld-rlhf"           # SFT + rejection sampling + PPO
REFERENCE_DIR = DATA_DIR / "reference"
CHAT_MODELS = (CHAT_BASELINE_MODEL, CHAT_GATT_MODEL, RLHF_MODEL)   # the shipped models that chat (they carry a template)
