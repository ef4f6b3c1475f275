"""``unigen train-vq --config tokenizers/vq-shapes.yaml --output-dir DIR [--resume latest] [key=value ...]``"""

from __future__ import annotations

import argparse

from unigen.commands._training import add_run_arguments, hold_run_folder, run_overrides
from unigen.recipes import resolve

HELP = "train a VQ-16 image tokenizer (generation path) on a folder of images or a JSONL manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=resolve, help="YAML recipe (see tokenizers/); keys of VQTrainConfig")
    add_run_arguments(parser, "where the tokenizer, its checkpoints and metrics.jsonl go (default: the recipe's "
                              "out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. data=images/ steps=2000 vq.codebook_size=512")


def run(args: argparse.Namespace) -> int:
    from unigen.config_io import load_config
    from unigen.training.tokenizer.vq_trainer import VQTrainConfig, train_vq

    cfg = load_config(VQTrainConfig, args.config, run_overrides(args))
    with hold_run_folder(cfg.out_dir):
        out = train_vq(cfg)
    print(f"VQ tokenizer saved to {out}")
    return 0
