"""``unigen train-siglip --config tokenizers/siglip-shapes.yaml [key=value ...]``"""

from __future__ import annotations

import argparse

from unigen.recipes import resolve

HELP = "train a small SigLIP image encoder (understanding path) from scratch on image-caption pairs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=resolve, help="YAML recipe (see tokenizers/); keys of SigLIPTrainConfig")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. data=pairs.jsonl steps=2000 vision.depth=4 resume=latest")


def run(args: argparse.Namespace) -> int:
    from unigen.config_io import load_config
    from unigen.training.tokenizer.siglip_trainer import SigLIPTrainConfig, train_siglip

    out = train_siglip(load_config(SigLIPTrainConfig, args.config, args.overrides))
    print(f"SigLIP encoder saved to {out}")
    return 0
