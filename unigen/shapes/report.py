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
