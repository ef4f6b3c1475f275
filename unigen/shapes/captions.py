"""Lenient caption parser: which attributes does a free-form caption name?

Any order, extra words, any case, punctuation; ``centre`` / ``middle`` for center, ``upper`` / ``lower`` for
top / bottom, plural shapes. An attribute is None when the caption names none or several different values
of it ("a red and blue circle" names no colour), so listing every value never scores.
Position words combine: a vertical (top / bottom) and a horizontal (left / right) word make a corner; one
of them alone is that edge cell ("top center" is top); center alone is the center.
"""

from __future__ import annotations

import re

from unigen.shapes.world import COLORS, SHAPES, SIZES, ShapeSpec

_WORDS: dict[str, tuple[str, str]] = {}  # word -> (attribute, value)
_WORDS.update({c: ("color", c) for c in COLORS})
_WORDS.update({s: ("shape", s) for s in SHAPES})
_WORDS.update({s + "s": ("shape", s) for s in SHAPES})
_WORDS.update({s: ("size", s) for s in SIZES})
_WORDS.update({w: ("vertical", "top") for w in ("top", "upper")})
_WORDS.update({w: ("vertical", "bottom") for w in ("bottom", "lower")})
_WORDS.update({w: ("horizontal", w) for w in ("left", "right")})
_WORDS.update({w: ("center", "center") for w in ("center", "centre", "middle")})


def _one(values: set[str]) -> str | None:
    return next(iter(values)) if len(values) == 1 else None


def parse_caption(text: str) -> ShapeSpec:
    """The attributes ``text`` names unambiguously; the others None."""
    found: dict[str, set[str]] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _WORDS:
            attribute, value = _WORDS[word]
            found.setdefault(attribute, set()).add(value)
    vertical, horizontal = found.get("vertical", set()), found.get("horizontal", set())
    if len(vertical) > 1 or len(horizontal) > 1:
        position = None  # "top ... bottom": contradictory
    elif vertical or horizontal:
        position = " ".join(sorted(vertical) + sorted(horizontal))
    else:
        position = _one(found.get("center", set()))
    return ShapeSpec(
        color=_one(found.get("color", set())),
        shape=_one(found.get("shape", set())),
        size=_one(found.get("size", set())),
        position=position,
    )
