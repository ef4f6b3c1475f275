"""LoRA stages (unigen.training.lora): what trains, adapters in every forward path, merging, resuming, starting layouts,
bad settings."""


import pytest
import torch
from peft import PeftModel
from train_common import SMOKE, cli, kill_in_checkpoint_15, losses, metrics, recipe, run, weights

from unigen import UniGenModel
from unigen.data.manifest import read_samples
from unigen.shapes import write_dataset
from unigen.training import run_stage
from unigen.training.lora import LoraSettings, attach, load_adapter, save_adapter
from unigen.training.start import build_fresh

LORA = "stage2.lora={r: 4, alpha: 8, targets: [llm, aligner], modules_to_save: [gen_head]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A small checkpoint (random weights, a word tokenizer trained on the data) for LoRA stages to adapt."""
    out = tmp_path_factory.mktemp("base")
    model, processor = build_fresh(recipe(data, out / "run"), read_samples(data))
    model.save_pretrained(out / "ckpt")
    processor.save_pretrained(out / "ckpt")
    return out / "ckpt"


def _delta(peft_model, name: str) -> torch.Tensor:
    layer = peft_model.base_model.model.get_submodule(name)
    return layer.get_delta_weight("default")


def test_only_adapters_and_modules_to_save_train_and_the_base_stays_bit_identical(data, base, tmp_path, caplog):
    r = recipe(data, tmp_path, "stage2.steps=3", "stage2.warmup_steps=0", LORA)
    with caplog.at_level("INFO", logger="unigen.training"):
        final = run_stage(r, 2, init_from=str(base), progress=False)
    table = caplog.text
    assert "llm" in table and "LoRA:" in table and "vision_encoder" in table
    assert [line for line in table.splitlines() if " vq " in line and "frozen" in line]
    before, after = weights(base), weights(final)
    adapted = load_adapter(UniGenModel.from_pretrained(base), tmp_path / "stage2" / "adapter")
    targets = {n.removesuffix(".base_layer.weight") for n, _ in adapted.base_model.model.named_parameters()
               if n.endswith(".base_layer.weight")}
    assert any(t.startswith("language_model.model.layers.") for t in targets)
    assert any(t.startswith("aligner.") for t in targets)
    assert not any(t.startswith("language_model.lm_head") for t in targets)  # llm = the blocks' projections
    changed_heads = 0
    for key, old in before.items():
        module = key.rsplit(".", 1)[0]
        if module in targets and key.endswith(".weight"):
            # merged = frozen base + B @ A * alpha / r, bit for bit: the base did not move in training
            delta = _delta(adapted, module)
            assert delta.abs().max() > 0, key
            assert torch.equal(after[key], old + delta), key
        elif key.startswith("gen_head."):  # modules_to_save: trained whole
            changed_heads += not torch.equal(after[key], old)
        else:
            assert torch.equal(after[key], old), key  # everything else frozen, bit-identical
    assert changed_heads == 4  # both linears' weights and biases
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3]


def _understanding_inputs(model):
    cfg = model.config
    t = cfg.tokens
    n = cfg.image_placeholders_per_image
    ids = torch.tensor([[t.bos, t.image_start] + [cfg.image_token_id] * n + [t.image_end, 20, 21, 22, 23]])
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(1))
    return ids, pixels


@torch.no_grad()
def _outputs(model, call):
    """Every path that reads a weight: prefill logits, one cached decode step, teacher-forced image logits."""
    inner = getattr(getattr(model, "base_model", None), "model", model)
    ids, pixels = _understanding_inputs(inner)
    prefill = call(input_ids=ids, pixel_values=pixels, use_cache=True)
    step = call(input_ids=torch.tensor([[30]]), past_key_values=prefill.past_key_values, use_cache=True)
    codes = torch.arange(inner.config.vq.codebook_size)[None, :70] % inner.config.vq.codebook_size
    prompt = torch.tensor([[inner.config.tokens.bos, 20, 21, inner.config.tokens.image_start]])
    return {"prefill": prefill.logits, "decode step": step.logits,
            "decode gen head": inner.gen_head(step.last_hidden_state),
            "image logits": inner.image_logits(prompt, codes)}


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_merged_model_equals_base_plus_adapter_in_every_forward_path(base, tmp_path, fusion, capsys):
    from unigen.cli import main

    start = tmp_path / "base"
    model = UniGenModel.from_pretrained(base, fusion=None if fusion == "concat" else fusion, cross_attention_every=1)
    if fusion == "cross_attention":
        with torch.no_grad():  # open the zero-initialised gates so the blocks matter
            for n, p in model.named_parameters():
                if n.endswith("_gate"):
                    p.fill_(0.5)
    model.save_pretrained(start)
    (start / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    for f in base.iterdir():
        if f.suffix == ".json" and f.name not in ("config.json", "model.safetensors.index.json"):
            (start / f.name).write_bytes(f.read_bytes())
    targets = ["llm", "lm_head"] + (["cross_attention"] if fusion == "cross_attention" else ["aligner"])
    torch.manual_seed(0)
    peft_model = attach(UniGenModel.from_pretrained(start), LoraSettings(r=4, targets=targets,
                                                                         modules_to_save=["gen_head"]), "lora")
    with torch.no_grad():  # trained-looking adapters (PEFT starts B at zero) and a changed copy of gen_head
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(peft_model, tmp_path / "adapter", str(start))
    merge = ["merge", str(start), str(tmp_path / "adapter"), str(tmp_path / "merged")]
    assert main(merge) == 0
    if fusion == "concat":  # earlier work is not replaced silently
        assert main(merge) == 1 and "is not empty: pass --overwrite to replace it" in capsys.readouterr().err

    plain = UniGenModel.from_pretrained(start)
    adapted = load_adapter(UniGenModel.from_pretrained(start), tmp_path / "adapter")
    merged = UniGenModel.from_pretrained(tmp_path / "merged")
    # the stock call, as the issue writes it: PEFT's own layers, applied because the model calls its linear layers
    stock = PeftModel.from_pretrained(UniGenModel.from_pretrained(start), str(tmp_path / "adapter"))
    ref, lora_out, merged_out, stock_out = (_outputs(m, m) for m in (plain, adapted, merged, stock))
    for path in ref:
        assert (lora_out[path] - ref[path]).abs().max() > 1e-3, f"the adapter does nothing in the {path}"
        assert torch.allclose(merged_out[path], lora_out[path], atol=1e-5, rtol=0), path
        assert torch.allclose(stock_out[path], lora_out[path], atol=1e-5, rtol=0), path


@pytest.mark.slow  # a killed and a resumed subprocess (~25 s); the full-model SIGKILL test runs by default
def test_sigkill_and_resume_in_a_lora_stage_gives_the_same_losses(data, base, tmp_path):
    common = [f"data={data}", "stage2.steps=20", "stage2.batch_size=4", LORA]
    run_stage(recipe(data, tmp_path / "a", *common), 2, init_from=str(base), progress=False)
    kill_in_checkpoint_15("--stage", 2, "--output-dir", tmp_path / "b", "--init-from", base, "--save-every", 5, *common,
                          ready=tmp_path / "in-ckpt-15")
    ckpt = tmp_path / "b" / "stage2" / "checkpoints" / "step_0000010"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "optimizer.pt", "progress.json",
                                                       "rng_0.pt"]  # the adapter, not the whole model
    # no init_from: the checkpoint's adapter/base.json names the base
    run_stage(recipe(data, tmp_path / "b", *common, "save_every=5"), 2, resume="latest", progress=False)
    a, b = losses(tmp_path / "a", stage=2), losses(tmp_path / "b", stage=2)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 21))
    assert a == b  # bitwise
    wa, wb = weights(tmp_path / "a" / "stage2" / "final"), weights(tmp_path / "b" / "stage2" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpointing_matches_and_bf16_runs_in_a_lora_stage(data, base, tmp_path):
    common = ["stage2.steps=3", "stage2.grad_accum=2", "stage2.batch_size=2", LORA]
    for name, extra in (("plain", []), ("ckpt", ["grad_checkpointing=true"]), ("bf16", ["bf16=true"])):
        run_stage(recipe(data, tmp_path / name, *common, *extra), 2, init_from=str(base), progress=False)
    plain, ckpt, bf16 = (losses(tmp_path / n, stage=2) for n in ("plain", "ckpt", "bf16"))
    assert [s for s, _ in plain] == [s for s, _ in ckpt] == [s for s, _ in bf16] == [1, 2, 3]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(plain, ckpt, strict=True)), (plain, ckpt)
    assert all(abs(x - y) < 0.05 * x for (_, x), (_, y) in zip(plain, bf16, strict=True)), (plain, bf16)


@pytest.mark.parametrize("layout", ["transformers", "official"])
def test_a_lora_stage_starts_from_transformers_and_official_checkpoints(data, tiny_hf_janus, tmp_path, layout):
    from unigen.testing import write_official_layout

    start = tiny_hf_janus[1]
    if layout == "official":
        start = tmp_path / "official"
        write_official_layout(UniGenModel.from_pretrained(tiny_hf_janus[1]), start)
    r = recipe(data, tmp_path / "run", "stage2.steps=2", "stage2.lora={r: 2, targets: [llm]}")
    final = run_stage(r, 2, init_from=str(start), progress=False)
    merged = UniGenModel.from_pretrained(final)
    adapted = load_adapter(UniGenModel.from_pretrained(start), tmp_path / "run" / "stage2" / "adapter")
    ids = torch.tensor([[1, 20, 21, 22, 23, 4]])
    assert torch.allclose(merged(ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert (merged(ids).logits - UniGenModel.from_pretrained(start)(ids).logits).abs().max() > 0


@pytest.mark.slow
def test_two_process_ddp_lora_equals_one_process(data, base, tmp_path):
    from test_train_resume import TORCHRUN

    common = ["--stage", "2", "--init-from", base, f"data={data}", "stage2.steps=4", LORA]
    run(cli(*common, "--output-dir", tmp_path / "one", "stage2.batch_size=8"))
    run(cli(*common, "--output-dir", tmp_path / "two", "stage2.batch_size=4", launcher=TORCHRUN))
    la, lb = losses(tmp_path / "one", stage=2), losses(tmp_path / "two", stage=2)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(la, lb, strict=True)), (la, lb)
    wa, wb = weights(tmp_path / "one" / "stage2" / "final"), weights(tmp_path / "two" / "stage2" / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.parametrize("override, message", [
    ("stage2.lora.targets=[llm, mlp_proj]", "stage2.lora.targets: unknown target 'mlp_proj': neither a parameter "
     "group (vision_encoder, aligner, gen_aligner, gen_head, llm, cross_attention) nor the name"),
    ("stage2.lora.targets=[cross_attention]", "stage2.lora.targets: the group 'cross_attention' has no linear layers "
     "in this model, so LoRA has nothing to adapt there"),
    ("stage2.lora.targets=[gen_embed]", "the group 'gen_embed' has no linear layers in this model"),
    ("stage2.lora.quantize=4bit", "stage2.lora.quantize=4bit: a quantized frozen base (QLoRA, bitsandbytes) runs on "
     "CUDA only and this run is on cpu; drop stage2.lora.quantize"),
    ("stage2.lora.modules_to_save=[llm]", "stage2.lora: 'language_model' is both trained whole (modules_to_save) "
     "and adapted (targets"),
])
def test_bad_lora_settings_are_named_before_anything_is_written(data, base, tmp_path, capsys, override, message):
    from unigen.cli import main

    code = main(["train", "--config", str(SMOKE), "--stage", "2", "--init-from", str(base),
                 f"data={data}", "--output-dir", str(tmp_path), "tensorboard=false", "stage2.lora.r=4", override,
                 "device=cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err
    assert message in " ".join(err.split()), err
    assert not (tmp_path / "stage2").exists()


@pytest.mark.parametrize("override, message", [
    ("stage2.lora.r=0", "stage2.lora.r must be a positive integer (the adapters' rank), got 0"),
    ("stage2.lora.r=-4", "stage2.lora.r must be a positive integer (the adapters' rank), got -4"),
    ("stage2.lora.rank=4", "unknown key(s) in stage2.lora: ['rank']"),
    ("stage2.lora.quantize=3bit", "stage2.lora.quantize must be one of ['4bit', '8bit'] or null, got '3bit'"),
    ("stage2.lora.targets=[]", "stage2.lora.targets is empty"),
])
def test_bad_lora_recipe_keys(data, tmp_path, override, message):
    with pytest.raises(ValueError) as err:
        recipe(data, tmp_path, override)
    assert message in str(err.value)


def test_a_lora_stage_needs_a_trained_start_and_merge_names_a_wrong_adapter(data, base, tmp_path, capsys):
    from unigen.cli import main

    with pytest.raises(ValueError, match="stage1.lora: LoRA adapts a trained model, but stage 1 would start from a "
                                         "new one; set init_from"):
        run_stage(recipe(data, tmp_path, "stage1.lora.r=4"), 1, progress=False)
    assert main(["merge", str(base), str(base), str(tmp_path / "out")]) == 1
    assert f"error: {base} is not a PEFT adapter (no adapter_config.json)" in capsys.readouterr().err
    from unigen.config import UniGenConfig
    from unigen.training import load_recipe

    other = load_recipe(SMOKE, ["data=x", "model.llm.intermediate_size=96"]).model
    save_adapter(attach(UniGenModel(UniGenConfig.from_dict(other)), LoraSettings(r=2), "lora"), tmp_path / "other",
                 "elsewhere")
    assert main(["merge", str(base), str(tmp_path / "other"), str(tmp_path / "out")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: {tmp_path / 'other'} was trained on a model of another shape (size mismatch for" in err
    assert "recorded in" in err and ": elsewhere)" in err and not (tmp_path / "out").exists()
