"""``vision.stem: conv``: the convolutional stem of the understanding encoder (SigLIP layout otherwise)."""

import dataclasses
import json

import pytest
import torch

from unigen import UniGenConfig, UniGenModel
from unigen.config import SigLIPConfig
from unigen.models.model import ConvStem, SigLIPEncoder


def tiny_config(stem: str = "conv") -> UniGenConfig:
    from test_cross_attention import tiny_config as tiny_cross_attention_config

    return tiny_cross_attention_config(
        vision=SigLIPConfig(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, stem=stem))


def test_conv_stem_replaces_the_patch_embedding_with_the_same_token_grid():
    torch.manual_seed(0)
    conv = SigLIPEncoder(SigLIPConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, stem="conv"))
    patch = SigLIPEncoder(SigLIPConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2))
    stem = conv.vision_tower.patch_embed.proj
    assert isinstance(stem, ConvStem)
    strides = [m.stride for m in stem.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2), (2, 2), (2, 2), (1, 1)]  # log2(8) = 3 halvings, then the 1x1 conv
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert conv(x).shape == patch(x).shape == (3, 16, 32)
    # GroupNorm, not BatchNorm: an image's features do not depend on the rest of its batch
    with torch.no_grad():
        assert torch.allclose(conv(x)[1:2], conv(x[1:2]), atol=1e-5)


def test_conv_stem_model_saves_and_loads_exactly(tmp_path):
    torch.manual_seed(0)
    model = UniGenModel(tiny_config())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vision"]["stem"] == "conv"
    again = UniGenModel.from_pretrained(tmp_path)
    assert again.config == model.config
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.vision_model(x), again.vision_model(x))
    # a patch-stem model cannot take these weights, and the error says which keys do not fit
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision"]["stem"] = "patch"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="patch_embed"):
        UniGenModel.from_pretrained(tmp_path)


def test_conv_stem_errors_name_the_problem():
    with pytest.raises(ValueError, match="power of 2; got 12"):
        SigLIPEncoder(SigLIPConfig(image_size=24, patch_size=12, width=32, depth=1, num_heads=2, stem="conv"))
    with pytest.raises(ValueError, match="unknown vision.stem 'hybrid'"):
        SigLIPEncoder(dataclasses.replace(SigLIPConfig(), stem="hybrid"))


def test_trained_siglip_stem_must_match_the_model(tmp_path):
    from test_tokenizer_trainers import siglip_config, write_images

    from unigen.training.tokenizer.siglip_trainer import SigLIPTrainer, load_siglip_into

    cfg = siglip_config(tmp_path, write_images(tmp_path, 4), steps=2, batch_size=4,
                        vision=dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, stem="conv"))
    trainer = SigLIPTrainer(cfg)
    trainer.train()
    model = UniGenModel(tiny_config())
    load_siglip_into(model, cfg.out_dir)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model.vision_model(x), trainer.model.vision_model.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="stem: model 'patch' vs checkpoint 'conv'"):
        load_siglip_into(UniGenModel(tiny_config(stem="patch")), cfg.out_dir)
