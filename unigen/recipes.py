"""Where the shipped recipes and the shipped checkpoint live, in a source checkout and in an installed wheel.

The source tree keeps them in its top-level folders (``train/``, ``tokenizers/``, ``checkpoints/``): that is
the single copy. A wheel has no source tree, so ``pyproject.toml`` maps those folders, as data only, into
``unigen/_data/`` (``tokenizers/`` must never become an importable top-level package: it would shadow Hugging
Face ``tokenizers``). Callers name a file the way the repository does, ``recipe_path("train/shapes.yaml")``,
and never build the path themselves.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_FOLDERS = ("train", "tokenizers", "checkpoints")
_PACKAGE = Path(__file__).resolve().parent
# a wheel first: its data is this install's; then the checkout this module sits in (editable or PYTHONPATH)
ROOTS = (_PACKAGE / "_data", _PACKAGE.parent)


def _shipped_name(name: str | Path) -> Path | None:
    """``name`` as a path under one of SHIPPED_FOLDERS (``./train/x.yaml`` -> ``train/x.yaml``), else None."""
    path = Path(name)
    if path.is_absolute() or not path.parts or path.parts[0] not in SHIPPED_FOLDERS or ".." in path.parts:
        return None
    return path


def recipe_path(name: str | Path) -> Path:
    """The shipped file or folder ``name``, e.g. ``"train/shapes.yaml"`` or ``"checkpoints/shapes-small"``."""
    rel = _shipped_name(name)
    if rel is None:
        raise ValueError(f"{name!r} is not under one of the shipped folders {', '.join(SHIPPED_FOLDERS)}")
    for root in ROOTS:
        if (root / rel).exists():
            return root / rel
    raise FileNotFoundError(f"{name} is not shipped with this install of unigen (looked in "
                            f"{' and '.join(str(r) for r in ROOTS)})")


def resolve(path_or_name):
    """A path given on the command line: itself when it exists (or is not a shipped name, e.g. a hub id),
    else the shipped file of that name, so ``--config train/smoke.yaml`` and ``--model
    checkpoints/shapes-small`` work from any folder. ``None`` stays ``None``."""
    if path_or_name is None or Path(path_or_name).exists() or _shipped_name(path_or_name) is None:
        return path_or_name
    try:
        return recipe_path(path_or_name)
    except FileNotFoundError:
        return path_or_name  # the caller's own "not found" message names what the user typed
