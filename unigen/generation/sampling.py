"""Sampling: image tokens with classifier-free guidance, and text (captions, answers).

Image generation follows Janus: each image has a conditional row (the prompt) and an
unconditional row (the prompt with every token but BOS and <begin_of_image> replaced by the CFG pad
id, ``unigen.prompts.unconditional_ids``, or a negative prompt), both in one batched forward;
logits = u + s * (c - u); the sampled code is embedded (gen_embed -> gen_aligner) into both rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unigen.errors import ArgumentError
from unigen.generation.decoding import GuidedRows, decoding_options
from unigen.generation.decoding.draw import filter_logits, pick_tokens
from unigen.generation.decoding.jacobi import decode_jacobi
from unigen.generation.decoding.sequential import decode_sequential
from unigen.generation.decoding.zipar import decode_zipar
from unigen.generation.sampling_options import CFGSchedule, SamplingOptions, as_schedule, check_sampling_args
from unigen.models.decoder import project
from unigen.prompts import images_per_row, left_pad, unconditional_ids

__all__ = ["CFGSchedule", "ImageTokens", "filter_logits", "generate_image_tokens", "generate_text", "pick_tokens"]

# ---- image tokens -------------------------------------------------------------------------------


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    if attention_mask is None:
        return list(input_ids)
    return [ids[m.bool()] for ids, m in zip(input_ids, attention_mask, strict=True)]


@dataclass
class ImageTokens:
    codes: torch.Tensor  # (images, n_image_tokens)
    decoder_passes: int  # batched decoder forward calls, the prefill included


@torch.no_grad()
def generate_image_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    options: SamplingOptions | None = None,
    num_images: int = 1,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    negative_prompt_ids: torch.Tensor | None = None,
    negative_attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    negative_pixel_values: torch.Tensor | None = None,
    source_codes: torch.Tensor | None = None,
    compile: bool | None = None,
    progress: bool = False,
) -> ImageTokens:
    """Prompts (ending with <begin_of_image>, left padded) -> codes (batch * num_images, n_image_tokens) and the
    number of decoder passes.

    ``options``: guidance, temperature, top-k/p, CFG schedule and the decoder (``decoding``: ``"sequential"``,
    one pass per token, ``"jacobi"`` or ``"zipar"``, with ``decoding_options``, see
    :mod:`unigen.generation.decoding.options`); those left ``None`` take the checkpoint's
    (``SamplingOptions.with_defaults``). Images of one prompt are consecutive rows. ``negative_prompt_ids`` (one
    row, or one per prompt) replace the default unconditional prompt (Emu3 style). ``pixel_values``: images for
    the image placeholders of the prompts, in reading order (image-conditioned generation, e.g. editing);
    ``negative_pixel_values`` the same for the negative prompts. ``source_codes`` (prompts, n_image_tokens):
    each prompt's edit source codes, filling the last slots of its conditional and unconditional rows alike
    (``unigen.generation.editing``). ``compile``: capture the sequential decode step (``None``: where it is
    faster, see :func:`unigen.generation.decoding.replay.decode_step_for`).
    """
    cfg = model.config
    sampling = (options or SamplingOptions()).with_defaults(cfg)
    decoder = decoding_options_for(sampling.decoding, sampling.decoding_options, cfg.vq, compile)
    _check_request(model, input_ids, num_images, generator, pixel_values is not None
                   or negative_pixel_values is not None or source_codes is not None, source_codes)
    n_gen, n_tokens = input_ids.shape[0] * num_images, cfg.vq.num_tokens
    ids, mask, pixels = _guided_batch(cfg, input_ids, attention_mask, num_images, pixel_values,
                                      negative_prompt_ids, negative_attention_mask, negative_pixel_values)
    scales = as_schedule(sampling.cfg_schedule).scales(sampling.guidance_scale, n_tokens)
    rows = GuidedRows(model, n_gen, scales, sampling.temperature, sampling.top_k, sampling.top_p, generator)
    if source_codes is not None:  # every row of a prompt, conditional and unconditional, reads its source
        source_codes = source_codes.repeat_interleave(num_images, 0).repeat(2, 1)
    zipar = sampling.decoding == "zipar"
    hidden = rows.prefill(ids, mask, pixels, room=n_tokens + (cfg.vq.grid if zipar else 0), source_codes=source_codes)
    return ImageTokens(_decode(rows, hidden, sampling.decoding, decoder, cfg.vq.grid, compile, progress), rows.passes)


def _check_request(model, input_ids: torch.Tensor, num_images: int, generator, conditioned: bool,
                   source_codes: torch.Tensor | None) -> None:
    """What no decoder can serve: the shapes, the context, one generator per image, image conditions on a
    cross-attention model (``conditioned``: pixel values or source codes were given)."""
    n_tokens = model.config.vq.num_tokens
    if input_ids.ndim != 2:
        raise ArgumentError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}")
    if num_images < 1:
        raise ArgumentError(f"num_images must be at least 1, got {num_images}")
    limit = model.decoder.config.max_position_embeddings
    if input_ids.shape[1] + n_tokens > limit:
        raise ArgumentError(
            f"prompt of {input_ids.shape[1]} tokens + {n_tokens} image tokens exceeds the context of {limit}; "
            f"shorten the prompt to at most {limit - n_tokens} tokens"
        )
    n_gen = input_ids.shape[0] * num_images
    if isinstance(generator, (list, tuple)) and len(generator) != n_gen:
        raise ArgumentError(f"{len(generator)} generators for {n_gen} images; pass one per image or a single one")
    if conditioned and model.cross_attn_layers is not None:
        raise ArgumentError("image-conditioned generation needs a fusion 'concat' (Method A) model; this "
                            "checkpoint uses cross-attention")
    if source_codes is not None and tuple(source_codes.shape) != (input_ids.shape[0], n_tokens):
        raise ArgumentError(f"source_codes must be (prompts={input_ids.shape[0]}, {n_tokens}); got "
                            f"{tuple(source_codes.shape)}")


def _guided_batch(cfg, input_ids, attention_mask, num_images: int, pixel_values, negative_prompt_ids,
                  negative_attention_mask, negative_pixel_values):
    """(ids, mask, pixels) of the guided batch: each image's conditional row, then each one's unconditional row
    (the default one, or its negative prompt), left padded together; the images of both halves in row order."""
    prompts = _rows(input_ids, attention_mask)
    n_gen = len(prompts) * num_images
    cond = [r for r in prompts for _ in range(num_images)]
    cond_images = [im for im in images_per_row(prompts, pixel_values, cfg) for _ in range(num_images)]
    if negative_prompt_ids is None:
        if negative_pixel_values is not None:
            raise ArgumentError("negative_pixel_values need negative_prompt_ids with their image placeholders")
        uncond = [unconditional_ids(r, cfg.tokens.cfg_pad) for r in cond]
        uncond_images = [None] * n_gen
    else:
        neg = _rows(negative_prompt_ids, negative_attention_mask)
        if len(neg) not in (1, len(prompts)):
            raise ArgumentError(f"{len(neg)} negative prompts for {len(prompts)} prompts; give 1 or one each")
        neg_images = images_per_row(neg, negative_pixel_values, cfg, "negative_pixel_values")
        pick = [0 if len(neg) == 1 else i // num_images for i in range(n_gen)]
        uncond, uncond_images = [neg[j] for j in pick], [neg_images[j] for j in pick]
    ids, mask = left_pad(cond + uncond, cfg.tokens.pad, input_ids.device)
    images = [im for im in cond_images + uncond_images if im is not None]
    return ids, mask, torch.cat(images) if images else None


def _decode(rows: GuidedRows, hidden, decoding: str, options, grid: int, compile: bool | None,
            progress: bool) -> torch.Tensor:
    """The image tokens of the prefilled rows, by the chosen decoder."""
    if decoding == "jacobi":
        return decode_jacobi(rows, hidden, options.window, progress)
    if decoding == "zipar":
        return decode_zipar(rows, hidden, grid, grid, options.resolved_window(grid), progress)
    return decode_sequential(rows, hidden, compile, progress)


def decoding_options_for(decoding: str, options: dict | None, vq, compile: bool | None):
    """The method's checked options; a request the method cannot serve is an error."""
    parsed = decoding_options(decoding, options)
    parsed.check_bounds(vq)  # the model's limits: no window beyond the image's tokens
    if compile and decoding != "sequential":
        raise ArgumentError(f"compile captures the one-token decode step of 'sequential' decoding; {decoding!r} "
                            "runs passes of varying shape: drop compile or use decoding='sequential'")
    return parsed


# ---- text ---------------------------------------------------------------------------------------


@torch.no_grad()
def generate_text(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    pixel_values: torch.Tensor | None = None,
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
        return project(lm_head, hidden[:, -1])

    return step
