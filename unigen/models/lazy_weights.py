"""Checkpoint tensors read one at a time, straight into the loaded model's dtype.

A whole-file read holds the file's tensors and then their cast (or fused) copies: 2.2x the fp32 weights of a
Janus-Pro-1B checkpoint at the peak, 4.3x for a bf16 load. Here a checkpoint is first a dict of ``LazyTensor``s
(shape and dtype, no data); the key renames and the q|k|v / gate|up fusions of ``unigen.models.checkpoint`` build
their results as lazy tensors too (``cat``, ``unsqueeze0``), and ``materialize`` reads each one into a fresh tensor
of the target dtype when the model takes it. The peak is then the loaded weights plus one tensor.

safetensors files are read with plain positioned reads of the file (the format is an 8-byte header length, a JSON
header of dtype / shape / byte offsets, then the data), not through a memory map, whose pages would stay in the
process's resident memory while the file is open. Pickled ``.bin`` files are memory-mapped by ``torch.load`` (the
only safe way to read them, ``weights_only=True``); each tensor's pages are handed back to the kernel
(``madvise(MADV_DONTNEED)``) once it is copied, so a 10 GB shard does not stay resident beside its copy.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from unigen.errors import CheckpointError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
MAX_HEADER_BYTES = 100 << 20  # the format's own limit: a larger "header" is a damaged or foreign file
CAST_CHUNK = 1 << 20  # elements read at a time when the file's dtype is not the load's


class LazyTensor:
    """A checkpoint tensor not read yet. ``read_into(out)`` fills ``out`` (contiguous, this shape, any dtype)."""

    shape: torch.Size
    dtype: torch.dtype

    def read_into(self, out: torch.Tensor) -> None:
        raise NotImplementedError

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor of this one's values in ``dtype`` (its own for None or non-float tensors)."""
        if dtype is None or not self.dtype.is_floating_point:
            dtype = self.dtype
        out = torch.empty(self.shape, dtype=dtype)
        self.read_into(out)
        return out


@dataclass
class FileSlice(LazyTensor):
    """A tensor stored as raw bytes at ``offset`` of a safetensors file."""

    path: Path
    offset: int
    shape: torch.Size
    dtype: torch.dtype

    def read_into(self, out: torch.Tensor) -> None:
        flat = out.view(-1)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if out.dtype == self.dtype:  # straight into place
                self._read(f, flat)
                return
            # another dtype: through a bounded buffer, so that a cast load holds no whole-tensor copy
            buffer = _cast_buffer(self.dtype)
            for start in range(0, flat.numel(), CAST_CHUNK):
                part = buffer[: min(CAST_CHUNK, flat.numel() - start)]
                self._read(f, part)
                flat[start : start + part.numel()].copy_(part)

    def _read(self, f, into: torch.Tensor) -> None:
        nbytes = into.numel() * into.element_size()
        if nbytes and f.readinto(memoryview(into.view(torch.uint8).numpy())) != nbytes:
            raise _damaged(self.path, "it ends inside a tensor")


_buffers = threading.local()


def _cast_buffer(dtype: torch.dtype) -> torch.Tensor:
    # one buffer per thread and dtype, reused: one allocated and freed per tensor, between the loaded weights'
    # allocations, fragments the heap and raises the peak (docs/PERFORMANCE.md, "Loading big checkpoints")
    cache = _buffers.__dict__.setdefault("by_dtype", {})
    if dtype not in cache or cache[dtype].numel() < CAST_CHUNK:
        cache[dtype] = torch.empty(CAST_CHUNK, dtype=dtype)
    return cache[dtype]


@dataclass
class MappedTensor(LazyTensor):
    """A tensor of a memory-mapped ``.bin`` file; its pages are released after the copy."""

    tensor: torch.Tensor

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.tensor.dtype

    def read_into(self, out: torch.Tensor) -> None:
        out.copy_(self.tensor)
        release_pages(self.tensor)


@dataclass
class Concat(LazyTensor):
    """``torch.cat(parts)`` along the first dimension, each part read into its rows of the output."""

    parts: list

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        first = self.parts[0].shape
        return torch.Size([sum(p.shape[0] for p in self.parts), *first[1:]])

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.parts[0].dtype

    def read_into(self, out: torch.Tensor) -> None:
        start = 0
        for part in self.parts:
            rows = out.narrow(0, start, part.shape[0])  # rows of a contiguous tensor: contiguous
            if isinstance(part, LazyTensor):
                part.read_into(rows)
            else:
                rows.copy_(part)
            start += part.shape[0]


@dataclass
class Unsqueezed(LazyTensor):
    """``part.unsqueeze(0)``."""

    part: LazyTensor

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return torch.Size([1, *self.part.shape])

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.part.dtype

    def read_into(self, out: torch.Tensor) -> None:
        self.part.read_into(out.squeeze(0))


def cat(parts: list) -> torch.Tensor | LazyTensor:
    """``torch.cat(parts, 0)`` for real tensors, a ``Concat`` when any part is lazy."""
    if any(isinstance(p, LazyTensor) for p in parts):
        return Concat(list(parts))
    return torch.cat(parts, 0)


def unsqueeze0(value: torch.Tensor | LazyTensor) -> torch.Tensor | LazyTensor:
    return Unsqueezed(value) if isinstance(value, LazyTensor) else value.unsqueeze(0)


def copy_of(value: torch.Tensor | LazyTensor) -> torch.Tensor | LazyTensor:
    """An independent copy: a lazy tensor reads into a new tensor each time it is materialized."""
    return value if isinstance(value, LazyTensor) else value.clone()


def materialize(value: torch.Tensor | LazyTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a real tensor (floating tensors in ``dtype``; a real tensor is cast only)."""
    if isinstance(value, LazyTensor):
        return value.materialize(dtype)
    return value.to(dtype) if dtype is not None and value.is_floating_point() else value


# ---- reading files ------------------------------------------------------------------------------


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} could not be read as safetensors ({why}); the file is truncated or damaged: "
                           "download or save it again")


def safetensors_tensors(path: Path) -> dict[str, FileSlice]:
    """The tensors of a safetensors file, unread: the header is parsed and checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            text = f.read(n) if n is not None and n <= min(MAX_HEADER_BYTES, size - 8) else None
    except OSError as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from err
    if n is None:
        raise _damaged(path, "shorter than its 8-byte header length")
    if text is None:
        raise _damaged(path, f"a header of {n} bytes in a file of {size}")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from err
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    out = {}
    data_start = 8 + n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = torch.Size(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise _damaged(path, f"tensor {name!r} has a bad header entry {entry!r}") from err
        nbytes = shape.numel() * dtype.itemsize
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise _damaged(path, f"tensor {name!r} does not fit the file ({begin}..{end} of {size - data_start} "
                                 f"data bytes, {nbytes} expected)")
        out[name] = FileSlice(path, data_start + begin, shape, dtype)
    return out


def bin_tensors(path: Path) -> dict[str, MappedTensor]:
    """The tensors of a pickled ``.bin`` file, memory-mapped (``weights_only``: a file from the hub must never run
    code on load)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch file: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no dict of tensors: not a weights file")
    return {k: MappedTensor(v) for k, v in state.items()}


_MADV_DONTNEED = 4  # the same value on Linux and macOS
_libc = ctypes.CDLL(None, use_errno=True) if hasattr(ctypes, "CDLL") else None


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages wholly inside a memory-mapped, read-only tensor's bytes. The mapping is private and
    never written, so a page read again later is read from the file again: only memory changes, never values."""
    madvise = getattr(_libc, "madvise", None)
    if madvise is None:
        return  # no madvise (Windows): the pages stay resident until the file is closed; values are unaffected
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # a page shared with a neighbour tensor is kept
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
