"""Bounded reads: what llama_ref reads from a user is checked for kind and size before it is read or allocated.

No chapter teaches it; every reader of user files goes through it (DEVELOPING.md states the rules):
  - only regular files are read: a FIFO would block for ever, /dev/zero never ends, a directory is not a file;
  - JSON files and standard input have size caps, checked before reading (JSON_MAX_BYTES, STDIN_MAX_BYTES);
  - one JSON parser, `parse_json`, for every JSON the package reads: whatever json raises on hostile text
    (JSONDecodeError, RecursionError for [[[[..., ValueError for a 5000-digit number, UnicodeDecodeError) becomes
    the caller's LlamaRefError naming the file;
  - `.npz` archives: member names, dtypes and shapes are read from the zip and .npy headers first (`npz_members`);
    strings, objects, a member whose claimed size does not match its bytes or does not fit in memory are refused
    before anything is loaded (`read_npz`).
GGUF counts are checked against the bytes left in the file by gguf_io (`check_gguf_counts`), before gguf-py parses.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import CheckpointError, InputError, LlamaRefError
from .memory import require

JSON_MAX_BYTES = 64 * 2 ** 20        # config, shard index, tokenizer.json (Llama 3's is 9 MB), evaluation files
STDIN_MAX_BYTES = 16 * 2 ** 20       # a dialogue on standard input
NPZ_KINDS = "biuf"                   # bool, signed, unsigned, float: what a tap or an optimizer state can be


def regular_file(path, what="file", error=CheckpointError) -> Path:
    """path, if it names a regular file (links followed); else `error` saying what it is instead."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise error(f"the {what} path must be a str or a path, not {type(path).__name__}")
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path} does not exist; check the path of the {what}") from None
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is a directory; give the {what} itself")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file (a pipe, a device or a socket?); give the {what} as a file")
    return path


def read_bytes(path, what="file", error=CheckpointError, limit=JSON_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (checked before reading, and while reading: a file that
    grows meanwhile is cut off at limit + 1 bytes and refused)."""
    path = regular_file(path, what, error)
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path} is {size / 2**20:.1f} MiB; a {what} larger than {limit / 2**20:.0f} MiB is not read "
                        "(is it the right file?)")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror or e})") from None
    if len(data) > limit:
        raise error(f"{path} grew past {limit / 2**20:.0f} MiB while it was read; a {what} is not that large")
    return data


def parse_json(data, where, error=CheckpointError):
    """The one JSON parser: text or UTF-8 bytes -> a Python value, or `error` naming `where` for anything json or
    the UTF-8 decoder raises on hostile input. NaN and Infinity are accepted here; validators refuse them."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{where} is not valid UTF-8 JSON (byte {e.start} is not UTF-8)") from None
    except RecursionError:
        raise error(f"{where} is not valid JSON (nested too deeply to read)") from None
    except (ValueError, TypeError, MemoryError, OverflowError) as e:      # JSONDecodeError, a 5000-digit number
        raise error(f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:160]})") from None


def read_json(path, what="JSON file", error=CheckpointError, limit=JSON_MAX_BYTES):
    """A JSON file: regular, at most `limit` bytes, parsed by parse_json."""
    return parse_json(read_bytes(path, what, error, limit), str(path), error)


def read_stdin(limit=STDIN_MAX_BYTES, error=InputError) -> bytes:
    """Standard input as bytes, at most `limit` (a closed stdin, /dev/zero or /dev/urandom is refused quickly)."""
    stream = sys.stdin
    if stream is None or getattr(stream, "closed", True):
        raise error("standard input is closed; give the input on stdin (e.g. `< dialog.json` or a pipe)")
    buf = getattr(stream, "buffer", None)
    try:
        data = buf.read(limit + 1) if buf is not None else stream.read(limit + 1).encode("utf-8", "surrogateescape")
    except (OSError, ValueError) as e:
        raise error(f"cannot read standard input ({getattr(e, 'strerror', None) or e})") from None
    if len(data) > limit:
        raise error(f"more than {limit / 2**20:.0f} MiB on standard input; give a smaller input (is it the right "
                    "file?)")
    return data


# ------------------------------------------------------------------------------------------------
# .npz archives: headers first, then the arrays

def npz_members(path, error=InputError) -> dict[str, tuple[np.dtype, tuple]]:
    """{name: (dtype, shape)} of an .npz, read from the zip directory and each member's .npy header (no array is
    read). Refused: not a zip, a member that is not .npy, object or string dtypes, a shape whose bytes differ from
    what the member holds."""
    path = regular_file(path, ".npz file", error)
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename.removesuffix(".npy")
                if not info.filename.endswith(".npy"):
                    raise error(f"{path}: member {info.filename!r} is not an .npy array; is this an .npz of arrays?")
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:
                        raise error(f"{path}: member {name!r} has .npy version {version}, which is not read")
                    shape, _, dtype = read(f, max_header_size=10000)
                    header_len = f.tell()
                if dtype.hasobject or dtype.kind not in NPZ_KINDS or dtype.fields is not None:
                    raise error(f"{path}: array {name!r} has dtype {dtype}; only numbers (bool, int, float) are "
                                "compared and loaded")
                n = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if n != info.file_size - header_len:
                    raise error(f"{path}: array {name!r} claims shape {shape} of {dtype} ({n:,} bytes) but its member "
                                f"holds {info.file_size - header_len:,}; the archive is corrupt")
                out[name] = (dtype, tuple(shape))
    except LlamaRefError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
        raise error(f"{path} is not a readable .npz archive ({type(e).__name__}: {str(e)[:160]})") from None
    return out


class NpzArchive(Mapping):
    """An .npz whose headers were checked (npz_members): `.shapes` and `.dtypes` without reading any array; an
    array is read when asked for, after its size is checked against the memory this process may still take."""

    def __init__(self, path, error=InputError):
        self.path, self.error = Path(path), error
        members = npz_members(path, error)
        self.shapes = {n: s for n, (_, s) in members.items()}
        self.dtypes = {n: d for n, (d, _) in members.items()}

    def __getitem__(self, name):
        if name not in self.shapes:
            raise KeyError(name)
        nbytes = int(np.prod(self.shapes[name], dtype=object)) * self.dtypes[name].itemsize
        require(nbytes, f"array {name!r} of {self.path}", "give a smaller archive", self.error)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return z[name]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # e.g. a CRC error found while inflating
            raise self.error(f"{self.path} cannot be read ({type(e).__name__}: {str(e)[:160]}); the archive is "
                             "corrupt") from None

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def read_npz(path, error=InputError) -> dict[str, np.ndarray]:
    """All arrays of an .npz, after every header is checked and their total against the memory available."""
    archive = NpzArchive(path, error)
    total = sum(int(np.prod(s, dtype=object)) * archive.dtypes[n].itemsize for n, s in archive.shapes.items())
    require(total, f"the arrays of {path}", "give a smaller archive", error)
    return {name: archive[name] for name in archive}
