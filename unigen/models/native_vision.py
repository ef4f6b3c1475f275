"""``encoder: "native"``: a ViT that reads every image at its own size (Qwen2-VL's vision tower).

No absolute position table: each head's channels turn by 2-D rotary angles, half by the patch's row, half by its
column, so any grid of patches has positions. An image is resized (aspect kept) to sides that are multiples of
``patch_size * merge_size`` within ``min_pixels``..``max_pixels`` (:func:`fit_size`, Qwen2-VL's ``smart_resize``),
cut into patches, and every ``merge_size`` x ``merge_size`` neighbouring patches are merged into one output
token by the ``merger`` (LayerNorm, then an MLP over their concatenation).

Several images of different sizes run as one packed sequence; attention stays inside each image: SDPA with a
block-diagonal boolean mask (any device), or on CUDA, by choice, FlexAttention's block-sparse document mask, which
skips the masked blocks (tests/test_native_vision.py compares the two on CUDA; docs/RESOLUTION.md).

Patches are laid out as transformers' ``Qwen2VLImageProcessor`` lays them out (block-major: the patches of one
merged token are consecutive), and the module tree uses transformers' ``Qwen2VisionTransformerPretrainedModel``
names, so its weights load by dropping a prefix (:func:`vision_state_from_qwen2vl`, the one key mapping).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unigen.config import NativeVisionConfig
from unigen.errors import ArgumentError, CheckpointError, CheckpointNotFoundError
from unigen.models.checkpoint import load_state, read_state_dict
from unigen.models.decoder import rotate

MAX_ASPECT = 200  # as Qwen2-VL's smart_resize: beyond this a side would round to nothing


def fit_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) an image is resized to: both multiples of ``factor``, their product within
    ``min_pixels``..``max_pixels``, the aspect ratio kept as closely as that allows. Qwen2-VL's ``smart_resize``
    rule, with sizes of 0 px refused by name instead of a ZeroDivisionError."""
    if height < 1 or width < 1:
        raise ArgumentError(f"an image of {width}x{height} px has no pixels; pass an image at least 1 px each way")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ArgumentError(f"an image of {width}x{height} px has an aspect ratio over {MAX_ASPECT}:1; crop it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_size(height: int, width: int, cfg: NativeVisionConfig) -> None:
    """With ``resize: false`` an image must already fit the encoder; what does not is named, with the fix."""
    f = cfg.factor
    if height < 1 or width < 1:
        raise ArgumentError(f"an image of {width}x{height} px has no pixels; pass an image at least 1 px each way")
    if height % f or width % f:
        raise ArgumentError(f"an image of {width}x{height} px is not a multiple of {f} px each way "
                            f"(patch_size x merge_size); resize it or set native_vision.resize: true")
    if height * width > cfg.max_pixels:
        raise ArgumentError(f"an image of {width}x{height} px has {height * width} pixels, above native_vision."
                            f"max_pixels ({cfg.max_pixels}); resize it or set native_vision.resize: true")


def patchify(image: torch.Tensor, patch_size: int, merge_size: int) -> torch.Tensor:
    """(3, H, W) -> (H/p * W/p, 3 * p * p): each patch flattened channels first, patches in transformers'
    block-major order (row-major over merged tokens, row-major over the patches inside one)."""
    c, h, w = image.shape
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    return x.reshape(gh * gw, c * p * p)


def grid_positions(grids: Sequence[tuple[int, int]], merge_size: int, device=None) -> torch.Tensor:
    """(patches, 2) row and column of every patch of the packed images, in :func:`patchify`'s order."""
    out = []
    for gh, gw in grids:
        rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
        shape = (gh // merge_size, merge_size, gw // merge_size, merge_size)
        out.append(torch.stack([rows.reshape(shape).transpose(1, 2).flatten(),
                                cols.reshape(shape).transpose(1, 2).flatten()], dim=-1))
    return torch.cat(out)


def vision_rotary_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and sign-folded sin (``decoder.rotate``'s form) of 2-D positions (patches, 2) -> (patches, 1, head_dim)
    each, float32: the first quarter of frequencies turns by the row, the second by the column (Qwen2-VL)."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, device=positions.device, dtype=torch.float) / half)
    freqs = (positions[..., None].float() * inv_freq).flatten(1)  # (patches, head_dim / 2): rows, then columns
    angles = torch.cat([freqs, freqs], dim=-1)
    sin = angles.sin()
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return angles.cos()[:, None], signed_sin[:, None]


def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention's compiled kernels run on CUDA; on CPU its eager fallback is a slow reference."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class PackedAttention:
    """Which keys each query may read when images are packed into one sequence: those of its own image.
    ``backend``: "flex" (FlexAttention's block-sparse mask, CUDA) or "mask" (a dense boolean mask for SDPA); "auto"
    picks flex where it runs. A backend that is asked for and cannot run is an error, never a silent swap."""

    def __init__(self, lengths: Sequence[int], device: torch.device, backend: str = "mask"):
        if backend not in ("auto", "flex", "mask"):
            raise ArgumentError(f"attention backend must be 'auto', 'flex' or 'mask', got {backend!r}")
        if backend == "auto":
            backend = "flex" if flex_attention_available(device) else "mask"
        if backend == "flex" and not flex_attention_available(device):
            raise ArgumentError(f"attention backend 'flex' needs CUDA and torch's FlexAttention (device: {device}); "
                                "use 'mask' or 'auto'")
        self.backend = backend
        ids = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(list(lengths), device=device))
        n = ids.numel()
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            self.block_mask = create_block_mask(lambda b, h, q, k: ids[q] == ids[k], None, None, n, n, device=device)
            self.mask = None
        else:
            self.mask = None if len(lengths) == 1 else (ids[:, None] == ids[None, :])[None, None]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (1, heads, n, head_dim) -> (1, heads, n, head_dim)."""
        if self.backend == "flex":
            return _compiled_flex()(q, k, v, block_mask=self.block_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=True)
    return _FLEX


class VisionAttention(nn.Module):
    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, rope, attend: PackedAttention) -> torch.Tensor:
        n, width = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)
        # the rotation in float32 (as Qwen2-VL), whatever the weights' dtype
        q, k = (rotate(t.float(), *rope).to(v.dtype) for t in (q, k))
        out = attend(*(t.transpose(0, 1)[None] for t in (q, k, v)))
        return self.proj(out[0].transpose(0, 1).reshape(n, width))


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class VisionMlp(nn.Module):
    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)
        self.act = ACTIVATIONS[cfg.mlp_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMlp(cfg)

    def forward(self, x: torch.Tensor, rope, attend: PackedAttention) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, attend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm each patch, concatenate each merge_size x merge_size group, MLP (exact GELU) to ``out_width``."""

    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        self.group_width = cfg.width * cfg.merge_size**2
        self.ln_q = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(self.group_width, self.group_width), nn.GELU(),
                                 nn.Linear(self.group_width, cfg.out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.group_width))


class PatchEmbed(nn.Module):
    """Qwen2-VL's Conv3d patch embedding (bias-free), kept in its shape so weights load as they are. A still image
    fills every temporal slice of the kernel with the same pixels, so the slices act as one: their sum."""

    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        p, t = cfg.patch_size, cfg.temporal_patch_size
        self.proj = nn.Conv3d(3, cfg.width, kernel_size=(t, p, p), stride=(t, p, p), bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(patches, 3 * p * p) -> (patches, width)."""
        return F.linear(patches, self.proj.weight.sum(2).flatten(1))


class NativeVisionEncoder(nn.Module):
    """Images of any sizes -> one feature per merged token each. ``forward`` takes a list of (3, H, W) images
    whose sides are multiples of ``patch_size * merge_size`` (the processor resizes them: :func:`fit_size`) and
    returns their features packed, (sum of tokens, out_width), image after image; ``grids`` says how many each has.
    """

    def __init__(self, cfg: NativeVisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        # "mask" (every device), "flex" (CUDA) or "auto" (flex where it runs): PackedAttention. The mask stays the
        # default until the CUDA test that compares the two has run (docs/RESOLUTION.md)
        self.attention_backend = "mask"

    def grid(self, image: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of patches of one image; a size the encoder cannot read is named."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ArgumentError(f"a native-resolution image must have shape (3, H, W); got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        check_size(h, w, self.config)
        return h // self.config.patch_size, w // self.config.patch_size

    def token_grid(self, image: torch.Tensor) -> tuple[int, int]:
        """(rows, columns) of the image's output tokens (after merging)."""
        gh, gw = self.grid(image)
        return gh // self.config.merge_size, gw // self.config.merge_size

    def forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        if not len(images):
            raise ArgumentError("the native-resolution encoder needs at least one image")
        grids = [self.grid(image) for image in images]
        weight = self.patch_embed.proj.weight
        patches = torch.cat([patchify(image.to(weight.dtype), cfg.patch_size, cfg.merge_size) for image in images])
        return self.forward_patches(patches, grids)

    def forward_patches(self, patches: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Patches in :func:`patchify`'s order, (patches, 3 * p * p), of images with these patch grids."""
        cfg = self.config
        x = self.patch_embed(patches)
        rope = vision_rotary_tables(grid_positions(grids, cfg.merge_size, x.device), cfg.width // cfg.num_heads,
                                    cfg.rope_theta)
        attend = PackedAttention([gh * gw for gh, gw in grids], x.device, self.attention_backend)
        for block in self.blocks:
            x = block(x, rope, attend)
        return self.merger(x)


def vision_state_from_qwen2vl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Qwen2-VL vision tower weights -> :class:`NativeVisionEncoder`'s: the tower's own keys
    (``Qwen2VisionTransformerPretrainedModel``), or a whole ``Qwen2VLForConditionalGeneration``'s
    (``model.visual.*``, older files ``visual.*``), whose other weights are left out. The one key mapping."""
    prefixes = ("model.visual.", "visual.")
    if any(k.startswith(prefixes) for k in state):
        state = {k.split("visual.", 1)[1]: v for k, v in state.items() if k.startswith(prefixes)}
    state = {k: v for k, v in state.items() if "rotary_pos_emb" not in k}  # computed, never stored
    if not state:
        raise CheckpointError("no Qwen2-VL vision tower weights found (keys visual.* / model.visual.*)")
    return state


QWEN2VL_TYPES = ("qwen2_vl", "qwen2_vl_vision")  # Qwen2.5-VL's tower differs (window attention, RMSNorm, SwiGLU)


def native_config_from_qwen2vl(raw: dict) -> NativeVisionConfig:
    """A Qwen2-VL ``config.json`` (the whole model's, or its vision tower's) -> the encoder's config."""
    vision = raw.get("vision_config", raw)
    theta = (vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return NativeVisionConfig(
        patch_size=vision.get("patch_size", 14), temporal_patch_size=vision.get("temporal_patch_size", 2),
        merge_size=vision.get("spatial_merge_size", 2), width=vision.get("embed_dim", 1280),
        depth=vision.get("depth", 32), num_heads=vision.get("num_heads", 16), mlp_ratio=vision.get("mlp_ratio", 4),
        out_width=vision.get("hidden_size", 3584), mlp_act=vision.get("hidden_act", "quick_gelu"), rope_theta=theta)


def load_qwen2vl_vision(directory: str | Path) -> NativeVisionEncoder:
    """transformers' Qwen2-VL vision tower (a ``Qwen2VisionTransformerPretrainedModel`` or a whole
    ``Qwen2VLForConditionalGeneration`` folder) as a :class:`NativeVisionEncoder`, fp32."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointNotFoundError(f"{directory} has no config.json; pass a transformers Qwen2-VL folder")
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") not in QWEN2VL_TYPES:
        raise CheckpointError(f"{directory} is model_type {raw.get('model_type')!r}, not a Qwen2-VL model "
                              f"({' or '.join(QWEN2VL_TYPES)})")
    cfg = native_config_from_qwen2vl(raw)
    preprocessor = directory / "preprocessor_config.json"  # the resize range lives with the image processor
    if preprocessor.is_file():
        pre = json.loads(preprocessor.read_text())
        size = pre.get("size") or {}
        cfg.min_pixels = pre.get("min_pixels", size.get("shortest_edge", cfg.min_pixels))
        cfg.max_pixels = pre.get("max_pixels", size.get("longest_edge", cfg.max_pixels))
        cfg.__post_init__()
    encoder = NativeVisionEncoder(cfg)
    load_state(encoder, vision_state_from_qwen2vl(read_state_dict(directory)), torch.float32, directory)
    return encoder.eval()
