"""Shards of a streamed dataset, read lazily one record at a time, in stored order: WebDataset tar shards and
Hugging Face ``datasets`` files (``to_parquet`` output, or the ``.arrow`` files of ``save_to_disk``).

A record becomes a :class:`~unigen.data.manifest.Sample` through the manifest parser, so a shard holds the
line shapes a manifest does: an image with ``caption``/``text``/``prompt`` or LLaVA ``conversations``, text
alone, or an edit (the source ``image``, an ``instruction`` and the ``target`` image). WebDataset groups a
sample's files by key: ``KEY.png`` (any image extension), ``KEY.target.png`` (an edit's target), ``KEY.txt``
(the caption) and ``KEY.json`` (any other fields). ``datasets`` rows have an ``image`` column (an ``Image``
feature, stored as ``{"bytes": ..., "path": ...}``; ``target`` for an edit's target) beside the text columns.
A record is named in messages by its shard and WebDataset key (``part-0.tar key 00042``) or table row
(``part-0.parquet row 42``).
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
IMAGE_FIELDS = ("image", "target")  # a record's encoded images: the image, an edit's target
SHAPE_FIELDS = ("instruction", "target", "conversations")  # their presence makes a line an edit, a conversation
KEY = "__where__"  # a raw record's name in messages: its shard and key or row


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
            for field, prefix in (("image", ""), ("target", "target.")):
                images = [k for k in group if k.startswith(prefix) and f".{k[len(prefix):]}" in IMAGE_EXTS]
                if images:
                    record[field] = group[images[0]]
            yield {**record, KEY: f"{path} key {group['__key__']}"}


def _table_records(path: Path) -> Iterator[dict]:
    pa = _import("pyarrow")
    if path.suffix == ".parquet":
        batches = _import("pyarrow.parquet").ParquetFile(path).iter_batches(batch_size=256)
    else:  # datasets' save_to_disk writes Arrow IPC streams, read here memory-mapped
        batches = pa.ipc.open_stream(pa.memory_map(str(path)))
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            for field in IMAGE_FIELDS:
                if isinstance(row.get(field), dict):  # an Image feature
                    row[field] = row[field].get("bytes")
            for field in SHAPE_FIELDS:  # a table has every column: null where this row's shape has no such field
                if row.get(field, 0) is None:
                    del row[field]
            yield {**row, KEY: f"{path} row {i}"}
            i += 1


def read_shard(path: Path) -> Iterator[dict]:
    """Raw records of one shard in stored order (``"image"``, ``"target"``: encoded image bytes, if any;
    ``KEY``: where the record is)."""
    if (problem := file_problem(path)) is not None:
        raise DataError(f"shard {path}: {problem}")
    return _tar_records(path) if path.suffix == ".tar" else _table_records(path)


def record_sample(record: dict, decode: bool = True) -> tuple[Sample | None, str | None]:
    """A raw record -> (its Sample with the decoded images, None) or (None, why it is a bad sample); the sample's
    ``source`` is where the record is. ``decode=False``: the text alone is wanted (images left undecoded)."""
    where = record[KEY]
    fields = {k: v for k, v in record.items() if k not in (KEY, "file_name")}
    images = {k: fields[k] for k in IMAGE_FIELDS if fields.get(k) is not None}
    for k, data in images.items():
        if not isinstance(data, bytes):
            return None, f"the {k} is a {type(data).__name__}, not encoded image bytes"
        fields[k] = f"{where} {k}"  # the manifest parser wants a name; the decoded image replaces it
    try:
        sample = parse_line(fields, where, Path("."), 0)
    except ManifestError as err:
        return None, str(err)
    sample.source = where
    for k, data in images.items() if decode else ():
        image, problem = image_from_bytes(data)
        if problem is not None:
            return None, problem if k == "image" else f"the target: {problem}"
        setattr(sample, k, image)
    return sample, None
