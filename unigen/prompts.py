"""Every prompt unigen builds, for training and inference alike: captions and questions, chat, edit and generation
prompts, their unconditional (CFG) rows, and the image slots of a row.

Prompts follow DeepSeek's "deepseek" conversation template (``janus/utils/conversation.py``): optional
``system + sep``, then ``role: message`` turns ended by ``sep`` (user) or ``sep2`` (assistant). A conversation is
tokenized in pieces cut before each assistant reply (``PromptFormat.pieces``): the trainer supervises the reply
pieces and the pipeline ends on the reply slot, so both get the same ids from the same function
(:meth:`PromptBuilder.dialogue`). The cuts fall on pre-tokenizer boundaries (after a special token or before
``" reply"``), so the ids equal DeepSeek's one-pass tokenization (tests/test_chat.py).

Conversations are ``[{"role": "user" | "assistant", "content": str, "images": [...]}, ...]``. DeepSeek's processor
takes the images' places from ``<image_placeholder>`` tags in the content; here a message's ``images`` fill its
tags in order, and a message with images and no tag gets one tag per image in front of its text, each followed by
a newline, as DeepSeek's examples write them (``"<image_placeholder>\\nDescribe it."``). Each tag becomes
``<begin_of_image>`` + placeholders + ``<end_of_image>`` (the official ``add_image_token``).

An edit prompt is a generation prompt whose user turn holds the source's placeholders and the instruction
(``unigen.generation.editing`` explains the design), with the checkpoint's source-code slots at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from unigen.config import SPECIAL_TOKEN_TEXT, TokenIds, UniGenConfig
from unigen.errors import ArgumentError, ConfigError

JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
IMAGE_TAG, IMAGE_START_TAG, EOS_TEXT = (SPECIAL_TOKEN_TEXT[k] for k in ("image", "image_start", "eos"))
ROLES = ("user", "assistant")
# NVLM-D's tile tags (its ``chat``: ``<tile_1>`` ... ``<tile_k>`` for the tiles, then the thumbnail's; an image
# of one tile is tagged as the thumbnail), plain text in front of each tile's placeholders (unigen.models.tiles)
TILE_TAG, THUMBNAIL_TAG = "<tile_{}>", "<tile_global_thumbnail>"
CFG_DROPS = ("instruction", "image", "both")  # what an edit's unconditional row drops
DEFAULT_CFG_DROP = "both"  # the best of the three on the Shapes editing checkpoint (docs/EXPERIMENTS.md)


# ---- user text ------------------------------------------------------------------------------------


def check_text(text, what: str, *, image_tags: bool = False) -> None:
    """Text must be a str that encodes as UTF-8 (a command-line argument in another encoding arrives with
    lone surrogates, on which the tokenizer fails far from the cause) and hold none of the control tokens that
    unigen writes itself (they would reach the model as control tokens and give garbage or a late internal
    error). ``image_tags=True`` allows ``<image_placeholder>``, the tag a chat message places its images with."""
    if not isinstance(text, str):
        raise ArgumentError(f"the {what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ArgumentError(f"the {what} is not valid UTF-8 text (byte {err.object[err.start:err.end]!r} at "
                            f"{err.start}); pass it in UTF-8") from None
    for name, token in SPECIAL_TOKEN_TEXT.items():
        if token in text and not (image_tags and name == "image"):
            raise ArgumentError(f"the {what} must not contain {token}: it is a control token that unigen places "
                                f"itself (only a chat message may place its images with {IMAGE_TAG}); remove it")


def check_instruction(instruction, where: str = "the instruction") -> str:
    check_text(instruction, "instruction" if where == "the instruction" else f"instruction of {where}")
    if not instruction.strip():
        raise ArgumentError(f"{where} is empty; say what to change, e.g. 'make it blue'")
    return instruction


def check_drop(drop: str) -> str:
    if drop not in CFG_DROPS:
        raise ArgumentError(f"cfg_drop must be one of {list(CFG_DROPS)}, got {drop!r}")
    return drop


def keeps_image(drop: str | None) -> bool:
    """Whether an edit row of this kind reads the source image (its placeholders are not dropped)."""
    return drop in (None, "instruction")


def source_slots(config: UniGenConfig) -> int:
    """How many source-code slots end an edit prompt of this checkpoint (0: it reads the source by SigLIP only)."""
    return config.vq.num_tokens if config.edit_source_codes else 0


# ---- task texts: what a user turn asks for grounding, referring and placed generation -------------------
# (MM1.5-style boxes ``[x1, y1, x2, y2]`` in 0-1000 text, unigen.shapes.boxes; the Shapes scenes and the COCO
# converter write their lines with these, the evaluators ask with them)


# The recipe question of a caption line whose caption is a generation prompt (a partial description: "two red
# circles"): asked this instead of "Describe the image.", the captioner learns partial answers only for it.
PROMPT_QUESTION = "Write a generation prompt for the image."


def grounding_question(name: str) -> str:
    """Ask where the one object called ``name`` is; the answer is its box text."""
    return f"where is the {name}?"


def referring_question(box: str) -> str:
    """Ask what is in the box ``box`` (its text); the answer names the object."""
    return f"what is at {box}?"


def placed_prompt(objects: Sequence[tuple[str, str]]) -> str:
    """A generation prompt that puts each (description, box text) where its box says, joined by `` and ``."""
    return " and ".join(f"{description} in {box}" for description, box in objects)


# ---- the template ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """DeepSeek's "deepseek" template: optional ``system + sep``, then ``role: message`` turns, each ended by
    ``sep`` (user) or ``sep2`` (assistant); an empty message renders as a bare ``role:`` (the reply slot)."""

    user: str
    assistant: str
    system: str = JANUS_SYSTEM_PROMPT
    sep: str = "\n\n"
    sep2: str = EOS_TEXT
    adds_bos: ClassVar[bool] = True  # PromptBuilder.encode puts the BOS in front of a rendered prompt
    text_bos: ClassVar[bool] = True  # a plain-text row starts with the BOS

    def pieces(self, messages: list[str], system: str | None = None) -> list[str]:
        """The rendered text cut before each assistant message: [prompt, reply, prompt, reply, ..., prompt]; every
        prompt piece ends with the assistant's ``role:``. Like the official code, each message is stripped."""
        system = self.system if system is None else system
        out = [system + self.sep if system else ""]
        for i, message in enumerate(messages):
            message = message.strip()
            if i % 2 == 0:
                out[-1] += f"{self.user}: {message}{self.sep}" if message else f"{self.user}:"
            else:
                out[-1] += f"{self.assistant}:"
                out += [f" {message}{self.sep2}" if message else "", ""]
        out[0] = out[0].lstrip()
        return out[:-1] if len(messages) % 2 == 0 and messages else out

    def render(self, messages: list[str], system: str | None = None) -> str:
        """Turns alternate user, assistant, user, ...; the whole prompt is stripped, as in the official code."""
        return "".join(self.pieces(messages, system)).strip()

    def understanding(self, question: str, system: str | None = None) -> str:
        return self.render([f"{IMAGE_TAG}\n{question}", ""], system)

    def generation(self, prompt: str) -> str:
        # the official scripts render generation prompts with system_prompt="", then add the image-start tag
        return self.render([prompt, ""], system="") + IMAGE_START_TAG

    def text(self, message: str, system: str | None = None) -> str:
        return self.render([message, ""], system)


PROMPT_FORMATS = {
    "janus-pro": PromptFormat("<|User|>", "<|Assistant|>"),
    "janus": PromptFormat("User", "Assistant"),  # Janus-1.3B's scripts pass these role names
}
CHAT_TEMPLATE = "chat-template"  # the prompt_format of a model whose LLM came with a chat template (llm_from)


@dataclass(frozen=True)
class ChatTemplateFormat:
    """The LLM's own chat template (``prompt_format: chat-template``, a model built on ``llm_from``): the same
    pieces as :class:`PromptFormat`, rendered by the tokenizer's template. A prompt piece ends with the
    template's generation prompt, a reply piece with the reply's end-of-turn token (``end_of_turn``, the
    model's EOS); whatever the template writes after it opens the next prompt piece. The template writes any
    BOS itself. No system prompt: the template's default (none, or its own)."""

    render_chat: Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
    end_of_turn: str
    text_bos: bool = True  # the tokenizer has a BOS: a plain-text row starts with it
    user: str = "user"
    assistant: str = "assistant"
    adds_bos: ClassVar[bool] = False

    def pieces(self, messages: list[str], system: str | None = None) -> list[str]:
        """[prompt, reply, prompt, reply, ..., prompt] as :meth:`PromptFormat.pieces` cuts them."""
        chat = [{"role": "system", "content": system}] if system else []
        out, done = [], ""
        for i, message in enumerate(messages):
            message = message.strip()
            if i % 2 == 0:
                chat.append({"role": "user", "content": message})
                continue
            done = self._extend(out, done, self.render_chat(chat, True))
            if message:
                chat.append({"role": "assistant", "content": message})
                reply = self._tail(done, self.render_chat(chat, False))
                cut = reply.find(self.end_of_turn, reply.find(message) + len(message))
                reply = reply if cut < 0 else reply[: cut + len(self.end_of_turn)]
                out.append(reply)
                done += reply
            else:
                out.append("")
        if len(messages) % 2:  # ends with a user turn (no reply slot)
            self._extend(out, done, self.render_chat(chat, False))
        return out

    def _tail(self, done: str, text: str) -> str:
        if not text.startswith(done):
            raise ConfigError("the LLM's chat template does not render a conversation as the continuation of its "
                              "earlier turns, so training and inference prompts would differ; use prompt_format "
                              "janus-pro (add <|User|> and <|Assistant|> to the tokenizer)")
        return text[len(done):]

    def _extend(self, out: list[str], done: str, text: str) -> str:
        """The prompt piece from ``done`` to ``text`` (joined to a trailing reply piece's remainder)."""
        out.append(self._tail(done, text))
        return text

    def render(self, messages: list[str], system: str | None = None) -> str:
        return "".join(self.pieces(messages, system))

    def understanding(self, question: str, system: str | None = None) -> str:
        return self.render([f"{IMAGE_TAG}\n{question}", ""], system)

    def generation(self, prompt: str) -> str:
        return self.render([prompt, ""]) + IMAGE_START_TAG

    def text(self, message: str, system: str | None = None) -> str:
        return self.render([message, ""], system)


def prompt_format(name: str) -> PromptFormat:
    """A named DeepSeek format (``chat-template`` is the tokenizer's: ``UniGenProcessor`` builds it)."""
    if name == CHAT_TEMPLATE:
        raise ConfigError("prompt_format 'chat-template' is the tokenizer's chat template; build prompts through "
                          "the processor saved with the checkpoint (UniGenProcessor.from_pretrained)")
    if name not in PROMPT_FORMATS:
        raise ConfigError(f"unknown prompt_format {name!r}; known: {sorted(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[name]


# ---- conversations --------------------------------------------------------------------------------


@dataclass
class Message:
    role: str
    content: str
    images: list = field(default_factory=list)  # PIL images or paths, in the order of the content's tags


def _message(raw, i: int) -> Message:
    where = f"message {i + 1}"
    if isinstance(raw, Message):
        raw = {"role": raw.role, "content": raw.content, "images": raw.images}
    if not isinstance(raw, dict):
        raise ArgumentError(f"{where} must be a dict with 'role' and 'content' (and optional 'images'), got "
                            f"{type(raw).__name__}")
    unknown = sorted(set(raw) - {"role", "content", "images"})
    if unknown:
        raise ArgumentError(f"{where} has unknown key(s) {unknown}; a message has 'role', 'content' and 'images'")
    role = raw.get("role")
    if role not in ROLES:
        raise ArgumentError(f"{where} has role {role!r}; the roles are {list(ROLES)}")
    content = raw.get("content", "")
    check_text(content, f"content of {where}", image_tags=True)
    images = raw.get("images") or []
    if not isinstance(images, (list, tuple)):
        images = [images]
    return Message(role, content, list(images))


def check_messages(messages: Sequence) -> list[Message]:
    """Messages alternate user and assistant, start with the user and end with the user (the reply is the
    assistant's next turn); each names what is wrong with it by its 1-based position."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence) or not messages:
        raise ArgumentError("messages must be a non-empty list of {'role', 'content', 'images'} dicts")
    out = [_message(raw, i) for i, raw in enumerate(messages)]
    for i, m in enumerate(out):
        expected = ROLES[i % 2]
        if m.role != expected:
            raise ArgumentError(f"message {i + 1} has role {m.role!r} where the conversation needs {expected!r}: "
                                "turns alternate user, assistant, user, ... starting with the user")
        if m.role == "user" and not m.content.strip() and not m.images:  # (an assistant may have said nothing)
            raise ArgumentError(f"message {i + 1} (user) is empty: give it text or images")
        if m.images and m.role != "user":
            raise ArgumentError(f"message {i + 1} is the assistant's and has images; only user messages hold images")
    if out[-1].role != "user":
        raise ArgumentError(f"the last message (message {len(out)}) is the assistant's; end with a user message, "
                            "the reply is the assistant's next turn")
    return out


def with_image_tags(text: str, n_images: int, where: str = "message 1") -> str:
    """The text with one ``<image_placeholder>`` per image (added in front, each on its line, when it has none)."""
    tags = text.count(IMAGE_TAG)
    if tags == 0:
        return f"{IMAGE_TAG}\n" * n_images + text
    if tags != n_images:
        raise ArgumentError(f"{where} has {tags} {IMAGE_TAG} tag(s) but {n_images} image(s); give one image per "
                            "tag, or no tags (then each image goes in front of the text)")
    return text


# ---- rows of ids ----------------------------------------------------------------------------------


def tile_tags(n_tiles: int) -> list[str]:
    """The tags of an image read as ``n_tiles`` tiles (the thumbnail last, counted in ``n_tiles``)."""
    return [TILE_TAG.format(k) for k in range(1, n_tiles)] + [THUMBNAIL_TAG]


def unconditional_ids(ids, cfg_pad: int):
    """Janus's unconditional row: BOS and the final <begin_of_image> kept, every token between them the CFG pad
    (a list or a 1-D tensor, returned as the same kind)."""
    if isinstance(ids, torch.Tensor):
        out = torch.full_like(ids, cfg_pad)
        out[0], out[-1] = ids[0], ids[-1]
        return out
    return [tok if i in (0, len(ids) - 1) else cfg_pad for i, tok in enumerate(ids)]


def drop_ids(ids: list[int], drop: str, tokens: TokenIds) -> list[int]:
    """An edit prompt's unconditional row (``CFG_DROPS``): the instruction, the source's block, or both become the
    CFG pad; BOS and the final <begin_of_image> stay, so every row has the same length and image positions."""
    if check_drop(drop) == "both":
        return unconditional_ids(ids, tokens.cfg_pad)
    last = len(ids) - 1
    out = []
    for i, tok in enumerate(ids):
        in_image = tok in (tokens.image, tokens.image_end) or (tok == tokens.image_start and i != last)
        dropped = 0 < i < last and (drop == "image") == in_image
        out.append(tokens.cfg_pad if dropped else tok)
    return out


def left_pad(rows, pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids (lists or 1-D tensors) -> (ids, 0/1 mask), padded on the left so that every row ends at the
    last column (generation appends on the right); padded positions are masked, so the pad id does not matter."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


# ---- image slots ----------------------------------------------------------------------------------


def stacked_images(pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """The images of a batch in reading order (row by row, the order their placeholders are filled in): a
    (batch, images_per_row, 3, H, W) tensor is flattened to (images, 3, H, W). No images: None. (The encoders
    check the shape of what is left.)"""
    if pixel_values is None:
        return None
    if pixel_values.ndim == 5:
        pixel_values = pixel_values.flatten(0, 1)
    return pixel_values if len(pixel_values) else None


def images_per_row(rows: Sequence[torch.Tensor], pixel_values: torch.Tensor | None, config: UniGenConfig,
                   what: str = "pixel_values") -> list[torch.Tensor | None]:
    """Each row's images (None: none), split from ``pixel_values`` by the rows' placeholders."""
    per_image = config.image_placeholders_per_image
    counts = [int((r == config.image_token_id).sum()) // per_image for r in rows]
    images = stacked_images(pixel_values)
    if images is None:
        return [None] * len(rows)  # placeholders without images are reported by the model's forward
    if images.ndim != 4:
        raise ArgumentError(f"{what} must be (images, 3, H, W); got shape {tuple(pixel_values.shape)}")
    if sum(counts) != images.shape[0]:
        raise ArgumentError(f"{what} holds {images.shape[0]} image(s) but the prompts have placeholders "
                            f"for {sum(counts)} ({per_image} placeholder tokens per image)")
    return [chunk if len(chunk) else None for chunk in images.split(counts)]


# ---- the builder ----------------------------------------------------------------------------------

Segment = tuple[list[int], bool]  # ids, and whether training supervises them (the assistant's replies)


class PromptBuilder:
    """The ids of every prompt, from the checkpoint's format, system prompt and special ids; ``tokenize`` maps
    text to ids without BOS (``UniGenProcessor`` passes its tokenizer)."""

    def __init__(self, tokenize: Callable[[str], list[int]], config: UniGenConfig, system_prompt: str | None,
                 fmt: PromptFormat | ChatTemplateFormat | None = None):
        """``fmt``: the format when it depends on the tokenizer (``UniGenProcessor`` passes it), else the
        config's named one."""
        self.tokenize = tokenize
        self.config = config
        self.tokens = config.tokens
        self.format = fmt if fmt is not None else prompt_format(config.prompt_format)
        self.system_prompt = system_prompt

    def encode(self, text: str) -> list[int]:
        """Token ids with exactly one leading BOS (the Janus tokenizer adds it; we add it ourselves so
        that a tokenizer without a BOS post-processor gives the same ids). A chat template writes its own."""
        return [self.tokens.bos, *self.tokenize(text)] if self.format.adds_bos else self.tokenize(text)

    def expand_images(self, ids: list[int]) -> list[int]:
        """Each placeholder -> <begin_of_image> + placeholders + <end_of_image> (the official add_image_token)."""
        t = self.tokens
        block = [t.image_start, *([t.image] * self.config.image_placeholders_per_image), t.image_end]
        out: list[int] = []
        for i in ids:
            out += block if i == t.image else [i]
        return out

    def with_tiles(self, ids: list[int], tiles: Sequence[int]) -> list[int]:
        """``ids`` with each image block (``expand_images``') holding its image's ``tiles[k]`` tiles: every tile's
        placeholders after its tag (``tile_tags``), all inside the one <begin_of_image> ... <end_of_image>. The
        tags are tokenized alone; the special tokens around them cut the text there, so a one-pass tokenization
        of the whole prompt gives the same ids."""
        t, per_tile = self.tokens, self.config.image_placeholders_per_image
        out: list[int] = []
        k = 0
        for i in ids:
            if i == t.image:
                continue
            if i == t.image_end:
                if k == len(tiles):
                    raise ArgumentError(f"the prompt holds more image blocks than the {len(tiles)} image(s) given")
                for tag in tile_tags(tiles[k]):
                    out += [*self.tokenize(tag), *([t.image] * per_tile)]
                k += 1
            out.append(i)
        if k != len(tiles):
            raise ArgumentError(f"the prompt holds {k} image block(s) for {len(tiles)} image(s)")
        return out

    def dialogue(self, turns: list[str], system: str | None = None) -> list[Segment]:
        """User and assistant messages (user ones holding their image tags) -> segments: the prompt pieces
        (unsupervised, images expanded) and the replies (supervised, each ending with EOS; an empty one has no
        ids). Inference ends with an empty reply (the reply slot), training with the last answer."""
        system = self.system_prompt if system is None else system
        pieces = self.format.pieces(turns, system)
        out = []
        for i, piece in enumerate(pieces):
            ids = self.encode(piece) if i == 0 else self.tokenize(piece)
            out.append((self.expand_images(ids), i % 2 == 1))
        return out

    def question(self, question: str) -> list[int]:
        """A caption or question about one image, ending on the reply slot."""
        return self.dialogue([f"{IMAGE_TAG}\n{question}", ""])[0][0]

    def conversation(self, messages: Sequence) -> tuple[list[int], list]:
        """A chat (checked) -> (ids ending on the reply slot, its images in the order of their tags)."""
        checked = check_messages(messages)
        texts = [with_image_tags(m.content, len(m.images), f"message {i + 1}") for i, m in enumerate(checked)]
        images = [image for m in checked for image in m.images]
        ids = [i for segment, _ in self.dialogue([*texts, ""]) for i in segment]
        n_images = ids.count(self.tokens.image_end)
        if n_images != len(images):  # a tag inside a word, or an image tag in the system prompt
            raise ArgumentError(f"the prompt holds {n_images} image placeholder(s) after tokenization but the "
                                f"messages give {len(images)} image(s)")
        return ids, images

    def text(self, text: str) -> list[Segment]:
        """Plain text (the text task): BOS unsupervised, then every token and EOS supervised."""
        ids = self.tokenize(text)
        if not self.format.text_bos:  # an LLM without a BOS (Qwen): its first token is the context
            return [(ids[:1], False), ([*ids[1:], self.tokens.eos] if ids else [], True)]
        return [([self.tokens.bos], False), ([*ids, self.tokens.eos] if ids else [], True)]

    def generation(self, prompt: str) -> list[int]:
        """A text-to-image prompt, ending with <begin_of_image>."""
        return self.encode(self.format.generation(prompt))

    def unconditional(self, ids: list[int]) -> list[int]:
        """The CFG row of a generation prompt (``unconditional_ids``)."""
        return unconditional_ids(ids, self.tokens.cfg_pad)

    def edit(self, instruction: str, drop: str | None = None) -> list[int]:
        """An edit prompt (the source's placeholders, then the instruction), or with ``drop`` one of its
        unconditional rows (``CFG_DROPS``); the checkpoint's source-code slots at the end."""
        ids = self.expand_images(self.generation(f"{IMAGE_TAG}\n{instruction}"))
        if drop is not None:
            ids = drop_ids(ids, drop, self.tokens)
        return ids + [self.tokens.pad] * source_slots(self.config)
