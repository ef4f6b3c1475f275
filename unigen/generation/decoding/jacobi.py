"""Speculative Jacobi decoding (SJD, arXiv 2410.01699): a window of draft tokens is fed in one pass, each
draft is verified against the model's distribution at its place, and the accepted prefix plus one more
token is kept.

A draft ``d`` proposed from ``q`` is accepted with probability ``min(1, p(d) / q(d))``; at the first
rejection the token is drawn from ``max(0, p - q)`` renormalised, so every kept token has exactly the
distribution ``p`` of sequential sampling. Drafts of the next pass come from this pass's distributions
(the Jacobi update, ``q = p``); places the window has not reached yet get a deterministic guess (the last
known token, ``q`` one-hot on it), which the same rule also keeps exact. Greedy decoding uses one-hot
distributions, so it gives exactly the sequential tokens.

A batch shares the cache, so a pass keeps the shortest run any image accepted; an image that accepted
more re-verifies those tokens in the next pass with ``q = p``, which accepts them again. The
distribution is unchanged; how many passes an image takes depends on its batch-mates.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from unigen.generation.decoding.draw import draw, one_hot
from unigen.generation.decoding.guided import GuidedRows


def decode_jacobi(rows: GuidedRows, hidden: torch.Tensor, window: int, progress: bool = False) -> torch.Tensor:
    n, total, dev = rows.n, rows.n_tokens, hidden.device
    codes = torch.empty(n, total, dtype=torch.long, device=dev)
    codes[:, :1] = rows.sample(hidden[:, None], torch.zeros(1, dtype=torch.long, device=dev))
    drafts = codes[:, :1].expand(n, window).clone()
    proposal = one_hot(drafts, rows.model.config.vq.codebook_size)
    done = 1
    bar = tqdm(total=total, desc="image tokens", disable=not progress, leave=False)
    bar.update(1)
    while done < total:
        k = min(window, total - done)  # drafts for tokens done .. done + k - 1
        start = rows.cache.length
        out = rows.forward(torch.cat([codes[:, done - 1 : done], drafts[:, :k]], dim=1))
        # output j is the distribution of token done + j; the last one is a bonus token unless the image ends
        index = torch.arange(done, min(done + k + 1, total), device=dev)
        p = rows.probs(out[:, : index.numel()], index)
        u = rows.uniforms(2 * window + 1)
        d = drafts[:, :k]
        p_d = p[:, :k].gather(-1, d[..., None])[..., 0]
        q_d = proposal[:, :k].gather(-1, d[..., None])[..., 0]
        rejected = u[:, :k] * q_d >= p_d  # accept with probability min(1, p / q)
        first_rejected = torch.where(rejected.any(1), rejected.int().argmax(1), k)  # (n,), k: all accepted
        # the token at the first rejection: from the residual max(0, p - q); after a full accept, from p
        at = first_rejected.clamp_max(index.numel() - 1)
        p_at = p[torch.arange(n, device=dev), at]
        q_at = torch.cat([proposal[:, :k], proposal.new_zeros(n, 1, p.shape[-1])], 1)[torch.arange(n, device=dev),
                                                                               first_rejected]
        residual = (p_at - q_at).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_at)
        fresh = draw(residual, u[:, k])
        tokens = torch.cat([d, fresh[:, None]], dim=1)
        tokens[torch.arange(n, device=dev), first_rejected] = fresh
        final = torch.where(first_rejected < index.numel(), first_rejected + 1, first_rejected)  # tokens fixed
        keep = int(final.min())
        codes[:, done : done + keep] = tokens[:, :keep]
        rows.cache.truncate(start + keep)  # the last kept token is fed again by the next pass
        drafts, proposal = _next_window(tokens, final, p, keep, window, u[:, k + 1 :], codes[:, done + keep - 1])
        done += keep
        bar.update(keep)
    bar.close()
    return codes


def _next_window(tokens, final, p, keep: int, window: int, u, last):
    """Drafts for the ``window`` places after the kept ones, and the distributions they were drawn from:
    tokens an image already fixed (``q = p``), then draws from this pass's distributions (``q = p``), then
    the last known token (``q`` one-hot)."""
    n, have, vocab = p.shape
    place = keep + torch.arange(window, device=p.device)  # relative to this pass's first token
    from_p = place < have
    p_sel = p[:, place.clamp_max(have - 1)]
    fixed = place[None] < final[:, None]
    drafts = torch.where(fixed, tokens[:, place.clamp_max(tokens.shape[1] - 1)], draw(p_sel, u[:, :window]))
    n_known = int(from_p.sum())
    guess = (drafts[:, n_known - 1] if n_known else last)[:, None].expand(n, window)
    drafts = torch.where(from_p[None], drafts, guess)
    proposal = torch.where(from_p[None, :, None], p_sel, one_hot(guess, vocab))
    return drafts, proposal
