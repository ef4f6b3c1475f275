"""The image trainers' (VQ, SigLIP) dataset: images checked at the door, decoded once, bad ones skipped and
listed in the run's ``bad_samples.jsonl``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unigen.data.bad_samples import DEFAULT_MAX_BAD_FRACTION, BadSamples
from unigen.data.images import image_problem
from unigen.data.manifest import Record
from unigen.errors import DataError
from unigen.processor import generation_image, uint8_to_pixels

log = logging.getLogger("unigen.data")


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB uint8 (3, size, size): ``unigen.processor.generation_image``, the preprocessing every VQ path
    shares (training here, code extraction, the pipeline), so a code means the same image everywhere."""
    return generation_image(path, size)


to_pixels = uint8_to_pixels  # uint8 (B, 3, H, W) -> float in [-1, 1]


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


class ImageDataset(torch.utils.data.Dataset):
    """Checks every image at the door (:func:`unigen.data.images.image_problem`) and decodes it once up front;
    bad ones are dropped and listed in ``self.bad`` ((path, reason) pairs) and in the recorder ``bad_samples``.
    More than ``max_bad_fraction`` of them bad stops the run in one line.

    ``cache=True`` keeps the decoded uint8 tensors in memory (fine for 64-256 px datasets up to
    ~100k images); otherwise images are decoded again when a batch needs them.
    """

    def __init__(self, records: list[Record], image_size: int, cache: bool = True, desc: str = "images",
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, bad_samples: BadSamples | None = None):
        self.image_size = image_size
        self.records: list[Record] = []
        self.bad: list[tuple[str, str]] = []
        self.bad_samples = BadSamples(max_bad_fraction) if bad_samples is None else bad_samples
        self.cache: list[torch.Tensor] | None = [] if cache else None
        first = len(self.bad_samples)
        for rec in tqdm(records, desc=f"checking {desc}", leave=False, mininterval=1.0):
            problem = image_problem(rec.image, decode=False)  # the decode below is the full check
            if problem is None:
                try:
                    img = load_image(rec.image, image_size)
                except (DataError, OSError, ValueError, MemoryError) as err:
                    problem = f"unreadable: {err}"
            if problem is not None:
                self.bad.append((str(rec.image), problem))
                self.bad_samples.add(str(rec.image), problem, file=rec.image)
                continue
            self.records.append(rec)
            if self.cache is not None:
                self.cache.append(img)
        if self.bad:
            shown = "; ".join(f"{p} ({why})" for p, why in self.bad[:5])
            log.warning("skipped %d of %d %s that are missing or unreadable: %s%s", len(self.bad), len(records),
                        desc, shown, " ..." if len(self.bad) > 5 else "")
        self.bad_samples.check_share(len(records), desc, rows=self.bad_samples.rows[first:])
        if not self.records:
            raise DataError(f"none of the {len(records)} {desc} could be read; first problems: {self.bad[:5]}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        img = self.cache[i] if self.cache is not None else load_image(self.records[i].image, self.image_size)
        return img, self.records[i].text or ""


def write_bad_images(out_dir: Path, *datasets: ImageDataset | None) -> Path:
    """The datasets' skipped images in ``out_dir/bad_samples.jsonl`` (one list, however many recorders)."""
    recorders = list({id(d.bad_samples): d.bad_samples for d in datasets if d is not None}.values())
    merged = BadSamples(recorders[0].max_fraction if recorders else DEFAULT_MAX_BAD_FRACTION)
    merged.rows = [row for r in recorders for row in r.rows]
    return merged.write(out_dir)
