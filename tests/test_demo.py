"""The Shapes demo pipeline end to end on a few steps of everything (the real run is `make demo`)."""

import json

import torch

from unigen.shapes.demo import DemoConfig, run_demo


def test_demo_pipeline_runs_end_to_end(tmp_path):
    # a recipe override of the model's shape reaches the tokenizers: they are trained in the recipe's shape
    page = run_demo(DemoConfig(out_dir=str(tmp_path), n_train=300, vq_steps=3, vq_warmup_steps=1, siglip_steps=3,
                               stage_steps=(2, 2, 2), n_eval=4, threads=2,
                               overrides=("model.vq.channel_mult=[1,1,2,2]", "model.vision.depth=2")))
    html = page.read_text()
    assert "Generated from prompts" in html and "Captions of held-out images" in html
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["scores"]["captioning"]["n"] == 4 and scores["scores"]["generation"]["n"] == 4
    timings = set(scores["timings_s"])
    assert {"data", "stage 1", "stage 2", "stage 3"} <= timings
    # both tokenizers on the CPU with two threads: side by side, the SigLIP encoder in a second process; on an
    # accelerator one after the other
    side_by_side = "VQ tokenizer + SigLIP encoder, side by side" in timings
    assert side_by_side or {"VQ tokenizer", "SigLIP encoder"} <= timings
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        assert side_by_side
    # the demo is train/from-scratch.yaml's whole run, each step in its folder of model/
    run = tmp_path / "model"
    assert (run / "siglip" / "model.safetensors").is_file() and (run / "vq" / "model.safetensors").is_file()
    assert (run / "stage3" / "final" / "config.json").is_file()
    assert {"VQ codes", "caption eval", "generation eval"} <= timings
    stage_data = json.loads((run / "stage1" / "recipe.json").read_text())
    assert stage_data["data"] == str(run / "codes" / "train.jsonl") and stage_data["vq_from"] == str(run / "vq")
    assert len(list((tmp_path / "images").glob("gen_*.png"))) == 8 + 4
    config = json.loads((tmp_path / "model" / "stage3" / "final" / "config.json").read_text())
    assert config["vq"]["channel_mult"] == [1, 1, 2, 2] and config["vision"]["depth"] == 2
    assert json.loads((run / "vq" / "config.json").read_text())["channel_mult"] == [1, 1, 2, 2]
    # the recipe's sampling defaults travel in the checkpoint and are recorded with the scores
    assert config["guidance_scale"] == 1.5 and config["temperature"] == 0.4
    assert scores["guidance_scale"] == 1.5 and scores["temperature"] == 0.4


def test_demo_rejects_a_warm_up_as_long_as_the_vq_run_before_any_work(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"--vq-warmup-steps must be in \[0, --vq-steps\) = \[0, 50\), got 100"):
        DemoConfig(out_dir=str(tmp_path), vq_steps=50)
    assert not any(tmp_path.iterdir())
    DemoConfig(out_dir=str(tmp_path), vq_steps=50, vq_from=str(tmp_path / "vq"))  # a reused VQ has no warm-up
