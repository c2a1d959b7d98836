"""The one output policy: every file or directory llama_ref writes for a user goes through this module.

No chapter teaches it (chapters write only into temporary directories); DEVELOPING.md states the contract.

GGUF, llama2.c `.bin`, safetensors, HF and quantized model directories, `.npz` taps, model cards, metrics and
training state are all written the same way:

  1. check the target first (`check_output`): a directory where a file belongs, an existing file without --force,
     a parent that is a file, a place we may not write: an OutputError before any work is done;
  2. write everything under a temporary name *beside* the target (same directory, so the final rename is atomic);
  3. flush and fsync, give it the permissions the umask asks for (mkstemp would leave 0600), rename it over the
     target with os.replace. A directory is swapped in the same way: the old one is renamed aside to a fresh
     temporary name of our own (never `name.old`, which could be a user's file), the new one renamed in, the old
     one deleted.

Until step 3 the old target is untouched. On any exception, Ctrl-C (SIGINT) or SIGTERM the temporary is removed:
SIGTERM is turned into SystemExit for the duration of a write (main thread only), so `finally` blocks run.
Parent directories are created when missing, for every format alike.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np

from .errors import OutputError


def check_output(path, force=False, kind="file") -> Path:
    """Refuse an output path before any work is done; returns it as a Path.

    kind "file": the target must not be a directory; kind "dir": the target must not be a file. An existing target
    needs force. The nearest existing parent must be a directory we can write into."""
    path = Path(path)
    if path.is_dir() and kind == "file":
        raise OutputError(f"{path} is a directory; give a file name for the output (e.g. {path / 'model.gguf'})")
    if path.exists() and not path.is_dir() and kind == "dir":
        raise OutputError(f"{path} is a file; this output is a directory: choose another path")
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to replace it (force=True from Python)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write into {parent}")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the directory {path.parent} for {path} ({e.strerror or e})") from None


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit(143) while a write is in progress, so the temporary is cleaned up by `finally`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):                    # someone else handles it already
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM while a temporary is created and its name recorded, so an interruption cannot land between
    the two and leave a file nobody will delete; the signal is delivered right after."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _os_error(path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {path} ({e.strerror or e}); check the path, free space and permissions")


@contextlib.contextmanager
def atomic_file(path, force=True):
    """Yield a temporary path beside `path`; write it there. On success it is fsynced, given umask permissions and
    renamed over `path`; on any error or interruption it is deleted and `path` is as it was."""
    path = check_output(path, force=force, kind="file")
    _make_parent(path)
    with _sigterm_as_exit():
        tmp = None
        try:
            with _signals_held():
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                tmp = Path(name)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            raise _os_error(path, e) from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path, force=True):
    """Yield a fresh temporary directory beside `path`; fill it. On success it replaces `path` (an existing directory
    is renamed aside to a temporary name, the new one renamed in, the old one deleted); on any error or
    interruption the temporary directory is deleted and `path` is as it was."""
    path = check_output(path, force=force, kind="dir")
    with temp_dir_beside(path) as tmp:
        yield tmp
        publish(tmp)
        aside = None
        try:
            with _signals_held():                                 # the swap: two renames, not interrupted between
                if path.exists():
                    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                    os.replace(path, aside / "old")              # a name inside our own fresh directory: no collision
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError:
            if aside is not None and (aside / "old").exists() and not path.exists():
                os.replace(aside / "old", path)                  # put the old one back
            raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def temp_dir_beside(path):
    """Yield a fresh temporary directory next to `path`, deleted when the block ends, however it ends (an
    exception, SIGINT, SIGTERM). atomic_dir swaps it in whole; checkpoint.save_model moves its files into an
    existing directory one by one (call `publish` first). An OSError inside becomes an OutputError."""
    path = Path(path)
    _make_parent(path)
    with _sigterm_as_exit():
        tmp = None
        try:
            with _signals_held():
                tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            yield tmp
        except OSError as e:
            raise _os_error(path, e) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path) -> None:
    """fsync every file of a temporary directory and give files and directory the umask's permissions."""
    mask = _umask()
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)


def write_text(path, text: str, force=True) -> Path:
    """A text file (model card, metrics, config), atomically."""
    with atomic_file(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_npz(path, arrays, force=True) -> Path:
    """np.savez of {name: array}, atomically (taps for `inspect --save`, optimizer state)."""
    with atomic_file(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def _fsync_dir(d: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
