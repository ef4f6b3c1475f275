"""Read the one object of a Shapes-world image back into a ShapeSpec.

Works on images from any renderer that follows the spec, not only ours: it never uses exact colours or our
pixel layout, only "one bright object on black". Robust to anti-aliasing, colour jitter, blur and noise
(VQ reconstructions, model samples). Brightness is the max over channels; a peak is a brightest 3x3 patch.

- object: the largest 8-connected component of pixels >= 0.3 of the image's peak (others of >= 30 px and
  1/5 of its area are counted as more objects). Within it, pixels >= 0.5 of the object's own peak form the
  mask: half-peak halves anti-aliased or blurred edges, so the mask traces the geometric outline.
- size: max(bbox w, h), split at 23 px (between the ranges 14-18 and 28-34).
- position: bbox centre -> nearest cell centre (11 / 32 / 53) on each axis.
- size: None when the box's width and height fall on different sides of the split (a 30 x 15 bar).
- color: per-channel median over the object's plateau (>= 0.85 peak: no edges, no blur), minus the
  background's median -> the palette colour with the nearest shade (its RGB scaled by 0.8..1.2), or None when
  that shade is more than 45 away (pink, grey, brown, olive) or not clearly nearer than the next colour's
  (under 0.6 of its distance: a colour halfway between two palette entries is neither).
- shape: two normalised complex moments of the object's brightness c (clipped to <= 1, on the 0.3-peak
  component, centred on its centroid, z = x + iy with y down, mass M = sum c):
      q = 60 Re(sum c z^4) / M^3    square -1, diamond +1, circle 0, triangle ~0.1 (4-fold: corners vs tips)
      t = Im(sum c z^3) / M^2.5 / 0.068    triangle 1 (any width / height), 0 for the 180-degree symmetric
  nearest of the ideal points circle (0, 0), square (-1, 0), diamond (1, 0), triangle (0.1, +-1).
  Moments z^k of order >= 1 and the mass are unchanged by an isotropic Gaussian blur, so blunt blurred tips
  do not turn a diamond into a circle, as they do for fill-ratio or template rules; they see all of the
  object, so the fill ratio (1, 0.785, 0.5, 0.5) is implied. The fill ratio is reported for diagnosis.
  The moments name the nearest shape even for a hook or two touching squares, so the named shape must then fit
  (:func:`fit_shape`): the ideal shape of the object's mass, centroid, aspect and edge blur, compared pixel by
  pixel; beyond FIT_LIMIT the shape is None. The fitted shape's box is the object's box (sub-pixel, unchanged by
  anti-aliasing or blur), what scenes report and ground.
A None attribute never matches a prompt: the stricter reading fails what a person would not call that shape or
colour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unigen.shapes import geometry
from unigen.shapes.world import CANVAS, CELL_CENTERS, COLORS, POSITIONS, SIZES, ShapeSpec

MIN_PEAK = 40.0  # 0-255: an image whose brightest 3x3 patch is darker holds no object
MIN_AREA = 30  # px; the smallest object (14 px triangle) covers ~100
OBJECT_LEVEL = 0.5  # share of the peak: object mask (bbox, size, position)
MOMENT_LEVEL = 0.3  # share of the peak: support of the shape moments (keeps blur tails, drops noise)
FIT_PERCENTILE = 75  # the brightness of the object's mask that counts as fully covered in the shape fit
PLATEAU_LEVEL = 0.85  # share of the peak: pixels that give the colour
BRIGHTNESS_RANGE = (0.8, 1.2)  # a darker / lighter shade of a palette colour is still that colour
COLOR_LIMIT = 45.0  # RGB distance to the nearest shade beyond which a colour is none of the palette's
COLOR_MARGIN = 0.6  # ... and the share of the distance to the next colour's shade it must stay under
FIT_LIMIT = 0.2  # fit_shape error beyond which an object is none of the four shapes
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
    fit: float | None = None  # fit_shape's error for the shape the moments name
    box: tuple[float, float, float, float] | None = None  # the fitted shape's box x1, y1, x2, y2 (continuous)


def to_rgb_array(image, resize: bool = True) -> np.ndarray:
    """Any image -> (64, 64, 3) float32 in 0..255 (its own size when not ``resize``).

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
    if resize and arr.shape[:2] != (CANVAS, CANVAS):
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
    xs, ys = np.arange(c.shape[1]) + 0.5, np.arange(c.shape[0]) + 0.5
    cx, cy = float(c.sum(0) @ xs) / mass, float(c.sum(1) @ ys) / mass
    z = (xs[None, :] - cx) + 1j * (ys[:, None] - cy)
    z3 = z * z * z
    q = 60 * float((c * z3 * z).sum().real) / mass**3
    t = float((c * z3).sum().imag) / mass**2.5 / TRIANGLE_T
    return q, t


_MAX_BLUR = 3.0  # px: the largest Gaussian blur a fit allows for


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    grid = np.arange(n, dtype=np.float64)
    g = np.exp(-0.5 * ((grid[:, None] - grid[None, :]) / max(sigma, 1e-6)) ** 2)
    return g / g.sum(1, keepdims=True)


_PERIMETER = {"circle": lambda w, h: np.pi * w, "square": lambda w, h: 4 * w,
              "diamond": lambda w, h: 2 * np.sqrt(2) * w,
              "triangle": lambda w, h: w + 2 * np.hypot(h, w / 2)}
_EDGE_BAND = (MOMENT_LEVEL, 0.9)  # brightness levels whose band measures the edges' blur
_BAND_PER_SIGMA = 1.806  # px between a blurred edge's 0.3 and 0.9 levels per px of sigma (Gaussian quantiles)


def edge_blur(c: np.ndarray, perimeter: float) -> float:
    """The Gaussian sigma that makes edges as soft as ``c``'s: the area of the band between the 0.3 and 0.9
    levels over the outline's length is the band's width; a sharp, anti-aliased edge (a 1 px ramp) has 0.6."""
    band = float(((c > _EDGE_BAND[0]) & (c < _EDGE_BAND[1])).sum()) / max(perimeter, 1.0)
    return float(np.sqrt(max((band / _BAND_PER_SIGMA) ** 2 - (0.6 / _BAND_PER_SIGMA) ** 2, 0.0)))


def fit_shape(c: np.ndarray, shape: str) -> tuple[float, tuple[float, float, float, float]]:
    """How far the brightness map ``c`` (0..1, the object alone) is from an ideal ``shape``, and that shape's box.

    The ideal shape has ``c``'s mass and centroid (both unchanged by a blur) and its size follows from the mass
    (the triangle's aspect from the second moments, less the blur's share); it is blurred as much as ``c``'s edges
    are (:func:`edge_blur`: a lumpy sharp object is not excused as a blurred one), cut below MOMENT_LEVEL as ``c``
    is, and compared: the error is the summed absolute difference over the mass (0 = the shape itself; a hook,
    blob, notch or stretch is far)."""
    mass = float(c.sum())
    ys, xs = np.arange(c.shape[0]) + 0.5, np.arange(c.shape[1]) + 0.5
    cx, cy = float(c.sum(0) @ xs) / mass, float(c.sum(1) @ ys) / mass
    if shape == "triangle":  # var_x = w^2/24 + s^2, var_y = h^2/18 + s^2, mass = w h / 2
        vxx, vyy = float(c.sum(0) @ (xs - cx) ** 2) / mass, float(c.sum(1) @ (ys - cy) ** 2) / mass
        blur2 = (vxx + vyy - np.sqrt((vxx - vyy) ** 2 + mass**2 / 27)) / 2
        blur2 = min(max(blur2, 0.0), _MAX_BLUR**2)
        aspect = np.sqrt(max(24 * (vxx - blur2), 1e-6) / max(18 * (vyy - blur2), 1e-6))  # w / h
        w, h = np.sqrt(2 * mass * aspect), np.sqrt(2 * mass / aspect)
    else:
        w = h = {"circle": 2 * np.sqrt(mass / np.pi), "square": np.sqrt(mass), "diamond": np.sqrt(2 * mass)}[shape]
    sigma = min(edge_blur(c, _PERIMETER[shape](w, h)), _MAX_BLUR)
    cy -= geometry.centroid_offset(shape, h)
    ideal = geometry.coverage(shape, cx, cy, w, h, c.shape[1], c.shape[0]).astype(np.float64)
    if sigma > 0.1:
        ideal = _gaussian_matrix(c.shape[0], sigma) @ ideal @ _gaussian_matrix(c.shape[1], sigma).T
        ideal = np.where(ideal >= MOMENT_LEVEL, ideal, 0.0)
    error = float(np.abs(c - ideal).sum()) / mass
    return error, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def classify_shape(q: float, t: float) -> str:
    return min(SHAPE_POINTS, key=lambda s: (q - SHAPE_POINTS[s][0]) ** 2 + (abs(t) - SHAPE_POINTS[s][1]) ** 2)


def color_distances(rgb: np.ndarray) -> np.ndarray:
    """Per palette colour: the distance from ``rgb`` to the nearest shade of it (scaled in BRIGHTNESS_RANGE)."""
    scale = np.clip(_PALETTE @ rgb / (_PALETTE**2).sum(1), *BRIGHTNESS_RANGE)
    return np.sqrt(((_PALETTE * scale[:, None] - rgb) ** 2).sum(1))


def nearest_color(rgb: np.ndarray) -> str | None:
    """The palette colour ``rgb`` is a shade of, or None when it is none of them: farther than COLOR_LIMIT from
    every shade (pink, grey, brown), or not clearly nearer one than another (halfway between two)."""
    distances = color_distances(rgb)
    first, second = np.sort(distances)[:2]
    if first > COLOR_LIMIT or first > COLOR_MARGIN * second:
        return None
    return _PALETTE_NAMES[int(np.argmin(distances))]


def _nearest_cell(v: float) -> int:
    return min(CELL_CENTERS, key=lambda c: abs(v - c))


def object_labels(bright: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, areas, peak) of the candidate objects of a brightness map: 8-connected components at the low level
    of the image's peak, so that a dim object next to a bright one still counts. No components when it is dark."""
    peak = _box3_max(bright)
    if peak < MIN_PEAK:
        return np.zeros(bright.shape, np.int32), np.zeros(0, np.int64), peak
    labels = components(bright >= MOMENT_LEVEL * peak)
    return labels, np.bincount(labels.ravel())[1:], peak


def read_object(rgb: np.ndarray, bright: np.ndarray, support: np.ndarray, background) -> Detection:
    """The attributes of the object on ``support`` (one component of :func:`object_labels`) but its position, which
    depends on the canvas's grid: the caller reads it from ``bbox``. ``n_objects`` is left 1."""
    peak = _box3_max(np.where(support, bright, 0.0))  # the object's own peak
    mask = components(support & (bright >= OBJECT_LEVEL * peak))
    mask = mask == np.bincount(mask.ravel())[1:].argmax() + 1

    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    small = [n <= SIZE_SPLIT for n in (x1 - x0 + 1, y1 - y0 + 1)]
    size = None if small[0] != small[1] else "small" if small[0] else "large"  # 30 x 15 is neither

    plateau = mask & (bright >= PLATEAU_LEVEL * peak)
    color_rgb = np.median(rgb[plateau if plateau.any() else mask], axis=0) - background

    support = support & (bright >= MOMENT_LEVEL * peak)
    q, t = shape_moments(np.where(support, np.minimum(bright / peak, 1.0), 0.0))
    shape = classify_shape(q, t)
    level = float(np.percentile(bright[mask], FIT_PERCENTILE))  # shading inside the object is not a soft edge
    fit, box = fit_crop(np.where(support, np.minimum(bright / level, 1.0), 0.0), support, shape)
    return Detection(
        spec=ShapeSpec(color=nearest_color(color_rgb), shape=shape if fit <= FIT_LIMIT else None, size=size),
        n_objects=1,
        bbox=(x0, y0, x1, y1),
        rgb=tuple(int(round(v)) for v in color_rgb),
        fill=float(mask.sum()) / ((x1 - x0 + 1) * (y1 - y0 + 1)),
        q=q,
        t=t,
        fit=fit,
        box=box,
    )


def detect(image) -> Detection:
    """The object of ``image`` and the evidence behind each attribute (see module doc)."""
    rgb = to_rgb_array(image)
    bright = rgb.max(axis=-1)
    labels, areas, _ = object_labels(bright)
    if areas.size == 0 or areas.max() < MIN_AREA:
        return Detection(ShapeSpec(), 0)
    n_objects = int(np.sum(areas >= max(MIN_AREA, areas.max() / 5)))
    outside = labels == 0
    background = np.median(rgb[outside], axis=0) if outside.any() else 0.0  # 0 on a clean canvas
    found = read_object(rgb, bright, labels == int(np.argmax(areas)) + 1, background)
    x0, y0, x1, y1 = found.bbox
    cell = (_nearest_cell((x0 + x1 + 1) / 2), _nearest_cell((y0 + y1 + 1) / 2))
    spec = dataclasses.replace(found.spec, position=_CELL_TO_POSITION[cell])
    return dataclasses.replace(found, spec=spec, n_objects=n_objects)


_CROP_MARGIN = 8  # px around the object: room for the fitted shape and its blur


def fit_crop(c: np.ndarray, support: np.ndarray, shape: str) -> tuple[float, tuple[float, float, float, float]]:
    """:func:`fit_shape` on a window around ``support`` (any canvas size costs the same); the box in canvas px."""
    rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    y0, x0 = max(int(rows[0]) - _CROP_MARGIN, 0), max(int(cols[0]) - _CROP_MARGIN, 0)
    y1, x1 = min(int(rows[-1]) + _CROP_MARGIN + 1, c.shape[0]), min(int(cols[-1]) + _CROP_MARGIN + 1, c.shape[1])
    error, (bx0, by0, bx1, by1) = fit_shape(c[y0:y1, x0:x1], shape)
    return error, (bx0 + x0, by0 + y0, bx1 + x0, by1 + y0)


def check(image) -> ShapeSpec:
    """The detected spec (all fields None when there is no object)."""
    return detect(image).spec
