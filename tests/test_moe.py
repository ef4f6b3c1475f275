"""The mixture-of-experts feed-forward (``llm.moe``, unigen.models.moe): dropless routing checked token by token,
the balance and z losses against hand computations and transformers', upcycling, every decoder path, bad configs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from unigen.config import MoEConfig, UniGenConfig
from unigen.errors import ConfigError
from unigen.generation.sampling import generate_image_tokens
from unigen.generation.sampling_options import SamplingOptions
from unigen.models.model import UniGenModel
from unigen.models.moe import MoEFeedForward, moe_metrics, router_losses, upcycle, upcycle_start
from unigen.testing import TINY_TOKENS

MOE = {"num_experts": 4, "top_k": 2, "expert_size": 32, "num_shared_experts": 1, "shared_expert_gate": True}


def moe_model(moe: dict | None = MOE, seed: int = 0, **config) -> UniGenModel:
    values = UniGenConfig.from_name("smoke").to_dict()
    values["llm"]["moe"] = moe
    values["tokens"] = dataclasses.asdict(TINY_TOKENS)
    values.update(config)
    torch.manual_seed(seed)
    return UniGenModel(UniGenConfig.from_dict(values)).eval()


def random_router(model, std: float = 1.0) -> None:
    """Routers drawn wider than the init, so that tokens spread over the experts (no near ties)."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MoEFeedForward):
                layer.gate.weight.normal_(std=std)


def by_hand(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Each token alone: its top-k experts (as transformers routes) weighted, plus the gated shared expert."""
    cfg, out = layer.cfg, []
    for token in x:
        logits = token @ layer.gate.weight.T
        if cfg.router == "topk_softmax":
            top, chosen = logits.topk(cfg.top_k)
            weights = top.softmax(-1)
        else:
            weights, chosen = logits.softmax(-1).topk(cfg.top_k)
            weights = weights / weights.sum() if cfg.normalize_top_k else weights
        y = torch.zeros_like(token)
        for w, e in zip(weights, chosen.tolist(), strict=True):
            gate, up = (layer.experts.gate_up_proj[e] @ token).chunk(2)
            y = y + w * (layer.experts.down_proj[e] @ (F.silu(gate) * up))
        if layer.shared_expert is not None:
            gate, up = (layer.shared_expert.gate_up_proj.weight @ token).chunk(2)
            shared = layer.shared_expert.down_proj.weight @ (F.silu(gate) * up)
            y = y + torch.sigmoid(layer.shared_expert_gate.weight @ token) * shared
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("router, normalize", [("softmax_topk", True), ("softmax_topk", False),
                                               ("topk_softmax", False)])
@torch.no_grad()
def test_every_token_gets_the_weighted_sum_of_its_top_k_experts(router, normalize, monkeypatch):
    """Dropless: 300 tokens over 8 experts (uneven loads, none dropped) equal a loop over tokens; so does the
    gathered form a captured decode step uses."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=3, expert_size=24, num_shared_experts=2, shared_expert_gate=True,
                    router=router, normalize_top_k=normalize)
    layer = MoEFeedForward(32, 64, cfg).eval()
    layer.gate.weight.data.normal_()
    x = torch.randn(3, 100, 32)
    expected = by_hand(layer, x.flatten(0, 1)).view_as(x)
    assert (layer(x) - expected).abs().max() < 1e-5
    counts = torch.bincount(layer.route(x.flatten(0, 1))[2].flatten(), minlength=8)
    assert counts.sum() == 300 * 3 and counts.max() > counts.min()  # uneven loads, every pair computed
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert (layer(x[:, :1]) - expected[:, :1]).abs().max() < 1e-5


def test_balance_and_z_losses_equal_hand_computations_and_transformers():
    """One layer, two left-padded rows: per row, E * sum_i f_i P_i over its real tokens (f_i: the share of its
    tokens that chose expert i, summing to top_k) is transformers' load_balancing_loss_func of that row alone; the
    z-loss is the mean squared logsumexp; both weighted by each row's supervised tokens."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_size=16, aux_loss_weight=0.1, z_loss_weight=0.01)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([MoEFeedForward(16, 32, cfg).train()])
    layer = model.layers[0]
    layer.gate.weight.data.normal_()
    x = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    layer(x)
    row_weights = torch.tensor([3.0, 5.0])
    total = router_losses(model, mask, row_weights)
    expected = 0
    for r in range(2):
        real = x[r][mask[r].bool()]
        logits = real.detach() @ layer.gate.weight.detach().T
        probs = logits.softmax(-1)
        chosen = probs.topk(2).indices
        f = torch.stack([(chosen == e).any(-1).float().mean() for e in range(4)])
        balance = 4 * (f * probs.mean(0)).sum()
        assert torch.allclose(balance, load_balancing_loss_func((logits,), 4, 2), atol=1e-6)
        z = (torch.logsumexp(logits, -1) ** 2).mean()
        expected = expected + row_weights[r] * (0.1 * balance + 0.01 * z)
    assert torch.allclose(total, expected, atol=1e-5)
    total.backward()  # the router learns from both
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.records == []  # drained
    metrics = moe_metrics(model)
    assert sum(v for k, v in metrics.items() if k.startswith("moe_load_l0_e")) == pytest.approx(1.0)
    assert metrics["moe_aux"] == metrics["moe_aux_l0"] and metrics["moe_entropy_l0"] > 0


@torch.no_grad()
def test_the_upcycled_model_computes_what_the_dense_one_did():
    """Every expert a copy of the dense feed-forward, shared expert's output zero: the logits of a
    left-padded batch equal the dense model's (to float rounding: k equal terms of weight 1/k)."""
    dense = moe_model(None)
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    before = dense(ids, attention_mask=mask).logits
    moe = copy.deepcopy(dense)
    upcycle(moe, MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True,
                           upcycle_from_dense=True))
    assert sum(isinstance(m, MoEFeedForward) for m in moe.modules()) == 2
    assert moe.config.llm.moe.upcycle_from_dense is False and moe.config.llm.moe.expert_size is None
    after = moe(ids, attention_mask=mask).logits
    assert (after - before)[mask.bool()].abs().max() < 1e-5
    with pytest.raises(ConfigError, match=r"expert_size must be the dense width 128 \(or unset\), got 32"):
        upcycle(copy.deepcopy(dense), MoEConfig(expert_size=32))
    with pytest.raises(ConfigError, match="set init_from"):
        upcycle_start(dense, {"llm": {"moe": {"upcycle_from_dense": True}}}, None)


def test_a_saved_moe_model_loads_bit_for_bit_and_a_dense_config_is_unchanged(tmp_path):
    model = moe_model(dict(MOE, every_n=2, router="topk_softmax"))
    model.save_pretrained(tmp_path / "moe")
    loaded = UniGenModel.from_pretrained(tmp_path / "moe")
    assert loaded.config.llm.moe == model.config.llm.moe
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [type(layer.mlp).__name__ for layer in loaded.decoder.layers] == ["MLP", "MoEFeedForward"]
    moe_model(None).save_pretrained(tmp_path / "dense")
    text = (tmp_path / "dense" / "config.json").read_text()
    assert '"moe"' not in text and "qk_norm_scope" not in text


@torch.no_grad()
def test_prefill_cached_steps_and_the_captured_form_give_the_full_forward(monkeypatch):
    model = moe_model()
    random_router(model)
    ids = torch.randint(0, 200, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = model(ids, attention_mask=mask).logits
    for captured in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda captured=captured: captured)
        cache = model.decoder.new_cache(2, 10)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache).logits[:, -1:]]
        steps += [model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(6, 10)]
        assert (torch.cat(steps, 1) - full[:, 5:]).abs().max() < 1e-4


@pytest.mark.parametrize("fusion", [{}, {"fusion": "cross_attention", "cross_attention_every": 1}])
@torch.no_grad()
def test_jacobi_and_zipar_decode_an_moe_model_as_sequential_decoding(fusion):
    """Method A and Method B: greedy Jacobi and full-row ZipAR give the sequential tokens (CFG, two images)."""
    model = moe_model(**fusion)
    random_router(model)
    t = model.config.tokens
    ids = torch.tensor([[t.pad, t.bos, 20, 21, t.image_start], [t.bos, 30, 31, 32, t.image_start]])
    mask = (ids != t.pad).long()

    def sample(**kw):
        options = SamplingOptions(guidance_scale=3.0, temperature=0, **kw)
        return generate_image_tokens(model, ids, mask, num_images=2, options=options).codes

    sequential = sample()
    assert torch.equal(sample(decoding="jacobi", decoding_options={"window": 4}), sequential)
    assert torch.equal(sample(decoding="zipar", decoding_options={"window": model.config.vq.grid}), sequential)


def test_training_forward_with_gradient_checkpointing_records_each_routing_once():
    model = moe_model().train()
    ids = torch.randint(0, 200, (2, 9))
    model.decoder.gradient_checkpointing = True
    out = model(ids).logits.sum()
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert [len(layer.records) for layer in layers] == [1, 1]
    aux = router_losses(model, None, torch.ones(2))
    (out + aux).backward()
    assert [len(layer.records) for layer in layers] == [0, 0]  # the recomputation recorded nothing
    assert all(layer.experts.gate_up_proj.grad is not None for layer in layers)


@pytest.mark.parametrize("moe, message", [
    (dict(num_experts=2, top_k=3), r"llm.moe.top_k \(3\) must not exceed llm.moe.num_experts \(2\)"),
    (dict(num_experts=0), r"llm.moe.num_experts must be a whole number >= 1, got 0"),
    (dict(shared_expert_gate=True), r"llm.moe.shared_expert_gate needs shared experts"),
    (dict(router="top1"), r"llm.moe.router must be one of \['softmax_topk', 'topk_softmax'\], got 'top1'"),
    (dict(aux_loss_weight=-1), r"llm.moe.aux_loss_weight must be a number >= 0, got -1"),
    (dict(expert_count=4), r"unknown key\(s\) in llm.moe: \['expert_count'\]"),
])
def test_bad_moe_configs_are_named(moe, message):
    values = UniGenConfig.from_name("smoke").to_dict()
    values["llm"]["moe"] = moe
    with pytest.raises(ConfigError, match=message):
        UniGenConfig.from_dict(values)
