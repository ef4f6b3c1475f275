"""``unigen train --config RECIPE.yaml``: the three-stage trainer (staged unfreezing, Janus recipe)."""

from __future__ import annotations

import argparse

from unigen.commands._training import add_run_arguments, hold_run_folder
from unigen.generation.sampling_options import positive_int
from unigen.recipes import resolve

HELP = ("Train a unified model through the three Janus stages (I adaptors+heads, II +LLM, III +SigLIP); a recipe "
        "with tokenizers: trains its VQ tokenizer and SigLIP encoder first (docs/TRAINING.md).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=resolve, help="recipe YAML (see train/*.yaml)")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], action="append",
                   help="stage to run (repeatable; default: 1, 2 and 3 in order)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop each stage (and each tokenizer of a whole run) after N steps; it is not finished, and "
                        "--resume latest continues it")
    p.add_argument("--save-every", type=int, default=None, help="resumable checkpoint every N steps (0: none)")
    p.add_argument("--init-from", default=None,
                   help="checkpoint to start the first stage run from (default: the recipe's init_from, or the "
                        "previous stage's final weights in the output dir)")
    add_run_arguments(p, "where stages, metrics.jsonl and checkpoints go",
                      "'latest' (keep finished stages, continue the newest checkpoint; 'auto' is the same) or a "
                      "OUTPUT_DIR/stageN/checkpoints/step_XXXXXXX folder. Without it a run refuses to replace an "
                      "earlier run's weights in --output-dir (overwrite=true allows it)")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. stage1.steps=50 data=PATH")


def plan(stages: list[int] | None, resume: str | None) -> list[tuple[int, str | None]]:
    """(stage, resume) for each stage to run."""
    from pathlib import Path

    from unigen.errors import ArgumentError
    from unigen.runs import LATEST, normalize_resume
    from unigen.training.checkpoints import read_progress

    stages = sorted(set(stages or [1, 2, 3]))
    resume = normalize_resume(resume)
    if resume is None or resume == LATEST:
        return [(s, resume) for s in stages]
    first = int(read_progress(Path(resume))["stage"])
    if first not in stages:
        raise ArgumentError(f"--resume {resume} is a stage-{first} checkpoint, but --stage asks for {stages}")
    return [(s, resume if s == first else None) for s in stages if s >= first]


def run(args: argparse.Namespace) -> int:
    from unigen.training import load_recipe, run_stage

    values = {}
    if args.output_dir:
        values["output_dir"] = args.output_dir
    if args.save_every is not None:
        values["save_every"] = args.save_every
    recipe = load_recipe(args.config, args.overrides, **values)
    stages = plan(args.stage, args.resume)
    if recipe.tokenizers is not None:
        return run_whole(recipe, stages, args)
    with hold_run_folder(recipe.output_dir):
        for i, (stage, resume) in enumerate(stages):
            # run_stage keeps a finished stage under --resume latest, and refuses to replace one without it
            final = run_stage(recipe, stage, init_from=args.init_from if i == 0 else None, resume=resume,
                              max_steps=args.max_steps)
            print(final)
    return 0


def run_whole(recipe, stages: list[tuple[int, str | None]], args: argparse.Namespace) -> int:
    """A recipe with ``tokenizers:``: its tokenizers, their codes, then the stages (unigen.training.run_plan)."""
    from unigen.training.run_plan import make_plan, plan_steps, run_steps, start

    whole = make_plan(recipe)  # every check before the lock: a refused run makes no folder
    steps = plan_steps(whole, stages, args.max_steps, args.init_from)
    with hold_run_folder(recipe.output_dir):
        for output in run_steps(start(whole, steps, args.resume)):
            print(output)
    return 0
