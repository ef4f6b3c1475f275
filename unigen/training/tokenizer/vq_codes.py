"""Pre-extract VQ codes for a training manifest, so that no training stage re-encodes its images.

The frozen VQ gives every image the same codes in every stage; encoding them once and writing them into
the manifest (``"codes"``, read by ``unigen.data.manifest``) saves a VQ encoder forward per generation sample.
The preprocessing is the trainer's: ``unigen.processor.generation_image`` (through ``generation_pixels``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unigen.data.jsonl import read_json_lines
from unigen.processor import generation_pixels
from unigen.runs import write_text
from unigen.training.tokenizer.vq_trainer import load_vq


@torch.no_grad()
def add_vq_codes(manifest: str | Path, vq_dir: str | Path, out: str | Path, batch_size: int = 64,
                 progress: bool = True) -> Path:
    """Copy ``manifest`` to ``out`` (same folder, so relative image paths still resolve) with ``"codes"`` on
    every caption line; other lines are copied unchanged."""

    manifest, out = Path(manifest), Path(out)
    if out.resolve().parent != manifest.resolve().parent:
        raise ValueError(f"write {out.name} next to {manifest} (image paths are relative to the manifest)")
    vq = load_vq(vq_dir).eval()
    records = [r for _, r in read_json_lines(manifest)]
    todo = [i for i, r in enumerate(records) if "image" in r and "caption" in r]
    for start in tqdm(range(0, len(todo), batch_size), desc="VQ codes", disable=not progress, unit="batch"):
        chunk = todo[start : start + batch_size]
        pixels = generation_pixels([manifest.parent / records[i]["image"] for i in chunk], vq.config.image_size)
        for i, codes in zip(chunk, vq.encode(pixels).tolist(), strict=True):
            records[i]["codes"] = codes
    write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    return out
