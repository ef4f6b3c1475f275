"""Exact resume after SIGKILL, and several processes (torchrun, accelerate launch; DDP and FSDP) training
what one process trains at the same global batch."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from train_common import ENV, cli, kill_in_checkpoint_15, losses, run, train_here, weights

from unigen.shapes import write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3)


def test_sigkill_and_resume_gives_the_same_losses(data, tmp_path):
    # 20 steps: the kill falls in checkpoint 15 with 5 steps still to train after it
    common = ["--stage", "1", f"data={data}", "stage1.steps=20", "stage1.batch_size=8"]
    train_here("--output-dir", tmp_path / "a", *common)  # the killed and resumed runs below are subprocesses
    kill_in_checkpoint_15("--output-dir", tmp_path / "b", "--save-every", 5, *common, ready=tmp_path / "in-ckpt-15")
    ckpts = tmp_path / "b" / "stage1" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-step_0000015", "step_0000005", "step_0000010"]
    assert sorted(p.name for p in (ckpts / "step_0000010").iterdir()) == ["model", "optimizer.pt", "progress.json",
                                                                         "rng_0.pt"]
    # a checkpoint of the earlier layout also held the schedule, which is a function of the step: it resumes the same
    torch.save({"last_epoch": 10}, ckpts / "step_0000010" / "scheduler.pt")
    run(cli("--output-dir", tmp_path / "b", "--save-every", 5, "--resume", "latest", *common))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 21))  # the killed run's extra rows dropped
    assert a == b  # bitwise: JSON floats round-trip exactly
    kept = sorted(p.name for p in (tmp_path / "b" / "stage1" / "checkpoints").iterdir())
    assert kept == ["step_0000010", "step_0000015"]  # keep_last=2, and no half-written .tmp-* folder


@pytest.mark.slow  # three training subprocesses (~70 s); test_run_plan's fast whole run checks the same refusal
def test_a_fresh_run_refuses_to_mix_with_an_earlier_runs_checkpoints(data, tmp_path):
    common = ["--stage", "1", f"data={data}", "stage1.steps=2", "--save-every", 1, "--output-dir", tmp_path]
    run(cli(*common))
    done = subprocess.run(cli(*common), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "pass --resume latest to continue that run" in done.stderr
    assert "overwrite=true to train stage 1 again" in done.stderr and "Traceback" not in done.stderr
    run(cli(*common, "overwrite=true"))


def _same_run(a, b, tol=1e-5):
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    assert all(abs(x - y) < tol for (_, x), (_, y) in zip(la, lb, strict=True)), (la, lb)
    wa, wb = weights(a / "stage1" / "final"), weights(b / "stage1" / "final")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --standalone: torchrun's own rendezvous on a free local port
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "unigen.cli")
GROUPS = "stage1.groups=[aligner,gen_aligner,gen_embed,gen_head,llm]"


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train_here("--stage", 1, f"data={data}", "stage1.steps=4", GROUPS, "--output-dir", out, "stage1.batch_size=8")
    return out


@pytest.mark.slow  # two torchrun processes (~30 s); the FSDP test below keeps 2 processes = 1 in the default run
def test_two_process_ddp_equals_one_process_at_the_same_global_batch(data, one_process, tmp_path):
    run(cli("--stage", 1, f"data={data}", "stage1.steps=4", GROUPS, "--output-dir", tmp_path,
            "stage1.batch_size=4", launcher=TORCHRUN))
    _same_run(one_process, tmp_path)


def test_two_process_fsdp_equals_one_process(data, one_process, tmp_path):
    done = run(cli("--stage", 1, f"data={data}", "stage1.steps=4", GROUPS, "--output-dir", tmp_path,
                   "stage1.batch_size=4", "parallel=fsdp", launcher=TORCHRUN))
    assert "fsdp, 2 process(es)" in done.stderr
    _same_run(one_process, tmp_path)


@pytest.mark.slow  # a second 2-process launch (~40 s); the torchrun FSDP = 1-process test runs by default
def test_accelerate_launch_with_the_shipped_fsdp_config(data, one_process, tmp_path):
    from train_common import REPO

    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "train" / "accelerate-fsdp.yaml"), "--num_processes", "2",
                "--main_process_port", str(free_port()), "-m", "unigen.cli")
    done = run(cli("--stage", 1, f"data={data}", "stage1.steps=4", GROUPS, "--output-dir", tmp_path,
                   "stage1.batch_size=4", "device=cpu", launcher=launcher))
    assert "fsdp, 2 process(es)" in done.stderr
    _same_run(one_process, tmp_path)
    assert json.loads((tmp_path / "recipe.json").read_text())["stage1"]["batch_size"] == 4
