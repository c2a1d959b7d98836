"""Errors: one base class, `LlamaRefError`, and a subclass per kind of bad input.

Chapter 00 shows a few (a broken checkpoint, a token id out of range); every module raises them.

Every message says what was wrong and what to do about it. Code in this package raises these for
anything a user controls (files, configs, token ids, sampling settings) so a user never sees a bare
traceback from deep inside NumPy.
"""


class LlamaRefError(Exception):
    """Base class of every error llama_ref raises on purpose."""


class ConfigError(LlamaRefError, ValueError):
    """A model config is invalid or does not match the weights."""


class CheckpointError(LlamaRefError):
    """A checkpoint file is missing, truncated, corrupt or in a format we do not read."""


class ShapeMismatchError(CheckpointError, ValueError):
    """A tensor's shape does not match what the config says it must be."""


class NonFiniteWeightsError(CheckpointError, ValueError):
    """A weight tensor holds NaN or Inf."""


class MemoryBudgetError(CheckpointError):
    """A model (with the tokens asked for) cannot fit in the memory this machine has available."""


class TokenizerError(LlamaRefError):
    """A tokenizer model is missing or corrupt, or text/ids cannot be handled by it."""


class InputError(LlamaRefError, ValueError):
    """Bad input to the forward pass: token ids out of range, wrong shapes or dtypes."""


class PreferenceError(InputError):
    """A preference file or record that cannot be used: an unknown degree, an empty reply, a mismatched pair."""


class ContextLengthError(InputError):
    """Prompt plus new tokens do not fit into the model's context window (max_seq_len)."""


class SamplingError(LlamaRefError, ValueError):
    """Invalid sampling settings (temperature, top-k, top-p, seed)."""


class QuantizationError(LlamaRefError, ValueError):
    """A tensor cannot be quantized with the requested scheme (e.g. row length not a multiple of the block)."""


class ChatFormatError(LlamaRefError, ValueError):
    """A dialogue does not follow the Llama 2 chat rules (roles, special markers)."""


class OutputError(LlamaRefError):
    """An output cannot be written where it was asked for (a directory, no permission, exists without --force)."""


class TrainingError(LlamaRefError):
    """Training cannot go on: bad settings, a loss that became NaN/Inf, a resume state that does not fit."""


class ExtraMissingError(LlamaRefError):
    """A feature needs an optional extra that is not installed; the message names the pip command."""
