"""The writer rules (theworld_jax.io_safety): nothing lost, nothing half-written, leftovers recognised."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from theworld_jax import io_safety
from theworld_jax.io_safety import UnsafeTargetError, atomic_directory, check_target, clean_leftovers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(directory, name="new.txt", text="new"):
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def tree(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(parent, name, kind, pid, host=io_safety._HOST):
    path = parent / f".{name}.{kind}-{host}-{pid}-0123abcd"
    path.mkdir()
    (path / "data").write_text("x")
    return path


def test_a_non_empty_target_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("precious")
    with pytest.raises(UnsafeTargetError, match=r"out' exists and is not empty; pass --overwrite"):
        with atomic_directory(str(target)) as tmp:
            write(tmp)
    assert tree(target) == ["mine.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_replaces_only_once_the_new_output_is_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("old")
    with atomic_directory(str(target), overwrite=True) as tmp:
        write(tmp)
        assert tree(target) == ["mine.txt"]  # the old one stays while the new one is written
    assert tree(target) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_an_empty_directory_or_nothing_needs_no_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "fresh/nested"):
        with atomic_directory(str(tmp_path / name)) as tmp:
            write(tmp)
        assert tree(tmp_path / name) == ["new.txt"]


def test_a_file_as_target_is_kept_without_overwrite_and_replaced_with_it(tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(UnsafeTargetError, match="exists and is a file"):
        with atomic_directory(str(target)) as tmp:
            write(tmp)
    assert target.read_text() == "a file" and os.listdir(tmp_path) == ["model"]  # no hidden .model.old-*
    with atomic_directory(str(target), overwrite=True) as tmp:
        write(tmp)
    assert tree(target) == ["new.txt"] and os.listdir(tmp_path) == ["model"]


@pytest.mark.parametrize("where", ["source", "holds_source", "cwd", "parent_of_cwd"])
def test_sources_and_the_current_directory_are_never_replaced(tmp_path, monkeypatch, where):
    source = tmp_path / "a" / "src"
    source.mkdir(parents=True)
    (source / "weights").write_text("w")
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "notes").write_text("n")
    monkeypatch.chdir(cwd)
    target = {"source": str(source), "holds_source": str(tmp_path / "a"), "cwd": ".",
              "parent_of_cwd": ".."}[where]
    with pytest.raises(UnsafeTargetError, match="never replaced|is the source"):
        with atomic_directory(target, overwrite=True, sources=[str(source)]) as tmp:
            write(tmp)
    assert tree(tmp_path) == ["a/src/weights", "work/here/notes"]


def test_a_source_reached_through_a_symlink_is_recognised(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "w").write_text("w")
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(UnsafeTargetError, match="is the source"):
        check_target(str(source), overwrite=True, sources=[str(tmp_path / "link")])


def test_a_failure_removes_the_temporary_and_keeps_the_old_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(str(target), overwrite=True) as tmp:
            write(tmp, "half.txt")
            raise RuntimeError("disk full")
    assert tree(target) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_directory(str(tmp_path / "out")) as tmp:
            write(tmp)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "out" / "new.txt").st_mode & 0o777 == 0o666 & ~umask


def test_leftovers_of_dead_processes_are_cleaned_and_nothing_else(tmp_path):
    dead = dead_pid()
    stale_tmp = leftover(tmp_path, "out", "tmp", dead)
    stale_old = leftover(tmp_path, "gone", "old", dead)  # a swap cut short: put back
    kept = [leftover(tmp_path, "out", "tmp", os.getpid()),  # a live process's work
            leftover(tmp_path, "out", "tmp", dead, host="otherhost"),  # another machine's (shared disk)
            tmp_path / ".out.tmp-abc123", tmp_path / "user_dir"]  # look-alikes of the user
    for path in kept[2:]:
        path.mkdir()
    with atomic_directory(str(tmp_path / "out")) as tmp:
        write(tmp)
    assert not stale_tmp.exists() and not stale_old.exists()
    assert (tmp_path / "gone" / "data").read_text() == "x"
    assert all(path.exists() for path in kept)
    assert clean_leftovers(str(tmp_path)) == []


def test_an_old_target_whose_swap_finished_is_removed(tmp_path):
    (tmp_path / "out").mkdir()
    stale_old = leftover(tmp_path, "out", "old", dead_pid())
    assert clean_leftovers(str(tmp_path)) == [str(stale_old)]
    assert os.listdir(tmp_path) == ["out"]


# The writer restores the default dispositions first: a test run started under nohup or in the
# background inherits SIGHUP / SIGINT as ignored, which the library rightly leaves alone.
_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    from theworld_jax.io_safety import atomic_directory
    with atomic_directory(sys.argv[1], overwrite=True) as tmp:
        open(os.path.join(tmp, "half.txt"), "w").close()
        print(tmp, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_termination_signals_remove_the_temporary(tmp_path, sig):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    tmp = proc.stdout.readline().strip()
    assert os.path.isdir(tmp)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) != 0
    assert os.listdir(tmp_path) == ["out"] and tree(target) == ["keep.txt"]


def test_make_output_dir_creates_resumes_and_protects(tmp_path, monkeypatch):
    from theworld_jax.io_safety import make_output_dir

    run = tmp_path / "run"
    assert make_output_dir(str(run)) == str(run) and run.is_dir()
    (run / "metrics.jsonl").write_text("{}")
    with pytest.raises(UnsafeTargetError, match="not empty"):
        make_output_dir(str(run))
    assert make_output_dir(str(run), resume=True) == str(run) and (run / "metrics.jsonl").exists()
    monkeypatch.chdir(run)
    with pytest.raises(UnsafeTargetError, match="current directory"):
        make_output_dir(".", resume=True)
    with pytest.raises(UnsafeTargetError, match="holds the source"):
        make_output_dir(str(tmp_path), resume=True, sources=[str(run)])
