"""The native-resolution encoder (``encoder: native``) against transformers' Qwen2-VL vision tower.

Tiny random weights in fp32: features equal ``Qwen2VisionTransformerPretrainedModel``'s (<= 1e-4) with and without
2x2 merging; the resize rule is ``smart_resize``'s; patches are laid out as ``Qwen2VLImageProcessor`` lays them;
images packed in one sequence give what each gives alone, and no image reads another; bad sizes are named.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from unigen.config import NativeVisionConfig, UniGenConfig
from unigen.errors import ArgumentError, CheckpointError, ConfigError
from unigen.models.native_vision import (
    NativeVisionEncoder,
    PackedAttention,
    fit_size,
    load_qwen2vl_vision,
    patchify,
    vision_state_from_qwen2vl,
)

P = 4  # patch size of these tests


def tiny_pair(merge: int = 2, temporal: int = 2):
    """A random transformers tower (weights well away from init) and unigen's encoder loaded from it."""
    torch.manual_seed(0)
    hf_config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=4, patch_size=P,
                                    spatial_merge_size=merge, temporal_patch_size=temporal)
    hf_config._attn_implementation = "sdpa"
    hf = Qwen2VisionTransformerPretrainedModel(hf_config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cfg = NativeVisionConfig(patch_size=P, temporal_patch_size=temporal, merge_size=merge, width=32, depth=2,
                             num_heads=4, out_width=48, min_pixels=64, max_pixels=64 * 64)
    ours = NativeVisionEncoder(cfg).eval()
    ours.load_state_dict(vision_state_from_qwen2vl(hf.state_dict()))
    return hf, ours


def transformers_features(hf, images, merge: int, temporal: int) -> torch.Tensor:
    """transformers' own input: each image through its image processor's patchify (frames repeated)."""
    processor = Qwen2VLImageProcessor()
    patches = [processor.patchify(image[None], P, merge, temporal)[0][0] for image in images]
    grid = torch.tensor([[1, image.shape[1] // P, image.shape[2] // P] for image in images])
    return hf(torch.cat(patches), grid_thw=grid).pooler_output


@pytest.mark.parametrize("merge", [2, 1])
def test_features_equal_transformers_qwen2vl_vision_tower(merge):
    hf, ours = tiny_pair(merge)
    images = [torch.randn(3, 16, 24), torch.randn(3, 8, 8), torch.randn(3, 32, 16)]
    with torch.no_grad():
        got, expected = ours(images), transformers_features(hf, images, merge, 2)
    assert got.shape == (6 * 4 // merge**2 + 4 // merge**2 + 32 // merge**2, 48)
    assert (got - expected).abs().max() <= 1e-4


def test_patch_layout_is_the_image_processors():
    image = torch.randn(3, 16, 24)
    expected = Qwen2VLImageProcessor().patchify(image[None], P, 2, 1)[0][0]
    assert torch.equal(patchify(image, P, 2), expected)


@pytest.mark.parametrize("size", [(56, 56), (28, 1000), (1000, 28), (5, 7), (3000, 4000), (100, 99), (224, 16),
                                  (400, 2), (1, 150)])
def test_resize_rule_is_smart_resizes(size):
    for min_pixels, max_pixels in ((56 * 56, 28 * 28 * 1280), (16 * 16, 64 * 64)):
        assert fit_size(*size, 28, min_pixels, max_pixels) == smart_resize(*size, 28, min_pixels, max_pixels)


def test_packed_images_give_what_each_gives_alone_and_never_read_each_other():
    _, ours = tiny_pair()
    images = [torch.randn(3, 16, 24), torch.randn(3, 8, 8), torch.randn(3, 32, 16)]
    with torch.no_grad():
        packed = ours(images)
        alone = torch.cat([ours([image]) for image in images])
        moved = images[:1] + [images[1] + 1.0] + images[2:]
        after = ours(moved)
    assert (packed - alone).abs().max() <= 1e-5
    counts = [6, 1, 8]  # merged tokens of each image
    first, second, third = packed.split(counts)
    a, b, c = after.split(counts)
    assert torch.equal(a, first) and torch.equal(c, third)  # a masked key weighs exactly 0
    assert (b - second).abs().max() > 1e-2


def test_the_block_diagonal_mask_keeps_attention_inside_each_image():
    attend = PackedAttention([2, 3], torch.device("cpu"), "mask")
    assert attend.backend == "mask"
    assert attend.mask[0, 0].int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1],
                                                [0, 0, 1, 1, 1]]
    with pytest.raises(ArgumentError, match="attention backend must be 'auto', 'flex' or 'mask', got 'varlen'"):
        PackedAttention([2], torch.device("cpu"), "varlen")
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="attention backend 'flex' needs CUDA"):
            PackedAttention([2], torch.device("cpu"), "flex")
        assert PackedAttention([2, 3], torch.device("cpu"), "auto").backend == "mask"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's kernels run on CUDA")
def test_flex_attention_equals_the_mask_on_cuda():
    _, ours = tiny_pair()
    ours = ours.cuda()
    images = [torch.randn(3, 16, 24).cuda(), torch.randn(3, 8, 8).cuda(), torch.randn(3, 32, 16).cuda()]
    with torch.no_grad():
        ours.attention_backend = "flex"
        flex = ours(images)
        ours.attention_backend = "mask"
        mask = ours(images)
    assert (flex - mask).abs().max() <= 1e-4


def test_bad_sizes_are_named():
    _, ours = tiny_pair()
    with pytest.raises(ArgumentError, match="an image of 0x16 px has no pixels"):
        fit_size(16, 0, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(ArgumentError, match="aspect ratio over 200:1"):
        fit_size(1, 201, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(ArgumentError, match="an image of 12x8 px is not a multiple of 8 px each way"):
        ours([torch.zeros(3, 8, 12)])
    with pytest.raises(ArgumentError, match=r"an image of 80x64 px has 5120 pixels, above native_vision.max_pixels "
                                            r"\(4096\); resize it or set native_vision.resize: true"):
        ours([torch.zeros(3, 64, 80)])
    with pytest.raises(ArgumentError, match=r"must have shape \(3, H, W\); got \(1, 3, 8, 8\)"):
        ours([torch.zeros(1, 3, 8, 8)])


def test_a_saved_qwen2vl_tower_loads_with_its_config(tmp_path):
    hf, ours = tiny_pair()
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 64, "max_pixels": 4096}')
    loaded = load_qwen2vl_vision(tmp_path)
    assert loaded.config == ours.config
    images = [torch.randn(3, 16, 24), torch.randn(3, 24, 8)]
    with torch.no_grad():
        assert (loaded(images) - transformers_features(hf, images, 2, 2)).abs().max() <= 1e-4
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    with pytest.raises(CheckpointError, match="is model_type 'qwen2_5_vl', not a Qwen2-VL model"):
        load_qwen2vl_vision(tmp_path)


def test_weights_load_from_a_whole_qwen2vl_checkpoint_and_config_round_trips():
    hf, ours = tiny_pair()
    whole = {f"model.visual.{k}": v for k, v in hf.state_dict().items()}
    whole["model.language_model.embed_tokens.weight"] = torch.zeros(4, 4)
    state = vision_state_from_qwen2vl(whole)
    assert state.keys() == ours.state_dict().keys()
    config = UniGenConfig.from_name("smoke")
    assert "native_vision" not in config.to_dict()
    d = config.to_dict() | {"encoder": "native", "native_vision": {"patch_size": 8, "width": 32, "num_heads": 2}}
    again = UniGenConfig.from_dict(d)
    assert again.native_vision.patch_size == 8 and again.native_vision.factor == 16
    assert UniGenConfig.from_dict(again.to_dict()) == again
    with pytest.raises(ConfigError, match=r"native_vision: the head width \(6\) must be a multiple of 4"):
        NativeVisionConfig(width=12, num_heads=2)
    with pytest.raises(ConfigError, match="native_vision.mlp_act must be 'quick_gelu', 'gelu' or 'gelu_tanh'"):
        NativeVisionConfig(mlp_act="relu")
    with pytest.raises(ConfigError, match="encoder: native gives each image its own number of tokens"):
        UniGenConfig.from_dict(d | {"fusion": "cross_attention"})


# ---- end to end: a Method A model with the native encoder and M-RoPE captions a non-square image -----------

def tiny_native_pipeline(directory, encoder: str = "native"):
    from unigen import UniGenModel
    from unigen.generation.pipeline import UniGenPipeline
    from unigen.processor import UniGenProcessor
    from unigen.testing import TINY_TOKENS, randomize_, write_tiny_tokenizer

    write_tiny_tokenizer(directory)
    d = UniGenConfig.from_name("smoke").to_dict()
    d |= {"encoder": encoder, "tokens": vars(TINY_TOKENS),
          "native_vision": {"patch_size": 4, "temporal_patch_size": 1, "width": 32, "depth": 1, "num_heads": 2,
                            "out_width": 32, "min_pixels": 64, "max_pixels": 32 * 32}}
    d["llm"] |= {"rope": "mrope", "mrope_section": [2, 3, 3]}
    config = UniGenConfig.from_dict(d)
    model = UniGenModel(config).eval()
    randomize_(model, seed=0, std=0.3)
    return UniGenPipeline(model, UniGenProcessor.from_pretrained(directory, config))


def greedy_without_cache(model, ids, pixels, n):
    """The reference: every step re-runs the whole sequence (M-RoPE positions recomputed from scratch)."""
    out = []
    for _ in range(n):
        token = model(ids, pixel_values=pixels).logits[:, -1].argmax(-1)
        out.append(int(token))
        ids = torch.cat([ids, token[:, None]], 1)
    return out


def test_a_method_a_model_captions_non_square_images_at_their_own_size(tmp_path):
    from PIL import Image

    pipe = tiny_native_pipeline(tmp_path)
    wide, tall = Image.new("RGB", (40, 16), (200, 30, 30)), Image.new("RGB", (8, 24), (30, 30, 200))
    wide.paste((20, 220, 20), (4, 4, 12, 12))
    batch = pipe.processor.understanding_inputs([wide], "describe the image .")
    assert [tuple(x.shape) for x in batch["pixel_values"].images] == [(3, 16, 40)]  # already multiples of 8
    assert int((batch["input_ids"] == pipe.model.config.image_token_id).sum()) == 2 * 5  # the merged grid
    with torch.no_grad():
        expected = greedy_without_cache(pipe.model, batch["input_ids"], batch["pixel_values"], 5)
    caption = pipe.caption(wide, question="describe the image .", max_new_tokens=5)
    assert caption == pipe.processor.decode(expected)
    # two sizes in one batch (left padding, packed encoder) caption as each does alone
    both = pipe.caption([wide, tall], question="describe the image .", max_new_tokens=5)
    assert both == [caption, pipe.caption(tall, question="describe the image .", max_new_tokens=5)]
    assert caption and both[0] != both[1]


def test_a_native_checkpoint_saves_and_reloads(tmp_path):
    from PIL import Image

    from unigen.generation.pipeline import UniGenPipeline

    pipe = tiny_native_pipeline(tmp_path / "tokenizer")
    pipe.save_pretrained(tmp_path / "checkpoint")
    again = UniGenPipeline.from_pretrained(tmp_path / "checkpoint")
    assert again.model.config == pipe.model.config
    image = Image.new("RGB", (24, 40), (250, 250, 20))
    assert again.caption(image, max_new_tokens=4) == pipe.caption(image, max_new_tokens=4)


def test_a_chat_holds_images_of_two_sizes_each_with_its_own_placeholders(tmp_path):
    from PIL import Image

    pipe = tiny_native_pipeline(tmp_path)
    wide, tall = Image.new("RGB", (48, 16), (200, 30, 30)), Image.new("RGB", (16, 32), (30, 30, 200))
    messages = [{"role": "user", "content": "<image_placeholder>\nwhat is this ?", "images": [wide]},
                {"role": "assistant", "content": "a red square ."},
                {"role": "user", "content": "<image_placeholder>\nand this ?", "images": [tall]}]
    batch = pipe.processor.chat_inputs(messages)
    ids = batch["input_ids"][0].tolist()
    image = pipe.model.config.image_token_id
    runs = [len(run) for run in "".join("x" if t == image else " " for t in ids).split()]
    assert runs == [2 * 6, 4 * 2]  # each image's merged grid (8 px a token): 48x16 px -> 2x6, 16x32 -> 4x2
    with torch.no_grad():
        expected = greedy_without_cache(pipe.model, batch["input_ids"], batch["pixel_values"], 4)
    assert pipe.chat(messages, max_new_tokens=4) == pipe.processor.decode(expected)


def test_a_fixed_size_encoder_with_mrope_places_its_square_grid(tmp_path):
    from PIL import Image

    from unigen.models.native_inputs import mrope_position_ids

    pipe = tiny_native_pipeline(tmp_path, encoder="siglip")  # the smoke preset's 32-px SigLIP: 4x4 tokens
    image = Image.new("RGB", (40, 16), (200, 30, 30))
    batch = pipe.processor.understanding_inputs([image], "describe the image .")
    ids = batch["input_ids"]
    positions = mrope_position_ids(pipe.model.config, ids, batch["attention_mask"], batch["pixel_values"])
    slots = ids[0] == pipe.model.config.image_token_id
    start = int(positions[0, 0, slots][0])
    assert (positions[1, 0, slots] - start).tolist() == [r for r in range(4) for _ in range(4)]
    assert (positions[2, 0, slots] - start).tolist() == list(range(4)) * 4
    with torch.no_grad():
        expected = greedy_without_cache(pipe.model, ids, batch["pixel_values"], 4)
    assert pipe.caption(image, question="describe the image .", max_new_tokens=4) == pipe.processor.decode(expected)
