"""unigen against transformers' Janus on the same tiny random weights (float32, max abs diff <= 1e-4)."""

import torch
import torch.nn.functional as F

from unigen import UniGenModel
from unigen.testing import TINY_TOKENS, write_official_layout

TOL = 1e-4


def understanding_batch(n_vis: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = [TINY_TOKENS.image_start] + [TINY_TOKENS.image] * n_vis + [TINY_TOKENS.image_end]
    rows = [[TINY_TOKENS.bos, 20, 21] + img + [30, 31, 32], [TINY_TOKENS.bos, 40] + img + [50, 51, 52, 53]]
    ids = torch.tensor(rows)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    return ids, pixels


def hf_image_logits(hf, input_ids, image_tokens):
    """Teacher-forced generation logits computed with transformers' modules."""
    text = hf.get_input_embeddings()(input_ids)
    img = hf.prepare_embeddings_for_image_generation(image_tokens[:, :-1])
    hidden = hf.model.language_model(inputs_embeds=torch.cat([text, img], 1)).last_hidden_state
    return hf.model.generation_head(hidden[:, input_ids.shape[1] - 1 :])


def assert_matches_hf(model, hf):
    n_vis = model.config.vision.num_tokens
    ids, pixels = understanding_batch(n_vis)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        out = model(ids, pixel_values=pixels).logits
        assert out.shape == ref.shape == (2, ids.shape[1], model.config.llm.vocab_size)
        assert (out - ref).abs().max() <= TOL

        prompt = torch.tensor([[TINY_TOKENS.bos, 11, 12, 13, TINY_TOKENS.image_start]] * 2)
        codes = torch.randint(0, model.config.vq.codebook_size, (2, model.config.vq.num_tokens),
                              generator=torch.Generator().manual_seed(1))
        ref = hf_image_logits(hf, prompt, codes)
        out = model.image_logits(prompt, codes)
        assert out.shape == (2, model.config.vq.num_tokens, model.config.vq.codebook_size)
        assert (out - ref).abs().max() <= TOL

        ref_px = hf.decode_image_tokens(codes).permute(0, 3, 1, 2)
        out_px = model.decode_image_tokens(codes, clamp=False)
        assert (out_px - ref_px).abs().max() <= TOL
        assert model.decode_image_tokens(codes).abs().max() <= 1.0


def test_transformers_layout_matches_reference(tiny_hf_janus):
    hf, directory = tiny_hf_janus
    model = UniGenModel.from_pretrained(directory)
    assert model.config.vq.num_tokens == hf.config.vision_config.num_image_tokens
    assert_matches_hf(model, hf)


def test_official_layout_matches_reference(tiny_hf_janus, tmp_path):
    hf, directory = tiny_hf_janus
    write_official_layout(UniGenModel.from_pretrained(directory), tmp_path / "official")
    model = UniGenModel.from_pretrained(tmp_path / "official")
    assert_matches_hf(model, hf)


def test_transformers_janus_with_tied_embeddings_loads(tmp_path):
    """``JanusConfig``'s own default ties the text head to the embedding, and such a file holds no
    lm_head.weight: the head is the embedding, as in transformers."""
    from safetensors.torch import load_file
    from transformers import JanusForConditionalGeneration

    from unigen.testing import randomize_, tiny_janus_config

    config = tiny_janus_config()
    config.tie_word_embeddings = True
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = JanusForConditionalGeneration(config).eval()
    randomize_(hf, 4)
    hf.tie_weights()
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    model = UniGenModel.from_pretrained(tmp_path)
    assert torch.equal(model.language_model.lm_head.weight, model.decoder.embed_tokens.weight)
    assert_matches_hf(model, hf)


def test_generation_logits_are_causal(tiny_hf_janus):
    """Entry i must not depend on image_tokens[:, i:] (teacher forcing without leaks)."""
    _, directory = tiny_hf_janus
    model = UniGenModel.from_pretrained(directory)
    prompt = torch.tensor([[TINY_TOKENS.bos, 11, TINY_TOKENS.image_start]])
    codes = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    changed = codes.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64
    with torch.no_grad():
        a, b = model.image_logits(prompt, codes), model.image_logits(prompt, changed)
    assert torch.equal(a[:, :8], b[:, :8])  # entry 7 sees tokens 0..6 only
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def official_encode(vq, pixels):
    """DeepSeek's encode written out: l2-normalise z and the codebook, then nearest code."""
    z = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1)
    z = F.normalize(z, dim=-1).reshape(-1, z.shape[-1])
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    return torch.cdist(z, codebook).argmin(1).view(pixels.shape[0], -1)


def test_vq_encode_follows_official_normalisation(tiny_hf_janus):
    hf, directory = tiny_hf_janus
    model = UniGenModel.from_pretrained(directory)
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ours = model.encode_image_tokens(pixels)
        assert ours.shape == (3, model.config.vq.num_tokens)
        assert torch.equal(ours, official_encode(model.gen_vision_model, pixels))
        # transformers' encode normalises neither z nor the codebook: with our random (non unit-norm)
        # codebook it picks other codes, which is why we follow the official code
        hf_codes = hf.model.vqmodel.encode(pixels).image_tokens.view(3, -1)
        assert not torch.equal(ours, hf_codes)
        # with unit-norm codebook rows the two agree exactly
        w = hf.model.vqmodel.quantize.embedding.weight
        saved = w.detach().clone()
        w.copy_(F.normalize(saved, dim=-1))
        try:
            hf_codes = hf.model.vqmodel.encode(pixels).image_tokens.view(3, -1)
        finally:
            w.copy_(saved)
        assert torch.equal(ours, hf_codes)
