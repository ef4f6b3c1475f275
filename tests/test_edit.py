"""Image editing: the Shapes edit world and its score, the edit task's rows and loss token by token, pipe.edit's
guidance against a hand-built computation, `unigen edit` / `unigen eval shapes --task edit`, and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from train_common import recipe

from unigen.cli import main
from unigen.editing import CFG_DROPS, edit_prompt_ids, keeps_image
from unigen.errors import ArgumentError
from unigen.pipeline import UniGenPipeline
from unigen.shapes import write_dataset
from unigen.shapes.checker import check
from unigen.shapes.editing import Edit, sample_edits, write_edit_dataset
from unigen.shapes.metrics import edit_accuracy
from unigen.shapes.render import render
from unigen.shapes.world import ATTRIBUTES, ShapeSpec
from unigen.train import run_stage
from unigen.train.batches import BatchBuilder
from unigen.train.data import ManifestError, check_images, read_samples
from unigen.train.mixture import Pick
from unigen.train.start import build_fresh
from unigen.train.step import TrainStep


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A manifest of 12 caption lines and 12 edit lines (one folder, so relative paths resolve)."""
    root = tmp_path_factory.mktemp("shapes-edit")
    captions = write_dataset(root, 12, seed=3)
    edits = write_edit_dataset(root, 12, seed=4)
    mixed = root / "mixed.jsonl"
    mixed.write_text(captions.read_text() + edits.read_text())
    return mixed


@pytest.fixture(scope="module")
def pipe(tiny_hf_janus):
    return UniGenPipeline.from_pretrained(tiny_hf_janus[1])


# ---- the Shapes edit world --------------------------------------------------------------------------

def test_edits_follow_the_protocol_and_render_their_triples(data):
    edits = sample_edits(400, seed=0)
    assert edits == sample_edits(400, seed=0) and edits != sample_edits(400, seed=1)
    assert all(getattr(e.source, e.attribute) != e.value for e in edits)  # the new value always differs
    assert {e.attribute for e in edits} == set(ATTRIBUTES)
    e = Edit(ShapeSpec("red", "circle", "large", "top left"), "position", "bottom right")
    assert e.instruction == "move it to the bottom right" and e.target == ShapeSpec("red", "circle", "large",
                                                                                      "bottom right")
    assert Edit(e.source, "shape", "diamond").instruction == "turn it into a diamond"
    assert Edit(e.source, "color", "blue").instruction == "make it blue"
    assert Edit(e.source, "size", "small").instruction == "make it small"
    edit_lines = [s for s in read_samples(data) if s.instruction is not None]
    assert len(edit_lines) == 12 and all(s.tasks == ["generation"] for s in edit_lines)
    for s, truth in zip(edit_lines, sample_edits(12, seed=4), strict=True):
        assert s.instruction == truth.instruction
        assert check(Image.open(s.image)) == truth.source and check(Image.open(s.target)) == truth.target


def test_edit_accuracy_reads_changed_and_kept_attributes():
    edits = sample_edits(40, seed=2)
    right = edit_accuracy((e, render(e.target, [9, i]).pil()) for i, e in enumerate(edits))
    assert right["overall"] == right["changed"] == right["kept"] == 1.0
    unchanged = edit_accuracy((e, render(e.source, [9, i]).pil()) for i, e in enumerate(edits))
    assert unchanged["overall"] == unchanged["changed"] == 0.0 and unchanged["kept"] == 1.0
    for attribute in ATTRIBUTES:  # the attribute an edit changes is wrong in the unchanged image, the others right
        share = sum(e.attribute != attribute for e in edits) / len(edits)
        assert unchanged["per_attribute"][attribute] == pytest.approx(share)
    assert sum(r["n"] for r in unchanged["by_instruction"].values()) == 40


# ---- the edit task in the trainer -------------------------------------------------------------------

def test_edit_rows_and_loss_token_by_token(data, tmp_path):
    r = recipe(data, tmp_path)
    samples = read_samples(data)
    model, processor = build_fresh(r, samples)
    t = model.config.tokens
    b = BatchBuilder(model, processor, r.question)
    edit, caption = next(s for s in samples if s.instruction), samples[0]
    picks = [Pick("generation", edit), *(Pick("generation", edit, True, d) for d in CFG_DROPS),
             Pick("generation", caption)]
    batch = b.generation(picks)
    n_img = model.config.vision.num_tokens
    rows = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert rows[0] == edit_prompt_ids(processor, edit.instruction)
    assert rows[0][-1] == t.image_start and rows[0].count(t.image) == n_img
    instruction_ids = processor.tokenizer(edit.instruction, add_special_tokens=False).input_ids[-1:]  # the value
    dropped = dict(zip(CFG_DROPS, rows[1:4], strict=True))
    for drop, row in dropped.items():  # same length, BOS and the final <begin_of_image> kept, the rest as named
        assert len(row) == len(rows[0]) and row[0] == t.bos and row[-1] == t.image_start
        assert (row.count(t.image) == n_img) == keeps_image(drop)
        assert any(i in row for i in instruction_ids) == (drop == "image")
    assert set(dropped["both"][1:-1]) == {t.cfg_pad}
    # pixel_values: the sources of the rows that read them (the edit, and the one with its instruction dropped)
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][0], processor.understanding_pixels([edit.image])[0])
    # the codes are the target's, not the source's
    target_codes = model.encode_image_tokens(processor.generation_pixels([edit.target]))[0]
    assert torch.equal(batch["codes"][0], target_codes)
    assert not torch.equal(target_codes, model.encode_image_tokens(processor.generation_pixels([edit.image]))[0])

    # the loss, by hand: one full sequence per row, its source features in its placeholders; every prompt position
    # but the last unsupervised, then each position predicts the next target code
    model.eval()
    step = TrainStep(model)
    with torch.no_grad():
        loss = step({"generation": {**batch, "weight": 1.0}})[TrainStep_index()]
        features = iter(model.get_image_features(batch["pixel_values"]))
        total = torch.zeros(())
        for row, codes in zip(rows, batch["codes"], strict=True):
            ids = torch.tensor(row)
            embeds = model.embed_text(ids[None])[0]
            if t.image in row:
                embeds[ids == t.image] = next(features).to(embeds.dtype)
            embeds = torch.cat([embeds, model.embed_image_tokens(codes[None, :-1])[0]])
            targets = torch.tensor([-100] * (len(row) - 1) + codes.tolist())
            assert (targets != -100).sum() == len(codes)  # only the target codes are supervised
            hidden = model.run_decoder(embeds[None]).last_hidden_state[0]
            logits = model.gen_head(hidden)
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    assert loss.item() == pytest.approx(total.item(), rel=1e-4)


def TrainStep_index():
    from unigen.train.recipe import TASKS

    return TASKS.index("generation")


def test_training_mixes_edits_and_skips_unreadable_targets(data, tmp_path):
    lines = data.read_text().splitlines()
    (data.parent / "corrupt.png").write_bytes(b"not a png")
    broken = dict(json.loads(lines[-1]), target="corrupt.png")
    manifest = data.parent / "broken.jsonl"
    manifest.write_text("\n".join([*lines, json.dumps(broken)]) + "\n")
    samples, bad = check_images(read_samples(manifest))
    assert [x["line"] for x in bad] == [len(lines) + 1] and "corrupt.png" in bad[0]["image"]
    run_stage(recipe(manifest, tmp_path / "run", "stage1.steps=2", "stage1.mixture=[1,0,3]"), 1, progress=False)
    listed = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert listed == bad
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(x["loss_generation"])) for x in rows)


@pytest.mark.parametrize(("line", "message"), [
    ({"image": "a.png", "instruction": "make it blue"},
     r"m.jsonl:1: an edit line needs 'image', 'instruction' and 'target'; 'target' is missing"),
    ({"image": "a.png", "target": "b.png"}, r"m.jsonl:1: an edit line needs .* 'instruction' is missing"),
    ({"image": "a.png", "instruction": "  ", "target": "b.png"},
     r"m.jsonl:1: 'instruction' must be a non-empty string"),
    ({"instruction": "make it blue", "target": "b.png"}, r"m.jsonl:1: needs 'image'"),
])
def test_bad_edit_lines_are_named(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ManifestError, match=message):
        read_samples(tmp_path / "m.jsonl")


# ---- sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop", CFG_DROPS)
def test_pipe_edit_is_the_hand_built_guided_computation(pipe, drop):
    """Greedy: each code is the argmax of u + s (c - u), c and u from full uncached forwards of the conditional
    row (source features in its placeholders) and of the unconditional row this drop makes."""
    model, processor = pipe.model, pipe.processor
    sources = [render(ShapeSpec("red", "circle", "large", "top left"), 0).pil(),
               render(ShapeSpec("blue", "square", "small", "center"), 1).pil()]
    instructions = ["make it blue", "move it to the top"]
    out = pipe.edit(sources, instructions, num_images_per_prompt=2, guidance_scale=3.0, temperature=0,
                    cfg_drop=drop)
    assert out.tokens.shape == (4, model.config.vq.num_tokens) and len(out.images) == 4
    assert torch.equal(out.tokens[0], out.tokens[1]) and torch.equal(out.tokens[2], out.tokens[3])
    with torch.no_grad():
        for i, (source, text) in enumerate(zip(sources, instructions, strict=True)):
            codes = out.tokens[2 * i][None]
            pixels = processor.understanding_pixels([source])
            cond = torch.tensor([edit_prompt_ids(processor, text)])
            uncond = torch.tensor([edit_prompt_ids(processor, text, drop)])
            c = model.image_logits(cond, codes, None, pixels)
            u = model.image_logits(uncond, codes, None, pixels if keeps_image(drop) else None)
            assert torch.equal((u + 3.0 * (c - u)).argmax(-1), codes)
    unguided = pipe.edit(sources[0], instructions[0], guidance_scale=1.0, temperature=0, cfg_drop=drop).tokens
    with torch.no_grad():
        c = model.image_logits(torch.tensor([edit_prompt_ids(processor, instructions[0])]), unguided, None,
                              processor.understanding_pixels(sources[:1]))
    assert torch.equal(c.argmax(-1), unguided)


def test_pipe_edit_names_bad_arguments(pipe):
    img = Image.new("RGB", (16, 16))
    with pytest.raises(ArgumentError, match="the instruction is empty"):
        pipe.edit(img, "   ")
    with pytest.raises(ArgumentError, match="instruction 2 is empty"):
        pipe.edit([img, img], ["make it red", ""])
    with pytest.raises(ArgumentError, match="2 images but 3 instructions"):
        pipe.edit([img, img], ["a", "b", "c"])
    with pytest.raises(ArgumentError, match=r"cfg_drop must be one of \['instruction', 'image', 'both'\]"):
        pipe.edit(img, "make it red", cfg_drop="text")
    with pytest.raises(ArgumentError, match="must not contain <image_placeholder>"):
        pipe.edit(img, "<image_placeholder> make it red")


def test_cli_edit_and_eval_edit(tiny_hf_janus, tmp_path, capsys):
    model = str(tiny_hf_janus[1])
    render(ShapeSpec("red", "circle", "large", "top left"), 0).pil().save(tmp_path / "src.png")
    args = ["edit", str(tmp_path / "src.png"), str(tmp_path / "src.png"), "make it blue", "--model", model,
            "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--temperature", "0"]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000-src.png", "001-src.png"]
    assert Image.open(tmp_path / "out" / "000-src.png").mode == "RGB"
    capsys.readouterr()
    assert main(args) == 1  # earlier outputs are kept unless --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "src.png"), "", "--model", model]) == 2
    assert "the instruction is empty" in capsys.readouterr().err
    scores = tmp_path / "scores.json"
    assert main(["eval", "shapes", "--model", model, "--task", "edit", "--n", "3", "--json", str(scores),
                 "--device", "cpu", "--cfg-drop", "image"]) == 0
    result = json.loads(scores.read_text())
    assert set(result) >= {"edit", "cfg_drop"} and "captioning" not in result and result["cfg_drop"] == "image"
    assert result["edit"]["n"] == 3 and set(result["edit"]) >= {"changed", "kept", "per_attribute"}


def test_instruction_words_join_a_caption_trained_tokenizer(tmp_path):
    import shutil
    from pathlib import Path

    from unigen.errors import CheckpointError
    from unigen.shapes.editing import add_instruction_words

    # the Method B checkpoint keeps the caption-trained tokenizer; the editing one has the words already
    checkpoints = Path(__file__).resolve().parents[1] / "checkpoints"
    shipped = checkpoints / "shapes-small-b"
    (tmp_path / "editing").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shipped / name, tmp_path / name)
        shutil.copy(checkpoints / "shapes-small" / name, tmp_path / "editing" / name)
    assert add_instruction_words(tmp_path / "editing", vocab_size=256) == []
    from transformers import AutoTokenizer

    before = AutoTokenizer.from_pretrained(str(tmp_path))
    added = add_instruction_words(tmp_path, vocab_size=256)
    assert set(added) >= {"make", "turn", "into", "move"} and add_instruction_words(tmp_path, 256) == []
    after = AutoTokenizer.from_pretrained(str(tmp_path))
    for e in sample_edits(20, seed=0):
        ids = after(e.instruction, add_special_tokens=False).input_ids
        assert after.unk_token_id not in ids and max(ids) < 256
    caption = "a large red circle at the top left"  # what the checkpoint was trained on keeps its ids
    assert after(caption).input_ids == before(caption).input_ids
    with pytest.raises(CheckpointError, match="do not fit the model's vocab_size 10"):
        shutil.copy(shipped / "tokenizer.json", tmp_path / "tokenizer.json")
        add_instruction_words(tmp_path, vocab_size=10)


@pytest.mark.slow
def test_demo_trains_and_scores_edits(tmp_path):
    from unigen.commands.demo import _tasks
    from unigen.shapes.demo import DemoConfig, run_demo

    assert _tasks("caption, generation,edit") == ("caption", "generation", "edit")
    page = run_demo(DemoConfig(out_dir=str(tmp_path), n_train=100, vq_steps=3, vq_warmup_steps=1, siglip_steps=3,
                               stage_steps=(2, 2, 2), n_eval=3, threads=2, tasks=("caption", "generation", "edit")))
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert {k: v["n"] for k, v in scores["scores"].items()} == {"captioning": 3, "generation": 3, "edit": 3}
    assert "edit data" in scores["timings_s"] and "edit eval" in scores["timings_s"]
    assert "Edits of held-out images" in page.read_text() and len(list((tmp_path / "images").glob("edit_*"))) == 6
    lines = (tmp_path / "data" / "train-codes-edit.jsonl").read_text().splitlines()
    assert sum('"instruction"' in x for x in lines) == 100 and len(lines) == 200
