"""Score a model on the box tasks of Shapes scenes (v2): grounding, referring and placed generation
(``scene_tasks``), ``n`` items per category (1 to 4 objects), a batch at a time.

Grounding and referring ask ``pipe.caption`` the item's question (greedy); placed generation draws one image per
prompt with the model's sampling options, read at its own size by ``scene_checker.read_scene``. Items come from
single-integer seeds ``seed + k * EVAL_SEED_OFFSET`` (k = 5, 6, 7), disjoint from the training data's streams
(``scene_data.TRAIN_TAG``) and from the other evaluations' items.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from unigen.generation.sampling_options import SamplingOptions
from unigen.shapes.evaluate import EVAL_SEED_OFFSET  # k = 1..4: captions, generation, edits, scenes
from unigen.shapes.scene_checker import read_scene
from unigen.shapes.scene_tasks import (
    GROUPS,
    TASKS,
    BoxItem,
    grounding_right,
    placed_right,
    referring_right,
    sample_items,
)

MAX_ANSWER_TOKENS = 32  # a box is 21 word-level tokens, a referring answer 4


def task_seed(task: str, seed: int) -> int:
    return seed + (5 + TASKS.index(task)) * EVAL_SEED_OFFSET


def _answers(pipe, task: str, batch: list[BoxItem], options: SamplingOptions, generator) -> list[tuple]:
    """(item, answer text or generated image, right) for each item of the batch."""
    if task == "placed":
        images = pipe([item.text for item in batch], options=options, generator=generator).images
        return [(item, image, placed_right(read_scene(image), item)) for item, image in zip(batch, images, strict=True)]
    images = [_pil(item.rendered.image) for item in batch]
    out = pipe.caption(images, question=[item.text for item in batch], max_new_tokens=MAX_ANSWER_TOKENS)
    texts = [out] if isinstance(out, str) else list(out)
    right = grounding_right if task == "grounding" else referring_right
    return [(item, text, right(text, item)) for item, text in zip(batch, texts, strict=True)]


def _pil(array):
    from PIL import Image

    return Image.fromarray(array)


def evaluate_box_task(pipe, task: str, n: int = 50, seed: int = 0, batch_size: int = 16,
                      canvas: tuple[int, int] | None = None, options: SamplingOptions | None = None,
                      keep: bool = True) -> tuple[dict, list[tuple]]:
    """``n`` items of each category of ``task``; returns ({"n", "per_category": {category: share}, "overall": their
    mean}, [(item, answer text or image, right)] if ``keep``). ``canvas``: the scenes' (width, height) for grounding
    and referring (None: drawn from the spec's sides), the prompts' canvas for placed (None: 64 x 64)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
    items = sample_items(task, n, task_seed(task, seed), canvas)
    options = options or SamplingOptions()
    generator = torch.Generator().manual_seed(seed)
    right = dict.fromkeys(GROUPS, 0)
    records = []
    for start in tqdm(range(0, len(items), batch_size), desc=task, unit="batch"):
        for item, answer, ok in _answers(pipe, task, items[start : start + batch_size], options, generator):
            right[item.group] += ok
            if keep:
                records.append((item, answer, ok))
    per_category = {group: count / n for group, count in right.items()}
    return {"n": n, "per_category": per_category, "overall": sum(per_category.values()) / len(GROUPS)}, records


def format_task_table(results: dict[str, dict]) -> str:
    """One markdown row per box task (``evaluate_box_task``'s result): n per category, the mean, each category."""
    header = ["", "n", "overall", *GROUPS]
    md = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    rows = [md([name, str(r["n"]), *(f"{100 * v:.1f}" for v in (r["overall"], *r["per_category"].values()))])
            for name, r in results.items()]
    return "\n".join([md(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|", *rows])
