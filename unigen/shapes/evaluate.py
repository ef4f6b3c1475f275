"""Score a model on the Shapes world: captioning accuracy and generation prompt fidelity.

Items are drawn uniformly from the 576 combinations with a fixed seed (spec: at least 200 each).
Evaluation images use render seeds disjoint from ``write_dataset``'s training seeds. Items are rendered, run and
scored a batch at a time (a running total of the scores), so any ``n`` runs in the memory of one batch.
Images are rendered in the classic style by default: the shipped checkpoints' README scores are measured on it;
``style="spec"`` renders the spec's whole range (what a user's own renderer may draw).
"""

from __future__ import annotations

import itertools

import torch
from tqdm import tqdm

from unigen.generation.sampling_options import SamplingOptions
from unigen.shapes.metrics import caption_accuracy, generation_fidelity, merge_scores
from unigen.shapes.render import render
from unigen.shapes.world import caption, sample_specs

EVAL_SEED_OFFSET = 1_000_003  # keeps evaluation renders apart from training renders of the same seed


def _streamed(n: int, batch_size: int, desc: str) -> tqdm:
    return tqdm(range(0, n, batch_size), desc=desc, unit="batch")


def _add(total: dict | None, part: dict) -> dict:
    return part if total is None else merge_scores([total, part])


def evaluate_captions(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, question: str | None = None,
                      max_new_tokens: int = 24, keep: bool = True, style: str = "classic") -> tuple[dict, list[dict]]:
    """Caption ``n`` fresh renders (greedy); return (scores, per-item records). Items are rendered, captioned and
    scored a batch at a time, so memory does not grow with ``n`` unless ``keep`` asks for the records."""
    specs = sample_specs(n, seed + EVAL_SEED_OFFSET)
    scores, records = None, []
    for start in _streamed(n, batch_size, "captioning"):
        batch = specs[start : start + batch_size]
        images = [render(s, seed=[seed + EVAL_SEED_OFFSET, i], style=style).pil() for i, s in enumerate(batch, start)]
        out = pipe.caption(images, question=question, max_new_tokens=max_new_tokens)
        texts = [out] if isinstance(out, str) else list(out)
        scores = _add(scores, caption_accuracy(zip(batch, texts, strict=True)))
        if keep:
            records += [{"spec": s, "truth": caption(s), "caption": t, "image": img}
                        for s, t, img in zip(batch, texts, images, strict=True)]
    return scores, records


def evaluate_generation(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, guidance_scale: float | None = None,
                        temperature: float | None = None, options: SamplingOptions | None = None,
                        keep: bool = True) -> tuple[dict, list]:
    """Generate one image per prompt for ``n`` prompts; return (scores, [(prompt, PIL image)] if ``keep``).
    Options left ``None`` take the checkpoint's (``options`` gives them all at once instead of the keywords).
    Drawn and scored a batch at a time."""
    options = options or SamplingOptions(guidance_scale=guidance_scale, temperature=temperature)
    specs = sample_specs(n, seed + 2 * EVAL_SEED_OFFSET)
    scores, records = None, []
    generator = torch.Generator().manual_seed(seed)
    for start in _streamed(n, batch_size, "generating"):
        batch = specs[start : start + batch_size]
        prompts = [caption(s) for s in batch]
        images = pipe(prompts, options=options, generator=generator).images
        scores = _add(scores, generation_fidelity(zip(batch, images, strict=True)))
        if keep:
            records += list(zip(prompts, images, strict=True))
    return scores, records


def evaluate_edits(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, options: SamplingOptions | None = None,
                   cfg_drop: str | None = None, keep: bool = True) -> tuple[dict, list]:
    """Edit ``n`` fresh renders by the spec's protocol (``editing.sample_edits``), one output each; return
    (scores, [(edit, source image, output image)] if ``keep``). Drawn, edited and scored a batch at a time."""
    from unigen.shapes.editing import iter_edits
    from unigen.shapes.metrics import edit_accuracy

    edits = iter_edits(n, seed + 3 * EVAL_SEED_OFFSET)
    scores, records = None, []
    generator = torch.Generator().manual_seed(seed)
    for start in _streamed(n, batch_size, "editing"):
        batch = list(itertools.islice(edits, batch_size))
        sources = [render(e.source, seed=[seed + 3 * EVAL_SEED_OFFSET, i]).pil() for i, e in enumerate(batch, start)]
        outputs = pipe.edit(sources, [e.instruction for e in batch], options=options, generator=generator,
                            cfg_drop=cfg_drop).images
        scores = _add(scores, edit_accuracy(zip(batch, outputs, strict=True)))
        if keep:
            records += list(zip(batch, sources, outputs, strict=True))
    return scores, records


def evaluate_scenes(pipe, n: int = 100, seed: int = 0, batch_size: int = 16, options: SamplingOptions | None = None,
                    keep: bool = True) -> tuple[dict, list]:
    """Scene fidelity (v2, the GenEval analogue): ``n`` prompts of each of the six categories (the spec: at least
    100), one image each, read by ``scene_checker.read_scene`` at the size the model draws and judged by
    ``categories.judge``. Returns ({"n", "per_category": {category: share}, "overall": their mean}, [(prompt, image,
    right)] if ``keep``)."""
    from unigen.shapes.categories import CATEGORIES, judge, sample_prompts
    from unigen.shapes.scene_checker import read_scene

    options = options or SamplingOptions()
    generator = torch.Generator().manual_seed(seed)
    per_category, records = {}, []
    for category in CATEGORIES:
        prompts, right = sample_prompts(category, n, seed + 4 * EVAL_SEED_OFFSET), 0
        for start in _streamed(n, batch_size, category):
            batch = prompts[start : start + batch_size]
            images = pipe([p.text for p in batch], options=options, generator=generator).images
            for prompt, image in zip(batch, images, strict=True):
                found = read_scene(image)
                ok = judge(prompt, found.specs, [found.centre(i) for i in range(len(found.objects))])
                right += ok
                if keep:
                    records.append((prompt, image, ok))
        per_category[category] = right / n
    return {"n": n, "per_category": per_category, "overall": sum(per_category.values()) / len(CATEGORIES)}, records
