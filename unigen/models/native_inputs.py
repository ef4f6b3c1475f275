"""Images at their own size through a Method A model (``encoder: native``), and M-RoPE positions for its prompts.

The processor resizes each image by :func:`~unigen.models.native_vision.fit_size` (aspect kept) and hands the
images on as :class:`NativeImages` (a list: they differ in size); each prompt's image block holds as many
placeholders as the image has merged tokens (rows x columns of its token grid). The model splices the packed
features into the placeholders in reading order, and with ``llm.rope: mrope`` gives the image tokens their
(time, row, column) positions from the same grids (``unigen.models.mrope``). docs/RESOLUTION.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from unigen.config import NativeVisionConfig, TokenIds, UniGenConfig
from unigen.errors import ArgumentError
from unigen.models.mrope import mrope_positions
from unigen.models.native_vision import check_size, fit_size


@dataclass
class NativeImages:
    """A batch's understanding images, each (3, H, W) at its own size, in reading order (row by row). ``to``
    moves or casts them all, as a tensor's would."""

    images: list[torch.Tensor]

    def to(self, *args, **kwargs) -> NativeImages:
        return NativeImages([image.to(*args, **kwargs) for image in self.images])

    def __len__(self) -> int:
        return len(self.images)


def native_pixels(images: Sequence[Image.Image], cfg: NativeVisionConfig, normalize: bool = True) -> NativeImages:
    """RGB images -> :class:`NativeImages`: resized (bicubic, aspect kept) to the encoder's multiples when
    ``cfg.resize``, else checked as they are; values in [-1, 1] (in [0, 1] without ``normalize``)."""
    out = []
    for image in images:
        w, h = image.size
        if cfg.resize:
            h_new, w_new = fit_size(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
            if (h_new, w_new) != (h, w):
                image = image.resize((w_new, h_new), Image.BICUBIC)
        else:
            check_size(h, w, cfg)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        out.append((x - 0.5) / 0.5 if normalize else x)
    return NativeImages(out)


def token_grid(cfg: NativeVisionConfig, image: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of an image's merged tokens."""
    f = cfg.factor
    return image.shape[-2] // f, image.shape[-1] // f


def with_image_tokens(row: list[int], tokens: TokenIds, counts: Sequence[int]) -> list[int]:
    """Each image block of ``row`` (``image_start``, placeholders, ``image_end``) with ``counts[k]`` placeholders
    for its ``k``-th image."""
    out, k, inside = [], 0, False
    for token in row:
        if token == tokens.image:
            continue
        if token == tokens.image_end and inside:
            out += [tokens.image] * counts[k]
            k, inside = k + 1, False
        elif token == tokens.image_start:
            inside = True
        out.append(token)
    if k != len(counts):
        raise ArgumentError(f"the prompt holds {k} image block(s) for {len(counts)} image(s)")
    return out


def native_inputs(processor, rows: list[list[int]], row_images: list[Sequence[Image.Image]]) -> dict:
    """Each row with its images (in the order of their tags): the rows' image blocks sized to each image's token
    grid, left-padded, and all the images in reading order."""
    cfg = processor.config.native_vision
    pixels = native_pixels([image for images in row_images for image in images], cfg, processor.do_normalize)
    counts = iter([h * w for h, w in (token_grid(cfg, image) for image in pixels.images)])
    batch = processor.pad([with_image_tokens(row, processor.tokens, [next(counts) for _ in images])
                           for row, images in zip(rows, row_images, strict=True)])
    batch["pixel_values"] = pixels
    return batch


def splice_native_features(model, embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values) -> torch.Tensor:
    """Method A with the native encoder: the packed features of all images fill the placeholders in reading
    order; their counts must agree."""
    is_image = input_ids == model.config.image_token_id
    n_slots = int(is_image.sum())
    if pixel_values is None or not len(pixel_values):
        if n_slots:
            raise ArgumentError(f"input_ids hold {n_slots} image placeholder tokens but no pixel_values were given")
        return embeds
    if not isinstance(pixel_values, NativeImages):
        raise ArgumentError("a native-resolution model takes its images as NativeImages (UniGenProcessor makes "
                            f"them), got {type(pixel_values).__name__}")
    features = model.aligner(model.vision_model(pixel_values.to(model.dtype).images))
    if n_slots != features.shape[0]:
        raise ArgumentError(f"{len(pixel_values)} image(s) give {features.shape[0]} feature vectors but input_ids "
                            f"hold {n_slots} image placeholder tokens; each image needs as many as its merged "
                            "tokens (the processor inserts them)")
    return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))


def image_grids(config: UniGenConfig, pixel_values) -> list[tuple[int, int]]:
    """Each image's (rows, columns) of tokens in the decoder: its own grid (native) or the fixed square."""
    if isinstance(pixel_values, NativeImages):
        return [token_grid(config.native_vision, image) for image in pixel_values.images]
    side = config.vision.image_size // config.vision.patch_size
    n = pixel_values.shape[0] * (pixel_values.shape[1] if pixel_values.ndim == 5 else 1)
    return [(side, side)] * n


def mrope_position_ids(config: UniGenConfig, input_ids, attention_mask, pixel_values) -> torch.Tensor | None:
    """The (3, batch, n) M-RoPE positions of a prompt with images (``llm.rope: mrope``); None where plain
    positions are the same (no images: text has t = h = w) or with Method B (its images are not in the sequence).
    """
    if (config.llm.rope != "mrope" or config.fusion != "concat" or input_ids is None or pixel_values is None
            or not len(pixel_values)):
        return None
    return mrope_positions(input_ids, config.image_token_id, image_grids(config, pixel_values), attention_mask)
