"""siglip_from / vq_from: pretrained encoders and VQs from timm, transformers, LlamaGen and unigen's own files give
their source's features and codes (fp32)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F

from unigen.config import SigLIPConfig, VQConfig
from unigen.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from unigen.models.vision_from import load_siglip_from
from unigen.models.vq_from import load_vq_from
from unigen.testing import randomize_

TOL = 1e-4
RECIPE_VISION = SigLIPConfig(image_size=16, patch_size=8, width=16, depth=1, num_heads=2)  # sizes are not used
RECIPE_VQ = VQConfig(codebook_size=16, embed_dim=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     z_channels=32, image_size=32)


def pixels(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def recipe(select_layer: int) -> SigLIPConfig:
    return dataclasses.replace(RECIPE_VISION, select_layer=select_layer)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# ---- timm -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_siglip(tmp_path_factory):
    """``vit_large_patch16_siglip_384`` (Janus's SigLIP) at tiny size, saved by timm with its config."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, embed_dim=32, depth=3, num_heads=2,
                              img_size=32, patch_size=8).eval()
    randomize_(model, seed=1)
    directory = tmp_path_factory.mktemp("timm-siglip")
    save_for_hf(model, str(directory), safe_serialization=True)
    return model, directory


@pytest.mark.parametrize("select_layer", [-1, -2, 1])
def test_timm_siglip_features_equal_timms(timm_siglip, select_layer):
    model, directory = timm_siglip
    encoder, cfg = load_siglip_from(directory, recipe(select_layer))
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_act) == (32, 8, 32, 3, 2,
                                                                                                   "gelu")
    assert len(encoder.vision_tower.blocks) == cfg.kept_depth == {-1: 3, -2: 2, 1: 1}[select_layer]
    x = pixels()
    with torch.no_grad():
        ours = encoder(x)
        # timm's own "output of block i, then the final norm"
        index = cfg.kept_depth - 1
        want = model.forward_intermediates(x, indices=[index], norm=True, output_fmt="NLC", intermediates_only=True)[0]
        if select_layer == -1:
            assert max_diff(want, model.forward_features(x)) == 0
    assert max_diff(ours, want) <= TOL


def test_timm_model_with_a_class_token_is_refused(tmp_path):
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=1, num_heads=2,
                              img_size=32, patch_size=8)
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    with pytest.raises(CheckpointError, match=r"^siglip_from=.*has 1 class / register token\(s\); unigen's encoder, "
                                              r"like SigLIP, has none$"):
        load_siglip_from(tmp_path, RECIPE_VISION)


# ---- transformers SigLIP / Siglip2 ----------------------------------------------------------------------------


def tower(model):
    """The module with ``embeddings`` / ``encoder`` / ``post_layernorm`` (transformers 5 flattened it)."""
    return getattr(model, "vision_model", model)


def tiny_vision_config(cls, **extra):
    return cls(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2, patch_size=8,
               **extra)


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vision = SiglipVisionModel(tiny_vision_config(SiglipVisionConfig, image_size=32)).eval()
    randomize_(vision, seed=2)
    tower_dir = tmp_path_factory.mktemp("siglip-vision")
    vision.save_pretrained(tower_dir)
    # a whole SiglipModel (text tower too) whose vision tower is the same one
    full = SiglipModel(SiglipConfig(text_config=SiglipTextConfig(hidden_size=16, intermediate_size=32,
                                                                 num_hidden_layers=1, num_attention_heads=2,
                                                                 vocab_size=64).to_dict(),
                                    vision_config=vision.config.to_dict()))
    tower(full.vision_model).load_state_dict(tower(vision).state_dict())
    full_dir = tmp_path_factory.mktemp("siglip-full")
    full.save_pretrained(full_dir)
    return vision, tower_dir, full_dir


@pytest.mark.parametrize("which", ["tower", "full"])
@pytest.mark.parametrize("select_layer", [-1, -2])
def test_transformers_siglip_features_equal_transformers(hf_siglip, which, select_layer):
    vision, tower_dir, full_dir = hf_siglip
    encoder, cfg = load_siglip_from(tower_dir if which == "tower" else full_dir, recipe(select_layer))
    assert (cfg.image_size, cfg.width, cfg.depth, cfg.mlp_act, cfg.mlp_ratio * 32) == (32, 32, 3, "gelu_tanh", 80)
    x = pixels(seed=1)
    with torch.no_grad():
        out = vision(pixel_values=x, output_hidden_states=True)
        # Janus's select_layer: that block's output through the final LayerNorm
        want = tower(vision).post_layernorm(out.hidden_states[select_layer])
        if select_layer == -1:
            assert max_diff(want, out.last_hidden_state) == 0
        ours = encoder(x)
    assert max_diff(ours, want) <= TOL


def siglip2_inputs(x: torch.Tensor, patch: int):
    """Siglip2's own patching (its image processor's function) of fixed-size images: a full grid, no padding."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    patches = torch.stack([convert_image_to_patches(img, patch) for img in x])
    grid = x.shape[-1] // patch
    return dict(pixel_values=patches, pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
                spatial_shapes=torch.tensor([[grid, grid]] * len(x)))


@pytest.mark.parametrize("select_layer", [-1, -2])
def test_transformers_siglip2_features_equal_transformers_at_its_grid(tmp_path, select_layer):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    vision = Siglip2VisionModel(tiny_vision_config(Siglip2VisionConfig, num_patches=16)).eval()
    randomize_(vision, seed=3)
    vision.save_pretrained(tmp_path)
    encoder, cfg = load_siglip_from(tmp_path, recipe(select_layer))
    assert (cfg.image_size, cfg.patch_size, cfg.num_tokens) == (32, 8, 16)
    x = pixels(seed=2)
    with torch.no_grad():
        out = vision(**siglip2_inputs(x, 8), output_hidden_states=True)
        want = tower(vision).post_layernorm(out.hidden_states[select_layer])
        ours = encoder(x)
    assert max_diff(ours, want) <= TOL


def test_siglip2_without_a_square_grid_is_refused_in_one_line(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(tiny_vision_config(Siglip2VisionConfig, num_patches=12)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_siglip_from(tmp_path, RECIPE_VISION)
    assert re.fullmatch(r"siglip_from=\S+: \S+ has 12 position embeddings, not a square grid; unigen reads Siglip2 "
                        r"as a fixed-size encoder \(one square grid, no native-resolution patching\)", str(err.value))


# ---- unigen's own encoder, and Janus's ---------------------------------------------------------------------------


def test_unigen_trained_siglip_loads_bit_for_bit(tmp_path):
    from tokenizers import Tokenizer, models

    from unigen.models.siglip import SigLIPDualEncoder, SigLIPTowersConfig, TextTowerConfig
    from unigen.training.tokenizer.siglip_trainer import save_siglip

    vision = SigLIPConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, stem="conv")
    dual = SigLIPDualEncoder(SigLIPTowersConfig(vision=vision, text=TextTowerConfig(width=16, depth=1, num_heads=2,
                                                                                    vocab_size=8), embed_dim=16))
    randomize_(dual, seed=4)
    save_siglip(dual.eval(), Tokenizer(models.WordLevel({"a": 0}, unk_token="a")), tmp_path)
    encoder, cfg = load_siglip_from(tmp_path, recipe(-1))
    assert cfg == vision
    x = pixels(seed=3)
    with torch.no_grad():
        assert torch.equal(encoder(x), dual.vision_model(x))


@pytest.fixture(scope="module")
def tiny_janus(tmp_path_factory):
    from unigen.models.model import UniGenModel
    from unigen.testing import make_tiny_hf_janus

    directory = tmp_path_factory.mktemp("janus")
    make_tiny_hf_janus(directory, seed=5)
    return UniGenModel.from_pretrained(directory).eval(), directory


def test_janus_checkpoint_parts_load_as_in_the_whole_model(tiny_janus):
    model, directory = tiny_janus
    encoder, vision = load_siglip_from(directory, recipe(-1))
    vq, vq_cfg = load_vq_from(directory, RECIPE_VQ)
    assert vision == model.config.vision and vq_cfg == model.config.vq
    x, y = pixels(size=vision.image_size, seed=4), pixels(size=vq_cfg.image_size, seed=5)
    with torch.no_grad():
        assert torch.equal(encoder(x), model.vision_model(x))
        codes = model.encode_image_tokens(y)
        assert torch.equal(vq.encode(y), codes)
        assert torch.equal(vq.decode(codes), model.decode_image_tokens(codes, clamp=False))


# ---- LlamaGen VQ-16 against transformers' JanusVQVAE (LlamaGen's architecture) ----------------------------------

# transformers' JanusVQVAE names -> LlamaGen's vq_model.py names (Encoder/Decoder.conv_blocks[i].res / .attn /
# .downsample / .upsample, mid = [ResnetBlock, AttnBlock, ResnetBlock]); the decoder's level 0 is the lowest
# resolution in both. LlamaGen also saves quantize.codebook_used (VectorQuantizer's show_usage buffer).
JANUS_HF_TO_LLAMAGEN = [
    (r"^(encoder|decoder)\.(?:down|up)\.(\d+)\.block\.", r"\1.conv_blocks.\2.res."),
    (r"^(encoder|decoder)\.(?:down|up)\.(\d+)\.", r"\1.conv_blocks.\2."),
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid.0."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid.1."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid.2."),
]


def to_llamagen_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in JANUS_HF_TO_LLAMAGEN:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value.clone()
    out["quantize.codebook_used"] = torch.zeros(65536)
    return out


@pytest.fixture(scope="module")
def reference_vq(tmp_path_factory):
    """A tiny transformers JanusVQVAE (two levels: attention and a down/upsample) in a vq_ds16_c2i.pt-style file."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    torch.manual_seed(0)
    ref = JanusVQVAE(JanusVQVAEConfig(embed_dim=4, num_embeddings=16, base_channels=32, channel_multiplier=[1, 2],
                                      num_res_blocks=1, latent_channels=32, resolution=32, num_patches=16)).eval()
    randomize_(ref, seed=6)
    with torch.no_grad():  # LlamaGen initialises (and, l2-normalising, only ever uses) unit-norm codebook rows;
        w = ref.quantize.embedding.weight  # transformers' encode normalises nothing, so the two agree only then
        w.copy_(F.normalize(w, dim=-1))
    path = tmp_path_factory.mktemp("llamagen") / "vq_ds16_c2i.pt"
    torch.save({"model": to_llamagen_names(ref.state_dict())}, path)
    return ref, path


def test_llamagen_vq_codes_and_decode_equal_the_reference(reference_vq):
    ref, path = reference_vq
    vq, cfg = load_vq_from(path, RECIPE_VQ)
    assert (cfg.codebook_size, cfg.embed_dim, cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks,
            cfg.z_channels, cfg.norm_groups, cfg.image_size) == (16, 4, 32, (1, 2), 1, 32, 32, 32)
    x = pixels(n=3, seed=5)
    with torch.no_grad():
        codes = vq.encode(x)
        want = ref.encode(x).image_tokens.view(3, -1)
        assert len(set(want.flatten().tolist())) > 4  # not one code everywhere
        assert torch.equal(codes, want)
        assert max_diff(vq.decode(codes), ref.decode(want)) <= TOL


def test_llamagen_ema_entry_wins_and_bare_state_dicts_load(reference_vq, tmp_path):
    ref, path = reference_vq
    weights = torch.load(path, weights_only=True)["model"]
    ema = {k: v + 0.01 if k == "quant_conv.bias" else v for k, v in weights.items()}
    torch.save({"model": weights, "ema": ema}, tmp_path / "train.pt")
    torch.save(weights, tmp_path / "bare.pt")
    vq, _ = load_vq_from(tmp_path / "train.pt", RECIPE_VQ)
    assert torch.equal(vq.quant_conv.bias, ema["quant_conv.bias"])
    vq, _ = load_vq_from(tmp_path / "bare.pt", RECIPE_VQ)
    assert torch.equal(vq.quant_conv.bias, weights["quant_conv.bias"])


def test_unigen_trained_vq_loads_bit_for_bit(tmp_path):
    from unigen.models.vq import VQModel
    from unigen.training.tokenizer.vq_trainer import save_vq

    cfg = dataclasses.replace(RECIPE_VQ, norm_groups=8, local_encoder=True)
    vq = VQModel(cfg).eval()
    randomize_(vq, seed=7)
    save_vq(vq, tmp_path)
    loaded, found = load_vq_from(tmp_path, VQConfig())
    assert found == cfg
    x = pixels(seed=6)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), vq.encode(x))


# ---- bad input --------------------------------------------------------------------------------------------------


def test_unknown_layouts_name_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"^siglip_from=\S+: \S+ \(model_type='bert'\) is no encoder layout "
                                              r"siglip_from reads; supported: unigen train-siglip .*timm .*"
                                              r"SiglipVisionModel .*Siglip2VisionModel"):
        load_siglip_from(tmp_path, RECIPE_VISION)
    with pytest.raises(CheckpointError, match=r"^vq_from=\S+: \S+ \(model_type='bert'\) is no VQ layout vq_from "
                                              r"reads; supported: a LlamaGen VQ checkpoint file .*unigen-vq"):
        load_vq_from(tmp_path, RECIPE_VQ)
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"^vq_from=\S+: \S+other\.pt holds \['optimizer'\], none of LlamaGen's "
                                              r"weight entries \['ema', 'model', 'state_dict'\]"):
        load_vq_from(tmp_path / "other.pt", RECIPE_VQ)


def test_missing_sources_say_which(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"^siglip_from=\S+nowhere: checkpoint directory \S+nowhere "
                                                      r"does not exist"):
        load_siglip_from(tmp_path / "nowhere", RECIPE_VISION)
    with pytest.raises(CheckpointNotFoundError, match=r"^vq_from=\S+vq_ds16_c2i\.pt: \S+vq_ds16_c2i\.pt does not "
                                                      r"exist \(a LlamaGen VQ checkpoint file was expected\)$"):
        load_vq_from(tmp_path / "vq_ds16_c2i.pt", RECIPE_VQ)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(CheckpointError, match=r"^siglip_from=\S+: \S+ has a config.json but no weights: expected one "
                                              r"of \['model.safetensors'"):
        load_siglip_from(tmp_path, RECIPE_VISION)


def test_a_pickle_that_is_not_weights_is_refused(tmp_path):
    import argparse

    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "train.pt")
    with pytest.raises(CheckpointError, match=r"^vq_from=\S+: \S+train\.pt could not be read as a weights-only "
                                              r"PyTorch file .*save only its weights"):
        load_vq_from(tmp_path / "train.pt", RECIPE_VQ)


def test_width_mismatches_are_one_line_naming_the_part(reference_vq, timm_siglip, tmp_path):
    _, path = reference_vq
    weights = torch.load(path, weights_only=True)["model"]
    weights["quant_conv.weight"] = weights["quant_conv.weight"][:2]  # 2 wide, the codebook 4
    weights["quant_conv.bias"] = weights["quant_conv.bias"][:2]
    torch.save({"model": weights}, tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError) as err:
        load_vq_from(tmp_path / "narrow.pt", RECIPE_VQ)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"vq_from={tmp_path / 'narrow.pt'}: weights in ")
    assert "shape mismatches (2): ['quant_conv.bias: checkpoint (2,) vs config (4,)'" in message

    _, directory = timm_siglip
    config = json.loads((directory / "config.json").read_text())
    config["model_args"]["embed_dim"] = 64  # the weights are 32 wide
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps(config))
    (wide / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_siglip_from(wide, RECIPE_VISION)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"siglip_from={wide}: timm could not build "
                                                      "'vit_large_patch16_siglip_384' from ")
    assert "size mismatch" in message


def test_select_layer_out_of_range_names_the_blocks(timm_siglip):
    _, directory = timm_siglip
    with pytest.raises(ConfigError, match=r"^siglip_from=\S+: vision.select_layer must be -1 \(the last block\), -2, "
                                          r"\.\.\. down to -3, or a block count 1\.\.3 \(vision.depth\); got -4$"):
        load_siglip_from(directory, dataclasses.replace(SigLIPConfig(depth=8), select_layer=-4))


def test_a_selected_layer_survives_save_and_load(timm_siglip, tmp_path):
    """A model built around a loaded encoder saves ``select_layer`` with the source's depth and loads back the
    same blocks."""
    from unigen.config import UniGenConfig
    from unigen.models.model import UniGenModel

    _, directory = timm_siglip
    encoder, vision = load_siglip_from(directory, recipe(-2))
    config = dataclasses.replace(UniGenConfig.from_name("smoke"), vision=vision)
    model = UniGenModel(config)
    model.vision_model.load_state_dict(encoder.state_dict())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["vision"]
    assert (saved["depth"], saved["select_layer"]) == (3, -2)
    again = UniGenModel.from_pretrained(tmp_path)
    x = pixels(seed=7)
    with torch.no_grad():
        assert torch.equal(again.vision_model(x), encoder(x))
