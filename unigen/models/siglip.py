"""The image-text dual encoder a SigLIP encoder is trained in (``unigen train-siglip``).

The image tower is ``unigen.models.model.SigLIPEncoder`` (timm ViT, no class token), so its weights drop straight
into ``UniGenModel.vision_model``; a MAP (attention pool) head and a small text transformer exist only for the
contrastive loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Block
from torch import nn

from unigen.config import SigLIPConfig
from unigen.errors import ConfigError
from unigen.models.model import SigLIPEncoder


@dataclass
class TextTowerConfig:
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 32
    vocab_size: int = 0  # 0: taken from the tokenizer trained on the captions


@dataclass
class SigLIPTowersConfig:
    """What ``config.json`` of a trained SigLIP holds (besides ``model_type``)."""

    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 256


class TextTower(nn.Module):
    """Token + learned position embeddings -> pre-norm transformer blocks -> LayerNorm -> masked mean."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("text.vocab_size must be set (it comes from the caption tokenizer)")
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.max_len, cfg.width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.pos_embed[: ids.shape[1]]
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, -1e4)[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=bias)
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class SigLIPDualEncoder(nn.Module):
    def __init__(self, cfg: SigLIPTowersConfig, scale_init: float = math.log(10.0), bias_init: float = -10.0):
        super().__init__()
        self.config = cfg
        v = cfg.vision
        self.vision_model = SigLIPEncoder(v)  # same module (and key names) as UniGenModel.vision_model
        self.image_head = AttentionPoolLatent(v.width, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                                              norm_layer=partial(nn.LayerNorm, eps=v.layer_norm_eps))
        self.image_proj = nn.Linear(v.width, cfg.embed_dim)
        self.text_model = TextTower(cfg.text)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_head(self.vision_model(pixels))), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_model(ids, mask)), dim=-1)

    def logits(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * img @ txt.t() + self.logit_bias
