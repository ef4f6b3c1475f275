"""Sampling: image tokens with classifier-free guidance, and text (captions, answers).

Image generation follows Janus: each image has a conditional row (the prompt) and an
unconditional row (the prompt with every token but BOS and <begin_of_image> replaced by the CFG pad
id, or a negative prompt), both in one batched forward; logits = u + s * (c - u); the sampled code is
embedded (gen_embed -> gen_aligner) into both rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from unigen.decoder import linear
from unigen.errors import ArgumentError
from unigen.sampling_options import CFGSchedule, as_schedule, check_sampling_args

# ---- logits -> tokens ----------------------------------------------------------------------------


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


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """(rows, vocab) -> (rows,). ``temperature == 0`` is greedy. A list of generators: one per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    # uniforms are drawn on each generator's own device (a CPU generator may drive a CUDA model, as in
    # diffusers; that costs a host-to-device copy per step, a generator on the model's device does not)
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, 1, generator=g, device=g.device) for g in generator]).to(probs.device)
    else:
        where = probs.device if generator is None else generator.device
        u = torch.rand(probs.shape[0], 1, generator=generator, device=where).to(probs.device)
    # inverse-CDF draw: one uniform per row. torch.multinomial draws one exponential per vocabulary
    # entry, a large part of a CPU step for 16 images x 16384 codes (docs/PERFORMANCE.md).
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(probs.shape[-1] - 1)[:, 0]


# ---- image tokens -------------------------------------------------------------------------------


def _left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    if attention_mask is None:
        return list(input_ids)
    return [ids[m.bool()] for ids, m in zip(input_ids, attention_mask, strict=True)]


def unconditional_rows(rows: list[torch.Tensor], tokens) -> list[torch.Tensor]:
    """Janus's unconditional prompt: keep BOS and <begin_of_image>, every other token -> CFG pad."""
    keep = lambda r: (r == tokens.bos) | (r == tokens.image_start)
    return [torch.where(keep(r), r, torch.full_like(r, tokens.cfg_pad)) for r in rows]


@torch.no_grad()
def generate_image_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_images: int = 1,
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    cfg_schedule: CFGSchedule | str | None = None,
    negative_prompt_ids: torch.Tensor | None = None,
    negative_attention_mask: torch.Tensor | None = None,
    compile: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Prompts (ending with <begin_of_image>, left padded) -> codes (batch * num_images, n_image_tokens).

    Images of one prompt are consecutive rows. ``negative_prompt_ids`` (one row, or one per prompt)
    replace the default unconditional prompt (Emu3 style).
    """
    cfg = model.config
    n_tokens = cfg.vq.num_tokens
    if input_ids.ndim != 2:
        raise ArgumentError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}")
    if num_images < 1:
        raise ArgumentError(f"num_images must be at least 1, got {num_images}")
    check_sampling_args(temperature, top_k, top_p, guidance_scale)
    scales = as_schedule(cfg_schedule).scales(guidance_scale, n_tokens)
    limit = model.decoder.config.max_position_embeddings
    if input_ids.shape[1] + n_tokens > limit:
        raise ArgumentError(
            f"prompt of {input_ids.shape[1]} tokens + {n_tokens} image tokens exceeds the context of {limit}; "
            f"shorten the prompt to at most {limit - n_tokens} tokens"
        )
    n_gen = input_ids.shape[0] * num_images
    if isinstance(generator, (list, tuple)) and len(generator) != n_gen:
        raise ArgumentError(f"{len(generator)} generators for {n_gen} images; pass one per image or a single one")

    cond = [r for r in _rows(input_ids, attention_mask) for _ in range(num_images)]
    if negative_prompt_ids is None:
        uncond = unconditional_rows(cond, cfg.tokens)
    else:
        neg = _rows(negative_prompt_ids, negative_attention_mask)
        if len(neg) not in (1, input_ids.shape[0]):
            raise ArgumentError(f"{len(neg)} negative prompts for {input_ids.shape[0]} prompts; give 1 or one each")
        uncond = [neg[0 if len(neg) == 1 else i // num_images] for i in range(n_gen)]
    ids, mask = _left_pad(cond + uncond, cfg.tokens.pad)  # halves: conditional rows, then unconditional

    decoder = model.decoder
    cache = decoder.new_cache(2 * n_gen, ids.shape[1] + n_tokens)
    hidden = decoder(model.embed_text(ids), mask, cache=cache)[:, -1]
    step = torch.compile(decoder.decode_step) if compile else decoder.decode_step
    codes = torch.empty(n_gen, n_tokens, dtype=torch.long, device=ids.device)
    for i in tqdm(range(n_tokens), desc="image tokens", disable=not progress, leave=False):
        logits = model.gen_head(hidden).float()
        c, u = logits[:n_gen], logits[n_gen:]
        guided = u + scales[i] * (c - u)
        codes[:, i] = pick_tokens(guided, temperature, top_k, top_p, generator)
        if i + 1 < n_tokens:
            embeds = model.embed_image_tokens(codes[:, i].repeat(2))[:, None]
            hidden = step(embeds, cache)[:, -1]
            cache.length += 1  # host-side count, kept outside the (possibly compiled) step
    return codes


# ---- text ---------------------------------------------------------------------------------------


@torch.no_grad()
def generate_text(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    eos_token_id: int | None = None,
    streamer=None,
) -> list[list[int]]:
    """Greedy (temperature 0) or sampled continuation of each row; stops at EOS or ``max_new_tokens``.

    Returns the new token ids of each row (EOS excluded). ``streamer`` gets ``put(ids)`` / ``end()``
    calls like transformers' streamers (batch of one).
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    b, n = input_ids.shape
    limit = model.decoder.config.max_position_embeddings
    if n + max_new_tokens > limit:
        raise ArgumentError(f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the context of {limit}")
    eos = model.config.tokens.eos if eos_token_id is None else eos_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    step = _text_stepper(model, input_ids, attention_mask, pixel_values, n + max_new_tokens)
    logits = step(None)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out = torch.full((b, max_new_tokens), eos, dtype=torch.long, device=input_ids.device)
    for i in range(max_new_tokens):
        token = pick_tokens(logits.float(), temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, eos), token)
        out[:, i] = token
        if streamer is not None:
            streamer.put(token.cpu())
        done |= token == eos
        if bool(done.all()) or i + 1 == max_new_tokens:
            break
        logits = step(token)
    if streamer is not None:
        streamer.end()
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


def _text_stepper(model, input_ids, attention_mask, pixel_values, max_len):
    """A closure: ``step(None)`` runs the prompt, ``step(tokens)`` one new token; both return logits.
    Method A and Method B share the decoder and its static cache (Method B's images ride on the cache)."""
    cache = model.decoder.new_cache(input_ids.shape[0], max_len)
    lm_head = model.language_model.lm_head

    def step(tokens):
        if tokens is None:
            return model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, past_key_values=cache,
                         logits_to_keep=1).logits[:, -1]
        hidden = model.run_decoder(model.embed_text(tokens)[:, None], past_key_values=cache).last_hidden_state
        return linear(hidden[:, -1], lm_head.weight)

    return step
