"""Text and image inputs for a unified model: tokenizer, Janus prompt formats, image preprocessing.

Understanding images follow DeepSeek's ``VLMImageProcessor`` exactly (floor long-side resize with
PIL bicubic, pad to square with gray 127, mean = std = 0.5 -> [-1, 1]); transformers' port rounds
instead of flooring and resizes with torch, which gives small pixel differences.
Generation (VQ) images: short-side resize + centre crop -> [-1, 1] (the Janus paper's recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unigen.config import TokenIds, UniGenConfig

JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
PAD_GRAY = 127  # int(0.5 * 255): the official background colour
MIN_SIDE = 14


class ImageDecodeError(ValueError):
    """A file exists but is not a readable image."""


# ---- images --------------------------------------------------------------------------------------


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """A path or PIL image -> RGB PIL image (RGBA, LA, L, P, CMYK, I;16 are converted)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist; check the path")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{path} could not be decoded as an image ({err}); is the file corrupt?") from err


def check_pixel_values(pixel_values: torch.Tensor, image_size: int) -> None:
    """Understanding encoders take (n_images, 3, S, S); anything else is named, with the fix."""
    s = image_size
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (s, s):
        raise ValueError(
            f"pixel_values must have shape (n_images, 3, {s}, {s}); got {tuple(pixel_values.shape)}. "
            "Use UniGenProcessor to resize and normalise images."
        )


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def understanding_pixels(images, image_size: int, normalize: bool = True) -> torch.Tensor:
    """DeepSeek's understanding preprocessing -> (n, 3, S, S); [-1, 1] when ``normalize``."""
    out = []
    for image in images:
        img = load_image(image)
        w, h = img.size
        longest = max(w, h)
        size = (max(int(w / longest * image_size), MIN_SIDE), max(int(h / longest * image_size), MIN_SIDE))
        img = img.resize(size, Image.BICUBIC)
        canvas = Image.new("RGB", (image_size, image_size), (PAD_GRAY,) * 3)
        canvas.paste(img, ((image_size - size[0]) // 2, (image_size - size[1]) // 2))
        x = _to_tensor(canvas)
        out.append((x - 0.5) / 0.5 if normalize else x)
    return torch.stack(out)


def generation_pixels(images, image_size: int) -> torch.Tensor:
    """Short-side resize to ``image_size`` then centre crop -> (n, 3, S, S) in [-1, 1] (VQ input)."""
    out = []
    for image in images:
        img = load_image(image)
        w, h = img.size
        scale = image_size / min(w, h)
        size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.BICUBIC)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        out.append(_to_tensor(img) * 2 - 1)
    return torch.stack(out)


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] (n, 3, H, W) -> PIL images; like Janus, clip((x+1)/2*255) then truncate (not round)."""
    x = ((pixels.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


# ---- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """DeepSeek's "deepseek" conversation template: ``role: message`` turns separated by a blank line."""

    user: str
    assistant: str
    system: str = JANUS_SYSTEM_PROMPT

    def understanding(self, question: str, system: str | None = None) -> str:
        system = self.system if system is None else system
        head = f"{system}\n\n" if system else ""
        return f"{head}{self.user}: <image_placeholder>\n{question}\n\n{self.assistant}:"

    def generation(self, prompt: str) -> str:
        # generation prompts are rendered with an empty system prompt, then the image-start tag
        return f"{self.user}: {prompt}\n\n{self.assistant}:<begin_of_image>"

    def text(self, message: str, system: str | None = None) -> str:
        system = self.system if system is None else system
        head = f"{system}\n\n" if system else ""
        return f"{head}{self.user}: {message}\n\n{self.assistant}:"


PROMPT_FORMATS = {
    "janus-pro": PromptFormat("<|User|>", "<|Assistant|>"),
    "janus": PromptFormat("User", "Assistant"),
}


def prompt_format(name: str) -> PromptFormat:
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format {name!r}; known: {sorted(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[name]


# ---- the processor -------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class UniGenProcessor:
    """Turns prompts and images into model inputs, and generated ids back into text."""

    def __init__(self, tokenizer, config: UniGenConfig, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.format = prompt_format(config.prompt_format)
        self.system_prompt = config.system_prompt if system_prompt is None else system_prompt

    @classmethod
    def from_pretrained(cls, path: str | Path, config: UniGenConfig | None = None) -> UniGenProcessor:
        from transformers import AutoTokenizer

        directory = Path(path)
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{directory} holds no text tokenizer (expected one of {list(TOKENIZER_FILES)}); save one "
                "there with tokenizer.save_pretrained(dir) or UniGenProcessor.save_pretrained(dir)"
            )
        if config is None:
            from unigen.checkpoint import load_config

            config, _ = load_config(directory)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it warns that config.json's model_type "unigen" is not its own
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        finally:
            hf_logging.set_verbosity(verbosity)
        return cls(tokenizer, config)

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))

    @property
    def tokens(self) -> TokenIds:
        return self.config.tokens

    def encode(self, text: str) -> list[int]:
        """Token ids with exactly one leading BOS."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return [self.tokens.bos, *ids]

    def _expand_images(self, ids: list[int]) -> list[int]:
        # one placeholder in the prompt -> <begin_of_image> + placeholders + <end_of_image>
        t = self.tokens
        block = [t.image_start, *([t.image] * self.config.image_placeholders_per_image), t.image_end]
        out: list[int] = []
        for i in ids:
            out += block if i == t.image else [i]
        return out

    def pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left padding (generation appends on the right) with ``tokens.pad`` and a 0/1 mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokens.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def understanding_prompt(self, question: str) -> str:
        return self.format.understanding(question, self.system_prompt)

    def understanding_inputs(self, images, questions) -> dict[str, torch.Tensor]:
        """One image and one question per row -> input_ids, attention_mask, pixel_values."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        questions = [questions] * len(images) if isinstance(questions, str) else list(questions)
        if len(questions) != len(images):
            raise ValueError(f"{len(images)} images but {len(questions)} questions; give one question per image")
        rows = [self._expand_images(self.encode(self.understanding_prompt(q))) for q in questions]
        batch = self.pad(rows)
        batch["pixel_values"] = understanding_pixels(images, self.config.vision.image_size)
        return batch

    def generation_inputs(self, prompts) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        return self.pad([self.encode(self.format.generation(p)) for p in prompts])

    def generation_pixels(self, images) -> torch.Tensor:
        return generation_pixels(images, self.config.vq.image_size)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
