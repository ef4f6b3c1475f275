"""Helpers shared by the trainer tests (tests/test_train_*.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from unigen import UniGenModel
from unigen.training import load_recipe

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
    from unigen.models.param_groups import GROUPS

    top = {v: k for k, v in GROUPS.items()}
    out = {}
    for k in before:
        out.setdefault(top[k.split(".")[0]], []).append(not torch.equal(before[k], after[k]))
    return {g for g, flags in out.items() if any(flags)}, {g for g, flags in out.items() if not any(flags)}


def cli(*args, launcher=(sys.executable, "-m", "unigen.cli")):
    return [*launcher, "train", "--config", str(SMOKE), *map(str, args), "tensorboard=false"]


def train_here(*args) -> None:
    """``unigen train`` on the smoke recipe in this process (one thread, as the subprocesses of ``cli``): the same run
    without a second interpreter's start-up, for the reference side of a comparison."""
    from unigen.cli import main

    assert main(cli(*args)[3:]) == 0


def run(cmd, timeout=300):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# `unigen ARGS` that, when every process has written checkpoint step 15 but before it is renamed into place,
# touches the file argv[1] and waits to be killed: a kill in the middle of a checkpoint write, at a known point
STOP_IN_CHECKPOINT_15 = """
import pathlib, sys, time
from unigen.training import checkpoints
publish = checkpoints._publish
def stop(tmp, final, rank):
    if final.name == "step_0000015":
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(600)
    publish(tmp, final, rank)
checkpoints._publish = stop
from unigen.cli import main
sys.exit(main(sys.argv[2:]))
"""


def kill_in_checkpoint_15(*args, ready: Path) -> None:
    """Run ``unigen train ARGS`` (``--save-every 5``) and SIGKILL it in the middle of writing checkpoint 15."""
    import signal
    import time

    killed = subprocess.Popen(cli(*args, launcher=(sys.executable, "-c", STOP_IN_CHECKPOINT_15, str(ready))),
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # not a race: the run cannot go past checkpoint 15 on its own
    while not ready.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists(), "the run never reached checkpoint 15"
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
