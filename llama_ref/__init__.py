"""llama_ref: a Jupyter-first, llm.c-style reference implementation of Llama 2 in plain NumPy.

Start with notebooks/00_overview.ipynb. The modules, one concept each:
  config      LlamaConfig and presets                 model       the forward pass (read this one)
  trace       named activation taps                   checkpoint  HF dirs, llama2.c .bin, GGUF loading/saving
  tokenizer   SentencePiece + a pure-Python BPE       generate    sampling, prefill/decode with a KV cache
  chat        Llama 2 chat format, Ghost Attention    train       backward pass, AdamW, the training loop
  quant       int8, Q8_0, Q4_0, W4A16                 ondevice    Conv1x1, single-head attention, split graphs
  corpus      the synthetic world we train on         plots, widgets  figures and explorers for the chapters
"""
from .config import LlamaConfig, PRESETS
from .errors import LlamaRefError
from .model import Llama, KVCache
from .trace import Trace

__version__ = "0.1.0"
__all__ = ["LlamaConfig", "PRESETS", "Llama", "KVCache", "Trace", "LlamaRefError", "__version__"]
