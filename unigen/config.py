"""Typed configuration for every part of a unified model, saved as ``config.json``.

The defaults describe Janus-Pro-1B. Small models for tests and the Shapes world are the
same dataclasses with smaller numbers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unigen.config_io import build_config
from unigen.errors import ConfigError
from unigen.models.presets import preset
from unigen.runs import write_json


def _whole(section: str, owner, names: str, low: int = 1) -> None:
    """Each named field of ``owner`` is a whole number >= ``low``: a size of 0 ends in a ZeroDivisionError or an
    empty tensor deep in the model, so it is named here, where the config is read."""
    for name in names.split():
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{section}.{name} must be a whole number >= {low}, got {value!r}")


def _positive(section: str, owner, names: str) -> None:
    for name in names.split():
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{section}.{name} must be a number > 0, got {value!r}")


def _divides(section: str, name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ConfigError(f"{section}.{name} ({value}) must be a multiple of {by_name} ({by})")


@dataclass
class TilesConfig:
    """``vision.tiles`` (unigen.models.tiles, docs/RESOLUTION.md): an understanding image becomes up to ``max``
    encoder-size tiles on the grid closest to its aspect ratio (InternVL / NVLM-D's dynamic tiling), plus a
    global thumbnail when there is more than one tile, each tile's tokens after its text tag."""

    max: int = 6  # NVLM-D's and InternVL's default

    def __post_init__(self):
        _whole("vision.tiles", self, "max")


@dataclass
class SigLIPConfig:
    """SigLIP ViT (timm ``VisionTransformer``, no class token) for the understanding path."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    depth: int = 24  # blocks of the source encoder (official select_layer=-1 keeps all of them)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    # "patch": SigLIP's patch embedding (one patch_size x patch_size conv; what every SigLIP checkpoint has).
    # "conv": a small conv stem in its place (unigen.models.model.ConvStem), for encoders trained from scratch on
    # little data; same token grid.
    stem: Literal["patch", "conv"] = "patch"
    # As Janus's ``select_layer``: the feature is the output of this block, after the final LayerNorm; -1 the last
    # block, -2 the one before, or a positive count of blocks. Only the blocks up to it are built (``kept_depth``).
    select_layer: int = -1
    # The MLP's GELU: exact (Janus's and timm's SigLIP) or the tanh approximation (transformers' SigLIP and
    # Siglip2, ``hidden_act: gelu_pytorch_tanh``); the two differ by up to ~1e-3 per activation.
    mlp_act: Literal["gelu", "gelu_tanh"] = "gelu"
    tiles: TilesConfig | None = None  # None: one padded square per image (Janus)

    def __post_init__(self):
        _whole("vision", self, "image_size patch_size width depth num_heads")
        if isinstance(self.tiles, dict):  # from config.json or a recipe's model: section
            self.tiles = build_config(TilesConfig, self.tiles, "vision.tiles")
        if isinstance(self.select_layer, bool) or not isinstance(self.select_layer, int) or self.select_layer == 0:
            raise ConfigError(f"vision.select_layer must be a non-zero whole number (-1 the last block, -2 the one "
                              f"before, or a block count); got {self.select_layer!r}")
        _positive("vision", self, "mlp_ratio layer_norm_eps")
        if self.patch_size > self.image_size:
            raise ConfigError(f"vision.patch_size ({self.patch_size}) must not exceed vision.image_size "
                              f"({self.image_size}): the image would have no patch")
        _divides("vision", "width", self.width, "vision.num_heads", self.num_heads)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def kept_depth(self) -> int:
        """Blocks the encoder builds: those up to ``select_layer`` (as Janus's ``create_siglip_vit``). Checked here,
        not in ``__post_init__``: with ``siglip_from`` the depth is the source's, not the recipe's."""
        if not -self.depth <= self.select_layer <= self.depth:
            raise ConfigError(f"vision.select_layer must be -1 (the last block), -2, ... down to -{self.depth}, or a "
                              f"block count 1..{self.depth} (vision.depth); got {self.select_layer}")
        return self.depth + self.select_layer + 1 if self.select_layer < 0 else self.select_layer


@dataclass
class NativeVisionConfig:
    """``encoder: "native"`` (unigen.models.native_vision, docs/RESOLUTION.md): a ViT that reads each image at its
    own size, Qwen2-VL's vision tower. No absolute position table: 2-D rotary positions over patch rows and
    columns; ``merge_size`` x ``merge_size`` neighbouring patches are merged into one token (1: no merging).
    The defaults are Qwen2-VL's (``Qwen2VLVisionConfig``)."""

    patch_size: int = 14
    # Qwen2-VL's patch embedding is a Conv3d over 2 frames; a still image is its own 2 frames, so the two
    # temporal slices of the kernel act as one (their sum). 1 for an encoder trained from scratch.
    temporal_patch_size: int = 2
    merge_size: int = 2
    width: int = 1280  # Qwen2VLVisionConfig.embed_dim
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    out_width: int = 3584  # the merger's output (Qwen2VLVisionConfig.hidden_size)
    mlp_act: Literal["quick_gelu", "gelu", "gelu_tanh"] = "quick_gelu"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    # every image is resized (aspect kept) to multiples of patch_size * merge_size within these pixel counts
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    # False: images must already be multiples of patch_size * merge_size and within max_pixels (else an error)
    resize: bool = True

    def __post_init__(self):
        _whole("native_vision", self, "patch_size temporal_patch_size merge_size width depth num_heads out_width "
                                      "min_pixels max_pixels")
        _positive("native_vision", self, "mlp_ratio rope_theta layer_norm_eps")
        _divides("native_vision", "width", self.width, "native_vision.num_heads", self.num_heads)
        if (self.width // self.num_heads) % 4:
            raise ConfigError(f"native_vision: the head width ({self.width // self.num_heads}) must be a multiple of "
                              "4: the 2-D rotary embedding turns pairs of channels for rows and for columns")
        if self.mlp_act not in ("quick_gelu", "gelu", "gelu_tanh"):
            raise ConfigError(f"native_vision.mlp_act must be 'quick_gelu', 'gelu' or 'gelu_tanh', "
                              f"got {self.mlp_act!r}")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"native_vision.min_pixels ({self.min_pixels}) must not exceed max_pixels "
                              f"({self.max_pixels})")

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size


@dataclass
class VQConfig:
    """LlamaGen VQ-16 image tokenizer: conv encoder/decoder around an l2-normalised codebook."""

    codebook_size: int = 16384
    embed_dim: int = 8
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    # GroupNorm groups (LlamaGen/Janus: 32). At 32 channels that is one channel per group, which
    # normalises a flat colour away; small tokenizers learn colour much sooner with fewer groups.
    norm_groups: int = 32
    # Encoder without attention and with per-pixel channel norms: a code then depends only on its own
    # neighbourhood. LlamaGen's encoder (False) lets GroupNorm statistics and attention carry the whole
    # image into every code, so an empty background gets different codes in every image, which a
    # generator must then learn to predict.
    local_encoder: bool = False
    commit_beta: float = 0.25  # used only when training the tokenizer
    image_size: int = 384  # generation resolution

    def __post_init__(self):
        _whole("vq", self, "codebook_size embed_dim base_channels z_channels image_size")
        _whole("vq", self, "num_res_blocks norm_groups", low=0)
        if not self.channel_mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                            for m in self.channel_mult):
            raise ConfigError(f"vq.channel_mult must be a non-empty list of whole numbers >= 1, got "
                              f"{list(self.channel_mult)!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"vq.dropout must be in [0, 1), got {self.dropout}")
        if self.commit_beta < 0:
            raise ConfigError(f"vq.commit_beta must be >= 0, got {self.commit_beta}")
        _divides("vq", "image_size", self.image_size, "the VQ downsampling factor 2 ** (len(vq.channel_mult) - 1)",
                 self.downsample)
        if self.norm_groups:  # 0 is the per-pixel channel norm (no groups)
            for channels in sorted({self.base_channels * m for m in (1, *self.channel_mult)}):
                if channels % self.norm_groups:
                    raise ConfigError(f"vq.norm_groups ({self.norm_groups}) must divide every level's channels; "
                                      f"vq.base_channels * channel_mult gives {channels}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclass
class MoEConfig:
    """A mixture-of-experts feed-forward (``unigen.models.moe``, docs/MOE.md): ``num_experts`` SwiGLU experts of
    width ``expert_size``, ``top_k`` of them per token, routed without drops; optional always-on shared experts
    (one SwiGLU of ``num_shared_experts * expert_size``, or ``shared_expert_size``), optionally behind a sigmoid gate
    (Qwen2-MoE). Layer ``i`` is MoE when ``i >= first_dense``, ``(i + 1) % every_n == 0`` and ``i`` is not in
    ``dense_layers``; the other layers keep the dense ``intermediate_size`` feed-forward."""

    num_experts: int = 8
    top_k: int = 2
    expert_size: int | None = None  # None: llm.intermediate_size (what upcycling a dense model needs)
    num_shared_experts: int = 0
    shared_expert_size: int | None = None  # None: num_shared_experts * expert_size
    shared_expert_gate: bool = False  # sigmoid(x @ w) scales the shared experts' output (Qwen2-MoE)
    every_n: int = 1  # as Qwen2-MoE's decoder_sparse_step
    first_dense: int = 0  # the first layers stay dense (DeepSeek-MoE's first_k_dense_replace)
    dense_layers: list[int] = field(default_factory=list)  # as Qwen2-MoE's mlp_only_layers
    # softmax_topk: softmax over all experts, then the top k (Mixtral, Qwen2-MoE, OLMoE); topk_softmax: the top k
    # logits, then a softmax over them (its weights always sum to 1)
    router: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    # softmax_topk: divide the k weights by their sum (Mixtral; Qwen2-MoE's and OLMoE's norm_topk_prob)
    normalize_top_k: bool = True
    aux_loss_weight: float = 0.01  # load-balancing loss (Switch Transformer's, per sequence) in the training loss
    z_loss_weight: float = 0.0  # router z-loss (ST-MoE): mean logsumexp(router logits) ** 2
    # a stage started from a dense checkpoint: every expert a copy of the dense feed-forward, a random router and
    # the shared experts' output at zero, so the model computes what the dense one did (unigen.models.moe)
    upcycle_from_dense: bool = False

    def __post_init__(self):
        _whole("llm.moe", self, "num_experts top_k every_n")
        _whole("llm.moe", self, "num_shared_experts first_dense", low=0)
        for name in ("expert_size", "shared_expert_size"):
            if getattr(self, name) is not None:
                _whole("llm.moe", self, name)
        if self.top_k > self.num_experts:
            raise ConfigError(f"llm.moe.top_k ({self.top_k}) must not exceed llm.moe.num_experts "
                              f"({self.num_experts}): a token cannot go to more experts than there are")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ConfigError("llm.moe.shared_expert_gate needs shared experts: set llm.moe.num_shared_experts >= 1 "
                              "or drop the gate")
        if self.shared_expert_size is not None and not self.num_shared_experts:
            raise ConfigError("llm.moe.shared_expert_size needs llm.moe.num_shared_experts >= 1")
        for name in ("aux_loss_weight", "z_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"llm.moe.{name} must be a number >= 0, got {value!r}")

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense and (layer + 1) % self.every_n == 0 and layer not in self.dense_layers

    def widths(self, dense: int) -> tuple[int, int]:
        """(one routed expert's width, the shared experts' width; 0: none) for a model of dense width ``dense``."""
        expert = self.expert_size or dense
        shared = self.shared_expert_size or self.num_shared_experts * expert
        return expert, shared


@dataclass
class LLMConfig:
    """Llama-style decoder (``unigen.models.decoder``): RMSNorm, RoPE, grouped-query attention, SwiGLU.

    The optional parts are what the pretrained families ``llm_from`` reads need (``unigen.models.llm_from``):
    q/k/v (and o) biases, per-head q/k RMSNorm, a head width of its own and scaled rotary frequencies."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    max_position_embeddings: int = 16384
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # unigen's decoder attends through SDPA only; the key stays so that saved config.json files keep loading
    attn_implementation: Literal["sdpa"] = "sdpa"
    head_dim: int | None = None  # width of one attention head; None: hidden_size / num_heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2, Llama's attention_bias)
    o_bias: bool = False  # a bias on the output projection (Llama's and Qwen3's attention_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before the rotation (Qwen3)
    # scaled rotary frequencies as transformers' rope_parameters: {"rope_type": "linear", "factor": 4.0} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    # where qk_norm normalises: each head (Qwen3) or the whole q and k projections (OLMoE)
    qk_norm_scope: Literal["head", "all"] = "head"
    moe: MoEConfig | None = None  # None: every layer a dense SwiGLU
    # "mrope": Qwen2-VL's multimodal rotary positions: position ids (3, batch, n) of (time, row, column), each
    # rotating its own ``mrope_section`` share of the frequencies (unigen.models.mrope); text has t = h = w
    rope: Literal["default", "mrope"] = "default"
    mrope_section: list[int] | None = None  # None with rope="mrope": Qwen2-VL's [16, 24, 24]

    def __post_init__(self):
        if isinstance(self.moe, dict):  # from config.json or a recipe's model: section
            self.moe = build_config(MoEConfig, self.moe, "llm.moe")
        _whole("llm", self, "vocab_size hidden_size intermediate_size num_layers num_heads num_kv_heads "
                            "max_position_embeddings")
        _positive("llm", self, "rms_norm_eps rope_theta")
        _divides("llm", "num_heads", self.num_heads, "llm.num_kv_heads", self.num_kv_heads)
        if self.head_dim is None:
            _divides("llm", "hidden_size", self.hidden_size, "llm.num_heads", self.num_heads)
        else:
            _whole("llm", self, "head_dim")
        if self.head_width % 2:
            raise ConfigError(f"llm.head_dim ({self.head_width}) must be even: rotary embeddings turn pairs of "
                              "channels")
        check_rope_scaling(self.rope_scaling)
        self._check_mrope()

    def _check_mrope(self) -> None:
        if self.rope not in ("default", "mrope"):
            raise ConfigError(f"llm.rope must be 'default' or 'mrope', got {self.rope!r}")
        if self.rope == "default":
            if self.mrope_section is not None:
                raise ConfigError("llm.mrope_section needs llm.rope: mrope")
            return
        if self.mrope_section is None:
            self.mrope_section = [16, 24, 24]
        section = list(self.mrope_section)
        if len(section) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in section):
            raise ConfigError(f"llm.mrope_section must be three whole numbers >= 0 (time, rows, columns), "
                              f"got {self.mrope_section!r}")
        if sum(section) != self.head_width // 2:
            raise ConfigError(f"llm.mrope_section {section} must sum to half the head width "
                              f"({self.head_width // 2}): each rotary frequency belongs to one axis")
        if self.rope_scaling is not None:
            raise ConfigError("llm.rope: mrope does not take llm.rope_scaling")
        self.mrope_section = section

    @property
    def head_width(self) -> int:
        """The width of one attention head (``head_dim``, or hidden_size / num_heads when it is unset)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


# rope_type -> the keys it needs (transformers' ROPE_INIT_FUNCTIONS names; the static ones these families use)
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: dict | None) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"llm.rope_scaling.rope_type {kind!r} is not supported; supported: "
                          f"{sorted(ROPE_SCALING_KEYS)}")
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"llm.rope_scaling.{key} must be a number > 0 for rope_type {kind!r}, got {value!r}")


# TokenIds field -> the token's text in Janus's tokenizer (and in the tokenizers unigen trains). The one
# table of special-token strings: loaders look these up in a checkpoint's vocabulary, prompts are built
# from them. The tokenizer's own pad token is read from the tokenizer: it has no fixed text.
SPECIAL_TOKEN_TEXT = {
    "bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "cfg_pad": "<｜▁pad▁｜>",
    "image_start": "<begin_of_image>", "image_end": "<end_of_image>", "image": "<image_placeholder>",
}


@dataclass
class TokenIds:
    """Special token ids. Loaders read them from the tokenizer when one is present."""

    bos: int = 100000
    eos: int = 100001
    pad: int = 100002  # tokenizer padding
    cfg_pad: int = 100015  # "<｜▁pad▁｜>", used for the unconditional CFG prompt (not ``pad``)
    image_start: int = 100016  # "<begin_of_image>"
    image_end: int = 100593  # "<end_of_image>"
    image: int = 100581  # "<image_placeholder>"


@dataclass
class UniGenConfig:
    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    aligner_depth: int = 2  # MLP SigLIP width -> LLM width
    gen_aligner_depth: int = 2  # MLP VQ embed dim -> LLM width
    gen_head_dim: int = 2048  # hidden width of the generation head
    # janus-pro / janus: DeepSeek's templates; chat-template: the tokenizer's own (an LLM from llm_from)
    prompt_format: Literal["janus-pro", "janus", "chat-template"] = "janus-pro"
    system_prompt: str | None = None  # understanding prompts; None = the format's (Janus's) system prompt
    fusion: Literal["concat", "cross_attention"] = "concat"
    encoder: Literal["siglip", "patch", "native"] = "siglip"
    native_vision: NativeVisionConfig | None = None  # encoder: native (None there: Qwen2-VL's sizes)
    cross_attention_every: int = 4
    cross_attention_layers: list[int] | None = None  # explicit positions override ``cross_attention_every``
    # Method B: add a learned 2-D position table (2-D sin-cos at init) to the image features each block
    # projects to keys and values, so what a query reads says where it came from (docs/FUSION.md)
    cross_attention_image_positions: bool = True
    # Method B: initial value of both gates (tanh(gate) scales each branch). 0 makes a new block an exact
    # identity, what adding blocks to a pretrained LLM needs; a model trained from scratch can start them open.
    cross_attention_gate_init: float = 0.0
    # Editing: the source's VQ codes follow the edit prompt, right before the target's, so each target code can
    # copy the code one image-length back (what an edit keeps) besides reading the source through SigLIP
    # (docs/EXPERIMENTS.md, editing); checkpoints saved before the key edit without them
    edit_source_codes: bool = False
    # CFG scale used when a caller gives none. Janus samples at 5; a small model trained on a narrow
    # world is over-steered by that, so checkpoints carry their own (docs/EXPERIMENTS.md).
    guidance_scale: float = 5.0
    # Image-token sampling temperature used when a caller gives none; Janus samples at 1. Small models
    # are more faithful lower, so checkpoints carry their own (docs/EXPERIMENTS.md).
    temperature: float = 1.0

    def __post_init__(self):
        _whole("config", self, "aligner_depth gen_aligner_depth gen_head_dim cross_attention_every")
        if isinstance(self.native_vision, dict):  # from config.json or a recipe's model: section
            self.native_vision = build_config(NativeVisionConfig, self.native_vision, "config.native_vision")
        if self.encoder == "native" and self.native_vision is None:
            self.native_vision = NativeVisionConfig()
        if self.encoder == "native" and self.fusion != "concat":
            raise ConfigError("encoder: native gives each image its own number of tokens, which Method B's "
                              "cross-attention does not take yet; use fusion: concat")
        if self.vision.tiles is not None and (self.encoder == "native" or self.fusion != "concat"):
            raise ConfigError("vision.tiles splits images for a fixed-size encoder read in the sequence; it needs "
                              "encoder siglip or patch with fusion: concat (remove vision.tiles)")

    @property
    def image_token_id(self) -> int:
        return self.tokens.image

    @property
    def understanding_width(self) -> int:
        """The width of the understanding encoder's features (what the aligner maps to the LLM's width)."""
        return self.native_vision.out_width if self.encoder == "native" else self.vision.width

    @property
    def image_placeholders_per_image(self) -> int:
        """Placeholder tokens per image in ``input_ids``: one per feature (concat) or exactly one (cross_attention)."""
        return 1 if self.fusion == "cross_attention" else self.vision.num_tokens

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "unigen"
        # a dense model's config.json stays as it was before these keys existed
        for key, default in (("moe", None), ("qk_norm_scope", "head"), ("rope", "default"), ("mrope_section", None)):
            if d["llm"][key] == default:
                del d["llm"][key]
        if d["native_vision"] is None:
            del d["native_vision"]
        if d["vision"]["tiles"] is None:
            del d["vision"]["tiles"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UniGenConfig:
        if not isinstance(d, dict):
            from unigen.errors import ConfigError

            raise ConfigError(f"a unigen config must be a JSON object of keys, got {type(d).__name__}")
        d = dict(d)
        d.pop("model_type", None)
        if d.get("fusion") == "cross_attention":
            # Method B checkpoints saved before image positions existed have no position tables
            d.setdefault("cross_attention_image_positions", False)
        subs = {"vision": SigLIPConfig, "vq": VQConfig, "llm": LLMConfig, "tokens": TokenIds}
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name in subs:
                kwargs[name] = _build(subs[name], value, f"config.{name}")
            else:
                kwargs[name] = value
        import math

        config = _build(cls, kwargs, "config")
        for name in ("guidance_scale", "temperature"):  # the defaults every sampler falls back on
            value = getattr(config, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                from unigen.errors import ConfigError

                raise ConfigError(f"config.{name} must be a finite number >= 0, got {value!r}")
        return config

    @classmethod
    def from_name(cls, name: str) -> UniGenConfig:
        """A named model size (unigen.models.presets, as litgpt's ``Config.from_name``): ``"shapes"`` or ``"smoke"``."""
        return cls.from_dict(preset(name, where="UniGenConfig.from_name"))

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / "config.json", self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> UniGenConfig:
        return cls.from_dict(json.loads((Path(directory) / "config.json").read_text()))


def _build(klass: type, values: dict[str, Any], where: str):
    """Build a dataclass through unigen's one builder (unigen.config_io): unknown keys named, values of the
    declared types, no NaN or infinity."""
    return build_config(klass, values, where)
