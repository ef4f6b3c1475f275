"""One writer per output folder: an OS file lock held for a whole run.

Every command that writes a folder of results (``train``, ``train-vq``, ``train-siglip``, ``demo``, ``generate``,
``edit``) holds ``<folder>/.unigen.lock`` while it runs, so a second run pointed at the same folder refuses in one
line naming the holder's PID instead of replacing or interleaving the first run's files. The lock is the kernel's
(``flock`` / ``LockFileEx``): it is released when the holding process exits, however it exits, so a lock left by a
process that died never blocks a later run. The holder removes the file before it lets go; a run that opened the
file just before and locks it then checks that its file is still the one at the path, and locks the new one
if not. A file left by a process that was killed only holds a stale PID and is locked and reused.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from unigen.errors import OutputLockedError

LOCK_NAME = ".unigen.lock"


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "another process"


def _lock_file(path: Path, folder: Path, flag: str) -> int:
    """An open descriptor of ``path``, locked. A holder removes the file before it lets go, so a descriptor
    locked after that names a file no longer there: then lock the one now at ``path`` instead."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise OutputLockedError(
                f"{folder} is in use by another unigen run ({_holder(path)}); wait for it to finish or pass "
                f"another {flag}")
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def hold_output_dir(folder: str | os.PathLike, flag: str = "--output-dir") -> Iterator[Path]:
    """Create ``folder`` if needed and hold its lock until the block ends; refuse if another process holds it.
    A run that ends leaves no trace of the lock: the lock file goes, and so do the folders it made if they
    are still empty.

    ``flag`` names the option the user chose the folder with, for the one-line refusal.
    """
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = _lock_file(path, folder, flag)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        if sys.platform != "win32":  # an open file cannot be removed there; the next run reuses it
            path.unlink(missing_ok=True)  # still locked: a run waiting on this file sees it gone
        os.close(fd)  # closing the descriptor releases the lock
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for made in folders:  # deepest first
        try:
            made.rmdir()
        except OSError:
            return
