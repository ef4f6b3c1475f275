"""UniGenPipeline: prompts -> PIL images, images -> captions, for any checkpoint the core loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from unigen.model import UniGenModel
from unigen.processor import UniGenProcessor, pixels_to_pil
from unigen.sampling import CFGSchedule, generate_image_tokens, generate_text

DEFAULT_QUESTION = "Describe the image."
DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device that is absent is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available here; use --device cpu")
    return torch.device(name)


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
        from unigen.checkpoint import resolve_checkpoint_dir

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
    ) -> PipelineOutput:
        if guidance_scale is None:
            guidance_scale = self.model.config.guidance_scale
        if temperature is None:
            temperature = self.model.config.temperature
        batch = self.processor.generation_inputs(prompt)
        negative = None
        if negative_prompt is not None:
            negative = self.processor.generation_inputs(negative_prompt)["input_ids"].to(self.device)
        codes = generate_image_tokens(
            self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
            num_images=num_images_per_prompt, guidance_scale=guidance_scale, temperature=temperature,
            top_k=top_k, top_p=top_p, generator=generator, cfg_schedule=cfg_schedule,
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
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
    ) -> str | list[str]:
        """One image (path or PIL) -> str; a list -> list of str. Greedy unless temperature > 0."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        batch = self.processor.understanding_inputs(images, question or DEFAULT_QUESTION)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ids = generate_text(
            self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"].to(self.model.dtype),
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, streamer=streamer,
        )
        texts = [self.processor.decode(row) for row in ids]
        return texts[0] if single else texts
