"""Sparse upcycling leaves the experts free to part: after a few training steps no two experts of a layer are
equal. With the router at zero every token's scores tie, the same k experts take every token with equal weights,
and those experts stay exact copies (docs/MOE.md, "Sparse upcycling")."""

import copy

import torch
from test_moe import moe_model

from unigen.config import MoEConfig
from unigen.models.moe import MoEFeedForward, upcycle


def test_upcycled_experts_part_after_training():
    dense = moe_model(None).train()
    moe = copy.deepcopy(dense)
    upcycle(moe, MoEConfig(num_experts=4, top_k=2, upcycle_from_dense=True, aux_loss_weight=0.0))
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.5)
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        logits = moe(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layers = [m for m in moe.modules() if isinstance(m, MoEFeedForward)]
    assert layers
    for layer in layers:
        experts = layer.experts.gate_up_proj.detach()
        for i in range(len(experts)):
            for j in range(i):
                assert not torch.equal(experts[i], experts[j]), (i, j)
