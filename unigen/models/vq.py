"""LlamaGen VQ-16 image tokenizer: conv encoder -> l2-normalised codebook -> conv decoder.

Module and parameter names follow LlamaGen / DeepSeek's Janus checkpoints
(``encoder.conv_blocks.{i}.res.{j}``, ``quantize.embedding``, ...), so official weights load
without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from unigen.config import VQConfig


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel: unlike GroupNorm it reads no statistics of other pixels."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


LOCAL = 0  # ``groups`` value that selects ChannelNorm (the local encoder)


def _norm(channels: int, groups: int) -> nn.Module:
    if groups == LOCAL:
        return ChannelNorm(channels)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions."""

    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        q, k, v = (rearrange(m(y), "b c h w -> b 1 (h w) c") for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # one head over every pixel
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2]))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as LlamaGen


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, optional attention after each, optional resampling."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attn: bool, resample: type | None, dropout: float,
                 groups: int):
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout, groups) for i in range(n_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(n_blocks)) if attn else nn.ModuleList()
        if resample is Downsample:
            self.downsample = Downsample(out_ch)
        elif resample is Upsample:
            self.upsample = Upsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _mid(ch: int, dropout: float, groups: int, attention: bool = True) -> nn.ModuleList:
    middle = AttnBlock(ch, groups) if attention else nn.Identity()  # Identity keeps the indices (mid.2)
    return nn.ModuleList([ResnetBlock(ch, ch, dropout, groups), middle, ResnetBlock(ch, ch, dropout, groups)])


class Encoder(nn.Module):
    """LlamaGen's encoder; with ``cfg.local_encoder`` no attention and per-pixel norms (see VQConfig)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch = cfg.channel_mult, cfg.base_channels
        groups = LOCAL if cfg.local_encoder else cfg.norm_groups
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, in_ch, last = [], ch, len(mult) - 1
        for i, m in enumerate(mult):
            resample = Downsample if i != last else None
            attn = i == last and not cfg.local_encoder
            levels.append(Level(in_ch, ch * m, cfg.num_res_blocks, attn, resample, cfg.dropout, groups))
            in_ch = ch * m
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _mid(in_ch, cfg.dropout, groups, attention=not cfg.local_encoder)
        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult, ch = cfg.channel_mult, cfg.base_channels
        in_ch = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = _mid(in_ch, cfg.dropout, cfg.norm_groups)
        levels = []
        for i, m in enumerate(reversed(mult)):  # lowest resolution first
            resample = Upsample if i != len(mult) - 1 else None
            levels.append(Level(in_ch, ch * m, cfg.num_res_blocks + 1, i == 0, resample, cfg.dropout,
                                cfg.norm_groups))
            in_ch = ch * m
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(in_ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w), straight-through gradient to z
    codes: torch.Tensor  # (B, h*w)
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor


class Quantizer(nn.Module):
    """Nearest-neighbour lookup in cosine space: z and the codebook are both l2-normalised.

    DeepSeek's encode normalises both; transformers' Janus port normalises neither before the
    argmin. We follow the official code (the weights were trained with it).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.beta = beta

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        h = z.shape[2]
        z = F.normalize(rearrange(z, "b d h w -> b (h w) d"), dim=-1)
        codebook = self.codebook()
        flat = z.flatten(0, 1)
        # |z|=|e|=1, so the nearest code is the one with the largest dot product
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        codes = dist.argmin(dim=1).view(z.shape[:2])  # (B, h*w), raster order
        zq = codebook[codes]
        codebook_loss = F.mse_loss(zq, z.detach())
        commit_loss = self.beta * F.mse_loss(zq.detach(), z)
        zq = z + (zq - z).detach()
        return QuantizerOutput(rearrange(zq, "b (h w) d -> b d h w", h=h), codes, codebook_loss, commit_loss)

    def lookup(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Codes (B, h*w) in raster order -> the code grid (B, D, h, w)."""
        return rearrange(self.codebook()[codes], "b (h w) d -> b d h w", h=grid[0], w=grid[1])


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg.codebook_size, cfg.embed_dim, cfg.commit_beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (s, s):
            raise ValueError(
                f"VQ pixels must have shape (batch, 3, {s}, {s}) in [-1, 1]; got {tuple(pixels.shape)}. "
                "Preprocess images with UniGenProcessor.generation_pixels first."
            )

    def quantize_pixels(self, pixels: torch.Tensor) -> QuantizerOutput:
        self._check_pixels(pixels)
        return self.quantize(self.quant_conv(self.encoder(pixels)))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> codes (B, h*w)."""
        return self.quantize_pixels(pixels).codes

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h*w) -> pixels in [-1, 1] (B, 3, H, W) (not clamped)."""
        n, grid = self.config.num_tokens, self.config.grid
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"image codes must have shape (batch, {n}); got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(
                f"image codes must lie in [0, {self.config.codebook_size}); "
                f"got min {int(codes.min())}, max {int(codes.max())}"
            )
        return self.decode_latent(self.quantize.lookup(codes, (grid, grid)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.quantize_pixels(pixels)
        return self.decode_latent(q.quantized), q
