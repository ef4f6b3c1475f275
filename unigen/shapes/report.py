"""A self-contained HTML page: generated images beside their prompts, captions beside their images,
the scores table and the time each step took. Images are written next to the page."""

from __future__ import annotations

import html
from pathlib import Path

from unigen.runs import write_text
from unigen.shapes.captions import parse_caption
from unigen.shapes.checker import check
from unigen.shapes.metrics import format_table
from unigen.shapes.world import ATTRIBUTES, ShapeSpec

STYLE = """body{font-family:sans-serif;margin:2em;background:#fafafa} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px} .grid{display:flex;flex-wrap:wrap;gap:12px}
.item{width:150px;font-size:12px} .item img{width:128px;height:128px;image-rendering:pixelated;background:#000}
.ok{color:#080} .bad{color:#b00}"""


def _verdict(truth: ShapeSpec, found: ShapeSpec) -> str:
    match = truth.matches(found)
    if all(match.values()):
        return '<span class="ok">all four right</span>'
    wrong = ", ".join(a for a in ATTRIBUTES if not match[a])
    return f'<span class="bad">wrong: {wrong}</span>'


def _markdown_table_to_html(md: str) -> str:
    rows = [r.strip("|").split("|") for r in md.splitlines() if not r.startswith("|---")]
    cells = lambda r, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in r)
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows[1:])
    return f"<table><tr>{cells(rows[0], 'th')}</tr>{body}</table>"


def write_report(out_dir: str | Path, scores: dict, generations: list, captions: list,
                 timings: dict[str, float] | None = None, title: str = "unigen Shapes demo",
                 edits: list | None = None) -> Path:
    """``generations``: [(prompt spec, PIL image)]; ``captions``: [(true spec, PIL image, caption text)];
    ``edits``: [(``editing.Edit``, source PIL image, output PIL image)]."""
    from unigen.shapes.world import caption as caption_of

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Scores</h2>", _markdown_table_to_html(format_table(scores))]
    if timings:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
        parts.append(f"<h2>Time</h2><table><tr><th>step</th><th>time</th></tr>{rows}</table>")
    parts.append("<h2>Generated from prompts</h2><div class='grid'>")
    for i, (spec, img) in enumerate(generations):
        name = f"images/gen_{i:03d}.png"
        img.save(out / name)
        parts.append(f"<div class='item'><img src='{name}'><br>{html.escape(caption_of(spec))}<br>"
                     f"{_verdict(spec, check(img))}</div>")
    parts.append("</div><h2>Captions of held-out images</h2><div class='grid'>")
    for i, (spec, img, text) in enumerate(captions):
        name = f"images/cap_{i:03d}.png"
        img.save(out / name)
        parts.append(f"<div class='item'><img src='{name}'><br><b>{html.escape(text)}</b><br>"
                     f"truth: {html.escape(caption_of(spec))}<br>{_verdict(spec, parse_caption(text))}</div>")
    if edits:
        parts.append("</div><h2>Edits of held-out images (source, then output)</h2><div class='grid'>")
        for i, (edit, source, output) in enumerate(edits):
            names = [f"images/edit_{i:03d}_source.png", f"images/edit_{i:03d}_output.png"]
            source.save(out / names[0])
            output.save(out / names[1])
            parts.append(f"<div class='item' style='width:300px'><img src='{names[0]}'> <img src='{names[1]}'><br>"
                         f"<b>{html.escape(edit.instruction)}</b><br>target: {html.escape(caption_of(edit.target))}"
                         f"<br>{_verdict(edit.target, check(output))}</div>")
    parts.append("</div></body></html>")
    page = out / "index.html"
    write_text(page, "\n".join(parts))
    return page


# ---- the scene tasks (``unigen eval shapes --report``): scores, then example images per category ------------------

BOX_COLORS = {"truth": (0, 200, 0), "answer": (255, 140, 0)}  # drawn outlines: the true / asked box, the answer's


def _with_boxes(image, boxes: list[tuple[str, tuple[int, int, int, int] | None]]):
    """A copy of ``image`` (PIL or array) with each (kind, 0-1000 box) outlined in its kind's BOX_COLORS colour."""
    from PIL import Image, ImageDraw

    from unigen.shapes.boxes import from_box

    img = (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    for kind, box in boxes:
        if box is not None:
            x1, y1, x2, y2 = from_box(box, *img.size)
            draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=BOX_COLORS[kind])
    return img


def _box_example(task: str, item, answer) -> tuple[object, str]:
    """(image to show, its caption html) of one box-task record."""
    from unigen.shapes.boxes import parse_box

    if task == "placed":  # the generated image, the asked boxes on it
        asked = [("truth", item.box(i)) for i in range(len(item.rendered.scene.objects))]
        return _with_boxes(answer, asked), html.escape(item.text)
    shown = [("truth", item.box(item.target))] + ([("answer", parse_box(answer))] if task == "grounding" else [])
    return _with_boxes(item.rendered.image, shown), (f"{html.escape(item.text)}<br><b>{html.escape(answer)}</b><br>"
                                                      f"right: {html.escape(item.answer)}")


def _examples(out: Path, task: str, records: list, group_of, example, per_group: int) -> list[str]:
    """Up to ``per_group`` records of each category, wrong ones first (what to look at)."""
    parts, groups = [], {}
    for record in sorted(records, key=lambda r: bool(r[-1])):
        groups.setdefault(group_of(record), []).append(record)
    for group, chosen in groups.items():
        parts.append(f"<h3>{html.escape(task)}: {html.escape(group)}</h3><div class='grid'>")
        for i, record in enumerate(chosen[:per_group]):
            img, text = example(record)
            name = f"images/{task}_{group.replace(' ', '_')}_{i:02d}.png"
            img.save(out / name)
            verdict = '<span class="ok">right</span>' if record[-1] else '<span class="bad">wrong</span>'
            parts.append(f"<div class='item'><img src='{name}' style='object-fit:contain'><br>{text}<br>"
                         f"{verdict}</div>")
        parts.append("</div>")
    return parts


def write_scene_tasks_report(out_dir: str | Path, results: dict, records: dict, per_group: int = 6,
                             title: str = "unigen Shapes scenes") -> Path:
    """A page of an evaluation's scores (``unigen eval shapes``' results by key) and, for the scene tasks with
    records (``evaluate_scenes``: (prompt, image, right); ``scene_eval.evaluate_box_task``: (item, answer, right)),
    example images of each category, wrong ones first: asked boxes outlined green, grounding answers orange."""
    from PIL import Image

    from unigen.shapes.metrics import format_scene_table
    from unigen.shapes.scene_eval import format_task_table

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    parts = [f"<html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Scores</h2>"]
    v1 = {k: v for k, v in results.items() if k in ("captioning", "generation", "edit")}
    if v1:
        parts.append(_markdown_table_to_html(format_table(v1)))
    if "scenes" in results:
        parts.append(_markdown_table_to_html(format_scene_table(results["scenes"])))
    boxes = {k: v for k, v in results.items() if k in ("grounding", "referring", "placed")}
    if boxes:
        parts.append(_markdown_table_to_html(format_task_table(boxes)))
    picture = lambda image: image if isinstance(image, Image.Image) else Image.fromarray(image)  # noqa: E731
    if records.get("scenes"):
        parts.append("<h2>Generated scenes by category</h2>")
        parts += _examples(out, "scenes", records["scenes"], lambda r: r[0].category,
                           lambda r: (picture(r[1]), html.escape(r[0].text)), per_group)
    for task in boxes:
        if records.get(task):
            parts.append(f"<h2>{task} by number of objects</h2>")
            parts += _examples(out, task, records[task], lambda r: r[0].group,
                               lambda r, task=task: _box_example(task, r[0], r[1]), per_group)
    parts.append("</body></html>")
    page = out / "index.html"
    write_text(page, "\n".join(parts))
    return page
