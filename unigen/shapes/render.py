"""Deterministic-by-seed renderer for the Shapes world.

Every object has a square bounding box of side ``s`` pixels (``s`` in the size's range). Its pixels are
exactly columns x0..x0+s-1 and rows y0..y0+s-1: anything outside is pure black, and every extreme row and
column holds some colour, with or without anti-aliasing. The bbox centre (x0 + s/2, y0 + s/2) lies within
4 px per axis of the nominal cell centre (the spec's +-3 cell jitter and 4 px tolerance are read as one
offset of at most 4 px, so an image is right under either reading), and the object stays inside the canvas.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from unigen.shapes.world import CANVAS, CENTER_TOLERANCE, COLOR_JITTER, COLORS, POSITIONS, SIZES, ShapeSpec

SUPERSAMPLE = 4  # anti-aliasing: draw at 4x, then average 4x4 blocks (exact pixel coverage up to 1/16)


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # (64, 64, 3) uint8
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1: pixel indices, inclusive
    rgb: tuple[int, int, int]  # fill colour after jitter

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
           color_jitter: bool = True) -> Rendered:
    """Render ``spec`` on a black 64x64 canvas; the same (spec, seed, options) gives the same pixels."""
    if not spec.complete:
        raise ValueError(f"cannot render an incomplete spec: {spec}")
    rng = np.random.default_rng(seed)
    options = placements(spec.size, spec.position)
    side, xs, ys = options[rng.integers(len(options))]
    x0, y0 = int(xs[rng.integers(len(xs))]), int(ys[rng.integers(len(ys))])
    rgb = np.array(COLORS[spec.color], dtype=np.int64)
    if color_jitter:
        rgb = np.clip(rgb + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    return draw_object(spec.shape, side, x0, y0, rgb, antialias)


def draw_object(shape: str, side: int, x0: int, y0: int, rgb, antialias: bool = True) -> Rendered:
    """One object of ``shape`` with bounding box side ``side`` at (x0, y0), filled with ``rgb``."""
    rgb = np.asarray(rgb, dtype=np.int64)
    cov = coverage(shape, x0, y0, side, antialias)
    image = np.rint(cov[..., None] * rgb).astype(np.uint8)
    return Rendered(image, (x0, y0, x0 + side - 1, y0 + side - 1), tuple(int(c) for c in rgb))


def render_image(spec: ShapeSpec, seed: int | Sequence[int] = 0, **options) -> Image.Image:
    return render(spec, seed, **options).pil()
