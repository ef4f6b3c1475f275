"""Conversations: ``[{"role": "user" | "assistant", "content": str, "images": [...]}, ...]`` -> one prompt in
the checkpoint's own format, built as DeepSeek's ``VLChatProcessor`` builds it.

DeepSeek's processor takes the images' places from ``<image_placeholder>`` tags that the user writes into
the content (``"<image_placeholder> is Figure 1.\\n<image_placeholder> is Figure 2.\\nWhich ..."``), renders
the turns with the "deepseek" template (``PromptFormat.render``), tokenizes once and expands each tag into
``<begin_of_image>`` + placeholders + ``<end_of_image>``. Here a message's ``images`` fill its tags in
order; a message with images and no tag gets one tag per image in front of its text, each followed by a
newline, as DeepSeek's examples write them (``"<image_placeholder>\\nDescribe it."``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from unigen.errors import ArgumentError
from unigen.processor import IMAGE_TAG, PromptFormat, check_text

ROLES = ("user", "assistant")


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


def with_image_tags(message: Message, i: int) -> str:
    """The message's text with one ``<image_placeholder>`` per image (added in front when it has none)."""
    tags = message.content.count(IMAGE_TAG)
    if tags == 0:
        return "".join(f"{IMAGE_TAG}\n" for _ in message.images) + message.content
    if tags != len(message.images):
        raise ArgumentError(f"message {i + 1} has {tags} {IMAGE_TAG} tag(s) but {len(message.images)} image(s); "
                            "give one image per tag, or no tags (then each image goes in front of the text)")
    return message.content


def conversation_prompt(messages: Sequence, fmt: PromptFormat, system: str | None) -> tuple[str, list]:
    """(prompt text ending with the assistant's empty reply slot, the images in the order of their tags)."""
    checked = check_messages(messages)
    texts = [with_image_tags(m, i) for i, m in enumerate(checked)]
    images = [image for m in checked for image in m.images]
    return fmt.render([*texts, ""], system), images
