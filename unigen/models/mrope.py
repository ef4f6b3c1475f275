"""M-RoPE (``llm.rope: mrope``): Qwen2-VL's multimodal rotary positions in the decoder.

Every token has three position ids, (time, row, column). Text has all three equal, counting on as in a plain
rotary decoder; the tokens of an image of h x w (merged) tokens sit at (s, s + row, s + column), where ``s`` is
the position the image starts at, and the text after it continues from ``s + max(h, w)``. The rotary frequencies
are split in three runs (``mrope_section``, e.g. 16 / 24 / 24 pairs of channels): the first turns by the time
id, the second by the row, the third by the column. With only text the three ids agree and M-RoPE is the
plain rotary embedding.

:func:`mrope_positions` is transformers' ``Qwen2VLModel.get_rope_index`` for unigen's prompts (image
placeholders marked by the image token id), :func:`mrope_tables` its ``Qwen2VLRotaryEmbedding``, in the
sign-folded form ``unigen.models.decoder.rotate`` takes (tests/test_mrope.py compares both with transformers').
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unigen.errors import ArgumentError


def mrope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int], dtype: torch.dtype):
    """cos and sign-folded sin for (3, batch, n) positions (or (batch, n): text only, all three the same) ->
    two (batch, n, 1, head_dim) tensors. Frequency ``j`` turns by the axis whose run of ``section`` holds it."""
    if positions.ndim == 2:
        positions = positions[None].expand(3, -1, -1)
    axis = torch.repeat_interleave(torch.arange(3, device=positions.device),
                                   torch.tensor(list(section), device=positions.device))
    chosen = positions[axis].permute(1, 2, 0)  # (batch, n, head_dim / 2): each frequency's own axis
    freqs = chosen.float() * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    sin = angles.sin()
    half = freqs.shape[-1]
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return angles.cos().to(dtype)[:, :, None], signed_sin.to(dtype)[:, :, None]


def last_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Each row's position of its last column, (batch,): for M-RoPE ids the largest of the three, so the next
    text token continues after an image that ends the prompt (as Qwen2-VL's ``rope_deltas``)."""
    last = position_ids[..., -1]
    return last.amax(0) if position_ids.ndim == 3 else last


def mrope_positions(input_ids: torch.Tensor, image_token_id: int, grids: Sequence[tuple[int, int]],
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(3, batch, n) position ids of left-padded rows whose images are runs of ``image_token_id``: ``grids``
    holds each image's (rows, columns) of tokens, in reading order over the rows of the batch. Padding gets 0."""
    batch, n = input_ids.shape
    out = torch.zeros(3, batch, n, dtype=torch.long, device=input_ids.device)
    images = iter(grids)
    for b in range(batch):
        keep = (attention_mask[b].bool() if attention_mask is not None else
                torch.ones(n, dtype=torch.bool, device=input_ids.device))
        out[:, b, keep] = _row_positions(input_ids[b][keep], image_token_id, images)
    if next(images, None) is not None:
        raise ArgumentError(f"{len(grids)} image grids given for fewer images in input_ids")
    return out


def _row_positions(ids: torch.Tensor, image_token_id: int, images) -> torch.Tensor:
    is_image = (ids == image_token_id).tolist()
    runs, start, i = [], 0, 0
    while i < len(is_image):
        if not is_image[i]:
            j = i
            while j < len(is_image) and not is_image[j]:
                j += 1
            runs.append(torch.arange(start, start + j - i, device=ids.device).expand(3, -1))
            start, i = start + j - i, j
            continue
        grid = next(images, None)
        if grid is None:
            raise ArgumentError("input_ids hold more image placeholders than there are image grids")
        h, w = grid
        if not all(is_image[i : i + h * w]) or i + h * w > len(is_image):
            raise ArgumentError(f"an image of {h}x{w} tokens needs {h * w} consecutive placeholders in input_ids")
        rows = torch.arange(h, device=ids.device).repeat_interleave(w)
        cols = torch.arange(w, device=ids.device).repeat(h)
        runs.append(torch.stack([torch.zeros_like(rows), rows, cols]) + start)
        start, i = start + max(h, w), i + h * w
    return torch.cat(runs, dim=1) if runs else torch.zeros(3, 0, dtype=torch.long, device=ids.device)
