"""The MoE decode step's few-token path (unigen.models.moe.Experts.pairs): each (token, expert) pair as
matrix-vector products, checked against a loop over tokens; more pairs than experts, or a gradient, sort instead."""

from __future__ import annotations

import pytest
import torch
from test_moe import by_hand

from unigen.config import MoEConfig
from unigen.models.moe import Experts, MoEFeedForward


def recording(method, used: list[str]):
    def call(self, *args):
        used.append(method.__name__)
        return method(self, *args)

    return call


@pytest.mark.parametrize("tokens, path", [(1, "pairs"), (2, "pairs"), (3, "sorted")])
def test_a_decode_steps_tokens_get_their_top_k_experts_without_a_sort(tokens, path, monkeypatch):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=3, expert_size=24, num_shared_experts=1, shared_expert_gate=True)
    layer = MoEFeedForward(32, 64, cfg).eval()
    layer.gate.weight.data.normal_()
    x = torch.randn(tokens, 1, 32)
    expected = by_hand(layer, x.flatten(0, 1)).view_as(x)
    used = []
    for name in ("pairs", "sorted"):
        monkeypatch.setattr(Experts, name, recording(getattr(Experts, name), used))
    with torch.no_grad():
        out = layer(x)
    assert used == [path]  # 3 tokens x top 3 = 9 pairs > 8 experts: sorted by expert
    assert (out - expected).abs().max() < 1e-5
    used.clear()
    layer(x).sum().backward()  # a gradient: the sorted path, whose products autograd records
    assert used == ["sorted"] and layer.experts.gate_up_proj.grad.abs().sum() > 0
