"""unigen's decoder: one Llama-style block stack for training, prefill, cached decoding and Method B.

RMSNorm, rotary positions, grouped-query attention through ``scaled_dot_product_attention`` and a SwiGLU
feed-forward, in the arithmetic of transformers' ``LlamaModel`` (the parity tests compare the two). q|k|v
and gate|up are fused parameters (one matmul each); checkpoints still hold DeepSeek's separate
``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj`` keys (``unigen.models.checkpoint`` splits and
joins them at the file boundary). What the pretrained families of ``llm_from`` differ by is configuration
(``LLMConfig``): q/k/v and o biases, per-head q/k RMSNorm, a head width of its own, scaled rotary frequencies.

One forward serves every use:
  * no cache: a whole (left-padded) sequence, causal; training, with optional gradient checkpointing;
  * ``cache`` and several positions: a prefill that writes the cache;
  * ``cache`` and one position: a decode step written with shapes that never change (captured by
    ``torch.compile`` or a CUDA graph, it attends over the whole pre-allocated cache with the unfilled
    columns masked; run eagerly, it reads only the filled columns).
Method B's gated cross-attention blocks (``unigen.models.cross_attention``) run inside the same loop, in front of
the backbone blocks they are placed at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unigen.config import LLMConfig
from unigen.models.feed_forward import MLP, SKINNY_ROWS, linear, project  # noqa: F401 - their old import path
from unigen.models.moe import Experts, MoEFeedForward, checkpoint_contexts
from unigen.models.mrope import last_positions, mrope_tables
from unigen.models.precision import native_bf16


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, scale: transformers' ``LlamaRMSNorm`` bit for bit, in one fused op."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                  scaling: dict | None = None):
    """cos and sign-folded sin (see ``rotate``) for (batch, n) positions -> two (batch, n, 1, head_dim) tensors.

    Each entry is one float32 product then cos/sin, as in transformers' default rotary embedding."""
    inv_freq = rotary_frequencies(head_dim, theta, scaling, positions.device)
    freqs = positions[..., None].float() * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    sin = angles.sin()
    half = head_dim // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return angles.cos().to(dtype)[:, :, None], signed_sin.to(dtype)[:, :, None]


def rotary_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The rotary inverse frequencies, scaled as transformers' ``ROPE_INIT_FUNCTIONS`` do for the static types
    (``unigen.config.ROPE_SCALING_KEYS``): "linear" divides them all by the factor, "llama3" divides the low
    ones and blends the middle band (Llama 3.1 / 3.2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, n, heads, head_dim). ``rotate_half(x) * sin == roll(x, d/2) * signed_sin``
    exactly (only signs move), so no negation or concatenation of x is needed."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class KVCache:
    """Pre-allocated keys and values of every block, for ``batch`` rows and ``max_len`` columns.

    Column ``c`` holds every row's ``c``-th token; left padding stays in place and is masked through
    ``key_bias`` (0 for a real token, -inf for padding and for columns not yet written). ``next_pos`` is
    each row's next rotary position, ``column`` the next column to write, as a tensor so that a decode step
    reads no Python number. ``length`` is the same count on the host, for bounds checks.
    """

    k: torch.Tensor  # (layers, batch, kv heads, max_len, head_dim)
    v: torch.Tensor
    key_bias: torch.Tensor  # (batch, kv heads, max_len)
    next_pos: torch.Tensor  # (batch,)
    column: torch.Tensor  # (1,)
    length: int = 0
    cross_attention_state: object | None = None  # Method B: the images' keys and values, set by the prefill

    @classmethod
    def empty(cls, config: LLMConfig, batch: int, max_len: int, dtype: torch.dtype, device,
              storage: torch.dtype | None = None) -> KVCache:
        """Keys and values in ``storage`` (default: ``dtype``); attention runs in the key bias's dtype: the
        storage dtype, or for a one-byte float8 storage (no -inf, no matmuls) ``dtype``, read back into it."""
        if max_len > config.max_position_embeddings:
            raise ValueError(f"{max_len} positions exceed the model's max_position_embeddings "
                             f"({config.max_position_embeddings})")
        device = torch.device(device)
        # Where bf16 is emulated (AVX2-only CPUs) its batched matmuls are 2-4x slower than fp32 ones, so the
        # cache and the attention stay in fp32 there; the weights (the bulk of the bytes read) stay bf16.
        if dtype == torch.bfloat16 and not native_bf16(device):
            dtype = torch.float32
        storage = storage or dtype
        attend = dtype if storage.itemsize == 1 else storage
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_width)
        return cls(k=torch.zeros(shape, dtype=storage, device=device),
                   v=torch.zeros(shape, dtype=storage, device=device),
                   key_bias=torch.full((batch, config.num_kv_heads, max_len), float("-inf"), dtype=attend,
                                       device=device),
                   next_pos=torch.zeros(batch, dtype=torch.long, device=device),
                   column=torch.zeros(1, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (a speculative decoder's rejected drafts). The dropped columns
        must all have been real tokens written after the prompt, so each row's next position moves back by
        their count."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} columns to {length}")
        self.key_bias[:, :, length:] = float("-inf")
        self.next_pos -= self.length - length
        self.column.fill_(length)
        self.length = length

    def grown(self, needed: int) -> KVCache:
        """This cache with room for ``needed`` columns (doubling), for callers that did not size it up front."""
        if needed <= self.max_len:
            return self
        extra = max(needed, 2 * self.max_len) - self.max_len
        pad = lambda t, value: F.pad(t, (0, 0, 0, extra), value=value)
        return KVCache(pad(self.k, 0.0), pad(self.v, 0.0), F.pad(self.key_bias, (0, extra), value=float("-inf")),
                       self.next_pos, self.column, self.length, self.cross_attention_state)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.num_heads % cfg.num_kv_heads or (cfg.head_dim is None and cfg.hidden_size % cfg.num_heads):
            raise ValueError(f"hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} / num_kv_heads "
                             f"{cfg.num_kv_heads} do not divide")
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_width
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3 normalises each head of q and k before the rotation, OLMoE the whole q and k projections
        self.qk_norm_all = cfg.qk_norm_scope == "all"
        q_width, k_width = (self.n_heads * self.head_dim, self.n_kv * self.head_dim) if self.qk_norm_all else (
            self.head_dim, self.head_dim)
        self.q_norm = RMSNorm(q_width, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """``mask``: boolean (batch, 1, n, keys) or None for plain causal; for a decode step (one position,
        a cache) the additive key bias (batch * kv heads, 1, max_len)."""
        b, n, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        qk, v = project(self.qkv_proj, x).view(b, n, h + 2 * kv, d).split([h + kv, kv], dim=2)
        if self.q_norm is not None and self.qk_norm_all:
            q, k = self.q_norm(qk[:, :, :h].flatten(2)), self.k_norm(qk[:, :, h:].flatten(2))
            qk = torch.cat([q.view(b, n, h, d), k.view(b, n, kv, d)], dim=2)
        elif self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])], dim=2)
        qk = rotate(qk, *rope)
        q, k = qk[:, :, :h], qk[:, :, h:]
        if cache is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=mask is None, enable_gqa=kv != h)
            out = out.transpose(1, 2)
        elif mask is not None and mask.ndim == 3:  # a decode step's key bias (Decoder.extend may pass one query)
            keys, values = cache.k[layer], cache.v[layer]
            write_column(keys, cache.column, k.transpose(1, 2))
            write_column(values, cache.column, v.transpose(1, 2))
            if not (torch.compiler.is_compiling() or capturing(keys)):
                # Eager: read only the filled columns. A decode step is bound by reading the cache, and the
                # whole of it is twice the filled part on average over an image. A captured step keeps the
                # fixed shape (the unfilled columns are masked by the key bias).
                end = cache.length + 1
                keys, values, mask = keys[:, :, :end], values[:, :, :end], mask[..., :end]
            attend = mask.dtype  # the cache's attention dtype (its storage may be float8)
            out = _single_query_attention(q.to(attend), keys.to(attend), values.to(attend), mask)
        else:
            start, end = cache.length, cache.length + n
            cache.k[layer, :, :, start:end] = k.transpose(1, 2)
            cache.v[layer, :, :, start:end] = v.transpose(1, 2)
            attend = cache.key_bias.dtype
            keys, values = cache.k[layer, :, :, :end].to(attend), cache.v[layer, :, :, :end].to(attend)
            out = F.scaled_dot_product_attention(q.transpose(1, 2).to(attend), keys, values, attn_mask=mask,
                                                 is_causal=mask is None, enable_gqa=kv != h).transpose(1, 2)
        return project(self.o_proj, out.to(x.dtype).reshape(b, n, h * d))


def capturing(t: torch.Tensor) -> bool:
    """Inside a CUDA-graph capture, where every replay must see the same shapes (asked only of CUDA tensors:
    a CPU decode step pays no CUDA query)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def write_column(part: torch.Tensor, column: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` (batch, kv heads, 1, head_dim) into the cache ``part`` at ``column``; a one-byte (float8) cache
    through its bytes, as CPU's ``index_copy_`` has no float8 kernel."""
    new = new.to(part.dtype)
    if part.itemsize == 1:
        part, new = part.view(torch.uint8), new.view(torch.uint8)
    return part.index_copy_(2, column, new)


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one new position as two batched matmuls (on CPU, SDPA spends ~1 ms per call on a single
    query); the key bias is added by the first. Grouped heads share keys without copies.
    q (B, 1, H, D), k and v (B, kv heads, L, D), bias (B * kv heads, 1, L) -> (B, 1, H, D)."""
    b, _, h, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b * kv, h // kv, d)
    scores = torch.baddbmm(bias, q, k.flatten(0, 1).transpose(1, 2), alpha=d**-0.5)
    out = torch.bmm(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v.flatten(0, 1))
    return out.view(b, 1, h, d)


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.moe is not None and cfg.moe.is_moe_layer(index):
            self.mlp = MoEFeedForward(cfg.hidden_size, cfg.intermediate_size, cfg.moe)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class CrossAttentionInput:
    """Method B in the decoder loop: the blocks (``model.cross_attn_layers``) and this batch's image state."""

    blocks: nn.ModuleDict
    state: object  # unigen.models.cross_attention.CrossAttentionState


class Decoder(nn.Module):
    """Token embeddings, the block stack and the final norm (checkpoint prefix ``language_model.model``)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # recompute each block's activations in the backward pass
        self.kv_cache_dtype: torch.dtype | None = None  # the static cache's keys and values (None: the weights')

    @property
    def head_dim(self) -> int:
        return self.config.head_width

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache.empty(self.config, batch, max_len, p.dtype, p.device, storage=self.kv_cache_dtype)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                cross: CrossAttentionInput | None = None) -> torch.Tensor:
        """Embeddings (batch, n, width) -> final normed hidden states (batch, n, width).

        ``attention_mask`` (batch, n) marks real tokens (0 = left padding); it may also span the cached
        columns before them (batch, cached + n), as transformers' callers pass it. Positions follow the
        mask unless ``position_ids`` are given. With a ``cache`` the new keys and values are written at
        its next columns; one position is :meth:`decode_step`.
        """
        n = x.shape[1]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -n:]
        if cache is not None:
            if cache.length + n > cache.max_len:
                raise ValueError(f"KV cache of {cache.max_len} positions cannot take {n} more after {cache.length}")
            if cache.batch_size != x.shape[0]:
                raise ValueError(f"KV cache is for batch {cache.batch_size}, inputs have batch {x.shape[0]}")
            if n == 1:
                out = self.decode_step(x, cache, position_ids, cross)
                cache.length += 1
                return out
            position_ids, mask = self._prefill_positions_and_mask(cache, attention_mask, position_ids, n)
        else:
            if position_ids is None:
                position_ids = (positions_from_mask(attention_mask) if attention_mask is not None else
                                torch.arange(n, device=x.device).expand(x.shape[0], n))
            mask = _prompt_mask(attention_mask, n)
        return self._append(x, position_ids, mask, cache, cross)

    def decode_step(self, x: torch.Tensor, cache: KVCache, position_ids: torch.Tensor | None = None,
                    cross: CrossAttentionInput | None = None) -> torch.Tensor:
        """One new position per row, (batch, 1, width), written at the cache's next column; the caller advances
        ``cache.length``. Under ``torch.compile`` every shape is the same at every step (the whole cache is
        attended, unfilled columns masked); run eagerly, attention reads only the filled columns."""
        if position_ids is None:
            position_ids = cache.next_pos[:, None].clone()
        cache.next_pos.copy_(last_positions(position_ids) + 1)
        cache.key_bias.index_fill_(2, cache.column, 0.0)
        mask = cache.key_bias.flatten(0, 1)[:, None]
        cross_mask, sees = cross.state.decode_visibility() if cross is not None else (None, None)
        out = self._blocks(x, position_ids, mask, cache, cross, cross_mask, sees)
        cache.column += 1
        return out

    def extend(self, x: torch.Tensor, cache: KVCache, position_ids: torch.Tensor, visible: torch.Tensor,
               cross: CrossAttentionInput | None = None) -> torch.Tensor:
        """Append ``n`` positions whose visibility is not causal in column order (a parallel image decoder
        writes tokens of several image rows per pass): ``visible`` (batch, n, cache.length + n) says which
        written columns and which of the new ones each new position attends to. Rotary positions are
        ``position_ids``; ``next_pos`` is left alone (the caller owns positions)."""
        n = x.shape[1]
        if cache.length + n > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions cannot take {n} more after {cache.length}")
        if visible.shape != (x.shape[0], n, cache.length + n):
            raise ValueError(f"visible must be {(x.shape[0], n, cache.length + n)}, got {tuple(visible.shape)}")
        cache.key_bias[:, :, cache.length : cache.length + n] = 0.0
        return self._append(x, position_ids, visible[:, None], cache, cross)

    def _append(self, x, position_ids, mask, cache: KVCache | None, cross) -> torch.Tensor:
        """The blocks over ``n`` new positions, written at the cache's next columns (if any)."""
        n = x.shape[1]
        start = 0 if cache is None else cache.length
        cross_mask, sees = cross.state.visibility(start, n) if cross is not None else (None, None)
        out = self._blocks(x, position_ids, mask, cache, cross, cross_mask, sees)
        if cache is not None:
            cache.length += n
            cache.column += n
        return out

    def _blocks(self, x, position_ids, mask, cache, cross, cross_mask, sees) -> torch.Tensor:
        rope = self.rotary(position_ids, x.dtype)
        blocks = cross.blocks if cross is not None else {}
        if sees is not None:
            sees = sees.to(x.dtype)
        for i, layer in enumerate(self.layers):
            if str(i) in blocks:
                x = blocks[str(i)](x, cross.state.keys[str(i)], cross.state.values[str(i)], cross_mask, sees)
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, rope, mask, use_reentrant=False, context_fn=checkpoint_contexts)
            else:
                x = layer(x, rope, mask, cache, i)
        last = str(len(self.layers))
        if last in blocks:
            x = blocks[last](x, cross.state.keys[last], cross.state.values[last], cross_mask, sees)
        return self.norm(x)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """The blocks' rotary tables: (batch, n) positions, or with ``llm.rope: mrope`` also (3, batch, n)
        (time, row, column; unigen.models.mrope)."""
        cfg = self.config
        if cfg.rope == "mrope":
            inv_freq = rotary_frequencies(self.head_dim, cfg.rope_theta, None, position_ids.device)
            return mrope_tables(position_ids, inv_freq, cfg.mrope_section, dtype)
        return rotary_tables(position_ids, self.head_dim, cfg.rope_theta, dtype, cfg.rope_scaling)

    def _prefill_positions_and_mask(self, cache: KVCache, attention_mask, position_ids, n: int):
        """Positions and attention mask of ``n`` new columns; marks them real or padding in the cache."""
        start, end = cache.length, cache.length + n
        valid = (attention_mask.bool() if attention_mask is not None else
                 torch.ones(cache.batch_size, n, dtype=torch.bool, device=cache.k.device))
        if position_ids is None:
            position_ids = cache.next_pos[:, None] + positions_from_mask(valid)
        cache.next_pos.copy_(last_positions(position_ids) + 1)
        cache.key_bias[:, :, start:end] = torch.zeros_like(valid, dtype=cache.key_bias.dtype).masked_fill(
            ~valid, float("-inf"))[:, None]
        if start == 0 and bool(valid.all()):  # no padding: SDPA's causal kernel skips the masked half
            return position_ids, None
        return position_ids, _causal_mask(cache.key_bias[:, 0, :end] == 0, n)


def _prompt_mask(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Causal mask over a left-padded sequence (None: no padding, SDPA's causal kernel)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return _causal_mask(attention_mask.bool(), n)


def _causal_mask(keys_valid: torch.Tensor, n: int) -> torch.Tensor:
    """(batch, 1, n, keys) boolean mask: the last ``n`` of the ``keys`` columns are the queries; each sees the
    real (``keys_valid``) keys up to its own column. A padded query row sees no real key: it sees itself (its
    output is never used) instead of a softmax over nothing (NaN)."""
    end = keys_valid.shape[1]
    start = end - n
    mask = torch.ones(n, end, dtype=torch.bool, device=keys_valid.device).tril(start)[None] & keys_valid[:, None]
    mask[:, torch.arange(n), torch.arange(start, end)] = True
    return mask[:, None]


class CausalLM(nn.Module):
    """The decoder and its text head (checkpoint prefix ``language_model``; Janus keeps the head untied)."""

    def __init__(self, cfg: LLMConfig, init_std: float = 0.02):
        super().__init__()
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for module in self.modules():  # transformers' Llama initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
            elif isinstance(module, Experts):
                for p in module.parameters():
                    nn.init.normal_(p, std=init_std)

    @property
    def config(self) -> LLMConfig:
        return self.model.config
