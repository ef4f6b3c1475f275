"""Quantized inference (unigen.models.quantize, torchao) and the KV cache's dtype, on tiny random models."""

import copy

import pytest
import torch

from unigen import UniGenModel
from unigen.cli import main
from unigen.errors import ArgumentError
from unigen.generation.sampling import generate_image_tokens, generate_text
from unigen.generation.sampling_options import SamplingOptions
from unigen.models.quantize import Quantization, linear_weight_bytes
from unigen.testing import TINY_TOKENS as T
from unigen.training.lora import LoraSettings, attach, merge

pytest.importorskip("torchao")

# Largest |logit - fp32 logit| over real positions: int8 rounding moves logits a little, a wrong kernel or layout by
# far more; the bounds keep a margin over the errors docs/QUANTIZATION.md records.
TOLERANCE = {"int8-weight-only": 0.06, "int8-dynamic": 0.1}


@pytest.fixture(scope="module")
def base(tiny_hf_janus):
    import torchao.quantization  # noqa: F401 - its import (torch._dynamo) is paid here, not inside one test

    return UniGenModel.from_pretrained(tiny_hf_janus[1])


@pytest.fixture(scope="module")
def int8(base):
    return copy.deepcopy(base).quantize("int8-weight-only")


def prompts():
    ids = torch.tensor([[T.pad, T.pad, T.bos, 20, 21, 22, T.image_start],
                        [T.bos, 30, 31, 32, 33, 34, T.image_start]])
    return ids, (ids != T.pad).long()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("method", sorted(TOLERANCE))
def test_quantized_logits_are_close_to_fp32(base, int8, method):
    model = int8 if method == "int8-weight-only" else copy.deepcopy(base).quantize(method)
    ids, mask = prompts()
    ref, out = logits(base, ids, mask), logits(model, ids, mask)
    error = (out - ref).abs()[mask.bool()].max().item()
    assert 0 < error <= TOLERANCE[method]  # > 0: the weights really are quantized
    blocks = model.language_model.model.layers[0]
    assert type(blocks.self_attn.qkv_proj.weight).__name__ == "Int8Tensor"
    assert type(model.gen_head.vision_head.weight).__name__ == "Int8Tensor"
    assert type(model.language_model.model.embed_tokens.weight) is torch.nn.Parameter  # embeddings stay


def test_int8_greedy_caption_tokens_agree_with_fp32(base, int8):
    """The fp32 model's greedy continuation, teacher-forced through both models: the int8 model picks the same
    token at >= 90% of positions, and at every position whose fp32 top-2 gap exceeds twice the logit tolerance."""
    ids, mask = prompts()
    with torch.no_grad():
        greedy = torch.tensor(generate_text(base, ids, mask, max_new_tokens=24))
    full, full_mask = torch.cat([ids, greedy], 1), torch.cat([mask, torch.ones_like(greedy)], 1)
    picks = slice(ids.shape[1] - 1, -1)
    ref, out = logits(base, full, full_mask)[:, picks], logits(int8, full, full_mask)[:, picks]
    assert torch.equal(ref.argmax(-1), greedy)
    agree = out.argmax(-1) == greedy
    top2 = ref.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * TOLERANCE["int8-weight-only"]
    assert agree.float().mean() >= 0.9 and bool(agree[clear].all()) and clear.sum() >= 10


def test_the_cpu_int8_decode_product_gives_torchaos_numbers(int8):
    """A CPU decode step's int8 product (ATen's int8 kernel, bf16 activations) against torchao's own (which
    dequantizes the weight): equal to bf16 rounding of the activations; the weights are symmetric (zero points 0),
    as the kernel assumes."""
    from unigen.models.feed_forward import project

    layer = int8.language_model.model.layers[0].mlp.gate_up_proj
    assert bool((layer.weight.zero_point == 0).all())
    x = torch.randn(2, 1, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = project(layer, x), torch.nn.functional.linear(x, layer.weight)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    assert 0 < (ours - reference).abs().max() <= 0.02 * reference.abs().max()


def test_int8_weight_bytes_are_a_quarter_plus_scales(base, int8):
    """int8 data is 1/4 of fp32; each output row adds its scale (and zero point), 4 bytes each per row of at
    least 64 inputs here, so the ratio lies in [0.25, 0.25 + 8 / 64 / 4]."""
    ratio = linear_weight_bytes(int8) / linear_weight_bytes(base)
    assert 0.25 <= ratio <= 0.25 + 8 / 64 / 4
    assert linear_weight_bytes(int8, ["vq"]) == linear_weight_bytes(base, ["vq"])  # the VQ stays unless asked


@pytest.mark.parametrize("spec, message", [
    (dict(method="int3"), "unknown quantization method 'int3'; choose one of int8-weight-only, int4-weight-only, "
                          "int8-dynamic, float8"),
    (dict(method="int8-weight-only", layers=("decoder", "embeddings")), "unknown quantization layers embeddings"),
    (dict(method="int4-weight-only", group_size=48), "group size 48 is not one torchao's int4 kernels take"),
])
def test_bad_quantization_settings_are_one_line_errors(spec, message):
    with pytest.raises(ArgumentError, match=message) as err:
        Quantization(**spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method, message", [
    ("int4-weight-only", "int4-weight-only has no CPU kernel in torchao (it needs a CUDA GPU); on CPU use "
                         "int8-weight-only"),
    ("float8", "float8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper), this is cpu; use "
               "int8-weight-only"),
])
def test_a_method_the_device_lacks_is_named_not_replaced(base, method, message):
    model = copy.deepcopy(base)
    with pytest.raises(ArgumentError) as err:
        model.quantize(method)
    assert str(err.value) == message
    assert type(model.language_model.lm_head.weight) is torch.nn.Parameter  # nothing half-quantized


def test_quantizing_twice_is_refused(int8):
    with pytest.raises(ArgumentError, match="already quantized; load it again"):
        int8.quantize("int8-dynamic")


def test_every_decoding_method_runs_quantized(int8):
    """Greedy Jacobi gives the sequential tokens on the quantized model too; ZipAR with a full-row window is
    sequential decoding."""
    ids, mask = prompts()

    def codes(decoding="sequential", **options):
        sampling = SamplingOptions(temperature=0, guidance_scale=3.0, decoding=decoding, decoding_options=options)
        return generate_image_tokens(int8, ids, mask, options=sampling).codes

    sequential = codes()
    assert torch.equal(codes("jacobi", window=4), sequential)
    grid = int(int8.config.vq.num_tokens**0.5)
    assert torch.equal(codes("zipar", window=grid), sequential)


def test_a_lora_merged_model_quantizes(base):
    peft = attach(copy.deepcopy(base), LoraSettings(r=4), "lora")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    merged = merge(peft)
    ids, mask = prompts()
    ref = logits(merged, ids, mask)
    assert (ref - logits(base, ids, mask)).abs().max() > 0.05  # the adapters changed the model
    error = (logits(merged.quantize("int8-weight-only"), ids, mask) - ref).abs()[mask.bool()].max()
    assert error <= TOLERANCE["int8-weight-only"]


def test_a_method_b_model_quantizes_its_cross_attention_blocks(tiny_hf_janus):
    """Method B's gated cross-attention blocks are decoder layers: quantized with the blocks (gates opened so that
    they change the logits)."""
    model = UniGenModel.from_pretrained(tiny_hf_janus[1], fusion="cross_attention", cross_attention_every=1)
    with torch.no_grad():
        for name, p in model.cross_attn_layers.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    ids, mask = prompts()
    ref = logits(model, ids, mask)
    model.quantize("int8-weight-only")
    linears = [m for m in model.cross_attn_layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    assert 0 < (logits(model, ids, mask) - ref).abs()[mask.bool()].max() <= TOLERANCE["int8-weight-only"]


@pytest.mark.slow
def test_the_captured_decode_step_runs_quantized(int8):
    """The sequential step captured once (torch.compile on CPU) gives the eager quantized tokens."""
    ids, mask = prompts()
    options = SamplingOptions(temperature=0, guidance_scale=3.0)
    eager = generate_image_tokens(int8, ids, mask, options=options, compile=False).codes
    assert torch.equal(generate_image_tokens(int8, ids, mask, options=options, compile=True).codes, eager)


# ---- the KV cache's dtype -----------------------------------------------------------------------------------


def cached_logits(model, ids, mask, steps: int = 6) -> torch.Tensor:
    """Prefill, then ``steps`` single-position decode steps through the static cache; every step's logits."""
    cache = model.decoder.new_cache(ids.shape[0], ids.shape[1] + steps)
    out = []
    with torch.no_grad():
        step = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:]
        for _ in range(steps):
            out.append(step)
            step = model(input_ids=step.argmax(-1), past_key_values=cache, use_cache=True).logits
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 0.01), ("float8_e4m3fn", 0.08)])
def test_a_low_precision_kv_cache_keeps_the_logits_and_shrinks(base, dtype, tolerance):
    """Measured: 0.0021 (bf16) and 0.021 (float8) on logits spanning +-2.3 (margins of about 4x); the cache's keys
    and values take half (bf16) or a quarter (float8) of the fp32 bytes."""
    ids, mask = prompts()
    ref, ref_cache = cached_logits(base, ids, mask)
    model = copy.deepcopy(base)
    model.decoder.kv_cache_dtype = getattr(torch, dtype)
    out, cache = cached_logits(model, ids, mask)
    assert cache.k.dtype == getattr(torch, dtype)
    assert 0 < (out - ref).abs().max() <= tolerance
    assert cache.k.nbytes + cache.v.nbytes == (ref_cache.k.nbytes + ref_cache.v.nbytes) * cache.k.itemsize // 4


def test_cli_caption_with_quantize_and_a_bf16_cache(tiny_hf_janus, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    flags = ["caption", str(image), "--model", str(tiny_hf_janus[1]), "--max-new-tokens", "4", "--device", "cpu"]
    assert main(flags) == 0
    plain = capsys.readouterr().out
    assert main([*flags, "--quantize", "int8-weight-only", "--kv-cache-dtype", "bfloat16"]) == 0
    quantized = capsys.readouterr().out
    assert quantized.startswith(f"{image}\t") and quantized.count("\n") == 1 and plain.count("\n") == 1
    with pytest.raises(SystemExit) as err:
        main([*flags, "--quantize", "int3"])
    assert err.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    assert main([*flags, "--quantize", "int4-weight-only", "--model", str(tmp_path / "nowhere")]) == 2  # before loading
    assert capsys.readouterr().err == ("error: int4-weight-only has no CPU kernel in torchao (it needs a CUDA GPU); "
                                       "on CPU use int8-weight-only\n")
