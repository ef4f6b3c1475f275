"""One writer per output folder: an OS file lock held for a whole run.

Every command that writes a folder of results (``train``, ``train-vq``, ``train-siglip``, ``demo``, ``generate``,
``edit``) holds ``<folder>/.unigen.lock`` while it runs, so a second run pointed at the same folder refuses in one
line naming the holder's PID instead of replacing or interleaving the first run's files. The lock is the kernel's
(``flock`` / ``LockFileEx``): it is released when the holding process exits, however it exits, so a lock left by a
process that died never blocks a later run. The file itself stays (removing it would race with a run that just
opened it); only its content, the holder's PID, changes.
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


@contextlib.contextmanager
def hold_output_dir(folder: str | os.PathLike, flag: str = "--output-dir") -> Iterator[Path]:
    """Create ``folder`` if needed and hold its lock until the block ends; refuse if another process holds it.

    ``flag`` names the option the user chose the folder with, for the one-line refusal.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise OutputLockedError(
                f"{folder} is in use by another unigen run ({_holder(path)}); wait for it to finish or pass "
                f"another {flag}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock
