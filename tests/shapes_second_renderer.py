"""A second Shapes renderer, written from the spec alone (docs/shapes-world.md) and sharing no code with
unigen.shapes: PIL draws each object in RGB on a canvas ``factor`` times larger (3, 5 or 6), and the canvas is
shrunk with a box, bilinear or Hamming filter. So its edges differ from unigen's (PIL's polygon and ellipse
rasterisation, other filters), its placements too (a jittered cell centre plus a small offset, ellipse-drawn
circles), and a checker tested on it is tested on what a user's own renderer may draw.

It draws v1 images (one object on 64 x 64) and v2 scenes (1-4 objects on any canvas of 64-256 a side, one per
cell, boxes 2 px apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 200), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (235, 235, 235)}
EXTENTS = {"small": (14, 18), "large": (28, 34)}
ROWS, COLS = ("top", "", "bottom"), ("left", "", "right")
FACTORS = (3, 5, 6)
FILTERS = (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.HAMMING)


@dataclass(frozen=True)
class Drawn:
    color: str
    shape: str
    size: str
    position: str
    box: tuple[float, float, float, float]  # geometric x1, y1, x2, y2 in canvas pixels


def cell_name(row: int, col: int) -> str:
    words = " ".join(w for w in (ROWS[row], COLS[col]) if w)
    return words or "center"


def cell_centre(index: int, length: int) -> float:
    """Centre of the grid's cell ``index`` (0-2) on a side of ``length``; 11, 32, 53 on 64 as v1 says."""
    return (round(length / 6), length / 2, length - round(length / 6))[index]


def _extent_and_centre(rng: np.random.Generator, size: str, centre: float, length: int) -> tuple[float, float]:
    """An extent in the size's range that fits within 3.9 px of ``centre``; the jittered centre clamped inside."""
    lo, hi = EXTENTS[size]
    extent = rng.uniform(lo + 0.5, min(hi - 1, 2 * (min(centre, length - centre) + 3.9)))
    middle = centre + rng.uniform(-3, 3) + rng.uniform(-0.9, 0.9)  # a jittered cell centre, then the box's offset
    return extent, float(np.clip(middle, extent / 2, length - extent / 2))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], factor: int, fill) -> None:
    x1, y1, x2, y2 = (v * factor for v in box)
    mx = (x1 + x2) / 2
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(mx, y1), (x2, y2), (x1, y2)], fill=fill)
    else:
        my = (y1 + y2) / 2
        draw.polygon([(mx, y1), (x2, my), (mx, y2), (x1, my)], fill=fill)


def _place(rng: np.random.Generator, shape: str, size: str, row: int, col: int, width: int, height: int):
    w, cx = _extent_and_centre(rng, size, cell_centre(col, width), width)
    h, cy = _extent_and_centre(rng, size, cell_centre(row, height), height)
    if shape != "triangle":
        w = h = min(w, h)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _apart(a, b, gap: float = 2.0) -> bool:
    return a[2] + gap + 1 <= b[0] or b[2] + gap + 1 <= a[0] or a[3] + gap + 1 <= b[1] or b[3] + gap + 1 <= a[1]


def draw_scene(objects: list[tuple[str, str, str, tuple[int, int]]], width: int = 64, height: int = 64,
               seed: int = 0) -> tuple[np.ndarray, list[Drawn]]:
    """(color, shape, size, (row, col)) per object -> (height, width, 3) uint8 image and what was drawn.
    Boxes keep 2 px (and a pixel for the anti-aliased edge) apart; a placement that does not is drawn again."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        boxes = [_place(rng, shape, size, *cell, width, height) for _, shape, size, cell in objects]
        if all(_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            break
    else:
        raise AssertionError(f"no placement keeps {objects} apart on {width}x{height}")
    factor = FACTORS[rng.integers(len(FACTORS))]
    big = Image.new("RGB", (width * factor, height * factor))
    draw = ImageDraw.Draw(big)
    drawn = []
    for (color, shape, size, cell), box in zip(objects, boxes):
        rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in PALETTE[color])
        _draw(draw, shape, box, factor, rgb)
        drawn.append(Drawn(color, shape, size, cell_name(*cell), box))
    image = big.resize((width, height), FILTERS[rng.integers(len(FILTERS))])
    return np.asarray(image), drawn


def draw_v1(color: str, shape: str, size: str, position: str, seed: int = 0) -> np.ndarray:
    """One object on a 64 x 64 canvas at the named v1 position."""
    cell = next((r, c) for r in range(3) for c in range(3) if cell_name(r, c) == position)
    return draw_scene([(color, shape, size, cell)], seed=seed)[0]
