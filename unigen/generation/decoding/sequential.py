"""One decoder pass per image token: the reference every faster decoder is measured against."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from unigen.generation.decoding.draw import pick_tokens
from unigen.generation.decoding.guided import GuidedRows
from unigen.generation.decoding.replay import decode_step_for


def decode_sequential(rows: GuidedRows, hidden: torch.Tensor, compile: bool | None = None,
                      progress: bool = False) -> torch.Tensor:
    """``hidden``: the prefill's last hidden state of each row -> codes (images, n_tokens)."""
    n, n_tokens = rows.n, rows.n_tokens
    step = decode_step_for(rows.decoder, rows.cache, compile)
    codes = torch.empty(n, n_tokens, dtype=torch.long, device=hidden.device)
    for i in tqdm(range(n_tokens), desc="image tokens", disable=not progress, leave=False):
        logits = rows.logits(hidden[:, None], torch.tensor([i], device=hidden.device))[:, 0]
        codes[:, i] = pick_tokens(logits, rows.temperature, rows.top_k, rows.top_p, rows.generator)
        if i + 1 < n_tokens:
            hidden = step(rows.embed(codes[:, i : i + 1]), rows.cache)[:, -1]
            rows.passes += 1
            rows.cache.length += 1  # host-side count, kept outside the (possibly captured) step
    return codes
