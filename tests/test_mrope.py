"""M-RoPE (``llm.rope: mrope``) against transformers' Qwen2-VL on tiny random weights, fp32.

Position ids equal ``Qwen2VLModel.get_rope_index`` for left-padded rows of text and images of different sizes;
the decoder's logits equal ``Qwen2VLTextModel`` + a head on the same weights (<= 1e-4); a cached decode
equals the uncached recompute; a config without ``rope`` keeps the plain rotary embedding and its config.json.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLModel

from unigen.config import LLMConfig, UniGenConfig
from unigen.errors import ArgumentError, ConfigError
from unigen.models.decoder import CausalLM
from unigen.models.llm_from import unigen_state
from unigen.models.mrope import last_positions, mrope_positions

IMAGE = 7  # the image placeholder id of these tests (transformers' image_token_id)
MERGE = 2
SECTION = [2, 3, 3]  # head width 16: 8 frequency pairs


def tiny_qwen2vl():
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTION}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=MERGE),
        image_token_id=IMAGE, video_token_id=8, vision_start_token_id=5, vision_end_token_id=6)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    model = Qwen2VLModel(config).eval()
    for p in model.language_model.parameters():  # well away from init's small values: differences show
        torch.nn.init.normal_(p, std=0.3)
    return model


def ours_from(hf, head: torch.Tensor) -> CausalLM:
    llm = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1,
                    rms_norm_eps=1e-6, qkv_bias=True, rope="mrope", mrope_section=SECTION)
    ours = CausalLM(llm).eval()
    hf_state = {f"model.{k}": v for k, v in hf.language_model.state_dict().items()}
    hf_state["lm_head.weight"] = head
    state = unigen_state(hf_state, llm)
    ours.load_state_dict({k.removeprefix("language_model."): v for k, v in state.items()})
    return ours


def batch_with_images():
    """Two left-padded rows: text, a 2x3-token image, text, a 1x2-token image, text; and text, a 3x1 image, text."""
    rows = [[1, 5] + [IMAGE] * 6 + [6, 9, 10, 5] + [IMAGE] * 2 + [6, 11, 12],
            [1, 13, 5] + [IMAGE] * 3 + [6, 14]]
    token_grids = [(2, 3), (1, 2), (3, 1)]
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, token_grids


def test_positions_equal_transformers_get_rope_index():
    hf = tiny_qwen2vl()
    ids, mask, grids = batch_with_images()
    patch_grids = torch.tensor([[1, h * MERGE, w * MERGE] for h, w in grids])
    expected, _ = hf.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE).int(), image_grid_thw=patch_grids,
                                    attention_mask=mask)
    assert torch.equal(mrope_positions(ids, IMAGE, grids, mask), expected)
    # text only: all three ids are the plain positions
    text = torch.tensor([[3, 4, 9, 10]])
    assert torch.equal(mrope_positions(text, IMAGE, []), torch.arange(4).expand(3, 1, 4))


def test_logits_equal_transformers_qwen2vl_text_model():
    hf = tiny_qwen2vl()
    head = torch.randn(64, 32) * 0.3
    ours = ours_from(hf, head)
    ids, mask, grids = batch_with_images()
    positions = mrope_positions(ids, IMAGE, grids, mask)
    embeds = torch.randn(*ids.shape, 32)
    with torch.no_grad():
        expected = hf.language_model(inputs_embeds=embeds, attention_mask=mask,
                                     position_ids=positions).last_hidden_state @ head.T
        got = ours.lm_head(ours.model(embeds, mask, positions))
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    # the image positions matter: plain positions give other logits
    with torch.no_grad():
        plain = ours.lm_head(ours.model(embeds, mask))
    assert (plain[real] - expected[real]).abs().max() > 1e-2


def test_cached_decode_equals_the_uncached_recompute():
    torch.manual_seed(1)
    llm = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1,
                    rope="mrope", mrope_section=SECTION)
    model = CausalLM(llm).eval()
    ids, mask, grids = batch_with_images()
    new = torch.tensor([[20, 21, 22], [23, 24, 25]])
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    embed = model.model.embed_tokens
    with torch.no_grad():
        whole = model.model(embed(full_ids), full_mask, mrope_positions(full_ids, IMAGE, grids, full_mask))
        cache = model.model.new_cache(2, full_ids.shape[1])
        steps = [model.model(embed(ids), mask, mrope_positions(ids, IMAGE, grids, mask), cache=cache)[:, -1:]]
        for i in range(new.shape[1]):
            steps.append(model.model(embed(new[:, i : i + 1]), cache=cache))
    n = ids.shape[1]
    assert (torch.cat(steps, 1) - whole[:, n - 1 :]).abs().max() <= 1e-5


def test_an_image_that_ends_the_prompt_continues_after_its_widest_side():
    ids = torch.tensor([[1, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE]])
    pos = mrope_positions(ids, IMAGE, [(2, 3)])
    assert pos[:, 0, 1:].tolist() == [[1] * 6, [1, 1, 1, 2, 2, 2], [1, 2, 3, 1, 2, 3]]
    assert last_positions(pos).tolist() == [3]  # the next token sits at 1 + max(2, 3) = 4


def test_mismatched_grids_and_bad_sections_are_named():
    ids = torch.tensor([[1, IMAGE, IMAGE, 2]])
    with pytest.raises(ArgumentError, match="more image placeholders than there are image grids"):
        mrope_positions(ids, IMAGE, [])
    with pytest.raises(ArgumentError, match="needs 4 consecutive placeholders"):
        mrope_positions(ids, IMAGE, [(2, 2)])
    with pytest.raises(ArgumentError, match="2 image grids given for fewer images"):
        mrope_positions(ids, IMAGE, [(1, 2), (1, 1)])
    with pytest.raises(ConfigError, match=r"llm.mrope_section \[2, 3, 4\] must sum to half the head width \(8\)"):
        LLMConfig(hidden_size=32, num_heads=2, num_kv_heads=2, rope="mrope", mrope_section=[2, 3, 4])
    with pytest.raises(ConfigError, match="llm.mrope_section needs llm.rope: mrope"):
        LLMConfig(mrope_section=[16, 24, 24])


def test_default_rope_keeps_config_json_and_mrope_round_trips():
    plain = UniGenConfig.from_name("smoke")
    assert "rope" not in plain.to_dict()["llm"] and "mrope_section" not in plain.to_dict()["llm"]
    d = plain.to_dict()
    d["llm"].update(rope="mrope", mrope_section=[plain.llm.head_width // 2, 0, 0])
    again = UniGenConfig.from_dict(d)
    assert again.llm.rope == "mrope" and again.to_dict() == d
