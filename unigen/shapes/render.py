"""Deterministic-by-seed renderer for the Shapes world, in two styles.

``style="spec"`` draws the spec's whole range: continuous geometry at any sub-pixel place (bbox centre within
4 px of the cell centre), any extent in the size's range, triangles whose width and height differ, and edges
from hard (1 sample a pixel) to finely anti-aliased (up to 8 x 8 samples). The training data uses it, so that a
model meets what any renderer that follows the spec may draw.

``style="classic"`` is the look the shipped checkpoints were trained on and their README scores are measured on
(``evaluate`` renders with it): every object has a square bounding box of side ``s`` pixels (``s`` in the
size's range). Its pixels are exactly columns x0..x0+s-1 and rows y0..y0+s-1: anything outside is pure black,
and every extreme row and column holds some colour, with or without anti-aliasing. The bbox centre
(x0 + s/2, y0 + s/2) lies within 4 px per axis of the nominal cell centre (the spec's +-3 cell jitter and 4 px
tolerance are read as one offset of at most 4 px, so an image is right under either reading), and the object
stays inside the canvas.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from unigen.shapes import geometry
from unigen.shapes.world import CANVAS, CENTER_TOLERANCE, COLOR_JITTER, COLORS, POSITIONS, SIZES, ShapeSpec

SUPERSAMPLE = 4  # classic anti-aliasing: draw at 4x, then average 4x4 blocks (exact pixel coverage up to 1/16)
STYLES = ("spec", "classic")
SPEC_SAMPLES = (1, 2, 3, 4, 8)  # samples per pixel side of the spec style: hard edges .. fine anti-aliasing
# The lit pixels of a shape span its extent give or take one, so the drawn extent keeps 0.5 px inside the size's
# range and the centre 0.5 px inside the tolerance; the lit box is then checked against the spec, and redrawn.
_EXTENT_MARGIN, _CENTRE_MARGIN = 0.5, 0.5


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # (64, 64, 3) uint8
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1: pixel indices of the lit pixels, inclusive
    rgb: tuple[int, int, int]  # fill colour after jitter
    box: tuple[float, float, float, float] | None = None  # the geometric box x1, y1, x2, y2 (continuous)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")


@functools.cache
def placements(size: str, position: str) -> tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]:
    """(side, allowed x0, allowed y0) for every side of ``size`` that fits at ``position``.

    Large objects in an edge row or column are at most 30 px: centre <= 11 + 4 = 15 px from the edge.
    """
    cx, cy = POSITIONS[position]
    lo, hi = SIZES[size]
    out = []
    for s in range(lo, hi + 1):
        xs = tuple(x for x in range(CANVAS - s + 1) if abs(x + s / 2 - cx) <= CENTER_TOLERANCE)
        ys = tuple(y for y in range(CANVAS - s + 1) if abs(y + s / 2 - cy) <= CENTER_TOLERANCE)
        if xs and ys:
            out.append((s, xs, ys))
    return tuple(out)


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, n: int) -> None:
    """Fill ``shape`` over pixels x0..x0+n-1, y0..y0+n-1 (PIL draws both ends of each coordinate).

    Tips are 2 px wide when n is even so that triangle and diamond stay symmetric on the pixel grid.
    """
    x1, y1 = x0 + n - 1, y0 + n - 1
    ml, mr = x0 + (n - 1) // 2, x0 + n // 2  # middle column(s)
    mt, mb = y0 + (n - 1) // 2, y0 + n // 2  # middle row(s)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":  # apex up, isosceles, base on the bottom row
        draw.polygon([(ml, y0), (mr, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":  # square rotated 45 degrees; its extent is the bbox
        points = [(ml, y0), (mr, y0), (x1, mt), (x1, mb), (mr, y1), (ml, y1), (x0, mb), (x0, mt)]
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, x0: int, y0: int, side: int, antialias: bool = True) -> np.ndarray:
    """(64, 64) float32 in [0, 1]: how much of each pixel the object covers."""
    k = SUPERSAMPLE if antialias else 1
    mask = Image.new("L", (side * k, side * k), 0)  # only the bbox is drawn, then pasted
    _draw(ImageDraw.Draw(mask), shape, 0, 0, side * k)
    patch = np.asarray(mask, dtype=np.float32) / 255.0
    if k > 1:
        patch = patch.reshape(side, k, side, k).mean(axis=(1, 3))
    cov = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    cov[y0:y0 + side, x0:x0 + side] = patch
    return cov


def render(spec: ShapeSpec, seed: int | Sequence[int] = 0, *, antialias: bool = True,
           color_jitter: bool = True, style: str = "classic") -> Rendered:
    """Render ``spec`` on a black 64x64 canvas; the same (spec, seed, options) gives the same pixels.
    ``antialias`` applies to the classic style (the spec style draws its own edges)."""
    if not spec.complete:
        raise ValueError(f"cannot render an incomplete spec: {spec}")
    if style not in STYLES:
        raise ValueError(f"unknown render style {style!r}; known: {list(STYLES)}")
    rng = np.random.default_rng(seed)
    if style == "spec":
        rgb = jittered_color(spec.color, rng, color_jitter)
        return draw_in_spec_range(spec.shape, spec.size, POSITIONS[spec.position], (CANVAS, CANVAS), rgb, rng)
    options = placements(spec.size, spec.position)
    side, xs, ys = options[rng.integers(len(options))]
    x0, y0 = int(xs[rng.integers(len(xs))]), int(ys[rng.integers(len(ys))])
    return draw_object(spec.shape, side, x0, y0, jittered_color(spec.color, rng, color_jitter), antialias)


def jittered_color(color: str, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
    """The palette RGB of ``color``, each channel moved by up to the spec's +-12 when ``jitter``."""
    rgb = np.array(COLORS[color], dtype=np.int64)
    if jitter:
        rgb = np.clip(rgb + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    return rgb


def _extent_and_centre(rng: np.random.Generator, size: str, cell: float, length: int) -> tuple[float, float]:
    """A drawn extent in the size's range and a bbox centre near ``cell`` that keeps it inside [0, length]."""
    lo, hi = SIZES[size]
    room = min(cell, length - cell) + CENTER_TOLERANCE - _CENTRE_MARGIN
    extent = rng.uniform(lo + _EXTENT_MARGIN, min(hi - _EXTENT_MARGIN, 2 * room))
    tol = CENTER_TOLERANCE - _CENTRE_MARGIN
    return extent, cell + rng.uniform(max(-tol, extent / 2 - cell), min(tol, length - cell - extent / 2))


def lit_box_follows_spec(bbox: tuple[int, int, int, int], size: str, cell: tuple[float, float],
                         canvas: tuple[int, int]) -> bool:
    """Whether lit pixels x0..x1, y0..y1 make a box of ``size`` centred within 4 px of ``cell`` on the canvas."""
    x0, y0, x1, y1 = bbox
    lo, hi = SIZES[size]
    inside = x0 >= 0 and y0 >= 0 and x1 < canvas[0] and y1 < canvas[1]
    sizes = all(lo <= n <= hi for n in (x1 - x0 + 1, y1 - y0 + 1))
    near = abs((x0 + x1 + 1) / 2 - cell[0]) <= CENTER_TOLERANCE and abs((y0 + y1 + 1) / 2 - cell[1]) <= CENTER_TOLERANCE
    return inside and sizes and near


def draw_in_spec_range(shape: str, size: str, cell: tuple[float, float], canvas: tuple[int, int], rgb,
                       rng: np.random.Generator) -> Rendered:
    """One object anywhere the spec allows around ``cell`` on a black ``canvas`` (width, height): extent, sub-pixel
    centre, triangle aspect and anti-aliasing drawn from ``rng``; redrawn until its lit pixels follow the spec."""
    for _ in range(100):
        (w, cx), (h, cy) = _extent_and_centre(rng, size, cell[0], canvas[0]), _extent_and_centre(rng, size, cell[1],
                                                                                               canvas[1])
        if shape != "triangle":  # the others have square boxes; the smaller extent keeps both centres valid
            w = h = min(w, h)
        samples = SPEC_SAMPLES[rng.integers(len(SPEC_SAMPLES))]
        cov = geometry.coverage(shape, cx, cy, w, h, canvas[0], canvas[1], samples)
        rows, cols = np.flatnonzero(cov.any(1)), np.flatnonzero(cov.any(0))
        bbox = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
        if lit_box_follows_spec(bbox, size, cell, canvas):
            rgb = np.asarray(rgb, dtype=np.int64)
            image = np.rint(cov[..., None] * rgb).astype(np.uint8)
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            return Rendered(image, bbox, tuple(int(c) for c in rgb), box)
    raise RuntimeError(f"no placement of a {size} {shape} at {cell} on {canvas} in 100 draws")  # never seen


def draw_object(shape: str, side: int, x0: int, y0: int, rgb, antialias: bool = True) -> Rendered:
    """One object of ``shape`` with bounding box side ``side`` at (x0, y0), filled with ``rgb``."""
    rgb = np.asarray(rgb, dtype=np.int64)
    cov = coverage(shape, x0, y0, side, antialias)
    image = np.rint(cov[..., None] * rgb).astype(np.uint8)
    box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
    return Rendered(image, (x0, y0, x0 + side - 1, y0 + side - 1), tuple(int(c) for c in rgb), box)


def render_image(spec: ShapeSpec, seed: int | Sequence[int] = 0, **options) -> Image.Image:
    return render(spec, seed, **options).pil()
