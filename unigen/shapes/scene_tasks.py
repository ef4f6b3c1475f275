"""The box tasks of Shapes scenes (v2, docs/shapes-world.md "Boxes"): grounding, referring and placed generation,
their items, texts, right answers and judges.

| task | asks | right when |
| grounding | an image and ``where is the {color} {shape}?`` (no other object of that color and shape) | the answer's
  box has IoU >= 0.5 with the object's |
| referring | an image and ``what is at [x1, y1, x2, y2]?`` | the answer names one object, with the object's size,
  color and shape (a position, if named, is not judged) |
| placed | ``a {size} {color} {shape} in [x1, y1, x2, y2]``, several joined by `` and `` | the checker finds exactly
  the named objects, each with its size, color and shape and IoU >= 0.5 with its box |

Items are drawn per category: the number of objects in the scene (1 to 4; for placed, in the prompt), so each
category holds the same number of items and their mean is the task's score. The true boxes are the rendered
objects' geometric boxes, in 0-1000 text (``boxes``); a placed prompt's boxes come from a render on the canvas the
model draws, so every prompt can be drawn as asked.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from unigen.prompts import grounding_question, placed_prompt, referring_question
from unigen.shapes.boxes import box_text, iou, parse_box, to_box
from unigen.shapes.scene_checker import SceneReading
from unigen.shapes.scenes import (
    CANVAS_SIDES,
    MAX_OBJECTS,
    RenderedScene,
    parse_scene_caption,
    render_scene,
    sample_scene,
)
from unigen.shapes.world import ShapeSpec

TASKS = ("grounding", "referring", "placed")
GROUPS = tuple(f"{k} object{'s' if k > 1 else ''}" for k in range(1, MAX_OBJECTS + 1))  # the per-category keys
IOU_MIN = 0.5
PLACED_CANVAS = 64  # the side of the canvas placed prompts are drawn on: the Shapes models draw 64 x 64


@dataclass(frozen=True)
class BoxItem:
    task: str
    rendered: RenderedScene  # the scene asked about; for placed, a right answer
    target: int  # the object asked about (grounding, referring); -1 for placed (every object)
    text: str  # the question, or the placed prompt

    @property
    def group(self) -> str:
        return GROUPS[len(self.rendered.scene.objects) - 1]

    def box(self, i: int) -> tuple[int, int, int, int]:
        """Object ``i``'s true box in the 0-1000 form."""
        return object_box(self.rendered, i)

    @property
    def spec(self) -> ShapeSpec:
        return self.rendered.scene.objects[self.target]

    @property
    def answer(self) -> str | None:
        """The right answer's text (placed: None, its right answer is ``rendered.image``)."""
        if self.task == "grounding":
            return box_text(self.box(self.target))
        return describe(self.spec) if self.task == "referring" else None


def object_box(rendered: RenderedScene, i: int) -> tuple[int, int, int, int]:
    """Object ``i``'s geometric box in the 0-1000 form of its canvas."""
    return to_box(rendered.boxes[i], rendered.scene.width, rendered.scene.height)


def describe(spec: ShapeSpec) -> str:
    """``a {size} {color} {shape}``: a referring answer, and an object of a placed prompt."""
    return f"a {spec.size} {spec.color} {spec.shape}"


def _canvas(rng: np.random.Generator, canvas: tuple[int, int] | None) -> tuple[int, int]:
    if canvas is not None:
        return canvas
    return tuple(int(CANVAS_SIDES[i]) for i in rng.integers(len(CANVAS_SIDES), size=2))


def sample_item(task: str, rng: np.random.Generator, n_objects: int, canvas: tuple[int, int] | None = None) -> BoxItem:
    """One item of ``task`` with ``n_objects`` objects: a scene on ``canvas`` (None: sides drawn from the spec's;
    placed: PLACED_CANVAS square), rendered, and its question or prompt."""
    if task == "placed":
        scene = sample_scene(rng, n_objects, *(canvas or (PLACED_CANVAS, PLACED_CANVAS)))
        rendered = render_scene(scene, seed=rng)
        text = placed_prompt([(describe(o), box_text(object_box(rendered, i))) for i, o in enumerate(scene.objects)])
        return BoxItem(task, rendered, -1, text)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
    while True:
        scene = sample_scene(rng, n_objects, *_canvas(rng, canvas))
        kinds = Counter((o.color, o.shape) for o in scene.objects)
        # grounding names the object by color and shape: only one that no other object shares has one answer
        choices = [i for i, o in enumerate(scene.objects) if task == "referring" or kinds[o.color, o.shape] == 1]
        if choices:
            break
    target = choices[int(rng.integers(len(choices)))]
    rendered, spec = render_scene(scene, seed=rng), scene.objects[target]
    text = grounding_question(f"{spec.color} {spec.shape}") if task == "grounding" else \
        referring_question(box_text(object_box(rendered, target)))
    return BoxItem(task, rendered, target, text)


def sample_items(task: str, n: int, seed: int | list[int], canvas: tuple[int, int] | None = None) -> list[BoxItem]:
    """``n`` items of each category (1 to 4 objects), category by category, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [sample_item(task, rng, k, canvas) for k in range(1, MAX_OBJECTS + 1) for _ in range(n)]


# ---- judges ---------------------------------------------------------------------------------------------------


def grounding_right(answer: str, item: BoxItem) -> bool:
    box = parse_box(answer)
    return box is not None and iou(box, item.box(item.target)) >= IOU_MIN


def referring_right(answer: str, item: BoxItem) -> bool:
    named = parse_scene_caption(answer)
    truth = item.spec
    return len(named) == 1 and all(getattr(named[0], k) == getattr(truth, k) for k in ("size", "color", "shape"))


def placed_right(reading: SceneReading, item: BoxItem) -> bool:
    """Whether the checker's reading of a generated image holds exactly the prompt's objects, each matched one to
    one with its size, color and shape and IoU >= 0.5 with its asked box."""
    wanted = item.rendered.scene.objects
    if len(reading.objects) != len(wanted):
        return False
    same = lambda f, w: all(getattr(f, k) == getattr(w, k) for k in ("size", "color", "shape"))  # noqa: E731
    fits = [[same(reading.objects[j].spec, w) and iou(reading.box(j), item.box(i)) >= IOU_MIN
             for j in range(len(wanted))] for i, w in enumerate(wanted)]
    return any(all(fits[i][j] for i, j in enumerate(order)) for order in itertools.permutations(range(len(wanted))))
