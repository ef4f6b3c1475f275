"""The Shapes world (v1): attribute tables, the spec of one image, and its canonical caption.

The law is docs/shapes-world.md. Pixel coordinates are continuous: pixel i spans [i, i + 1), so the
canvas centre is 32.0 and the cell centres 11, 32, 53 are symmetric about it.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

CANVAS = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, tuple[int, int]] = {"small": (14, 18), "large": (28, 34)}  # bbox side, px, inclusive
CELL_CENTERS: tuple[int, ...] = (11, 32, 53)
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (x, y) of the cell centre
    "top left": (11, 11), "top": (32, 11), "top right": (53, 11),
    "left": (11, 32), "center": (32, 32), "right": (53, 32),
    "bottom left": (11, 53), "bottom": (32, 53), "bottom right": (53, 53),
}
CENTER_TOLERANCE = 4  # px per axis between the bbox centre and the nominal cell centre
COLOR_JITTER = 12  # per channel

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")
VALUES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
}


@dataclass(frozen=True)
class ShapeSpec:
    """One object. A field is None when unknown: a caption that does not name it, or no object found."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if value is not None and value not in VALUES[name]:
                raise ValueError(f"unknown {name} {value!r}; expected one of {VALUES[name]}")

    @property
    def complete(self) -> bool:
        return all(getattr(self, name) is not None for name in ATTRIBUTES)

    def matches(self, other: ShapeSpec) -> dict[str, bool]:
        """Per attribute: equal and known on both sides."""
        return {n: getattr(self, n) is not None and getattr(self, n) == getattr(other, n) for n in ATTRIBUTES}

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def caption(spec: ShapeSpec) -> str:
    """Canonical caption: ``a {size} {color} {shape} at the {position}``."""
    if not spec.complete:
        raise ValueError(f"cannot caption an incomplete spec: {spec}")
    return f"a {spec.size} {spec.color} {spec.shape} at the {spec.position}"


def all_combinations() -> list[ShapeSpec]:
    """All 576 specs in a fixed order (color, shape, size, position)."""
    return [ShapeSpec(*values) for values in itertools.product(*(VALUES[n] for n in ATTRIBUTES))]


def sample_specs(n: int, seed: int) -> list[ShapeSpec]:
    """``n`` specs drawn uniformly (with replacement) from the 576 combinations."""
    combos = all_combinations()
    return [combos[i] for i in np.random.default_rng(seed).integers(0, len(combos), size=n)]
