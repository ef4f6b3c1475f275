"""Shapes-world scores: captioning accuracy and prompt fidelity of generated images.

A result is a plain dict: {"n": int, "overall": share with all four attributes right,
"per_attribute": {"color": share, "shape": ..., "size": ..., "position": ...}} (+ "single_object" for
generations). The spec asks for >= 200 items drawn uniformly from the 576 combinations with a fixed seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from unigen.runs import write_text
from unigen.shapes.captions import parse_caption
from unigen.shapes.checker import detect
from unigen.shapes.world import ATTRIBUTES, ShapeSpec


def score_specs(pairs: Iterable[tuple[ShapeSpec, ShapeSpec]], valid: Iterable[bool] | None = None) -> dict:
    """Compare (truth, found) specs. ``valid[i]`` False makes item i wrong overall whatever its attributes."""
    pairs = list(pairs)
    valid = [True] * len(pairs) if valid is None else list(valid)
    if len(valid) != len(pairs):
        raise ValueError(f"{len(valid)} validity flags for {len(pairs)} pairs")
    hits = {name: 0 for name in ATTRIBUTES}
    overall = 0
    for (truth, found), ok in zip(pairs, valid):
        match = truth.matches(found)
        for name in ATTRIBUTES:
            hits[name] += match[name]
        overall += ok and all(match.values())
    n = len(pairs)
    share = lambda k: k / n if n else 0.0
    return {"n": n, "overall": share(overall), "per_attribute": {k: share(v) for k, v in hits.items()}}


def caption_accuracy(pairs: Iterable[tuple[ShapeSpec, str]]) -> dict:
    """(true spec, caption text) pairs -> share of captions naming all four attributes right, and each."""
    return score_specs((truth, parse_caption(text)) for truth, text in pairs)


def _read_images(images) -> tuple[list[ShapeSpec], list[bool]]:
    """The checker's spec of each image, and whether it found exactly one object."""
    detections = [detect(image) for image in images]
    return [d.spec for d in detections], [d.n_objects == 1 for d in detections]


def generation_fidelity(pairs: Iterable[tuple[ShapeSpec, object]], *,
                        require_single_object: bool = True) -> dict:
    """(prompt spec, generated image) pairs -> share of images whose one object matches the prompt, and each.

    Per-attribute shares judge the largest object; overall also needs exactly one object unless
    ``require_single_object`` is False. Images: anything ``checker.to_rgb_array`` takes.
    """
    pairs = list(pairs)
    truths, images = zip(*pairs) if pairs else ((), ())
    found, single = _read_images(images)
    result = score_specs(zip(truths, found), single if require_single_object else None)
    result["single_object"] = sum(single) / len(single) if single else 0.0
    return result


def edit_accuracy(pairs: Iterable[tuple[object, object]]) -> dict:
    """(``editing.Edit``, output image) pairs -> share of outputs the checker reads as the target (one object,
    all four attributes), per attribute against the target, and split into the changed attribute
    (``changed``: the new value is there) and the kept ones (``kept``: all three unchanged)."""
    pairs = list(pairs)
    edits, images = zip(*pairs) if pairs else ((), ())
    found, single = _read_images(images)
    result = score_specs(((e.target, f) for e, f in zip(edits, found)), single)
    matches = [e.target.matches(f) for e, f in zip(edits, found)]
    n = len(edits)
    share = lambda k: k / n if n else 0.0
    result["changed"] = share(sum(m[e.attribute] for e, m in zip(edits, matches)))
    result["kept"] = share(sum(all(v for a, v in m.items() if a != e.attribute) for e, m in zip(edits, matches)))
    result["single_object"] = share(sum(single))
    # the same scores over the edits of each instruction kind (which changes are hard)
    kind = lambda a: [i for i, e in enumerate(edits) if e.attribute == a]
    result["by_instruction"] = {a: score_specs([(edits[i].target, found[i]) for i in kind(a)],
                                               [single[i] for i in kind(a)]) for a in ATTRIBUTES}
    return result


def merge_scores(parts: list[dict]) -> dict:
    """The scores of consecutive batches of items -> the scores of all of them, exactly what one call over every
    item gives (each share is a count over its result's ``n``): an evaluation streams its items in batches and
    keeps only this running total."""
    n = sum(part["n"] for part in parts)
    total = lambda shares: sum(round(share * part["n"]) for share, part in zip(shares, parts, strict=True))
    merged: dict = {"n": n}
    for key, value in parts[0].items():
        if key == "n":
            continue
        if key == "by_instruction":  # results of their own, each over its own n
            merged[key] = {k: merge_scores([part[key][k] for part in parts]) for k in value}
        elif isinstance(value, dict):  # per-attribute shares of this result's n
            merged[key] = {k: total([part[key][k] for part in parts]) / n if n else 0.0 for k in value}
        else:
            merged[key] = total([part[key] for part in parts]) / n if n else 0.0
    return merged


def format_table(results: Mapping[str, dict] | dict, markdown: bool = True) -> str:
    """One row per named result (or a single result): n, overall and each attribute, in percent."""
    if "overall" in results:
        results = {"": results}
    header = ["", "n", "overall", *ATTRIBUTES]
    percent = lambda r: [f"{100 * v:.1f}" for v in [r["overall"], *map(r["per_attribute"].get, ATTRIBUTES)]]
    rows = [[name, str(r["n"]), *percent(r)] for name, r in results.items()]
    if markdown:
        md = lambda row: "| " + " | ".join(row) + " |"
        rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
        return "\n".join([md(header), rule, *map(md, rows)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join(line(row) for row in [header, *rows])


def format_scene_table(result: dict) -> str:
    """The GenEval-style row of a scene evaluation (``evaluate.evaluate_scenes``): n, the mean, each category."""
    names = list(result["per_category"])
    header = ["", "n", "overall", *names]
    row = ["scenes", str(result["n"]), f"{100 * result['overall']:.1f}",
           *(f"{100 * result['per_category'][k]:.1f}" for k in names)]
    md = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return "\n".join([md(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|", md(row)])


def dump_json(results: dict, path: str | Path) -> None:
    write_text(Path(path), json.dumps(results, indent=2, sort_keys=True) + "\n")
