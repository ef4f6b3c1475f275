"""Run folders: atomic files, resumable checkpoint folders and the one resume vocabulary, RNG state,
the metrics log, device choice. Used by ``unigen train`` and both tokenizer trainers.

Resume words (the same for ``--resume`` of ``unigen train``, ``train-vq`` and ``train-siglip``):
  ``None``      a fresh run; refuses to mix with an earlier run's checkpoints unless ``overwrite``
  ``"latest"``  the newest complete checkpoint, if any (``"auto"`` is accepted as an alias)
  a folder      that checkpoint
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from unigen.data.jsonl import read_json_lines
from unigen.errors import ArgumentError, CheckpointError, OutputExistsError, OutputWriteError

log = logging.getLogger("unigen")

LATEST = "latest"
RESUME_ALIASES = {"latest": LATEST, "auto": LATEST}  # "auto": what the tokenizer trainers said before
STEP_DIR = re.compile(r"step_\d{7}")
RESUME_FLAG, OVERWRITE_FLAG = "--resume latest", "overwrite=true"  # the same for every training command


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


# ---- atomic files ------------------------------------------------------------------------------

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


# ---- checkpoint folders and resume ----------------------------------------------------------------

def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (a folder under its real name is complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name))


def prune(root: Path, keep_last: int) -> None:
    if keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC, as the OS, torch.save (a RuntimeError) or safetensors (its own error) report it."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return any(s in str(err) for s in ("No space left on device", "StorageFull", "os error 28"))


@contextlib.contextmanager
def writing(target: Path, tmp: Path | None = None) -> Iterator[None]:
    """Writing ``target`` (through the temporary folder ``tmp``): whatever stops it, ``tmp`` goes, and a full disk
    is one line naming what was being written."""
    try:
        yield
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise OutputWriteError(f"no space left on the disk of {Path(target).parent} while writing {target}; "
                                   "free some space there (the last complete checkpoint is kept), then continue "
                                   f"with {RESUME_FLAG}") from err
        raise


def remove_partial_writes(root: Path) -> None:
    """What a killed run was writing (``.tmp-*`` folders) goes; it never had a real name."""
    if Path(root).is_dir():
        for stale in Path(root).glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def normalize_resume(resume: str | None) -> str | None:
    if resume is None or resume == "":
        return None
    return RESUME_ALIASES.get(str(resume), str(resume))


def resolve_resume(resume: str | None, root: Path, *, overwrite: bool, marker: str, remove: bool = True) -> Path | None:
    """The checkpoint folder to continue from, or ``None`` for a fresh start (see the module docstring).

    ``marker``: the file every checkpoint folder holds. ``remove``: this process may delete (rank 0 only).
    """
    resume = normalize_resume(resume)
    if resume is None:
        found = checkpoint_dirs(root)
        if found and not overwrite:
            raise OutputExistsError(f"{root} already holds checkpoints of an earlier run (latest {found[-1].name}): "
                                    f"pass {RESUME_FLAG} to continue it, {OVERWRITE_FLAG} to start over, or "
                                    "another output folder")
        if found and remove:
            log.warning("overwrite: deleting the earlier run's checkpoints in %s", root)
            shutil.rmtree(root)
        return None
    if resume == LATEST:
        found = checkpoint_dirs(root)
        if not found:
            log.warning("%s: nothing to resume under %s (no checkpoint yet); starting from step 0", RESUME_FLAG, root)
            return None
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / marker).is_file():
        raise CheckpointError(f"resume {resume!r} is not a checkpoint folder (no {marker} there): pass 'latest' "
                              f"or a {root}/step_XXXXXXX folder")
    return path


# ---- RNG state ---------------------------------------------------------------------------------------
# Stored as tensors, ints and lists only, so that it loads with torch.load(weights_only=True): a checkpoint
# someone hands you must never run code when it is resumed.

def rng_state() -> dict[str, Any]:
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(path: Path) -> Any:
    """``torch.load`` of a training-state file, tensors and plain containers only: a file that needs code to
    unpickle is refused (it could run anything) instead of run."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds more than tensors and plain values (it would need to run code to "
                              "load, which unigen never does); it was not written by this version of unigen or "
                              "was tampered with. Resume from another checkpoint or start the run again") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} could not be read ({type(err).__name__}: {err}); the checkpoint is "
                              "damaged: resume from another one") from err


# ---- metrics log -------------------------------------------------------------------------------------

def read_jsonl_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines log (``unigen.data.jsonl``: a torn last line is dropped with a warning, a bad line
    anywhere else is an error naming it); no file, no rows."""
    return [row for _, row in read_json_lines(path, run_log=True)] if Path(path).is_file() else []


class MetricsLog:
    """Appends one JSON object per call to ``metrics.jsonl`` (and scalars to TensorBoard when asked)."""

    def __init__(self, out_dir: Path, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def append(self, row: dict, scalars: dict[str, float] | None = None, step: int | None = None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None and scalars:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        """The tokenizer trainers' rows: ``{"step", "kind", "time", ...}``; TensorBoard tags ``kind/key``."""
        row = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self.append(row, {f"{kind}/{k}": v for k, v in values.items()}, step)

    def keep_only(self, keep: Callable[[dict], bool]) -> None:
        """Before (re)starting: keep the rows ``keep`` accepts, so the log reads as one uninterrupted run."""
        if not self.path.is_file():
            return
        rows = [r for r in read_jsonl_rows(self.path) if keep(r)]
        atomic_write(self.path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def truncate_after(self, step: int) -> None:
        self.keep_only(lambda r: r.get("step", 0) <= step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---- devices ----------------------------------------------------------------------------------------

DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str, auto: tuple[str, ...] = ("cuda", "mps")) -> torch.device:
    """``auto`` picks the first available of ``auto`` (default cuda, then mps), else cpu; a named device
    that is absent is an error naming the fix."""
    name = str(name)
    if name not in DEVICES and not re.fullmatch(r"cuda:\d+", name):
        raise ArgumentError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next((d for d in auto if available[d]), "cpu"))
    if name.startswith("cuda") and not available["cuda"]:
        raise ArgumentError(f"device {name!r} was asked for but CUDA is not available here; use cpu")
    if name == "mps" and not available["mps"]:
        raise ArgumentError("device 'mps' was asked for but MPS is not available here; use cpu")
    return torch.device(name)
