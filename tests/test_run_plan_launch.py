"""A whole run (both tokenizers, the codes, three stages) under a real 2-process launch trains what one process
trains at the same global batch: every step's losses to 1e-5, the same codes, and the finished model's logits."""

import pytest
import torch
from test_run_plan import RECIPE, train, unigen
from test_tokenizer_parallel import losses as tokenizer_losses
from test_train_resume import TORCHRUN
from train_common import losses, run

from unigen import UniGenModel
from unigen.shapes import write_dataset

# batch_size is per process in every step, so half of it on each of 2 processes is the 1-process global batch
HALF = [f"{step}.batch_size=2" for step in ("tokenizers.vq", "tokenizers.siglip", "stage1", "stage2", "stage3")]


def step_losses(out) -> dict:
    """{step name: [(step, loss), ...]}: the tokenizers' own metrics, then the stages' rows of the run's."""
    found = {name: tokenizer_losses(out / name) for name in ("vq", "siglip")}
    return found | {f"stage{n}": losses(out, stage=n) for n in (1, 2, 3)}


def outputs(out) -> tuple[torch.Tensor, torch.Tensor]:
    """The finished model's image features of a fixed image and its next-token logits over a fixed text."""
    model = UniGenModel.from_pretrained(out / "stage3" / "final").eval()
    side = model.config.vision.image_size
    pixels = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.arange(32, 40).unsqueeze(0)  # text tokens (the first ids are special, the image placeholder among them)
    with torch.no_grad():
        return model.get_image_features(pixels), model(input_ids=ids).logits


@pytest.mark.slow  # a whole run in one process, then under torchrun with two (~2 min on 2 cores)
def test_a_whole_run_under_torchrun_trains_what_one_process_trains(tmp_path):
    data = write_dataset(tmp_path / "shapes", 16, seed=3)
    recipe = tmp_path / "whole.yaml"
    recipe.write_text(RECIPE)
    assert unigen(*train(recipe, data, tmp_path / "one")[3:]) == 0
    done = run(train(recipe, data, tmp_path / "two", *HALF, launcher=TORCHRUN), timeout=900)
    assert "2 process(es)" in done.stderr

    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {"vq", "siglip", "stage1", "stage2", "stage3"}
    for name in one:
        assert [s for s, _ in one[name]] == [s for s, _ in two[name]], name
        assert max(abs(a - b) for (_, a), (_, b) in zip(one[name], two[name], strict=True)) < 1e-5, name
    assert (tmp_path / "one" / "codes" / "train.jsonl").read_text() == (
        (tmp_path / "two" / "codes" / "train.jsonl").read_text())
    for a, b in zip(outputs(tmp_path / "one"), outputs(tmp_path / "two"), strict=True):
        assert (a - b).abs().max() < 1e-4
