"""Method B (``fusion: "cross_attention"``): image features enter the decoder through gated cross-attention.

Llama 3.2 Vision style. Each block is a pre-norm cross-attention (queries from the text stream, keys and
values from the aligned image features, RMSNorm on q and k per head, grouped heads like the backbone)
followed by a feed-forward, each added to the residual stream through ``tanh(gate)`` with the gate
initialised to zero, so a freshly added block is an exact identity.

Placement. ``cross_attention_layers`` lists backbone block indices; the cross-attention block at ``i``
runs on the input of backbone block ``i`` (``i == num_layers``: after the last block, before the final
norm). Without a list, ``cross_attention_every = N`` gives ``N-1, 2N-1, ...`` (Mllama's placement:
before backbone blocks 3, 7, 11, ... for N = 4). The blocks live in ``model.cross_attn_layers``, an
``nn.ModuleDict`` keyed by that index, beside ``model.language_model.model.layers``: the backbone's
modules and checkpoint keys are exactly the decoder-only model's, and a Method B checkpoint is the base
checkpoint plus ``cross_attn_layers.<i>.*``.

Sequences. Each image is ONE ``<image_placeholder>`` token in ``input_ids`` (``config.image_placeholders_
per_image`` is 1 for Method B), embedded as text; its features never occupy sequence positions. Images
are matched to placeholders in reading order (row by row, left to right), like Method A.

Masking. Position ``c`` of a row sees the images whose placeholder sits at a column ``<= c`` (the
placeholder itself included). Where a position sees no image (text before the first image, rows
without images, image-generation rows) BOTH the attention and the feed-forward branch are multiplied
by zero, so the position passes through bit-for-bit unchanged. (transformers' Mllama zeroes only the
feed-forward branch; its attention branch then averages over every image: a leak.)

Caching. Image keys/values of every block are computed once, when the images are given (the prefill),
and kept in a :class:`CrossAttentionState`. ``model(...)`` returns it as ``output.cross_attention_state``
and, when ``use_cache=True``, also keeps it on the returned cache (``KVCache.cross_attention_state``), so a
decode loop that only passes the cache back (the Method A sampler API) keeps seeing the images. Images can
only be given in the call that starts a cache. The blocks run inside the decoder's own loop
(``unigen.models.decoder.Decoder``), prefill and fixed-shape decode steps alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from unigen.config import LLMConfig, UniGenConfig
from unigen.errors import ArgumentError, ConfigError
from unigen.models.decoder import MLP, RMSNorm
from unigen.prompts import stacked_images

_NEVER = torch.iinfo(torch.long).max  # column of a padded image slot: visible to no position


def cross_attention_positions(config: UniGenConfig) -> list[int]:
    """Backbone block indices that get a cross-attention block in front of them (validated)."""
    n = config.llm.num_layers
    if config.cross_attention_layers is not None:
        positions = sorted({int(i) for i in config.cross_attention_layers})
        bad = [i for i in positions if not 0 <= i <= n]
        if bad:
            raise ConfigError(
                f"cross_attention_layers {bad} out of range: positions are 0..{n} (block i runs before backbone "
                f"block i; {n} = after the last of the {n} blocks)"
            )
        where = f"cross_attention_layers={config.cross_attention_layers}"
    else:
        every = config.cross_attention_every
        if every < 1:
            raise ConfigError(f"cross_attention_every must be >= 1; got {every}")
        positions = list(range(every - 1, n, every))
        where = f"cross_attention_every={every} with {n} decoder blocks"
    if not positions:
        raise ConfigError(f"fusion='cross_attention' but {where} places no cross-attention block; "
                         "lower cross_attention_every or list cross_attention_layers")
    return positions


class CrossAttention(nn.Module):
    """Text queries, image keys/values; q/k RMSNorm per head; grouped (GQA) heads; no rotary positions (the
    block adds image positions to the features it projects)."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, eps: float):
        super().__init__()
        if width % num_heads or num_heads % num_kv_heads:
            raise ConfigError(f"width {width} / heads {num_heads} / kv heads {num_kv_heads} do not divide")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = width // num_heads
        self.q_proj = nn.Linear(width, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, width, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=eps)
        self.k_norm = RMSNorm(self.head_dim, eps=eps)

    def project_kv(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, n_keys, width) image features -> keys, values (batch, kv_heads, n_keys, head_dim)."""
        b, n, _ = features.shape
        k = self.k_proj(features).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(features).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, q_len, _ = hidden.shape
        q = self.q_proj(hidden).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        q = self.q_norm(q)
        out = nn.functional.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class CrossAttentionBlock(nn.Module):
    """``h += tanh(g_attn) * xattn(norm(h)); h += tanh(g_mlp) * mlp(norm(h))``, both zeroed where no image is seen."""

    def __init__(self, llm: LLMConfig, image_tokens: int | None = None, gate_init: float = 0.0,
                 init_std: float = 0.02):
        """``image_tokens``: features per image; with it the block owns a position table for them (None: none)."""
        super().__init__()
        width, eps = llm.hidden_size, llm.rms_norm_eps
        self.input_layernorm = RMSNorm(width, eps=eps)
        self.cross_attn = CrossAttention(width, llm.num_heads, llm.num_kv_heads, eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.post_attention_layernorm = RMSNorm(width, eps=eps)
        self.mlp = MLP(width, llm.intermediate_size)
        self.cross_attn_mlp_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        # Attention over keys without positions is blind to their order: permuting an image's features gives
        # the same output. The table goes into the keys (where to look) and the values (what was read says
        # where it came from).
        self.image_position = (nn.Parameter(sincos_2d(image_tokens, width)) if image_tokens is not None
                               else None)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=init_std)

    def project_kv(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, n_slots, n_tokens, width) features of each row's image slots -> keys, values
        (batch, kv_heads, n_slots * n_tokens, head_dim)."""
        if self.image_position is not None:
            images = images + self.image_position.to(images.dtype)
        return self.cross_attn.project_kv(images.flatten(1, 2))

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None, sees_image: torch.Tensor | None) -> torch.Tensor:
        """``sees_image``: (batch, q_len, 1), 1 where the position sees at least one image, else 0 (None: all 1)."""
        attn = self.cross_attn(self.input_layernorm(hidden), keys, values, mask)
        if sees_image is not None:
            attn = attn * sees_image
        hidden = hidden + self.cross_attn_attn_gate.tanh() * attn
        ff = self.mlp(self.post_attention_layernorm(hidden))
        if sees_image is not None:
            ff = ff * sees_image
        return hidden + self.cross_attn_mlp_gate.tanh() * ff


def build_cross_attention_layers(config: UniGenConfig) -> nn.ModuleDict | None:
    """The Method B blocks for ``config`` (None for ``fusion: "concat"``)."""
    if config.fusion == "concat":
        return None
    if config.fusion != "cross_attention":
        raise ConfigError(f"unknown fusion {config.fusion!r}; expected 'concat' or 'cross_attention'")
    image_tokens = config.vision.num_tokens if config.cross_attention_image_positions else None
    return nn.ModuleDict({str(i): CrossAttentionBlock(config.llm, image_tokens, config.cross_attention_gate_init)
                          for i in cross_attention_positions(config)})


def sincos_2d(n_tokens: int, width: int) -> torch.Tensor:
    """(n_tokens, width) 2-D sine-cosine table of a square token grid (MAE / ViT style): the first half of
    the channels encodes the row, the second half the column."""
    grid = int(round(n_tokens**0.5))
    if grid * grid != n_tokens or width % 4:
        raise ConfigError(f"image positions need a square token grid and a width divisible by 4; got {n_tokens} "
                         f"tokens, width {width}")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


# ---- per-call image state ------------------------------------------------------------------------


@dataclass
class CrossAttentionState:
    """Image keys/values of every cross-attention block for one batch, computed once per set of images.

    ``keys[i]``/``values[i]``: (batch, kv_heads, n_slots * n_tokens, head_dim) for the block at position
    ``i``; ``key_columns``: (batch, n_slots * n_tokens) sequence column of the placeholder of the image
    each key belongs to (a huge sentinel for padding slots of rows with fewer images).
    """

    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    key_columns: torch.Tensor
    last_column: int = _NEVER  # largest placeholder column: later queries see every image of their row
    no_padding: bool = False  # every row holds the same number of images (no padding slots)
    _steady: tuple | None = dataclasses.field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.key_columns.shape[0]

    def visibility(self, start: int, q_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For query columns ``start .. start + q_len - 1``: the SDPA mask (broadcastable to (batch, 1, q_len,
        n_keys); None = all visible) and sees-image (broadcastable to (batch, q_len, 1); None = all see one).

        Positions that see no image get an all-true mask row (no NaN from an empty softmax); their output is
        multiplied by zero through ``sees_image``. Decode steps (every image already placed) reuse one
        precomputed pair: no per-step mask work and no host sync.
        """
        if start >= self.last_column:
            if self._steady is None:
                valid = self.key_columns != _NEVER
                sees = valid.any(-1)
                if bool(sees.all()):
                    self._steady = (None if self.no_padding else valid[:, None, None, :], None)
                else:
                    self._steady = ((valid | ~sees[:, None])[:, None, None, :], sees[:, None, None])
            return self._steady
        columns = torch.arange(start, start + q_len, device=self.key_columns.device)
        visible = self.key_columns[:, None, :] <= columns[None, :, None]
        if bool(visible.all()):
            return None, None
        sees = visible.any(-1, keepdim=True)
        return (visible | ~sees)[:, None], sees

    def decode_visibility(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`visibility` of a decode step: every image is placed by then (images come with the prefill)."""
        return self.visibility(self.last_column, 1)

    def _map(self, fn) -> CrossAttentionState:
        return CrossAttentionState({k: fn(v) for k, v in self.keys.items()},
                                   {k: fn(v) for k, v in self.values.items()}, fn(self.key_columns),
                                   self.last_column, self.no_padding)

    # same names as transformers' Cache batch methods, for samplers that reshape the batch
    def batch_repeat_interleave(self, repeats: int) -> CrossAttentionState:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> CrossAttentionState:
        return self._map(lambda t: t[indices.to(t.device)])


def prepare_cross_attention_state(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                                  column_offset: int = 0) -> CrossAttentionState | None:
    """Encode the images and project them to every block's keys/values. None when there are no images."""
    image_id = model.config.image_token_id
    is_image = input_ids == image_id
    per_row = is_image.sum(1)
    n_slots = int(per_row.sum())
    pixel_values = stacked_images(pixel_values)
    if pixel_values is None:
        if n_slots:
            raise ArgumentError(f"input_ids hold {n_slots} image placeholder tokens (id {image_id}) but no "
                                "pixel_values were given")
        return None
    if pixel_values.shape[0] != n_slots:
        raise ArgumentError(
            f"fusion='cross_attention': {pixel_values.shape[0]} image(s) given but input_ids hold {n_slots} image "
            f"placeholder tokens (id {image_id}); with cross-attention each image is exactly ONE placeholder "
            "(config.image_placeholders_per_image == 1)"
        )
    if n_slots == 0:
        return None
    features = model.get_image_features(pixel_values)  # (n_images, n_tokens, width)
    n_img, n_tok, width = features.shape
    batch, most = input_ids.shape[0], int(per_row.max())
    rows, cols = is_image.nonzero(as_tuple=True)  # reading order: row by row, left to right
    slot = (is_image.long().cumsum(1) - 1)[rows, cols]
    slots = features.new_zeros(batch, most, n_tok, width)
    slots = slots.index_put((rows, slot), features)
    image_columns = torch.full((batch, most), _NEVER, dtype=torch.long, device=input_ids.device)
    image_columns[rows, slot] = cols + column_offset
    key_columns = image_columns.repeat_interleave(n_tok, dim=1)
    keys, values = {}, {}
    for name, block in model.cross_attn_layers.items():
        keys[name], values[name] = block.project_kv(slots)
    return CrossAttentionState(keys, values, key_columns, last_column=int(image_columns[rows, slot].max()),
                               no_padding=bool((per_row == most).all()))


def resolve_cross_attention_state(model, input_ids, pixel_values, past_key_values, explicit):
    """The state for this call: new from ``pixel_values``, else ``explicit``, else the one on the cache."""
    cached = past_key_values.cross_attention_state if past_key_values is not None else None
    if stacked_images(pixel_values) is not None:
        if explicit is not None or cached is not None:
            raise ArgumentError("images for a cross-attention model go in the call that starts the cache (the "
                                "prefill); this cache / cross_attention_state already holds images")
        if input_ids is None:
            raise ArgumentError("fusion='cross_attention' needs input_ids with pixel_values (to place each image)")
        offset = past_key_values.length if past_key_values is not None else 0
        state = prepare_cross_attention_state(model, input_ids, pixel_values, column_offset=offset)
    else:
        state = explicit if explicit is not None else cached
        if state is None and input_ids is not None:
            prepare_cross_attention_state(model, input_ids, None)  # raises if placeholders have no images
    return state


# ---- converting a base (Method A) model ------------------------------------------------------------


def add_cross_attention(model, cross_attention_every: int | None = None,
                        cross_attention_layers: list[int] | None = None):
    """Turn a ``fusion: "concat"`` model into a Method B model, in place: fresh zero-gated blocks.

    Every existing weight is kept; the model computes exactly what it computed before until the gates
    move. Initialisation uses torch's global RNG (seed it for reproducible blocks). Returns the model.
    """
    if model.cross_attn_layers is not None:
        raise ArgumentError("the model already has cross-attention layers")
    changes: dict = {"fusion": "cross_attention"}
    if cross_attention_every is not None:
        changes["cross_attention_every"] = cross_attention_every
    if cross_attention_layers is not None:
        changes["cross_attention_layers"] = list(cross_attention_layers)
    config = dataclasses.replace(model.config, **changes)
    blocks = build_cross_attention_layers(config)
    model.cross_attn_layers = blocks.to(device=model.device, dtype=model.dtype)
    model.config = config
    return model


def convert_fusion(model, fusion: str, cross_attention_every: int | None = None,
                   cross_attention_layers: list[int] | None = None):
    """``from_pretrained(..., fusion=...)``: load a base checkpoint as Method B (adds zero-gated blocks)."""
    if fusion not in ("concat", "cross_attention"):
        raise ArgumentError(f"unknown fusion {fusion!r}; expected 'concat' or 'cross_attention'")
    placement = cross_attention_every is not None or cross_attention_layers is not None
    if fusion == "concat":
        if model.config.fusion != "concat":
            raise ArgumentError("this checkpoint is a cross-attention (Method B) model; loading it with "
                                "fusion='concat' would drop its cross-attention weights. Load it without fusion=.")
        if placement:
            raise ArgumentError("cross_attention_every / cross_attention_layers only apply with "
                                "fusion='cross_attention'")
        return model
    if model.config.fusion == "cross_attention":
        if placement:
            wanted = dataclasses.replace(
                model.config,
                cross_attention_every=cross_attention_every or model.config.cross_attention_every,
                cross_attention_layers=cross_attention_layers if cross_attention_layers is not None
                else (None if cross_attention_every is not None else model.config.cross_attention_layers))
            if cross_attention_positions(wanted) != cross_attention_positions(model.config):
                raise ArgumentError(f"this checkpoint already has cross-attention blocks at "
                                 f"{cross_attention_positions(model.config)}; cannot move them to "
                                 f"{cross_attention_positions(wanted)}")
        return model
    return add_cross_attention(model, cross_attention_every, cross_attention_layers)
