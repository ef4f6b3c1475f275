"""Tiles with tags (``vision.tiles``): InternVL's grid choice, NVLM-D's tag layout, a tiled caption end to end."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from unigen.config import UniGenConfig
from unigen.errors import ConfigError
from unigen.models.tiles import split_tiles, tile_grid
from unigen.prompts import tile_tags


def reference_grid(width, height, max_num, image_size, min_num=1):
    """InternVL's ``dynamic_preprocess`` grid choice as its published algorithm states it: the target ratios as a
    set sorted by area, then the closest aspect ratio; a tie goes to the later ratio when the image's area exceeds
    half of that ratio's pixels."""
    target_ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_ratio_diff, best_ratio = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def test_grids_for_extreme_tiny_and_square_images():
    assert tile_grid(256, 1024, 6, 448) == (1, 4)  # 1:4
    assert tile_grid(1024, 256, 6, 448) == (4, 1)  # 4:1
    assert tile_grid(4000, 100, 6, 448) == (6, 1)  # beyond the widest grid: the widest
    assert tile_grid(100, 4000, 12, 448) == (1, 12)
    # squares: every n x n ties at ratio 1; a large square takes the largest grid within max, a small one stays 1x1
    assert tile_grid(2000, 2000, 6, 448) == (2, 2)
    assert tile_grid(2000, 2000, 12, 448) == (3, 3)
    assert tile_grid(448, 448, 12, 448) == (1, 1)  # 448^2 is not more than half of 2x2's pixels
    assert tile_grid(1, 1, 6, 448) == (1, 1)
    assert tile_grid(2, 1, 6, 448) == (2, 1)  # a tiny wide image still takes its shape (upsampled)
    assert tile_grid(256, 64, 6, 32) == (4, 1)
    assert tile_grid(64, 64, 1, 32) == (1, 1)


def test_grid_equals_the_reference_over_many_sizes():
    sizes = [(w, h) for w in (1, 3, 17, 64, 100, 224, 300, 448, 449, 640, 896, 1000, 1344, 2048, 4096)
             for h in (1, 5, 32, 64, 150, 224, 336, 448, 480, 672, 900, 1024, 1792, 3000)]
    for max_num in (1, 2, 4, 6, 9, 12):
        for image_size in (32, 448):
            for w, h in sizes:
                assert tile_grid(w, h, max_num, image_size) == reference_grid(w, h, max_num, image_size), (w, h)
    assert tile_grid(900, 300, 12, 448, min_tiles=4) == reference_grid(900, 300, 12, 448, min_num=4) == (6, 2)


def test_split_tiles_cuts_the_resized_grid_in_reading_order_and_adds_the_thumbnail():
    image = Image.new("RGB", (90, 40), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 45, 40))  # left half red, right half black
    tiles = split_tiles(image, 6, 16)
    cols, rows = tile_grid(90, 40, 6, 16)
    assert (cols, rows) == (2, 1) and len(tiles) == 3 and {t.size for t in tiles} == {(16, 16)}
    assert tiles[0].getpixel((8, 8)) == (255, 0, 0) and tiles[1].getpixel((8, 8)) == (0, 0, 0)
    assert tiles[2].getpixel((2, 8)) == (255, 0, 0) and tiles[2].getpixel((13, 8)) == (0, 0, 0)  # the whole image
    assert len(split_tiles(Image.new("RGB", (16, 16)), 6, 16)) == 1  # one tile: no thumbnail
    assert tile_tags(1) == ["<tile_global_thumbnail>"]
    assert tile_tags(3) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]


def tiny_tiled_pipeline(directory, max_tiles: int = 6, mrope: bool = False):
    from unigen import UniGenModel
    from unigen.generation.pipeline import UniGenPipeline
    from unigen.processor import UniGenProcessor
    from unigen.testing import TINY_TOKENS, randomize_, write_tiny_tokenizer

    write_tiny_tokenizer(directory)
    d = UniGenConfig.from_name("smoke").to_dict()
    d |= {"tokens": vars(TINY_TOKENS)}
    d["vision"] |= {"tiles": {"max": max_tiles}}
    if mrope:
        d["llm"] |= {"rope": "mrope", "mrope_section": [2, 3, 3]}
    config = UniGenConfig.from_dict(d)
    model = UniGenModel(config).eval()
    randomize_(model, seed=0, std=0.3)
    return UniGenPipeline(model, UniGenProcessor.from_pretrained(directory, config))


def test_a_2x1_grid_puts_each_tiles_placeholders_after_its_tag(tmp_path):
    pipe = tiny_tiled_pipeline(tmp_path)
    processor, t = pipe.processor, pipe.processor.tokens
    s, per_tile = pipe.model.config.vision.image_size, pipe.model.config.vision.num_tokens
    batch = processor.understanding_inputs([Image.new("RGB", (2 * s, s), (9, 9, 9))], "describe the image .")
    assert tuple(batch["pixel_values"].shape) == (3, 3, s, s)  # two tiles and the thumbnail
    ids = batch["input_ids"][0].tolist()
    block = ids[ids.index(t.image_start): ids.index(t.image_end) + 1]
    tag = processor._tokenize
    expected = [t.image_start, *tag("<tile_1>"), *[t.image] * per_tile, *tag("<tile_2>"), *[t.image] * per_tile,
                *tag("<tile_global_thumbnail>"), *[t.image] * per_tile, t.image_end]
    assert block == expected
    # outside the block the prompt is the untiled one's
    plain = processor.prompts.question("describe the image .")
    assert ids[: ids.index(t.image_start)] == plain[: plain.index(t.image_start)]
    assert ids[ids.index(t.image_end):] == plain[plain.index(t.image_end):]


def greedy_without_cache(model, batch, n):
    """The reference: every step re-runs the whole sequence."""
    ids, out = batch["input_ids"], []
    with torch.no_grad():
        for _ in range(n):
            token = model(ids, pixel_values=batch["pixel_values"]).logits[:, -1].argmax(-1)
            out.append(int(token))
            ids = torch.cat([ids, token[:, None]], 1)
    return out


def test_with_mrope_each_tile_is_its_own_square_grid_of_positions(tmp_path):
    from unigen.models.native_inputs import mrope_position_ids

    pipe = tiny_tiled_pipeline(tmp_path, max_tiles=2, mrope=True)
    batch = pipe.processor.understanding_inputs([Image.new("RGB", (64, 32), (9, 90, 9))], "describe the image .")
    ids = batch["input_ids"][0].tolist()
    positions = mrope_position_ids(pipe.model.config, batch["input_ids"], batch["attention_mask"],
                                   batch["pixel_values"])[:, 0]
    first = ids.index(pipe.processor.tokens.image)  # tile 1: a 4x4 grid from its start position
    start = int(positions[0, first])
    assert positions[:, first: first + 16].tolist() == [[start] * 16, [start + i // 4 for i in range(16)],
                                                        [start + i % 4 for i in range(16)]]
    assert int(positions[0, first + 16]) == start + 4  # the next tag's text continues after the grid's side
    caption = pipe.caption(Image.new("RGB", (64, 32), (9, 90, 9)), question="describe the image .", max_new_tokens=3)
    assert caption == pipe.processor.decode(greedy_without_cache(pipe.model, batch, 3))


def test_a_wide_image_captions_end_to_end_as_the_uncached_recompute(tmp_path):
    pipe = tiny_tiled_pipeline(tmp_path)
    wide = Image.new("RGB", (256, 64), (200, 30, 30))
    wide.paste((20, 220, 20), (200, 8, 240, 56))
    batch = pipe.processor.understanding_inputs([wide], "describe the image .")
    per_tile = pipe.model.config.vision.num_tokens
    assert batch["pixel_values"].shape[0] == 4 + 1  # a 4x1 grid of 32-px tiles and the thumbnail
    assert int((batch["input_ids"] == pipe.model.config.image_token_id).sum()) == 5 * per_tile
    caption = pipe.caption(wide, question="describe the image .", max_new_tokens=5)
    assert caption == pipe.processor.decode(greedy_without_cache(pipe.model, batch, 5)) and caption
    # a batch of a tiled and a one-tile image captions each as alone; a chat reads the same tiles
    square = Image.new("RGB", (32, 32), (30, 30, 200))
    both = pipe.caption([wide, square], question="describe the image .", max_new_tokens=5)
    assert both == [caption, pipe.caption(square, question="describe the image .", max_new_tokens=5)]
    reply = pipe.chat([{"role": "user", "content": "describe the image .", "images": [wide]}], max_new_tokens=5)
    assert reply == caption


def test_tiles_config_is_checked_when_read_and_absent_by_default():
    d = UniGenConfig.from_name("smoke").to_dict()
    assert "tiles" not in d["vision"]  # existing checkpoints' config.json unchanged
    with pytest.raises(ConfigError, match=r"^vision\.tiles\.max must be a whole number >= 1, got 0$"):
        UniGenConfig.from_dict(d | {"vision": d["vision"] | {"tiles": {"max": 0}}})
    with pytest.raises(ConfigError, match="unknown key"):
        UniGenConfig.from_dict(d | {"vision": d["vision"] | {"tiles": {"most": 4}}})
    with pytest.raises(ConfigError, match="vision.tiles splits images for a fixed-size encoder"):
        UniGenConfig.from_dict(d | {"vision": d["vision"] | {"tiles": {"max": 4}}, "fusion": "cross_attention"})
    tiled = UniGenConfig.from_dict(d | {"vision": d["vision"] | {"tiles": {"max": 4}}})
    assert tiled.vision.tiles.max == 4 and UniGenConfig.from_dict(tiled.to_dict()) == tiled


def test_siglip_from_keeps_the_recipes_tiles(tmp_path):
    import dataclasses

    from tokenizers import Tokenizer, models

    from unigen.config import SigLIPConfig, TilesConfig
    from unigen.models.siglip import SigLIPDualEncoder, SigLIPTowersConfig, TextTowerConfig
    from unigen.models.vision_from import load_siglip_from
    from unigen.training.tokenizer.siglip_trainer import save_siglip

    vision = SigLIPConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2)
    dual = SigLIPDualEncoder(SigLIPTowersConfig(vision=vision, text=TextTowerConfig(width=16, depth=1, num_heads=2,
                                                                                    vocab_size=8), embed_dim=16))
    save_siglip(dual.eval(), Tokenizer(models.WordLevel({"a": 0}, unk_token="a")), tmp_path)
    recipe = SigLIPConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, tiles=TilesConfig(max=4))
    _, cfg = load_siglip_from(tmp_path, recipe)
    assert cfg == dataclasses.replace(vision, tiles=TilesConfig(max=4))


def test_training_a_tiled_config_is_refused_not_silently_untiled(tmp_path):
    from unigen.training.batches import BatchBuilder

    pipe = tiny_tiled_pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"^training with vision\.tiles is not built yet"):
        BatchBuilder(pipe.model, pipe.processor, "describe the image .")
