"""The one output policy: every file or directory llama_ref writes for a user goes through this module.

No chapter teaches it (chapters write only into temporary directories); DEVELOPING.md states the contract.

GGUF, llama2.c `.bin`, safetensors, HF and quantized model directories, ONNX directories, `.npz` taps, model cards,
metrics, JSON and training state are all written the same way:

  1. `check_output(path, force, kind, inputs)` before any work. Refused: an existing path or a dangling link without
     force; with force, anything but a regular file or a directory llama_ref wrote (a FIFO, a device, a socket, a link
     to /proc/self/fd/1, a directory of the user's); a path that is one of the inputs, inside one, or holds one; a
     file name longer than the file system allows; a parent that is a file or that we may not write into.
  2. Everything is written under a temporary name beside the target (same directory: the final rename is atomic).
     Temporaries are named `.llama_ref-tmp-<hash of the target name>-<pid>-<random>` (short whatever the target's
     length), and each is entered in a registry *before* it is created.
  3. flush, fsync, permissions (the umask's for a new output, the replaced one's mode under force), then the rename:
     a new output with renameat2(RENAME_NOREPLACE) (os.link + unlink for files where the kernel or file system lacks
     it), so a path that appeared meanwhile is never replaced and the second of two writers gets an OutputError; a
     replaced output only if it is still the one checked in step 1 (a directory is swapped with RENAME_EXCHANGE).

Until step 3 the old target is untouched. On an exception, and on SIGINT, SIGTERM, SIGHUP or SIGQUIT, every
temporary in the registry and every directory created for the output are removed: the signal handler works from the
registry, so it does not matter in which thread the kernel delivered the signal or where the main thread was when
Python ran the handler; atexit does the same at exit. Temporaries of a process that died without cleaning (SIGKILL)
carry a dead pid and are removed by the next write to the same place.

Directories llama_ref writes carry a marker, `.llama_ref.json`, listing the files it wrote there; force replaces or
updates a directory only when it has the marker and holds nothing but those files.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
import threading
from pathlib import Path

import numpy as np

from .errors import OutputError
from .inputs import parse_json

MARKER = ".llama_ref.json"                     # in every directory llama_ref writes: {"written_by", "files"}
TEMP_PREFIX = ".llama_ref-tmp-"                # every temporary: TEMP_PREFIX + <target hash>-<pid>-<random>
SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))


# ------------------------------------------------------------------------------------------------
# The registry of temporaries, and the cleanup that signals, exceptions and exit share

_live: dict[str, tuple] = {}                   # path -> ("file",) | ("dir",) | ("parent",) | ("aside", target)
_previous: dict[int, object] = {}              # signal -> the handler ours replaced, while temporaries exist
_lock = threading.RLock()


def _register(path, *what) -> None:
    with _lock:
        _live[str(path)] = what
        _install_handlers()


def _forget(path) -> None:
    with _lock:
        _live.pop(str(path), None)
        if not _live:
            _restore_handlers()


def _remove(path: str, what: tuple) -> None:
    """Undo one registry entry: delete a temporary, remove a created parent if still empty, put an aside back."""
    with contextlib.suppress(OSError):
        if what[0] == "file":
            os.unlink(path)
        elif what[0] == "dir":
            shutil.rmtree(path, ignore_errors=True)
        elif what[0] == "parent":
            os.rmdir(path)
        elif what[0] == "aside":                                   # the old output, renamed aside during a swap
            if not os.path.lexists(what[1]):
                os.rename(path, what[1])
            else:
                shutil.rmtree(path, ignore_errors=True)


def cleanup() -> None:
    """Remove every temporary this process has not finished, newest first (signal handlers and atexit call it)."""
    with _lock:
        entries = list(_live.items())[::-1]
        _live.clear()
        _restore_handlers()
    for path, what in entries:
        _remove(path, what)


def _handler(signum, frame):
    """SIGINT/SIGTERM/SIGHUP/SIGQUIT during a write: clean up from the registry, then do what the signal did
    before (KeyboardInterrupt for SIGINT, the caller's own handler, or the default action: die by the signal)."""
    previous = _previous.get(signum, signal.SIG_DFL)
    cleanup()
    if callable(previous):
        return previous(signum, frame)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)                                 # only reached where the default does not kill


def _install_handlers() -> None:
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        old = signal.getsignal(sig)
        if old in (signal.SIG_IGN, _handler):                      # an ignored signal stays ignored (nohup)
            continue
        try:
            signal.signal(sig, _handler)
        except (ValueError, OSError):
            continue
        _previous[sig] = signal.SIG_DFL if old is None else old


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, old in list(_previous.items()):
        with contextlib.suppress(ValueError, OSError, TypeError):
            if signal.getsignal(sig) is _handler:                  # unless someone installed their own since
                signal.signal(sig, old)
    _previous.clear()


atexit.register(cleanup)


# ------------------------------------------------------------------------------------------------
# Names, renames and the marker

def _temp_path(target: Path, tag="") -> Path:
    digest = hashlib.sha256(target.name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return target.parent / f"{TEMP_PREFIX}{digest}-{os.getpid()}-{secrets.token_hex(4)}{tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporaries that dead processes (killed with SIGKILL, a power cut) left beside `target`."""
    digest = hashlib.sha256(target.name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    removed = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(f"{TEMP_PREFIX}{digest}-"):
            continue
        pid = name[len(TEMP_PREFIX) + 13:].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            p = target.parent / name
            _remove(str(p), ("dir",) if p.is_dir() and not p.is_symlink() else ("file",))
            removed.append(p)
    return removed


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError):                                 # not glibc >= 2.28 / not Linux
    _renameat2 = None


def _rename2(src, dst, flags) -> bool:
    """renameat2(src, dst, flags); False where the kernel or file system cannot (the caller falls back)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src, dst) -> None:
    """Rename src to dst unless dst exists (FileExistsError), atomically where the kernel can."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.isdir(src) and not os.path.islink(src):
        if os.path.lexists(dst):                                   # a directory cannot be hard-linked: check, rename
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst, follow_symlinks=False)                       # fails with EEXIST if dst appeared
    os.unlink(src)


def _read_marker(d: Path) -> list[str] | None:
    """The files llama_ref wrote into directory d (its marker), or None when d is not a directory we wrote."""
    try:
        st = os.stat(d / MARKER, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return None
        data = parse_json((d / MARKER).read_bytes(), str(d / MARKER), OutputError)
    except (OSError, OutputError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "llama_ref" or not isinstance(data.get("files"), list):
        return None
    return [f for f in data["files"] if isinstance(f, str)]


def _write_marker(d: Path, files) -> None:
    text = json.dumps({"written_by": "llama_ref", "files": sorted(set(files) - {MARKER})}, indent=1) + "\n"
    tmp = _temp_path(d / MARKER)
    _register(tmp, "file")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, d / MARKER)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _forget(tmp)


def mark_dir(d) -> None:
    """Mark d as a directory llama_ref wrote, listing every entry it holds now (publish calls it)."""
    d = Path(d)
    _write_marker(d, [p.name for p in d.iterdir() if not p.name.startswith(TEMP_PREFIX)])


def _note_written(path: Path) -> None:
    """A file written into a directory llama_ref wrote joins the list in its marker."""
    listed = _read_marker(path.parent)
    if listed is not None and path.name not in listed:
        _write_marker(path.parent, listed + [path.name])


def foreign_entries(d: Path) -> list[str] | None:
    """Entries of d that llama_ref did not write (its marker does not list them); None if d has no marker."""
    listed = _read_marker(d)
    if listed is None:
        return None
    return sorted(p for p in os.listdir(d) if p != MARKER and p not in listed and not p.startswith(TEMP_PREFIX))


# ------------------------------------------------------------------------------------------------
# Step 1: the check before any work

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def _as_path(path) -> Path:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise OutputError(f"the output path must be a str or a path, not {type(path).__name__} ({path!r:.60})")
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise OutputError(f"the output path {text!r:.60} is empty; give a file or directory name")
    if "\0" in text:
        raise OutputError(f"the output path {text!r:.80} contains a NUL character")
    return Path(text)


def _name_max(d: Path) -> int:
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return os.pathconf(d, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _ids_up(p: Path) -> set:
    """(device, inode) of p and every ancestor that exists."""
    ids = set()
    p = Path(os.path.realpath(p))
    for q in (p, *p.parents):
        with contextlib.suppress(OSError):
            st = os.stat(q)
            ids.add((st.st_dev, st.st_ino))
    return ids


def _check_inputs(path: Path, inputs) -> None:
    """The output must not be an input, lie inside one, or hold one (real paths and inodes: links, bind mounts)."""
    out_ids = _ids_up(path)
    out_st = None
    with contextlib.suppress(OSError):
        out_st = os.stat(path)
    for inp in inputs:
        if inp is None or not isinstance(inp, (str, os.PathLike)):
            continue
        try:
            st = os.stat(inp)
        except (OSError, ValueError):
            continue
        if (st.st_dev, st.st_ino) in out_ids:
            raise OutputError(f"the output {path} is the input {inp}" + ("" if out_st and os.path.samestat(out_st, st)
                              else " or inside it") + "; writing there would destroy what is being read: choose "
                              "another path")
        if out_st is not None and (out_st.st_dev, out_st.st_ino) in _ids_up(Path(inp)):
            raise OutputError(f"the output {path} holds the input {inp}; replacing it would destroy what is being "
                              "read: choose another path")


def check_output(path, force=False, kind="file", inputs=()) -> Path:
    """Refuse an output before any work is done (see the module's step 1); returns the path to write.

    kind: "file"; "dir", a directory replaced whole (force: only one llama_ref wrote, holding nothing else);
    "update", a directory llama_ref wrote that gets new files beside the user's (updated_dir). A link to an existing
    file or directory is followed (the target is what gets written); a dangling link is replaced itself (force only).
    inputs: paths being read (a model, a tokenizer, a reference)."""
    if kind not in ("file", "dir", "update"):
        raise ValueError(f"kind={kind!r}")
    path = _as_path(path)
    if path.name in ("", ".", ".."):
        what = "is a directory" if kind == "file" and path.is_dir() else f"names no {kind}"
        raise OutputError(f"{path} {what}; give a {'file' if kind == 'file' else 'directory'} name for the output")
    limit = _name_max(path.parent)
    if len(path.name.encode("utf-8", "surrogateescape")) > limit:
        raise OutputError(f"the output name {path.name[:40]}... is {len(path.name.encode('utf-8', 'surrogateescape'))} "
                          f"bytes long; this file system allows {limit}: choose a shorter name")
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):                # a parent that is a file: named below
        st = None
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror or e})") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
        except OSError:
            target = None
        if target is None:
            if not force:
                raise OutputError(f"{path} is a link to {os.readlink(path)}, which does not exist; pass --force to "
                                  "replace the link (force=True from Python), or choose another path")
            st = None                                               # the link itself is replaced
        else:
            real = Path(os.path.realpath(path))
            try:
                same = os.path.samestat(os.stat(real), target)
            except OSError:
                same = False
            if not same or os.readlink(path).startswith("/proc/"):   # /proc/self/fd/1: a process's open file
                raise OutputError(f"{path} is a link to {os.readlink(path)} (an open file of a process, not a path "
                                  "llama_ref can replace); choose a file path")
            path, st = real, target
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            if kind == "file":
                raise OutputError(f"{path} is a directory; give a file name for the output (e.g. {path / 'out.gguf'})")
            if not force:
                raise OutputError(f"{path} exists; pass --force to replace it (force=True from Python)")
            foreign = foreign_entries(path)
            if foreign is None:
                raise OutputError(f"{path} is a directory llama_ref did not write; --force replaces only a regular "
                                  "file or a directory llama_ref wrote: choose a new path")
            if foreign and kind == "dir":
                raise OutputError(f"{path} holds files llama_ref did not write ({', '.join(foreign[:3])}"
                                  f"{', ...' if len(foreign) > 3 else ''}); --force will not delete them: move them "
                                  "or choose a new path")
        elif stat.S_ISREG(st.st_mode):
            if kind != "file":
                raise OutputError(f"{path} is a file; this output is a directory: choose another path")
            if not force:
                raise OutputError(f"{path} exists; pass --force to replace it (force=True from Python)")
        else:
            what = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise OutputError(f"{path} is {what}; llama_ref writes only regular files and its own directories, even "
                              "with --force: choose a file path")
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write into {parent}")
    _check_inputs(path, inputs)
    return path


def inputs_of(*objects) -> list[str]:
    """The files a writer reads: paths given, and the files behind memory-mapped arrays (in dicts, lists, stored
    matrices, a Llama's weights), which it must not overwrite even when its caller did not name them."""
    found, seen = set(), set()

    def walk(x):
        if id(x) in seen or x is None:
            return
        seen.add(id(x))
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, np.ndarray):
            a = x
            while a is not None:
                name = getattr(a, "filename", None)                 # np.memmap's: a str or a Path
                if isinstance(name, (str, os.PathLike)):
                    found.add(os.fspath(name))
                    return
                a = getattr(a, "base", None)
                if not isinstance(a, np.ndarray):
                    return
        elif hasattr(x, "arrays") and callable(x.arrays):
            with contextlib.suppress(Exception):
                walk(x.arrays())
        elif hasattr(x, "weights") and isinstance(getattr(x, "weights"), dict):
            walk(x.weights)
    for o in objects:
        if isinstance(o, (str, os.PathLike)):
            found.add(os.fspath(o))
        else:
            walk(o)
    return sorted(found)


# ------------------------------------------------------------------------------------------------
# Steps 2 and 3: temporaries, then the rename

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _identity(path: Path):
    """What is at path now: None, or (device, inode, mode, is_link, ctime) to compare with at the rename (the ctime
    tells a new file apart from an old one whose inode number the file system handed out again)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, stat.S_IMODE(st.st_mode), stat.S_ISLNK(st.st_mode), st.st_ctime_ns)


def _same(a, b) -> bool:
    return a is not None and b is not None and (a[0], a[1], a[4]) == (b[0], b[1], b[4])


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of path, each registered first so a failure or a signal removes it again."""
    missing = []
    p = path.parent
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        _register(d, "parent")
        try:
            os.mkdir(d)
        except FileExistsError:
            _forget(d)
        except OSError as e:
            _forget(d)
            raise OutputError(f"cannot create the directory {d} for {path} ({e.strerror or e})") from None
    return [d for d in missing if str(d) in _live]


def _os_error(path, e: OSError) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"cannot write {path}: {e.strerror} (the disk or quota is full, or the file is too large "
                           "for this file system); free space or choose another place. Nothing was replaced.")
    return OutputError(f"cannot write {path} ({e.strerror or e}); check the path, free space and permissions")


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


def _still(path: Path, before) -> None:
    """At the rename: the target must still be what was checked (absent, or the same file/directory)."""
    now = _identity(path)
    if before is None and now is not None:
        raise OutputError(f"{path} appeared while it was being written (another writer?); it was left as it is: run "
                          "again, with --force to replace it")
    if before is not None and not _same(now, before):
        raise OutputError(f"{path} changed while it was being written (another writer?); it was left as it is: run "
                          "again")


def _commit(tmp: Path, path: Path, before) -> None:
    """Rename the finished temporary to path: never over a path that appeared meanwhile, never over another one."""
    _still(path, before)
    if before is not None and before[3]:                          # a dangling link (force): the link goes
        os.unlink(path)
        before = None
    if before is None:
        try:
            rename_noreplace(tmp, path)
        except FileExistsError:
            raise OutputError(f"{path} appeared while it was being written (another writer?); it was left as it is: "
                              "run again, with --force to replace it") from None
    elif tmp.is_dir():
        if not _rename2(tmp, path, _RENAME_EXCHANGE):             # old and new swap places in one step
            aside = _temp_path(path, ".old")
            _register(aside, "aside", str(path))
            os.rename(path, aside)
            rename_noreplace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
            _forget(aside)
        else:
            shutil.rmtree(tmp, ignore_errors=True)                # tmp now holds the old directory
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    _note_written(path)


@contextlib.contextmanager
def _temporary(path: Path, kind: str):
    """A registered temporary file or directory beside path, removed (with the parents created for it) unless the
    block committed it; OSError inside becomes an OutputError naming path."""
    remove_stale_temporaries(path)
    created = _make_parents(path)
    tmp = _temp_path(path)
    _register(tmp, kind)
    done = False
    try:
        if kind == "file":
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
        else:
            os.mkdir(tmp, 0o700)
        yield tmp
        done = True
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        if os.path.lexists(tmp):
            _remove(str(tmp), (kind,))
        _forget(tmp)
        for d in created:                                          # deepest first
            if not done:
                _remove(str(d), ("parent",))
            _forget(d)


@contextlib.contextmanager
def atomic_file(path, force=False, inputs=()):
    """Yield a temporary path beside `path`; write it there. On success it is fsynced, given its permissions (the
    replaced file's mode, or the umask's) and renamed to `path` (module docstring, step 3); on any error or
    interruption it is deleted and `path` is as it was."""
    path = check_output(path, force=force, kind="file", inputs=inputs)
    before = _identity(path)
    with _temporary(path, "file") as tmp:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, before[2] if before is not None and not before[3] else 0o666 & ~_umask())
        _commit(tmp, path, before)


@contextlib.contextmanager
def atomic_dir(path, force=False, inputs=()):
    """Yield a fresh temporary directory beside `path`; fill it. On success it is published (fsync, permissions, the
    marker) and takes `path`'s place whole: a new path, or (force) the directory llama_ref wrote there before, swapped
    out in one step and deleted. On any error or interruption the temporary is deleted and `path` is as it was."""
    path = check_output(path, force=force, kind="dir", inputs=inputs)
    before = _identity(path)
    with _temporary(path, "dir") as tmp:
        yield tmp
        publish(tmp, mode=before[2] if before is not None and not before[3] else None)
        if before is not None and not before[3]:
            check_output(path, force=True, kind="dir")             # still only our files there
        _commit(tmp, path, before)


@contextlib.contextmanager
def updated_dir(path, force=False, inputs=(), last=(), stale=None):
    """Yield a temporary directory whose files go into `path`: a new path gets it whole (as atomic_dir); an existing
    directory llama_ref wrote (force) is updated file by file with os.replace, `last` names moved last, files
    not written now kept, except old ones for which stale(name) is true (removed once the new ones are in place).
    Existing files are replaced, never written into, so arrays memory-mapped from them stay valid."""
    path = check_output(path, force=force, kind="update", inputs=inputs)
    before = _identity(path)
    with _temporary(path, "dir") as tmp:
        yield tmp
        publish(tmp)
        if before is None or before[3]:
            _commit(tmp, path, before)
            return
        check_output(path, force=True, kind="update")
        _still(path, before)
        names = sorted(n for n in os.listdir(tmp) if n != MARKER)
        names = [n for n in names if n not in last] + [n for n in last if n in names]
        clash = sorted(set(names) & set(foreign_entries(path) or ()))
        if clash:
            raise OutputError(f"{path} holds {', '.join(clash)} that llama_ref did not write; it will not replace "
                              "them: move them or choose a new path")
        listed = _read_marker(path) or []
        for name in names:
            os.replace(tmp / name, path / name)
        removed = [n for n in os.listdir(path) if stale is not None and n not in names and n != MARKER and stale(n)]
        for n in removed:
            (path / n).unlink()
        _write_marker(path, (set(listed) | set(names)) - set(removed))
        _fsync_dir(path)


def publish(tmp: Path, mode=None) -> None:
    """fsync every file of a finished temporary directory, give files and directory their permissions (the umask's;
    the directory `mode` when replacing one) and mark it as written by llama_ref."""
    mask = _umask()
    for f in Path(tmp).rglob("*"):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~mask)
        elif f.is_dir() and not f.is_symlink():
            os.chmod(f, 0o777 & ~mask)
    mark_dir(tmp)
    os.chmod(tmp, mode if mode is not None else 0o777 & ~mask)


def ensure_dir(path) -> Path:
    """A directory for outputs written one file at a time (training state): created with its marker if missing."""
    path = Path(path)
    if not path.is_dir():
        with atomic_dir(path):
            pass
    return path


# ------------------------------------------------------------------------------------------------
# Helpers every writer uses

def write_bytes(path, data: bytes, force=False, inputs=()) -> Path:
    """Bytes as a file, atomically."""
    with atomic_file(path, force=force, inputs=inputs) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str, force=False, inputs=()) -> Path:
    """A text file (model card, metrics, config, JSON), atomically, UTF-8."""
    return write_bytes(path, text.encode("utf-8"), force=force, inputs=inputs)


def write_json(path, obj, force=False, inputs=(), indent=2) -> Path:
    """A JSON file, atomically. Strict JSON: NaN and Infinity are refused (write None for 'no value')."""
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as e:
        raise OutputError(f"cannot write {path}: {e} (JSON has no NaN or Infinity; use None)") from None
    return write_text(path, text, force=force, inputs=inputs)


def save_npz(path, arrays, force=False, inputs=(), compressed=False) -> Path:
    """np.savez (or savez_compressed) of {name: array}, atomically (taps for `inspect --save`, optimizer state,
    reference fixtures)."""
    with atomic_file(path, force=force, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return Path(path)
