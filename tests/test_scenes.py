"""Shapes scenes (v2, docs/shapes-world.md): placement rules, captions, boxes, the six categories' judges, the scene
checker on our renders and on the second renderer's, and the word-level tokenizer's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from shapes_second_renderer import draw_scene

from unigen.shapes.boxes import (
    box_text,
    coco_box_text,
    coco_grounding_lines,
    from_box,
    iou,
    parse_box,
    to_box,
)
from unigen.shapes.categories import CATEGORIES, judge, sample_prompts, scene_for
from unigen.shapes.scene_checker import read_scene
from unigen.shapes.scenes import (
    CANVAS_SIDES,
    READING_ORDER,
    Scene,
    caption_correct,
    cell_centre,
    parse_scene_caption,
    render_scene,
    sample_scene,
)
from unigen.shapes.world import SIZES, ShapeSpec


def assert_placed_as_the_spec_says(rendered) -> None:
    scene = rendered.scene
    for spec, (x0, y0, x1, y1) in zip(scene.objects, rendered.bboxes):
        assert 0 <= x0 and 0 <= y0 and x1 < scene.width and y1 < scene.height  # inside the canvas
        lo, hi = SIZES[spec.size]
        assert lo <= x1 - x0 + 1 <= hi and lo <= y1 - y0 + 1 <= hi  # absolute sizes
        cx, cy = cell_centre(spec.position, scene.width, scene.height)
        assert abs((x0 + x1 + 1) / 2 - cx) <= 4 and abs((y0 + y1 + 1) / 2 - cy) <= 4
    assert len({o.position for o in scene.objects}) == len(scene.objects)  # one object per cell
    for i, a in enumerate(rendered.bboxes):
        for b in rendered.bboxes[i + 1:]:  # at least 2 empty pixels between any two boxes
            assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) - 1 >= 2, (a, b)
    lit = rendered.image.max(-1) > 0
    inside = np.zeros_like(lit)
    for x0, y0, x1, y1 in rendered.bboxes:
        inside[y0:y1 + 1, x0:x1 + 1] = True
    assert not (lit & ~inside).any()  # black elsewhere


def draws(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [render_scene(sample_scene(rng), seed=[seed, i]) for i in range(n)]


def test_scenes_follow_the_placement_rules():
    sides, counts = set(), set()
    for r in draws(150):
        assert_placed_as_the_spec_says(r)
        sides.add((r.scene.width, r.scene.height))
        counts.add(len(r.scene.objects))
    assert counts == {1, 2, 3, 4} and len(sides) >= 12


@pytest.mark.slow  # why: 3000 scenes take minutes on a shared 2-core machine; the default run keeps 150
def test_scenes_follow_the_placement_rules_over_thousands_of_draws():
    for r in draws(3000, seed=1):
        assert_placed_as_the_spec_says(r)


def test_scene_rules_refused_and_cells_named():
    red = ShapeSpec("red", "circle", "small", "top left")
    with pytest.raises(ValueError, match="one object per cell"):
        Scene(64, 64, (red, red))
    with pytest.raises(ValueError, match="must be one of"):
        Scene(100, 64, (red,))
    large = [ShapeSpec("red", "circle", "large", p) for p in ("top left", "top")]
    with pytest.raises(ValueError, match="too large to keep 2 px apart"):
        render_scene(Scene(64, 64, tuple(large)))
    assert [cell_centre(p, 64, 64) for p in ("top left", "center", "bottom right")] == [(11, 11), (32, 32), (53, 53)]
    assert cell_centre("top right", 256, 128) == (213, 21)


def test_scene_captions_round_trip():
    a = ShapeSpec("red", "circle", "large", "top left")
    b = ShapeSpec("blue", "square", "small", "bottom right")
    c = ShapeSpec("white", "diamond", "small", "top")
    d = ShapeSpec("cyan", "triangle", "large", "center")
    assert Scene(128, 128, (b, a)).caption == (
        "a large red circle at the top left and a small blue square at the bottom right")
    three = Scene(192, 192, (d, c, ShapeSpec("red", "square", "small", "bottom left")))
    assert three.caption == ("a small white diamond at the top, a large cyan triangle at the center and a small "
                             "red square at the bottom left")
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        assert caption_correct(scene.caption, scene)
        assert set(parse_scene_caption(scene.caption)) == set(scene.objects)
    # near misses: one object missing, one too many, two attributes swapped
    assert not caption_correct("a large red circle at the top left", Scene(128, 128, (a, b)))
    assert not caption_correct(Scene(128, 128, (a, b, c)).caption, Scene(128, 128, (a, b)))
    assert not caption_correct("a large blue circle at the top left and a small red square at the bottom right",
                               Scene(128, 128, (a, b)))


def test_boxes_round_trip_as_text_and_pixels():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(v) for v in rng.choice(CANVAS_SIDES, 2))
        x1, x2 = sorted(int(v) for v in rng.integers(0, w + 1, 2))
        y1, y2 = sorted(int(v) for v in rng.integers(0, h + 1, 2))
        box = to_box((x1, y1, x2, y2), w, h)
        assert parse_box(box_text(box)) == box
        assert tuple(round(v) for v in from_box(box, w, h)) == (x1, y1, x2, y2)  # whole pixels come back exactly
    assert box_text((0, 5, 500, 1000)) == "[0, 5, 500, 1000]"
    assert parse_box("it is at [1 2 5, 0, 9 9 9, 1 0 0 0].") == (125, 0, 999, 1000)  # a word-level decode
    assert parse_box("[12, 40, 1001, 50]") is None and parse_box("no box") is None
    with pytest.raises(ValueError, match="0..1000"):
        box_text((0, 0, 1200, 5))
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_coco_boxes_become_grounding_lines():
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}],
            "categories": [{"id": 3, "name": "dog"}, {"id": 4, "name": "cat"}],
            "annotations": [{"image_id": 1, "category_id": 3, "bbox": [20, 10, 50, 40]},
                            {"image_id": 1, "category_id": 4, "bbox": [0, 0, 10, 10]},
                            {"image_id": 1, "category_id": 4, "bbox": [100, 50, 10, 10]}]}
    assert coco_box_text([20, 10, 50, 40], 200, 100) == "[100, 100, 350, 500]"
    assert coco_box_text([190, -5, 30, 20], 200, 100) == "[950, 0, 1000, 150]"  # clipped to the image
    lines = coco_grounding_lines(coco)
    assert lines == [  # the two cats are left out: "where is the cat?" has two answers
        {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nwhere is the dog?"},
                                             {"from": "gpt", "value": "[100, 100, 350, 500]"}]},
        {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat is at [100, 100, 350, 500]?"},
                                             {"from": "gpt", "value": "dog"}]}]


def read(image):
    found = read_scene(image)
    return [o.spec for o in found.objects], [found.centre(i) for i in range(len(found.objects))]


@pytest.mark.parametrize("category", CATEGORIES)
def test_checker_reads_every_category_right_on_clean_renders(category):
    rng = np.random.default_rng(1)
    for i, prompt in enumerate(sample_prompts(category, 30, seed=0)):
        rendered = render_scene(scene_for(prompt, rng), seed=[2, i])
        found, centres = read(rendered.image)
        assert judge(prompt, found, centres), (prompt, found)
        assert sorted(map(str, found)) == sorted(map(str, rendered.scene.objects))


def test_scene_checker_boxes_on_clean_renders():
    ious = []
    for r in draws(120, seed=3):
        found = read_scene(r.image)
        for spec, box in zip(r.scene.objects, r.boxes):
            match = [o for o in found.objects if o.spec == spec]
            assert len(match) == 1, (spec, found.specs)
            ious.append(iou(match[0].box, box))
    # a small hard-edged triangle's fitted box can fall just under 0.9 (its corners are a pixel or two), so the
    # bar is a share above 0.9 and a floor for every box (the measured shares: docs/EXPERIMENTS.md)
    assert min(ious) >= 0.85 and np.mean(np.array(ious) >= 0.9) >= 0.99, sorted(ious)[:5]


# Share of the second renderer's scenes (tests/shapes_second_renderer.py) read exactly (every object's four
# attributes, nothing more). Its edges are not ours, so a few misses are allowed rather than none; the measured
# share is in docs/EXPERIMENTS.md.
SECOND_RENDERER_SCENE_SHARE = 0.985


def test_scene_checker_reads_the_second_renderer():
    rng = np.random.default_rng(4)
    right, ious = 0, []
    for i in range(200):
        scene = sample_scene(rng)
        cells = [divmod(READING_ORDER.index(o.position), 3) for o in scene.objects]
        image, drawn = draw_scene([(o.color, o.shape, o.size, c) for o, c in zip(scene.objects, cells)],
                                  scene.width, scene.height, seed=i)
        found = read_scene(image)
        right += sorted(map(str, found.specs)) == sorted(map(str, scene.objects))
        ious += [max((iou(o.box, d.box) for o in found.objects), default=0.0) for d in drawn]
    assert right / 200 >= SECOND_RENDERER_SCENE_SHARE
    assert np.mean(np.array(ious) >= 0.8) >= 0.98


def test_judges_reject_near_misses():
    red_circle, blue_square = ShapeSpec("red", "circle"), ShapeSpec("blue", "square")
    centre = lambda *xs: [(x, 50.0) for x in xs]  # noqa: E731
    [relation] = [p for p in sample_prompts("relation", 200, 0) if p.relation == "to the left of"][:1]
    a, b = relation.objects
    assert judge(relation, [a, b], centre(20, 60)) and judge(relation, [b, a], centre(60, 20))
    assert not judge(relation, [a, b], centre(60, 20))  # reversed
    assert not judge(relation, [a, b], centre(50, 55))  # not 8 px apart
    assert not judge(relation, [a, b, a], centre(20, 60, 100))  # one object too many
    [attribution] = sample_prompts("color_attribution", 1, 0)
    x, y = attribution.objects
    assert judge(attribution, [x, y])
    if x.shape != y.shape:
        swapped = [ShapeSpec(y.color, x.shape), ShapeSpec(x.color, y.shape)]  # colours swapped between the two
        assert not judge(attribution, swapped)
    [count] = [p for p in sample_prompts("counting", 50, 0) if len(p.objects) == 3][:1]
    assert judge(count, list(count.objects)) and not judge(count, list(count.objects) * 2)
    assert not judge(count, list(count.objects)[:2] + [red_circle if count.objects[0] != red_circle else blue_square])
    [single] = sample_prompts("single_object", 1, 0)
    assert judge(single, [single.objects[0]]) and not judge(single, [single.objects[0]] * 2)
    assert not judge(single, [ShapeSpec(*[getattr(single.objects[0], k) for k in ("color", "shape", "size")])])
    [two] = sample_prompts("two_objects", 1, 0)
    assert not judge(two, [two.objects[0]]) and not judge(two, [])


def test_word_level_tokenizer_writes_and_reads_every_box(tmp_path):
    from unigen.text_tokenizer import train_text_tokenizer

    tok = train_text_tokenizer(["a large red circle at the top left", "where is the red circle?"], tmp_path,
                               vocab_size=200, kind="wordlevel")
    unk = tok.convert_tokens_to_ids("<unk>")
    for value in range(0, 1001):
        text = box_text((value, 0, 1000, value))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids, text
        assert parse_box(tok.decode(ids)) == (value, 0, 1000, value)


class _ScenePipe:
    """Stands in for a pipeline: draws a right scene for every prompt it knows (its ``right`` categories), a
    black image for the others."""

    def __init__(self, right: set[str]):
        self.right, self.rng = right, np.random.default_rng(0)
        self.prompts = {p.text: p for c in CATEGORIES for p in sample_prompts(c, 4, 4 * 1_000_003 + 5)}

    def __call__(self, texts, options=None, generator=None):
        from types import SimpleNamespace

        images = []
        for text in texts:
            prompt = self.prompts[text]
            if prompt.category in self.right:
                images.append(render_scene(scene_for(prompt, self.rng, 128, 64), seed=len(images)).image)
            else:
                images.append(np.zeros((64, 64, 3), np.uint8))
        return SimpleNamespace(images=images)


def test_evaluate_scenes_scores_each_category_and_the_mean():
    from unigen.shapes.evaluate import evaluate_scenes
    from unigen.shapes.metrics import format_scene_table

    scores, records = evaluate_scenes(_ScenePipe({"counting", "relation", "colors"}), n=4, seed=5, batch_size=3)
    assert scores["per_category"] == {"single_object": 0.0, "two_objects": 0.0, "counting": 1.0, "colors": 1.0,
                                      "relation": 1.0, "color_attribution": 0.0}
    assert scores["overall"] == 0.5 and scores["n"] == 4 and len(records) == 24
    row = "| scenes | 4 | 50.0 | 0.0 | 0.0 | 100.0 | 100.0 | 100.0 | 0.0 |"
    assert format_scene_table(scores).splitlines()[2] == row


def test_cli_eval_shapes_task_scenes(tiny_hf_janus, tmp_path, capsys):
    import json

    from unigen.cli import main

    assert main(["eval", "shapes", "--model", str(tiny_hf_janus[1]), "--task", "scenes", "--n", "1", "--json",
                 str(tmp_path / "s.json"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["scenes"]["n"] == 1 and tuple(result["scenes"]["per_category"]) == CATEGORIES
    assert "captioning" not in result  # only the task asked for
    out = capsys.readouterr().out
    assert "| scenes | 1 |" in out and "| captioning |" not in out
