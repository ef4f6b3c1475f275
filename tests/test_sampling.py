"""Image-token and text sampling against transformers' Janus generate, on the same tiny random weights."""

from dataclasses import fields

import pytest
import torch

from unigen import UniGenModel
from unigen.generation.sampling import CFGSchedule, filter_logits, generate_image_tokens, generate_text
from unigen.generation.sampling_options import SamplingOptions
from unigen.testing import TINY_TOKENS as T


@pytest.fixture(scope="module")
def models(tiny_hf_janus):
    hf, directory = tiny_hf_janus
    return hf, UniGenModel.from_pretrained(directory)


def with_options(**kw) -> dict:
    """generate_image_tokens' keywords, the sampling ones (guidance, temperature, ..., decoding) as its options."""
    sampling = {f.name for f in fields(SamplingOptions)}
    return {**{k: v for k, v in kw.items() if k not in sampling},
            "options": SamplingOptions(**{k: v for k, v in kw.items() if k in sampling})}


def image_codes(model, *args, **kw) -> torch.Tensor:
    return generate_image_tokens(model, *args, **with_options(**kw)).codes


def prompts():
    ids = torch.tensor([[T.pad, T.pad, T.bos, 20, 21, 22, T.image_start],
                        [T.bos, 30, 31, 32, 33, 34, T.image_start]])
    return ids, (ids != T.pad).long()


def test_greedy_image_tokens_equal_transformers(models):
    hf, model = models
    ids, mask = prompts()
    ref = hf.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=5.0)
    ours = image_codes(model, ids, mask, guidance_scale=5.0, temperature=0)
    assert ours.shape == (2, model.config.vq.num_tokens)
    assert torch.equal(ours, ref)


def test_greedy_image_tokens_follow_the_teacher_forced_logits(models):
    """Each greedy code is the argmax of the guided logits that a full (uncached) forward gives for the
    codes before it: the cache, the rotary positions of decode steps and left padding all enter."""
    _, model = models
    ids, mask = prompts()
    codes = image_codes(model, ids, mask, guidance_scale=3.0, temperature=0)
    uncond_ids = torch.where((ids == T.bos) | (ids == T.image_start) | (ids == T.pad), ids, T.cfg_pad)
    with torch.no_grad():
        c = model.image_logits(ids, codes, mask)
        u = model.image_logits(uncond_ids, codes, mask)
    guided = u + 3.0 * (c - u)
    top2 = guided.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4  # ties within rounding may go either way
    assert clear.float().mean() > 0.9
    assert torch.equal(guided.argmax(-1)[clear], codes[clear])


def test_greedy_captions_equal_transformers(models):
    hf, model = models
    img = [T.image_start] + [T.image] * 16 + [T.image_end]
    ids = torch.tensor([[T.pad, T.pad, T.bos, 20] + img + [21, 22], [T.bos, 30, 31, 32] + img + [33, 34]])
    mask = (ids != T.pad).long()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = hf.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=10, do_sample=False)
    ours = generate_text(model, ids, mask, pixel_values=pixels, max_new_tokens=10, eos_token_id=-1)
    assert ours == ref[:, ids.shape[1]:].tolist()


def test_left_padded_batch_equals_each_prompt_alone(models):
    _, model = models
    ids, mask = prompts()
    both = image_codes(model, ids, mask, temperature=0)
    first = image_codes(model, ids[:1, 2:], temperature=0)
    second = image_codes(model, ids[1:], temperature=0)
    assert torch.equal(both, torch.cat([first, second]))


def test_text_stops_at_eos_and_streams(models):
    _, model = models
    ids = torch.tensor([[T.bos, 20, 21]])
    free = generate_text(model, ids, max_new_tokens=8, eos_token_id=-1)[0]
    stop = free[3]
    cut = generate_text(model, ids, max_new_tokens=8, eos_token_id=stop)[0]
    assert cut == free[: free.index(stop)]

    class Collect:
        def __init__(self):
            self.ids, self.ended = [], False

        def put(self, t):
            self.ids += t.tolist()

        def end(self):
            self.ended = True

    s = Collect()
    generate_text(model, ids, max_new_tokens=5, eos_token_id=-1, streamer=s)
    assert s.ids == free[:5] and s.ended


def test_same_generator_seed_gives_same_images(models):
    _, model = models
    ids, mask = prompts()
    def run(seed):
        return image_codes(model, ids, mask, num_images=2, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert a.shape == (4, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_generator_per_image(models):
    _, model = models
    ids, mask = prompts()
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    a = image_codes(model, ids, mask, generator=gens(1, 2))
    b = image_codes(model, ids, mask, generator=gens(1, 3))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        generate_image_tokens(model, ids, mask, generator=gens(1, 2, 3))


def test_top_k_one_is_greedy_and_cutoff_zero_is_unguided(models):
    _, model = models
    ids, mask = prompts()
    greedy = image_codes(model, ids, mask, temperature=0)
    assert torch.equal(image_codes(model, ids, mask, top_k=1, generator=torch.Generator()), greedy)
    unguided = image_codes(model, ids, mask, guidance_scale=1.0, temperature=0)
    assert torch.equal(image_codes(model, ids, mask, temperature=0, cfg_schedule="cutoff:0"), unguided)
    assert not torch.equal(unguided, greedy)


def test_unset_guidance_and_temperature_take_the_checkpoints(models):
    _, model = models
    ids, mask = prompts()
    saved = model.config.guidance_scale, model.config.temperature
    try:
        model.config.guidance_scale, model.config.temperature = 3.0, 0.0
        assert torch.equal(image_codes(model, ids, mask), image_codes(model, ids, mask, guidance_scale=3.0,
                                                                      temperature=0))
        assert not torch.equal(image_codes(model, ids, mask), image_codes(model, ids, mask, guidance_scale=5.0,
                                                                          temperature=0))
    finally:
        model.config.guidance_scale, model.config.temperature = saved


def test_negative_prompt_replaces_the_unconditional_branch(models):
    _, model = models
    ids, mask = prompts()
    default_uncond = torch.tensor([[T.bos, T.cfg_pad, T.cfg_pad, T.cfg_pad, T.image_start]])
    one = image_codes(model, ids[:1, 2:], temperature=0)
    same = image_codes(model, ids[:1, 2:], temperature=0, negative_prompt_ids=default_uncond)
    other = image_codes(model, ids[:1, 2:], temperature=0,
                        negative_prompt_ids=torch.tensor([[T.bos, 40, 41, T.image_start]]))
    assert torch.equal(one, same) and not torch.equal(one, other)


def test_cfg_schedules():
    assert CFGSchedule().scales(5.0, 3) == [5.0, 5.0, 5.0]
    assert CFGSchedule("linear").scales(5.0, 4) == [2.0, 3.0, 4.0, 5.0]
    assert CFGSchedule("cutoff", 2).scales(5.0, 4) == [5.0, 5.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown cfg_schedule 'cosine'"):
        CFGSchedule("cosine").scales(5.0, 4)


def test_filter_logits_top_p_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_k=1)).tolist() == [[False, True, True, True]]


def test_bad_arguments_are_named(models):
    _, model = models
    ids, mask = prompts()
    with pytest.raises(ValueError, match="num_images must be at least 1, got 0"):
        generate_image_tokens(model, ids, mask, num_images=0)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        generate_image_tokens(model, ids, mask, options=SamplingOptions(guidance_scale=-1))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            generate_image_tokens(model, ids, mask, options=SamplingOptions(top_p=bad))
    for bad in (float("nan"), float("inf")):  # nan < 0 is False: finiteness is checked first
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            generate_image_tokens(model, ids, mask, options=SamplingOptions(guidance_scale=bad))
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            generate_image_tokens(model, ids, mask, options=SamplingOptions(temperature=bad))
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            generate_text(model, ids, mask, temperature=bad)
    long_prompt = torch.full((1, 500), 20)
    with pytest.raises(ValueError, match="500 tokens \\+ 16 image tokens exceeds the context of 512; shorten"):
        generate_image_tokens(model, long_prompt)
    with pytest.raises(ValueError, match="exceeds the context of 512"):
        generate_text(model, long_prompt, max_new_tokens=20)


def test_cached_forward_with_left_padding_equals_full_recompute(models):
    """model(...) with a cache: positions come from the mask in prefill and in decode steps."""
    _, model = models
    ids = torch.tensor([[T.pad, T.pad, T.bos, 20, 21], [T.bos, 30, 31, 32, 33]])
    nxt = torch.tensor([[40, 41], [42, 43]])
    mask = (ids != T.pad).long()
    full_mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        ref = model(torch.cat([ids, nxt], 1), attention_mask=full_mask).logits
        out = model(ids, attention_mask=mask, use_cache=True)
        for j in range(2):
            out = model(nxt[:, j : j + 1], attention_mask=full_mask[:, : ids.shape[1] + j + 1],
                        past_key_values=out.past_key_values, use_cache=True)
            assert (out.logits[:, -1] - ref[:, ids.shape[1] + j]).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(models):
    _, model = models
    ids, mask = prompts()
    eager = image_codes(model, ids, mask, temperature=0)
    assert torch.equal(image_codes(model, ids, mask, temperature=0, compile=True), eager)
    g = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(image_codes(model, ids, mask, generator=g(), compile=True),
                       image_codes(model, ids, mask, generator=g()))


def test_cutoff_schedule_needs_a_token_index(models):
    _, model = models
    ids, mask = prompts()
    for bad in ("cutoff:-3", "cutoff:x", "cutoff"):
        with pytest.raises(ValueError, match="cutoff"):
            generate_image_tokens(model, ids, mask, options=SamplingOptions(cfg_schedule=bad))


def test_decode_linear_equals_linear_at_every_row_count():
    from unigen.models.decoder import SKINNY_ROWS
    from unigen.models.decoder import linear as decode_linear

    g = torch.Generator().manual_seed(0)
    for n_out in (300, 9000):
        w, b = torch.randn(n_out, 48, generator=g), torch.randn(n_out, generator=g)
        # odd row counts get a row repeated; above SKINNY_ROWS rows it is F.linear itself
        for shape in [(1, 48), (1, 1, 48), (2, 1, 48), (3, 1, 48), (SKINNY_ROWS - 1, 48), (SKINNY_ROWS, 48),
                      (SKINNY_ROWS + 1, 48), (3, 50, 48)]:
            x = torch.randn(*shape, generator=g)
            for bias in (None, b):
                out = decode_linear(x, w, bias)
                assert out.shape == (*shape[:-1], n_out) and out.is_contiguous()
                torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)


def test_bf16_decode_keeps_fp32_attention_where_bf16_is_emulated(tiny_hf_janus, monkeypatch):
    """Where bf16 is emulated, the KV cache and the attention run in fp32 (bf16 batched matmuls are 2-4x
    slower there). Either way a cached decode equals a full forward to bf16 rounding."""
    _, directory = tiny_hf_janus
    model = UniGenModel.from_pretrained(directory, dtype=torch.bfloat16)
    ids, mask = prompts()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    cache = model.decoder.new_cache(2, ids.shape[1])
    assert cache.k.dtype == torch.float32
    with torch.no_grad():
        embeds = model.embed_text(ids)
        full = model.decoder(embeds, mask)
        model.decoder(embeds[:, :-1], mask[:, :-1], cache=cache)
        last = model.decoder(embeds[:, -1:], cache=cache)
    assert last.dtype == torch.bfloat16
    assert (last[:, 0].float() - full[:, -1].float()).abs().max() < 5e-2
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert model.decoder.new_cache(2, ids.shape[1]).k.dtype == torch.bfloat16


def test_decoder_pieces_give_transformers_numbers_bit_for_bit(models):
    """unigen's RMSNorm and sign-folded rotary are exact rewrites of transformers' LlamaRMSNorm, rotary
    embedding and apply_rotary_pos_emb, in fp32 and bf16."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from unigen.models.decoder import RMSNorm, rotary_tables, rotate

    _, model = models
    cfg = model.config.llm
    head_dim = cfg.hidden_size // cfg.num_heads
    reference = LlamaRotaryEmbedding(LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                                                 rope_theta=cfg.rope_theta, max_position_embeddings=64))
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 39], [7, 7, 8, 9, 10]])
    x = torch.randn(2, 5, cfg.hidden_size, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = reference(x.to(dtype), positions)
        q = torch.randn(2, cfg.num_heads, 5, head_dim, generator=g).to(dtype)
        expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
        ours = rotate(q.transpose(1, 2), *rotary_tables(positions, head_dim, cfg.rope_theta, dtype)).transpose(1, 2)
        assert torch.equal(ours, expected)
        norm = LlamaRMSNorm(x.shape[-1], eps=1e-6).to(dtype)
        norm.weight.data.normal_(generator=g)
        mine = RMSNorm(x.shape[-1], eps=1e-6).to(dtype)
        mine.weight.data.copy_(norm.weight.data)
        assert torch.equal(mine((3 * x).to(dtype)), norm((3 * x).to(dtype)))
