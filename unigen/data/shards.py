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


def list_shards(source: str | Path) -> list[Path]:
    """One shard file, or every shard under a folder (recursive, sorted); one kind per dataset."""
    source = Path(source).expanduser()
    if source.is_dir():
        shards = sorted(p for p in source.rglob("*") if p.suffix in SHARD_SUFFIXES and p.is_file())
    elif source.is_file():
        shards = [source]
    else:
        raise DataNotFoundError(f"streamed data {source} does not exist (a shard file, or a folder of .tar, "
                                ".parquet or .arrow shards)")
    kinds = sorted({p.suffix for p in shards})
    if not shards or kinds[0] not in SHARD_SUFFIXES:
        raise DataError(f"no shards ({', '.join(SHARD_SUFFIXES)}) found at {source}")
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


def record_sample(record: dict, where: str) -> tuple[Sample | None, str | None]:
    """A raw record -> (its Sample with the decoded image, None) or (None, why it is a bad sample)."""
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
    if data is not None:
        sample.image, problem = image_from_bytes(data)
        if problem is not None:
            return None, problem
    return sample, None
