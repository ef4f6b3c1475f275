"""``unigen merge BASE ADAPTER OUT``: fold a LoRA adapter into its base model; OUT is a plain checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from unigen.recipes import resolve

HELP = "Merge a LoRA adapter (a LoRA stage's stageN/adapter) into its base model and save a plain checkpoint."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=resolve, help="the checkpoint the adapter was trained on (any layout unigen loads)")
    p.add_argument("adapter", type=Path, help="the adapter folder (OUTPUT_DIR/stageN/adapter)")
    p.add_argument("out", type=Path, help="where the merged checkpoint goes (unigen's layout + tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def run(args: argparse.Namespace) -> int:
    import shutil

    from unigen.commands._common import check_writable_dir
    from unigen.errors import OutputExistsError
    from unigen.training.lora import check_adapter, load_adapter, merge
    from unigen.training.start import load_pretrained

    check_adapter(args.adapter)  # a wrong or damaged adapter is named before the base loads
    check_writable_dir(args.out, "OUT")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise OutputExistsError(f"{args.out} is not empty: pass --overwrite to replace it, or another OUT")
    model, processor = load_pretrained(args.base)
    merged = merge(load_adapter(model, args.adapter))
    tmp = args.out.with_name(f".tmp-{args.out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(args.out)
    return 0
