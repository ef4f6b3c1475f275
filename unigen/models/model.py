"""UniGenModel: one Llama-style decoder shared by image understanding and image generation.

Understanding (Method A, ``fusion: "concat"``): SigLIP features -> MLP aligner -> spliced into the text
sequence at the image placeholder positions. Method B (``fusion: "cross_attention"``): the aligned
features reach the decoder through gated cross-attention blocks (``unigen/models/cross_attention.py``).
Generation: VQ codes -> gen_embed -> gen_aligner -> decoder ->
gen_head -> next-code logits. The module tree mirrors DeepSeek's official Janus checkpoint keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unigen.config import SigLIPConfig, UniGenConfig
from unigen.errors import ArgumentError, ConfigError
from unigen.models.checkpoint import load_state, read_checkpoint, resolve_checkpoint_dir, save_model
from unigen.models.cross_attention import build_cross_attention_layers, convert_fusion, resolve_cross_attention_state
from unigen.models.decoder import CausalLM, CrossAttentionInput, Decoder, KVCache, project
from unigen.models.native_inputs import mrope_position_ids, splice_native_features
from unigen.models.native_vision import NativeVisionEncoder
from unigen.models.param_groups import parameter_groups
from unigen.models.patch_encoder import PatchEncoder
from unigen.models.quantize import DEFAULT_LAYERS, Quantization, quantize_model
from unigen.models.vq import VQModel
from unigen.processor import check_pixel_values
from unigen.prompts import stacked_images


class MLPAligner(nn.Module):
    """``Linear -> (GELU -> Linear) * (depth - 1)``; exact (erf) GELU as in Janus."""

    def __init__(self, in_dim: int, out_dim: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GenHead(nn.Module):
    """Decoder hidden state -> logits over the VQ codebook (the "image output layer")."""

    def __init__(self, in_dim: int, hidden_dim: int, codebook_size: int):
        super().__init__()
        self.output_mlp_projector = nn.Linear(in_dim, hidden_dim)
        self.vision_head = nn.Linear(hidden_dim, codebook_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.gelu(project(self.output_mlp_projector, x))
        return project(self.vision_head, hidden)


class ConvStem(nn.Sequential):
    """``stem: "conv"``: in place of SigLIP's patch embedding, 3x3 stride-2 convs halve the image
    log2(patch_size) times (channels doubling up to ``width``), then a 1x1 conv: the same (n, width, grid, grid)
    output (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"). The shared 3x3 filters see an
    edge the same way at every offset, where a patch embedding must learn it once per offset (on Shapes it
    learns several times faster; docs/EXPERIMENTS.md).

    GroupNorm(1) after each conv: without a norm PyTorch's default init shrinks the signal ~20x over four convs
    and the position embedding drowns the image. Not BatchNorm (no running statistics to keep right across
    frozen stages and processes). Variants without a norm or with a per-pixel LayerNorm gave a Shapes captioner
    that never read colour (docs/EXPERIMENTS.md)."""

    def __init__(self, cfg: SigLIPConfig):
        p = cfg.patch_size
        if p < 2 or p & (p - 1):
            raise ConfigError(f"vision.stem='conv' needs patch_size to be a power of 2; got {p}")
        n = p.bit_length() - 1
        channels = [3] + [max(cfg.width >> (n - 1 - i), 8) for i in range(n)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out, eps=cfg.layer_norm_eps),
                       nn.GELU()]
        super().__init__(*layers, nn.Conv2d(channels[-1], cfg.width, 1))


class SigLIPEncoder(nn.Module):
    """timm ViT with SigLIP's shape: no class token; the final LayerNorm of the ``select_layer`` block's output is
    the feature (Janus builds only the blocks up to it: ``cfg.kept_depth``)."""

    MLP_ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh")}

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        if cfg.stem not in ("patch", "conv"):
            raise ConfigError(f"unknown vision.stem {cfg.stem!r}; expected 'patch' (SigLIP's) or 'conv'")
        if cfg.mlp_act not in self.MLP_ACTIVATIONS:
            raise ConfigError(f"unknown vision.mlp_act {cfg.mlp_act!r}; expected one of {sorted(self.MLP_ACTIVATIONS)}")
        self.config = cfg
        self.vision_tower = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.kept_depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            act_layer=self.MLP_ACTIVATIONS[cfg.mlp_act],
            class_token=False,
            global_pool="",  # the MAP head is unused by Janus; its checkpoint weights are ignored
            num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        )
        if cfg.stem == "conv":  # timm's PatchEmbed keeps flattening and position embedding around it
            self.vision_tower.patch_embed.proj = ConvStem(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values, self.config.image_size)
        return self.vision_tower.forward_features(pixel_values)


def build_understanding_encoder(config: UniGenConfig) -> nn.Module:
    """``encoder: "siglip"`` (pretrained ViT) or ``"patch"`` (Fuyu-style linear patch projection)."""
    if config.encoder == "siglip":
        return SigLIPEncoder(config.vision)
    if config.encoder == "patch":
        return PatchEncoder(config.vision)
    if config.encoder == "native":
        return NativeVisionEncoder(config.native_vision)
    raise ConfigError(f"unknown encoder {config.encoder!r}; expected 'siglip', 'patch' or 'native'")


class DecoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    past_key_values: KVCache | None


@dataclass
class UniGenOutput:
    logits: torch.Tensor  # (batch, seq, text vocab)
    last_hidden_state: torch.Tensor  # final normed decoder state (batch, seq, width), transformers' name
    past_key_values: KVCache | None = None
    cross_attention_state: object | None = None  # Method B: image keys/values (also kept on the cache)


class UniGenModel(nn.Module):
    def __init__(self, config: UniGenConfig):
        super().__init__()
        self.config = config
        width = config.llm.hidden_size
        self.vision_model = build_understanding_encoder(config)
        self.aligner = MLPAligner(config.understanding_width, width, config.aligner_depth)
        self.gen_vision_model = VQModel(config.vq)
        self.gen_embed = nn.Embedding(config.vq.codebook_size, config.vq.embed_dim)
        self.gen_aligner = MLPAligner(config.vq.embed_dim, width, config.gen_aligner_depth)
        self.gen_head = GenHead(width, config.gen_head_dim, config.vq.codebook_size)
        self.language_model = CausalLM(config.llm)
        # Method B blocks beside (not inside) the backbone's layer list; None for Method A
        self.cross_attn_layers = build_cross_attention_layers(config)

    # ---- pieces ------------------------------------------------------------------------
    @property
    def decoder(self) -> Decoder:
        """Embeddings, blocks, final norm (``unigen.models.decoder.Decoder``)."""
        return self.language_model.model

    @property
    def dtype(self) -> torch.dtype:
        return self.gen_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.gen_embed.weight.device

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def embed_image_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        return self.gen_aligner(self.gen_embed(codes))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, S, S) -> aligned features (n_images, n_vis_tokens, width)."""
        return self.aligner(self.vision_model(pixel_values.to(self.dtype)))

    def prepare_inputs_embeds(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
        source_codes: torch.Tensor | None = None, source_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Method A: placeholders replaced by image features. (Method B never splices: see ``forward``.)

        ``source_codes`` (rows, n_image_tokens): an edit's source codes, embedded like generated ones into the
        last n_image_tokens positions of the rows ``source_rows`` (bool, batch; ``None``: every row) marks;
        those positions' ids are slots (``unigen.generation.editing``) and are not read.
        """
        embeds = self._splice_image_features(self.embed_text(input_ids), input_ids, pixel_values)
        if source_codes is None:
            return embeds
        rows = torch.ones(len(embeds), dtype=torch.bool, device=embeds.device) if source_rows is None else source_rows
        n = source_codes.shape[-1]
        if source_codes.ndim != 2 or source_codes.shape[0] != int(rows.sum()) or n > embeds.shape[1]:
            raise ArgumentError(f"source_codes must be (rows with a source = {int(rows.sum())}, n_image_tokens <= "
                             f"{embeds.shape[1]}); got {tuple(source_codes.shape)}")
        embeds = embeds.clone()
        embeds[rows, -n:] = self.embed_image_tokens(source_codes).to(embeds.dtype)
        return embeds

    def _splice_image_features(self, embeds: torch.Tensor, input_ids: torch.Tensor,
                               pixel_values: torch.Tensor | None) -> torch.Tensor:
        if self.config.encoder == "native":  # images of their own sizes: unigen.models.native_inputs
            return splice_native_features(self, embeds, input_ids, pixel_values)
        is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        pixel_values = stacked_images(pixel_values)
        if pixel_values is None:
            if n_slots:
                raise ArgumentError(
                    f"input_ids hold {n_slots} image placeholder tokens (id {self.config.image_token_id}) "
                    "but no pixel_values were given"
                )
            return embeds
        features = self.get_image_features(pixel_values)
        n_feats = features.shape[0] * features.shape[1]
        if n_slots != n_feats:
            raise ArgumentError(
                f"{features.shape[0]} image(s) give {n_feats} feature vectors "
                f"({features.shape[1]} per image) but input_ids hold {n_slots} image placeholder tokens; "
                "each image needs exactly that many placeholders (the processor inserts them)"
            )
        # placeholders are filled in reading order: row by row, left to right
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    # ---- forward passes ----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        cross_attention_state=None,
        logits_to_keep: int = 0,
        source_codes: torch.Tensor | None = None,
        source_rows: torch.Tensor | None = None,
    ) -> UniGenOutput:
        """``logits_to_keep``: text logits for the last N positions only (0: all), as in transformers; a
        prefill needs one, and the full (seq, vocab) logits can cost more than the decoder. ``source_codes`` /
        ``source_rows``: an edit's source codes (see ``prepare_inputs_embeds``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ArgumentError("pass exactly one of input_ids and inputs_embeds")
        if source_codes is not None and (self.cross_attn_layers is not None or inputs_embeds is not None):
            raise ArgumentError("source_codes enter through input_ids' slots of a fusion 'concat' model")
        state = None
        if self.cross_attn_layers is not None:  # Method B: images go to the cross-attention blocks
            state = resolve_cross_attention_state(self, input_ids, pixel_values, past_key_values, cross_attention_state)
            if inputs_embeds is None:
                inputs_embeds = self.embed_text(input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, pixel_values, source_codes, source_rows)
        if position_ids is None:  # llm.rope: mrope gives image tokens (time, row, column) positions
            position_ids = mrope_position_ids(self.config, input_ids, attention_mask, pixel_values)
        hidden = self.run_decoder(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, state)
        logits = project(self.language_model.lm_head, hidden.last_hidden_state[:, -logits_to_keep:])
        return UniGenOutput(logits, hidden.last_hidden_state, hidden.past_key_values, state)

    def run_decoder(
        self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values: KVCache | None = None,
        use_cache=False, cross_attention_state=None,
    ) -> DecoderOutput:
        """The decoder on embeddings. ``use_cache=True`` without a cache starts one (sized for this call and
        grown as later calls need); samplers that know their length size it up front
        (``model.decoder.new_cache``)."""
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.decoder.new_cache(inputs_embeds.shape[0], inputs_embeds.shape[1])
        if cache is not None:
            cache = cache.grown(cache.length + inputs_embeds.shape[1])
            if cross_attention_state is None:  # Method B decode: the images ride on the cache
                cross_attention_state = cache.cross_attention_state
            cache.cross_attention_state = cross_attention_state
        cross = None
        if cross_attention_state is not None:
            if cross_attention_state.batch_size != inputs_embeds.shape[0]:
                raise ArgumentError(f"cross-attention state is for batch {cross_attention_state.batch_size}, inputs "
                                 f"have batch {inputs_embeds.shape[0]} (reshape it with state.batch_select_indices "
                                 "/ batch_repeat_interleave when the sampler reshapes the batch)")
            cross = CrossAttentionInput(self.cross_attn_layers, cross_attention_state)
        hidden = self.decoder(inputs_embeds, attention_mask, position_ids, cache, cross)
        return DecoderOutput(hidden, cache)

    def image_logits(
        self, input_ids: torch.Tensor, image_tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None, source_codes: torch.Tensor | None = None,
        source_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced generation-head logits (batch, n, codebook_size).

        ``[:, i]`` is the distribution of ``image_tokens[:, i]`` given the prompt (which ends with the
        image-start token, or an edit's source codes) and ``image_tokens[:, :i]``. ``pixel_values`` fill the
        prompts' image placeholders in reading order (an edit prompt's source images); ``source_codes`` /
        ``source_rows`` as in ``prepare_inputs_embeds``.
        """
        if image_tokens.ndim != 2 or image_tokens.shape[0] != input_ids.shape[0]:
            raise ArgumentError(
                f"image_tokens must be (batch={input_ids.shape[0]}, n); got {tuple(image_tokens.shape)}"
            )
        n = image_tokens.shape[1]
        embeds = torch.cat([self.prepare_inputs_embeds(input_ids, pixel_values, source_codes, source_rows),
                            self.embed_image_tokens(image_tokens[:, :-1])], 1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], n - 1)
            attention_mask = torch.cat([attention_mask, ones], 1)
        hidden = self.run_decoder(embeds, attention_mask).last_hidden_state
        return self.gen_head(hidden[:, input_ids.shape[1] - 1 :])

    # ---- VQ ----------------------------------------------------------------------------
    def encode_image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (batch, 3, H, W) -> codes (batch, h*w)."""
        return self.gen_vision_model.encode(pixels.to(self.dtype))

    def decode_image_tokens(self, codes: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Codes (batch, h*w) -> pixels (batch, 3, H, W), clamped to [-1, 1] unless ``clamp=False``."""
        pixels = self.gen_vision_model.decode(codes)
        return pixels.clamp(-1, 1) if clamp else pixels

    # ---- checkpoints -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", fusion=None,
                        cross_attention_every: int | None = None,
                        cross_attention_layers: list[int] | None = None) -> UniGenModel:
        """Load our own, transformers' Janus, or DeepSeek's official layout (local dir or hub id).

        ``fusion="cross_attention"`` on a base (concat) checkpoint adds fresh zero-gated cross-attention
        blocks (at ``cross_attention_every`` / ``cross_attention_layers``): the deliberate way to start a
        Method B model from a base model. ``fusion=None`` loads the checkpoint as saved.
        """
        directory = resolve_checkpoint_dir(path)
        config, state = read_checkpoint(directory, lazy=True)  # read tensor by tensor: one copy at the peak
        with torch.device("meta"):  # no memory or init work for weights the checkpoint replaces
            model = cls(config)
        load_state(model, state, dtype, directory)
        model.to(device).eval()
        if fusion is not None:
            convert_fusion(model, fusion, cross_attention_every, cross_attention_layers)
        return model

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        save_model(self, directory, max_shard_bytes=max_shard_bytes)

    def quantize(self, method: str, group_size: int = 128, layers: tuple[str, ...] = DEFAULT_LAYERS) -> UniGenModel:
        """Quantize the decoder blocks and the two heads (or the ``layers`` groups) in place through torchao:
        ``int8-weight-only``, ``int4-weight-only`` (``group_size``), ``int8-dynamic`` or ``float8``
        (``unigen.models.quantize``, docs/QUANTIZATION.md). Call it on the model's device, after any LoRA merge."""
        return quantize_model(self, Quantization(method, group_size, tuple(layers)))

    def trainable_groups(self) -> dict[str, list[str]]:
        """Parameter names by group (``unigen.models.param_groups.GROUPS``), e.g. ``"cross_attention"``, ``"llm"``."""
        return {group: [name for name, _ in params] for group, params in parameter_groups(self).items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
