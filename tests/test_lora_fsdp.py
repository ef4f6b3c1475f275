"""LoRA stages under FSDP2 (2 processes, gloo on CPU) and QLoRA (a quantized frozen base through bitsandbytes)."""

import pytest
import torch
from peft import PeftModel
from test_lora import LORA, base, data  # noqa: F401 (fixtures)
from test_train_resume import TORCHRUN
from train_common import SMOKE, cli, losses, metrics, recipe, run, weights

from unigen import UniGenModel
from unigen.training.lora import LoraSettings, quantize_targets


def _close(a, b, tol=1e-5):
    return max((a[k] - b[k]).abs().max().item() for k in a) < tol


@pytest.mark.slow
def test_two_process_fsdp_lora_equals_one_process_writes_adapter_and_final_and_resumes(data, base, tmp_path):  # noqa: F811
    common = ["--stage", "2", "--init-from", base, f"data={data}", "stage2.steps=4", LORA]
    run(cli(*common, "--output-dir", tmp_path / "one", "stage2.batch_size=8"))
    fsdp = [*common, "--output-dir", tmp_path / "two", "stage2.batch_size=4", "parallel=fsdp"]
    # cut short after 2 steps: checkpoint step 2 (adapter + full optimizer state from the shards), then resumed
    done = run(cli(*fsdp, "--max-steps", 2, launcher=TORCHRUN))
    assert "fsdp, 2 process(es)" in done.stderr and "LoRA:" in done.stderr
    ckpt = tmp_path / "two" / "stage2" / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "optimizer.pt", "progress.json", "rng_0.pt",
                                                       "rng_1.pt"]
    run(cli(*fsdp, "--resume", "latest", launcher=TORCHRUN))

    la, lb = losses(tmp_path / "one", stage=2), losses(tmp_path / "two", stage=2)
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3, 4]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(la, lb, strict=True)), (la, lb)
    one, two = tmp_path / "one" / "stage2", tmp_path / "two" / "stage2"
    wa, wb = weights(one / "final"), weights(two / "final")
    assert wa.keys() == wb.keys() and not any("lora_" in k or "base_layer" in k for k in wb)  # a plain checkpoint
    assert _close(wa, wb)
    head = "gen_head.output_mlp_projector.weight"
    assert not torch.equal(wb[head], weights(base)[head])  # modules_to_save trained
    # the adapter gathered from the shards: the same tensors as one process's, and the stock PEFT call rebuilds
    # the merged model from it
    from safetensors.torch import load_file

    aa, ab = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two))
    assert aa.keys() == ab.keys() and any("lora_A" in k for k in ab) and _close(aa, ab)
    stock = PeftModel.from_pretrained(UniGenModel.from_pretrained(base), str(two / "adapter"))
    ids = torch.tensor([[1, 20, 21, 22, 23, 4]])
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=ids).logits, UniGenModel.from_pretrained(two / "final")(ids).logits,
                              atol=1e-5, rtol=0)


def test_deepspeed_and_multi_process_qlora_are_refused_naming_the_key():
    from unigen.errors import ConfigError
    from unigen.training.loop import check_lora_run

    with pytest.raises(ConfigError, match="stage2.lora: a LoRA stage trains on one process, with DDP .torchrun. or "
                                          "with FSDP .* not with DeepSpeed"):
        check_lora_run(LoraSettings(), torch.device("cpu"), "deepspeed", 2, 2)
    with pytest.raises(ConfigError) as err:
        check_lora_run(LoraSettings(quantize="4bit"), torch.device("cpu"), "fsdp", 2, 2)
    assert str(err.value) == ("stage2.lora.quantize=4bit: a quantized base (QLoRA) trains on one GPU, one process; "
                              "this run has 2 (fsdp). Drop stage2.lora.quantize to train LoRA over the float base with "
                              "several processes")
    check_lora_run(LoraSettings(), torch.device("cpu"), "fsdp", 2, 2)  # FSDP trains adapters


def test_qlora_without_bitsandbytes_is_named(monkeypatch):
    import sys

    from unigen.errors import ConfigError
    from unigen.training.lora import check_quantize

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ConfigError) as err:
        check_quantize(LoraSettings(quantize="8bit"), torch.device("cuda"), "stage3.lora")
    assert str(err.value) == ("stage3.lora.quantize=8bit needs bitsandbytes, which is not installed: pip install "
                              "'unigen[qlora]' (or bitsandbytes), or drop stage3.lora.quantize")
    with pytest.raises(ConfigError) as err:  # the device is named first: no package helps on a CPU
        check_quantize(LoraSettings(quantize="4bit"), torch.device("cpu"), "stage3.lora")
    assert str(err.value) == ("stage3.lora.quantize=4bit: a quantized frozen base (QLoRA, bitsandbytes) runs on CUDA "
                              "only and this run is on cpu; drop stage3.lora.quantize to train LoRA on the float base")


# ---- QLoRA: the layer replacement here; the quantized training run needs a GPU -----------------------------------

def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


bnb = _bitsandbytes()
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (pip install 'unigen[qlora]')")


def _tiny_model():
    from unigen.config import UniGenConfig
    from unigen.training import load_recipe

    torch.manual_seed(0)
    return UniGenModel(UniGenConfig.from_dict(load_recipe(SMOKE, ["data=x"]).model))


@needs_bnb
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantize_targets_swaps_only_the_adapted_linears_for_bitsandbytes_layers(mode):
    from peft.tuners.lora import bnb as peft_bnb

    from unigen.training.lora import attach

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LoraSettings(r=2, targets=["llm"], quantize=mode)
    names = quantize_targets(model, settings, "stage2.lora", torch.bfloat16)
    layer_type, param_type = ((bnb.nn.Linear4bit, bnb.nn.Params4bit) if mode == "4bit"
                              else (bnb.nn.Linear8bitLt, bnb.nn.Int8Params))
    assert names and all(n.startswith("language_model.model.layers.") for n in names)
    for name, module in model.named_modules():
        if name in names:
            assert type(module) is layer_type and type(module.weight) is param_type, name
            # the float weights are held as they were; they become 4/8-bit when the model moves to a CUDA device
            assert not module.weight.requires_grad and torch.equal(module.weight.data, before[f"{name}.weight"])
            if module.bias is not None:
                assert torch.equal(module.bias, before[f"{name}.bias"])
        elif isinstance(module, torch.nn.Linear):
            assert type(module) is torch.nn.Linear, name  # aligners, heads, lm_head: untouched
    assert type(model.get_submodule(names[0])).__name__ == ("Linear4bit" if mode == "4bit" else "Linear8bitLt")
    if mode == "4bit":
        assert model.get_submodule(names[0]).compute_dtype == torch.bfloat16
    # PEFT attaches its bitsandbytes LoRA layers over them; only the adapters train
    peft_model = attach(model, settings, "stage2.lora")
    adapted = [m for m in peft_model.modules() if isinstance(m, (peft_bnb.Linear4bit, peft_bnb.Linear8bitLt))]
    assert len(adapted) == len(names)
    assert {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad} == set(names)


@pytest.mark.skipif(not torch.cuda.is_available() or bnb is None, reason="QLoRA runs on CUDA with bitsandbytes")
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_stage_trains_only_the_adapters_over_a_quantized_base_on_cuda(data, base, tmp_path, mode):  # noqa: F811
    from unigen.training import run_stage
    from unigen.training.lora import load_adapter

    r = recipe(data, tmp_path, "device=cuda", "stage2.steps=4", "stage2.warmup_steps=0", "stage2.lr=1e-3",
               f"stage2.lora={{r: 4, alpha: 8, targets: [llm], quantize: {mode}}}")
    final = run_stage(r, 2, init_from=str(base), progress=False)
    rows = [row["loss"] for row in metrics(tmp_path) if row["stage"] == 2]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(rows)))
    # the final folds the adapters into the float base: frozen weights bit-identical, adapted ones = W + delta
    before, after = weights(base), weights(final)
    adapted = load_adapter(UniGenModel.from_pretrained(base), tmp_path / "stage2" / "adapter")
    targets = {n.removesuffix(".base_layer.weight") for n, _ in adapted.named_parameters()
               if n.endswith(".base_layer.weight")}
    targets = {t.removeprefix("base_model.model.") for t in targets}
    assert targets and all(t.startswith("language_model.model.layers.") for t in targets)
    moved = 0
    for key, old in before.items():
        module = key.rsplit(".", 1)[0]
        if module in targets and key.endswith(".weight"):
            delta = adapted.base_model.model.get_submodule(module).get_delta_weight("default")
            assert torch.equal(after[key], old + delta), key
            moved += bool(delta.abs().max() > 0)
        else:
            assert torch.equal(after[key], old), key
    assert moved == len(targets)
