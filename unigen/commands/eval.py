"""``unigen eval shapes``: captioning accuracy and generation prompt fidelity on the Shapes world."""

from __future__ import annotations

import argparse
from pathlib import Path

from unigen.commands._common import add_model_arguments, check_writable_file, load_pipeline
from unigen.sampling_options import add_image_sampling_arguments, options_from_args, positive_int, seed_int

HELP = "Evaluate a model on an embedded world (shapes): caption accuracy and generation prompt fidelity."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("world", choices=["shapes"], help="the world to evaluate on (see docs/)")
    add_model_arguments(p)
    p.add_argument("--n", type=positive_int, default=200,
                   help="items per task, drawn uniformly from the 576 (default 200)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for the items and for sampling (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward batch (default 16)")
    add_image_sampling_arguments(p, schedule=False)
    p.add_argument("--question", default=None, help="captioning question (default: the model's caption prompt)")
    p.add_argument("--skip", choices=["captions", "generation"], action="append", default=[],
                   help="skip a task (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write all scores to this JSON file")


def run(args: argparse.Namespace) -> int:
    from unigen.processor import check_text
    from unigen.runs import write_json
    from unigen.shapes.evaluate import evaluate_captions, evaluate_generation
    from unigen.shapes.metrics import format_table

    options = options_from_args(args)  # every flag and the destination checked before any work
    if args.question is not None:
        check_text(args.question, "question")
    if args.json is not None:
        check_writable_file(args.json, "--json")
    pipe = load_pipeline(args)
    options = options.with_defaults(pipe.model.config)
    results = {}
    if "captions" not in args.skip:
        results["captioning"], _ = evaluate_captions(pipe, args.n, args.seed, args.batch_size, args.question)
    if "generation" not in args.skip:
        results["generation"], _ = evaluate_generation(pipe, args.n, args.seed, args.batch_size, options=options)
    print(format_table(results))
    if "generation" in results:
        print(f"generation: guidance scale {options.guidance_scale:g}, temperature {options.temperature:g}")
    if args.json:
        write_json(args.json, {"model": str(args.model), "n": args.n, "seed": args.seed,
                               "guidance_scale": options.guidance_scale, "temperature": options.temperature,
                               **results})
    return 0
