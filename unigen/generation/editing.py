"""Image editing: a source image read through the understanding path + an instruction -> a new image.

The prompt is a generation prompt whose user turn holds the source's placeholders and the instruction,
in the checkpoint's own format (system prompt empty, as Janus's generation prompts):

    BOS <|User|>: <begin_of_image> <image_placeholder> x N <end_of_image> \\n make it blue \\n\\n
        <|Assistant|>: <begin_of_image>

and the target's VQ codes follow. The source enters through SigLIP; a checkpoint with
``edit_source_codes`` also reads the source's VQ codes, in slots after that final <begin_of_image>
(their ids are ``tokens.pad``; the model embeds the codes there), so the target's codes directly follow
the source's and each can copy the one an image-length back. Every row, conditional or not, holds the
source's codes: they are the canvas, and guidance measures the instruction and the SigLIP read against it.
Classifier-free guidance has three unconditional rows to choose from, all the length of the
conditional one so the image tokens sit at the same positions; like Janus's, each keeps BOS and the final
<begin_of_image> and turns the dropped part into the CFG pad token:

- ``instruction``: the instruction (and the role words) dropped, the source image kept;
- ``image``: the source's block dropped, the instruction kept;
- ``both``: everything dropped (Janus's text-to-image unconditional row, at this length).

The trainer trains all three (a dropped edit sample takes one at random); the sampler uses one
(``DEFAULT_CFG_DROP``, chosen by measurement: docs/EXPERIMENTS.md).
"""

from __future__ import annotations

from unigen.errors import ArgumentError
from unigen.processor import IMAGE_START_TAG, IMAGE_TAG, check_text

CFG_DROPS = ("instruction", "image", "both")
DEFAULT_CFG_DROP = "both"  # the best of the three on the Shapes editing checkpoint (docs/EXPERIMENTS.md)


def check_instruction(instruction, where: str = "the instruction") -> str:
    check_text(instruction, "instruction" if where == "the instruction" else f"instruction of {where}")
    if not instruction.strip():
        raise ArgumentError(f"{where} is empty; say what to change, e.g. 'make it blue'")
    return instruction


def check_drop(drop: str) -> str:
    if drop not in CFG_DROPS:
        raise ArgumentError(f"cfg_drop must be one of {list(CFG_DROPS)}, got {drop!r}")
    return drop


def source_slots(config) -> int:
    """How many source-code slots end an edit prompt of this checkpoint (0: it reads the source by SigLIP only)."""
    return config.vq.num_tokens if config.edit_source_codes else 0


def edit_prompt_ids(processor, instruction: str, drop: str | None = None) -> list[int]:
    """The edit prompt's ids (source placeholders expanded), or with ``drop`` one of its unconditional rows;
    the checkpoint's source-code slots (:func:`source_slots`) at the end."""
    text = processor.format.render([f"{IMAGE_TAG}\n{instruction}", ""], system="") + IMAGE_START_TAG
    ids = processor._expand_images(processor.encode(text))
    t = processor.tokens
    if drop is not None:
        ids = _drop(ids, drop, t)
    return ids + [t.pad] * source_slots(processor.config)


def _drop(ids: list[int], drop: str, t) -> list[int]:
    last = len(ids) - 1
    out = []
    for i, tok in enumerate(ids):
        keep = i == 0 or i == last  # BOS and the final <begin_of_image>
        in_image = tok in (t.image, t.image_end) or (tok == t.image_start and i != last)
        dropped = not keep and (drop == "both" or (drop == "image") == in_image)
        out.append(t.cfg_pad if dropped else tok)
    return out


def keeps_image(drop: str | None) -> bool:
    """Whether a row of this kind reads the source image (its placeholders are not dropped)."""
    return drop in (None, "instruction")
