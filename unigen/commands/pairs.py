"""``unigen pairs --model M --shapes N --output-dir D``: preference pairs for a dpo stage, judged.

For each prompt the model draws K images; a judge scores each (prompt, PIL image); the best and the worst become
one pair line ``{"prompt", "chosen", "rejected", "chosen_codes", "rejected_codes"}`` in ``D/pairs.jsonl`` (the
codes the sampler drew, so the stage scores exactly those tokens), their PNGs in ``D/images/``. A prompt whose K
scores are all equal gives no pair (said in the summary). Judges: ``shapes`` (the Shapes checker: the attributes
of the prompt it reads in the image, plus one for a single object) or ``module:function`` taking (prompt, image)
-> a number (a CLIP score, a reward model). docs/PREFERENCE.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from pathlib import Path

from unigen.commands._common import add_model_arguments, check_writable_dir, load_pipeline
from unigen.errors import ArgumentError, OutputExistsError
from unigen.generation.sampling_options import add_image_sampling_arguments, options_from_args, positive_int, seed_int

HELP = "Draw K images per prompt, judge them and write best-vs-worst preference pairs for a dpo stage."
PAIRS = "pairs.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    prompts.add_argument("--shapes", type=positive_int, metavar="N", help="N Shapes-world prompts drawn with --seed")
    p.add_argument("--k", type=int, default=4, help="images drawn per prompt, at least 2 (default 4)")
    p.add_argument("--judge", default="shapes",
                   help="shapes (the Shapes checker) or module:function taking (prompt, PIL image) -> score "
                   "(default shapes)")
    p.add_argument("--seed", type=seed_int, default=0, help="prompt i draws with seed + i (default 0)")
    p.add_argument("--output-dir", type=Path, required=True, help=f"where {PAIRS} and images/ go")
    p.add_argument("--overwrite", action="store_true", help=f"replace an earlier {PAIRS} in --output-dir")
    add_image_sampling_arguments(p, schedule=False)


def shapes_score(prompt: str, image) -> float:
    """The Shapes checker's reading of ``image`` against ``prompt``: one point per attribute the prompt names
    that the largest object has, one more for exactly one object."""
    from unigen.shapes.captions import parse_caption
    from unigen.shapes.checker import detect

    found = detect(image)
    want = parse_caption(prompt)
    return float(sum(want.matches(found.spec).values()) + (found.n_objects == 1))


def load_judge(name: str) -> Callable[[str, object], float]:
    if name == "shapes":
        return shapes_score
    module, _, function = name.partition(":")
    if not module or not function:
        raise ArgumentError(f"--judge {name!r}: use shapes or module:function (a callable (prompt, image) -> score)")
    try:
        judge = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise ArgumentError(f"--judge {name}: cannot load it ({type(err).__name__}: {err})") from err
    if not callable(judge):
        raise ArgumentError(f"--judge {name} is not callable")
    return judge


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.shapes is not None:
        from unigen.shapes.world import caption, sample_specs

        return [caption(s) for s in sample_specs(args.shapes, args.seed)]
    if not args.prompts.is_file():
        raise ArgumentError(f"--prompts {args.prompts} does not exist (a text file, one prompt per line)")
    prompts = [x.strip() for x in args.prompts.read_text().splitlines() if x.strip()]
    if not prompts:
        raise ArgumentError(f"--prompts {args.prompts} holds no prompt")
    return prompts


def pair_of(scores: list[float]) -> tuple[int, int] | None:
    """(best, worst) image indices, or None when every score is the same."""
    best, worst = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
    return None if scores[best] == scores[worst] else (best, worst)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from unigen.output_lock import hold_output_dir
    from unigen.runs import write_text

    if args.k < 2:
        raise ArgumentError(f"--k must be at least 2 (a pair needs two images), got {args.k}")
    out = args.output_dir
    check_writable_dir(out, "--output-dir")
    if (out / PAIRS).exists() and not args.overwrite:
        raise OutputExistsError(f"{out / PAIRS} exists; pass --overwrite to replace it, or another --output-dir")
    judge, prompts = load_judge(args.judge), read_prompts(args)
    pipe, options = load_pipeline(args), options_from_args(args)
    with hold_output_dir(out, "--output-dir"):
        (out / "images").mkdir(exist_ok=True)
        lines, ties = [], 0
        for i, prompt in enumerate(tqdm(prompts, desc="pairs", unit="prompt")):
            drawn = pipe(prompt, num_images_per_prompt=args.k, options=options,
                         generator=torch.Generator().manual_seed(args.seed + i))
            scores = [float(judge(prompt, image)) for image in drawn.images]
            pair = pair_of(scores)
            if pair is None:
                ties += 1
                continue
            line = {"prompt": prompt}
            for side, j in zip(("chosen", "rejected"), pair, strict=True):
                name = f"images/{i:05d}_{side}.png"
                drawn.images[j].save(out / name)
                line |= {side: name, f"{side}_codes": drawn.tokens[j].tolist(), f"{side}_score": scores[j]}
            lines.append(line)
        write_text(out / PAIRS, "".join(json.dumps(x) + "\n" for x in lines))  # whole or not at all
    print(f"{len(lines)} pairs from {len(prompts)} prompts x {args.k} images in {out / PAIRS}; {ties} prompt(s) gave "
          f"no pair (all {args.k} images judged the same)")
    return 0
