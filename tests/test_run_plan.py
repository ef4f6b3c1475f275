"""A whole run in one command (unigen.training.run_plan): a recipe's ``tokenizers:`` train the VQ and the SigLIP
encoder, then the VQ codes and the three stages, each in its folder; ``--resume latest`` continues whichever step
was interrupted (SIGKILL in a tokenizer, in a stage) to results bitwise equal to an uninterrupted run."""

import json
import logging
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from train_common import ENV, weights

from unigen.errors import ConfigError
from unigen.shapes import write_dataset
from unigen.training import load_recipe
from unigen.training.run_plan import make_plan

# the smoke model (train/smoke.yaml) with two tiny tokenizers in its shape, a checkpoint every 2 steps of each
RECIPE = """
tokenizer_vocab: 256
model: {preset: smoke}
tensorboard: false
save_every: 2
tokenizers:
  vq: {steps: 4, batch_size: 4, lr: 3.0e-3, warmup_steps: 0, val_size: 0, eval_every: 4, save_every: 2,
       sample_images: 0, usage_window: 1000, device: cpu}
  siglip: {steps: 4, batch_size: 4, lr: 3.0e-3, warmup_steps: 0, val_size: 0, eval_every: 4, save_every: 2,
           device: cpu, embed_dim: 32, text: {width: 32, depth: 1, num_heads: 2, max_len: 16}}
stage1: {steps: 2, batch_size: 4, lr: 1.0e-3, warmup_steps: 1}
stage2: {steps: 6, batch_size: 4, lr: 3.0e-4, warmup_steps: 1}
stage3: {steps: 2, batch_size: 4, lr: 1.0e-4, warmup_steps: 1}
"""
STEPS = ("vq", "siglip", "stage1", "stage2", "stage3")

# `unigen ARGS` that stops when a step (argv[2], "vq:4" or "stage2:4") is about to write that checkpoint: it
# touches argv[1] and waits to be killed, so the kill falls mid-step at a known point
STOP_AT_CHECKPOINT = """
import pathlib, sys, time
from unigen.training import checkpoints
folder, step = sys.argv[2].split(":")
def stop():
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(600)
publish_checkpoint = checkpoints._publish  # every trainer's checkpoints go through it
def publish(tmp, final, rank):
    if final.parent.parent.name == folder and final.name == f"step_{int(step):07d}":
        stop()
    publish_checkpoint(tmp, final, rank)
checkpoints._publish = publish
from unigen.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 16, seed=3)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "whole.yaml"
    path.write_text(RECIPE)
    return path


def train(recipe, data, out, *args, launcher=(sys.executable, "-m", "unigen.cli")):
    return [*launcher, "train", "--config", str(recipe), f"data={data}", "--output-dir", str(out), *map(str, args)]


def run(cmd, ok=True):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


def unigen(*argv) -> int:
    """``unigen train ...`` in this process (one thread, as the subprocesses): the fast tests' runs."""
    from unigen.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def whole_run(recipe, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert unigen(*train(recipe, data, out)[3:]) == 0
    return out


def outputs(out) -> dict:
    """What every step of a run trained: tensors by step, and the coded manifest."""
    found = {name: load_file(out / name / "model.safetensors") for name in ("vq", "siglip")}
    found.update({f"stage{n}": weights(out / f"stage{n}" / "final") for n in (1, 2, 3)})
    found["codes"] = (out / "codes" / "train.jsonl").read_text()
    return found


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], str):
            assert a[name] == b[name], name
            continue
        assert a[name].keys() == b[name].keys(), name
        unequal = [k for k in a[name] if not a[name][k].equal(b[name][k])]
        assert not unequal, (name, unequal[:5])


def test_a_recipe_with_tokenizer_steps_trains_them_then_the_stages_on_their_outputs(recipe, data, whole_run, caplog,
                                                                                    capsys):
    from unigen.training.tokenizer.siglip_trainer import load_siglip
    from unigen.training.tokenizer.vq_trainer import load_vq

    out = whole_run
    assert {p.name for p in out.iterdir()} >= {*STEPS, "codes", "run.json", "recipe.json", "metrics.jsonl"}
    # the stages start from the run's own tokenizers, on the data with their codes
    stage = json.loads((out / "stage1" / "recipe.json").read_text())
    assert (stage["vq_from"], stage["siglip_from"]) == (str(out / "vq"), str(out / "siglip"))
    assert stage["data"] == str(out / "codes" / "train.jsonl")
    first = weights(out / "stage1" / "final")
    vq, siglip = load_vq(out / "vq").state_dict(), load_siglip(out / "siglip").state_dict()
    assert all(first[f"gen_vision_model.{k}"].equal(v) for k, v in vq.items())  # the VQ never trains
    assert all(first[f"vision_model.{k}"].equal(v) for k, v in siglip.items())  # frozen in stage I
    lines = [json.loads(x) for x in (out / "codes" / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and all(len(x["codes"]) == load_vq(out / "vq").config.num_tokens for x in lines)
    assert lines[0]["image"] == str(data.parent / json.loads(data.read_text().splitlines()[0])["image"])

    # a finished run resumed retrains nothing: every step is recognised as complete and left as it is
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    caplog.set_level(logging.INFO, logger="unigen.training")
    assert unigen(*train(recipe, data, out, "--resume", "latest")[3:]) == 0
    kept = [r.getMessage() for r in caplog.records if r.getMessage().endswith("--resume latest keeps it")]
    assert [m.split(" already")[0] for m in kept] == ["VQ tokenizer", "SigLIP encoder", "VQ codes", "stage 1",
                                                      "stage 2", "stage 3"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a fresh run over it is refused before anything trains, and a changed recipe does not resume
    capsys.readouterr()
    assert unigen(*train(recipe, data, out)[3:]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {out / 'vq'} holds an earlier run's output: pass --resume latest to continue that run (complete "
        "steps are kept), overwrite=true to train it again, or another --output-dir")
    assert unigen(*train(recipe, data, out, "--resume", "latest", "tokenizers.vq.lr=0.01")[3:]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --resume latest: {out} was started with another recipe (tokenizers.vq.lr: 0.003 then, 0.01 now); "
        "resume with the recipe and overrides it started with, or start again (overwrite=true, or another "
        "--output-dir)")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

def kill_at(recipe, data, out, where: str) -> None:
    """Run the whole recipe into ``out`` and SIGKILL it as step ``where`` ("vq:4") is about to save."""
    ready = out.parent / f"{out.name}-ready"
    launcher = (sys.executable, "-c", STOP_AT_CHECKPOINT, str(ready), where)
    killed = subprocess.Popen(train(recipe, data, out, launcher=launcher), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # not a race: the run cannot go past that checkpoint on its own
    while not ready.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists(), f"the run never reached {where}"
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL


# slow: a killed and a resumed whole run in subprocesses, over a minute each on 2 shared cores
@pytest.mark.slow
@pytest.mark.parametrize("where", ["vq:4", "stage2:4"])
def test_a_run_killed_in_a_step_resumes_to_the_uninterrupted_runs_results(where, recipe, data, whole_run, tmp_path):
    out = tmp_path / "run"
    kill_at(recipe, data, out, where)
    folder = out / where.split(":")[0]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name[0] != ".") == ["step_0000002"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and folder not in p.parents}
    done = run(train(recipe, data, out, "--resume", "latest"))
    if where.startswith("stage2"):  # the steps done before it are kept, not trained again
        assert done.stderr.count("--resume latest keeps it") == 4  # vq, siglip, codes, stage 1
        kept = [p for p in before if p.parent.name in ("vq", "siglip", "codes") or "stage1" in p.parts]
        assert kept and all(p.stat().st_mtime_ns == before[p] for p in kept)
    assert "resumed" in done.stderr
    assert_same(outputs(out), outputs(whole_run))


def test_a_whole_runs_recipe_is_checked_before_anything_trains(recipe, data, tmp_path, capsys, monkeypatch):
    from unigen.config import UniGenConfig

    def plan(*overrides):
        return make_plan(load_recipe(recipe, [f"output_dir={tmp_path / 'run'}", *overrides]))

    with pytest.raises(ConfigError, match=r"^tokenizers.vq: no images to train on; set data=PATH or "
                                          r"tokenizers.images=PATH$"):
        plan()
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) in tokenizers: \['llm'\]; known keys: \['codes', "
                                          r"'images', 'side_by_side', 'siglip', 'vq'\]$"):
        plan(f"data={data}", "tokenizers.llm.steps=3")
    with pytest.raises(ConfigError, match=r"^vq_from=runs/vq and tokenizers.vq both give the run its VQ tokenizer; "
                                          r"drop one of them \(tokenizers.vq=null keeps vq_from\)$"):
        plan(f"data={data}", "vq_from=runs/vq")
    with pytest.raises(ConfigError, match=r"^tokenizers.siglip.out_dir: the run sets it"):
        plan(f"data={data}", "tokenizers.siglip.out_dir=elsewhere")
    with pytest.raises(ConfigError, match=r"^tokenizers.vq: its images nowhere.jsonl do not exist"):
        plan(f"data={data}", "tokenizers.images=nowhere.jsonl")
    # a step of null trains none: the VQ named by vq_from still codes the data
    whole = plan(f"data={data}", "tokenizers.vq=null", "vq_from=runs/vq")
    assert list(whole.tokenizers) == ["siglip"] and whole.recipe.vq_from == "runs/vq"
    assert whole.codes == (data, tmp_path / "run" / "codes" / "train.jsonl")
    assert whole.tokenizers["siglip"].vision == UniGenConfig.from_dict(whole.recipe.model).vision  # the model's shape
    assert not (tmp_path / "run").exists()
    # a later stage alone needs the tokenizer steps done; under a launcher a discriminator cannot train
    assert unigen(*train(recipe, data, tmp_path / "run", "--stage", 2)[3:]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'run' / 'vq'} is not complete: this run's tokenizer steps come before stage 1; run from "
        "stage 1 (with --resume latest to keep what is done)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert unigen(*train(recipe, data, tmp_path / "run", "tokenizers.vq.disc_weight=0.1")[3:]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: tokenizers.vq.disc_weight=0.1: the PatchGAN discriminator trains in one process (its BatchNorm would "
        "normalise each process's share of the batch); run this recipe without a launcher until its VQ step is "
        "done, then --resume latest under it")
    assert not (tmp_path / "run").exists()  # nothing written: no run.json, no folder


def max_steps_run(recipe, data, out, caplog) -> None:
    """``--max-steps 2`` over a fresh run: the VQ stops at its step 2, and the run with it."""
    caplog.set_level(logging.WARNING, logger="unigen.training")
    assert unigen(*train(recipe, data, out, "--max-steps", 2)[3:]) == 0
    assert sorted(p.name for p in (out / "vq" / "checkpoints").iterdir()) == ["step_0000002"]
    assert not (out / "vq" / "model.safetensors").exists()  # not a finished tokenizer: no later step may use it
    assert not (out / "siglip").exists() and not (out / "codes").exists() and not (out / "stage1").exists()
    assert [r.getMessage() for r in caplog.records if "--max-steps" in r.getMessage()] == [
        "VQ tokenizer stopped at --max-steps before its end; --resume latest continues it, then the steps after it "
        "(they need it whole)"]


def test_max_steps_cuts_the_tokenizer_steps_too(recipe, data, tmp_path, caplog):
    max_steps_run(recipe, data, tmp_path / "run", caplog)


@pytest.mark.slow  # a whole run after the cut one (~1 min); the cut alone runs by default
def test_a_run_cut_by_max_steps_resumes_to_the_uninterrupted_runs_results(recipe, data, whole_run, tmp_path, caplog):
    out = tmp_path / "run"
    max_steps_run(recipe, data, out, caplog)
    assert unigen(*train(recipe, data, out, "--resume", "latest")[3:]) == 0
    assert_same(outputs(out), outputs(whole_run))
