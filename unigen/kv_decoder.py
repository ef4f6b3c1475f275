"""A lean incremental decoder over the weights of transformers' ``LlamaModel``.

transformers' ``generate`` spends much of each step outside the matmuls (cache objects, mask
building, logits processors). This runs the same blocks, in the same arithmetic, with a
pre-allocated KV cache: ``prefill`` fills positions ``[0, L)``, each ``step`` writes one position
and attends to the filled prefix only. No host-device sync happens inside a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from unigen.model import positions_from_mask
from unigen.precision import native_bf16


def fused_weight(owner: nn.Module, name: str, linears: list[nn.Linear]) -> torch.Tensor:
    """One weight for linears that read the same input (q|k|v, gate|up); the modules' own weights
    become views into it, so nothing is stored twice and training or ``load_state_dict`` still work.

    The buffer's layout follows :func:`decode_layout`. Checkpoint writers must ``.contiguous()`` (ours do).
    """
    if any(m.bias is not None for m in linears):
        raise NotImplementedError("fused decode weights assume bias-free projections (Llama)")
    fused = getattr(owner, name, None)
    first = linears[0].weight
    if fused is not None and fused.untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        return fused
    fused = decode_layout(torch.cat([m.weight.detach() for m in linears]))
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[start : start + n]
        start += n
    setattr(owner, name, fused)
    return fused


def decode_layout(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out, in) in the layout a decode step multiplies fastest.

    A decode step multiplies a few rows by every weight, so it is bound by streaming weights from memory.
    On CPU in float32 the GEMM streams a column-major weight faster (measured on 2 cores: one 8-layer
    512-wide decoder's weights, 2 rows: 10.2 ms row-major, 8.3 column-major, 7.1 fused column-major). In
    bfloat16 it is the other way round, by far: a 16384 x 512 head times 2 rows takes 2.4 ms row-major and
    98 ms column-major (2-core AVX2 EPYC). Elsewhere (GPU) row-major, the layout everything else expects.
    """
    column = w.device.type == "cpu" and w.dtype == torch.float32
    if column:
        return w if w.stride() == (1, w.shape[0]) else w.t().contiguous().t()
    return w.contiguous()


def set_decode_layout(*linears: nn.Linear) -> None:
    """:func:`decode_layout` for single weights read in decode steps (see :func:`fused_weight`)."""
    for m in linears:
        if min(m.weight.shape) > 1:
            m.weight.data = decode_layout(m.weight.data)


class StaticKVDecoder:
    def __init__(self, model, batch: int, max_len: int):
        decoder = model.decoder
        attns = [block.self_attn for block in decoder.layers]
        mlps = [block.mlp for block in decoder.layers]
        self.qkv = [fused_weight(a, "fused_qkv", [a.q_proj, a.k_proj, a.v_proj]) for a in attns]
        self.gate_up = [fused_weight(m, "fused_gate_up", [m.gate_proj, m.up_proj]) for m in mlps]
        set_decode_layout(*[a.o_proj for a in attns], *[m.down_proj for m in mlps], model.gen_head.output_mlp_projector,
                     model.gen_head.vision_head, model.language_model.lm_head)
        cfg = decoder.config
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"{max_len} positions exceed the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = model.gen_embed.weight
        # Where bf16 is emulated (AVX2-only CPUs) its batched matmuls are 2-4x slower than fp32 ones (one
        # query against 576 keys, 32 rows x 8 heads: 5.5 vs 3.5 ms for q.k, 11.9 vs 5.1 ms for p.v), so the
        # cache and the attention stay in fp32 there; the weights (the bulk of the bytes read) stay bf16.
        self.attn_dtype = torch.float32 if p.dtype == torch.bfloat16 and not native_bf16(p.device) else p.dtype
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.attn_dtype, device=p.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.attn_dtype, device=p.device) for _ in self.layers]
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=p.device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=p.device)
        self.length = 0  # filled cache positions (a Python int: slicing by it needs no sync)
        self.max_len = max_len

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (left padded); return the final normed hidden state of every position."""
        b, n, _ = embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        self.key_valid[:, :n] = attention_mask.bool()
        positions = positions_from_mask(attention_mask)
        self.next_pos = attention_mask.long().sum(1)
        causal = torch.ones(n, n, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None] & self.key_valid[:, None, :n]
        # a fully padded query row would softmax over nothing: let it see itself (its output is unused)
        mask |= torch.eye(n, dtype=torch.bool, device=embeds.device)[None]
        return self._forward(embeds, positions, mask[:, None], start=0)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """One new position per row: (B, 1, D) -> final normed hidden state (B, 1, D)."""
        t = self.length
        if t >= self.max_len:
            raise RuntimeError(f"KV cache of {self.max_len} positions is full")
        positions = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        mask = self.key_valid[:, None, None, : t + 1]
        return self._forward(embeds, positions, mask, start=t)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        b, n, _ = x.shape
        end = start + n
        cos, sin = self.rotary(x, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = F.linear(layer.input_layernorm(x), self.qkv[i])
            q, k, v = qkv.split([self.n_heads * self.head_dim, *[self.n_kv * self.head_dim] * 2], dim=-1)
            q = q.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q = q.to(self.attn_dtype)
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            keys, values = self.k[i][:, :, :end], self.v[i][:, :, :end]
            if n == 1:
                out = _single_query_attention(q, keys, values, mask)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                     enable_gqa=self.n_kv != self.n_heads)
            x = x + attn.o_proj(out.to(x.dtype).transpose(1, 2).reshape(b, n, -1))
            gate, up = F.linear(layer.post_attention_layernorm(x), self.gate_up[i]).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        self.length = end
        return self.norm(x)


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new position: two small matmuls. On CPU, SDPA's flash kernel spends ~1 ms per
    call on a single query; this takes a fraction of that. Grouped heads share keys without copies."""
    b, h, _, d = q.shape
    groups = h // k.shape[1]
    q = q.view(b, k.shape[1], groups, d)  # (B, kv heads, group, D)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5  # (B, kv heads, group, L)
    scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    out = scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v  # (B, kv heads, group, D)
    return out.view(b, h, 1, d)
