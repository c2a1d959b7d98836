"""The output policy (llama_ref/output.py), generated over every kind of path a user can hand a writer.

Each writer of the package goes through check_output / atomic_file / atomic_dir / updated_dir; these tests draw a kind
of path (new, missing parents, a regular file, a 0600 file, a directory of the user's, one llama_ref wrote, a dangling
link, a link to a file, a FIFO, a character device, a socket, a link to /proc/self/fd/1, the input itself, inside the
input, holding the input, a 250-byte name, a 300-byte name, a parent that is a file) and a writer, and hold the rule:
refused kinds leave everything as it was, accepted ones give a complete output with the right mode, and nothing is
left behind. tests/test_fuzz.py sends signals to the CLI's writers; tests/test_cli_errors.py pins one case per cause.
"""
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from llama_ref import output
from llama_ref.checkpoint import save_model
from llama_ref.config import LlamaConfig
from llama_ref.errors import OutputError
from conftest import random_weights

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("LLAMA_REF_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CFG = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64, max_seq_len=16)


def snapshot(p: Path):
    """What is at p (kind, mode, bytes; a directory's entries), to compare before and after."""
    try:
        st_ = os.lstat(p)
    except OSError:                                            # missing, or a name too long to exist
        return None
    if stat.S_ISLNK(st_.st_mode):
        return ("link", os.readlink(p))
    if stat.S_ISDIR(st_.st_mode):
        return ("dir", stat.S_IMODE(st_.st_mode), tuple((c.name, snapshot(c)) for c in sorted(p.iterdir())))
    if stat.S_ISREG(st_.st_mode):
        return ("file", stat.S_IMODE(st_.st_mode), p.read_bytes())
    return ("special", stat.S_IFMT(st_.st_mode))


def leftovers(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith(output.TEMP_PREFIX)] if d.is_dir() else []


# ------------------------------------------------------------------------------------------------
# every kind of path x every kind of writer

KINDS = ["new", "missing parents", "file", "file 0600", "user dir", "our dir", "our dir + user file", "dangling link",
         "link to file", "fifo", "char device", "socket", "link to stdout", "is the input", "inside the input",
         "holds the input", "250-byte name", "300-byte name", "parent is a file"]


def make(kind: str, d: Path, writer_kind: str):
    """Create a path of `kind` in d; returns (out, inputs, things that must not change, expected: ok|refuse)."""
    model = d / "input"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"the input")
    out = d / "out"
    keep = [model]
    if kind == "new":
        return out, [model], keep, "ok"
    if kind == "missing parents":
        return d / "a" / "b" / "out", [model], keep, "ok"
    if kind in ("file", "file 0600"):
        out.write_bytes(b"the user's file")
        if kind == "file 0600":
            os.chmod(out, 0o600)
        return out, [model], keep, "ok" if writer_kind == "file" else "refuse"
    if kind == "user dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return out, [model], keep + [out], "refuse"
    if kind in ("our dir", "our dir + user file"):
        with output.atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
        if kind == "our dir + user file":
            (out / "notes.txt").write_text("mine")
        ok = writer_kind == "dir" and kind == "our dir" or writer_kind == "update"
        return out, [model], keep + ([] if ok else [out]), "ok" if ok else "refuse"
    if kind == "dangling link":
        os.symlink(d / "nowhere", out)
        return out, [model], keep, "ok"                        # with force: the link itself is replaced
    if kind == "link to file":
        (d / "target").write_bytes(b"the target")
        os.symlink(d / "target", out)
        return out, [model], keep, "ok" if writer_kind == "file" else "refuse"
    if kind == "fifo":
        os.mkfifo(out)
        return out, [model], keep + [out], "refuse"
    if kind == "char device":
        if os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return out, [model], keep + [out], "refuse"
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(out))
        s.close()
        return out, [model], keep + [out], "refuse"
    if kind == "link to stdout":
        os.symlink("/proc/self/fd/1", out)
        return out, [model], keep + [out], "refuse"
    if kind == "is the input":
        return model, [model], keep, "refuse"
    if kind == "inside the input":
        return model / "out", [model], keep, "refuse"
    if kind == "holds the input":
        with output.atomic_dir(out) as tmp:
            (tmp / "input").mkdir()
        (out / "input" / "weights.bin").write_bytes(b"read")
        return out, [out / "input"], [out], "refuse"
    if kind == "250-byte name":
        return d / ("n" * 250), [model], keep, "ok"
    if kind == "300-byte name":
        return d / ("n" * 300), [model], keep, "refuse"
    if kind == "parent is a file":
        (d / "afile").write_bytes(b"x")
        return d / "afile" / "out", [model], keep + [d / "afile"], "refuse"
    raise AssertionError(kind)


def write_with(writer: str, out, inputs, force):
    if writer == "write_text":
        output.write_text(out, "new", force=force, inputs=inputs)
    elif writer == "save_npz":
        output.save_npz(out, {"x": np.arange(3)}, force=force, inputs=inputs)
    elif writer == "atomic_dir":
        with output.atomic_dir(out, force=force, inputs=inputs) as tmp:
            (tmp / "config.json").write_text("{}")
    elif writer == "save_model":                               # it finds its inputs itself (mapped arrays); a
        output.check_output(out, force=force, kind="update", inputs=inputs)   # caller names the others first
        save_model(out, CFG, random_weights(CFG, 0), force=force)


WRITERS = {"write_text": "file", "save_npz": "file", "atomic_dir": "dir", "save_model": "update"}


@FUZZ
@given(kind=st.sampled_from(KINDS), writer=st.sampled_from(sorted(WRITERS)), force=st.booleans())
def test_every_kind_of_path_with_every_writer(tmp_path_factory, kind, writer, force):
    d = tmp_path_factory.mktemp("o")
    out, inputs, keep, expected = make(kind, d, WRITERS[writer])
    existed = snapshot(out) is not None
    if existed and not force and expected == "ok":
        expected = "refuse"                                    # anything there needs force
    before = {p: snapshot(p) for p in keep + [out]}
    mode = stat.S_IMODE(os.stat(out).st_mode) if kind == "file 0600" else None
    try:
        write_with(writer, out, inputs, force)
        got = "ok"
    except OutputError as e:
        got = "refuse"
        assert str(d.name) in str(e) or "/proc/" in str(e) or "long" in str(e), e     # it names the path
    assert got == expected, f"{writer} on {kind} (force={force}): {got}"
    if got == "refuse":
        for p in keep + [out]:
            assert snapshot(p) == before[p], f"{writer} on {kind} changed {p}"
    else:
        assert os.path.lexists(out) and (Path(out).is_dir() or Path(os.path.realpath(out)).is_file())
        if mode is not None:
            assert stat.S_IMODE(os.stat(out).st_mode) == mode, "--force must keep the replaced file's mode"
        for p in keep:
            assert snapshot(p) == before[p]
    for where in {Path(out).parent, d}:
        assert not leftovers(where), f"temporaries left: {leftovers(where)}"
    if kind == "missing parents" and got == "refuse":
        assert not (d / "a").exists()


# ------------------------------------------------------------------------------------------------
# races, stale temporaries, failures midway

def test_two_writers_into_one_new_path_one_wins_one_is_told(tmp_path):
    """The final rename never replaces a path that appeared meanwhile (RENAME_NOREPLACE / link): of two writers
    that both found the path free, the second gets an OutputError and the first's file stays."""
    out = tmp_path / "x.txt"
    started, results = threading.Barrier(2), []

    def writer(text):
        try:
            with output.atomic_file(out) as tmp:
                tmp.write_text(text)
                started.wait(10)                               # both checked the path before either renames
            results.append(("ok", text))
        except OutputError as e:
            results.append(("refused", str(e)))
    ts = [threading.Thread(target=writer, args=(t,)) for t in ("first", "second")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert sorted(r[0] for r in results) == ["ok", "refused"], results
    winner = next(r[1] for r in results if r[0] == "ok")
    assert out.read_text() == winner
    assert "appeared while it was being written" in next(r[1] for r in results if r[0] == "refused")
    assert not leftovers(tmp_path)


def test_rename_noreplace_without_renameat2(tmp_path, monkeypatch):
    """Where the kernel or file system lacks renameat2, files fall back to os.link + unlink: still no replace."""
    monkeypatch.setattr(output, "_renameat2", None)
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        output.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b"
    output.rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and not (tmp_path / "a").exists()


def test_a_path_replaced_meanwhile_is_not_replaced_again(tmp_path):
    out = tmp_path / "x.txt"
    out.write_text("old")
    with pytest.raises(OutputError, match="changed while it was being written"):
        with output.atomic_file(out, force=True) as tmp:
            tmp.write_text("new")
            out.unlink()
            out.write_text("someone else's")                   # a new inode at the path
    assert out.read_text() == "someone else's" and not leftovers(tmp_path)


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "model.gguf"
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(p.stdout)                                       # a pid that has exited
    stale = output._temp_path(out).name.split("-")
    stale[-2] = str(dead)
    (tmp_path / "-".join(stale)).write_bytes(b"half a file of a SIGKILLed run")
    alive = output._temp_path(out)                             # ours (this pid is alive): not touched
    alive.write_bytes(b"in use")
    other = tmp_path / (output._temp_path(tmp_path / "other").name.replace(str(os.getpid()), str(dead)))
    other.write_bytes(b"another target's")
    output.write_text(out, "done")
    assert sorted(os.listdir(tmp_path)) == sorted(["model.gguf", alive.name, other.name])


def test_a_failed_write_removes_the_directories_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "c.txt"
    with pytest.raises(OutputError, match="No space"):
        with output.atomic_file(out) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_stay_short_and_say_whose_they_are(tmp_path):
    out = tmp_path / ("n" * 250)
    t = output._temp_path(out)
    assert len(t.name) < 60 and t.name.startswith(output.TEMP_PREFIX) and f"-{os.getpid()}-" in t.name
    output.write_text(out, "a 250-byte name works")
    assert out.read_text() == "a 250-byte name works"


def test_directories_llama_ref_writes_are_marked_and_listed(tmp_path):
    d = tmp_path / "m"
    save_model(d, CFG, random_weights(CFG, 0))
    listed = output._read_marker(d)
    assert listed and set(listed) == {p.name for p in d.iterdir()} - {output.MARKER}
    output.write_text(d / "README.md", "# card")                # a file written into it joins the list
    assert "README.md" in output._read_marker(d) and output.foreign_entries(d) == []
    (d / "notes.txt").write_text("mine")
    assert output.foreign_entries(d) == ["notes.txt"]
    with pytest.raises(OutputError, match="notes.txt"):
        with output.atomic_dir(d, force=True):
            pass
    assert (d / "notes.txt").read_text() == "mine"


def test_mapped_weights_are_inputs_a_writer_will_not_overwrite(tmp_path):
    from llama_ref.loader import read_checkpoint
    save_model(tmp_path / "m", CFG, random_weights(CFG, 0))
    config, weights = read_checkpoint(tmp_path / "m")
    assert str(tmp_path / "m" / "model.safetensors") in output.inputs_of(weights)
    with pytest.raises(OutputError, match="holds the input"):
        save_model(tmp_path / "m", config, weights, force=True)
    save_model(tmp_path / "copy", config, weights)               # anywhere else is fine


def test_signal_handlers_are_ours_only_while_temporaries_exist(tmp_path):
    import signal
    before = {s: signal.getsignal(s) for s in output.SIGNALS}
    with output.atomic_file(tmp_path / "x") as tmp:
        assert all(signal.getsignal(s) is output._handler for s in output.SIGNALS if before[s] != signal.SIG_IGN)
        assert str(tmp) in output._live
    assert {s: signal.getsignal(s) for s in output.SIGNALS} == before and not output._live
