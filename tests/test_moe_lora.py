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


# slow: a LoRA stage through run_stage (~25 s); the test above keeps init, training and merging in the default run
@pytest.mark.slow
def test_a_lora_stage_on_the_experts_changes_only_the_adapted_weights(tmp_path):
    from train_common import recipe, weights

    from unigen.data.manifest import read_samples
    from unigen.shapes import write_dataset
    from unigen.training import run_stage
    from unigen.training.start import build_fresh

    data = write_dataset(tmp_path / "shapes", 16, seed=3)
    moe = "model.llm.moe={num_experts: 4, top_k: 2, expert_size: 32, num_shared_experts: 1, shared_expert_gate: true}"
    model, processor = build_fresh(recipe(data, tmp_path / "run0", moe), read_samples(data))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    r = recipe(data, tmp_path / "run", moe, "stage2.steps=2", "stage2.warmup_steps=0",
               "stage2.lora={r: 4, alpha: 8, targets: [experts, shared_expert.gate_up_proj]}")
    final = run_stage(r, 2, init_from=str(tmp_path / "base"), progress=False)
    before, after = weights(tmp_path / "base"), weights(final)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"language_model.model.layers.{i}.mlp.{w}" for i in range(2)
                       for w in ("experts.gate_up_proj", "experts.down_proj", "shared_expert.gate_up_proj.weight")}
