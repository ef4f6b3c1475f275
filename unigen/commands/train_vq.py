"""``unigen train-vq --config tokenizers/vq-shapes.yaml [key=value ...]``"""

from __future__ import annotations

import argparse

from unigen.recipes import resolve

HELP = "train a VQ-16 image tokenizer (generation path) on a folder of images or a JSONL manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=resolve, help="YAML recipe (see tokenizers/); keys of VQTrainConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. data=images/ steps=2000 vq.codebook_size=512 resume=latest")


def run(args: argparse.Namespace) -> int:
    from unigen.config_io import load_config
    from unigen.training.tokenizer.vq_trainer import VQTrainConfig, train_vq

    out = train_vq(load_config(VQTrainConfig, args.config, args.overrides))
    print(f"VQ tokenizer saved to {out}")
    return 0
