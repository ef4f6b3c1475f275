"""What each request of the web app does with the one shared pipeline: check the inputs, call the pipeline,
shape the result for the UI. A wrong input raises ``gr.Error`` with a message that says what to change (the
page shows it, the app keeps serving); a fault that is not the user's propagates, so Gradio logs its traceback
on the server and shows the page a plain "Error"."""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from unigen.errors import UniGenError
from unigen.generation.decoding import DECODING_METHODS
from unigen.generation.editing import DEFAULT_CFG_DROP, check_instruction
from unigen.generation.pipeline import DEFAULT_QUESTION, UniGenPipeline
from unigen.generation.sampling_options import SEED_MAX, SamplingOptions
from unigen.processor import ImageDecodeError, check_text, load_image

MAX_IMAGES = 16  # images per /generate request: a request must not hold the one shared model for long
MAX_ANSWER_TOKENS = 256
KEEP_DOWNLOADS = 64  # requests whose PNG files stay on disk; Gradio copies each into its cache when it answers
GUIDANCE_MAX = 20.0  # past this a Janus-style model only saturates colours (unless the checkpoint's default is higher)
TEMPERATURE_MAX = 2.0  # likewise: past 2 the codes are noise
TOP_P_MIN = 0.01


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """unigen's own errors (a bad option, an unreadable image) become a message on the page."""
    try:
        yield
    except UniGenError as err:
        raise gr.Error(" ".join(str(err).split()), print_exception=False) from err


def whole_number(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value != int(value):
        raise gr.Error(f"{name} must be a whole number, got {value!r}", print_exception=False)
    if not low <= value <= high:
        raise gr.Error(f"{name} must be between {low} and {high}, got {int(value)}", print_exception=False)
    return int(value)


def number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise gr.Error(f"{name} must be a finite number, got {value!r}", print_exception=False)
    if not low <= value <= high:
        raise gr.Error(f"{name} must be between {low:g} and {high:g}, got {value:g}", print_exception=False)
    return float(value)


@dataclass(frozen=True)
class Limits:
    """The range of every number a request takes: the page's sliders are built from these and the API refuses
    what lies outside them, so a script cannot ask for what the page would not (temperature 1e308, guidance
    1e6, a window of a million tokens). Upper bounds reach the checkpoint's own defaults where those are
    higher, and the model's sizes where they bound the work (codes, image tokens)."""

    guidance_scale: tuple[float, float]
    temperature: tuple[float, float]
    top_p: tuple[float, float]
    top_k: tuple[int, int]  # 0 = off
    num_images: tuple[int, int]
    window: tuple[int, int]  # 0 = the decoding method's default

    @classmethod
    def of(cls, config) -> Limits:
        return cls(guidance_scale=(0.0, max(GUIDANCE_MAX, config.guidance_scale)),
                   temperature=(0.0, max(TEMPERATURE_MAX, config.temperature)), top_p=(TOP_P_MIN, 1.0),
                   top_k=(0, config.vq.codebook_size), num_images=(1, MAX_IMAGES), window=(0, config.vq.num_tokens))


def read_upload(upload: dict | str | None, what: str) -> str:
    """The path of an uploaded image (Gradio's file dict, or a path), checked readable; a message that names
    the file as the user called it otherwise. Events that take uploads skip Gradio's own decoding
    (``preprocess=False``), whose failure the page would only show as "Error"; Gradio has already checked
    that the path lies in its upload folder."""
    if not upload:
        raise gr.Error(f"Upload an image for the {what}.", print_exception=False)
    path = upload if isinstance(upload, str) else upload["path"]
    name = Path(path).name if isinstance(upload, str) else upload.get("orig_name") or Path(path).name
    try:
        load_image(path)
    except ImageDecodeError:
        raise gr.Error(f"The uploaded file {name} could not be read as an image (corrupt, or not an image?); "
                       "upload a PNG or JPEG file.", print_exception=False) from None
    return path


class AppModel:
    """The one pipeline every session shares, and the requests it answers. Gradio's queue decides how many
    requests run at once (``unigen.app.ui``); nothing here is per-session."""

    def __init__(self, pipe: UniGenPipeline, name: str):
        self.pipe = pipe
        self.name = name
        self.config = pipe.model.config
        self.limits = Limits.of(self.config)
        self._downloads = Path(tempfile.mkdtemp(prefix="unigen-app-"))

    def close(self) -> None:
        shutil.rmtree(self._downloads, ignore_errors=True)

    # ---- /generate and /edit --------------------------------------------------------------------------------

    def generate(self, prompt: str, num_images, guidance_scale, temperature, top_k, top_p, seed,
                 decoding="sequential", decoding_window=0,
                 progress=gr.Progress(track_tqdm=True)) -> tuple[list[Image.Image], list[str], str]:  # noqa: B008
        """Images for ``prompt`` (image i drawn with seed + i, as ``unigen generate``), their PNG files, and a
        line on the work done. ``decoding_window`` 0 takes the decoding method's own default."""
        with user_errors():
            check_text(prompt, "prompt")
        if not prompt.strip():
            raise gr.Error("Enter a prompt, e.g. 'a large red circle at the top left'.", print_exception=False)
        seed, generators = self.seeds(num_images, seed)
        window = whole_number("Window", decoding_window, *self.limits.window)
        if decoding not in DECODING_METHODS:
            raise gr.Error(f"Decoding must be one of {', '.join(DECODING_METHODS)}, got {decoding!r}",
                           print_exception=False)
        window_option = {"window": window} if window and decoding != "sequential" else None
        started = time.perf_counter()
        with user_errors():
            options = self.sampling(guidance_scale, temperature, top_k, top_p, decoding=decoding,
                                    decoding_options=window_option)
            out = self.pipe(prompt, num_images_per_prompt=len(generators), options=options, generator=generators,
                            progress=True)
        seconds = time.perf_counter() - started
        done = f"{len(out.images)} image(s) in {seconds:.1f} s, {out.decoder_passes} decoder passes ({decoding})"
        return out.images, self.save_pngs(out.images, seed, "unigen"), done

    def edit(self, image: dict | str | None, instruction: str, num_images, guidance_scale, temperature, seed,
             cfg_drop=DEFAULT_CFG_DROP,
             progress=gr.Progress(track_tqdm=True)) -> tuple[list[Image.Image], list[str]]:  # noqa: B008
        """Edited versions of one uploaded image (version i drawn with seed + i), and their PNG files."""
        path = read_upload(image, "edit")
        seed, generators = self.seeds(num_images, seed)
        with user_errors():
            check_instruction(instruction or "")
            options = self.sampling(guidance_scale, temperature, 0, 1.0)
            images = self.pipe.edit(path, instruction, num_images_per_prompt=len(generators), options=options,
                                    generator=generators, cfg_drop=cfg_drop, progress=True).images
        return images, self.save_pngs(images, seed, "unigen_edit")

    def seeds(self, num_images, seed) -> tuple[int, list[torch.Generator]]:
        count = whole_number("Number of images", num_images, *self.limits.num_images)
        seed = whole_number("Seed", seed, 0, SEED_MAX - count + 1)
        return seed, [torch.Generator(self.pipe.device).manual_seed(seed + i) for i in range(count)]

    def sampling(self, guidance_scale, temperature, top_k, top_p, **decoding) -> SamplingOptions:
        limits = self.limits
        top_k = whole_number("Top-k", top_k, *limits.top_k)
        return SamplingOptions(number("Guidance scale", guidance_scale, *limits.guidance_scale),
                               number("Temperature", temperature, *limits.temperature), top_k or None,
                               number("Top-p", top_p, *limits.top_p), **decoding)

    def save_pngs(self, images: list[Image.Image], seed: int, stem: str) -> list[str]:
        folder = self._downloads / uuid.uuid4().hex
        folder.mkdir()
        paths = []
        for i, image in enumerate(images):
            path = folder / f"{stem}_seed{seed + i}.png"
            image.save(path, format="PNG")
            paths.append(str(path))
        for old in sorted(self._downloads.iterdir(), key=lambda p: p.stat().st_mtime)[:-KEEP_DOWNLOADS]:
            shutil.rmtree(old, ignore_errors=True)
        return paths

    # ---- /caption --------------------------------------------------------------------------------------------

    def caption(self, image: dict | str | None, question: str | None) -> str:
        """One uploaded image and a question (empty: describe the image) -> the model's answer."""
        path = read_upload(image, "question")
        question = self.question(question)
        with user_errors():
            return self.pipe.caption(path, question=question, max_new_tokens=MAX_ANSWER_TOKENS)

    @staticmethod
    def question(text: str | None) -> str:
        text = text or ""
        with user_errors():
            check_text(text, "question")
        return text.strip() or DEFAULT_QUESTION

    # ---- /chat -----------------------------------------------------------------------------------------------

    def chat(self, message: dict | None, conversation: list[dict] | None) -> tuple[dict, list[dict], list[dict]]:
        """One turn: the text and images of ``message`` (a MultimodalTextbox value) join ``conversation``
        (unigen's message format, image paths included, kept per session); the model answers. Returns the
        cleared input box, the chat as the Chatbot shows it, and the new conversation."""
        message = message or {}
        conversation = list(conversation or [])
        files = [read_upload(upload, "chat") for upload in message.get("files") or []]
        text = message.get("text") or ""
        with user_errors():
            check_text(text, "message")
        if not text.strip() and not files:
            raise gr.Error("Type a question or attach an image.", print_exception=False)
        turn = {"role": "user", "content": text.strip() or DEFAULT_QUESTION, "images": files}
        with user_errors():
            reply = self.pipe.chat(conversation + [turn], max_new_tokens=MAX_ANSWER_TOKENS)
        conversation += [turn, {"role": "assistant", "content": reply, "images": []}]
        return {"text": "", "files": []}, chat_display(conversation), conversation


def chat_display(conversation: list[dict]) -> list[dict]:
    """unigen's messages as Chatbot messages: each uploaded image shown as a user message of its own."""
    shown = []
    for message in conversation:
        shown += [{"role": "user", "content": {"path": path}} for path in message["images"]]
        shown.append({"role": message["role"], "content": message["content"]})
    return shown
