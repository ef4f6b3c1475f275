"""``unigen eval shapes``: captioning accuracy, generation prompt fidelity, edits, scene fidelity and the scene
box tasks on the Shapes world; a task is one entry of ``TASK_RUNNERS``."""

from __future__ import annotations

import argparse
from pathlib import Path

from unigen.commands._common import add_model_arguments, check_writable_file, load_pipeline
from unigen.generation.sampling_options import add_image_sampling_arguments, options_from_args, positive_int, seed_int

HELP = ("Evaluate a model on an embedded world (shapes): caption accuracy, generation prompt fidelity, edit "
        "accuracy, scene fidelity, the scene box tasks (grounding, referring, placed generation) and chat.")
BOX_TASKS = ("grounding", "referring", "placed")  # unigen.shapes.scene_tasks.TASKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("world", choices=["shapes"], help="the world to evaluate on (see docs/)")
    add_model_arguments(p)
    p.add_argument("--n", type=positive_int, default=200,
                   help="items per task, drawn uniformly from the 576 (default 200); scenes, grounding, referring, "
                        "placed: items per category")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for the items and for sampling (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward batch (default 16)")
    add_image_sampling_arguments(p, schedule=False)
    p.add_argument("--question", default=None, help="captioning question (default: the model's caption prompt)")
    p.add_argument("--task", choices=TASKS, action="append", default=None,
                   help="a task to evaluate (repeatable; default: captions and generation)")
    p.add_argument("--skip", choices=TASKS, action="append", default=[], help="skip a task (repeatable)")
    p.add_argument("--cfg-drop", choices=["instruction", "image", "both"], default=None,
                   help="edit: what the unconditional row drops (default: unigen.generation.editing.DEFAULT_CFG_DROP)")
    p.add_argument("--canvas", type=canvas_size, default=None,
                   help="grounding and referring: the scenes' canvas, WIDTHxHEIGHT or one side (64, 128, 192, 256; "
                        "default: drawn from these); placed: the prompts' canvas (default 64)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write an HTML page of the scene tasks' scores with example images per category here")
    p.add_argument("--json", type=Path, default=None,
                   help="write all scores to this JSON file (an existing file only if it is an earlier eval result)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --json replace a file that is not an earlier eval result (default: refuse)")


def canvas_size(text: str) -> tuple[int, int]:
    sides = (64, 128, 192, 256)  # unigen.shapes.scenes.CANVAS_SIDES
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) in sides for p in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT or one side, each one of {sides}; got {text!r}")
    width, height = (int(parts[0]), int(parts[-1]))
    return width, height


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
    from unigen.commands._common import check_writable_dir
    from unigen.errors import ArgumentError
    from unigen.generation.editing import DEFAULT_CFG_DROP
    from unigen.processor import check_text
    from unigen.runs import write_json

    options = options_from_args(args)  # every flag and the destination checked before any work
    tasks = [t for t in (args.task or ["captions", "generation"]) if t not in args.skip]
    if not tasks:
        raise ArgumentError("--skip leaves no task to evaluate; choose tasks with --task")
    if args.question is not None:
        check_text(args.question, "question")
    if args.json is not None:
        check_json_destination(args.json, args.overwrite)
    if args.report is not None:
        check_writable_dir(args.report, "--report")
    pipe = load_pipeline(args)
    options = options.with_defaults(pipe.model.config)
    results, records = {}, {}
    for task in (t for t in TASKS if t in tasks):  # in a fixed order, each once
        name, runner = TASK_RUNNERS[task]
        results[name], records[name] = runner(pipe, args, options, keep=args.report is not None)
    print_results(results, options)
    if args.report is not None:
        from unigen.shapes.report import write_scene_tasks_report

        page = write_scene_tasks_report(args.report, results, records)
        print(f"report: {page}")
    if args.json:
        write_json(args.json, {"model": str(args.model), "n": args.n, "seed": args.seed,
                               "guidance_scale": options.guidance_scale, "temperature": options.temperature,
                               "cfg_drop": args.cfg_drop or DEFAULT_CFG_DROP,
                               **results})
    return 0


def print_results(results: dict, options) -> None:
    from unigen.shapes.metrics import format_scene_table, format_table
    from unigen.shapes.scene_eval import format_task_table

    v1 = {k: v for k, v in results.items() if k in ("captioning", "generation", "edit")}
    if v1:
        print(format_table(v1))
    if "scenes" in results:
        print(format_scene_table(results["scenes"]))
    if "chat" in results:
        from unigen.shapes.chat_eval import format_chat_table

        print(format_chat_table(results["chat"]))
    boxes = {k: v for k, v in results.items() if k in BOX_TASKS}
    if boxes:
        print(format_task_table(boxes))
    if "edit" in results:
        edit = results["edit"]
        print(f"edit: changed attribute {edit['changed']:.3f}, kept attributes {edit['kept']:.3f}; by instruction: "
              + ", ".join(f"{a} {r['overall']:.3f} (n={r['n']})" for a, r in edit["by_instruction"].items()))
    if results.keys() & {"generation", "edit", "scenes", "placed"}:
        print(f"images: guidance scale {options.guidance_scale:g}, temperature {options.temperature:g}")


# ---- each task: (pipe, args, options, keep) -> (scores, records) ---------------------------------------------


def _captions(pipe, args, options, keep):
    from unigen.shapes.evaluate import evaluate_captions

    return evaluate_captions(pipe, args.n, args.seed, args.batch_size, args.question, keep=False)


def _generation(pipe, args, options, keep):
    from unigen.shapes.evaluate import evaluate_generation

    return evaluate_generation(pipe, args.n, args.seed, args.batch_size, options=options, keep=False)


def _edit(pipe, args, options, keep):
    from unigen.shapes.evaluate import evaluate_edits

    return evaluate_edits(pipe, args.n, args.seed, args.batch_size, options=options, cfg_drop=args.cfg_drop,
                                  keep=False)


def _scenes(pipe, args, options, keep):
    from unigen.shapes.evaluate import evaluate_scenes

    return evaluate_scenes(pipe, args.n, args.seed, args.batch_size, options=options, keep=keep)


def _chat(pipe, args, options, keep):  # held-out phrasings, 2-4 turns: unigen.shapes.chat_eval
    from unigen.shapes.chat_eval import evaluate_chat

    return evaluate_chat(pipe, args.n, args.seed, keep=False)


def _box_task(task):
    def run_task(pipe, args, options, keep):
        from unigen.shapes.scene_eval import evaluate_box_task

        return evaluate_box_task(pipe, task, args.n, args.seed, args.batch_size, canvas=args.canvas,
                                       options=options, keep=keep)
    return run_task


# a task is one entry: its --task name -> (the key of its scores in the result, its runner)
TASK_RUNNERS = {"captions": ("captioning", _captions), "generation": ("generation", _generation),
                "edit": ("edit", _edit), "scenes": ("scenes", _scenes), "chat": ("chat", _chat),
                **{task: (task, _box_task(task)) for task in BOX_TASKS}}
TASKS = tuple(TASK_RUNNERS)
RESULT_NAMES = {key for key, _ in TASK_RUNNERS.values()}  # the keys of the scores in an eval result file
