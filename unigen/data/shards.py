"""Shards of a streamed dataset, read lazily one record at a time, in stored order: WebDataset tar shards and
Hugging Face ``datasets`` files (``to_parquet`` output, or the ``.arrow`` files of ``save_to_disk``).

A record becomes a :class:`~unigen.data.manifest.Sample` through the manifest parser, so a shard holds the
line shapes a manifest does: an image with ``caption``/``text``/``prompt`` or LLaVA ``conversations``, or
text alone. WebDataset groups a sample's files by key: ``KEY.png`` (any image extension), ``KEY.txt`` (the
caption) and ``KEY.json`` (any other fields). ``datasets`` rows have an ``image`` column (an ``Image``
feature, stored as ``{"bytes": ..., "path": ...}``) beside the text columns.
Needs the ``data`` extra (``pip install unigen[data]``: webdataset, datasets with pyarrow).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from unigen.data.images import file_problem, image_from_bytes
from unigen.data.manifest import IMAGE_EXTS, ManifestError, Sample, parse_line
from unigen.errors import DataError, DataNotFoundError

SHARD_SUFFIXES = (".tar", ".parquet", ".arrow")


def _glob(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    root = Path(path.anchor) if path.is_absolute() else Path(".")
    return sorted(p for p in root.glob(str(path.relative_to(root))) if p.is_file())


def is_streamed(source: str | Path) -> bool:
    """Whether ``data=`` names streamed shards rather than a manifest: a shard file, a glob (``*``, ``?``,
    ``[``), or a folder without ``metadata.jsonl`` that holds shard files."""
    text = str(source)
    path = Path(text).expanduser()
    if any(c in text for c in "*?[") or path.suffix in SHARD_SUFFIXES:
        return True
    return path.is_dir() and not (path / "metadata.jsonl").is_file() and any(
        p.suffix in SHARD_SUFFIXES for p in path.rglob("*"))


def list_shards(source: str | Path) -> list[Path]:
    """One shard file, every shard a glob matches, or every shard under a folder (recursive, sorted); one kind
    per dataset."""
    if any(c in str(source) for c in "*?["):
        shards = [p for p in _glob(str(source)) if p.suffix in SHARD_SUFFIXES]
        if not shards:
            raise DataNotFoundError(f"no shards ({', '.join(SHARD_SUFFIXES)}) match {source}")
        return _one_kind(shards, source)
    source = Path(source).expanduser()
    if source.is_dir():
        shards = sorted(p for p in source.rglob("*") if p.suffix in SHARD_SUFFIXES and p.is_file())
    elif source.is_file():
        shards = [source]
    else:
        raise DataNotFoundError(f"streamed data {source} does not exist (a shard file, or a folder of .tar, "
                                ".parquet or .arrow shards)")
    if not shards:
        raise DataError(f"no shards ({', '.join(SHARD_SUFFIXES)}) found at {source}")
    return _one_kind(shards, source)


def _one_kind(shards: list[Path], source) -> list[Path]:
    kinds = sorted({p.suffix for p in shards})
    if len(kinds) > 1:
        raise DataError(f"{source} mixes shard kinds {kinds}; keep one kind per dataset")
    return shards


def _import(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise DataError(f"streamed data needs {module.split('.')[0]}: pip install 'unigen[data]'") from err


def _tar_records(path: Path) -> Iterator[dict]:
    tariterators = _import("webdataset.tariterators")
    with open(path, "rb") as f:
        files = ({**file, "__url__": str(path)} for file in tariterators.tar_file_iterator(f))
        for group in tariterators.group_by_keys(files):
            record = json.loads(group["json"]) if "json" in group else {}
            if not isinstance(record, dict):
                raise DataError(f"{path}: {group['__key__']}.json holds a {type(record).__name__}, not an object")
            if "txt" in group:
                record.setdefault("caption", group["txt"].decode("utf-8"))
            images = [k for k in group if f".{k}" in IMAGE_EXTS]
            if images:
                record["image"] = group[images[0]]
            yield record


def _table_records(path: Path) -> Iterator[dict]:
    pa = _import("pyarrow")
    if path.suffix == ".parquet":
        batches = _import("pyarrow.parquet").ParquetFile(path).iter_batches(batch_size=256)
    else:  # datasets' save_to_disk writes Arrow IPC streams, read here memory-mapped
        batches = pa.ipc.open_stream(pa.memory_map(str(path)))
    for batch in batches:
        for row in batch.to_pylist():
            image = row.get("image")
            if isinstance(image, dict):  # an Image feature
                row["image"] = image.get("bytes")
            yield row


def read_shard(path: Path) -> Iterator[dict]:
    """Raw records of one shard in stored order (``"image"``: the encoded image bytes, if any)."""
    if (problem := file_problem(path)) is not None:
        raise DataError(f"shard {path}: {problem}")
    return _tar_records(path) if path.suffix == ".tar" else _table_records(path)


def record_sample(record: dict, where: str, decode: bool = True) -> tuple[Sample | None, str | None]:
    """A raw record -> (its Sample with the decoded image, None) or (None, why it is a bad sample).
    ``decode=False``: the text alone is wanted (the image is left undecoded, unchecked)."""
    data = record.get("image")
    fields = {k: v for k, v in record.items() if k not in ("image", "file_name")}
    if data is not None:
        if not isinstance(data, bytes):
            return None, f"the image is a {type(data).__name__}, not encoded image bytes"
        fields["image"] = where
    try:
        sample = parse_line(fields, where, Path("."), 0)
    except ManifestError as err:
        return None, str(err)
    sample.source = where
    if data is not None and decode:
        sample.image, problem = image_from_bytes(data)
        if problem is not None:
            return None, problem
    return sample, None
