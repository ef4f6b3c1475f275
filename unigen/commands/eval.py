"""``unigen eval shapes``: captioning accuracy and generation prompt fidelity on the Shapes world."""

from __future__ import annotations

import argparse
from pathlib import Path

from unigen.commands._common import add_model_arguments, check_writable_file, load_pipeline
from unigen.generation.sampling_options import add_image_sampling_arguments, options_from_args, positive_int, seed_int

HELP = ("Evaluate a model on an embedded world (shapes): caption accuracy, generation prompt fidelity, edit "
        "accuracy and scene fidelity.")
TASKS = ("captions", "generation", "edit", "scenes", "chat")
RESULT_NAMES = {"captioning", "generation", "edit", "scenes", "chat"}  # the keys of the scores in an eval result file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("world", choices=["shapes"], help="the world to evaluate on (see docs/)")
    add_model_arguments(p)
    p.add_argument("--n", type=positive_int, default=200,
                   help="items per task, drawn uniformly from the 576 (default 200); scenes: prompts per category")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for the items and for sampling (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward batch (default 16)")
    add_image_sampling_arguments(p, schedule=False)
    p.add_argument("--question", default=None, help="captioning question (default: the model's caption prompt)")
    p.add_argument("--task", choices=TASKS, action="append", default=None,
                   help="a task to evaluate (repeatable; default: captions and generation)")
    p.add_argument("--skip", choices=TASKS, action="append", default=[], help="skip a task (repeatable)")
    p.add_argument("--cfg-drop", choices=["instruction", "image", "both"], default=None,
                   help="edit: what the unconditional row drops (default: unigen.generation.editing.DEFAULT_CFG_DROP)")
    p.add_argument("--json", type=Path, default=None,
                   help="write all scores to this JSON file (an existing file only if it is an earlier eval result)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --json replace a file that is not an earlier eval result (default: refuse)")


RESULT_KEYS = {"model", "n", "seed"}  # what every file this command writes holds, besides the task scores


def earlier_result(path: Path) -> bool:
    """Whether ``path`` holds what ``unigen eval --json`` writes (so replacing it loses no one else's file)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and RESULT_KEYS <= data.keys() and bool(data.keys() & RESULT_NAMES)


def check_json_destination(path: Path, overwrite: bool) -> None:
    from unigen.errors import OutputExistsError

    check_writable_file(path, "--json")
    if path.exists() and not overwrite and not earlier_result(path):
        raise OutputExistsError(f"--json {path} exists and is not an earlier eval result; pass --overwrite to "
                                "replace it, or another file name")


def run(args: argparse.Namespace) -> int:
    from unigen.errors import ArgumentError
    from unigen.generation.editing import DEFAULT_CFG_DROP
    from unigen.processor import check_text
    from unigen.runs import write_json
    from unigen.shapes.evaluate import evaluate_captions, evaluate_edits, evaluate_generation, evaluate_scenes
    from unigen.shapes.metrics import format_scene_table, format_table

    options = options_from_args(args)  # every flag and the destination checked before any work
    tasks = [t for t in (args.task or ["captions", "generation"]) if t not in args.skip]
    if not tasks:
        raise ArgumentError("--skip leaves no task to evaluate; choose tasks with --task")
    if args.question is not None:
        check_text(args.question, "question")
    if args.json is not None:
        check_json_destination(args.json, args.overwrite)
    pipe = load_pipeline(args)
    options = options.with_defaults(pipe.model.config)
    results = {}
    if "captions" in tasks:
        results["captioning"], _ = evaluate_captions(pipe, args.n, args.seed, args.batch_size, args.question,
                                                     keep=False)
    if "generation" in tasks:
        results["generation"], _ = evaluate_generation(pipe, args.n, args.seed, args.batch_size, options=options,
                                                         keep=False)
    if "edit" in tasks:
        results["edit"], _ = evaluate_edits(pipe, args.n, args.seed, args.batch_size, options=options,
                                            cfg_drop=args.cfg_drop, keep=False)
    if "scenes" in tasks:
        results["scenes"], _ = evaluate_scenes(pipe, args.n, args.seed, args.batch_size, options=options, keep=False)
    v1 = {k: v for k, v in results.items() if k != "scenes"}
    if v1:
        print(format_table(v1))
    if "scenes" in results:
        print(format_scene_table(results["scenes"]))
    if "chat" in tasks:  # held-out phrasings, 2-4 turns: unigen.shapes.chat_eval
        from unigen.shapes.chat_eval import evaluate_chat, format_chat_table

        results["chat"], _ = evaluate_chat(pipe, args.n, args.seed, keep=False)
        print(format_chat_table(results["chat"]))
    if "edit" in results:
        edit = results["edit"]
        print(f"edit: changed attribute {edit['changed']:.3f}, kept attributes {edit['kept']:.3f}; by instruction: "
              + ", ".join(f"{a} {r['overall']:.3f} (n={r['n']})" for a, r in edit["by_instruction"].items()))
    if results.keys() & {"generation", "edit", "scenes"}:
        print(f"images: guidance scale {options.guidance_scale:g}, temperature {options.temperature:g}")
    if args.json:
        write_json(args.json, {"model": str(args.model), "n": args.n, "seed": args.seed,
                               "guidance_scale": options.guidance_scale, "temperature": options.temperature,
                               "cfg_drop": args.cfg_drop or DEFAULT_CFG_DROP,
                               **results})
    return 0
