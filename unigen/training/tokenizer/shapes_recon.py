"""Does a VQ tokenizer keep what the Shapes world needs? The checker reads every reconstruction."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from unigen.data.image_dataset import load_image, to_pixels, to_uint8
from unigen.models.vq import VQModel
from unigen.shapes import ATTRIBUTES, check, parse_caption, read_manifest
from unigen.training.tokenizer.vq_trainer import psnr


@torch.no_grad()
def vq_checker_accuracy(vq: VQModel, manifest: str | Path, n: int | None = None, batch_size: int = 100) -> dict:
    """Share of reconstructed manifest images on which the checker reads all four attributes of the caption
    (and per attribute), plus mean PSNR. The issue's bar: ``all_correct >= 0.98``."""
    items = read_manifest(manifest)[:n]
    device = next(vq.parameters()).device
    was_training = vq.training
    vq.eval()
    right = dict.fromkeys(ATTRIBUTES, 0)
    all_right, scores = 0, []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = to_pixels(torch.stack([load_image(path, vq.config.image_size) for path, _ in chunk])).to(device)
        recon = vq(x)[0].float()
        scores.append(psnr(recon, x).cpu())
        for (_, text), img in zip(chunk, to_uint8(recon).permute(0, 2, 3, 1).cpu().numpy(), strict=True):
            match = parse_caption(text).matches(check(Image.fromarray(img)))
            all_right += all(match.values())
            for name in ATTRIBUTES:
                right[name] += match[name]
    vq.train(was_training)
    n_items = len(items)
    return {"n": n_items, "all_correct": all_right / n_items, "psnr": float(torch.cat(scores).mean()),
            **{name: right[name] / n_items for name in ATTRIBUTES}}
