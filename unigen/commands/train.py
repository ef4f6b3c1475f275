"""``unigen train --config RECIPE.yaml``: the three-stage trainer (staged unfreezing, Janus recipe)."""

from __future__ import annotations

import argparse

HELP = "Train a unified model through the three Janus stages (I adaptors+heads, II +LLM, III +SigLIP)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (see train/*.yaml)")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], action="append",
                   help="stage to run (repeatable; default: 1, 2 and 3 in order)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each stage after N steps")
    p.add_argument("--save-every", type=int, default=None, help="resumable checkpoint every N steps")
    p.add_argument("--output-dir", default=None, help="where stages, metrics.jsonl and checkpoints go")
    p.add_argument("--init-from", default=None,
                   help="checkpoint to start the first stage run from (default: the recipe's init_from, or the "
                        "previous stage's final weights in the output dir)")
    p.add_argument("--resume", default=None, help="'latest' or a stageN/checkpoints/step_XXXXXXX folder")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. stage1.steps=50 data=PATH")


def run(args: argparse.Namespace) -> int:
    from unigen.train import load_recipe, run_stage

    values = {}
    if args.output_dir:
        values["output_dir"] = args.output_dir
    if args.save_every is not None:
        values["save_every"] = args.save_every
    recipe = load_recipe(args.config, args.overrides, **values)
    resume = "auto" if args.resume == "latest" else args.resume
    for i, stage in enumerate(args.stage or [1, 2, 3]):
        final = run_stage(recipe, stage, init_from=args.init_from if i == 0 else None,
                          resume=resume if i == 0 else None, max_steps=args.max_steps)
        print(final)
    return 0
