"""``unigen eval shapes``: captioning accuracy and generation prompt fidelity on the Shapes world."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unigen.commands._common import add_model_arguments, load_pipeline

HELP = "Evaluate a model on an embedded world (shapes): caption accuracy and generation prompt fidelity."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("world", choices=["shapes"], help="the world to evaluate on (see shared/specs/shapes-world.md)")
    add_model_arguments(p)
    p.add_argument("--n", type=int, default=200, help="items per task, drawn uniformly from the 576 (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for the items and for sampling (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward batch (default 16)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale for generation (default: the checkpoint's config.guidance_scale, 5 for Janus)")
    p.add_argument("--temperature", type=float, default=None,
                   help="image-token temperature, 0 = greedy (default: the checkpoint's config.temperature, "
                        "1 for Janus)")
    p.add_argument("--question", default=None, help="captioning question (default: the model's caption prompt)")
    p.add_argument("--skip", choices=["captions", "generation"], action="append", default=[],
                   help="skip a task (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write all scores to this JSON file")


def run(args: argparse.Namespace) -> int:
    from unigen.shapes.evaluate import evaluate_captions, evaluate_generation
    from unigen.shapes.metrics import format_table

    if args.n < 1:
        print(f"error: --n must be at least 1, got {args.n}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args)
    guidance = pipe.model.config.guidance_scale if args.guidance_scale is None else args.guidance_scale
    temperature = pipe.model.config.temperature if args.temperature is None else args.temperature
    results = {}
    if "captions" not in args.skip:
        results["captioning"], _ = evaluate_captions(pipe, args.n, args.seed, args.batch_size, args.question)
    if "generation" not in args.skip:
        results["generation"], _ = evaluate_generation(pipe, args.n, args.seed, args.batch_size,
                                                       guidance, temperature)
    print(format_table(results))
    if "generation" in results:
        print(f"generation: guidance scale {guidance:g}, temperature {temperature:g}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "n": args.n, "seed": args.seed,
                                         "guidance_scale": guidance, "temperature": temperature, **results},
                                        indent=2) + "\n")
    return 0
