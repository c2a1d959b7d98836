"""What many test files share: random weights of a config, one convention for all.

`from conftest import random_weights` (pytest puts tests/ on sys.path); a plain function rather than a fixture, because
module-scoped fixtures and parametrize lists need weights when the module is collected.
"""
import numpy as np

from llama_ref.weights import weight_shapes


def random_weights(cfg, seed=0, scale=0.3):
    """HF-named float32 weights of `cfg`: matrices N(0, scale^2), norm gains 1 + N(0, 0.1^2) (a trained model's look:
    gains near one, not zero). The same seed gives the same weights in every test file."""
    rng = np.random.default_rng(seed)
    w = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in weight_shapes(cfg).items()}
    for k in w:
        if w[k].ndim == 1:
            w[k] = (1.0 + 0.1 * rng.standard_normal(w[k].shape)).astype(np.float32)
    return w
