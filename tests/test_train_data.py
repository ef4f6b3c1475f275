"""Trainer data: every manifest format, loss masks token by token, and bad data that never trains silently."""

import json
from pathlib import Path

import pytest
import torch
from train_common import recipe

from unigen.data.manifest import ManifestError, Sample, read_samples
from unigen.shapes import write_dataset
from unigen.training import run_stage
from unigen.training.batches import IGNORE, BatchBuilder, SupervisionError
from unigen.training.mixture import Pick
from unigen.training.start import build_fresh


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3)


def test_loss_masks_token_by_token(data, tmp_path):
    r = recipe(data, tmp_path)
    samples = read_samples(data)
    model, processor = build_fresh(r, samples)
    tokens = model.config.tokens
    b = BatchBuilder(model, processor, r.question)
    u = b.understanding(samples[:2])
    for row, (ids, tgt, mask) in enumerate(zip(u["input_ids"], u["targets"], u["attention_mask"], strict=True)):
        supervised = (tgt != IGNORE).nonzero()[:, 0]
        answer = processor.tokenizer(" " + samples[row].caption, add_special_tokens=False).input_ids
        assert tgt[supervised].tolist() == answer + [tokens.eos]
        n = int(mask.sum())
        assert supervised.tolist() == list(range(n - len(answer) - 1, n))  # the last prompt position onwards
        assert torch.equal(tgt[supervised[:-1]], ids[supervised[:-1] + 1])  # targets are the next tokens
        assert (ids[: n - len(answer)] == tokens.image).sum() == model.config.vision.num_tokens
        assert (tgt[n:] == IGNORE).all()  # right padding is never supervised
    picks = [Pick("generation", s, dropped=i % 2 == 1) for i, s in enumerate(samples[:4])]
    g = b.generation(picks)
    assert g["codes"].shape == (4, model.config.vq.num_tokens)
    keep = {tokens.bos, tokens.image_start, tokens.cfg_pad, tokens.pad}
    for row, dropped in zip(g["input_ids"], g["dropped"], strict=True):
        assert row[-1] == tokens.image_start
        assert (set(row.tolist()) <= keep) == bool(dropped)  # dropped captions: the sampler's CFG prompt
    t = b.text([Sample(line=9, text="a red circle")])
    assert t["targets"][0, -1] == tokens.eos and t["targets"][0, :-1].tolist() == t["input_ids"][0, 1:].tolist()
    # a two-turn conversation supervises both answers and neither question
    conv = Sample(line=3, image=samples[0].image, turns=[("What colour?", "red"), ("What shape?", "circle")])
    ids, tgt = b.understanding_row(conv)
    supervised = [t for t in tgt if t != IGNORE]
    red, circle = (processor.tokenizer(" " + w, add_special_tokens=False).input_ids for w in ("red", "circle"))
    assert supervised == red + [tokens.eos] + circle + [tokens.eos]


def test_zero_supervised_tokens_names_the_sample(data, tmp_path):
    manifest = tmp_path / "m.jsonl"
    img = read_samples(data)[0].image
    manifest.write_text(json.dumps({"image": str(img), "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "   "}]}) + "\n")
    r = recipe(manifest, tmp_path / "run", "stage1.mixture=[1,0,0]")
    with pytest.raises(SupervisionError, match="manifest line 1: .*no supervised tokens"):
        run_stage(r, 1, progress=False)


def test_manifest_formats(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"image": "a.png", "caption": "a red circle"},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                             {"from": "gpt", "value": "a circle"}]},
        {"text": "just text"},
        {"image": "a.png", "caption": "a blue square", "codes": [1, 2, 3]},
    ]) + "\n")
    s = read_samples(tmp_path / "m.jsonl")
    assert [x.tasks for x in s] == [["understanding", "generation"], ["understanding"], ["text"],
                                    ["understanding", "generation"]]
    assert s[0].image == tmp_path / "a.png" and s[1].turns == [("What?", "a circle")] and s[3].codes == [1, 2, 3]
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


def test_pre_extracted_codes_are_checked(data, tmp_path):
    r = recipe(data, tmp_path)
    sample = read_samples(data)[0]
    model, processor = build_fresh(r, [sample])
    b = BatchBuilder(model, processor, r.question)
    n = model.config.vq.num_tokens
    ours = b.codes_for([sample])[0]
    given = Sample(line=7, image=sample.image, caption=sample.caption, codes=ours.tolist())
    assert torch.equal(BatchBuilder(model, processor, r.question).codes_for([given])[0], ours)
    with pytest.raises(SupervisionError, match=f"manifest line 7: 3 pre-extracted codes; the VQ makes {n}"):
        b.codes_for([Sample(line=7, image=sample.image, caption="x", codes=[1, 2, 3])])


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
    run_stage(recipe(tmp_path / "m.jsonl", tmp_path / "run", "stage1.steps=1", "max_bad_fraction=0.1"), 1,
              progress=False)
    bad = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert [b["line"] for b in bad] == [len(lines) + 1, len(lines) + 2]
    assert bad[0]["file"].endswith("missing.png") and bad[0]["reason"] == "missing"
    assert bad[1]["file"].endswith("corrupt.png") and bad[1]["reason"].startswith("unreadable: ")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    from unigen.training.step import TrainStep

    real = TrainStep.generation
    calls = {"n": 0}

    def poisoned(self, b):
        calls["n"] += 1
        loss = real(self, b)
        return loss * float("nan") if calls["n"] > 2 else loss  # steps 0 and 1 are fine

    monkeypatch.setattr(TrainStep, "generation", poisoned)
    r = recipe(data, tmp_path, "save_every=1", "stage1.mixture=[0,0,1]")
    with pytest.raises(FloatingPointError, match=r"stage 1 step 2: the loss is nan; stopping. The last good "
                                                 r"checkpoint is .*step_0000002"):
        run_stage(r, 1, progress=False)
    assert (tmp_path / "stage1" / "checkpoints" / "step_0000002" / "model" / "config.json").is_file()
