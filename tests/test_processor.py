"""Image preprocessing (DeepSeek's path), image loading errors, prompt formats, batching, processor I/O, and the
trainer's prompts against the pipeline's."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_common import recipe

from unigen.config import TokenIds, UniGenConfig, VQConfig
from unigen.data.manifest import Sample, read_samples
from unigen.generation.pipeline import UniGenPipeline
from unigen.processor import (
    JANUS_SYSTEM_PROMPT,
    ImageDecodeError,
    UniGenProcessor,
    generation_pixels,
    load_image,
    pixels_to_pil,
    prompt_format,
    understanding_pixels,
)
from unigen.prompts import CFG_DROPS
from unigen.shapes import write_dataset
from unigen.testing import TINY_TOKENS
from unigen.text_tokenizer import tiny_tokenizer
from unigen.training.batches import IGNORE, BatchBuilder
from unigen.training.mixture import Pick
from unigen.training.start import load_start

torch.set_num_threads(1)

# the official pipeline rescales to float32 first, then normalises in float32: 2 * (f32(127/255) - 0.5)
GRAY = float(2 * (np.float32(127 / 255) - np.float32(0.5)))
SYS = JANUS_SYSTEM_PROMPT


def rgb(value):
    return (torch.tensor(value, dtype=torch.float32) / 255 - 0.5) / 0.5


# ---- understanding preprocessing -----------------------------------------------------------------


def test_gray_border_value_is_the_official_one():
    assert GRAY == pytest.approx((127 / 255 - 0.5) / 0.5, abs=1e-9)  # within 1 ulp of the float64 formula
    x = understanding_pixels([Image.new("RGB", (40, 20), (0, 0, 0))], 32)
    assert x[0, 0, 0, 0].item() == GRAY  # exactly, not approximately


def test_wide_image_is_resized_and_padded_top_and_bottom():
    x = understanding_pixels([Image.new("RGB", (40, 20), (200, 10, 50))], 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    # 40x20 -> 32x16, pasted at y = (32 - 16) // 2 = 8 on a gray canvas
    assert torch.equal(x[0, :, :8], torch.full((3, 8, 32), GRAY))
    assert torch.equal(x[0, :, 24:], torch.full((3, 8, 32), GRAY))
    assert torch.equal(x[0, :, 8:24], rgb([200, 10, 50]).view(3, 1, 1).expand(3, 16, 32))


def test_tall_image_is_padded_left_and_right_with_the_odd_column_on_the_right():
    # 20x43 -> long side 32, short int(20 / 43 * 32) = int(14.88) = 14 wide, pasted at x = (32 - 14) // 2 = 9
    x = understanding_pixels([Image.new("RGB", (20, 43), (255, 255, 255))], 32)
    content = ~torch.isclose(x[0, 0, 16], torch.tensor(GRAY))
    assert content.nonzero().flatten().tolist() == list(range(9, 23))
    assert torch.equal(x[0, :, :, 9:23], torch.ones(3, 32, 14))


def content_rows(x):
    return int((~torch.isclose(x[0, 0], torch.tensor(GRAY))).any(dim=1).sum())


def test_short_side_is_floored_not_rounded():
    # 13 / 30 * 64 = 27.73: DeepSeek floors to 27 (transformers rounds to 28)
    assert content_rows(understanding_pixels([Image.new("RGB", (30, 13), (255, 255, 255))], 64)) == 27
    # tiny sides are raised to 14 pixels
    assert content_rows(understanding_pixels([Image.new("RGB", (100, 5), (255, 255, 255))], 32)) == 14


def official_understanding(img: Image.Image, image_size: int, do_normalize: bool = True) -> np.ndarray:
    """DeepSeek's VLMImageProcessor, step by step, on torchvision and transformers' own functions."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from transformers.image_transforms import normalize, rescale

    w, h = img.size
    longest = max(w, h)
    size = [max(int(h / longest * image_size), 14), max(int(w / longest * image_size), 14)]
    img = tvf.resize(img, size, interpolation=tvf.InterpolationMode.BICUBIC, antialias=True)
    w, h = img.size
    if w != h:
        canvas = Image.new(img.mode, (max(w, h),) * 2, (127, 127, 127))
        canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        img = canvas
    x = np.transpose(np.asarray(img), (2, 0, 1))
    x = rescale(x, 1 / 255, input_data_format="channels_first")
    if do_normalize:
        x = normalize(x, [0.5] * 3, [0.5] * 3, input_data_format="channels_first")
    return x


@pytest.mark.parametrize("size", [(57, 23), (23, 57), (40, 40), (9, 7), (200, 6)])
@pytest.mark.parametrize("do_normalize", [True, False])
def test_bit_identical_to_the_official_pipeline(size, do_normalize):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = understanding_pixels([img], 32, normalize=do_normalize)[0].numpy()
    ref = official_understanding(img, 32, do_normalize)
    assert ref.dtype == ours.dtype == np.float32
    assert np.array_equal(ours, ref)


def test_unnormalised_variant_is_in_0_1():
    x = understanding_pixels([Image.new("RGB", (8, 8), (255, 0, 0))], 16, normalize=False)
    assert x.min() == 0 and x.max() == 1


# ---- loading -------------------------------------------------------------------------------------


def test_modes_convert_to_rgb_like_janus():
    assert load_image(Image.new("RGBA", (2, 2), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 0, 0)  # alpha dropped
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(Image.new("LA", (2, 2), (90, 10))).getpixel((0, 0)) == (90, 90, 90)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(p).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_files_of_other_modes_load_as_rgb(mode, tmp_path):
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (10, 6)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (10, 6)
    assert understanding_pixels([str(path)], 16).shape == (1, 3, 16, 16)


def test_missing_corrupt_and_directory_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.png does not exist; check the path"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDecodeError, match=r"bad\.png could not be decoded as an image"):
        load_image(bad)
    assert issubclass(ImageDecodeError, ValueError)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageDecodeError, match="notes.jpg"):
        understanding_pixels([text], 16)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_image(tmp_path)


# ---- generation pixels ---------------------------------------------------------------------------


def test_generation_pixels_crop_the_centre():
    img = Image.new("RGB", (48, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))  # white middle third
    x = generation_pixels([img], 16)
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x, torch.ones_like(x))
    tall = Image.new("RGB", (8, 40), (0, 0, 0))
    tall.paste((255, 0, 0), (0, 12, 8, 28))  # red middle 16 rows -> 16 of the 32 rows after the 2x resize
    x = generation_pixels([tall], 16)
    assert x.shape == (1, 3, 16, 16) and torch.equal(x[0, 0], torch.ones(16, 16)) and torch.equal(x[0, 1], -x[0, 0])


def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # a 16-bit greyscale PNG
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(load_image(path))
    assert got.shape == (1, 4, 3) and got[0, :, 0].tolist() == [0, 1, 128, 255]  # Pillow's convert: 0 255 255 255
    assert (got == got[..., :1]).all()


def test_one_vq_preprocessing_for_the_trainer_code_extraction_and_inference(tmp_path):
    """The VQ trainer, code extraction (add_vq_codes), the pipeline and the VQ evaluator agree on an image of
    odd, non-square size, and that is exact bicubic (not the trainer's former reducing_gap=3.0 shortcut)."""
    from unigen.data import image_dataset as trainer_data
    from unigen.data.manifest import Record
    from unigen.training.tokenizer import shapes_recon, vq_codes

    rng = np.random.default_rng(0)
    path = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 256, (101, 157, 3), dtype=np.uint8)).save(path)  # 157 wide, 101 high
    processor = UniGenProcessor(None, UniGenConfig(vq=VQConfig(image_size=16)))  # images need no tokenizer
    pipeline = processor.generation_pixels([path])
    trainer = trainer_data.to_pixels(trainer_data.ImageDataset([Record(path)], 16, desc="x")[0][0][None])
    assert vq_codes.generation_pixels is generation_pixels and shapes_recon.load_image is trainer_data.load_image
    extraction = vq_codes.generation_pixels([path], 16)
    evaluator = shapes_recon.to_pixels(shapes_recon.load_image(path, 16)[None])
    assert pipeline.shape == (1, 3, 16, 16)
    for other in (trainer, extraction, evaluator):
        assert torch.equal(other, pipeline)
    with Image.open(path) as img:  # what the trainer did before (an approximate resize): a different image
        old = img.convert("RGB").resize((round(157 * 16 / 101), 16), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (old.size[0] - 16) // 2
    old = torch.from_numpy(np.asarray(old.crop((left, 0, left + 16, 16))).copy()).permute(2, 0, 1)
    assert not torch.equal(trainer_data.to_pixels(old[None]), pipeline)


def test_pixels_to_pil_truncates():
    # (x + 1) / 2 * 255 = 127.9 -> 127 (truncation, rounding gives 128), 255.3 -> 255 (clip), -64 -> 0
    x = torch.tensor([127.9 / 255 * 2 - 1, 1.002, -1.5]).view(1, 3, 1, 1)
    out = pixels_to_pil(x)
    assert len(out) == 1 and out[0].mode == "RGB" and out[0].size == (1, 1)
    assert out[0].getpixel((0, 0)) == (127, 255, 0)


# ---- prompts -------------------------------------------------------------------------------------


def test_prompt_formats_match_the_official_template():
    pro, v1 = prompt_format("janus-pro"), prompt_format("janus")
    assert SYS == ("You are a helpful language and vision assistant. You are able to understand the visual content "
                   "that the user provides, and assist the user with a variety of tasks using natural language.")
    assert pro.understanding("What is it?") == f"{SYS}\n\n<|User|>: <image_placeholder>\nWhat is it?\n\n<|Assistant|>:"
    assert pro.understanding("What is it?", system="") == "<|User|>: <image_placeholder>\nWhat is it?\n\n<|Assistant|>:"
    assert v1.understanding("Q") == f"{SYS}\n\nUser: <image_placeholder>\nQ\n\nAssistant:"
    assert pro.generation("a red cat") == "<|User|>: a red cat\n\n<|Assistant|>:<begin_of_image>"
    assert v1.generation("a red cat") == "User: a red cat\n\nAssistant:<begin_of_image>"
    with pytest.raises(ValueError, match=r"unknown prompt_format 'llava'; known: \['janus', 'janus-pro'\]"):
        prompt_format("llava")


def test_messages_are_stripped_and_turns_end_with_sep_or_sep2():
    pro = prompt_format("janus-pro")
    assert pro.generation("  a cat \n") == "<|User|>: a cat\n\n<|Assistant|>:<begin_of_image>"
    assert pro.understanding("Q ", system="") == "<|User|>: <image_placeholder>\nQ\n\n<|Assistant|>:"
    assert pro.render(["hi", "hello", "bye", ""], system="S") == (
        "S\n\n<|User|>: hi\n\n<|Assistant|>: hello<｜end▁of▁sentence｜><|User|>: bye\n\n<|Assistant|>:")


# ---- the processor -------------------------------------------------------------------------------


def tiny_config(**kw) -> UniGenConfig:
    cfg = UniGenConfig(tokens=TINY_TOKENS, **kw)
    cfg.vision.image_size, cfg.vision.patch_size = 32, 8  # 16 image tokens
    cfg.vq.image_size = 16
    return cfg


@pytest.fixture()
def processor(tmp_path):
    tiny_tokenizer(tmp_path / "tok")
    return UniGenProcessor.from_pretrained(tmp_path / "tok", config=tiny_config())


def test_understanding_batch_is_left_padded_with_images_expanded(processor):
    t = TINY_TOKENS
    batch = processor.understanding_inputs([Image.new("RGB", (9, 9))] * 2, ["what is this image", "what"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    text = processor.tokenizer(f"{SYS}\n\n<|User|>: ", add_special_tokens=False).input_ids
    q0 = processor.tokenizer("\nwhat is this image\n\n<|Assistant|>:", add_special_tokens=False).input_ids
    q1 = processor.tokenizer("\nwhat\n\n<|Assistant|>:", add_special_tokens=False).input_ids
    row0 = [t.bos, *text, t.image_start, *[t.image] * 16, t.image_end, *q0]
    row1 = [t.bos, *text, t.image_start, *[t.image] * 16, t.image_end, *q1]
    n = len(row0) - len(row1)
    assert n > 0
    assert ids[0].tolist() == row0 and mask[0].tolist() == [1] * len(row0)
    assert ids[1].tolist() == [t.pad] * n + row1 and mask[1].tolist() == [0] * n + [1] * len(row1)


def test_generation_batch_is_left_padded_and_ends_with_begin_of_image(processor):
    t = TINY_TOKENS
    gen = processor.generation_inputs(["a red circle", "a small blue square at the top"])
    ids, mask = gen["input_ids"], gen["attention_mask"]
    expected = [processor.tokenizer(f"<|User|>: {p}\n\n<|Assistant|>:<begin_of_image>").input_ids
                for p in ["a red circle", "a small blue square at the top"]]
    assert expected[0][0] == t.bos and expected[0].count(t.bos) == 1  # the tokenizer itself prepends BOS once
    n = len(expected[1]) - len(expected[0])
    assert ids[0].tolist() == [t.pad] * n + expected[0] and ids[1].tolist() == expected[1]
    assert mask[0].tolist() == [0] * n + [1] * len(expected[0]) and bool(mask[1].all())
    assert ids[:, -1].tolist() == [t.image_start] * 2
    assert processor.decode(ids[1]) == ": a small blue square at the top\n\n:"  # specials (roles too) skipped
    assert processor.batch_decode(ids)[0] == ": a red circle\n\n:"


def test_cross_attention_models_get_one_placeholder_per_image(tmp_path):
    tiny_tokenizer(tmp_path)
    proc = UniGenProcessor.from_pretrained(tmp_path, config=tiny_config(fusion="cross_attention"))
    row = proc.understanding_inputs(Image.new("RGB", (9, 9)), "what")["input_ids"][0].tolist()
    i = row.index(TINY_TOKENS.image_start)
    assert row[i : i + 3] == [TINY_TOKENS.image_start, TINY_TOKENS.image, TINY_TOKENS.image_end]


def test_understanding_inputs_reject_bad_pairings(processor):
    img = Image.new("RGB", (9, 9))
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        processor.understanding_inputs([img, img], ["a"])
    with pytest.raises(ValueError, match="must not contain <image_placeholder>"):
        processor.understanding_inputs([img], ["<image_placeholder> what"])


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} holds no text tokenizer \(expected one of"):
        UniGenProcessor.from_pretrained(tmp_path, config=UniGenConfig())


def test_tokenizer_only_directory_gives_its_own_ids(tmp_path):
    tiny_tokenizer(tmp_path)
    proc = UniGenProcessor.from_pretrained(tmp_path)
    assert proc.config.tokens == TINY_TOKENS == proc.resolve_token_ids()
    assert proc.config.prompt_format == "janus-pro" and proc.do_normalize


def test_config_ids_that_disagree_with_the_tokenizer_are_named(tmp_path):
    tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="config.tokens disagree with the tokenizer .*bos: config 100000, tokenizer 1"):
        UniGenProcessor.from_pretrained(tmp_path, config=UniGenConfig())  # Janus-Pro ids, tiny vocabulary


def test_save_and_load_round_trip(processor, tmp_path):
    processor.do_normalize = False
    processor.save_pretrained(tmp_path / "saved")
    pre = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert pre["do_normalize"] is False and pre["image_size"] == 32 and pre["background_color"] == [127] * 3
    again = UniGenProcessor.from_pretrained(tmp_path / "saved", config=tiny_config())
    assert again.do_normalize is False
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert torch.equal(again.generation_inputs("a cat")["input_ids"], processor.generation_inputs("a cat")["input_ids"])
    x = again.understanding_inputs(Image.new("RGB", (8, 8), (255, 0, 0)), "q")["pixel_values"]
    assert x.min() == 0 and x.max() == 1  # [0, 1]: not normalised


def test_janus_1_3b_first_revision_preprocessor_is_honoured(tmp_path):
    tiny_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "VLMImageProcessor", "image_size": 384, "do_normalize": False}))
    assert UniGenProcessor.from_pretrained(tmp_path, config=tiny_config()).do_normalize is False


def test_resolve_token_ids_reads_the_vocabulary(processor):
    assert processor.resolve_token_ids() == TokenIds(bos=1, eos=2, pad=0, cfg_pad=3, image_start=4, image_end=5,
                                                     image=6)
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<begin_of_image>"] == 4 and vocab["<｜▁pad▁｜>"] == 3


# ---- one prompt builder: the trainer's rows are the pipeline's prompts -------------------------------


def _prompt_rows(pipe, call) -> list[list[int]]:
    """The rows (padding removed) of the first model forward ``call()`` makes: the prompts the pipeline runs
    (for images: the conditional rows, then the unconditional ones)."""
    seen = []
    real = pipe.model.forward

    def record(input_ids=None, *args, attention_mask=None, **kwargs):
        if not seen:
            seen.append([row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)])
        return real(input_ids, *args, attention_mask=attention_mask, **kwargs)

    pipe.model.forward = record
    try:
        call()
    finally:
        del pipe.model.forward
    return seen[0]


def _prompts_before_answers(builder, sample) -> list[list[int]]:
    """The trainer's understanding row cut before each supervised answer: what the model sees when it starts
    each reply."""
    ids, targets = builder.understanding_row(sample)
    full, supervised = ids + targets[-1:], [False] + [t != IGNORE for t in targets]
    return [full[:i] for i in range(1, len(full)) if supervised[i] and not supervised[i - 1]]


@pytest.mark.parametrize("overrides", [["model.prompt_format=janus-pro"], ["model.prompt_format=janus"],
                                       ["edit_source_codes=true"]], ids=["janus-pro", "janus", "source-codes"])
def test_the_trainers_prompts_are_the_pipelines_token_for_token(tmp_path, overrides):
    data = write_dataset(tmp_path / "shapes", 4, seed=1)
    r = recipe(data, tmp_path / "run", *overrides)
    shapes = read_samples(data)
    image, caption = shapes[0].image, shapes[0].caption
    chat = Sample(line=5, image=image, turns=[("what colour is it?", "red"), ("and the shape?", "a circle")])
    edit = Sample(line=6, image=image, instruction="make it blue", target=shapes[1].image)
    model, processor = load_start(r, 1, [*shapes, chat, edit], None)
    pipe, b = UniGenPipeline(model, processor), BatchBuilder(model, processor, r.question)
    picture = load_image(image)

    # a caption sample (the recipe's question) and a question: pipe.caption
    assert _prompts_before_answers(b, shapes[0]) == _prompt_rows(
        pipe, lambda: pipe.caption(picture, question=r.question, max_new_tokens=1))
    question = Sample(line=7, image=image, turns=[("what colour is it?", "red")])
    assert _prompts_before_answers(b, question) == _prompt_rows(
        pipe, lambda: pipe.caption(picture, question="what colour is it?", max_new_tokens=1))
    # each turn of a conversation: pipe.chat with the turns before it
    first, second = _prompts_before_answers(b, chat)
    assert [first] == _prompt_rows(pipe, lambda: pipe.chat(
        [{"role": "user", "content": "what colour is it?", "images": [picture]}], max_new_tokens=1))
    assert [second] == _prompt_rows(pipe, lambda: pipe.chat(
        [{"role": "user", "content": "what colour is it?", "images": [picture]},
         {"role": "assistant", "content": "red"}, {"role": "user", "content": "and the shape?"}], max_new_tokens=1))
    # generation and its unconditional row (a dropped caption): pipe(...), conditional row then unconditional
    gen = lambda dropped: b.generation_prompt(Pick("generation", shapes[0], dropped)).tolist()
    assert [gen(False), gen(True)] == _prompt_rows(pipe, lambda: pipe(caption, temperature=0))
    assert gen(True)[1:-1] == [model.config.tokens.cfg_pad] * (len(gen(True)) - 2)
    # an edit and each of its unconditional rows: pipe.edit(..., cfg_drop=drop)
    for drop in CFG_DROPS:
        rows = [b.generation_prompt(p).tolist() for p in (Pick("generation", edit), Pick("generation", edit, True,
                                                                                           drop))]
        assert rows == _prompt_rows(pipe, lambda drop=drop: pipe.edit(picture, "make it blue", temperature=0,
                                                                      cfg_drop=drop))
    assert rows[0].count(model.config.tokens.pad) == (model.config.vq.num_tokens if model.config.edit_source_codes
                                                      else 0)
