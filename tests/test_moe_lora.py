"""LoRA on an MoE decoder's experts (unigen.training.lora, PEFT's target_parameters over unigen.models.moe.Experts):
the adapted model starts at the base, only adapters train, merging folds them exactly, bad targets are named."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_moe import moe_model, random_router

from unigen.errors import ConfigError
from unigen.training.lora import LoraSettings, attach, load_adapter, merge, save_adapter

EXPERTS = ["experts", "shared_expert.gate_up_proj", "shared_expert.down_proj"]


def adapted(targets=EXPERTS, **settings):
    model = base_model()
    return model, attach(model, LoraSettings(r=4, alpha=8, targets=targets, **settings), "stage2.lora")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_model():
    model = moe_model()
    random_router(model)
    return model


def test_expert_lora_starts_at_the_base_trains_only_adapters_and_merges_to_the_same_logits(tmp_path):
    ids = torch.randint(0, 200, (2, 9))
    base = logits(base_model(), ids)
    model, peft_model = adapted()
    assert isinstance(peft_model, PeftModel)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".experts." in n and "lora_A" in n for n in names)  # the routed experts (3-D weights)
    assert any(".shared_expert.gate_up_proj.lora_A" in n for n in names)
    assert all("lora_" in n for n in names)
    assert torch.equal(logits(peft_model, ids), base)  # B = 0: exactly the base model
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".experts." in n and "lora_B" in n for n in changed)
    assert all("lora_" in n for n in changed)  # the base, router included, stayed put
    unmerged = logits(peft_model, ids)
    assert (unmerged - base).abs().max() > 1e-3  # the experts' adapters moved the outputs
    step = logits(peft_model, ids[:1, :1])  # a one-token call: the decode step's per-pair products
    save_adapter(peft_model, tmp_path / "adapter", None)
    merged = merge(peft_model)
    assert (logits(merged, ids) - unmerged).abs().max() <= 1e-5
    assert (logits(merged, ids[:1, :1]) - step).abs().max() <= 1e-5
    assert type(merged.language_model.model.layers[0].mlp.experts).__name__ == "Experts"  # a plain model again
    # what `unigen merge BASE ADAPTER OUT` does: the saved adapter on a fresh base, folded in
    merged_again = merge(load_adapter(base_model(), tmp_path / "adapter"))
    assert (logits(merged_again, ids) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("targets, settings, message", [
    (["expertz"], {}, "stage2.lora.targets: unknown target 'expertz': neither a parameter group"),
    (["experts"], {"dropout": 0.1}, "stage2.lora.targets: 'experts' names MoE routed experts, whose LoRA has no "
                                    "dropout"),
])
def test_a_bad_expert_target_is_one_line(targets, settings, message):
    with pytest.raises(ConfigError) as err:
        adapted(targets, **settings)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert "MoE experts ('experts', 'experts.down_proj')" in str(err.value) or "dropout" in settings
