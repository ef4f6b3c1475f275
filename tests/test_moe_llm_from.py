"""``llm_from`` with the mixture-of-experts families (Qwen2-MoE, OLMoE, Mixtral): tiny random models built with
transformers load as unigen's decoder with ``llm.moe``; logits on left-padded text and through the KV cache equal
transformers', and 24 greedy tokens are the same."""

from __future__ import annotations

import pytest
import torch
from test_llm_from import SMALL, text_rows, tiny_tokenizer, unified, unified_config

from unigen.errors import ConfigError
from unigen.generation.sampling import generate_text
from unigen.models.decoder import positions_from_mask
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


@torch.no_grad()
def test_moe_logits_match_transformers_with_left_padding_and_through_the_cache(family):
    name, hf, model, processor = family
    moe = model.config.llm.moe
    assert (moe.num_experts, moe.top_k, moe.shared_expert_gate) == (4, 2, name == "qwen2_moe")
    ids, mask = text_rows(processor, ["a red circle at the top left of the image", "what is in this picture ?"])
    vocab = hf.config.vocab_size
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    ours = model(input_ids=ids, attention_mask=mask).logits[..., :vocab]
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-4

    cache = model.decoder.new_cache(2, ids.shape[1])
    start = ids.shape[1] - 4
    steps = [model(input_ids=ids[:, :start], attention_mask=mask[:, :start], past_key_values=cache).logits[:, -1:]]
    steps += [model(input_ids=ids[:, i : i + 1], past_key_values=cache).logits for i in range(start, ids.shape[1] - 1)]
    assert (torch.cat(steps, 1)[..., :vocab] - ref[:, start - 1 : -1]).abs().max() <= 1e-4


@torch.no_grad()
def test_moe_greedy_generation_is_transformers(family):
    name, hf, model, processor = family
    ids, mask = text_rows(processor, ["a red circle at the", "what is this"])
    hf.generation_config.eos_token_id = None
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                      pad_token_id=processor.tokens.pad)[:, ids.shape[1]:]
    assert ref.tolist() == generate_text(model, ids, mask, max_new_tokens=24, eos_token_id=-1)


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
