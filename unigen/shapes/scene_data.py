"""Write Shapes scene (v2) training data: PNGs plus one JSONL manifest in the data layer's line shapes, byte-identical
for the same seed (docs/SCENES.md).

Per kind, ``n`` lines:
- ``caption``: ``{"image", "conversations"}``: "Describe the image." -> the scene caption (understanding)
- ``grounding``: ``where is the {color} {shape}?`` -> ``[x1, y1, x2, y2]`` (understanding)
- ``referring``: ``what is at [x1, y1, x2, y2]?`` -> ``a {size} {color} {shape}`` (understanding)
- ``generation``: ``{"image", "caption"}``: a prompt of each of the six categories in turn, and full scene captions,
  with a scene that answers it right (``categories.scene_for``)
- ``placed``: ``{"image", "caption"}``: ``a {size} {color} {shape} in [x1, y1, x2, y2] and ...`` with its render

The question lines draw their canvas from the spec's sides (``canvas`` fixes it); the processor shrinks each image
to the model's size. Caption lines are the generation targets, so they are drawn on ``generation_canvas`` square:
the model draws that (64 for the Shapes models), and the generation preprocessing crops a canvas that is not square.
A caption line also trains understanding, asked the recipe's ``question``: with prompts as captions, train with
``question: unigen.prompts.PROMPT_QUESTION`` (train/shapes-scenes.yaml) so "Describe the image." keeps full answers.

Seeds: every kind draws from ``[TRAIN_TAG, seed, kind]``; the evaluators draw from single integers
(``seed + k * EVAL_SEED_OFFSET``), so the two never share a stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unigen.prompts import PROMPT_QUESTION, grounding_question, placed_prompt, referring_question
from unigen.runs import write_text
from unigen.shapes.boxes import box_text, question_line
from unigen.shapes.categories import CATEGORIES, COUNT_WORDS, RELATIONS, sample_prompt, scene_for
from unigen.shapes.scene_tasks import MAX_OBJECTS, sample_item
from unigen.shapes.scenes import CANVAS_SIDES, render_scene, sample_scene
from unigen.shapes.world import COLORS, POSITIONS, SHAPES, SIZES

KINDS = ("caption", "grounding", "referring", "generation", "placed")
GENERATION_PROMPTS = ("scene", *CATEGORIES)  # what the generation lines cycle through ("scene": a full caption)
# unigen.text_tokenizer's word-level split, as tokenizer.json writes it: a number becomes its digits
DIGITS = {"type": "Digits", "individual_digits": True}
WORD_SPLIT = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"},
                                                    {"type": "Punctuation", "behavior": "Isolated"}, DIGITS]}
TRAIN_TAG = 0x5CE7E5  # first word of every training stream's seed, so none is an evaluation seed
DESCRIBE = "Describe the image."


def _canvas(canvas) -> tuple[int, int] | None:
    if canvas is None:
        return None
    width, height = (canvas, canvas) if isinstance(canvas, int) else tuple(canvas)
    if width not in CANVAS_SIDES or height not in CANVAS_SIDES:
        raise ValueError(f"canvas {width}x{height}: each side must be one of {CANVAS_SIDES}")
    return width, height


def _line(kind: str, i: int, rng: np.random.Generator, canvas, side: int, rel: str):
    """(rendered image, manifest line) of the ``i``-th line of ``kind``, its image at ``rel``."""
    objects = 1 + i % MAX_OBJECTS
    if kind in ("grounding", "referring"):
        item = sample_item(kind, rng, objects, canvas)
        return item.rendered.image, question_line(rel, item.text, item.answer)
    if kind == "placed":
        item = sample_item(kind, rng, objects, (side, side))
        return item.rendered.image, {"image": rel, "caption": item.text}
    if kind == "caption":
        scene = sample_scene(rng, objects, *(canvas or (None, None)))
        return render_scene(scene, seed=rng).image, question_line(rel, DESCRIBE, scene.caption)
    category = GENERATION_PROMPTS[i % len(GENERATION_PROMPTS)]
    if category == "scene":
        scene = sample_scene(rng, objects, side, side)
        return render_scene(scene, seed=rng).image, {"image": rel, "caption": scene.caption}
    prompt = sample_prompt(category, rng)
    return render_scene(scene_for(prompt, rng, side, side), seed=rng).image, {"image": rel, "caption": prompt.text}


def write_scene_dataset(out_dir: str | Path, n: int, seed: int, *, canvas: int | tuple[int, int] | None = None,
                        generation_canvas: int = 64, kinds=KINDS, split: str = "scenes",
                        progress: bool | None = None) -> Path:
    """``n`` lines of each kind in ``kinds`` (KINDS), interleaved; images under ``out_dir/split/``, the manifest
    ``out_dir/split.jsonl`` (returned; image paths relative to it). ``progress`` None shows a bar from 1000 lines."""
    from PIL import Image

    canvas = _canvas(canvas)
    side = _canvas(generation_canvas)[0]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or n < 1:
        raise ValueError(f"kinds must be among {list(KINDS)} and n >= 1; got {list(kinds)} and {n}")
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    rngs = {kind: np.random.default_rng([TRAIN_TAG, seed, KINDS.index(kind) + 1]) for kind in kinds}
    order = [(kind, i) for i in range(n) for kind in kinds]
    lines = []
    for index, (kind, i) in enumerate(tqdm(order, desc=f"scenes {split}",
                                           disable=not (len(order) >= 1000 if progress is None else progress))):
        rel = f"{split}/{index:06d}.png"
        image, line = _line(kind, i, rngs[kind], canvas, side, rel)
        Image.fromarray(image).save(out_dir / rel, format="PNG")
        lines.append(json.dumps(line))
    manifest = out_dir / f"{split}.jsonl"
    write_text(manifest, "\n".join(lines) + "\n")
    return manifest


# ---- the words of these lines, for a tokenizer trained before them -----------------------------------------


def scene_texts() -> list[str]:
    """Texts that hold every word the scene lines use (the vocabulary of each attribute, every template)."""
    plural = [f"{s}s" for s in SHAPES]
    return [" ".join([*COLORS, *SHAPES, *plural, *SIZES, *POSITIONS, *COUNT_WORDS.values(), *RELATIONS]),
            grounding_question("red circle"), referring_question(box_text((123, 456, 789, 0))),
            placed_prompt([("a", box_text((0, 0, 1, 1)))] * 2), PROMPT_QUESTION, DESCRIBE]


def scene_words() -> list[str]:
    """The words a word-level tokenizer needs for the scene lines, in first-seen order (numbers as digits)."""
    from tokenizers import Tokenizer

    split = Tokenizer.from_str(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {},
                                           "unk_token": "?"}, "pre_tokenizer": WORD_SPLIT})).pre_tokenizer
    words: dict[str, None] = {}
    for text in scene_texts():
        words.update((w, None) for w, _ in split.pre_tokenize_str(text))
    return list(words)


def add_scene_words(checkpoint: str | Path, vocab_size: int | None = None) -> list[str]:
    """Teach a checkpoint's word-level tokenizer the scene lines (one trained on v1 captions knows neither "where"
    nor the digits): numbers are split into digits from now on, and the missing words take new ids after the last
    one, within the model's ``vocab_size`` (their embedding rows exist, untrained). Rewrites ``tokenizer.json``;
    returns the added words."""
    from unigen.errors import CheckpointError

    path = Path(checkpoint) / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    if tokenizer.get("model", {}).get("type") != "WordLevel":
        raise CheckpointError(f"{path} is not a word-level tokenizer; only word-level vocabularies are extended")
    pre = tokenizer.get("pre_tokenizer") or {"type": "Sequence", "pretokenizers": []}
    pre = pre if pre["type"] == "Sequence" else {"type": "Sequence", "pretokenizers": [pre]}
    if DIGITS not in pre["pretokenizers"]:
        pre["pretokenizers"].append(DIGITS)
    tokenizer["pre_tokenizer"] = pre
    vocab = tokenizer["model"]["vocab"]
    added = [w for w in scene_words() if w not in vocab]
    first = max(vocab.values()) + 1
    if vocab_size is not None and first + len(added) > vocab_size:
        raise CheckpointError(f"{path}: {len(added)} new words do not fit the model's vocab_size {vocab_size}")
    vocab.update({word: first + i for i, word in enumerate(added)})
    write_text(path, json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n")
    return added


def write_training_mix(out_dir: str | Path, n_scenes: int, n_v1: int, n_edits: int, seed: int) -> Path:
    """train/shapes-scenes.yaml's data: scene lines (``n_scenes`` of each kind) beside v1 lines so that v1 keeps
    its scores: ``n_v1`` caption lines (text-to-image, and understanding under the recipe's question), ``n_v1``
    "Describe the image." conversations, ``n_edits`` edit triples. Returns ``out_dir/mixed.jsonl``, their lines
    in one file (each part keeps its own manifest beside it)."""
    from unigen.shapes.data import write_dataset
    from unigen.shapes.editing import write_edit_dataset

    out_dir = Path(out_dir)
    parts = [write_scene_dataset(out_dir, n_scenes, seed), write_dataset(out_dir, n_v1, seed + 1, split="v1"),
             write_dataset(out_dir, n_v1, seed + 2, split="v1-describe", conversations=True)]
    if n_edits:
        parts.append(write_edit_dataset(out_dir, n_edits, seed + 3))
    mixed = out_dir / "mixed.jsonl"
    write_text(mixed, "".join(p.read_text() for p in parts))
    return mixed
