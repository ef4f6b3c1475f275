"""Boxes as text (v2 grounding): ``[x1, y1, x2, y2]``, x over the canvas width and y over its height, times 1000,
rounded to integers. From pixels and back, and from COCO-style annotations to manifest lines.

A COCO box is ``[x, y, w, h]`` in pixels of an image ``width`` x ``height``; :func:`coco_grounding_lines` turns a
COCO-style dict (``images``, ``annotations``, ``categories``) into conversation lines that ``unigen train`` reads
as it reads question lines: ``where is the {name}?`` -> the box, for each category found once in its image (a
question with two right answers teaches nothing), and ``what is at [..]?`` -> the name.
"""

from __future__ import annotations

import re
from collections import Counter

from unigen.prompts import grounding_question, referring_question

SCALE = 1000
_BOX = re.compile(r"\[\s*(\d[\d ]*)\s*,\s*(\d[\d ]*)\s*,\s*(\d[\d ]*)\s*,\s*(\d[\d ]*)\s*\]")


def to_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box x1, y1, x2, y2 (continuous: a pixel i spans [i, i + 1)) -> the 0-1000 integers."""
    x1, y1, x2, y2 = box
    return (round(SCALE * x1 / width), round(SCALE * y1 / height), round(SCALE * x2 / width),
            round(SCALE * y2 / height))


def from_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """The 0-1000 integers -> pixel box (continuous); exact back to whole pixels on canvases up to 1000 px."""
    x1, y1, x2, y2 = box
    return x1 * width / SCALE, y1 * height / SCALE, x2 * width / SCALE, y2 * height / SCALE


def box_text(box: tuple[int, int, int, int]) -> str:
    for v in box:
        if not 0 <= v <= SCALE:
            raise ValueError(f"box {box}: values must be 0..{SCALE}")
    return "[{}, {}, {}, {}]".format(*box)


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    """The first ``[x1, y1, x2, y2]`` in ``text``, or None. Spaces between digits are ignored: a word-level
    tokenizer writes each digit as a word, so its decoded ``[1 2 5, ...]`` is 125."""
    match = _BOX.search(text)
    if match is None:
        return None
    values = tuple(int(v.replace(" ", "")) for v in match.groups())
    return values if all(v <= SCALE for v in values) else None


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two boxes x1, y1, x2, y2 (any units, the same for both)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def coco_box_text(bbox: tuple[float, float, float, float], width: int, height: int) -> str:
    """A COCO ``[x, y, w, h]`` pixel box -> ``[x1, y1, x2, y2]`` text, clipped to the image."""
    x, y, w, h = bbox
    clip = lambda v, n: min(max(v, 0.0), float(n))  # noqa: E731
    return box_text(to_box((clip(x, width), clip(y, height), clip(x + w, width), clip(y + h, height)), width, height))


def coco_grounding_lines(coco: dict) -> list[dict]:
    """Manifest lines (``{"image", "conversations"}``) from a COCO-style dict: per annotation whose category is
    the only one of its kind in its image, a grounding and a referring exchange."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    counts = Counter((a["image_id"], a["category_id"]) for a in coco["annotations"])
    lines = []
    for a in coco["annotations"]:
        if counts[a["image_id"], a["category_id"]] != 1:
            continue
        image = images[a["image_id"]]
        box = coco_box_text(a["bbox"], image["width"], image["height"])
        name = names[a["category_id"]]
        for question, answer in ((grounding_question(name), box), (referring_question(box), name)):
            lines.append(question_line(image["file_name"], question, answer))
    return lines


def question_line(image: str, question: str, answer: str) -> dict:
    """A manifest line of one question about ``image`` and its answer (LLaVA style: understanding only)."""
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]}
