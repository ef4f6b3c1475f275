"""UniGenPipeline: prompts -> PIL images, images -> captions, for any checkpoint the core loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image

from unigen.errors import ArgumentError
from unigen.generation.sampling import CFGSchedule, generate_image_tokens, generate_text
from unigen.generation.sampling_options import SamplingOptions
from unigen.models.checkpoint import resolve_checkpoint_dir
from unigen.models.model import UniGenModel
from unigen.models.quantize import Quantization, cache_dtype, check_device, quantize_model
from unigen.processor import UniGenProcessor, load_image, pixels_to_pil
from unigen.prompts import DEFAULT_CFG_DROP, check_drop, check_instruction, keeps_image, source_slots
from unigen.runs import DEVICES, resolve_device

__all__ = ["DEFAULT_QUESTION", "DEVICES", "PipelineOutput", "UniGenPipeline",
           "resolve_device"]
DEFAULT_QUESTION = "Describe the image."


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    tokens: torch.Tensor  # (n_images, n_image_tokens)
    decoder_passes: int | None = None  # batched decoder forward calls of the call, the prefill included


class UniGenPipeline:
    def __init__(self, model: UniGenModel, processor: UniGenProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device=None,
                        quantization: str | Quantization | None = None,
                        kv_cache_dtype: str | torch.dtype | None = None) -> UniGenPipeline:
        """``quantization``: a method name or a ``Quantization`` (``unigen.models.quantize``), applied on
        ``device`` (torchao quantizes where the weights are); ``kv_cache_dtype``: the static KV cache's dtype
        (``bfloat16``, ``float8_e4m3fn``; default the weights'). docs/QUANTIZATION.md."""
        quantization, kv_cache_dtype = Quantization.of(quantization), cache_dtype(kv_cache_dtype)  # before loading
        if quantization is not None:
            check_device(quantization, device or "cpu", dtype)
        directory = resolve_checkpoint_dir(path)
        model = UniGenModel.from_pretrained(directory, dtype=dtype, device=device or "cpu")
        model.decoder.kv_cache_dtype = kv_cache_dtype
        if quantization is not None:
            quantize_model(model, quantization)
        return cls(model, UniGenProcessor.from_pretrained(directory, config=model.config))

    def to(self, device) -> UniGenPipeline:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        cfg_schedule: CFGSchedule | str | None = None,
        negative_prompt: str | None = None,
        progress: bool = False,
        compile: bool | None = None,
        options: SamplingOptions | None = None,
        decoding: str = "sequential",
        decoding_options: dict | None = None,
    ) -> PipelineOutput:
        """Images for ``prompt`` (one or a list), ``num_images_per_prompt`` each. Sampling options left
        ``None`` take the checkpoint's (``config.guidance_scale``, ``config.temperature``); ``options`` gives
        them all at once instead of the keywords (passing both is an error).
        ``decoding``: ``"sequential"``, ``"jacobi"`` or ``"zipar"``
        with ``decoding_options`` (``unigen.generation.decoding.options``); ``out.decoder_passes`` counts the work.
        ``compile``: capture the sequential decode step (``None``: a CUDA graph on CUDA, eager on CPU)."""
        options = _sampling_options(options, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                    top_p=top_p, cfg_schedule=cfg_schedule, decoding=decoding,
                                    decoding_options=decoding_options)
        _check_count(num_images_per_prompt)
        batch = self.processor.generation_inputs(prompt)
        negative = None
        if negative_prompt is not None:
            negative = self.processor.generation_inputs(negative_prompt)["input_ids"].to(self.device)
        return self._images(batch, options, num_images_per_prompt, generator, progress, compile=compile,
                            negative_prompt_ids=negative)

    def _images(self, batch: dict, options: SamplingOptions, num_images: int, generator, progress: bool,
                **inputs) -> PipelineOutput:
        """Sample, decode and report: the part every image-writing call shares."""
        out = generate_image_tokens(self.model, batch["input_ids"].to(self.device),
                                    batch["attention_mask"].to(self.device), options=options, num_images=num_images,
                                    generator=generator, progress=progress, **inputs)
        pixels = self.model.decode_image_tokens(out.codes)
        return PipelineOutput(pixels_to_pil(pixels), out.codes, out.decoder_passes)

    @torch.no_grad()
    def caption(
        self,
        image,
        question: str | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
        options: SamplingOptions | None = None,
    ) -> str | list[str]:
        """One image (path or PIL) -> str; a list -> list of str. Greedy unless temperature > 0."""
        options = _sampling_options(options, temperature=temperature, top_k=top_k, top_p=top_p).for_text()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ArgumentError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise ArgumentError("no images given: pass one image or a non-empty list")
        batch = self.processor.understanding_inputs(images, question or DEFAULT_QUESTION)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = generate_text(
            self.model, batch["input_ids"], batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(self.model.dtype), max_new_tokens=max_new_tokens,
            temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, generator=generator,
            streamer=streamer,
        )
        texts = [self.processor.decode(row) for row in ids]
        return texts[0] if single else texts

    @torch.no_grad()
    def chat(
        self,
        messages,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
        options: SamplingOptions | None = None,
    ) -> str:
        """The assistant's reply to a conversation: ``messages`` = ``[{"role": "user" | "assistant",
        "content": str, "images": [PIL or path, ...]}, ...]`` ending with a user message (``unigen.prompts``),
        in the checkpoint's own prompt format. Greedy unless temperature > 0."""
        options = _sampling_options(options, temperature=temperature, top_k=top_k, top_p=top_p).for_text()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ArgumentError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        batch = self.processor.chat_inputs(messages)
        pixels = batch["pixel_values"]
        ids = generate_text(
            self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
            pixel_values=None if pixels is None else pixels.to(self.device, self.model.dtype),
            max_new_tokens=max_new_tokens, temperature=options.temperature, top_k=options.top_k,
            top_p=options.top_p, generator=generator, streamer=streamer,
        )
        return self.processor.decode(ids[0])

    @torch.no_grad()
    def edit(
        self,
        images,
        instructions: str | Sequence[str],
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        cfg_drop: str | None = None,
        progress: bool = False,
        options: SamplingOptions | None = None,
        decoding: str = "sequential",
        decoding_options: dict | None = None,
    ) -> PipelineOutput:
        """Edited images: each source image (path or PIL; one or a list) read through the understanding path
        with its instruction (one for all, or one each), ``num_images_per_prompt`` images each, consecutive.
        ``cfg_drop``: what the unconditional row drops, ``"instruction"``, ``"image"`` or ``"both"``
        (``unigen.generation.editing``; default ``DEFAULT_CFG_DROP``). Sampling options as ``__call__``'s."""
        options = _sampling_options(options, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                    top_p=top_p, decoding=decoding, decoding_options=decoding_options)
        _check_count(num_images_per_prompt)
        drop = check_drop(DEFAULT_CFG_DROP if cfg_drop is None else cfg_drop)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ArgumentError("no images given: pass one source image or a non-empty list")
        instructions = [instructions] * len(images) if isinstance(instructions, str) else list(instructions)
        if len(instructions) != len(images):
            raise ArgumentError(f"{len(images)} images but {len(instructions)} instructions; give one instruction "
                                "for all or one per image")
        for i, instruction in enumerate(instructions):
            check_instruction(instruction, "the instruction" if len(instructions) == 1 else f"instruction {i + 1}")
        images = [load_image(image) for image in images]  # read once: SigLIP and, with source codes, the VQ
        pixels = self.processor.understanding_pixels(images).to(self.device, self.model.dtype)
        cond = self.processor.edit_inputs(instructions)
        uncond = self.processor.edit_inputs(instructions, drop)
        source_codes = None
        if source_slots(self.model.config):
            source_codes = self.model.encode_image_tokens(
                self.processor.generation_pixels(images).to(self.device, self.model.dtype))
        return self._images(cond, options, num_images_per_prompt, generator, progress,
                            negative_prompt_ids=uncond["input_ids"].to(self.device),
                            negative_attention_mask=uncond["attention_mask"].to(self.device),
                            pixel_values=pixels, negative_pixel_values=pixels if keeps_image(drop) else None,
                            source_codes=source_codes)


def _sampling_options(options: SamplingOptions | None, **given) -> SamplingOptions:
    """``options``, or the options of the keyword arguments; both at once would leave one silently ignored."""
    if options is None:
        return SamplingOptions(**given)
    defaults = {f.name: f.default for f in fields(SamplingOptions)}
    clash = [name for name, value in given.items() if value != defaults[name]]
    if clash:
        raise ArgumentError(f"pass the sampling settings either as options= or as keyword arguments, not both "
                            f"(got options= and {', '.join(clash)}); put {clash[0]} into the SamplingOptions")
    return options


def _check_count(num_images_per_prompt) -> None:
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise ArgumentError(f"num_images_per_prompt must be a whole number >= 1, got {num_images_per_prompt!r}")
