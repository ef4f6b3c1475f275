"""One writer per output folder, and outputs never half replaced (issue 35).

Processes that hold a lock or are stopped mid-run are real subprocesses; the test waits for a file the child
writes at the point it is to be stopped (no sleeps), then signals it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from unigen.cli import EXIT_INTERRUPTED as INTERRUPTED
from unigen.cli import main
from unigen.errors import OutputLockedError
from unigen.output_lock import LOCK_NAME, hold_output_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and flock are POSIX here")

# The holder imports unigen.output_lock (and unigen.errors) without the package's __init__, whose torch and
# transformers imports would cost it many seconds; the lock is the same code either way.
HOLDER = """
import sys, threading, types
from pathlib import Path
package = types.ModuleType("unigen")
package.__path__ = [sys.argv[3]]
sys.modules["unigen"] = package
from unigen.output_lock import hold_output_dir
with hold_output_dir(sys.argv[1]):
    Path(sys.argv[2]).write_text("held")
    threading.Event().wait()  # until killed
"""

# Runs the CLI with one function wrapped: after its N-th call the child writes the ready file, then waits
# (for the go file if one is named, else until it is killed).
STOPPED_AT = """
import importlib, sys, threading, time
from pathlib import Path
module_name, name, after, ready, go, *argv = sys.argv[1:]
module = importlib.import_module(module_name)
original, calls = getattr(module, name), []
def wrapped(*args, **kwargs):
    result = original(*args, **kwargs)
    calls.append(1)
    if len(calls) == int(after):
        Path(ready).write_text("ready")
        if go == "-":
            threading.Event().wait()
        while not Path(go).exists():
            time.sleep(0.01)
    return result
setattr(module, name, wrapped)
from unigen.cli import EXIT_INTERRUPTED as INTERRUPTED
from unigen.cli import main
sys.exit(main(argv))
"""


def child(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 300) -> None:
    """Until ``proc`` has written ``path`` (fails at once if it exits first)."""
    deadline = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} first: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def visible(folder: Path) -> dict[str, str]:
    """The output set as a user sees it: every file that is not hidden, by content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")}


def cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def holder(tmp_path):
    folder, ready = tmp_path / "out", tmp_path / "held"
    proc = child(HOLDER, folder, ready, Path(hold_output_dir.__code__.co_filename).parent)
    wait_for(ready, proc)
    yield folder, proc
    proc.kill()
    proc.wait()


def test_lock_refuses_a_second_holder_naming_the_pid_and_a_killed_holder_blocks_nothing(holder):
    folder, proc = holder
    with pytest.raises(OutputLockedError) as refused:
        with hold_output_dir(folder, "--output-dir"):
            pass
    assert str(refused.value) == (f"{folder} is in use by another unigen run (PID {proc.pid}); wait for it to "
                                  "finish or pass another --output-dir")
    proc.kill()
    proc.wait()
    assert (folder / LOCK_NAME).exists()  # what a killed holder leaves: a stale PID, no lock
    with hold_output_dir(folder) as held:
        assert (held / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (folder / LOCK_NAME).exists()


def test_a_finished_holder_leaves_no_lock_file_nor_an_empty_folder_it_made(tmp_path):
    with hold_output_dir(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / LOCK_NAME).is_file()
    assert list(tmp_path.iterdir()) == []
    with hold_output_dir(tmp_path / "kept") as held:
        (held / "result.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["result.txt"]


def test_generate_edit_and_demo_refuse_a_held_folder_in_one_line(holder, tiny_hf_janus, tmp_path, capsys):
    folder, proc = holder
    model = tiny_hf_janus[1]
    source = tmp_path / "src.png"
    Image.new("RGB", (16, 16), (200, 0, 0)).save(source)
    before = visible(folder)
    for argv, flag in ((["generate", "a red circle", "--model", model, "--device", "cpu", "--output-dir", folder],
                        "--output-dir"),
                       (["edit", source, "make it blue", "--model", model, "--device", "cpu", "--output-dir", folder],
                        "--output-dir"),
                       (["demo", "--output-dir", folder, "--n-train", "2"], "--output-dir")):
        code, out, err = cli(argv, capsys)
        assert code == 1, err
        assert [line for line in err.splitlines() if line.startswith("error")] == [
            f"error: {folder} is in use by another unigen run (PID {proc.pid}); wait for it to finish or pass "
            f"another {flag}"], err
        assert out == "" and "Traceback" not in err
        assert visible(folder) == before and sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]
    proc.kill()
    proc.wait()
    code, out, _ = cli(["generate", "a red circle", "--model", model, "--device", "cpu", "--output-dir", folder,
                        "--num-images", "1"], capsys)
    assert code == 0 and sorted(p.name for p in folder.iterdir()) == ["grid.png", "image_000.png"]


def _earlier_generate(model, folder, capsys) -> dict[str, str]:
    assert cli(["generate", "a red circle", "--model", model, "--device", "cpu", "--output-dir", folder,
                "--num-images", "3"], capsys)[0] == 0
    return visible(folder)


def test_sigterm_during_generate_overwrite_leaves_the_earlier_set_whole(tiny_hf_janus, tmp_path, capsys):
    """Stopped after the first new image is written: the folder still holds exactly the earlier run's images
    and grid, and the next run replaces them all."""
    model, folder = tiny_hf_janus[1], tmp_path / "out"
    earlier = _earlier_generate(model, folder, capsys)
    argv = ["generate", "a blue square", "--model", model, "--device", "cpu", "--output-dir", folder,
            "--num-images", "2", "--batch-size", "1", "--seed", "9", "--overwrite"]
    proc = child(STOPPED_AT, "unigen.runs", "atomic_write", 1, tmp_path / "ready", "-", *argv)
    wait_for(tmp_path / "ready", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == INTERRUPTED and proc.stderr.read().splitlines()[-1] == "error: interrupted"
    assert visible(folder) == earlier
    assert sorted(p.name for p in folder.iterdir()) == sorted(earlier)  # no staging folder, no lock file left
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    assert sorted(visible(folder)) == ["grid.png", "image_000.png", "image_001.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "image_000.png", "image_001.png"]
    assert visible(folder)["image_000.png"] != earlier["image_000.png"]
    assert out.splitlines() == [str(folder / n) for n in ("image_000.png", "image_001.png", "grid.png")]
    assert "removed 1 image(s) of the earlier run" in err


@pytest.mark.slow  # a subprocess per case (~17 s); generate's SIGTERM case runs by default
def test_sigterm_during_the_swap_waits_for_the_new_set(tiny_hf_janus, tmp_path, capsys):
    """SIGTERM after the swap has begun (one file moved) takes effect once the new set is whole (and a SIGTERM'd
    run, like a Ctrl-C'd one, removes its lock and staging folder)."""
    model, folder = tiny_hf_janus[1], tmp_path / "out"
    earlier = _earlier_generate(model, folder, capsys)
    argv = ["generate", "a blue square", "--model", model, "--device", "cpu", "--output-dir", folder,
            "--num-images", "1", "--seed", "9", "--overwrite"]
    # os.replace: 2 staged writes (image, grid), then the swap's moves; stop after the first move
    proc = child(STOPPED_AT, "os", "replace", 3, tmp_path / "ready", tmp_path / "go", *argv)
    wait_for(tmp_path / "ready", proc)
    proc.send_signal(signal.SIGTERM)
    (tmp_path / "go").write_text("go")
    assert proc.wait() == INTERRUPTED and proc.stderr.read().splitlines()[-1] == "error: interrupted"
    now = visible(folder)  # the whole new set: both files new, the earlier image_001/002 gone
    assert sorted(now) == ["grid.png", "image_000.png"] and all(now[n] != earlier[n] for n in now)
    assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "image_000.png"]


@pytest.mark.slow  # a subprocess per case (~17 s); generate's SIGTERM case runs by default
def test_sigterm_during_edit_overwrite_leaves_the_earlier_outputs(tiny_hf_janus, tmp_path, capsys):
    model, folder = tiny_hf_janus[1], tmp_path / "out"
    sources = []
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 200, 0))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
        sources.append(tmp_path / name)
    argv = ["edit", *sources, "make it blue", "--model", model, "--device", "cpu", "--output-dir", folder,
            "--batch-size", "1"]
    assert cli(argv, capsys)[0] == 0
    earlier = visible(folder)
    assert sorted(earlier) == ["000-a.png", "001-b.png"]
    proc = child(STOPPED_AT, "unigen.runs", "atomic_write", 1, tmp_path / "ready", "-",
                 *argv, "--overwrite", "--seed", "5")
    wait_for(tmp_path / "ready", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == INTERRUPTED and proc.stderr.read().splitlines()[-1] == "error: interrupted"
    assert visible(folder) == earlier
    assert sorted(p.name for p in folder.iterdir()) == sorted(earlier)
    code, out, err = cli([*argv, "--overwrite", "--seed", "5"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["000-a.png", "001-b.png"]
    assert visible(folder) != earlier
    assert [line.split("\t") for line in out.splitlines()] == [[str(sources[0]), str(folder / "000-a.png")],
                                                               [str(sources[1]), str(folder / "001-b.png")]]
