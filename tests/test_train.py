"""The three-stage trainer on a tiny model: staged unfreezing, loss masks, exact resume, data formats."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unigen import UniGenModel
from unigen.shapes import write_dataset
from unigen.train import load_recipe, run_stage
from unigen.train.batches import IGNORE, BatchBuilder, SupervisionError
from unigen.train.data import ManifestError, read_samples
from unigen.train.loop import build_fresh

SMOKE = Path(__file__).parent.parent / "train" / "smoke.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return write_dataset(root, 24, seed=3)


def recipe(data, out, *overrides):
    return load_recipe(SMOKE, [f"data={data}", f"output_dir={out}", *overrides])


def weights(path):
    return UniGenModel.from_pretrained(path).state_dict()


def changed_groups(before, after):
    from unigen.param_groups import GROUPS

    top = {v: k for k, v in GROUPS.items()}
    out = {}
    for k in before:
        out.setdefault(top[k.split(".")[0]], []).append(not torch.equal(before[k], after[k]))
    return {g for g, flags in out.items() if any(flags)}, {g for g, flags in out.items() if not any(flags)}


def test_each_stage_trains_exactly_its_modules(data, tmp_path):
    r = recipe(data, tmp_path, "stage1.steps=1", "stage2.steps=1", "stage3.steps=1")
    initial = build_fresh(r, read_samples(data))[0].state_dict()
    finals = [run_stage(r, s, progress=False) for s in (1, 2, 3)]
    states = [initial] + [weights(f) for f in finals]
    trained, frozen = changed_groups(states[0], states[1])
    assert trained == {"aligner", "gen_aligner", "gen_embed", "gen_head"}
    assert {"llm", "vision_encoder", "vq"} <= frozen
    trained, frozen = changed_groups(states[1], states[2])
    assert trained == {"aligner", "gen_aligner", "gen_embed", "gen_head", "llm"}
    assert {"vision_encoder", "vq"} <= frozen
    trained, frozen = changed_groups(states[2], states[3])
    assert trained == {"aligner", "gen_aligner", "gen_embed", "gen_head", "llm", "vision_encoder"}
    assert "vq" in frozen
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 1), (2, 1), (3, 1)]
    assert all({"loss", "lr", "stage"} <= r.keys() for r in rows)
    assert (tmp_path / "recipe.json").is_file()


def test_loss_masks_token_by_token(data, tmp_path):
    r = recipe(data, tmp_path, "caption_dropout=0.5")
    model, processor = build_fresh(r, read_samples(data))
    samples = read_samples(data)[:2]
    b = BatchBuilder(model, processor, r.question, r.caption_dropout)
    u = b.understanding(samples)
    eos = model.config.tokens.eos
    for row, (ids, tgt, mask) in enumerate(zip(u["input_ids"], u["targets"], u["attention_mask"], strict=True)):
        supervised = (tgt != IGNORE).nonzero()[:, 0]
        answer = processor.tokenizer(" " + samples[row].caption, add_special_tokens=False).input_ids
        assert tgt[supervised].tolist() == answer + [eos]
        n = int(mask.sum())
        assert supervised.tolist() == list(range(n - len(answer) - 1, n))  # the last prompt position onwards
        assert torch.equal(tgt[supervised[:-1]], ids[supervised[:-1] + 1])  # targets are the next tokens
        assert (ids[: n - len(answer)] == model.config.tokens.image).sum() == model.config.vision.num_tokens
    g = b.generation(samples * 8, torch.rand(16, generator=torch.Generator().manual_seed(0)) < 0.5)
    assert g["codes"].shape == (16, model.config.vq.num_tokens)
    keep = {model.config.tokens.bos, model.config.tokens.image_start, model.config.tokens.cfg_pad,
            model.config.tokens.pad}
    for row, dropped in zip(g["input_ids"], g["dropped"], strict=True):
        assert row[-1] == model.config.tokens.image_start
        assert (set(row.tolist()) <= keep) == bool(dropped)
    assert 0 < int(g["dropped"].sum()) < 16
    t = b.text([type(samples[0])(line=9, text="a red circle")])
    assert t["targets"][0, -1] == eos and t["targets"][0, :-1].tolist() == t["input_ids"][0, 1:].tolist()


def test_zero_supervised_tokens_names_the_sample(data, tmp_path):
    manifest = tmp_path / "m.jsonl"
    img = Path(data).parent / read_samples(data)[0].image.relative_to(Path(data).parent)
    manifest.write_text(json.dumps({"image": str(img), "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "   "}]}) + "\n")
    r = recipe(manifest, tmp_path / "run", "stage1.mixture=[1,0,0]")
    with pytest.raises(SupervisionError, match="manifest line 1: .* no supervised tokens"):
        run_stage(r, 1, progress=False)


def run_cli(out, data, *extra):
    cmd = [sys.executable, "-m", "unigen.cli", "train", "--config", str(SMOKE), "--stage", "1",
           "--output-dir", str(out), f"data={data}", "stage1.steps=30", "stage1.batch_size=8", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(path):
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # a resumed run rewrites the steps after its checkpoint


def test_sigkill_and_resume_gives_the_same_losses(data, tmp_path):
    assert run_cli(tmp_path / "a", data).wait() == 0
    proc = run_cli(tmp_path / "b", data, "--save-every", "5")
    ckpt = tmp_path / "b" / "stage1" / "checkpoints" / "step_0000010"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert run_cli(tmp_path / "b", data, "--save-every", "5", "--resume", "latest").wait() == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert a == b  # bitwise: JSON floats round-trip exactly


def test_manifest_formats(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"image": "a.png", "caption": "a red circle"},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                             {"from": "gpt", "value": "a circle"}]},
        {"text": "just text"},
    ]) + "\n")
    s = read_samples(tmp_path / "m.jsonl")
    assert [x.tasks for x in s] == [["understanding", "generation"], ["understanding"], ["text"]]
    assert s[0].image == tmp_path / "a.png" and s[1].question == "What?" and s[1].answer == "a circle"
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a cat"}) + "\n")
    folder = read_samples(tmp_path)
    assert folder[0].caption == "a cat" and folder[0].image == tmp_path / "a.png"


@pytest.mark.parametrize("line, message", [
    ("{not json", "m.jsonl:2: not valid JSON"),
    ('{"image": "a.png"}', "m.jsonl:2: image line needs a non-empty 'caption'"),
    ('{"foo": 1}', "m.jsonl:2: needs 'image'"),
    ('[1, 2]', "m.jsonl:2: expected a JSON object"),
])
def test_malformed_manifest_lines_are_named(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=message):
        read_samples(tmp_path / "m.jsonl")


def test_bad_images_are_skipped_and_listed(data, tmp_path):
    lines = Path(data).read_text().splitlines()
    root = Path(data).parent
    rows = [json.loads(x) for x in lines]
    for row in rows:
        row["image"] = str(root / row["image"])
    (tmp_path / "corrupt.png").write_bytes(b"nope")
    rows += [{"image": str(tmp_path / "missing.png"), "caption": "a red circle"},
             {"image": str(tmp_path / "corrupt.png"), "caption": "a red circle"}]
    (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    run_stage(recipe(tmp_path / "m.jsonl", tmp_path / "run", "stage1.steps=1"), 1, progress=False)
    bad = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert [b["line"] for b in bad] == [len(lines) + 1, len(lines) + 2]
    assert "missing.png" in bad[0]["image"] and "corrupt.png" in bad[1]["image"]


def test_nan_loss_stops_with_a_clear_message(data, tmp_path, monkeypatch):
    import unigen.train.loop as loop

    real = loop.task_loss
    monkeypatch.setattr(loop, "task_loss", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    with pytest.raises(FloatingPointError, match="stage 1 step 0: the loss is nan; stopping"):
        run_stage(recipe(data, tmp_path), 1, progress=False)


def test_unknown_recipe_key_and_missing_previous_stage(data, tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) in .*\['stage1_steps'\]"):
        recipe(data, tmp_path, "stage1_steps=3")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in .*stage1.*\['stepz'\]"):
        recipe(data, tmp_path, "stage1.stepz=3")
    with pytest.raises(FileNotFoundError, match="stage 2 starts from stage 1's final weights"):
        run_stage(recipe(data, tmp_path), 2, progress=False)


def test_cli_overrides_may_follow_options_and_checkpointing_bf16_run(data, tmp_path, capsys):
    from unigen.cli import main

    rc = main(["train", "--config", str(SMOKE), f"data={data}", "--output-dir", str(tmp_path), "--stage", "1",
               "grad_checkpointing=true", "bf16=true", "stage1.steps=2"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((tmp_path / "recipe.json").read_text())["grad_checkpointing"] is True
    with pytest.raises(SystemExit):
        main(["train", "--config", str(SMOKE), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_method_b_trains_cross_attention_in_every_stage_and_keeps_the_llm_frozen(data, tmp_path):
    r = recipe(data, tmp_path, "model.fusion=cross_attention", "model.cross_attention_every=1", "stage1.steps=1",
               "stage2.steps=1")
    first = run_stage(r, 1, progress=False)
    before, after = weights(first), weights(run_stage(r, 2, progress=False))
    trained, frozen = changed_groups(before, after)
    assert "cross_attention" in trained and "llm" in frozen  # Llama 3.2 Vision default: text behaviour kept


def test_two_process_ddp_equals_one_process_at_the_same_global_batch(data, tmp_path):
    common = ["train", "--config", str(SMOKE), "--stage", "1", f"data={data}", "stage1.steps=4",
              "stage1.groups=[aligner,gen_aligner,gen_embed,gen_head,llm]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "unigen.cli", *common, "--output-dir", str(tmp_path / "one"), "stage1.batch_size=8"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "unigen.cli", *common, "--output-dir", str(tmp_path / "two"), "stage1.batch_size=4"]
    for cmd in (one, two):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    wa, wb = weights(tmp_path / "one" / "stage1" / "final"), weights(tmp_path / "two" / "stage1" / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
