"""``llm_from`` with the mixture-of-experts families (Qwen2-MoE, OLMoE, Mixtral): tiny random models built with
transformers load as unigen's decoder with ``llm.moe``; logits on left-padded text and through the KV cache equal
transformers', and 32 greedy tokens are the same (test_llm_from's three parity tests on these families)."""

from __future__ import annotations

import pytest
import torch

# the dense families' parity tests, run here on this module's ``family`` fixture (the MoE families)
from test_llm_from import (  # noqa: F401
    SMALL,
    test_cached_decoding_matches_transformers,
    test_greedy_generation_is_transformers,
    test_logits_match_transformers_with_left_padding,
    tiny_tokenizer,
    unified,
    unified_config,
)

from unigen.errors import ConfigError
from unigen.models.llm_from import load_llm_from
from unigen.processor import UniGenProcessor

transformers = pytest.importorskip("transformers")

FAMILIES = {
    # a shared expert behind its sigmoid gate, q/k/v biases, layer 1 dense (mlp_only_layers), ChatML
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                              norm_topk_prob=False), "chatml"),
    # q and k RMSNorm over the whole projections, renormalised top-k weights
    "olmoe": ("OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True), None),
    # top-2 of 4 experts always renormalised; a sliding window
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=128), "llama3"),
}


def save_family(family: str, directory):
    arch, extra, template = FAMILIES[family]
    tokenizer = tiny_tokenizer(template)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(vocab_size=len(tokenizer), **SMALL, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random norms, biases and routers (wide, so tokens spread over the experts)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.normal_(std=0.1 if name.endswith("bias") else 1.0)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = save_family(request.param, directory)
    llm = load_llm_from(str(directory))
    return request.param, hf, unified(llm), UniGenProcessor(llm.tokenizer, unified_config(llm))


def test_the_moe_families_load_with_their_routing(family):
    name, hf, model, processor = family
    moe = model.config.llm.moe
    assert (moe.num_experts, moe.top_k, moe.shared_expert_gate) == (4, 2, name == "qwen2_moe")
    assert moe.normalize_top_k == (name != "qwen2_moe") and moe.dense_layers == ([1] if name == "qwen2_moe" else [])


def test_unsupported_moe_settings_are_named(tmp_path):
    """A Qwen2-MoE config without its (always gated) shared expert, and OLMoE's q/k/v clamping."""
    tokenizer = tiny_tokenizer("chatml")
    for arch, extra, message in (
        ("Qwen2Moe", dict(num_experts=4, shared_expert_intermediate_size=0),
         "a Qwen2-MoE layer always has a gated shared expert, but shared_expert_intermediate_size is 0"),
        ("Olmoe", dict(num_experts=4, clip_qkv=8.0), r"clip_qkv \(clamping q, k and v\) is not supported"),
    ):
        folder = tmp_path / arch
        getattr(transformers, f"{arch}Config")(vocab_size=len(tokenizer), **SMALL, **extra,
                                               architectures=[f"{arch}ForCausalLM"]).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with pytest.raises(ConfigError, match=message):
            load_llm_from(str(folder))
