"""UniGenPipeline: prompts -> PIL images, images -> captions, for any checkpoint the core loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from unigen.checkpoint import resolve_checkpoint_dir
from unigen.errors import ArgumentError
from unigen.model import UniGenModel
from unigen.processor import UniGenProcessor, pixels_to_pil
from unigen.runs import DEVICES, resolve_device
from unigen.sampling import CFGSchedule, generate_image_tokens, generate_text
from unigen.sampling_options import SamplingOptions

__all__ = ["DEFAULT_QUESTION", "DEVICES", "PipelineOutput", "UniGenPipeline",
           "resolve_device"]
DEFAULT_QUESTION = "Describe the image."


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    tokens: torch.Tensor  # (n_images, n_image_tokens)


class UniGenPipeline:
    def __init__(self, model: UniGenModel, processor: UniGenProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> UniGenPipeline:
        directory = resolve_checkpoint_dir(path)
        model = UniGenModel.from_pretrained(directory, dtype=dtype)
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
        compile: bool = False,
        options: SamplingOptions | None = None,
    ) -> PipelineOutput:
        """Images for ``prompt`` (one or a list), ``num_images_per_prompt`` each. Sampling options left
        ``None`` take the checkpoint's (``config.guidance_scale``, ``config.temperature``); ``options`` gives
        them all at once instead of the keywords."""
        if options is None:
            options = SamplingOptions(guidance_scale, temperature, top_k, top_p, cfg_schedule)
        options = options.with_defaults(self.model.config)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ArgumentError(f"num_images_per_prompt must be a whole number >= 1, got {num_images_per_prompt!r}")
        batch = self.processor.generation_inputs(prompt)
        negative = None
        if negative_prompt is not None:
            negative = self.processor.generation_inputs(negative_prompt)["input_ids"].to(self.device)
        codes = generate_image_tokens(
            self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
            num_images=num_images_per_prompt, guidance_scale=options.guidance_scale,
            temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, generator=generator,
            cfg_schedule=options.cfg_schedule,
            negative_prompt_ids=negative, progress=progress, compile=compile,
        )
        pixels = self.model.decode_image_tokens(codes)
        return PipelineOutput(pixels_to_pil(pixels), codes)

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
        if options is None:
            options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p)
        options = options.for_text()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ArgumentError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise ArgumentError("no images given: pass one image or a non-empty list")
        batch = self.processor.understanding_inputs(images, question or DEFAULT_QUESTION)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = generate_text(
            self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"].to(self.model.dtype),
            max_new_tokens=max_new_tokens, temperature=options.temperature, top_k=options.top_k,
            top_p=options.top_p, generator=generator, streamer=streamer,
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
        "content": str, "images": [PIL or path, ...]}, ...]`` ending with a user message (``unigen.chat``),
        in the checkpoint's own prompt format. Greedy unless temperature > 0."""
        if options is None:
            options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p)
        options = options.for_text()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ArgumentError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        batch = self.processor.chat_inputs(messages)
        pixels = batch["pixel_values"]
        ids = generate_text(
            self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
            None if pixels is None else pixels.to(self.device, self.model.dtype),
            max_new_tokens=max_new_tokens, temperature=options.temperature, top_k=options.top_k,
            top_p=options.top_p, generator=generator, streamer=streamer,
        )
        return self.processor.decode(ids[0])
