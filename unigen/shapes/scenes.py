"""Shapes scenes (v2, docs/shapes-world.md): 1-4 objects on a canvas of 64-256 px a side, their captions.

The canvas is cut into a 3 x 3 grid of equal cells; each object sits in its own cell, its box centre within 4 px
of the cell centre (the v1 centres 11, 32, 53 on a 64 px side: round(L / 6), L / 2, L - round(L / 6)), inside the
canvas, and any two objects' lit boxes keep at least 2 empty pixels between them (drawn again until they do).
Objects are drawn in the spec's whole range (``render.draw_in_spec_range``); sizes stay absolute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from unigen.shapes.captions import parse_caption
from unigen.shapes.render import draw_in_spec_range, jittered_color
from unigen.shapes.world import COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, caption

CANVAS_SIDES = (64, 128, 192, 256)
MAX_OBJECTS = 4
GAP = 2  # empty pixels at least between two objects' lit boxes
READING_ORDER = tuple(POSITIONS)  # top left, top, top right, left, ... bottom right
_ROW_COL = {name: divmod(i, 3) for i, name in enumerate(READING_ORDER)}


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[ShapeSpec, ...]  # complete specs, positions distinct, in reading order

    def __post_init__(self):
        if self.width not in CANVAS_SIDES or self.height not in CANVAS_SIDES:
            raise ValueError(f"canvas {self.width}x{self.height}: each side must be one of {CANVAS_SIDES}")
        if not 1 <= len(self.objects) <= MAX_OBJECTS or not all(o.complete for o in self.objects):
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} complete objects, got {self.objects}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"one object per cell, got positions {positions}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: _ROW_COL[o.position])))

    @property
    def caption(self) -> str:
        return scene_caption(self.objects)


@dataclass(frozen=True)
class RenderedScene:
    image: np.ndarray  # (height, width, 3) uint8
    scene: Scene
    bboxes: tuple[tuple[int, int, int, int], ...]  # lit pixels x0, y0, x1, y1 inclusive, per object (scene order)
    boxes: tuple[tuple[float, float, float, float], ...]  # geometric boxes x1, y1, x2, y2 (continuous)


def cell_centre(position: str, width: int, height: int) -> tuple[float, float]:
    """Centre of the named cell on a ``width`` x ``height`` canvas (v1's centres on 64 x 64)."""
    row, col = _ROW_COL[position]
    at = lambda i, n: (round(n / 6), n / 2, n - round(n / 6))[i]  # noqa: E731
    return at(col, width), at(row, height)


def scene_caption(objects) -> str:
    """v1 captions of the objects in reading order, joined by ``, `` with `` and `` before the last."""
    texts = [caption(o) for o in sorted(objects, key=lambda o: _ROW_COL[o.position])]
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def parse_scene_caption(text: str) -> list[ShapeSpec]:
    """The objects a scene caption names: it is split at ``,`` / `` and `` before each ``a``/``an``/``one``, and
    each part read by v1's lenient parser (attributes it does not name are None)."""
    parts = re.split(r"\s*(?:,\s*(?:and\s+)?|\band\s+)(?=(?:a|an|one)\b)", text.strip().lower())
    return [parse_caption(p) for p in parts if p.strip()]


def caption_correct(text: str, scene: Scene) -> bool:
    """Whether the set of (size, color, shape, position) ``text`` names is exactly the scene's."""
    named = parse_scene_caption(text)
    return len(named) == len(scene.objects) and set(named) == set(scene.objects)


def feasible(scene: Scene) -> bool:
    """Whether the spec's placement can keep every two objects apart: on some axis where their cells differ, the
    cell centres are far enough for their smallest extents, the gap and the 4 px offsets (two large objects in
    neighbouring cells of a 64 px side are not; such scenes are never sampled, and a renderer refuses them)."""
    centres = [cell_centre(o.position, scene.width, scene.height) for o in scene.objects]
    for i, a in enumerate(scene.objects):
        for j in range(i + 1, len(scene.objects)):
            need = (SIZES[a.size][0] + SIZES[scene.objects[j].size][0]) / 2 + GAP + 1 - _SPREAD
            if not any(abs(centres[i][k] - centres[j][k]) >= need for k in (0, 1)):
                return False
    return True


_SPREAD = 2  # px of the 2 x 4 px offsets a pair may need: more would make rows of three on a 64 px side near-impossible


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return b[0] - a[2] - 1 >= GAP or a[0] - b[2] - 1 >= GAP or b[1] - a[3] - 1 >= GAP or a[1] - b[3] - 1 >= GAP


def render_scene(scene: Scene, seed=0, *, color_jitter: bool = True, max_draws: int = 1000) -> RenderedScene:
    """Draw ``scene``: every object as the spec places it, all drawn again until every two keep GAP apart."""
    if not feasible(scene):
        raise ValueError(f"{scene}: objects in neighbouring cells are too large to keep {GAP} px apart on this canvas")
    rng = np.random.default_rng(seed)
    canvas = (scene.width, scene.height)
    for _ in range(max_draws):
        drawn = [draw_in_spec_range(o.shape, o.size, cell_centre(o.position, *canvas), canvas,
                                    jittered_color(o.color, rng, color_jitter), rng) for o in scene.objects]
        if all(_apart(a.bbox, b.bbox) for i, a in enumerate(drawn) for b in drawn[i + 1:]):
            image = np.max([d.image for d in drawn], axis=0)
            return RenderedScene(image, scene, tuple(d.bbox for d in drawn), tuple(d.box for d in drawn))
    raise RuntimeError(f"no placement of {scene} keeps its objects {GAP} px apart in {max_draws} draws")


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, width: int | None = None,
                 height: int | None = None, objects: list[ShapeSpec] | None = None) -> Scene:
    """A scene drawn uniformly: canvas sides, the number of objects, their cells and attributes; given ``objects``
    (specs whose position may be None) fill in only what they leave open."""
    width = width or CANVAS_SIDES[rng.integers(len(CANVAS_SIDES))]
    height = height or CANVAS_SIDES[rng.integers(len(CANVAS_SIDES))]
    if objects is None:
        objects = [ShapeSpec() for _ in range(n_objects or int(rng.integers(1, MAX_OBJECTS + 1)))]
    taken = {o.position for o in objects if o.position}
    free = [p for p in READING_ORDER if p not in taken]
    pick = lambda values: values[int(rng.integers(len(values)))]  # noqa: E731
    for _ in range(1000):
        cells = iter(rng.permutation(free).tolist())
        specs = [ShapeSpec(o.color or pick(tuple(COLORS)), o.shape or pick(SHAPES), o.size or pick(tuple(SIZES)),
                           o.position or next(cells)) for o in objects]
        scene = Scene(int(width), int(height), tuple(specs))
        if feasible(scene):
            return scene
    raise ValueError(f"no feasible scene of {objects} on {width}x{height}")
