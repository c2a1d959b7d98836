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
CHAT_BASELINE_MODEL = MODELS_DIR / "tinyworld-chat"  # SFT baseline (chapter 08: chat format; 09-10: where RLHF starts)
REWARD_MODEL = MODELS_DIR / "tinyworld-rm"           # the helpfulness reward model of chapters 09-10
SAFETY_REWARD_MODEL = MODELS_DIR / "tinyworld-safety-rm"  # the safety reward model of chapters 09-10
RLHF_MODEL = MODELS_DIR / "tinyworld-rlhf"           # SFT + safety SFT + rounds of rejection sampling, PPO in the last
CHAT_GATT_MODEL = MODELS_DIR / "tinyworld-gatt"      # the RLHF model + Ghost Attention (chapter 11)
REFERENCE_DIR = DATA_DIR / "reference"
CHAT_MODELS = (CHAT_BASELINE_MODEL, CHAT_GATT_MODEL, RLHF_MODEL)   # the shipped models that chat (they carry a template)
RUNS_DIR = REPO_DIR / "runs"                       # `train` without --out writes runs/train-<time>/
