"""Named model presets: the shipped recipes name their model size instead of pasting it, and build the same model."""

from pathlib import Path

import pytest
import yaml

from unigen.config import LLMConfig, SigLIPConfig, UniGenConfig, VQConfig
from unigen.config_io import build_config, load_config
from unigen.errors import ConfigError
from unigen.models.presets import PRESETS, preset
from unigen.shapes.demo import DemoConfig, tokenizer_configs
from unigen.training import load_recipe
from unigen.training.tokenizer.siglip_trainer import SigLIPTrainConfig
from unigen.training.tokenizer.vq_trainer import VQTrainConfig

REPO = Path(__file__).resolve().parents[1]
# The sizes the recipes pasted before they named a preset (train/*.yaml and tokenizers/*.yaml at commit 31780ad):
# every recipe must still build exactly these parts.
SHAPES_VQ = ("{image_size: 64, base_channels: 16, channel_mult: [1, 2, 2, 4], num_res_blocks: 1, z_channels: 64, "
             "embed_dim: 8, codebook_size: 512, norm_groups: 4, local_encoder: true}")
SHAPES_LLM = ("{vocab_size: 256, hidden_size: 256, intermediate_size: 688, num_layers: 4, num_heads: 4, "
              "num_kv_heads: 4, max_position_embeddings: 512}")
SHAPES_VISION = "{image_size: 64, patch_size: 16, width: 128, depth: 4, num_heads: 4, stem: conv}"
BEFORE = {
    "train/shapes.yaml": (SHAPES_VISION, SHAPES_VQ, SHAPES_LLM, 256),
    "train/shapes-crossattn.yaml": (SHAPES_VISION, SHAPES_VQ, SHAPES_LLM, 256),
    "train/shapes-small.yaml": ("{image_size: 64, patch_size: 16, width: 128, depth: 4, num_heads: 4}", SHAPES_VQ,
                                SHAPES_LLM, 256),
    "train/smoke.yaml": ("{image_size: 32, patch_size: 8, width: 32, depth: 1, num_heads: 2}",
                         "{image_size: 32, codebook_size: 64, embed_dim: 8, base_channels: 32, "
                         "channel_mult: [1, 1, 2], num_res_blocks: 1, z_channels: 32}",
                         "{vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, "
                         "num_kv_heads: 4, max_position_embeddings: 512}", 64),
}


def _part(cls, text: str):
    return build_config(cls, yaml.safe_load(text))


@pytest.mark.parametrize("recipe", sorted(BEFORE))
def test_every_recipe_builds_the_model_it_pasted_before(recipe):
    vision, vq, llm, gen_head_dim = BEFORE[recipe]
    assert "preset:" in (REPO / recipe).read_text()  # named, no longer pasted
    config = UniGenConfig.from_dict(load_recipe(REPO / recipe).model)
    assert config.vision == _part(SigLIPConfig, vision)
    assert config.vq == _part(VQConfig, vq)
    assert config.llm == _part(LLMConfig, llm)
    assert config.gen_head_dim == gen_head_dim


def test_the_tokenizer_recipes_build_the_shapes_models_parts():
    vq = load_config(VQTrainConfig, REPO / "tokenizers" / "vq-shapes.yaml")
    siglip = load_config(SigLIPTrainConfig, REPO / "tokenizers" / "siglip-shapes.yaml")
    assert vq.vq == _part(VQConfig, SHAPES_VQ)
    assert siglip.vision == _part(SigLIPConfig, SHAPES_VISION)
    shapes = UniGenConfig.from_name("shapes")
    assert (vq.vq, siglip.vision) == (shapes.vq, shapes.vision)


def test_keys_and_overrides_apply_over_the_preset():
    recipe = load_recipe(REPO / "train" / "shapes.yaml", ["model.llm.num_layers=2", "model.vq.codebook_size=256"])
    config = UniGenConfig.from_dict(recipe.model)
    assert (config.llm.num_layers, config.vq.codebook_size) == (2, 256)
    assert config.llm.hidden_size == 256 and config.vq.channel_mult == (1, 2, 2, 4)  # the rest from the preset
    assert config.guidance_scale == 2.0  # the recipe's own key beside the preset
    other = UniGenConfig.from_dict(load_recipe(REPO / "train" / "shapes.yaml", ["model.preset=smoke"]).model)
    assert other.llm == UniGenConfig.from_name("smoke").llm
    # a preset handed out is a copy: changing it changes no later recipe
    preset("shapes")["vq"]["channel_mult"].append(8)
    assert PRESETS["shapes"]["vq"]["channel_mult"] == [1, 2, 2, 4]


def test_a_wrong_preset_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {preset: shapes-xl}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml\.model\.preset: unknown model preset 'shapes-xl'; known: "
                                          r"\['shapes', 'smoke'\]"):
        load_recipe(path)
    path.write_text("text: {preset: shapes}\n")
    with pytest.raises(ConfigError, match=r"preset 'shapes' has no 'text' part"):
        load_config(SigLIPTrainConfig, path)
    path.write_text("model: {preset: [shapes]}\n")
    with pytest.raises(ConfigError, match=r"model\.preset must be a preset name, got \['shapes'\]"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"UniGenConfig.from_name: unknown model preset 'janus-pro-9b'"):
        UniGenConfig.from_name("janus-pro-9b")


@pytest.mark.parametrize("recipe", ["train/shapes.yaml", "train/shapes-small.yaml"])
def test_the_demo_trains_its_tokenizers_in_the_recipes_shape(recipe, tmp_path):
    # train/shapes-small.yaml's model has SigLIP's patch embedding: its encoder must be trained with one too
    cfg = DemoConfig(out_dir=str(tmp_path), recipe=str(REPO / recipe), n_train=5000)
    loaded = load_recipe(cfg.recipe, ["model.vq.codebook_size=256"])
    model = UniGenConfig.from_dict(loaded.model)
    (tmp_path / "m.jsonl").touch()  # the run plan checks that the tokenizers' images exist
    vq, siglip = tokenizer_configs(cfg, loaded, tmp_path / "m.jsonl")
    assert (vq.vq, siglip.vision) == (model.vq, model.vision)
    assert vq.vq.codebook_size == 256 and siglip.vision.stem == ("patch" if "small" in recipe else "conv")
    assert vq.out_dir == str(tmp_path / "model" / "vq") and siglip.data == str(tmp_path / "m.jsonl")
