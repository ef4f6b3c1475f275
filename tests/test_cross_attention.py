"""Method B (cross-attention fusion) and the patch encoder, on tiny random models (float32, CPU)."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from unigen import UniGenModel
from unigen.config import LLMConfig, SigLIPConfig, UniGenConfig, VQConfig
from unigen.models.checkpoint import CheckpointError, official_state_dict
from unigen.models.cross_attention import CrossAttentionBlock, add_cross_attention, cross_attention_positions, sincos_2d
from unigen.models.decoder import linear
from unigen.models.param_groups import parameter_groups, set_trainable, stage_groups
from unigen.testing import TINY_TOKENS

IMG = TINY_TOKENS.image
BOS = TINY_TOKENS.bos


def tiny_config(**kw) -> UniGenConfig:
    """LLM width 64, 4 blocks, GQA (4 query heads, 2 kv heads); 16px images in 8px patches (4 tokens)."""
    cfg = UniGenConfig(
        vision=SigLIPConfig(image_size=16, patch_size=8, width=32, depth=1, num_heads=2),
        vq=VQConfig(codebook_size=32, embed_dim=8, base_channels=32, channel_mult=(1, 1), num_res_blocks=1,
                    z_channels=32, image_size=16),
        llm=LLMConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256),
        tokens=TINY_TOKENS, gen_head_dim=64, cross_attention_every=2,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def perturb_(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Random weights (gates included unless they are reset afterwards), so no block is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * std)


def zero_gates_(model) -> None:
    with torch.no_grad():
        for name, p in model.cross_attn_layers.named_parameters():
            if name.endswith("_gate"):
                p.zero_()


def base_and_b(seed: int = 0, gates: bool = True, **kw):
    """(Method A base model, the same model with cross-attention blocks added and randomised)."""
    torch.manual_seed(seed)
    base = UniGenModel(tiny_config(**kw)).eval()
    perturb_(base, seed, std=0.05)
    b = add_cross_attention(copy.deepcopy(base))
    perturb_(b.cross_attn_layers, seed + 1)
    if not gates:
        zero_gates_(b)
    return base, b.eval()


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def backbone_logits(model, ids, attention_mask=None) -> torch.Tensor:
    """The text-only backbone: placeholder tokens embedded as text, no image anywhere."""
    hidden = model.run_decoder(model.embed_text(ids), attention_mask).last_hidden_state
    return linear(hidden, model.language_model.lm_head.weight)


def left_pad(rows):
    n = max(len(r) for r in rows)
    ids = torch.tensor([[TINY_TOKENS.pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---- placement, keys, config -------------------------------------------------------------------


def test_positions_default_explicit_and_errors():
    cfg = tiny_config(fusion="cross_attention")
    assert cross_attention_positions(cfg) == [1, 3]
    cfg.llm.num_layers, cfg.cross_attention_every = 24, 4
    assert cross_attention_positions(cfg) == [3, 7, 11, 15, 19, 23]  # Mllama: before blocks 3, 7, 11, ...
    cfg.cross_attention_layers = [24, 0, 0]
    assert cross_attention_positions(cfg) == [0, 24]
    cfg.cross_attention_layers = [25]
    with pytest.raises(ValueError, match="out of range"):
        cross_attention_positions(cfg)
    with pytest.raises(ValueError, match="places no cross-attention block"):
        UniGenModel(tiny_config(fusion="cross_attention", cross_attention_every=8))
    with pytest.raises(ValueError, match="unknown fusion"):
        UniGenModel(tiny_config(fusion="xattn"))
    with pytest.raises(ValueError, match="unknown encoder"):
        UniGenModel(tiny_config(encoder="clip"))
    assert tiny_config().image_placeholders_per_image == 4
    assert tiny_config(fusion="cross_attention").image_placeholders_per_image == 1


def test_backbone_keys_are_the_decoder_only_models():
    base, b = base_and_b()
    base_keys, b_keys = set(base.state_dict()), set(b.state_dict())
    extra = b_keys - base_keys
    assert base_keys <= b_keys
    assert extra and all(k.startswith("cross_attn_layers.") for k in extra)
    assert {k.split(".")[1] for k in extra} == {"1", "3"}
    assert "cross_attn_layers.1.cross_attn.k_norm.weight" in extra
    assert b.cross_attn_layers["1"].cross_attn.k_proj.weight.shape == (2 * 16, 64)  # grouped kv heads
    assert len(b.decoder.layers) == 4  # not flattened into the backbone


# ---- exactness and masking ------------------------------------------------------------------------


def test_zero_gates_give_the_backbone_exactly():
    base, b = base_and_b(gates=False)
    ids, mask = left_pad([[BOS, 20, IMG, 21, 22, IMG, 23], [BOS, 30, 31], [BOS, IMG, 40, 41]])
    with torch.no_grad():
        out = b(ids, pixel_values=pixels(3), attention_mask=mask)
        ref = backbone_logits(base, ids, mask)
    assert out.cross_attention_state is not None  # the cross-attention path really ran
    assert torch.equal(out.logits, ref)


def test_no_leak_to_positions_before_the_image():
    """Nonzero gates: positions before a row's first image and image-less rows equal the backbone exactly."""
    base, b = base_and_b()
    ids, mask = left_pad([[BOS, 20, 21, 22, IMG, 23, 24], [BOS, 30, 31, 32]])
    first = 4  # column of the placeholder in row 0 (no padding there)
    with torch.no_grad():
        out = b(ids, pixel_values=pixels(1), attention_mask=mask).logits
        other = b(ids, pixel_values=pixels(1, seed=5), attention_mask=mask).logits
        ref = backbone_logits(base, ids, mask)
    assert torch.equal(out[0, :first], ref[0, :first])
    assert torch.equal(out[1], ref[1])  # a row without images
    # from the placeholder on, the image is seen (and which image it is matters)
    assert (out[0, first:] - ref[0, first:]).abs().amin(-1).gt(1e-4).all()
    assert (out[0, first:] - other[0, first:]).abs().amax(-1).gt(1e-4).all()
    assert torch.equal(out[0, :first], other[0, :first])


def test_only_preceding_images_are_seen():
    base, b = base_and_b()
    ids = torch.tensor([[BOS, IMG, 20, 21, IMG, 22, 23]])
    a, c = pixels(2), pixels(2)
    c[1] = -c[1]  # change only the second image
    with torch.no_grad():
        la, lc = b(ids, pixel_values=a).logits, b(ids, pixel_values=c).logits
    assert torch.equal(la[0, :4], lc[0, :4])
    assert not torch.allclose(la[0, 4:], lc[0, 4:])


def test_mixed_batch_rows_equal_rows_alone():
    _, b = base_and_b()
    rows = [[BOS, 20, IMG, 21, 22], [BOS, 30, 31, 32, 33, 34, 35], [BOS, IMG, 40, IMG, 41, 42]]
    images = [pixels(1, seed=1), None, pixels(2, seed=2)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = b(ids, pixel_values=torch.cat([x for x in images if x is not None]), attention_mask=mask).logits
        for i, (row, px) in enumerate(zip(rows, images)):
            alone = b(torch.tensor([row]), pixel_values=px).logits[0]
            torch.testing.assert_close(batch[i, -len(row):], alone, atol=1e-5, rtol=0)


def test_generation_rows_pass_through_unchanged():
    base, b = base_and_b()
    prompt = torch.tensor([[BOS, 11, 12, TINY_TOKENS.image_start]] * 2)
    codes = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(b.image_logits(prompt, codes), base.image_logits(prompt, codes))
        # text-only forward: no cross-attention state at all
        out = b(prompt)
    assert out.cross_attention_state is None
    assert torch.equal(out.logits, backbone_logits(base, prompt))


@pytest.mark.parametrize("text_row", [False, True])
def test_cached_decoding_equals_uncached(text_row):
    _, b = base_and_b(seed=4)
    # one image, two images (so the first row has a padding slot), and maybe a row without images
    rows = [[BOS, 20, IMG, 21, 22], [BOS, IMG, 30, 31, IMG, 32, 33]] + [[BOS, 40, 41]] * text_row
    ids, mask = left_pad(rows)
    px = pixels(3, seed=4)
    steps = torch.tensor([[50, 51, 52, 53], [60, 61, 62, 63], [70, 71, 72, 73]])[: len(rows)]
    with torch.no_grad():
        out = b(ids, pixel_values=px, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        assert cache.cross_attention_state is out.cross_attention_state
        cached = [out.logits[:, -1]]
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            pos = mask.sum(1, keepdim=True) - 1
            # the decode step passes the cache only: the image K/V come with it
            step = b(steps[:, t : t + 1], attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True)
            cache = step.past_key_values
            cached.append(step.logits[:, -1])
        full = b(torch.cat([ids, steps], 1), pixel_values=px, attention_mask=mask).logits
    uncached = full[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(cached, 1), uncached, atol=1e-5, rtol=0)
    assert (uncached[:, 1:] - full[:, ids.shape[1] - 1 : -1]).abs().amax() > 1e-3  # steps do differ


def test_images_only_at_prefill_and_placeholder_count():
    _, b = base_and_b()
    with torch.no_grad():
        out = b(torch.tensor([[BOS, IMG, 20]]), pixel_values=pixels(1), use_cache=True)
        with pytest.raises(ValueError, match="prefill"):
            b(torch.tensor([[IMG]]), pixel_values=pixels(1), past_key_values=out.past_key_values, use_cache=True)
        with pytest.raises(ValueError, match="exactly ONE placeholder"):
            b(torch.tensor([[BOS] + [IMG] * 4 + [20]]), pixel_values=pixels(1))
        with pytest.raises(ValueError, match="no pixel_values"):
            b(torch.tensor([[BOS, IMG, 20]]))


# ---- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gates", [False, True])
def test_gradients_reach_trainable_groups_only(gates):
    _, b = base_and_b(gates=gates)
    b.train()
    groups = stage_groups(b.config, {"aligner", "gen_aligner", "gen_head", "llm"})
    assert groups == {"aligner", "gen_aligner", "gen_head", "cross_attention"}  # Method B: LLM frozen by default
    assert stage_groups(b.config, {"aligner", "llm"}, train_llm=True) == {"aligner", "llm", "cross_attention"}
    assert stage_groups(b.config, {"aligner"}, train_llm=True) == {"aligner", "cross_attention"}
    assert stage_groups(tiny_config(), {"aligner", "llm"}) == {"aligner", "llm"}  # Method A: unchanged
    assert stage_groups(tiny_config(), {"aligner", "llm"}, train_llm=False) == {"aligner"}
    set_trainable(b, groups)
    ids = torch.tensor([[BOS, 20, IMG, 21, 22, 23], [BOS, 30, 31, IMG, 32, 33]])
    logits = b(ids, pixel_values=pixels(2)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    by_group = parameter_groups(b)
    for group, params in by_group.items():
        for name, p in params:
            if group not in groups:
                assert p.grad is None, f"frozen {name} received a gradient"
    cross = dict(by_group["cross_attention"])
    gate_names = [n for n in cross if n.endswith("_gate")]
    assert len(gate_names) == 4
    for n in gate_names:
        assert cross[n].grad is not None and cross[n].grad.abs().item() > 0, n
    if gates:  # with open gates every cross-attention weight and the aligner learn
        for n, p in cross.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert all(p.grad.abs().sum() > 0 for _, p in by_group["aligner"])
    assert b.trainable_groups()["cross_attention"] == list(cross)


# ---- patch encoder --------------------------------------------------------------------------------


def test_patch_encoder_is_a_linear_map_of_raw_patches():
    torch.manual_seed(0)
    model = UniGenModel(tiny_config(encoder="patch")).eval()
    enc = model.vision_model
    px = pixels(3)
    with torch.no_grad():
        feats = enc(px)
        assert feats.shape == (3, 4, 32)
        # the same as a stride-p convolution with the Linear's weights (patch order = row-major)
        conv = torch.nn.functional.conv2d(px, enc.proj.weight.view(32, 3, 8, 8), enc.proj.bias, stride=8)
        torch.testing.assert_close(feats, conv.flatten(2).transpose(1, 2) + enc.pos_embed, atol=1e-5, rtol=0)
        assert model.get_image_features(px).shape == (3, 4, 64)
    assert {k for k in model.state_dict() if k.startswith("vision_model.")} == {
        "vision_model.proj.weight", "vision_model.proj.bias", "vision_model.pos_embed"}
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        enc(torch.zeros(1, 3, 24, 24))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        UniGenModel(tiny_config(encoder="patch", vision=SigLIPConfig(image_size=20, patch_size=8, width=32)))


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_patch_encoder_end_to_end(fusion):
    torch.manual_seed(0)
    model = UniGenModel(tiny_config(encoder="patch", fusion=fusion)).eval()
    perturb_(model, 0, std=0.05)
    n = model.config.image_placeholders_per_image
    ids = torch.tensor([[BOS, 20] + [IMG] * n + [21, 22]])
    with torch.no_grad():
        a = model(ids, pixel_values=pixels(1)).logits
        c = model(ids, pixel_values=pixels(1, seed=9)).logits
    assert a.shape == (1, ids.shape[1], 96)
    assert not torch.allclose(a[0, -1], c[0, -1])  # the image reaches the output


# ---- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["siglip", "patch"])
def test_method_b_checkpoint_round_trip(tmp_path, encoder):
    _, b = base_and_b(encoder=encoder)
    b.save_pretrained(tmp_path)
    loaded = UniGenModel.from_pretrained(tmp_path)
    assert loaded.config == b.config and loaded.config.fusion == "cross_attention"
    sd, sd2 = b.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.tensor([[BOS, 20, IMG, 21]])
    with torch.no_grad():
        assert torch.equal(b(ids, pixel_values=pixels(1)).logits, loaded(ids, pixel_values=pixels(1)).logits)
    # the file is the base checkpoint's keys plus cross_attn_layers.*
    base = UniGenModel(tiny_config(encoder=encoder))
    base_keys = set(official_state_dict(base.state_dict(), base.config.llm))
    file_keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert base_keys <= file_keys and all(k.startswith("cross_attn_layers.") for k in file_keys - base_keys)
    with pytest.raises(ValueError, match="drop its cross-attention weights"):
        UniGenModel.from_pretrained(tmp_path, fusion="concat")
    with pytest.raises(ValueError, match="cannot move them"):
        UniGenModel.from_pretrained(tmp_path, fusion="cross_attention", cross_attention_layers=[0])


def test_base_checkpoint_loads_as_method_b(tmp_path):
    base, _ = base_and_b()
    base.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="missing keys"):  # a Method B config alone is not enough
        cfg = UniGenModel.from_pretrained(tmp_path).config
        cfg.fusion = "cross_attention"
        cfg.save(tmp_path)
        UniGenModel.from_pretrained(tmp_path)
    base.config.save(tmp_path)
    b = UniGenModel.from_pretrained(tmp_path, fusion="cross_attention", cross_attention_layers=[0, 4])
    assert b.config.fusion == "cross_attention" and sorted(b.cross_attn_layers) == ["0", "4"]
    ids = torch.tensor([[BOS, 20, IMG, 21, 22]])
    with torch.no_grad():
        assert torch.equal(b(ids, pixel_values=pixels(1)).logits, backbone_logits(base, ids))
    plain = UniGenModel.from_pretrained(tmp_path)
    assert plain.cross_attn_layers is None and plain.config.fusion == "concat"


def test_run_decoder_decode_step_takes_the_images_from_the_cache():
    """A sampler that steps with ``run_decoder`` (embeddings in, e.g. image-token embeddings) keeps the images."""
    base, b = base_and_b(seed=6)
    ids = torch.tensor([[BOS, 20, IMG, 21]])
    with torch.no_grad():
        cache = b(ids, pixel_values=pixels(1), use_cache=True).past_key_values
        twin = copy.deepcopy(cache)
        pos = torch.tensor([[4]])
        via_forward = b(torch.tensor([[22]]), position_ids=pos, past_key_values=cache, use_cache=True).logits
        hidden = b.run_decoder(b.embed_text(torch.tensor([[22]])), position_ids=pos, past_key_values=twin,
                               use_cache=True).last_hidden_state
        assert torch.equal(linear(hidden, b.language_model.lm_head.weight), via_forward)
        full = b(torch.tensor([[BOS, 20, IMG, 21, 22]]), pixel_values=pixels(1)).logits[:, -1:]
        torch.testing.assert_close(via_forward, full, atol=1e-5, rtol=0)
        assert (full - backbone_logits(base, torch.tensor([[BOS, 20, IMG, 21, 22]]))[:, -1:]).abs().amax() > 1e-3


def test_method_b_captioning_through_the_sampler_equals_full_recompute():
    """generate_text (prefill with images, then cached steps) == re-running the whole sequence each step."""
    from unigen.generation.sampling import generate_text

    _, b = base_and_b()
    ids, mask = left_pad([[BOS, 10, IMG, 11, 12], [BOS, 13, 14, IMG, 15, 16, 17]])
    px = pixels(2)
    new = generate_text(b, ids, mask, pixel_values=px, max_new_tokens=6, eos_token_id=-1)
    rows, m = ids.clone(), mask.clone()
    expected = []
    with torch.no_grad():
        for _ in range(6):
            nxt = b(rows, pixel_values=px, attention_mask=m).logits[:, -1].argmax(-1)
            expected.append(nxt)
            rows = torch.cat([rows, nxt[:, None]], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert new == torch.stack(expected, 1).tolist()


# ---- image positions (issue 26) -------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [True, False])
def test_image_positions_make_the_block_see_where_a_feature_sits(positions):
    """Two images whose features differ only by where the one distinct feature sits (an object moved from the
    first token to the last) give different block outputs with image positions, and exactly the same without
    them: attention without positions cannot tell its keys apart by place."""
    llm = tiny_config().llm
    torch.manual_seed(0)
    block = CrossAttentionBlock(llm, image_tokens=16 if positions else None, gate_init=1.0)
    background, thing = torch.randn(llm.hidden_size), torch.randn(llm.hidden_size)
    here, there = background.repeat(16, 1), background.repeat(16, 1)
    here[0], there[15] = thing, thing
    hidden = torch.randn(1, 3, llm.hidden_size)
    outputs = []
    for image in (here, there):
        keys, values = block.project_kv(image[None, None])  # one row, one image slot
        outputs.append(block(hidden, keys, values, None, None))
    # relative to what the block adds at all (its fresh weights are small)
    moved = ((outputs[0] - outputs[1]).abs().max() / (outputs[0] - hidden).abs().max()).item()
    if positions:
        assert moved > 0.01  # 0.033 with this seed; without positions it is below 1e-5
    else:
        assert moved < 1e-5


def test_image_position_table_and_gate_init():
    table = sincos_2d(16, 64)
    assert table.shape == (16, 64)
    assert len({tuple(row.tolist()) for row in table}) == 16  # every grid place has its own code
    grid = table.view(4, 4, 64)
    assert torch.equal(grid[:, 0, :32], grid[:, 3, :32])  # first half: the row only
    assert torch.equal(grid[0, :, 32:], grid[3, :, 32:])  # second half: the column only
    with pytest.raises(ValueError, match="square token grid"):
        sincos_2d(12, 64)

    model = UniGenModel(tiny_config(fusion="cross_attention", cross_attention_gate_init=0.5))
    block = next(iter(model.cross_attn_layers.values()))
    assert block.cross_attn_attn_gate.item() == block.cross_attn_mlp_gate.item() == 0.5
    assert torch.equal(block.image_position.detach(), sincos_2d(model.config.vision.num_tokens, 64))
    assert "cross_attention" in {g for g, ps in parameter_groups(model).items()
                                 if any(p is block.image_position for _, p in ps)}


def test_method_b_config_saved_before_image_positions_loads_without_them():
    """A Method B config.json written before the key existed describes blocks without position tables."""
    old = tiny_config(fusion="cross_attention").to_dict()
    del old["cross_attention_image_positions"], old["cross_attention_gate_init"]
    config = UniGenConfig.from_dict(old)
    assert config.cross_attention_image_positions is False
    assert all(b.image_position is None for b in UniGenModel(config).cross_attn_layers.values())
    assert UniGenConfig.from_dict(tiny_config(fusion="cross_attention").to_dict()).cross_attention_image_positions
