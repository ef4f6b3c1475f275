"""Staged unfreezing: each stage trains exactly its modules; stage chaining; recipe validation; logging."""

import json
from pathlib import Path

import pytest
import torch
from train_common import SMOKE, changed_groups, metrics, recipe, weights

from unigen.data.manifest import read_samples
from unigen.shapes import write_dataset
from unigen.training import load_recipe, run_stage
from unigen.training.start import build_fresh


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3)


def test_each_stage_trains_exactly_its_modules(data, tmp_path):
    r = recipe(data, tmp_path, "stage1.steps=1", "stage2.steps=1", "stage3.steps=1", "tensorboard=true")
    initial = build_fresh(r, read_samples(data))[0].state_dict()
    finals = [run_stage(r, s, progress=False) for s in (1, 2, 3)]  # II and III start from the previous final
    states = [initial] + [weights(f) for f in finals]
    heads = {"aligner", "gen_aligner", "gen_embed", "gen_head"}
    expected = {1: heads, 2: heads | {"llm"}, 3: heads | {"llm", "vision_encoder"}}
    for stage in (1, 2, 3):
        trained, frozen = changed_groups(states[stage - 1], states[stage])
        assert trained == expected[stage], stage
        assert frozen == {"vision_encoder", "vq", "llm", *heads} - expected[stage], stage
    rows = metrics(tmp_path)
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 1), (2, 1), (3, 1)]
    assert all({"loss", "lr", "stage", "step", "tokens_per_s"} <= r.keys() for r in rows)
    assert {k for k in rows[2] if k.startswith("lr_")} == {f"lr_{g}" for g in expected[3]}
    assert json.loads((tmp_path / "recipe.json").read_text())["stage1"]["steps"] == 1
    assert (tmp_path / "stage2" / "recipe.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    assert {"stage1/loss", "stage1/loss_generation", "stage1/lr/gen_head", "stage3/lr/vision_encoder",
            "stage2/tokens_per_s"} <= set(tags)


def test_lr_multipliers_and_explicit_groups(data, tmp_path):
    r = recipe(data, tmp_path, "stage1.steps=2", "stage1.warmup_steps=0", "stage1.lr_mult={gen_head: 0.5}",
               "stage1.groups=[gen_head, llm]", "stage1.mixture=[0, 0, 1]")
    before = build_fresh(r, read_samples(data))[0].state_dict()
    trained, _ = changed_groups(before, weights(run_stage(r, 1, progress=False)))
    assert trained == {"gen_head", "llm"}
    first = metrics(tmp_path)[0]
    assert first["lr_gen_head"] == pytest.approx(0.5 * first["lr"]) and first["lr_llm"] == first["lr"]
    assert set(first) >= {"loss_generation"} and "loss_understanding" not in first


def test_method_b_trains_cross_attention_in_every_stage_and_keeps_the_llm_frozen(data, tmp_path):
    r = recipe(data, tmp_path, "model.fusion=cross_attention", "model.cross_attention_every=1", "stage1.steps=1",
               "stage2.steps=1")
    before = weights(run_stage(r, 1, progress=False))
    trained, frozen = changed_groups(before, weights(run_stage(r, 2, progress=False)))
    assert "cross_attention" in trained and "llm" in frozen  # Llama 3.2 Vision default: text behaviour kept


def test_task_loss_weighting_averages_the_tasks_mean_losses(data, tmp_path):
    from unigen.training.stage import task_weights

    counts = torch.tensor([9.0, 0.0, 64.0], dtype=torch.float64)  # a caption, no text, one image's codes
    assert task_weights(counts, "token").tolist() == [1 / 73] * 3
    assert task_weights(counts, "task").tolist() == [1 / 18, 0.0, 1 / 128]
    run_stage(recipe(data, tmp_path, "stage1.steps=3", "stage1.mixture=[1, 0, 1]", "loss_weighting=task"), 1,
              progress=False)
    for row in metrics(tmp_path):  # the logged objective is the one trained
        means = [row[k] for k in ("loss_understanding", "loss_text", "loss_generation") if k in row]
        assert row["loss"] == pytest.approx(sum(means) / len(means))


@pytest.mark.parametrize("override, message", [
    ("loss_weighting=tokens", "loss_weighting must be token or task, got 'tokens'"),
    ("stage1_steps=3", r"unknown key\(s\) in .*\['stage1_steps'\]"),
    ("stage1.stepz=3", r"unknown key\(s\) in .*stage1.*\['stepz'\]"),
    ("stage2.lr_mult={llm_head: 2}", r"stage2.lr_mult: unknown parameter group\(s\) \['llm_head'\]"),
    ("stage1.groups=[vq]", "stage1.groups: the VQ tokenizer stays frozen"),
    ("stage1.mixture=[1, 2]", r"stage1.mixture must be 3 non-negative weights"),
    ("stage3.batch_size=0", "stage3.batch_size must be >= 1"),
    ("stage1.lr=fast", "stage1.lr must be a float"),
])
def test_recipe_errors_name_the_key(data, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        recipe(data, tmp_path, override)


def test_stage_chaining_and_task_checks(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 2 starts from stage 1's final weights"):
        run_stage(recipe(data, tmp_path), 2, progress=False)
    text_only = tmp_path / "text.jsonl"
    text_only.write_text('{"text": "a red circle"}\n')
    with pytest.raises(ValueError, match=r"stage 1 mixture .* selects no task the data has"):
        run_stage(recipe(text_only, tmp_path / "a"), 1, progress=False)
    root = Path(data).parent
    rows = [{**json.loads(x), "text": None} for x in Path(data).read_text().splitlines()]
    rows = [{"image": str(root / r["image"]), "caption": r["caption"]} for r in rows] + [{"text": "a red circle"}]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"stage 1: the mixture gives text weight 1.0, but none of the modules"):
        run_stage(recipe(mixed, tmp_path / "b", "stage1.mixture=[1, 1, 1]"), 1, progress=False)


def test_method_b_starts_from_a_base_checkpoint(data, tmp_path):
    """add_cross_attention_every: a concat start gets cross-attention blocks whose gates training opens, every base
    weight is kept, and the next stage continues the Method B model as saved (no second conversion)."""
    base = run_stage(recipe(data, tmp_path / "a", "stage1.steps=1"), 1, progress=False)
    r = recipe(data, tmp_path / "b", "add_cross_attention_every=1", "stage2.steps=1", "stage2.train_llm=true",
               "stage3.steps=1", "stage3.train_llm=true")
    b2 = run_stage(r, 2, init_from=str(base), progress=False)
    config = json.loads((Path(b2) / "config.json").read_text())
    assert config["fusion"] == "cross_attention" and config["cross_attention_image_positions"] is True
    after = weights(b2)
    assert set(weights(base)) < set(after)
    assert {k.split(".")[0] for k in set(after) - set(weights(base))} == {"cross_attn_layers"}
    trained, _ = changed_groups(weights(base), {k: v for k, v in after.items() if not k.startswith("cross_attn")})
    assert "llm" in trained
    gates = [v for k, v in after.items() if k.endswith("_gate")]
    assert len(gates) == 2 * 2 and all(g.abs().item() > 0 for g in gates)  # opened from zero by training
    b3 = run_stage(r, 3, progress=False)  # from stage 2's Method B weights: same blocks, no second conversion
    assert set(weights(b3)) == set(after)
    with pytest.raises(ValueError, match="add_cross_attention_every must be >= 1"):
        recipe(data, tmp_path / "c", "add_cross_attention_every=0")


def test_cli_overrides_after_options_checkpointing_bf16_and_init_from(data, tmp_path, capsys):
    from unigen.cli import main

    rc = main(["train", "--config", str(SMOKE), f"data={data}", "--output-dir", str(tmp_path / "a"), "--stage", "1",
               "grad_checkpointing=true", "bf16=true", "stage1.steps=2", "tensorboard=false"])
    assert rc == 0
    assert [r["step"] for r in metrics(tmp_path / "a")] == [1, 2]
    assert json.loads((tmp_path / "a" / "recipe.json").read_text())["grad_checkpointing"] is True
    # --init-from: stage 2 of another output dir starts from these weights
    start = tmp_path / "a" / "stage1" / "final"
    assert main(["train", "--config", str(SMOKE), "--stage", "2", "--init-from", str(start), "--max-steps", "1",
                 "--output-dir", str(tmp_path / "b"), f"data={data}", "tensorboard=false"]) == 0
    trained, frozen = changed_groups(weights(start), weights(tmp_path / "b" / "stage2" / "final"))
    assert "llm" in trained and "vision_encoder" in frozen
    with pytest.raises(SystemExit):
        main(["train", "--config", str(SMOKE), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_janus_defaults_and_optimizer(data, tmp_path):
    from unigen.models.param_groups import set_trainable
    from unigen.training.stage import make_optimizer

    r = load_recipe(SMOKE, ["data=x"])
    assert r.stage1.groups == ["aligner", "gen_aligner", "gen_embed", "gen_head"]
    assert "llm" in r.stage2.groups and "vision_encoder" in r.stage3.groups
    assert (r.stage1.mixture, r.stage2.mixture, r.stage3.mixture) == ((1, 0, 3), (2, 3, 5), (5, 1, 4))
    assert r.caption_dropout == 0.1 and r.grad_clip == 1.0
    model = build_fresh(recipe(data, tmp_path), read_samples(data))[0]
    set_trainable(model, r.stage1.groups)
    opt = make_optimizer(model, set(r.stage1.groups), r.stage1)
    assert {g["name"] for g in opt.param_groups} == set(r.stage1.groups)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


@pytest.mark.parametrize("fmt", ["janus-pro", "janus"])
def test_fresh_word_tokenizer_knows_every_word_of_its_prompts(data, tmp_path, fmt):
    r = recipe(data, tmp_path, f"model.prompt_format={fmt}")
    _, processor = build_fresh(r, read_samples(data))
    tok = processor.tokenizer
    assert processor.format.user == {"janus-pro": "<|User|>", "janus": "User"}[fmt]
    for text in (processor.format.understanding(r.question, processor.system_prompt),
                 processor.format.generation("a small red circle at the top")):
        assert tok.unk_token_id not in tok(text)["input_ids"], tok.tokenize(text)


def test_bf16_auto_turns_mixed_precision_on_only_where_bf16_is_native(monkeypatch):
    from unigen.training.parallel import make_accelerator

    recipe = load_recipe(None, ["bf16=auto", "device=cpu"])
    # an AVX2-only CPU emulates bf16 at several times the fp32 cost: "auto" must leave it off there
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert make_accelerator(recipe, 1).mixed_precision == "no"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert make_accelerator(recipe, 1).mixed_precision == "bf16"
    assert make_accelerator(load_recipe(None, ["bf16=false", "device=cpu"]), 1).mixed_precision == "no"
    with pytest.raises(ValueError, match="bf16 must be true, false or auto, got 'fp16'"):
        load_recipe(None, ["bf16=fp16"])


def test_a_stage_cut_short_is_continued_by_resume_latest(data, tmp_path):
    from train_common import losses

    from unigen.training.checkpoints import is_complete, trained_steps

    run_stage(recipe(data, tmp_path / "a", "stage1.steps=4"), 1, progress=False)
    r = recipe(data, tmp_path / "b", "stage1.steps=4")
    cut = run_stage(r, 1, max_steps=2, progress=False)
    assert trained_steps(cut) == (2, 4) and not is_complete(cut)
    assert run_stage(r, 1, resume="latest", progress=False) == cut
    assert trained_steps(cut) == (4, 4) and is_complete(cut)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # continued exactly where it stopped
    before = (cut / "model.safetensors").read_bytes()
    assert run_stage(r, 1, resume="auto", progress=False) == cut  # finished: kept as it is
    assert (cut / "model.safetensors").read_bytes() == before


def test_later_stages_that_no_longer_follow_are_set_aside_not_kept(data, tmp_path):
    r = recipe(data, tmp_path, "stage1.steps=1", "stage2.steps=2", "stage3.steps=1")
    run_stage(r, 1, progress=False)
    run_stage(r, 2, max_steps=1, progress=False)  # cut short
    run_stage(r, 3, progress=False)  # trained from stage 2's partial weights
    old_stage3 = (tmp_path / "stage3" / "final" / "model.safetensors").read_bytes()
    run_stage(r, 2, resume="latest", progress=False)  # stage 2 continues: stage 3 no longer follows from it
    aside = tmp_path / "stage3.stale-1" / "final" / "model.safetensors"
    assert aside.read_bytes() == old_stage3 and not (tmp_path / "stage3").exists()
    run_stage(r, 3, resume="latest", progress=False)
    assert (tmp_path / "stage3" / "final" / "model.safetensors").read_bytes() != old_stage3
    rows = [(row["stage"], row["step"]) for row in metrics(tmp_path)]
    assert rows == [(1, 1), (2, 1), (2, 2), (3, 1)]  # the log reads as the one run that the weights are
