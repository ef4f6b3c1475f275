"""Logits -> tokens: filtering, temperature, and draws from uniforms (one stream per image when asked)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask everything outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """(...) tokens -> (..., vocab) float32 distributions with all mass on each token."""
    return torch.zeros(*tokens.shape, vocab, device=tokens.device).scatter_(-1, tokens[..., None], 1.0)


def token_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution a token is drawn from; greedy (temperature 0) is the one-hot argmax, so that a
    speculative decoder's acceptance rule needs no separate greedy case."""
    if temperature == 0:
        return one_hot(logits.argmax(-1), logits.shape[-1])
    return filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)


def uniforms(generator: Generators, rows: int, k: int, device) -> torch.Tensor:
    """(rows, k) uniforms in [0, 1); a list of generators gives row i its own stream."""
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(k, generator=g, device=g.device) for g in generator])
    else:
        where = device if generator is None else generator.device
        u = torch.rand(rows, k, generator=generator, device=where)
    return u.to(device)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (..., vocab), u (...) -> tokens (...). One uniform per token; torch.multinomial
    draws one exponential per vocabulary entry, a large part of a CPU step for 16 images x 16384 codes."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u[..., None] * cdf[..., -1:]).contiguous(), right=True)[..., 0].clamp_max(
        probs.shape[-1] - 1)


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: Generators) -> torch.Tensor:
    """(rows, vocab) -> (rows,). ``temperature == 0`` is greedy. A list of generators: one per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    # uniforms are drawn on each generator's own device (a CPU generator may drive a CUDA model, as in
    # diffusers; that costs a host-to-device copy per step, a generator on the model's device does not)
    return draw(probs, uniforms(generator, probs.shape[0], 1, probs.device)[:, 0])
