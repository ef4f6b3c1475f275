"""``unigen train-siglip --config tokenizers/siglip-shapes.yaml --output-dir DIR [--resume latest] [key=value ...]``"""

from __future__ import annotations

import argparse

from unigen.commands._training import add_run_arguments, hold_run_folder, run_overrides
from unigen.recipes import resolve

HELP = "train a small SigLIP image encoder (understanding path) from scratch on image-caption pairs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=resolve, help="YAML recipe (see tokenizers/); keys of SigLIPTrainConfig")
    add_run_arguments(parser, "where the encoder, its checkpoints and metrics.jsonl go (default: the recipe's "
                              "out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. data=pairs.jsonl steps=2000 vision.depth=4")


def run(args: argparse.Namespace) -> int:
    from unigen.config_io import load_config
    from unigen.training.tokenizer.siglip_trainer import SigLIPTrainConfig, train_siglip

    cfg = load_config(SigLIPTrainConfig, args.config, run_overrides(args))
    with hold_run_folder(cfg.out_dir):
        out = train_siglip(cfg)
    print(f"SigLIP encoder saved to {out}")
    return 0
