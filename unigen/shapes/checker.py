"""Read the one object of a Shapes-world image back into a ShapeSpec.

Works on images from any renderer that follows the spec, not only ours: it never uses exact colours or our
pixel layout, only "one bright object on black". Robust to anti-aliasing, colour jitter, blur and noise
(VQ reconstructions, model samples). Brightness is the max over channels; a peak is a brightest 3x3 patch.

- object: the largest 8-connected component of pixels >= 0.3 of the image's peak (others of >= 30 px and
  1/5 of its area are counted as more objects). Within it, pixels >= 0.5 of the object's own peak form the
  mask: half-peak halves anti-aliased or blurred edges, so the mask traces the geometric outline.
- size: max(bbox w, h), split at 23 px (between the ranges 14-18 and 28-34).
- position: bbox centre -> nearest cell centre (11 / 32 / 53) on each axis.
- color: per-channel median over the object's plateau (>= 0.85 peak: no edges, no blur), minus the
  background's median -> nearest palette RGB (Euclidean), each palette colour scaled by 0.5..1.25 to fit.
- shape: two normalised complex moments of the object's brightness c (clipped to <= 1, on the 0.3-peak
  component, centred on its centroid, z = x + iy with y down, mass M = sum c):
      q = 60 Re(sum c z^4) / M^3    square -1, diamond +1, circle 0, triangle ~0.1 (4-fold: corners vs tips)
      t = Im(sum c z^3) / M^2.5 / 0.068    triangle 1 (any width / height), 0 for the 180-degree symmetric
  nearest of the ideal points circle (0, 0), square (-1, 0), diamond (1, 0), triangle (0.1, +-1).
  Moments z^k of order >= 1 and the mass are unchanged by an isotropic Gaussian blur, so blunt blurred tips
  do not turn a diamond into a circle, as they do for fill-ratio or template rules; they see all of the
  object, so the fill ratio (1, 0.785, 0.5, 0.5) is implied. The fill ratio is reported for diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from unigen.shapes.world import CANVAS, CELL_CENTERS, COLORS, POSITIONS, SIZES, ShapeSpec

MIN_PEAK = 40.0  # 0-255: an image whose brightest 3x3 patch is darker holds no object
MIN_AREA = 30  # px; the smallest object (14 px triangle) covers ~100
OBJECT_LEVEL = 0.5  # share of the peak: object mask (bbox, size, position)
MOMENT_LEVEL = 0.3  # share of the peak: support of the shape moments (keeps blur tails, drops noise)
PLATEAU_LEVEL = 0.85  # share of the peak: pixels that give the colour
BRIGHTNESS_RANGE = (0.5, 1.25)  # a darker / lighter shade of a palette colour is still that colour
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2  # 23 px
TRIANGLE_T = 0.068  # Im(sum z^3) / M^2.5 of any apex-up triangle
SHAPE_POINTS = {"circle": (0.0, 0.0), "square": (-1.0, 0.0), "diamond": (1.0, 0.0), "triangle": (0.1, 1.0)}
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_CELL_TO_POSITION = {xy: name for name, xy in POSITIONS.items()}


@dataclass(frozen=True)
class Detection:
    spec: ShapeSpec  # all None when no object was found
    n_objects: int
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 inclusive, in 64x64 pixels
    rgb: tuple[int, int, int] | None = None  # median colour of the plateau
    fill: float | None = None  # object area / bbox area
    q: float | None = None  # square -1 .. circle 0 .. diamond +1
    t: float | None = None  # triangle 1, others 0


def to_rgb_array(image) -> np.ndarray:
    """Any image -> (64, 64, 3) float32 in 0..255.

    Accepts a PIL image, or an array / tensor HWC or CHW: uint8 0..255; floats are read as -1..1 when
    some are below 0, as 0..255 when some are above 1.5, else as 0..1. Other sizes are resized to 64x64.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        if hasattr(image, "detach"):  # torch tensor, without importing torch
            image = image.detach().float().cpu().numpy()
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        is_uint8, arr = arr.dtype == np.uint8, arr.astype(np.float32)
        if not is_uint8:
            low, high = arr.min(), arr.max()
            arr = np.clip((arr + 1) * 127.5 if low < 0 else arr if high > 1.5 else arr * 255.0, 0, 255)
    if arr.shape[:2] != (CANVAS, CANVAS):
        img = Image.fromarray(np.rint(arr).astype(np.uint8), "RGB")
        arr = np.asarray(img.resize((CANVAS, CANVAS), Image.Resampling.BOX), dtype=np.float32)
    return arr


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected labels (0 = background, 1..n) from row runs and union-find; no scipy needed."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    stops = np.nonzero(edges == -1)[1]
    runs = list(zip(rows.tolist(), starts.tolist(), stops.tolist()))  # (row, start, stop) in row order
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev, cur, cur_row = [], [], -1  # indices of the runs in the previous and current row
    for j, (r, a, b) in enumerate(runs):
        if r != cur_row:
            prev, cur, cur_row = (cur if r == cur_row + 1 else []), [], r
        for k in prev:
            _, pa, pb = runs[k]
            if pa <= b and a <= pb:  # touching, diagonals included
                parent[find(k)] = find(j)
        cur.append(j)
    labels = np.zeros(mask.shape, dtype=np.int32)
    roots: dict[int, int] = {}
    for j, (r, a, b) in enumerate(runs):
        labels[r, a:b] = roots.setdefault(find(j), len(roots) + 1)
    return labels


def _box3_max(x: np.ndarray) -> float:
    c = np.pad(np.pad(x, 1).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return float((c[3:, 3:] - c[:-3, 3:] - c[3:, :-3] + c[:-3, :-3]).max()) / 9.0


def shape_moments(c: np.ndarray) -> tuple[float, float]:
    """(q, t) of a brightness map ``c`` (see module doc)."""
    mass = float(c.sum())
    grid = np.arange(c.shape[0]) + 0.5
    cx, cy = float(c.sum(0) @ grid) / mass, float(c.sum(1) @ grid) / mass
    z = (grid[None, :] - cx) + 1j * (grid[:, None] - cy)
    z3 = z * z * z
    q = 60 * float((c * z3 * z).sum().real) / mass**3
    t = float((c * z3).sum().imag) / mass**2.5 / TRIANGLE_T
    return q, t


def classify_shape(q: float, t: float) -> str:
    return min(SHAPE_POINTS, key=lambda s: (q - SHAPE_POINTS[s][0]) ** 2 + (abs(t) - SHAPE_POINTS[s][1]) ** 2)


def nearest_color(rgb: np.ndarray) -> str:
    """Palette colour nearest to ``rgb`` after the best brightness scale in BRIGHTNESS_RANGE."""
    scale = np.clip(_PALETTE @ rgb / (_PALETTE**2).sum(1), *BRIGHTNESS_RANGE)
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE * scale[:, None] - rgb) ** 2).sum(1)))]


def _nearest_cell(v: float) -> int:
    return min(CELL_CENTERS, key=lambda c: abs(v - c))


def detect(image) -> Detection:
    """The object of ``image`` and the evidence behind each attribute (see module doc)."""
    rgb = to_rgb_array(image)
    bright = rgb.max(axis=-1)
    peak = _box3_max(bright)
    if peak < MIN_PEAK:
        return Detection(ShapeSpec(), 0)
    # candidates at the low level, so that a dim object next to a bright one still counts
    labels = components(bright >= MOMENT_LEVEL * peak)
    areas = np.bincount(labels.ravel())[1:]
    if areas.size == 0 or areas.max() < MIN_AREA:
        return Detection(ShapeSpec(), 0)
    n_objects = int(np.sum(areas >= max(MIN_AREA, areas.max() / 5)))
    support = labels == int(np.argmax(areas)) + 1
    peak = _box3_max(np.where(support, bright, 0.0))  # the object's own peak
    mask = components(support & (bright >= OBJECT_LEVEL * peak))
    mask = mask == np.bincount(mask.ravel())[1:].argmax() + 1

    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    size = "small" if max(x1 - x0 + 1, y1 - y0 + 1) <= SIZE_SPLIT else "large"
    cell = (_nearest_cell((x0 + x1 + 1) / 2), _nearest_cell((y0 + y1 + 1) / 2))

    outside, plateau = labels == 0, mask & (bright >= PLATEAU_LEVEL * peak)
    background = np.median(rgb[outside], axis=0) if outside.any() else 0.0  # 0 on a clean canvas
    color_rgb = np.median(rgb[plateau if plateau.any() else mask], axis=0) - background
    color = nearest_color(color_rgb)

    support &= bright >= MOMENT_LEVEL * peak
    q, t = shape_moments(np.where(support, np.minimum(bright / peak, 1.0), 0.0))

    return Detection(
        spec=ShapeSpec(color=color, shape=classify_shape(q, t), size=size, position=_CELL_TO_POSITION[cell]),
        n_objects=n_objects,
        bbox=(x0, y0, x1, y1),
        rgb=tuple(int(round(v)) for v in color_rgb),
        fill=float(mask.sum()) / ((x1 - x0 + 1) * (y1 - y0 + 1)),
        q=q,
        t=t,
    )


def check(image) -> ShapeSpec:
    """The detected spec (all fields None when there is no object)."""
    return detect(image).spec
