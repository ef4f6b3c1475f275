"""The Shapes world (docs/shapes-world.md): renderer, dataset, checker, caption parser, metrics."""

from __future__ import annotations

import json
from collections import Counter, deque

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from shapes_second_renderer import draw_v1

from unigen.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_combinations,
    caption,
    caption_accuracy,
    check,
    detect,
    dump_json,
    format_table,
    generation_fidelity,
    parse_caption,
    read_manifest,
    render,
    sample_specs,
    write_dataset,
)
from unigen.shapes.checker import components
from unigen.shapes.data import load_images
from unigen.shapes.render import SPEC_SAMPLES

COMBOS = all_combinations()
IDEAL_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}


def other_render(spec: ShapeSpec, rng: np.random.Generator) -> np.ndarray:
    """An independent spec-following renderer: continuous geometry at float positions, 3x3 supersampling,
    triangles whose base and height differ. Shares nothing with unigen.shapes.render."""
    lo, hi = SIZES[spec.size]

    def extent_and_centre(cell: float) -> tuple[float, float]:
        # the pixels it lights span at most extent + 1, so keep 1 px inside the range and 0.5 px of tolerance
        room = min(cell, 64 - cell) + 3.5
        extent = rng.uniform(lo + 1, min(hi - 1, 2 * room))
        return extent, cell + rng.uniform(max(-3.5, extent / 2 - cell), min(3.5, 64 - cell - extent / 2))

    (w, mx), (h, my) = (extent_and_centre(c) for c in POSITIONS[spec.position])
    if spec.shape != "triangle":
        w = h = min(w, h)
    sub = (np.arange(64 * 3) + 0.5) / 3
    u, v = (sub[None, :] - mx) / (w / 2), (sub[:, None] - my) / (h / 2)  # -1..1 over the bbox
    inside = {
        "circle": u**2 + v**2 <= 1,
        "square": (np.abs(u) <= 1) & (np.abs(v) <= 1),
        "diamond": np.abs(u) + np.abs(v) <= 1,
        "triangle": (np.abs(v) <= 1) & (np.abs(u) <= (v + 1) / 2),
    }[spec.shape]
    cov = inside.reshape(64, 3, 64, 3).mean((1, 3))
    rgb = np.clip(np.array(COLORS[spec.color]) + rng.integers(-12, 13, 3), 0, 255)
    return np.rint(cov[..., None] * rgb).astype(np.uint8)


def nonzero_bbox(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image.max(-1))
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def assert_follows_spec(image: np.ndarray, spec: ShapeSpec) -> None:
    x0, y0, x1, y1 = nonzero_bbox(image)
    lo, hi = SIZES[spec.size]
    assert lo <= x1 - x0 + 1 <= hi and lo <= y1 - y0 + 1 <= hi, (spec, x0, y0, x1, y1)
    cx, cy = POSITIONS[spec.position]
    assert abs((x0 + x1 + 1) / 2 - cx) <= 4 and abs((y0 + y1 + 1) / 2 - cy) <= 4, (spec, x0, y0, x1, y1)


def wrong_detections(images_and_specs) -> list:
    wrong = []
    for image, spec in images_and_specs:
        d = detect(image)
        if d.spec != spec or d.n_objects != 1:
            wrong.append((spec, d))
    return wrong


# --- world ------------------------------------------------------------------------------------------------


def test_tables_follow_the_spec():
    assert COLORS == {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
                      "yellow": (230, 210, 40), "purple": (150, 60, 200), "orange": (240, 140, 30),
                      "cyan": (40, 200, 210), "white": (235, 235, 235)}
    assert SHAPES == ("circle", "square", "triangle", "diamond")
    assert SIZES == {"small": (14, 18), "large": (28, 34)}
    assert set(POSITIONS) == {"top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right"}
    assert {xy for xy in POSITIONS.values()} == {(x, y) for x in (11, 32, 53) for y in (11, 32, 53)}
    assert POSITIONS["top right"] == (53, 11) and POSITIONS["bottom"] == (32, 53)
    assert len(COMBOS) == 576 and len(set(COMBOS)) == 576
    assert caption(ShapeSpec("red", "circle", "large", "top left")) == "a large red circle at the top left"
    assert caption(ShapeSpec("cyan", "diamond", "small", "center")) == "a small cyan diamond at the center"
    with pytest.raises(ValueError):
        ShapeSpec("black", "circle", "small", "top")
    with pytest.raises(ValueError):
        caption(ShapeSpec("red", "circle", "small"))


def test_sample_specs_is_seeded_and_covers_every_value():
    specs = sample_specs(400, seed=0)
    assert specs == sample_specs(400, seed=0) and specs != sample_specs(400, seed=1)
    for name, values in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        counts = Counter(getattr(s, name) for s in specs)
        assert set(counts) == set(values)
        expected = len(specs) / len(values)
        assert all(0.6 * expected < c < 1.4 * expected for c in counts.values()), (name, counts)


# --- renderer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("antialias", [True, False])
def test_render_follows_the_spec_on_every_combination(antialias):
    for i, spec in enumerate(COMBOS):
        r = render(spec, seed=i, antialias=antialias)
        assert r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
        # the claimed bbox is exactly the non-black pixels: black elsewhere, inside the canvas, not clipped
        x0, y0, x1, y1 = r.bbox
        assert 0 <= x0 and 0 <= y0 and x1 <= 63 and y1 <= 63
        assert nonzero_bbox(r.image) == r.bbox, spec
        side = x1 - x0 + 1
        assert y1 - y0 + 1 == side
        assert_follows_spec(r.image, spec)
        assert all(abs(a - b) <= 12 for a, b in zip(r.rgb, COLORS[spec.color]))
        patch = r.image[y0:y1 + 1, x0:x1 + 1]
        cover = patch.max(-1) / max(r.rgb)
        assert (patch[cover > 0.999] == r.rgb).all()  # fully covered pixels carry the colour
        assert abs(cover.sum() / side**2 - IDEAL_FILL[spec.shape]) < (0.03 if antialias else 0.08), spec
        assert (patch == patch[:, ::-1]).all()  # every shape is symmetric left-right
        widths = (patch.max(-1) > 0).sum(1)
        if spec.shape == "triangle":  # apex up, base on the bottom row
            assert widths[0] <= 3 and widths[-1] == side and (np.diff(widths) >= 0).all()
        elif spec.shape == "diamond":  # tips on the bbox, widest in the middle
            assert widths[0] <= 4 and widths[-1] <= 4 and widths[(side - 1) // 2] == side
        elif spec.shape == "square":
            assert (widths == side).all()
        else:
            assert widths[(side - 1) // 2] == side and widths[0] < 0.6 * side


def test_render_sizes_and_offsets_vary_within_the_ranges():
    sides, offsets = Counter(), Counter()
    for i, spec in enumerate(COMBOS):
        r = render(spec, seed=i)
        sides[spec.size, r.bbox[2] - r.bbox[0] + 1] += 1
        offsets[r.center[0] - POSITIONS[spec.position][0]] += 1
    assert {s for (name, s) in sides if name == "small"} == set(range(14, 19))
    assert {s for (name, s) in sides if name == "large"} == set(range(28, 35))
    assert min(offsets) == -4 and max(offsets) == 4


def test_spec_style_follows_the_spec_and_covers_its_range():
    """The training data's style: lit pixels inside the size's range and 4 px of the cell centre, sub-pixel
    geometry, both extreme sides of each size, triangles wider or taller than high, hard and soft edges."""
    sides, offsets, levels, aspects = Counter(), Counter(), set(), Counter()
    for seed in (0, 1):
        for i, spec in enumerate(COMBOS):
            r = render(spec, seed=(seed, i), style="spec")
            assert nonzero_bbox(r.image) == r.bbox, spec
            assert_follows_spec(r.image, spec)
            assert all(abs(a - b) <= 12 for a, b in zip(r.rgb, COLORS[spec.color]))
            x1, y1, x2, y2 = r.box  # the geometric box and the lit pixels' box: hard-edged tips light less
            lit = (r.bbox[0], r.bbox[1], r.bbox[2] + 1, r.bbox[3] + 1)
            assert all(abs(a - b) < 2 for a, b in zip(r.box, lit)), (r.box, r.bbox)
            x0, _, x1_, _ = r.bbox
            sides[spec.size, x1_ - x0 + 1] += 1
            offsets[round(2 * (r.center[0] - POSITIONS[spec.position][0])) / 2] += 1
            levels |= set(np.unique(r.image.max(-1) / max(r.rgb)).round(3).tolist())
            if spec.shape == "triangle":
                aspects[np.sign(round((x2 - x1) - (y2 - y1), 1))] += 1
    assert {s for (name, s) in sides if name == "small"} == set(range(14, 19))
    assert {s for (name, s) in sides if name == "large"} == set(range(28, 35))
    assert min(offsets) <= -3.5 and max(offsets) >= 3.5 and len(offsets) >= 15  # half-pixel steps
    assert len(levels) > 50 and aspects[1] > 20 and aspects[-1] > 20
    assert render(COMBOS[0], 3, style="spec").image.tobytes() == render(COMBOS[0], 3, style="spec").image.tobytes()
    with pytest.raises(ValueError, match="unknown render style 'fancy'"):
        render(COMBOS[0], 3, style="fancy")
    assert SPEC_SAMPLES[0] == 1 and SPEC_SAMPLES[-1] >= 8  # hard edges up to fine anti-aliasing


def test_render_is_deterministic_by_seed():
    spec = ShapeSpec("purple", "triangle", "large", "center")
    a, b = render(spec, seed=7), render(spec, seed=7)
    assert np.array_equal(a.image, b.image) and a.bbox == b.bbox and a.rgb == b.rgb
    others = [render(spec, seed=s) for s in range(8)]
    assert len({(o.bbox, o.rgb) for o in others}) > 4
    assert not np.array_equal(render(spec, 7, antialias=False).image, a.image)
    assert render(spec, 7, color_jitter=False).rgb == COLORS["purple"]


# --- dataset ----------------------------------------------------------------------------------------------


def test_write_dataset_is_byte_identical_by_seed(tmp_path):
    m1 = write_dataset(tmp_path / "a", 12, seed=3, split="val")
    write_dataset(tmp_path / "b", 12, seed=3, split="val")
    m3 = write_dataset(tmp_path / "c", 12, seed=4, split="val")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 13 and m1 == tmp_path / "a" / "val.jsonl"
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert m1.read_bytes() != m3.read_bytes()

    records = [json.loads(line) for line in m1.read_text().splitlines()]
    assert [r["caption"] for r in records] == [caption(s) for s in sample_specs(12, seed=3)]
    assert sample_specs(20, seed=3)[:12] == sample_specs(12, seed=3)  # a larger set extends a smaller one
    images, specs = load_images(m1)
    assert images.shape == (12, 64, 64, 3) and specs == sample_specs(12, seed=3)
    assert records[0]["image"] == "val/000000.png"
    for i, (path, text) in enumerate(read_manifest(m1)):
        spec = parse_caption(text)
        assert np.array_equal(np.asarray(Image.open(path)), render(spec, seed=[3, i], style="spec").image)
        assert check(Image.open(path)) == spec

    mc = write_dataset(tmp_path / "conv", 3, seed=3, conversations=True)
    record = json.loads(mc.read_text().splitlines()[0])
    assert record["image"] == "train/000000.png" and "caption" not in record
    assert record["conversations"] == [{"from": "human", "value": "<image>\nDescribe the image."},
                                       {"from": "gpt", "value": records[0]["caption"]}]
    assert [t for _, t in read_manifest(mc)] == [r["caption"] for r in records[:3]]
    # the classic look stays reachable (the shipped checkpoints were trained on it)
    classic = write_dataset(tmp_path / "classic", 2, seed=3, style="classic")
    assert np.array_equal(np.asarray(Image.open(classic.parent / "train" / "000001.png")),
                          render(sample_specs(2, seed=3)[1], seed=[3, 1]).image)
    # mixed: the two renderers item by item (even items spec, odd items classic)
    mixed = write_dataset(tmp_path / "mixed", 4, seed=3, style="mixed")
    for i, spec in enumerate(sample_specs(4, seed=3)):
        look = render(spec, seed=[3, i], style=("spec", "classic")[i % 2]).image
        assert np.array_equal(np.asarray(Image.open(mixed.parent / "train" / f"{i:06d}.png")), look)
    with pytest.raises(ValueError, match="unknown dataset style 'fancy'"):
        write_dataset(tmp_path / "bad", 1, seed=3, style="fancy")


# --- checker ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("antialias", [True, False])
def test_checker_reads_every_combination_of_our_renderer(antialias):
    cases = [(render(s, seed=(seed, i), antialias=antialias).image, s)
             for seed in (0, 1) for i, s in enumerate(COMBOS)]
    cases += [(render(s, seed=i, antialias=antialias, color_jitter=False).image, s)
              for i, s in enumerate(COMBOS)]
    assert wrong_detections(cases) == []


def test_checker_reads_every_combination_of_the_spec_style():
    cases = [(render(s, seed=(seed, i), style="spec").image, s) for seed in (0, 1) for i, s in enumerate(COMBOS)]
    assert wrong_detections(cases) == []


def test_checker_reads_every_combination_of_an_independent_renderer():
    rng = np.random.default_rng(0)
    cases = [(other_render(s, rng), s) for _ in range(2) for s in COMBOS]
    for image, spec in cases:
        assert_follows_spec(image, spec)
    assert wrong_detections(cases) == []


# The second renderer (tests/shapes_second_renderer.py: PIL polygons drawn 3-6x larger, shrunk by a box,
# bilinear or Hamming filter) has edges and placements of its own. Share of its images the checker must read
# right, all four attributes and one object. Its edges are not ours, so a few misses are allowed rather than
# none; the measured share is in docs/EXPERIMENTS.md.
SECOND_RENDERER_SHARE = 0.995


def test_checker_reads_the_second_renderer():
    cases = [(draw_v1(s.color, s.shape, s.size, s.position, seed=1000 * seed + i), s)
             for seed in (0, 1) for i, s in enumerate(COMBOS)]
    wrong = wrong_detections(cases)
    assert 1 - len(wrong) / len(cases) >= SECOND_RENDERER_SHARE, wrong[:5]


def test_checker_survives_blur_noise_and_resampling():
    rng = np.random.default_rng(0)

    def blur_noise(spec, i):
        image = np.asarray(render(spec, seed=i).pil().filter(ImageFilter.GaussianBlur(1)), dtype=np.float64)
        return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)

    def down_up(spec, i):  # a VQ-like loss of detail: 32x32 and back
        return render(spec, seed=i).pil().resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BICUBIC)

    def heavy_blur(spec, i):
        return render(spec, seed=i).pil().filter(ImageFilter.GaussianBlur(2))

    for degrade in (blur_noise, down_up, heavy_blur):
        wrong = wrong_detections((degrade(s, i), s) for i, s in enumerate(COMBOS))
        assert len(wrong) <= 5, (degrade.__name__, len(wrong), wrong[:3])


def test_checker_inputs_empty_images_and_counting():
    spec = ShapeSpec("orange", "diamond", "small", "bottom left")
    r = render(spec, seed=5)
    as_float = r.image.astype(np.float32) / 255
    chw = torch.from_numpy(as_float.transpose(2, 0, 1) * 2 - 1)  # a decoder's output: CHW in -1..1
    for image in (r.pil(), as_float, as_float * 255, chw, r.pil().resize((384, 384))):
        assert check(image) == spec, type(image)
    # no object: black, faint noise
    rng = np.random.default_rng(0)
    for empty in (np.zeros((64, 64, 3), np.uint8), rng.integers(0, 12, (64, 64, 3)).astype(np.uint8)):
        d = detect(empty)
        assert d.spec == ShapeSpec() and d.n_objects == 0
    assert detect(np.full((64, 64, 3), 255, np.uint8)).n_objects == 1  # degenerate, but no crash
    # salt noise does not move the object; a second object is counted
    noisy = r.image.copy()
    noisy[rng.integers(0, 64, 40), rng.integers(0, 64, 40)] = 255
    assert check(noisy) == spec
    two = np.maximum(r.image, render(ShapeSpec("white", "square", "small", "top right"), seed=0).image)
    assert detect(two).n_objects == 2


# --- the stricter reading: what a person would not call the named shape or colour -----------------------------

SUPER = 4


def drawn(paint, rgb=(40, 200, 210)) -> np.ndarray:
    """A 64x64 image of what ``paint(draw, s)`` draws at 4x (``s`` scales a 64-px coordinate), box-downsampled."""
    big = Image.new("L", (64 * SUPER, 64 * SUPER), 0)
    paint(ImageDraw.Draw(big), lambda v: v * SUPER)
    cover = np.asarray(big.resize((64, 64), Image.Resampling.BOX), dtype=np.float32) / 255
    return np.rint(cover[..., None] * np.array(rgb)).astype(np.uint8)


def hook(d, s):  # a J: a thick stem with a curl at its foot (the demo report's "large cyan diamond")
    d.line([(s(36), s(18)), (s(36), s(38))], fill=255, width=s(8))
    d.arc([s(18), s(28), s(40), s(48)], 0, 180, fill=255, width=s(8))


def blob(d, s):  # four overlapping discs
    for cx, cy, r in ((30, 30, 10), (40, 26, 7), (26, 40, 8), (38, 40, 5)):
        d.ellipse([s(cx - r), s(cy - r), s(cx + r), s(cy + r)], fill=255)


def crescent(d, s):
    d.ellipse([s(17), s(17), s(47), s(47)], fill=255)
    d.ellipse([s(27), s(13), s(53), s(41)], fill=0)


def notched_square(d, s):  # a quarter cut out: an L
    d.rectangle([s(17), s(17), s(47), s(47)], fill=255)
    d.rectangle([s(32), s(17), s(47), s(32)], fill=0)


def bitten_square(d, s):  # a square with a bite from one side (the shipped model's worst "white square")
    d.rectangle([s(18), s(18), s(46), s(46)], fill=255)
    d.ellipse([s(36), s(26), s(52), s(40)], fill=0)


def notched_diamond(d, s):  # V cuts into both tips: a bow tie
    d.polygon([(s(32), s(16)), (s(48), s(32)), (s(32), s(48)), (s(16), s(32))], fill=255)
    d.polygon([(s(32), s(24)), (s(40), s(16)), (s(24), s(16))], fill=0)
    d.polygon([(s(32), s(38)), (s(40), s(48)), (s(24), s(48))], fill=0)


def stretched_square(d, s):  # a 36 x 20 rectangle
    d.rectangle([s(14), s(22), s(50), s(42)], fill=255)


def stretched_circle(d, s):
    d.ellipse([s(14), s(22), s(50), s(42)], fill=255)


def stretched_diamond(d, s):
    d.polygon([(s(32), s(22)), (s(50), s(32)), (s(32), s(42)), (s(14), s(32))], fill=255)


def touching_squares(d, s):
    d.rectangle([s(18), s(25), s(32), s(39)], fill=255)
    d.rectangle([s(32), s(25), s(46), s(39)], fill=255)


def touching_circle_and_square(d, s):
    d.ellipse([s(16), s(24), s(32), s(40)], fill=255)
    d.rectangle([s(31), s(26), s(45), s(40)], fill=255)


def touching_diamonds(d, s):
    for x in (16, 32):
        d.polygon([(s(x + 8), s(24)), (s(x + 16), s(32)), (s(x + 8), s(40)), (s(x), s(32))], fill=255)


def touching_triangles(d, s):
    for x in (16, 32):
        d.polygon([(s(x + 8), s(24)), (s(x + 16), s(40)), (s(x), s(40))], fill=255)


DEFORMED = (hook, blob, crescent, notched_square, bitten_square, notched_diamond, stretched_square,
            stretched_circle, stretched_diamond, touching_squares, touching_circle_and_square, touching_diamonds,
            touching_triangles)


@pytest.mark.parametrize("paint", DEFORMED, ids=lambda f: f.__name__)
def test_checker_names_no_shape_for_a_deformed_object(paint):
    for rgb in ((40, 200, 210), (235, 235, 235)):
        image = drawn(paint, rgb)
        found = detect(image)
        assert found.n_objects == 1 and found.spec.shape is None, (found.spec, found.fit)
        # nor when a blur softens it (the fit allows for blur only as much as the edges show)
        assert detect(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1))).spec.shape is None


def test_checker_keeps_reading_the_undeformed_shapes_drawn_the_same_way():
    """The deformed objects' clean siblings, drawn by the same code, are read right: it is the deformation."""
    def square(d, s): d.rectangle([s(17), s(17), s(47), s(47)], fill=255)  # noqa: E704
    def circle(d, s): d.ellipse([s(17), s(17), s(47), s(47)], fill=255)  # noqa: E704
    def diamond(d, s): d.polygon([(s(32), s(16)), (s(48), s(32)), (s(32), s(48)), (s(16), s(32))], fill=255)  # noqa: E704
    def triangle(d, s): d.polygon([(s(32), s(17)), (s(47), s(47)), (s(17), s(47))], fill=255)  # noqa: E704
    for paint in (square, circle, diamond, triangle):
        assert detect(drawn(paint)).spec == ShapeSpec("cyan", paint.__name__, "large", "center")


def test_checker_names_no_colour_between_two_palette_entries():
    spec = ShapeSpec("red", "circle", "large", "center")
    coverage = render(spec, seed=0, color_jitter=False).image.max(-1, keepdims=True) / 220
    paint = lambda rgb: np.rint(coverage * np.array(rgb)).astype(np.uint8)  # noqa: E731
    names, read = list(COLORS), {}
    for i, a in enumerate(names):
        assert check(paint(COLORS[a])).color == a
        for b in names[i + 1:]:
            read[a, b] = check(paint((np.array(COLORS[a]) + np.array(COLORS[b])) / 2)).color
    # neither of the two; none at all but where halfway is a shade of a third colour: (130, 60, 130) is a dark
    # purple, (225, 125, 40) an orange, (40, 130, 140) a dark cyan
    third = {("red", "blue"): "purple", ("red", "yellow"): "orange", ("green", "blue"): "cyan"}
    assert {pair: name for pair, name in read.items() if name is not None} == third
    # pink-magenta is not purple (the demo report's "purple circle"), nor is magenta red (one of the shipped model's
    # "red" squares), nor are grey, brown, pink or olive anything
    for rgb in ((230, 60, 190), (200, 40, 160), (191, 40, 121), (128, 128, 128), (120, 70, 30), (250, 160, 180),
                (140, 160, 45)):
        assert check(paint(rgb)).color is None, rgb
    # a shade of a palette colour is still it: the spec's +-12 jitter, darker and lighter
    for rgb, name in (((232, 52, 28), "red"), ((130, 52, 170), "purple"), ((48, 96, 255), "blue"),
                      ((226, 227, 80), "yellow")):
        assert check(paint(rgb)).color == name


def test_checker_names_no_size_for_an_object_of_two_sizes():
    def bar(d, s): d.polygon([(s(32), s(24)), (s(48), s(40)), (s(16), s(40))], fill=255)  # noqa: E704
    found = detect(drawn(bar))  # a 32 x 16 triangle: large across, small up
    assert found.spec.size is None


def test_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.6):
        mask = rng.random((40, 50)) < density
        labels = components(mask)
        assert ((labels > 0) == mask).all()
        seen = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            if seen[y, x]:
                continue
            region, todo = [], deque([(y, x)])
            seen[y, x] = True
            while todo:
                cy, cx = todo.popleft()
                region.append((cy, cx))
                for ny in range(max(cy - 1, 0), min(cy + 2, 40)):
                    for nx in range(max(cx - 1, 0), min(cx + 2, 50)):
                        if mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            todo.append((ny, nx))
            ys, xs = zip(*region)
            region_labels = labels[list(ys), list(xs)]
            assert (region_labels == region_labels[0]).all()
            assert (labels == region_labels[0]).sum() == len(region)


# --- captions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("a large red circle at the top left", ("red", "circle", "large", "top left")),
    ("A small cyan diamond at the center.", ("cyan", "diamond", "small", "center")),
    ("In the centre there is a SMALL white square", ("white", "square", "small", "center")),
    ("the middle: small white square", ("white", "square", "small", "center")),
    ("Upper right, a large yellow triangle!", ("yellow", "triangle", "large", "top right")),
    ("lower-left corner has one small blue triangle", ("blue", "triangle", "small", "bottom left")),
    ("purple large squares at the top", ("purple", "square", "large", "top")),
    ("at the top center a small green circle", ("green", "circle", "small", "top")),
    ("a small orange diamond in the middle left", ("orange", "diamond", "small", "left")),
    ("right: large white circle", ("white", "circle", "large", "right")),
    ("a large red circle at the bottom", ("red", "circle", "large", "bottom")),
    # wrong or missing attributes come back as None
    ("a red and blue circle at the top", (None, "circle", None, "top")),
    ("a large small circle", (None, "circle", None, None)),
    ("a big red circle at the top bottom", ("red", "circle", None, None)),
    ("a small red shape on the left and right", ("red", None, "small", None)),
    ("a small black circle", (None, "circle", "small", None)),
    ("", (None, None, None, None)),
])
def test_parse_caption(text, expected):
    assert parse_caption(text) == ShapeSpec(*expected)


def test_parse_caption_reads_every_canonical_caption():
    assert all(parse_caption(caption(s)) == s for s in COMBOS)
    assert all(parse_caption(caption(s).upper() + ".") == s for s in COMBOS)


# --- metrics ----------------------------------------------------------------------------------------------


def test_caption_accuracy_and_table(tmp_path):
    truth = ShapeSpec("red", "circle", "large", "top left")
    result = caption_accuracy([
        (truth, "a large red circle at the top left"),
        (truth, "Upper left: a LARGE red circle."),
        (truth, "a large blue circle at the top left"),
        (truth, "a large red circle"),
    ])
    assert result == {"n": 4, "overall": 0.5,
                      "per_attribute": {"color": 0.75, "shape": 1.0, "size": 1.0, "position": 0.75}}
    table = format_table({"captions": result})
    assert table.splitlines()[0] == "|  | n | overall | color | shape | size | position |"
    assert table.splitlines()[2] == "| captions | 4 | 50.0 | 75.0 | 100.0 | 100.0 | 75.0 |"
    assert format_table(result, markdown=False).split() == [
        "n", "overall", "color", "shape", "size", "position", "4", "50.0", "75.0", "100.0", "100.0", "75.0"]
    dump_json({"captions": result}, tmp_path / "out" / "scores.json")
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == {"captions": result}


def test_generation_fidelity_on_hand_made_images():
    a = ShapeSpec("green", "square", "large", "right")
    b = ShapeSpec("white", "triangle", "large", "center")
    image_a = render(a, seed=0).image
    two = np.maximum(image_a, render(ShapeSpec("red", "circle", "small", "left"), seed=0).image)
    pairs = [
        (a, image_a),  # right
        (ShapeSpec("green", "square", "small", "right"), image_a),  # wrong size
        (b, render(ShapeSpec("white", "triangle", "large", "top"), seed=0).image),  # wrong position
        (b, np.zeros((64, 64, 3), np.uint8)),  # nothing drawn
        (a, two),  # right object plus another one
    ]
    result = generation_fidelity(pairs)
    assert result["n"] == 5 and result["overall"] == pytest.approx(1 / 5)
    expected = {"color": 0.8, "shape": 0.8, "size": 0.6, "position": 0.6}
    assert result["per_attribute"] == pytest.approx(expected)
    assert result["single_object"] == pytest.approx(3 / 5)
    assert generation_fidelity(pairs, require_single_object=False)["overall"] == pytest.approx(2 / 5)
