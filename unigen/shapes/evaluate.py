"""Score a model on the Shapes world: captioning accuracy and generation prompt fidelity.

Items are drawn uniformly from the 576 combinations with a fixed seed (spec: at least 200 each).
Evaluation images use render seeds disjoint from ``write_dataset``'s training seeds.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from unigen.generation.sampling_options import SamplingOptions
from unigen.shapes.metrics import caption_accuracy, generation_fidelity
from unigen.shapes.render import render
from unigen.shapes.world import caption, sample_specs

EVAL_SEED_OFFSET = 1_000_003  # keeps evaluation renders apart from training renders of the same seed


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_captions(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, question: str | None = None,
                      max_new_tokens: int = 24) -> tuple[dict, list[dict]]:
    """Caption ``n`` fresh renders (greedy); return (scores, per-item records)."""
    specs = sample_specs(n, seed + EVAL_SEED_OFFSET)
    images = [render(s, seed=[seed + EVAL_SEED_OFFSET, i]).pil() for i, s in enumerate(specs)]
    texts: list[str] = []
    for batch in tqdm(list(_batches(images, batch_size)), desc="captioning", unit="batch"):
        out = pipe.caption(batch, question=question, max_new_tokens=max_new_tokens)
        texts += [out] if isinstance(out, str) else list(out)
    records = [{"spec": s, "truth": caption(s), "caption": t, "image": img}
               for s, t, img in zip(specs, texts, images, strict=True)]
    return caption_accuracy(zip(specs, texts, strict=True)), records


def evaluate_generation(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, guidance_scale: float | None = None,
                        temperature: float | None = None,
                        options: SamplingOptions | None = None) -> tuple[dict, list]:
    """Generate one image per prompt for ``n`` prompts; return (scores, [(prompt, PIL image)]). Options left
    ``None`` take the checkpoint's (``options`` gives them all at once instead of the keywords)."""
    options = options or SamplingOptions(guidance_scale=guidance_scale, temperature=temperature)
    specs = sample_specs(n, seed + 2 * EVAL_SEED_OFFSET)
    prompts = [caption(s) for s in specs]
    images = []
    generator = torch.Generator().manual_seed(seed)
    for batch in tqdm(list(_batches(prompts, batch_size)), desc="generating", unit="batch"):
        images += pipe(batch, options=options, generator=generator).images
    return generation_fidelity(zip(specs, images, strict=True)), list(zip(prompts, images, strict=True))


def evaluate_edits(pipe, n: int = 200, seed: int = 0, batch_size: int = 16, options: SamplingOptions | None = None,
                   cfg_drop: str | None = None) -> tuple[dict, list]:
    """Edit ``n`` fresh renders by the spec's protocol (``editing.sample_edits``), one output each; return
    (scores, [(edit, source image, output image)])."""
    from unigen.shapes.editing import sample_edits
    from unigen.shapes.metrics import edit_accuracy

    edits = sample_edits(n, seed + 3 * EVAL_SEED_OFFSET)
    sources = [render(e.source, seed=[seed + 3 * EVAL_SEED_OFFSET, i]).pil() for i, e in enumerate(edits)]
    outputs = []
    generator = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, n, batch_size), desc="editing", unit="batch"):
        chunk = slice(start, start + batch_size)
        outputs += pipe.edit(sources[chunk], [e.instruction for e in edits[chunk]], options=options,
                             generator=generator, cfg_drop=cfg_drop).images
    return edit_accuracy(zip(edits, outputs, strict=True)), list(zip(edits, sources, outputs, strict=True))
