"""Image files checked at the door, before any decode that could hang, blow up memory or fail mid-run.

Bounds (an image beyond one is a bad sample, skipped and listed): at most ``MAX_PIXELS`` pixels and an aspect
ratio of at most ``MAX_ASPECT``:1, both read from the header (``PIL.Image.open`` reads the size without
decoding). Both preprocessings resize by the image's sides (the VQ's short side to the image size), so a
1 x 1,000,000 image would become a 32 x 32,000,000 one in memory. Only regular files are opened (a FIFO
would block ``open`` forever, a device could be endless).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # 8000 x 8000: ~190 MB as RGB; PIL's own bomb check starts at 89.5 Mpx
MAX_ASPECT = 200  # long side / short side


def _header_problem(img: Image.Image) -> str | None:
    w, h = img.size
    if min(w, h) < 1:
        return f"{w} x {h} pixels: an empty image"
    if w * h > MAX_PIXELS:
        return f"{w} x {h} pixels, more than the bound of {MAX_PIXELS:,}"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return f"{w} x {h} pixels: aspect ratio {max(w, h) / min(w, h):,.0f}:1, beyond the bound of {MAX_ASPECT}:1"
    return None


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be opened as a data file (missing, or not a regular file), or ``None``."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a FIFO is a FIFO
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"cannot be read ({type(err).__name__}: {err.strerror or err})"
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        return f"not a regular file ({kind})"
    return None


def _read(source, decode: bool, keep: bool) -> tuple[Image.Image | None, str | None]:
    """(the image if ``keep``, None) or (None, why it cannot be a training image) for a path or file object."""
    try:
        with warnings.catch_warnings():  # PIL warns from 89.5 Mpx and raises from 179 Mpx; the bound is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                problem = _header_problem(img)
                if problem is not None or not decode:
                    return None, problem
                img.load()
                return (img.copy() if keep else None), None
    except Image.DecompressionBombError as err:
        return None, f"more pixels than the bound of {MAX_PIXELS:,} ({err})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        return None, f"unreadable: {type(err).__name__}: {err}"


def image_problem(path: str | Path, decode: bool = True) -> str | None:
    """Why ``path`` cannot be a training image (missing, not a regular file, beyond the bounds, unreadable),
    or ``None``. ``decode``: also decode the pixels (a truncated file passes the header)."""
    return file_problem(path) or _read(path, decode, keep=False)[1]


def image_from_bytes(data: bytes) -> tuple[Image.Image | None, str | None]:
    """An image stored inside a shard -> (the decoded image, None) or (None, why it cannot be used)."""
    return _read(io.BytesIO(data), decode=True, keep=True)
