"""Text and image inputs for a unified model: tokenizer, prompts (``unigen.prompts``), image preprocessing.

Understanding images follow DeepSeek's ``VLMImageProcessor`` exactly (floor long-side resize with
PIL bicubic, pad to square with gray 127, mean = std = 0.5 -> [-1, 1]); transformers' port rounds
instead of flooring and resizes with torch, which gives small pixel differences.
Generation (VQ) images: short-side resize + centre crop -> [-1, 1] (the Janus paper's recipe).
Prompts are built by ``unigen.prompts`` (the processor's ``prompts``), the one builder training uses too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unigen.config import SPECIAL_TOKEN_TEXT, TokenIds, UniGenConfig
from unigen.errors import ArgumentError, CheckpointError, CheckpointNotFoundError, DataError
from unigen.models.checkpoint import check_tokenizer_files, load_config
from unigen.models.native_inputs import native_inputs
from unigen.models.tiles import tiled_inputs
from unigen.prompts import (
    CHAT_TEMPLATE,
    EOS_TEXT,
    JANUS_SYSTEM_PROMPT,
    ChatTemplateFormat,
    PromptBuilder,
    PromptFormat,
    check_text,
    left_pad,
    prompt_format,
)
from unigen.runs import write_json
from unigen.text_tokenizer import special_token_ids

# the prompt names commands, the app and recipes import from here
__all__ = ["JANUS_SYSTEM_PROMPT", "ImageDecodeError", "UniGenProcessor", "check_pixel_values", "check_text",
           "generation_image", "generation_pixels", "load_image", "pixels_to_pil", "prompt_format",
           "uint8_to_pixels", "understanding_pixels", "understanding_size"]
PAD_GRAY = 127  # int(0.5 * 255): the official background colour
MIN_SIDE = 14


class ImageDecodeError(DataError):
    """A file exists but is not a readable image (corrupt, not an image, or too large to decode safely)."""


# ---- images --------------------------------------------------------------------------------------


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """A path or PIL image -> RGB PIL image. Like Janus, every mode (RGBA, LA, L, P, CMYK, ...) goes
    through a plain ``convert("RGB")``: transparent pixels keep their stored colour. 16-bit images are scaled
    to 8 bits (Pillow's ``convert`` would clip every value above 255 to white)."""
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    path = Path(image)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the path of an image file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist; check the path "
                                f"(relative paths start from {Path.cwd()})")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{path} is too large to decode safely ({err}); resize it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{path} could not be decoded as an image ({err}); is the file corrupt?") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey (PNG, TIFF): 0..65535 -> 0..255
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and values.max(initial=0) <= 255:  # an "I" image that already holds 8-bit values
            return Image.fromarray(values.astype(np.uint8)).convert("RGB")
        scaled = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    return img.convert("RGB")


def check_pixel_values(pixel_values: torch.Tensor, image_size: int) -> None:
    """Understanding encoders take (n_images, 3, S, S); anything else is named, with the fix."""
    s = image_size
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (s, s):
        raise ArgumentError(
            f"pixel_values must have shape (n_images, 3, {s}, {s}); got {tuple(pixel_values.shape)}. "
            "Use UniGenProcessor to resize and normalise images."
        )


def _to_tensor(img: Image.Image) -> torch.Tensor:
    # float32(x) / 255 equals DeepSeek's float32(float64(x) * (1 / 255)) for every uint8 x
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def understanding_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(w, h) after DeepSeek's resize: the long side becomes ``image_size``, the short side is floored."""
    longest = max(width, height)
    return (max(int(width / longest * image_size), MIN_SIDE), max(int(height / longest * image_size), MIN_SIDE))


def understanding_pixels(images, image_size: int, normalize: bool = True) -> torch.Tensor:
    """DeepSeek's understanding preprocessing -> (n, 3, S, S) float32; [-1, 1] when ``normalize``,
    else [0, 1] (the first Janus-1.3B revision had ``do_normalize: false``)."""
    images = list(images)
    if not images:
        raise ArgumentError("no images given")
    out = []
    for image in images:
        img = load_image(image)
        size = understanding_size(*img.size, image_size)
        img = img.resize(size, Image.BICUBIC)  # = torchvision's resize on a PIL image (antialias=True)
        canvas = Image.new("RGB", (image_size, image_size), (PAD_GRAY,) * 3)
        canvas.paste(img, ((image_size - size[0]) // 2, (image_size - size[1]) // 2))
        x = _to_tensor(canvas)
        out.append((x - 0.5) / 0.5 if normalize else x)
    return torch.stack(out)


def generation_image(image, image_size: int) -> torch.Tensor:
    """The one preprocessing of VQ images (the VQ trainer, code extraction, the pipeline and the evaluators all
    call it): short side resized to ``image_size`` with exact bicubic, then the centre crop -> uint8 (3, S, S)."""
    img = load_image(image)
    w, h = img.size
    scale = image_size / min(w, h)
    size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
    if size != (w, h):
        img = img.resize(size, Image.BICUBIC)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1] (the normalisation of both Janus image encoders)."""
    return images.float().div(127.5).sub(1.0)


def generation_pixels(images, image_size: int) -> torch.Tensor:
    """:func:`generation_image` of each image -> (n, 3, S, S) float in [-1, 1] (VQ input)."""
    images = list(images)
    if not images:
        raise ArgumentError("no images given")
    return uint8_to_pixels(torch.stack([generation_image(image, image_size) for image in images]))


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] (n, 3, H, W) -> PIL images; like Janus, clip((x+1)/2*255) then truncate (not round)."""
    x = ((pixels.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


# ---- the processor -------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PREPROCESSOR_FILE = "preprocessor_config.json"


class UniGenProcessor:
    """Turns prompts and images into model inputs, and generated ids back into text."""

    def __init__(self, tokenizer, config: UniGenConfig, system_prompt: str | None = None,
                 do_normalize: bool = True):
        self.tokenizer = tokenizer
        self.config = config
        self.prompts = PromptBuilder(self._tokenize, config,
                                     config.system_prompt if system_prompt is None else system_prompt,
                                     self._tokenizer_format())
        self.do_normalize = do_normalize

    def _tokenizer_format(self) -> PromptFormat | ChatTemplateFormat | None:
        """The prompt format where it depends on the tokenizer (None: the named format as it is): the chat
        template's, or DeepSeek's with the tokenizer's own EOS ending replies (an LLM from ``llm_from`` without a
        template has no ``<｜end▁of▁sentence｜>``)."""
        if self.config.prompt_format == CHAT_TEMPLATE:
            return self._chat_template()
        if self.tokenizer is None or EOS_TEXT in self.tokenizer.get_vocab():  # (image-only processors have none)
            return None
        return dataclasses.replace(prompt_format(self.config.prompt_format),
                                   sep2=self.tokenizer.convert_ids_to_tokens(self.config.tokens.eos))

    def _chat_template(self) -> ChatTemplateFormat:
        """The tokenizer's chat template as a prompt format (a model built on ``llm_from``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise CheckpointError("the checkpoint's prompt_format is 'chat-template' but its tokenizer has no chat "
                                  "template; save the LLM's tokenizer (with its template) beside the weights")

        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

        end = self.tokenizer.convert_ids_to_tokens(self.config.tokens.eos)
        return ChatTemplateFormat(render, end, text_bos=self.tokenizer.bos_token_id is not None)

    @property
    def format(self) -> PromptFormat | ChatTemplateFormat:
        return self.prompts.format

    @property
    def system_prompt(self) -> str | None:
        return self.prompts.system_prompt

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @classmethod
    def from_pretrained(cls, path: str | Path, config: UniGenConfig | None = None) -> UniGenProcessor:
        """The tokenizer saved in ``path``; ``config`` defaults to the checkpoint's config.json, or, in a
        tokenizer-only directory, to the default config with the tokenizer's special ids."""
        directory = Path(path)
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointNotFoundError(
                f"{directory} holds no text tokenizer (expected one of {list(TOKENIZER_FILES)}); save one "
                "there with tokenizer.save_pretrained(dir) or UniGenProcessor.save_pretrained(dir)"
            )
        tokenizer = _load_tokenizer(directory)
        if config is None and (directory / "config.json").is_file():
            config, _ = load_config(directory)
        elif config is None:
            config = UniGenConfig(tokens=special_token_ids(tokenizer))
            config.prompt_format = "janus-pro" if "<|User|>" in tokenizer.get_vocab() else "janus"
        processor = cls(tokenizer, config, do_normalize=_read_do_normalize(directory))
        processor.check_token_ids()
        return processor

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        # the keys of DeepSeek's preprocessor_config.json that describe what we do
        s = self.config.vision.image_size
        pre = {"image_size": s, "min_size": MIN_SIDE, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
               "background_color": [PAD_GRAY] * 3, "rescale_factor": 1 / 255, "do_normalize": self.do_normalize}
        write_json(directory / PREPROCESSOR_FILE, pre)

    @property
    def tokens(self) -> TokenIds:
        return self.config.tokens

    def resolve_token_ids(self) -> TokenIds:
        """The special ids as the tokenizer's vocabulary has them (not as the config says)."""
        return special_token_ids(self.tokenizer)

    def check_token_ids(self) -> None:
        """A config whose special ids disagree with the tokenizer would build wrong prompts silently."""
        vocab = self.tokenizer.get_vocab()
        actual = {k: vocab[t] for k, t in SPECIAL_TOKEN_TEXT.items() if t in vocab}
        if self.tokenizer.pad_token_id is not None:
            actual["pad"] = self.tokenizer.pad_token_id
        wrong = {k: (getattr(self.tokens, k), v) for k, v in actual.items() if getattr(self.tokens, k) != v}
        if wrong:
            detail = ", ".join(f"{k}: config {c}, tokenizer {t}" for k, (c, t) in sorted(wrong.items()))
            raise CheckpointError(f"config.tokens disagree with the tokenizer ({detail}); set "
                             "config.tokens = processor.resolve_token_ids() or pass the checkpoint's config")

    def encode(self, text: str) -> list[int]:
        """Token ids with exactly one leading BOS (``PromptBuilder.encode``)."""
        return self.prompts.encode(text)

    def pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left padding (generation appends on the right) with ``tokens.pad`` and a 0/1 mask."""
        ids, mask = left_pad(rows, self.tokens.pad)
        return {"input_ids": ids, "attention_mask": mask}

    def understanding_pixels(self, images) -> torch.Tensor:
        return understanding_pixels(images, self.config.vision.image_size, self.do_normalize)

    def understanding_inputs(self, images, questions) -> dict[str, torch.Tensor]:
        """One image and one question per row -> input_ids, attention_mask, pixel_values (n_images, 3, S, S)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ArgumentError("no images given: pass at least one image")
        questions = [questions] * len(images) if isinstance(questions, str) else list(questions)
        if len(questions) != len(images):
            raise ArgumentError(f"{len(images)} images but {len(questions)} questions; give one question per image")
        for question in questions:
            check_text(question, "question")
        rows = [self.prompts.question(q) for q in questions]
        if self.config.encoder == "native":  # each image at its own size, as many placeholders as its tokens
            return native_inputs(self, rows, [[load_image(image)] for image in images])
        if self.config.vision.tiles is not None:  # each image as tiles + thumbnail, each after its tag
            return tiled_inputs(self, rows, [[load_image(image)] for image in images])
        batch = self.pad(rows)
        batch["pixel_values"] = self.understanding_pixels(images)
        return batch

    def generation_inputs(self, prompts) -> dict[str, torch.Tensor]:
        """Text-to-image prompts -> left-padded input_ids ending in <begin_of_image>, attention_mask."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ArgumentError("no prompts given")
        for prompt in prompts:
            check_text(prompt, "prompt")
        return self.pad([self.prompts.generation(p) for p in prompts])

    def chat_inputs(self, messages) -> dict[str, torch.Tensor | None]:
        """One conversation (``unigen.prompts``) -> input_ids and attention_mask (1, L) ending with the
        assistant's reply slot, and pixel_values (n_images, 3, S, S) in the order of their tags (None
        without images): the ids DeepSeek's ``VLChatProcessor`` makes for the same conversation."""
        ids, images = self.prompts.conversation(messages)
        if self.config.encoder == "native" and images:  # each image at its own size
            return native_inputs(self, [ids], [[load_image(image) for image in images]])
        if self.config.vision.tiles is not None and images:
            return tiled_inputs(self, [ids], [[load_image(image) for image in images]])
        batch = self.pad([ids])
        batch["pixel_values"] = self.understanding_pixels(images) if images else None
        return batch

    def edit_inputs(self, instructions: list[str], drop: str | None = None) -> dict[str, torch.Tensor]:
        """Edit prompts (``PromptBuilder.edit``), or with ``drop`` their unconditional rows, left padded."""
        return self.pad([self.prompts.edit(text, drop) for text in instructions])

    def generation_pixels(self, images) -> torch.Tensor:
        return generation_pixels(images, self.config.vq.image_size)

    def decode(self, ids) -> str:
        """One row of ids -> text, special tokens (BOS, EOS, pads, image tags, roles) skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def batch_decode(self, rows) -> list[str]:
        return [self.decode(row) for row in rows]


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that config.json's model_type "unigen" is not its own
    check_tokenizer_files(directory)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"the text tokenizer in {directory} could not be loaded ({type(err).__name__}: "
                              f"{err}); is one of {list(TOKENIZER_FILES)} damaged?") from err
    finally:
        hf_logging.set_verbosity(verbosity)


def _read_do_normalize(directory: Path) -> bool:
    path = directory / PREPROCESSOR_FILE
    if not path.is_file():
        return True
    try:
        return bool(json.loads(path.read_text()).get("do_normalize", True))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a valid JSON object: {err}") from err
