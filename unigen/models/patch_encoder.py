"""``encoder: "patch"``: a Fuyu-style understanding encoder, a linear projection of raw pixel patches.

No pretrained vision tower: each ``patch_size x patch_size`` patch (channels first, then rows, then
columns, the order of ``torch.nn.functional.unfold``) is flattened and mapped by one ``Linear`` to
``config.vision.width``, plus a learned position embedding per patch. The model's ``aligner`` then
maps that width to the LLM width, exactly as it does for SigLIP features, so both fusions
(``concat`` and ``cross_attention``) use it unchanged. Fuyu itself has no image position embedding
because the patches sit in the text sequence; we keep one so that cross-attention, which has no
positions of its own, still knows where each patch is.

Keys: ``vision_model.proj.{weight,bias}``, ``vision_model.pos_embed``. The only other fields of
``SigLIPConfig`` it reads are ``image_size``, ``patch_size`` and ``width``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from unigen.config import SigLIPConfig
from unigen.processor import check_pixel_values


class PatchEncoder(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"encoder='patch' needs image_size ({cfg.image_size}) to be a multiple of patch_size "
                f"({cfg.patch_size})"
            )
        self.config = cfg
        self.proj = nn.Linear(3 * cfg.patch_size**2, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, n_patches, 3 * p * p), patches in row-major order."""
        p = self.config.patch_size
        return rearrange(pixel_values, "n c (h p1) (w p2) -> n (h w) (c p1 p2)", p1=p, p2=p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values, self.config.image_size)
        return self.proj(self.patches(pixel_values)) + self.pos_embed
