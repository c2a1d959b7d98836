"""Hugging Face model directories: config.json + safetensors (one file, or shards and an index), read and written.

Chapter 00 (the model on disk) reads this file. `load_hf_dir` / `save_model`; what we write loads in transformers'
LlamaForCausalLM.from_pretrained. The file format itself is safetensors.py's; llama2.c files are llama2c.py's, GGUF
gguf_io.py's; `loader.read_checkpoint(path)` picks the reader from what `path` is, and `llama_ref.load(path)` makes the
model. The weights are the flat dict of DEVELOPING.md: Hugging Face names and layouts (q/k rows in
rotate-half order).

Memory: the safetensors reader is our own. It parses the JSON header and returns np.memmap views straight into
the file, so nothing is read until it is used and a 7B checkpoint is never held in RAM twice (the OS page cache
*is* the array). float32 and float16 tensors are zero-copy views, bfloat16 matrices BFloat16Matrix views of the
bits (NumPy has no bfloat16); float64 becomes float32 copies.

Writes are atomic: a file is written complete under a temporary name beside its destination, then renamed over it
with os.replace. We never write into an existing file, so arrays still memory-mapped from an old checkpoint stay
valid when a new one is saved over it, and a crash leaves either the old file or the new one, never half of each.
The directory policy is spelled out in save_model.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, TokenizerError
from .inputs import read_json
from .output import check_output, inputs_of, updated_dir
from .model_files import COMPANION_FILES, companion_files
from .safetensors import _is_int, _write_safetensors, read_safetensors
from .weights import check_finite_array, check_weights, is_ignored, weight_shapes

F32 = np.float32

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# ================================================================================================
# HF model directories

def load_hf_dir(path, check_finite=True, heads=None):
    """Load config.json + model.safetensors (or the shards of model.safetensors.index.json) from a directory.

    Like transformers, a single model.safetensors wins over an index when both are present. Returns (config,
    weights) with weights validated against the config and the ignorable tensors dropped. `heads` {name: what it is}
    names tensors a caller reads beside the model's (a reward model's score.weight): each must be present and finite,
    and comes back in the weights; the caller checks its shape.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}; an HF model directory needs config.json next to "
                              "model.safetensors (save one with llama_ref.checkpoint.save_model)")
    config = LlamaConfig.load(path / CONFIG_NAME)
    if (path / SAFETENSORS_NAME).is_file():
        weights, sources = _load_single(path / SAFETENSORS_NAME)
    elif (path / INDEX_NAME).is_file():
        weights, sources = _load_sharded(path / INDEX_NAME)
    elif any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds PyTorch pickle weights, which llama_ref does not read (they need torch "
                              "and can run code); convert them once with transformers: "
                              "LlamaForCausalLM.from_pretrained(dir).save_pretrained(out_dir)  # writes safetensors")
    else:
        raise CheckpointError(f"{path} has config.json but no {SAFETENSORS_NAME} or {INDEX_NAME}; copy the weights "
                              "into the directory")
    weights = {n: _to_model_dtype(a) for n, a in weights.items() if not is_ignored(n, config)}
    src = path / SAFETENSORS_NAME if len(set(sources.values())) == 1 else path
    extra = {}
    for name, what in (heads or {}).items():
        if name not in weights:
            raise CheckpointError(f"{src} has no {name} ({what}): it is not that kind of model")
        extra[name] = weights.pop(name)
        if check_finite:
            check_finite_array(name, np.asarray(extra[name]), f" in {src}")
    check_weights(config, weights, source=src, check_finite=check_finite)
    return config, {n: weights[n] for n in weight_shapes(config)} | extra      # canonical order, whatever the file's


def _load_single(file):
    tensors, metadata = read_safetensors(file)
    _check_format(file, metadata)
    return tensors, {n: file for n in tensors}


def _load_sharded(index_path):
    """Shards named by the index's weight_map; every tensor must be exactly where the index says."""
    index = read_json(index_path, "shard index")                          # CheckpointError for any bad JSON
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} lacks a weight_map {{tensor name: shard file}}; re-save the checkpoint")
    weights, sources = {}, {}
    for shard in sorted(set(weight_map.values())):
        file = index_path.parent / shard
        if Path(shard).name != shard:
            raise CheckpointError(f"{index_path} names shard {shard!r} outside the model directory; refusing to read it")
        if not file.is_file():
            raise CheckpointError(f"{index_path} lists shard {shard} but {file} does not exist; copy all shards "
                                  "into the directory")
        tensors, metadata = read_safetensors(file)
        _check_format(file, metadata)
        for name, a in tensors.items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{file} holds tensor {name!r} but {index_path.name} maps it to "
                                      f"{weight_map.get(name)!r}; the index is out of date: re-save the checkpoint")
            weights[name], sources[name] = a, file
    lost = [n for n, s in weight_map.items() if n not in weights]
    if lost:
        raise CheckpointError(f"{index_path} maps tensor {lost[0]!r} to {weight_map[lost[0]]} but that shard does not "
                              f"hold it ({len(lost)} such tensors); the shards and the index disagree: re-save")
    return weights, sources


def _check_format(file, metadata):
    fmt = metadata.get("format", "pt")
    if fmt not in ("pt", "np", "numpy", "tf", "flax", "mlx"):
        raise CheckpointError(f"{file}: __metadata__ format={fmt!r} is not a tensor framework we know; re-save it")


def _to_model_dtype(a):
    """float32/float16 views stay views; float64 becomes a float32 copy (bf16 was converted by the reader).

    np.array, not a.astype: astype on a memmap returns an in-RAM copy still typed np.memmap, which would lie.
    Values beyond float32's range become inf, which the finiteness check then reports.
    """
    if isinstance(a, np.ndarray) and a.dtype == np.float64:
        with np.errstate(over="ignore"):
            return np.array(a, dtype=F32)
    return a


def save_model(path, config: LlamaConfig, weights: dict, tokenizer_path=None, max_shard_bytes=None,
               extra_files=None, extra_tensors=None, config_extra=None, chat_template=None, force=False):
    """Write an HF model directory that llama_ref and transformers' LlamaForCausalLM.from_pretrained both load.

    Writes config.json, model.safetensors in float32 (or, with max_shard_bytes, model-0000i-of-0000n.safetensors
    shards of at most that many bytes each plus model.safetensors.index.json; a tensor larger than the limit gets a
    shard of its own), what travels with a model (model_files.companion_files: generation_config.json and, with
    tokenizer_path, tokenizer.model + tokenizer.json + tokenizer_config.json; a chat model, chat_template=
    chat.LLAMA2_CHAT_TEMPLATE, gets the template and Meta's chat sampling defaults), and extra_files {file name:
    str | bytes | path to copy}. The weights, the tokenizer and the template are checked before anything is written.
    extra_tensors {name: array} go into the weight file beside the model's (a reward model's `score.weight`), and
    config_extra {key: value} into config.json (its `architectures`); loaders of a causal LM refuse such a directory.

    The output policy (output.py, `updated_dir`): a new path gets the whole directory in one rename; an existing
    one only with force and only if llama_ref wrote it: each new file is moved in with os.replace (weights first,
    config.json last). Files of the user's are left alone (never replaced), and the weight files of an earlier save
    in another layout (model.safetensors, model.safetensors.index.json, model-*-of-*.safetensors), which would
    otherwise shadow or contradict the new weights, are removed once the new ones are in place. On any error or
    signal the temporary directory is removed and `path` is as it was. Existing files are replaced, never written
    into, so arrays memory-mapped from them stay valid.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; save_model writes a model directory: "
                              "choose a new path")
    check_weights(config, weights, source="the weights to save")
    if max_shard_bytes is not None and (not _is_int(max_shard_bytes) or max_shard_bytes <= 0):
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes!r} must be a positive number of bytes")
    extra_files = dict(extra_files or {})
    ours = {CONFIG_NAME, SAFETENSORS_NAME, INDEX_NAME, *COMPANION_FILES}
    for name in extra_files:
        if Path(name).name != name or name in ours or SHARD_PATTERN.match(name) or name.startswith("."):
            raise CheckpointError(f"extra file name {name!r} must be a plain file name that is not one save_model "
                                  "writes itself")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise TokenizerError(f"tokenizer {tokenizer_path} does not exist; pass the tokenizer.model the model was "
                             "trained with, or tokenizer_path=None")
    companions = companion_files(config, tokenizer_path, chat_template)
    inputs = inputs_of(weights, extra_tensors, tokenizer_path)
    check_output(path, force=force, kind="update", inputs=inputs)

    def stale(name):                                                   # weight files of an earlier layout
        return name in (SAFETENSORS_NAME, INDEX_NAME) or bool(SHARD_PATTERN.match(name))
    with updated_dir(path, force=force, inputs=inputs, last=(CONFIG_NAME,), stale=stale) as tmp:
        tensors = {n: weights[n] for n in weight_shapes(config)}              # HF order, lm_head only if untied
        tensors.update(extra_tensors or {})
        _write_weights(tmp, tensors, max_shard_bytes)
        for name, content in companions.items():
            (tmp / name).write_bytes(content)
        for name, content in extra_files.items():
            if isinstance(content, str):
                (tmp / name).write_text(content)
            elif isinstance(content, (bytes, bytearray)):
                (tmp / name).write_bytes(content)
            else:
                shutil.copyfile(content, tmp / name)
        (tmp / CONFIG_NAME).write_text(json.dumps({**config.to_hf(), **(config_extra or {})}, indent=2) + "\n")
    return path


def _write_weights(dir_, tensors, max_shard_bytes):
    """float32 model.safetensors, or shards + index when max_shard_bytes is given. Returns the file names written."""
    if max_shard_bytes is None:
        _write_safetensors(dir_ / SAFETENSORS_NAME, tensors, dtype=F32)
        return [SAFETENSORS_NAME]
    nbytes = {n: 4 * math.prod(np.shape(a)) for n, a in tensors.items()}          # as float32
    shards, cur, cur_bytes = [], {}, 0                     # greedy: fill a shard until the next tensor would overflow
    for name, a in tensors.items():
        if cur and cur_bytes + nbytes[name] > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = a
        cur_bytes += nbytes[name]
    shards.append(cur)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(dir_ / fname, shard, dtype=F32)
        names.append(fname)
        weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (dir_ / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_NAME]
