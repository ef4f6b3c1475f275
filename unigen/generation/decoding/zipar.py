"""ZipAR (arXiv 2412.04062): spatially local parallel decoding over the rows of the token grid.

Image tokens depend mostly on their neighbours, so row ``r`` need not wait for row ``r - 1`` to end: it
starts once the row above has ``window`` tokens, and from then on every started row draws its next token in
the same pass. Token ``(r, c)`` is drawn at step ``r * window + c``, after ``(r - 1, c + window - 1)`` (or the
whole row above, near its end); an image takes ``(rows - 1) * window + width`` passes instead of
``rows * width``, and ``window = width`` is sequential decoding.

Each token attends to the drawn tokens that precede it in raster order (the order the model was trained
on), at its raster position. The first token of a row is predicted, as in raster order, from the position
of the row above's last token; while that token is not drawn yet, a query at that position carries the
row above's newest token and is dropped from the cache after the pass.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from unigen.generation.decoding.guided import GuidedRows


def zipar_steps(height: int, width: int, window: int) -> torch.Tensor:
    """(height, width): the step at which each token is drawn."""
    window = min(window, width)
    return torch.arange(height)[:, None] * window + torch.arange(width)[None]


def decode_zipar(rows: GuidedRows, hidden: torch.Tensor, height: int, width: int, window: int,
                 progress: bool = False) -> torch.Tensor:
    n, dev = rows.n, hidden.device
    window = min(window, width)
    cache = rows.cache
    steps = zipar_steps(height, width, window).flatten().tolist()
    by_step: dict[int, list[int]] = {}
    for raster, s in enumerate(steps):
        by_step.setdefault(s, []).append(raster)

    codes = torch.empty(n, height * width, dtype=torch.long, device=dev)
    codes[:, :1] = rows.sample(hidden[:, None], torch.zeros(1, dtype=torch.long, device=dev))
    prompt = cache.length
    prompt_visible = cache.key_bias[:, 0, :prompt] == 0  # (2 * images, prompt): left padding stays hidden
    base = cache.next_pos.clone()  # each row's position of image token 0
    # per written column after the prompt: its raster index, and whether it stays (a real token)
    col_raster = torch.full((cache.max_len - prompt,), -1, dtype=torch.long, device=dev)
    col_real = torch.zeros(cache.max_len - prompt, dtype=torch.bool, device=dev)
    written = 0
    for s in tqdm(range(1, max(steps) + 1), desc="image tokens", disable=not progress, leave=False):
        inputs = by_step[s - 1]  # every token drawn in the last step enters the cache
        queries = list(inputs)
        feeds = list(inputs)
        source = {}  # target raster index -> query slot whose output predicts it
        for target in by_step[s]:
            if target % width or target - 1 in inputs:
                source[target] = queries.index(target - 1)
            else:  # a row start while the row above is unfinished: a query at that row's last place
                source[target] = len(queries)
                queries.append(target - 1)
                feeds.append(target - width + window - 1)  # the row above's newest token
        q_raster = torch.tensor(queries, device=dev)
        real = torch.tensor([i < len(inputs) for i in range(len(queries))], device=dev)
        k = len(queries)
        col_raster[written : written + k] = q_raster
        col_real[written : written + k] = real
        keys_raster, keys_real = col_raster[: written + k], col_real[: written + k]
        sees = keys_real[None] & (keys_raster[None] < q_raster[:, None])
        sees[:, written:] |= torch.eye(k, dtype=torch.bool, device=dev)
        visible = torch.cat([prompt_visible[:, None].expand(-1, k, -1), sees[None].expand(2 * n, -1, -1)], dim=2)
        positions = base[:, None] + q_raster[None]
        out = rows.extend(codes[:, feeds], positions, visible)
        targets = by_step[s]
        slots = torch.tensor([source[t] for t in targets], device=dev)
        codes[:, targets] = rows.sample(out[:, slots], torch.tensor(targets, device=dev))
        dropped = (~real).nonzero()[:, 0] + prompt + written
        cache.key_bias[:, :, dropped] = float("-inf")  # a dropped query's keys are never read again
        written += k
    return codes
