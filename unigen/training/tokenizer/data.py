"""Images (and captions) from a folder or a JSONL manifest, with bad files skipped and listed.

A manifest has one JSON object per line, ``{"image": "relative/or/absolute.png", "caption": "..."}``
(or ``text`` / ``prompt``, or LLaVA-style ``conversations`` whose last ``gpt`` turn is the caption);
relative image paths are relative to the manifest's folder. Batches follow a seeded permutation per
epoch, so the data position at any step is a pure function of (seed, step) and resume is exact.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unigen.errors import DataError, DataNotFoundError
from unigen.processor import generation_image, uint8_to_pixels
from unigen.runs import write_text

log = logging.getLogger("unigen.training.tokenizer")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEXT_KEYS = ("caption", "text", "prompt")


@dataclass
class Record:
    image: Path
    text: str | None = None


def read_records(source: str | Path, need_text: bool = False, text_key: str | None = None) -> list[Record]:
    """Records from a folder of images (recursive, sorted) or a ``.jsonl`` manifest."""
    source = Path(source).expanduser()
    if source.is_dir():
        if need_text:
            raise DataError(f"{source} is a folder of images, but captions are needed: pass a JSONL manifest "
                            '({"image": ..., "caption": ...} per line)')
        records = [Record(p) for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        if not records:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {source}")
        return records
    if not source.is_file():
        raise DataNotFoundError(f"data source {source} does not exist (expected a folder of images or a .jsonl)")
    records = []
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{source} is not UTF-8 text ({err}); a manifest is JSON lines") from err
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}:{n} is not valid JSON: {err}") from err
        if not isinstance(row, dict) or "image" not in row:
            raise DataError(f'{source}:{n} has no "image" key: {line[:120]}')
        text = None
        keys = (text_key,) if text_key else TEXT_KEYS
        for key in keys:
            if key in row:
                text = str(row[key])
                break
        if text is None and not text_key and isinstance(row.get("conversations"), list):
            answers = [t.get("value") for t in row["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
            text = str(answers[-1]) if answers else None  # LLaVA-style record: the caption is the answer
        if need_text and text is None:
            raise DataError(f"{source}:{n} has none of the caption keys {list(keys)}: {line[:120]}")
        path = Path(row["image"]).expanduser()
        records.append(Record(path if path.is_absolute() else source.parent / path, text))
    if not records:
        raise DataError(f"manifest {source} has no records")
    return records


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB uint8 (3, size, size): ``unigen.processor.generation_image``, the preprocessing every VQ path
    shares (training here, code extraction, the pipeline), so a code means the same image everywhere."""
    return generation_image(path, size)


to_pixels = uint8_to_pixels  # uint8 (B, 3, H, W) -> float in [-1, 1]


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes every image once up front; unreadable ones are dropped and listed in ``self.bad``.

    ``cache=True`` keeps the decoded uint8 tensors in memory (fine for 64-256 px datasets up to
    ~100k images); otherwise images are decoded again when a batch needs them.
    """

    def __init__(self, records: list[Record], image_size: int, cache: bool = True, desc: str = "images"):
        self.image_size = image_size
        self.records: list[Record] = []
        self.bad: list[tuple[str, str]] = []
        self.cache: list[torch.Tensor] | None = [] if cache else None
        for rec in tqdm(records, desc=f"checking {desc}", leave=False, mininterval=1.0):
            if not rec.image.is_file():
                self.bad.append((str(rec.image), "missing"))
                continue
            try:
                img = load_image(rec.image, image_size)
            except Exception as err:  # PIL raises many types for truncated/corrupt files
                self.bad.append((str(rec.image), f"unreadable: {type(err).__name__}: {err}"))
                continue
            self.records.append(rec)
            if self.cache is not None:
                self.cache.append(img)
        if self.bad:
            shown = "; ".join(f"{p} ({why})" for p, why in self.bad[:5])
            log.warning("skipped %d of %d %s that are missing or unreadable: %s%s", len(self.bad), len(records),
                        desc, shown, " ..." if len(self.bad) > 5 else "")
        if not self.records:
            raise DataError(f"none of the {len(records)} {desc} could be read; first problems: {self.bad[:5]}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        img = self.cache[i] if self.cache is not None else load_image(self.records[i].image, self.image_size)
        return img, self.records[i].text or ""



def write_bad_images(out_dir: Path, *datasets: ImageDataset | None) -> None:
    """List the unreadable image files of the datasets in ``out_dir/bad_images.txt`` (they were skipped)."""
    bad = [item for d in datasets if d is not None for item in d.bad]
    if bad:
        path = Path(out_dir) / "bad_images.txt"
        write_text(path, "".join(f"{p}\t{why}\n" for p, why in bad))
        log.warning("%d bad image files listed in %s", len(bad), path)


def collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([img for img, _ in items]), [text for _, text in items]


def holdout_size(val_size: int, n_records: int) -> int:
    """Images held out for evaluation when no val_data is given: ``val_size``, at most a tenth of the data."""
    return min(val_size, n_records // 10)


def split_holdout(records: list[Record], n_val: int, seed: int) -> tuple[list[Record], list[Record]]:
    """A fixed random ``n_val`` records for evaluation; the rest for training."""
    if n_val <= 0:
        return records, []
    if n_val >= len(records):
        raise DataError(f"val_size={n_val} leaves no training data ({len(records)} records)")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


class EpochBatches:
    """Infinite batches of indices: epoch e is ``randperm(n)`` seeded with (seed, e), remainder dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0):
        if n < batch_size:
            raise DataError(f"batch_size={batch_size} is larger than the {n} training images")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.per_epoch = n // batch_size

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of the batch used at ``step``."""
        return divmod(step, self.per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, pos = self.position(self.start_step)
        while True:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            for b in range(pos, self.per_epoch):
                yield perm[b * self.batch_size:(b + 1) * self.batch_size]
            epoch, pos = epoch + 1, 0


def batch_loader(dataset: ImageDataset, batch_size: int, seed: int, start_step: int, num_workers: int = 0):
    """Iterator of (uint8 images, captions) starting at the batch of ``start_step``."""
    batches = EpochBatches(len(dataset), batch_size, seed, start_step)
    # its own generator: creating the iterator must not draw from the global RNG (resume would drift)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                                         persistent_workers=num_workers > 0, generator=torch.Generator())
    return iter(loader)
