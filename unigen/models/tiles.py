"""Tiles with tags for a fixed-size encoder (``vision.tiles: {max: N}``): NVLM-D's and InternVL's dynamic tiling.

An image is resized to the grid of ``cols x rows`` encoder-size squares (``cols * rows <= N``) whose aspect ratio
is closest to its own (:func:`tile_grid`, the rule of InternVL's ``find_closest_aspect_ratio``), cut into those
tiles in reading order, and, when there is more than one, followed by a global thumbnail (the whole image squashed
to one square). Each tile is an ordinary understanding image of the encoder; the prompt gives each its own
placeholders after its text tag (``PromptBuilder.with_tiles``), so the model splices them as it splices any
images (Method A). docs/RESOLUTION.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from unigen.errors import ArgumentError


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """Every (cols, rows) with ``min_tiles <= cols * rows <= max_tiles``, fewest tiles first; grids of the same
    count keep the order InternVL's sorted set gives them (it decides the rare exact ties of two shapes)."""
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
             if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def tile_grid(width: int, height: int, max_tiles: int, image_size: int, min_tiles: int = 1) -> tuple[int, int]:
    """The (cols, rows) grid for a ``width`` x ``height`` image: the candidate whose cols / rows is closest to
    width / height. On a tie the later (larger) grid wins only when the image has more than half the grid's
    pixels, so a small image is not blown up into many tiles of upsampled pixels."""
    if width < 1 or height < 1:
        raise ArgumentError(f"an image of {width}x{height} px cannot be tiled; give an image of at least 1x1 px")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_tiles, min_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def split_tiles(image: Image.Image, max_tiles: int, image_size: int) -> list[Image.Image]:
    """An RGB image -> its tiles in reading order (row by row), each ``image_size`` square, then the thumbnail
    when there is more than one tile."""
    cols, rows = tile_grid(*image.size, max_tiles, image_size)
    s = image_size
    grid = image.resize((cols * s, rows * s), Image.BICUBIC)
    tiles = [grid.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((s, s), Image.BICUBIC))
    return tiles


def tiled_inputs(processor, rows: list[list[int]], row_images: list[Sequence[Image.Image]]) -> dict:
    """Each row with its images (in the order of their tags): every image block holding its image's tiles after
    their tags, left-padded, and all the tiles in reading order as (n_tiles, 3, S, S) ``pixel_values``."""
    vision = processor.config.vision
    tiles = [split_tiles(image, vision.tiles.max, vision.image_size) for images in row_images for image in images]
    counts = iter([len(image_tiles) for image_tiles in tiles])
    batch = processor.pad([processor.prompts.with_tiles(row, [next(counts) for _ in images])
                           for row, images in zip(rows, row_images, strict=True)])
    batch["pixel_values"] = processor.understanding_pixels([tile for image_tiles in tiles for tile in image_tiles])
    return batch
