"""A lean incremental decoder over the weights of transformers' ``LlamaModel``.

transformers' ``generate`` spends much of each step outside the matmuls (cache objects, mask
building, logits processors). This runs the same blocks, in the same arithmetic, with a
pre-allocated KV cache: ``prefill`` fills positions ``[0, L)``, each ``step`` writes one position
and attends to the filled prefix only. No host-device sync happens inside a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from unigen.model import positions_from_mask


class StaticKVDecoder:
    def __init__(self, model, batch: int, max_len: int):
        decoder = model.decoder
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
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
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
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q, self.k[i][:, :, :end], self.v[i][:, :, :end], attn_mask=mask,
                enable_gqa=self.n_kv != self.n_heads,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.length = end
        return self.norm(x)
