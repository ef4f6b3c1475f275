"""The Shapes editing world (v1.1): one attribute changed by an instruction, the other three kept.

Instruction forms (docs/shapes-world.md, "Editing"): ``make it {color}``, ``turn it into a {shape}``,
``make it {size}``, ``move it to the {position}``. An edit draws its source uniformly from the 576
combinations, the attribute uniformly from the four and the new value uniformly from the other values.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unigen.runs import write_text
from unigen.shapes.render import Rendered, draw_object, placements, render
from unigen.shapes.world import ATTRIBUTES, COLORS, VALUES, ShapeSpec, all_combinations

INSTRUCTIONS = {"color": "make it {}", "shape": "turn it into a {}", "size": "make it {}",
                "position": "move it to the {}"}


@dataclass(frozen=True)
class Edit:
    source: ShapeSpec
    attribute: str  # the one that changes
    value: str  # its new value (never the source's)

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.attribute].format(self.value)

    @property
    def target(self) -> ShapeSpec:
        return dataclasses.replace(self.source, **{self.attribute: self.value})


def instruction(attribute: str, value: str) -> str:
    if attribute not in INSTRUCTIONS or value not in VALUES[attribute]:
        raise ValueError(f"no instruction for {attribute}={value!r}; attributes {list(ATTRIBUTES)}")
    return INSTRUCTIONS[attribute].format(value)


def sample_edits(n: int, seed: int) -> list[Edit]:
    """``n`` edits by the spec's protocol, the same for the same seed."""
    return list(iter_edits(n, seed))


def iter_edits(n: int, seed: int) -> Iterator[Edit]:
    """:func:`sample_edits` one at a time (what a streamed evaluation of any size draws)."""
    rng = np.random.default_rng(seed)
    combos = all_combinations()
    for _ in range(n):
        source = combos[int(rng.integers(len(combos)))]
        attribute = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        others = [v for v in VALUES[attribute] if v != getattr(source, attribute)]
        yield Edit(source, attribute, others[int(rng.integers(len(others)))])


def render_edited(edit: Edit, source: Rendered, seed) -> Rendered:
    """The target of ``edit`` as a minimal change of the rendered ``source``: what the edit keeps stays exactly
    (box and colour jitter), so an output can copy it. A new colour keeps the jitter; a new size keeps the centre
    as near as its side allows; a move keeps the side where it fits there and draws the new place by ``seed``."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, _ = source.bbox
    side, rgb, target = x1 - x0 + 1, np.array(source.rgb), edit.target
    if edit.attribute == "color":
        rgb = np.clip(np.array(COLORS[target.color]) + rgb - np.array(COLORS[edit.source.color]), 0, 255)
    elif edit.attribute in ("size", "position"):
        options = placements(target.size, target.position)
        if edit.attribute == "size":
            side, xs, ys = options[rng.integers(len(options))]
            cx, cy = source.center
            x0 = min(xs, key=lambda x: abs(x + side / 2 - cx))
            y0 = min(ys, key=lambda y: abs(y + side / 2 - cy))
        else:
            side, xs, ys = min(options, key=lambda o: abs(o[0] - side))
            x0, y0 = int(xs[rng.integers(len(xs))]), int(ys[rng.integers(len(ys))])
    return draw_object(target.shape, side, x0, y0, rgb)


def write_edit_dataset(out_dir: str | Path, n: int, seed: int, split: str = "edit", *,
                       progress: bool | None = None, minimal: bool = True) -> Path:
    """``n`` edit triples as PNGs and a manifest ``out_dir/{split}.jsonl`` of ``{"image", "instruction",
    "target"}`` lines (paths relative to the manifest); byte-identical for the same seed. ``minimal``: each
    target is :func:`render_edited` of its source (what is kept stays pixel for pixel); ``False`` renders
    the target with an independent seed (its object's box and colour jitter drawn anew)."""
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{split}.jsonl"
    show = n >= 1000 if progress is None else progress
    lines = []
    for i, edit in enumerate(tqdm(sample_edits(n, seed), desc=f"shapes {split}", disable=not show)):
        src, tgt = f"{split}/{i:06d}_source.png", f"{split}/{i:06d}_target.png"
        source = render(edit.source, [seed, i, 0])
        target = render_edited(edit, source, [seed, i, 1]) if minimal else render(edit.target, [seed, i, 1])
        source.pil().save(out_dir / src, format="PNG")
        target.pil().save(out_dir / tgt, format="PNG")
        lines.append(json.dumps({"image": src, "instruction": edit.instruction, "target": tgt}) + "\n")
    write_text(manifest, "".join(lines))
    return manifest


def instruction_words() -> list[str]:
    """The words of the instruction grammar (the attribute values aside), in a fixed order."""
    words = []
    for form in INSTRUCTIONS.values():
        words += [w for w in form.replace("{}", "").split() if w not in words]
    return words


def add_instruction_words(checkpoint: str | Path, vocab_size: int | None = None) -> list[str]:
    """Add the instruction words a checkpoint's word-level tokenizer lacks (one trained on captions knows
    "a", "the", "to" but not "make", "turn", "into", "move"), as :func:`add_words`."""
    return add_words(checkpoint, instruction_words(), vocab_size)


def add_words(checkpoint: str | Path, words, vocab_size: int | None = None) -> list[str]:
    """Add the ``words`` a checkpoint's word-level tokenizer lacks: new ids after the last one, within the model's
    ``vocab_size`` (their embedding rows exist, untrained). Rewrites ``tokenizer.json``; returns the added words."""
    from unigen.errors import CheckpointError

    path = Path(checkpoint) / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model", {})
    if model.get("type") != "WordLevel":
        raise CheckpointError(f"{path} is a {model.get('type')} tokenizer; only word-level vocabularies are extended")
    vocab = model["vocab"]
    added = [w for w in dict.fromkeys(words) if w not in vocab]
    next_id = max(vocab.values()) + 1
    if vocab_size is not None and next_id + len(added) > vocab_size:
        raise CheckpointError(f"{path}: {len(added)} new words do not fit the model's vocab_size {vocab_size}")
    for i, word in enumerate(added):
        vocab[word] = next_id + i
    write_text(path, json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n")
    return added
