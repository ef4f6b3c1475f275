"""Flags shared by the commands that load a model: --model, --device, --dtype."""

from __future__ import annotations

import argparse

from unigen.recipes import resolve

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=resolve,
                   help="checkpoint directory (any layout unigen loads) or hub id")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where to run: auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")


def load_pipeline(args: argparse.Namespace):
    import torch

    from unigen.pipeline import UniGenPipeline, resolve_device

    try:
        device = resolve_device(args.device)  # before loading: a missing CUDA/MPS is named without a traceback
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return UniGenPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
