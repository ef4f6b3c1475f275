"""Write a Shapes-world dataset: PNGs plus a JSONL manifest, byte-identical for the same seed.

Layout: ``out_dir/{split}.jsonl`` and ``out_dir/{split}/000000.png`` ...; image paths in the manifest are
relative to the manifest. Images are drawn in the spec's whole range (``render(style="spec")``); ``style="classic"``
gives the look the shipped checkpoints were trained on; ``style="mixed"`` alternates the two renderers item by item,
so that a model learns the world rather than one renderer's pixel habits (the demo trains on it).
Records: ``{"image", "caption"}``, or with ``conversations=True``
``{"image", "conversations": [human "<image>\\nDescribe the image.", gpt caption]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from unigen.data.manifest import read_records
from unigen.shapes.captions import parse_caption
from unigen.shapes.render import render
from unigen.shapes.world import ShapeSpec, caption, sample_specs

PROMPT = "<image>\nDescribe the image."
DATASET_STYLES = ("spec", "classic", "mixed")


def item_seed(seed: int, index: int) -> list[int]:
    """Render seed of item ``index``: independent of n, so a larger set extends a smaller one."""
    return [seed, index]


def write_dataset(out_dir: str | Path, n: int, seed: int, split: str = "train", *,
                  conversations: bool = False, antialias: bool = True, color_jitter: bool = True,
                  style: str = "spec", progress: bool | None = None) -> Path:
    """Render ``n`` images of specs drawn uniformly from the 576 (``sample_specs(n, seed)``); return the
    manifest path. ``progress`` None shows a bar from 1000 images on."""
    if style not in DATASET_STYLES:
        raise ValueError(f"unknown dataset style {style!r}; known: {list(DATASET_STYLES)}")
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{split}.jsonl"
    specs = sample_specs(n, seed)
    show = n >= 1000 if progress is None else progress
    with manifest.open("w") as f:
        for i, spec in enumerate(tqdm(specs, desc=f"shapes {split}", disable=not show)):
            rel = f"{split}/{i:06d}.png"
            look = ("spec", "classic")[i % 2] if style == "mixed" else style
            r = render(spec, item_seed(seed, i), antialias=antialias, color_jitter=color_jitter, style=look)
            r.pil().save(out_dir / rel, format="PNG")
            text = caption(spec)
            if conversations:
                record = {"image": rel, "conversations": [{"from": "human", "value": PROMPT},
                                                          {"from": "gpt", "value": text}]}
            else:
                record = {"image": rel, "caption": text}
            f.write(json.dumps(record) + "\n")
    return manifest


def read_manifest(path: str | Path) -> list[tuple[Path, str]]:
    """(absolute image path, caption) per record of a manifest in either format (``unigen.data.manifest``)."""
    return [(r.image.resolve(), r.text) for r in read_records(path, need_text=True)]


def load_images(path: str | Path) -> tuple[np.ndarray, list[ShapeSpec]]:
    """All images of a manifest as (N, 64, 64, 3) uint8, and their specs parsed back from the captions."""
    items = read_manifest(path)
    images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in items]
    specs = [parse_caption(text) for _, text in items]
    return (np.stack(images) if images else np.zeros((0, 64, 64, 3), np.uint8)), specs
