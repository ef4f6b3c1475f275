"""``unigen demo``: the Shapes world end to end, trained from scratch on this machine."""

from __future__ import annotations

import argparse

from unigen.commands._common import DeprecatedFlag
from unigen.generation.sampling_options import positive_int, seed_int
from unigen.recipes import resolve

HELP = "Train and evaluate a unified model on the Shapes world from scratch; writes DIR/index.html."


def _tasks(text: str) -> tuple[str, ...]:
    from unigen.shapes.demo import DEMO_TASKS

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown or no task(s) {unknown}; choose from {','.join(DEMO_TASKS)}")
    return tasks


def add_arguments(p: argparse.ArgumentParser) -> None:
    from unigen.shapes.data import DATASET_STYLES
    from unigen.shapes.demo import DEMO_TASKS, DemoConfig

    d = DemoConfig()
    p.add_argument("--output-dir", default=d.out_dir, help=f"output folder (default {d.out_dir})")
    p.add_argument("--out-dir", action=DeprecatedFlag, new="--output-dir", dest="output_dir")
    p.add_argument("--n-train", type=positive_int, default=d.n_train, help=f"training images (default {d.n_train})")
    p.add_argument("--vq-steps", type=positive_int, default=d.vq_steps,
                   help=f"VQ tokenizer steps (default {d.vq_steps})")
    p.add_argument("--vq-warmup-steps", type=int, default=d.vq_warmup_steps,
                   help=f"of those, autoencoder warm-up steps before the k-means codebook init (default "
                   f"{d.vq_warmup_steps})")
    p.add_argument("--siglip-steps", type=positive_int, default=d.siglip_steps,
                   help=f"SigLIP encoder steps (default {d.siglip_steps})")
    p.add_argument("--stage-steps", type=positive_int, nargs=3, default=None, metavar=("I", "II", "III"),
                   help="steps of the three stages (default: the recipe's)")
    p.add_argument("--n-eval", type=positive_int, default=d.n_eval,
                   help=f"evaluation items per task (default {d.n_eval})")
    p.add_argument("--seed", type=seed_int, default=d.seed,
                   help=f"seed of the data, the training and the evaluation (default {d.seed})")
    p.add_argument("--threads", type=positive_int, default=d.threads,
                   help="CPU threads (default 2); with 2 or more the VQ tokenizer and the SigLIP encoder train side "
                   "by side in two processes (1: one after the other, bitwise repeatable)")
    p.add_argument("--config", default=d.recipe, type=resolve,
                   help="training recipe (default train/from-scratch.yaml; without a tokenizers: section the Shapes "
                   "tokenizers are trained)")
    p.add_argument("--recipe", action=DeprecatedFlag, new="--config", dest="config", type=resolve)
    p.add_argument("--vq-from", default=None, help="reuse this trained VQ tokenizer instead of training one")
    p.add_argument("--siglip-from", default=None, help="reuse this trained SigLIP encoder instead of training one")
    p.add_argument("--tasks", type=_tasks, default=d.tasks,
                   help=f"comma-separated tasks to train and score, of {','.join(DEMO_TASKS)} (default "
                   f"{','.join(d.tasks)}); edit adds --n-train Shapes edit triples to the training data")
    p.add_argument("--render-style", choices=DATASET_STYLES, default=d.render_style,
                   help=f"how the training images are drawn: the spec's whole range, the classic look, or both "
                   f"alternating (default {d.render_style})")
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. stage2.lr=5e-4; the tokenizers "
                   "are trained in the recipe's model.vq / model.vision shape, e.g. model.vq.codebook_size=256")


def run(args: argparse.Namespace) -> int:
    from unigen.output_lock import hold_output_dir
    from unigen.shapes.demo import DemoConfig, run_demo

    stage_steps = tuple(args.stage_steps) if args.stage_steps else None
    config = DemoConfig(out_dir=args.output_dir, n_train=args.n_train, vq_steps=args.vq_steps,
                        vq_warmup_steps=args.vq_warmup_steps, siglip_steps=args.siglip_steps,
                        stage_steps=stage_steps, n_eval=args.n_eval,
                        seed=args.seed, threads=args.threads, recipe=args.config, vq_from=args.vq_from,
                        siglip_from=args.siglip_from, overrides=tuple(args.overrides), tasks=args.tasks,
                        render_style=args.render_style)
    with hold_output_dir(config.out_dir, "--output-dir"):  # checked flags first: a refused run makes no folder
        run_demo(config)
    return 0
