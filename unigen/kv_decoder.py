"""A lean incremental decoder over the weights of transformers' ``LlamaModel``.

transformers' ``generate`` spends much of each step outside the matmuls (cache objects, mask
building, logits processors). This runs the same blocks, in the same arithmetic (except bf16 attention
on CPUs that emulate bf16, which runs in fp32), with a pre-allocated KV cache: ``prefill`` fills
positions ``[0, L)``, each ``step`` writes one position and attends to the filled prefix only. No
host-device sync happens inside a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unigen.model import positions_from_mask
from unigen.precision import native_bf16


def fused_weight(owner: nn.Module, name: str, linears: list[nn.Linear]) -> torch.Tensor:
    """One weight for linears that read the same input (q|k|v, gate|up): one matmul instead of two or three.
    The modules' own weights become views into it, so nothing is stored twice and training or
    ``load_state_dict`` still work."""
    if any(m.bias is not None for m in linears):
        raise NotImplementedError("fused decode weights assume bias-free projections (Llama)")
    fused = getattr(owner, name, None)
    first = linears[0].weight
    if fused is not None and fused.untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        return fused
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = fused[start : start + n]
        start += n
    setattr(owner, name, fused)
    return fused


SKINNY_ROWS = 64  # up to this many rows, decode_linear's weight-on-the-left product is the faster one


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for the few rows of a decode step (2 per image with CFG, 1 per caption).

    On CPU in float32, MKL computes ``weight @ x.T`` much faster than ``x @ weight.T`` when x has few
    rows (2-core AVX2 EPYC, 32 rows: 9.9 vs 18.0 ms for a 16384 x 512 head, 1.05 vs 1.87 ms for a
    2752 x 512 gate|up); from a few hundred rows on (a prefill) the usual form is as fast or faster.
    An odd row count gets its last row repeated: with the weights streamed from memory (a model larger
    than the L3 cache), MKL's even-column kernels read them much faster. One row is the matrix-vector
    kernel, 12.5-14.5 ms for the 8 blocks of the width-512 benchmark model and 10-11 ms for a 32000 x 512
    head, vs 8.3-9.3 and 5.7-6.1 ms with the row doubled; 15 rows 27 ms vs 18 ms for 16. In bfloat16 and
    on GPUs ``F.linear`` is as fast or faster at every size measured.
    """
    if not x.is_cpu or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows % 2:
        flat = torch.cat([flat, flat[-1:]])
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
    return out[:, :rows].t().contiguous().view(*x.shape[:-1], weight.shape[0])


class StaticKVDecoder:
    def __init__(self, model, batch: int, max_len: int):
        decoder = model.decoder
        attns = [block.self_attn for block in decoder.layers]
        mlps = [block.mlp for block in decoder.layers]
        self.qkv = [fused_weight(a, "fused_qkv", [a.q_proj, a.k_proj, a.v_proj]) for a in attns]
        self.gate_up = [fused_weight(m, "fused_gate_up", [m.gate_proj, m.up_proj]) for m in mlps]
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
        # the padding mask as an additive bias (0 or -inf) per kv head: one batched matmul adds it for free
        self.key_bias = torch.zeros(batch, self.n_kv, max_len, dtype=self.attn_dtype, device=p.device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=p.device)
        self.length = 0  # filled cache positions (a Python int: slicing by it needs no sync)
        self.max_len = max_len
        # cos and (sign-folded, see _signed_sin) sin of every position, looked up per step (the rotary
        # module's own forward is ~15 ops); the same numbers, each entry is one product and one cos/sin.
        # Dynamic RoPE types rescale with the sequence length, so those keep calling the module.
        rope_type = getattr(self.rotary, "rope_type", "default")
        self.rope_table = None
        if "dynamic" not in rope_type and rope_type != "longrope":
            every = torch.arange(max_len, device=p.device)[None]
            cos, sin = self.rotary(torch.empty(0, dtype=p.dtype, device=p.device), every)
            self.rope_table = (cos[0], _signed_sin(sin[0]))

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (left padded); return the final normed hidden state of every position."""
        b, n, _ = embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        valid = attention_mask.bool()
        self.key_bias[:, :, :n] = torch.zeros_like(self.key_bias[:, :, :n]).masked_fill(~valid[:, None], float("-inf"))
        positions = positions_from_mask(attention_mask)
        self.next_pos = attention_mask.long().sum(1)
        if bool(attention_mask.all()):  # no padding: SDPA's causal kernel skips the masked half (one sync, once)
            return self._forward(embeds, positions, None, start=0)
        causal = torch.ones(n, n, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None] & valid[:, None]
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
        bias = self.key_bias[:, :, : t + 1].flatten(0, 1)[:, None]  # (B * kv heads, 1, t + 1), a view
        return self._forward(embeds, positions, bias, start=t)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """``mask``: a boolean (B, 1, n, end) mask for a padded prompt (None: causal, no padding), the
        additive key bias for a single step.

        A decode step is ~100 small ops per block, and on a CPU their dispatch costs as much as the
        matmuls of a small model (9 ms of a 27 ms caption step at width 512, 8 blocks), so this spends few:
        fused norms, one rotary over q and k together, a batched matmul that adds the mask."""
        b, n, _ = x.shape
        end = start + n
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        if self.rope_table is None:
            cos, sin = self.rotary(x, positions)
            sin = _signed_sin(sin)
        else:
            cos, sin = self.rope_table[0][positions], self.rope_table[1][positions]
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over the q and k heads
        for i, layer in enumerate(self.layers):
            qkv = decode_linear(_rms_norm(layer.input_layernorm, x), self.qkv[i])
            qk, v = qkv.view(b, n, h + 2 * kv, d).split([h + kv, kv], dim=2)
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            self.k[i][:, :, start:end] = qk[:, :, h:].transpose(1, 2)
            self.v[i][:, :, start:end] = v.transpose(1, 2)
            keys, values = self.k[i][:, :, :end], self.v[i][:, :, :end]
            if n == 1:
                out = _single_query_attention(qk[:, :, :h].to(self.attn_dtype), keys, values, mask)
            else:
                q = qk[:, :, :h].transpose(1, 2).to(self.attn_dtype)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                                     enable_gqa=kv != h)
                out = out.transpose(1, 2)
            out = out.to(x.dtype).reshape(b, n, h * d)
            attn = layer.self_attn
            x = x + decode_linear(out, attn.o_proj.weight, attn.o_proj.bias)
            gate, up = decode_linear(_rms_norm(layer.post_attention_layernorm, x), self.gate_up[i]).chunk(2, dim=-1)
            mlp = layer.mlp
            x = x + decode_linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        self.length = end
        return _rms_norm(self.norm, x)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``rotate_half(t) * sin == roll(t, d/2) * _signed_sin(sin)`` exactly: the first half of sin negated
    (only signs move), so the rotary needs no negation or concatenation of q and k."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` in one fused op (bit-identical: normalise in fp32, cast, scale)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, eps=norm.variance_epsilon).to(x.dtype)


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one new position: two batched matmuls. On CPU, SDPA's flash kernel spends ~1 ms per
    call on a single query; this takes a fraction of that. Grouped heads share keys without copies.
    q (B, 1, H, D), k and v (B, kv heads, L, D), bias (B * kv heads, 1, L) -> (B, 1, H, D)."""
    b, _, h, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b * kv, h // kv, d)
    scores = torch.baddbmm(bias, q, k.flatten(0, 1).transpose(1, 2), alpha=d**-0.5)
    out = torch.bmm(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v.flatten(0, 1))  # (B * kv, group, D)
    return out.view(b, 1, h, d)
