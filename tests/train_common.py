"""Helpers shared by the trainer tests (tests/test_train_*.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from unigen import UniGenModel
from unigen.train import load_recipe

REPO = Path(__file__).parent.parent
SMOKE = REPO / "train" / "smoke.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def recipe(data, out, *overrides):
    return load_recipe(SMOKE, [f"data={data}", f"output_dir={out}", "tensorboard=false", *overrides])


def weights(path):
    return UniGenModel.from_pretrained(path).state_dict()


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out, stage=1):
    return [(r["step"], r["loss"]) for r in metrics(out) if r["stage"] == stage]


def changed_groups(before, after):
    """(groups with a changed tensor, groups left bit-identical)."""
    from unigen.param_groups import GROUPS

    top = {v: k for k, v in GROUPS.items()}
    out = {}
    for k in before:
        out.setdefault(top[k.split(".")[0]], []).append(not torch.equal(before[k], after[k]))
    return {g for g, flags in out.items() if any(flags)}, {g for g, flags in out.items() if not any(flags)}


def cli(*args, launcher=(sys.executable, "-m", "unigen.cli")):
    return [*launcher, "train", "--config", str(SMOKE), *map(str, args), "tensorboard=false"]


def run(cmd, timeout=300):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
