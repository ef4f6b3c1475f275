"""Read a Shapes scene (v2) of any canvas size: every object, its four attributes and its box.

Objects are the 8-connected components of the v1 checker (at 0.3 of the image's peak, at least MIN_AREA px), read
one by one with v1's stricter reading (``checker.read_object``: a shape must fit, a colour must be clearly one
entry's shade). Positions are the cell of the canvas's 3 x 3 grid nearest the box centre; the box is the fitted
shape's, in the spec's 0-1000 form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from unigen.shapes.boxes import to_box
from unigen.shapes.checker import MIN_AREA, Detection, object_labels, read_object, to_rgb_array
from unigen.shapes.scenes import READING_ORDER, cell_centre


@dataclass(frozen=True)
class SceneReading:
    width: int
    height: int
    objects: tuple[Detection, ...]  # in reading order of their box centres (top to bottom, left to right)

    @property
    def specs(self) -> list:
        return [o.spec for o in self.objects]

    def box(self, i: int) -> tuple[int, int, int, int]:
        """Object ``i``'s fitted box in the 0-1000 form."""
        return to_box(self.objects[i].box, self.width, self.height)

    def centre(self, i: int) -> tuple[float, float]:
        x1, y1, x2, y2 = self.objects[i].box
        return (x1 + x2) / 2, (y1 + y2) / 2


def nearest_cell(x: float, y: float, width: int, height: int) -> str:
    return min(READING_ORDER, key=lambda p: np.hypot(*np.subtract(cell_centre(p, width, height), (x, y))))


def read_scene(image) -> SceneReading:
    """Every object of ``image`` (PIL, array or tensor as ``checker.to_rgb_array`` takes, read at its own size)."""
    rgb = to_rgb_array(image, resize=False)
    height, width = rgb.shape[:2]
    bright = rgb.max(axis=-1)
    labels, areas, _ = object_labels(bright)
    outside = labels == 0
    background = np.median(rgb[outside], axis=0) if outside.any() else 0.0
    found = []
    for label in np.flatnonzero(areas >= MIN_AREA) + 1:
        obj = read_object(rgb, bright, labels == label, background)
        x0, y0, x1, y1 = obj.bbox
        position = nearest_cell((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2, width, height)
        found.append(dataclasses.replace(obj, spec=dataclasses.replace(obj.spec, position=position)))
    found.sort(key=lambda o: ((o.box[1] + o.box[3]) / 2, (o.box[0] + o.box[2]) / 2))
    return SceneReading(width, height, tuple(found))
