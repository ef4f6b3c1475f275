"""Faults around a training run's folder (issue 35) and the one CLI vocabulary of the three trainers.

One writer per folder: ``train``, ``train-vq`` and ``train-siglip`` hold their output folder's lock for the whole
run; a second run refuses in one line naming the holder's PID and leaves the first run's files as they were; a
lock left by a killed process never blocks. A checkpoint that cannot be written (a full disk) is one line and
leaves no temp folder. A damaged LoRA adapter in a checkpoint is one line when the stage resumes. The old
``out_dir=`` / ``resume=`` spellings still work, with a one-line warning."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import tree_hashes
from train_common import SMOKE

from unigen.cli import main
from unigen.shapes import write_dataset

VQ = ["train-vq", "steps=1", "val_size=0", "device=cpu", "sample_images=0", "batch_size=2", "save_every=1",
      "vq={image_size: 16, base_channels: 16, channel_mult: [1, 2], num_res_blocks: 1, z_channels: 16, embed_dim: 4, "
      "codebook_size: 16, norm_groups: 8}"]
SIGLIP = ["train-siglip", "steps=1", "val_size=0", "device=cpu", "batch_size=2", "embed_dim=16",
          "vision={image_size: 16, patch_size: 8, width: 16, depth: 1, num_heads: 2}",
          "text={width: 16, depth: 1, num_heads: 2, max_len: 8}"]
HOLD = """
import sys
from unigen.commands._training import hold_run_folder
with hold_run_folder(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shapes"), 8, seed=3)


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (as a run in progress does) until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    assert proc.stdout.readline() == "holding\n"
    return proc


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


# slow: a holder subprocess and a training run per case (~17 s each); the lock's refusal, its PID and a killed
# holder are tested by default in test_output_lock, and the stage's copy of this test below runs by default
@pytest.mark.slow
@pytest.mark.parametrize("argv", [VQ, SIGLIP], ids=["train-vq", "train-siglip"])
def test_a_second_tokenizer_run_on_a_held_folder_refuses_and_the_first_result_stays(argv, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, f"data={data}", "--output-dir", str(out)]) == 0  # the first run's result
    first = holder(out)
    before = tree_hashes(out)
    try:
        # overwrite=true would delete the first run's checkpoints, were the folder not held
        assert main([*argv, f"data={data}", "--output-dir", str(out), "overwrite=true"]) == 1
        lines = errors(capsys)
        assert len(lines) == 1 and f"is in use by another unigen run (PID {first.pid})" in lines[0], lines
        assert tree_hashes(out) == before
    finally:
        first.stdin.close()
        first.wait()
    # the holder's lock died with it: the folder is free again
    assert main([*argv, f"data={data}", "--output-dir", str(out), "--resume", "latest"]) == 0


@pytest.mark.slow  # a holder process and two trainings (~16 s); test_output_lock checks the same lock by default
def test_a_second_train_on_a_held_folder_refuses_and_a_killed_holder_never_blocks(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", str(SMOKE), "tensorboard=false", "--stage", "1", f"data={data}", "--output-dir",
            str(out), "stage1.steps=1", "stage1.batch_size=2"]
    first = holder(out)
    try:
        assert main(args) == 1
        lines = errors(capsys)
        assert len(lines) == 1 and f"in use by another unigen run (PID {first.pid})" in lines[0], lines
        assert sorted(p.name for p in out.iterdir()) == [".unigen.lock"]  # nothing of the second run
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main(args) == 0, capsys.readouterr().err  # a stale lock from a killed process
    assert (out / "stage1" / "final" / "config.json").is_file()


def test_old_spellings_warn_once_and_still_work(data, tmp_path, capsys):
    out = tmp_path / "vq"
    assert main([*VQ, f"data={data}", f"out_dir={out}"]) == 0
    assert main([*VQ, f"data={data}", f"out_dir={out}", "resume=latest"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: out_dir= is deprecated; pass --output-dir") == 2
    assert err.count("warning: resume= is deprecated; pass --resume latest instead") == 1
    assert main([*VQ, f"data={data}", f"out_dir={out}", "--output-dir", str(out)]) == 2  # a usage error
    assert errors(capsys) == [f"error: out_dir={out} and --output-dir both name the output folder; pass --output-dir "
                              "only"]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("command", ["train", "train-vq"])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temp_folder(command, data, tmp_path, capsys,
                                                                                     monkeypatch):
    out = tmp_path / "run"
    if command == "train":  # the stage's model weights; the first write is the --save-every 1 checkpoint
        monkeypatch.setattr("unigen.training.checkpoints.save_model", _disk_full)
        argv = ["train", "--config", str(SMOKE), "tensorboard=false", "--stage", "1", f"data={data}",
                "stage1.steps=2", "stage1.batch_size=2", "--save-every", "1"]
        writing = out / "stage1" / "checkpoints" / "step_0000001"
    else:  # the tokenizer's weights (safetensors' writer)
        monkeypatch.setattr("unigen.training.tokenizer.vq_trainer.save_file", _disk_full)
        argv = [*VQ, f"data={data}"]
        writing = out / "checkpoints" / "step_0000001"
    assert main([*argv, "--output-dir", str(out)]) == 1
    lines = errors(capsys)
    assert lines == [f"error: no space left on the disk of {writing.parent} while writing {writing}; free some space "
                     "there (the last complete checkpoint is kept), then continue with --resume latest"], lines
    assert not [p for p in out.rglob(".tmp-*")], sorted(out.rglob("*"))
    assert not writing.exists()


def test_a_damaged_adapter_in_a_lora_checkpoint_is_one_line_on_resume(data, tmp_path, capsys):
    args = ["train", "--config", str(SMOKE), "tensorboard=false", "--stage", "1", f"data={data}", "--output-dir",
            str(tmp_path / "base-run"), "stage1.steps=1", "stage1.batch_size=2"]
    assert main(args) == 0
    base = tmp_path / "base-run" / "stage1" / "final"
    out = tmp_path / "run"
    lora = ["train", "--config", str(SMOKE), "tensorboard=false", "--stage", "2", f"data={data}", "--output-dir",
            str(out), "--init-from", str(base), "stage2.steps=3", "stage2.batch_size=2", "stage2.lora.r=2"]
    assert main([*lora, "--max-steps", "1"]) == 0
    adapter = out / "stage2" / "checkpoints" / "step_0000001" / "adapter"
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main([*lora, "--resume", "latest"]) == 1
    lines = errors(capsys)
    assert len(lines) == 1 and f"{weights} could not be read as safetensors" in lines[0], lines
    assert "weights_only" not in lines[0]
