"""The Shapes world: an offline image-and-caption world whose captions a program can check.

See docs/shapes-world.md. world (tables, ShapeSpec, captions), render, data (PNG + JSONL),
checker (image -> ShapeSpec), captions (text -> ShapeSpec), metrics. v2 scenes: geometry (the shapes as coverage),
scenes (canvas, placement, captions), categories (the six prompt categories and their judges), boxes (0-1000 text,
COCO lines), scene_checker (image of any size -> objects and boxes).
"""

from unigen.shapes.captions import parse_caption
from unigen.shapes.checker import Detection, check, detect
from unigen.shapes.data import read_manifest, write_dataset
from unigen.shapes.metrics import caption_accuracy, dump_json, format_table, generation_fidelity
from unigen.shapes.render import Rendered, render, render_image
from unigen.shapes.world import (
    ATTRIBUTES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_combinations,
    caption,
    sample_specs,
)

__all__ = [
    "ATTRIBUTES", "COLORS", "POSITIONS", "SHAPES", "SIZES", "Detection", "Rendered", "ShapeSpec",
    "all_combinations", "caption", "caption_accuracy", "check", "detect", "dump_json", "format_table",
    "generation_fidelity", "parse_caption", "read_manifest", "render", "render_image", "sample_specs",
    "write_dataset",
]
