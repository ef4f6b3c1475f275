"""Image preprocessing (DeepSeek's path), image loading errors, prompt formats, batching, tokenizers."""

import pytest
import torch
from PIL import Image

from unigen.config import UniGenConfig
from unigen.processor import (
    ImageDecodeError,
    UniGenProcessor,
    generation_pixels,
    load_image,
    pixels_to_pil,
    prompt_format,
    understanding_pixels,
)
from unigen.testing import TINY_TOKENS, write_tiny_tokenizer
from unigen.text_tokenizer import special_token_ids, train_text_tokenizer

GRAY = (127 / 255 - 0.5) / 0.5


def test_non_square_image_is_resized_and_padded_like_deepseek():
    img = Image.new("RGB", (40, 20), (200, 10, 50))
    x = understanding_pixels([img], 32)
    assert x.shape == (1, 3, 32, 32)
    # 40x20 -> 32x16, pasted at y = (32 - 16) // 2 = 8 on a gray canvas
    assert torch.allclose(x[0, :, :8], torch.full((3, 8, 32), GRAY))
    assert torch.allclose(x[0, :, 24:], torch.full((3, 8, 32), GRAY))
    color = (torch.tensor([200, 10, 50]) / 255 - 0.5) / 0.5
    assert torch.allclose(x[0, :, 8:24], color.view(3, 1, 1).expand(3, 16, 32), atol=1e-6)


def content_rows(x):
    return int((~torch.isclose(x[0, 0], torch.tensor(GRAY))).any(dim=1).sum())


def test_short_side_is_floored_not_rounded():
    # 13 / 30 * 64 = 27.73: DeepSeek floors to 27 (transformers rounds to 28)
    x = understanding_pixels([Image.new("RGB", (30, 13), (255, 255, 255))], 64)
    assert content_rows(x) == 27
    # tiny sides are raised to 14 pixels
    x = understanding_pixels([Image.new("RGB", (100, 5), (255, 255, 255))], 32)
    assert content_rows(x) == 14


def test_unnormalised_variant_is_in_0_1():
    x = understanding_pixels([Image.new("RGB", (8, 8), (255, 0, 0))], 16, normalize=False)
    assert x.min() == 0 and x.max() == 1


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_other_modes_convert_to_rgb(mode, tmp_path):
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (10, 6)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (10, 6)
    assert understanding_pixels([path], 16).shape == (1, 3, 16, 16)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDecodeError, match="bad.png could not be decoded"):
        load_image(bad)


def test_generation_pixels_crop_the_centre():
    img = Image.new("RGB", (48, 16), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 32, 16))  # white middle third
    x = generation_pixels([img], 16)
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x, torch.ones_like(x))


def test_pixels_to_pil_truncates():
    # (x + 1) / 2 * 255 = 127.9 -> 127 (truncation), 255.4 -> 255 (clip)
    x = torch.tensor([127.9 / 255 * 2 - 1, 1.002, -1.5]).view(1, 3, 1, 1)
    assert pixels_to_pil(x)[0].getpixel((0, 0)) == (127, 255, 0)


def test_prompt_formats_match_the_official_template():
    pro = prompt_format("janus-pro")
    assert pro.understanding("What is it?", system="") == "<|User|>: <image_placeholder>\nWhat is it?\n\n<|Assistant|>:"
    assert pro.understanding("Q").startswith("You are a helpful language and vision assistant.")
    assert pro.understanding("Q").endswith("natural language.\n\n<|User|>: <image_placeholder>\nQ\n\n<|Assistant|>:")
    assert pro.generation("a red cat") == "<|User|>: a red cat\n\n<|Assistant|>:<begin_of_image>"
    assert prompt_format("janus").generation("x") == "User: x\n\nAssistant:<begin_of_image>"
    with pytest.raises(ValueError, match="unknown prompt_format 'llava'"):
        prompt_format("llava")


@pytest.fixture()
def processor(tmp_path):
    write_tiny_tokenizer(tmp_path)
    cfg = UniGenConfig()
    cfg.tokens = TINY_TOKENS
    cfg.vision.image_size, cfg.vision.patch_size = 32, 8
    return UniGenProcessor.from_pretrained(tmp_path, config=cfg)


def test_batches_are_left_padded_with_images_expanded(processor):
    batch = processor.understanding_inputs([Image.new("RGB", (9, 9))] * 2, ["what is this", "what"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert (ids == TINY_TOKENS.image).sum(1).tolist() == [16, 16]
    assert mask[1].tolist() == [0, 0] + [1] * (ids.shape[1] - 2)
    assert ids[1, :2].tolist() == [TINY_TOKENS.pad] * 2
    row = ids[0].tolist()
    assert row[0] == TINY_TOKENS.bos and row.count(TINY_TOKENS.bos) == 1
    start = row.index(TINY_TOKENS.image_start)
    assert row[start + 1 : start + 17] == [TINY_TOKENS.image] * 16 and row[start + 17] == TINY_TOKENS.image_end

    gen = processor.generation_inputs(["a red circle", "a small blue square at the top"])
    assert gen["input_ids"][:, -1].tolist() == [TINY_TOKENS.image_start] * 2
    assert gen["attention_mask"][0, 0] == 0 and gen["attention_mask"][1].all()
    assert processor.decode(gen["input_ids"][1]) == "<|User|> : a small blue square at the top <|Assistant|> :".replace(
        "<|User|> ", "").replace(" <|Assistant|>", "")


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no text tokenizer"):
        UniGenProcessor.from_pretrained(tmp_path, config=UniGenConfig())


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_trained_tokenizer_loads_with_autotokenizer(kind, tmp_path):
    from transformers import AutoTokenizer

    texts = ["a large red circle at the top left", "a small cyan diamond at the center"] * 5
    train_text_tokenizer(texts, tmp_path, vocab_size=300, kind=kind)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = special_token_ids(tok)
    enc = tok("<|User|>: a large red circle.<begin_of_image>").input_ids
    assert enc[0] == ids.bos and enc[-1] == ids.image_start and enc.count(ids.bos) == 1
    assert "a large red circle" in tok.decode(enc, skip_special_tokens=True)
    if kind == "wordlevel":  # every caption word is one token
        assert len(tok("a large red circle at the top left", add_special_tokens=False).input_ids) == 8
