"""Image editing: the Shapes edit world and its score, the edit task's rows and loss token by token, pipe.edit's
guidance against a hand-built computation, `unigen edit` / `unigen eval shapes --task edit`, and bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from train_common import recipe

from unigen.cli import main
from unigen.data.checks import check_sample_files
from unigen.data.manifest import ManifestError, read_samples
from unigen.errors import ArgumentError, ConfigError
from unigen.generation.editing import CFG_DROPS, keeps_image
from unigen.generation.pipeline import UniGenPipeline
from unigen.generation.sampling import generate_image_tokens
from unigen.shapes import write_dataset
from unigen.shapes.checker import check
from unigen.shapes.editing import Edit, render_edited, sample_edits, write_edit_dataset
from unigen.shapes.metrics import edit_accuracy
from unigen.shapes.render import placements, render
from unigen.shapes.world import ATTRIBUTES, ShapeSpec
from unigen.training import run_stage
from unigen.training.batches import BatchBuilder
from unigen.training.mixture import Pick
from unigen.training.start import load_start
from unigen.training.step import TrainStep


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
    for i, (s, truth) in enumerate(zip(edit_lines, sample_edits(12, seed=4), strict=True)):
        assert s.instruction == truth.instruction
        assert check(Image.open(s.image)) == truth.source and check(Image.open(s.target)) == truth.target
        source = render(truth.source, [4, i, 0])  # the files are the source and its minimal edit
        assert np.array_equal(np.asarray(Image.open(s.image)), source.image)
        assert np.array_equal(np.asarray(Image.open(s.target)), render_edited(truth, source, [4, i, 1]).image)


def test_minimal_edits_keep_what_they_do_not_change(tmp_path):
    """A target keeps the source's box (colour and shape edits), its colour jitter (all but colour edits) and
    its centre as near as the new side allows (size edits); the checker reads it as the edit's target."""
    for i, e in enumerate(sample_edits(300, seed=7)):
        source = render(e.source, [7, i, 0])
        target = render_edited(e, source, [7, i, 1])
        assert check(target.pil()) == e.target
        assert (target.bbox == source.bbox) == (e.attribute in ("color", "shape"))
        assert (target.rgb == source.rgb) == (e.attribute != "color")
        if e.attribute == "size":  # no allowed place for the new side is nearer the source's centre, per axis
            side = target.bbox[2] - target.bbox[0] + 1
            _, xs, ys = next(o for o in placements(e.target.size, e.target.position) if o[0] == side)
            for axis, allowed in ((0, xs), (1, ys)):
                nearest = min(abs(v + side / 2 - source.center[axis]) for v in allowed)
                assert abs(target.center[axis] - source.center[axis]) == nearest
    # minimal=False draws the target's box and jitter anew (what the first edit checkpoints trained on)
    manifest = write_edit_dataset(tmp_path, 4, seed=4, minimal=False)
    for i, (line, e) in enumerate(zip(manifest.read_text().splitlines(), sample_edits(4, seed=4), strict=True)):
        target = np.asarray(Image.open(tmp_path / json.loads(line)["target"]))
        assert np.array_equal(target, render(e.target, [4, i, 1]).image)


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

@pytest.mark.parametrize("source_codes", [False, True], ids=["siglip-only", "with-source-codes"])
def test_edit_rows_and_loss_token_by_token(data, tmp_path, source_codes):
    r = recipe(data, tmp_path, *(["edit_source_codes=true"] if source_codes else []))
    samples = read_samples(data)
    model, processor = load_start(r, 1, samples, None)  # a fresh model, with the recipe's edit_source_codes
    assert model.config.edit_source_codes is source_codes
    t = model.config.tokens
    slots = model.config.vq.num_tokens if source_codes else 0
    b = BatchBuilder(model, processor, r.question)
    edit, caption = next(s for s in samples if s.instruction), samples[0]
    picks = [Pick("generation", edit), *(Pick("generation", edit, True, d) for d in CFG_DROPS),
             Pick("generation", caption)]
    batch = b.generation(picks)
    n_img = model.config.vision.num_tokens
    rows = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert rows[0] == processor.prompts.edit(edit.instruction)
    last = len(rows[0]) - 1 - slots  # the final <begin_of_image>, then the source-code slots
    assert rows[0][last] == t.image_start and rows[0][last + 1:] == [t.pad] * slots
    assert rows[0].count(t.image) == n_img
    instruction_ids = processor.tokenizer(edit.instruction, add_special_tokens=False).input_ids[-1:]  # the value
    dropped = dict(zip(CFG_DROPS, rows[1:4], strict=True))
    for drop, row in dropped.items():  # same length, BOS and the final <begin_of_image> kept, the rest as named
        assert len(row) == len(rows[0]) and row[0] == t.bos and row[last] == t.image_start
        assert row[last + 1:] == [t.pad] * slots
        assert (row.count(t.image) == n_img) == keeps_image(drop)
        assert any(i in row for i in instruction_ids) == (drop == "image")
    assert set(dropped["both"][1:last]) == {t.cfg_pad}
    # pixel_values: the sources of the rows that read them (the edit, and the one with its instruction dropped)
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][0], processor.understanding_pixels([edit.image])[0])
    # the codes are the target's, not the source's
    target_codes = model.encode_image_tokens(processor.generation_pixels([edit.target]))[0]
    source = model.encode_image_tokens(processor.generation_pixels([edit.image]))[0]
    assert torch.equal(batch["codes"][0], target_codes) and not torch.equal(target_codes, source)
    if source_codes:  # every edit row, dropped or not, reads the source's codes; the caption row none
        assert batch["source_rows"].tolist() == [True] * 4 + [False]
        assert all(torch.equal(c, source) for c in batch["source_codes"]) and len(batch["source_codes"]) == 4
    else:
        assert "source_codes" not in batch

    # the loss, by hand: one full sequence per row, its source features in its placeholders (and its source
    # codes in its slots); every prompt position but the last unsupervised, then each predicts the next target code
    model.eval()
    step = TrainStep(model)
    with torch.no_grad():
        loss = step({"generation": {**batch, "weight": 1.0}})[TrainStep_index()]
        features = iter(model.get_image_features(batch["pixel_values"]))
        total = torch.zeros(())
        for i, (row, codes) in enumerate(zip(rows, batch["codes"], strict=True)):
            ids = torch.tensor(row)
            embeds = model.embed_text(ids[None])[0]
            if t.image in row:
                embeds[ids == t.image] = next(features).to(embeds.dtype)
            if source_codes and i < 4:
                embeds[-slots:] = model.embed_image_tokens(source[None])[0]
            embeds = torch.cat([embeds, model.embed_image_tokens(codes[None, :-1])[0]])
            targets = torch.tensor([-100] * (len(row) - 1) + codes.tolist())
            assert (targets != -100).sum() == len(codes)  # only the target codes are supervised
            hidden = model.run_decoder(embeds[None]).last_hidden_state[0]
            logits = model.gen_head(hidden)
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    assert loss.item() == pytest.approx(total.item(), rel=1e-4)


def TrainStep_index():
    from unigen.training.recipe import TASKS

    return TASKS.index("generation")


def test_training_mixes_edits_and_skips_unreadable_targets(data, tmp_path):
    lines = data.read_text().splitlines()
    (data.parent / "corrupt.png").write_bytes(b"not a png")
    broken = dict(json.loads(lines[-1]), target="corrupt.png")
    manifest = data.parent / "broken.jsonl"
    manifest.write_text("\n".join([*lines, json.dumps(broken)]) + "\n")
    samples, bad = check_sample_files(read_samples(manifest))
    assert [x["line"] for x in bad] == [len(lines) + 1] and "corrupt.png" in bad[0]["file"]
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

@pytest.fixture(scope="module")
def pipe_with_source_codes(tiny_hf_janus):
    pipe = UniGenPipeline.from_pretrained(tiny_hf_janus[1])
    pipe.model.config.edit_source_codes = True
    return pipe


@pytest.mark.parametrize("source_codes", [False, True], ids=["siglip-only", "with-source-codes"])
@pytest.mark.parametrize("drop", CFG_DROPS)
def test_pipe_edit_is_the_hand_built_guided_computation(pipe, pipe_with_source_codes, drop, source_codes):
    """Greedy: each code is the argmax of u + s (c - u), c and u from full uncached forwards of the conditional
    row (source features in its placeholders, and its VQ codes in its slots with edit_source_codes) and of the
    unconditional row this drop makes (the same source codes)."""
    siglip_only, pipe = pipe, (pipe_with_source_codes if source_codes else pipe)
    model, processor = pipe.model, pipe.processor
    slots = model.config.vq.num_tokens if source_codes else 0
    sources = [render(ShapeSpec("red", "circle", "large", "top left"), 0).pil(),
               render(ShapeSpec("blue", "square", "small", "center"), 1).pil()]
    instructions = ["make it blue", "move it to the top"]
    out = pipe.edit(sources, instructions, num_images_per_prompt=2, guidance_scale=3.0, temperature=0,
                    cfg_drop=drop)
    assert out.tokens.shape == (4, model.config.vq.num_tokens) and len(out.images) == 4
    assert torch.equal(out.tokens[0], out.tokens[1]) and torch.equal(out.tokens[2], out.tokens[3])

    def logits(text, codes, source, drop=None):
        ids = torch.tensor([processor.prompts.edit(text, drop)])
        assert ids[0].tolist()[ids.shape[1] - slots:] == [model.config.tokens.pad] * slots  # the source-code slots
        pixels = processor.understanding_pixels([source]) if keeps_image(drop) else None
        src = model.encode_image_tokens(processor.generation_pixels([source])) if source_codes else None
        return model.image_logits(ids, codes, None, pixels, src)

    with torch.no_grad():
        for i, (source, text) in enumerate(zip(sources, instructions, strict=True)):
            codes = out.tokens[2 * i][None]
            c, u = logits(text, codes, source), logits(text, codes, source, drop)
            assert torch.equal((u + 3.0 * (c - u)).argmax(-1), codes)
        unguided = pipe.edit(sources[0], instructions[0], guidance_scale=1.0, temperature=0, cfg_drop=drop).tokens
        assert torch.equal(logits(instructions[0], unguided, sources[0]).argmax(-1), unguided)
    if source_codes:  # the codes change what is drawn: the same weights without them draw otherwise
        assert not torch.equal(out.tokens, siglip_only.edit(sources, instructions, num_images_per_prompt=2,
                                                            guidance_scale=3.0, temperature=0, cfg_drop=drop).tokens)


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


def test_edit_source_codes_is_saved_and_checked(pipe_with_source_codes, tmp_path, data):
    pipe_with_source_codes.save_pretrained(tmp_path / "ckpt")
    assert UniGenPipeline.from_pretrained(tmp_path / "ckpt").model.config.edit_source_codes is True
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["edit_source_codes"]  # a checkpoint saved before the key reads the source by SigLIP only
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    assert UniGenPipeline.from_pretrained(tmp_path / "ckpt").model.config.edit_source_codes is False
    with pytest.raises(ConfigError, match="edit_source_codes must be a bool, got 'sometimes'"):
        recipe(data, tmp_path / "run", "edit_source_codes=sometimes")
    model, n = pipe_with_source_codes.model, pipe_with_source_codes.model.config.vq.num_tokens
    ids = torch.tensor([[model.config.tokens.bos] * 3])
    with pytest.raises(ArgumentError, match=rf"source_codes must be \(prompts=1, {n}\); got \(1, 5\)"):
        generate_image_tokens(model, ids, source_codes=torch.zeros(1, 5, dtype=torch.long))


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
    lines = (tmp_path / "model" / "codes" / "train-edit.jsonl").read_text().splitlines()
    assert sum('"instruction"' in x for x in lines) == 100 and len(lines) == 200
