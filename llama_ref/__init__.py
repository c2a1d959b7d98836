"""llama_ref: a Jupyter-first, llm.c-style reference implementation of Llama 2 in plain NumPy.

Start with notebooks/00_overview.ipynb. `model = llama_ref.load(path)` runs any checkpoint you have. The modules, one
concept each (DEVELOPING.md has the full map):
  config      LlamaConfig and presets                 model       the forward pass (read this one)
  loader      load(path): every format, memory plan   matrices    weights kept as stored, expanded a tile at a time
  checkpoint  HF dirs (config.json + safetensors)     gguf_io     GGUF read (every type) and write
  llama2c     llama2.c .bin (what run.c reads)        safetensors the file format, read and written
  trace       named activation taps                   inspect     comparing, saving and reading taps
  tokenizer   SentencePiece + a pure-Python BPE       generate    sampling, prefill/decode with a KV cache
  chat        Llama 2 chat format                     gatt        Ghost Attention
  rlhf        reward model, rejection sampling, PPO   train       backward pass, AdamW (trainer: the loop)
  quant       int8, Q8_0, Q4_0, K-quants, W4A16
  ondevice    Conv1x1, single-head attention, splits  synthetic   random-weight checkpoints of real shapes
  corpus      the synthetic world we train on         plots, widgets  figures and explorers for the chapters
"""
from . import arguments
arguments.install()                      # every public function checks its arguments (arguments.BOUNDARY)
from .config import LlamaConfig, PRESETS  # noqa: E402
from .errors import LlamaRefError  # noqa: E402
from .loader import load  # noqa: E402
from .model import Llama, KVCache  # noqa: E402
from .trace import Trace  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LlamaConfig", "PRESETS", "Llama", "KVCache", "Trace", "LlamaRefError", "load", "__version__"]
