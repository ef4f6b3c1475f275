"""The six prompt categories of Shapes scenes (v2, the GenEval analogue): prompts, a right scene for each, judges.

| category | prompt | right when the checker finds |
| single_object | ``a {size} {color} {shape} at the {position}`` | exactly one object, all four attributes right |
| two_objects | ``a {shape} and a {shape}`` | exactly two objects, of those shapes |
| counting | ``{two,three,four} {color} {shape}s`` | exactly that many, all of that color and shape |
| colors | ``a {color} {shape}`` | exactly one object, of that color and shape |
| relation | ``a {color} {shape} {left of, right of, above, below} a {color} {shape}`` | exactly two with those
  colors and shapes, the first's box centre at least 8 px left of (right of, above, below) the second's |
| color_attribution | ``a {color} {shape} and a {color} {shape}`` (two colors) | exactly two, each its own |
Scene fidelity is the mean of the six accuracies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from unigen.shapes.scenes import READING_ORDER, Scene, sample_scene
from unigen.shapes.world import COLORS, SHAPES, SIZES, ShapeSpec, caption

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "relation", "color_attribution")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # axis, sign
RELATION_MARGIN = 8  # px between the two box centres on the relation's axis
_ROW_COL = {name: divmod(i, 3) for i, name in enumerate(READING_ORDER)}


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str
    objects: tuple[ShapeSpec, ...]  # what must be there (attributes the prompt does not name are None)
    relation: str | None = None  # relation prompts: objects[0] {relation} objects[1]


def _pick(rng: np.random.Generator, values):
    values = tuple(values)
    return values[int(rng.integers(len(values)))]


def sample_prompt(category: str, rng: np.random.Generator) -> Prompt:
    color, shape = lambda: _pick(rng, COLORS), lambda: _pick(rng, SHAPES)  # noqa: E731
    if category == "single_object":
        spec = ShapeSpec(color(), shape(), _pick(rng, SIZES), _pick(rng, READING_ORDER))
        return Prompt(category, caption(spec), (spec,))
    if category == "two_objects":
        a, b = ShapeSpec(shape=shape()), ShapeSpec(shape=shape())
        return Prompt(category, f"a {a.shape} and a {b.shape}", (a, b))
    if category == "counting":
        n, spec = int(rng.integers(2, 5)), ShapeSpec(color(), shape())
        return Prompt(category, f"{COUNT_WORDS[n]} {spec.color} {spec.shape}s", (spec,) * n)
    if category == "colors":
        spec = ShapeSpec(color(), shape())
        return Prompt(category, f"a {spec.color} {spec.shape}", (spec,))
    if category == "relation":
        a, b, relation = ShapeSpec(color(), shape()), ShapeSpec(color(), shape()), _pick(rng, RELATIONS)
        return Prompt(category, f"a {a.color} {a.shape} {relation} a {b.color} {b.shape}", (a, b), relation)
    if category == "color_attribution":
        first, second = rng.choice(len(COLORS), size=2, replace=False)
        a, b = ShapeSpec(tuple(COLORS)[int(first)], shape()), ShapeSpec(tuple(COLORS)[int(second)], shape())
        return Prompt(category, f"a {a.color} {a.shape} and a {b.color} {b.shape}", (a, b))
    raise ValueError(f"unknown category {category!r}; known: {list(CATEGORIES)}")


def sample_prompts(category: str, n: int, seed: int) -> list[Prompt]:
    """``n`` prompts of ``category``, the same for the same seed (the spec: at least 100 each)."""
    rng = np.random.default_rng([seed, CATEGORIES.index(category) if category in CATEGORIES else -1])
    return [sample_prompt(category, rng) for _ in range(n)]


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    axis, sign = RELATIONS[relation]
    return sign * (a[axis] - b[axis]) >= RELATION_MARGIN


def _is(found: ShapeSpec, wanted: ShapeSpec) -> bool:
    """Every attribute ``wanted`` names is ``found``'s."""
    return all(getattr(wanted, k) is None or getattr(wanted, k) == getattr(found, k) for k in
               ("color", "shape", "size", "position"))


def judge(prompt: Prompt, found: list[ShapeSpec], centres: list[tuple[float, float]] | None = None) -> bool:
    """Whether the objects a checker found (their specs, and box centres in px for relations) answer ``prompt``:
    exactly as many objects as it names, matched one to one."""
    if len(found) != len(prompt.objects):
        return False
    for order in itertools.permutations(range(len(found))):
        if all(_is(found[i], wanted) for i, wanted in zip(order, prompt.objects)):
            if prompt.relation is None or _relation_holds(prompt.relation, centres[order[0]], centres[order[1]]):
                return True
    return False


def scene_for(prompt: Prompt, rng: np.random.Generator, width: int | None = None,
              height: int | None = None) -> Scene:
    """A scene that answers ``prompt`` right (what the training data draws for a generation prompt): the unnamed
    attributes drawn, a relation's two objects in cells that put it beyond doubt."""
    objects = list(prompt.objects)
    if prompt.relation is not None:
        axis, sign = RELATIONS[prompt.relation]
        index = 1 - axis  # a cell is (row, column): x is the column
        cells = list(itertools.product(range(3), repeat=2))
        pairs = [(p, q) for p in cells for q in cells if sign * (p[index] - q[index]) >= 1]
        first, second = pairs[int(rng.integers(len(pairs)))]
        name = {v: k for k, v in _ROW_COL.items()}
        objects = [ShapeSpec(objects[0].color, objects[0].shape, position=name[first]),
                   ShapeSpec(objects[1].color, objects[1].shape, position=name[second])]
    return sample_scene(rng, width=width, height=height, objects=objects)
