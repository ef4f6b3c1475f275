"""The four shapes as continuous geometry: what share of each pixel a shape covers.

A shape is given by its bounding box in continuous pixel coordinates (pixel i spans [i, i + 1)): centre
(cx, cy), width w and height h. Circle, square and diamond have w == h; the triangle is isosceles, apex up,
base at the bottom, of any w and h. Coverage is measured by sampling k x k points in every pixel: k = 1 gives
hard edges, larger k finer anti-aliasing. The spec-range renderer draws with it, and the checker compares what
it sees with it.
"""

from __future__ import annotations

import numpy as np

SHAPE_NAMES = ("circle", "square", "triangle", "diamond")


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in units of the half box (-1..1 spans the box), lie inside ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "triangle":
        return (np.abs(v) <= 1) & (np.abs(u) <= (v + 1) / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPE_NAMES)}")


def coverage(shape: str, cx: float, cy: float, w: float, h: float, width: int, height: int,
             samples: int = 4) -> np.ndarray:
    """(height, width) float32 in [0, 1]: the share of each pixel's ``samples``**2 points inside the shape."""
    cov = np.zeros((height, width), dtype=np.float32)
    x0, x1 = max(int(np.floor(cx - w / 2)), 0), min(int(np.ceil(cx + w / 2)) + 1, width)
    y0, y1 = max(int(np.floor(cy - h / 2)), 0), min(int(np.ceil(cy + h / 2)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return cov
    k = samples
    sub = (np.arange(k) + 0.5) / k
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel()
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel()
    hit = inside(shape, (xs[None, :] - cx) / (w / 2), (ys[:, None] - cy) / (h / 2))
    cov[y0:y1, x0:x1] = hit.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    return cov


def centroid_offset(shape: str, h: float) -> float:
    """How far below the box centre the shape's centroid lies (only the triangle's is not at the centre)."""
    return h / 6 if shape == "triangle" else 0.0
