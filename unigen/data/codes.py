"""Pre-extracted VQ codes (``"codes"`` on a manifest line: inline ints, or a ``.npy`` / ``.pt`` file), read
with the same care as checkpoints: ``numpy.load(allow_pickle=False)`` and ``torch.load(weights_only=True)``, so
no file runs code, and a file that is not an array of codes is named with the reason.

A bad codes file (text, a pickle, a dict, strings, floats, an odd shape, values outside the codebook) is a bad
sample: skipped and listed like an unreadable image (``unigen.data.bad_samples``), never truncated or cast.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from unigen.data.images import file_problem

MAX_CODE = 2**31 - 1  # codes are kept as int32


class BadCodes(Exception):
    """Internal: the reason a sample's codes cannot be used (it becomes a bad-sample row)."""


def _load_file(path: Path):
    if (problem := file_problem(path)) is not None:
        raise BadCodes(f"codes file {path}: {problem}")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:  # pickled objects, or not a .npy at all
            raise BadCodes(f"codes file {path} is not a plain .npy array ({err})") from err
        except (OSError, EOFError) as err:
            raise BadCodes(f"codes file {path} could not be read ({type(err).__name__}: {err})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's text would advise turning weights_only off: never
        raise BadCodes(f"codes file {path} is not a tensor file: it holds more than tensors and plain values, or "
                       "is no torch file at all (loading it would run code, which unigen never does)") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise BadCodes(f"codes file {path} could not be read as a .pt tensor file ({type(err).__name__})") from err


def _as_codes(value, what: str) -> torch.Tensor:
    """An integer array -> int32 codes, refusing anything that would need a cast to become one."""
    if isinstance(value, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        value = np.asarray(value) if value else np.zeros(0, dtype=np.int64)
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise BadCodes(f"{what} holds {value.dtype} values; codes are integers (floats are never truncated)")
        value = value.numpy()
    if not isinstance(value, np.ndarray):
        raise BadCodes(f"{what} holds a {type(value).__name__}, not an array of integer codes")
    if value.dtype.kind not in "iu":
        kind = {"f": "floats", "U": "strings", "S": "bytes", "O": "objects", "b": "booleans"}.get(value.dtype.kind,
                                                                                                str(value.dtype))
        raise BadCodes(f"{what} holds {kind} ({value.dtype}); codes are integers (floats are never truncated)")
    if value.ndim not in (1, 2) or value.size == 0:
        raise BadCodes(f"{what} has shape {tuple(value.shape)}; codes are a 1-D array (or an h x w grid)")
    low, high = int(value.min()), int(value.max())
    if low < 0 or high > MAX_CODE:
        raise BadCodes(f"{what} holds values in [{low}, {high}]; codes are >= 0 and below the codebook size")
    return torch.from_numpy(value.astype(np.int32).reshape(-1))


def read_codes(codes, where: str) -> torch.Tensor:
    """A sample's ``codes`` (inline ints, a file, or an already checked tensor) -> int32 codes, or
    :class:`BadCodes` with the reason."""
    if isinstance(codes, torch.Tensor) and codes.dtype == torch.int32:
        return codes
    if isinstance(codes, Path):
        return _as_codes(_load_file(codes), f"codes file {codes}")
    return _as_codes(codes, f"{where}: 'codes'")


def codes_fit(codes: torch.Tensor, num_tokens: int, codebook_size: int, what: str) -> None:
    """Codes the VQ could have made: ``num_tokens`` of them, each in [0, codebook_size)."""
    if codes.numel() != num_tokens:
        raise BadCodes(f"{what}: {codes.numel()} pre-extracted codes; the VQ makes {num_tokens}")
    if int(codes.max()) >= codebook_size:
        raise BadCodes(f"{what}: pre-extracted codes must lie in [0, {codebook_size}); got "
                       f"[{int(codes.min())}, {int(codes.max())}]")
