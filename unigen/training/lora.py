"""LoRA adapters through PEFT over a whole ``UniGenModel``: the recipe section, the layers, saving and merging.

A stage with ``lora:`` trains low-rank adapters (``W + alpha/r * B @ A``) on the linear layers its ``targets``
name, plus whole copies of its ``modules_to_save``; every other weight stays frozen. The adapter is a plain
PEFT adapter over the whole model::

    from peft import PeftModel
    model = PeftModel.from_pretrained(UniGenModel.from_pretrained(BASE), ADAPTER)

(``lora.load_adapter(UniGenModel.from_pretrained(BASE), ADAPTER)`` is the same call, with a wrong folder or
a model of another shape named).

PEFT's stock LoRA layers serve every path: unigen's decoder, generation head and text head call their linear
layers through ``unigen.models.decoder.project``, the skinny CPU product for a plain ``nn.Linear`` and the layer's own
forward for anything else (a LoRA layer: ``W x + alpha/r * B (A dropout(x))``, no full-size adapted weight).

QLoRA (``quantize: 4bit`` or ``8bit``, CUDA + bitsandbytes): the adapted linear layers of the frozen base become
bitsandbytes layers (``quantize_targets``) before PEFT attaches its bitsandbytes LoRA layers over them; the stage's
merged ``final`` folds the adapters into the float base (``merge_saved``).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unigen.errors import CheckpointError, ConfigError
from unigen.models.model import UniGenModel
from unigen.models.moe import Experts
from unigen.models.param_groups import GROUPS, parameter_groups
from unigen.runs import load_state_file

ADAPTER = "default"  # PEFT's adapter name; one adapter per model
QUANTIZE = ("4bit", "8bit")


@dataclass
class LoraSettings:
    """A stage's ``lora:`` section (``stage2.lora.r=8`` overrides a key as for every recipe key)."""

    r: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input (PEFT's lora_dropout)
    targets: list[str] = field(default_factory=lambda: ["llm"])  # parameter groups or module-name patterns
    modules_to_save: list[str] = field(default_factory=list)  # groups or module names trained in full
    quantize: str | None = None  # QLoRA: "4bit" or "8bit" frozen base (CUDA + bitsandbytes)

    def validate(self, where: str) -> None:
        if isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"{where}.r must be a positive integer (the adapters' rank), got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"{where}.targets is empty: name parameter groups ({', '.join(linear_groups())}) "
                              "or module-name patterns to adapt")
        if "vq" in self.targets or "vq" in self.modules_to_save:
            raise ConfigError(f"{where}: the VQ tokenizer stays frozen (its codes are the generation targets)")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ConfigError(f"{where}.quantize must be one of {list(QUANTIZE)} or null, got {self.quantize!r}")


def linear_groups() -> list[str]:
    return [g for g in GROUPS if g not in ("vq", "gen_embed")]


def _linear_names(model: nn.Module, prefix: str = "") -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefix)]


def _group_linears(model: nn.Module, group: str) -> list[str]:
    """The linear layers LoRA adapts for a group. ``llm``: the decoder blocks' projections (PEFT's
    "all-linear" convention leaves the output layer out; name ``lm_head`` as a pattern to adapt it)."""
    top = GROUPS[group]
    if group == "llm":
        return _linear_names(model, f"{top}.model.")
    return _linear_names(model, f"{top}.")


def _expert_weights(model: nn.Module, entry: str) -> list[str]:
    """The routed experts' 3-D weights an entry names (``experts``, ``experts.down_proj``, a glob): their LoRA is
    PEFT's ``target_parameters`` (per expert ``A``/``B``, ``W + alpha/r * B @ A`` in place during the experts' call)."""
    names = [f"{name}.{weight}" for name, m in model.named_modules() if isinstance(m, Experts)
             for weight in ("gate_up_proj", "down_proj")]
    return [n for n in names if _matches(n, entry) or _matches(n.rpartition(".")[0], entry)]


def _matches(name: str, pattern: str) -> bool:
    """A full module name, its last part(s) (``qkv_proj``, ``self_attn.o_proj``) or a glob (``*.layers.1[0-5].*``)."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def resolve_targets(model: nn.Module, settings: LoraSettings, where: str) -> tuple[list[str], list[str]]:
    """(full names of the linear layers and MoE experts' 3-D weights to adapt, full names of the modules to train
    whole). Errors name the key."""
    linears = _linear_names(model)
    targets: list[str] = []
    for entry in settings.targets:
        if entry in GROUPS:
            found = _group_linears(model, entry)
            if not found:
                raise ConfigError(f"{where}.targets: the group {entry!r} has no linear layers in this model, so LoRA "
                                  f"has nothing to adapt there; groups with linear layers here: "
                                  f"{[g for g in linear_groups() if _group_linears(model, g)]}"
                                  + ("; train an embedding whole with modules_to_save" if entry == "gen_embed" else ""))
        else:
            experts = _expert_weights(model, entry)
            found = [n for n in linears if _matches(n, entry)] + experts
            if not found:
                raise ConfigError(f"{where}.targets: unknown target {entry!r}: neither a parameter group "
                                  f"({', '.join(linear_groups())}) nor the name (or last part of the name) of a linear "
                                  f"layer of this model, such as {linears[0]!r} or 'qkv_proj', nor a glob matching "
                                  "one (e.g. '*.layers.0.*')" + (", nor MoE experts ('experts', 'experts.down_proj')"
                                                                 if _expert_weights(model, "experts") else ""))
            if experts and settings.dropout:
                raise ConfigError(f"{where}.targets: {entry!r} names MoE routed experts, whose LoRA has no dropout "
                                  f"(PEFT's target_parameters); set {where}.dropout to 0 or leave the experts out")
        targets += [n for n in found if n not in targets]
    modules = dict(model.named_modules())
    saved: list[str] = []
    for entry in settings.modules_to_save:
        names = [GROUPS[entry]] if entry in GROUPS else [n for n in modules if n and _matches(n, entry)]
        names = [n for n in names if n in modules and any(True for _ in modules[n].parameters())]
        if not names:
            raise ConfigError(f"{where}.modules_to_save: {entry!r} is neither a parameter group with weights in this "
                              f"model ({sorted(GROUPS)}) nor the name of one of its modules")
        saved += [n for n in names if n not in saved]
    for s in saved:
        inside = [t for t in targets if t == s or t.startswith(s + ".")]
        if inside:
            raise ConfigError(f"{where}: {s!r} is both trained whole (modules_to_save) and adapted (targets, e.g. "
                              f"{inside[0]!r}); name it in one of the two")
    return targets, saved


def check_quantize(settings: LoraSettings, device: torch.device, where: str) -> None:
    """QLoRA needs CUDA and bitsandbytes; anything else is named before any work."""
    if settings.quantize is None:
        return
    if device.type != "cuda":
        raise ConfigError(f"{where}.quantize={settings.quantize}: a quantized frozen base (QLoRA, bitsandbytes) "
                          f"runs on CUDA only and this run is on {device.type}; drop {where}.quantize to train LoRA "
                          "on the float base")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"{where}.quantize={settings.quantize} needs bitsandbytes, which is not installed: "
                          f"pip install 'unigen[qlora]' (or bitsandbytes), or drop {where}.quantize") from err


def quantize_targets(model: nn.Module, settings: LoraSettings, where: str,
                     compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """QLoRA's frozen base: the linear layers LoRA will adapt become bitsandbytes layers holding the same float
    weights (``4bit``: NF4 ``Linear4bit``; ``8bit``: ``Linear8bitLt``), which quantize when the model moves to a
    CUDA device; PEFT then attaches its bitsandbytes LoRA layers over them. The decoder calls them through
    ``unigen.models.decoder.project``, i.e. their own forward. Returns the replaced layers' names."""
    import bitsandbytes as bnb

    targets, _ = resolve_targets(model, settings, where)
    modules = dict(model.named_modules())
    for name in targets:
        layer = modules.get(name)  # None: an MoE experts' 3-D weight, adapted on the float base
        if type(layer) is not nn.Linear:
            continue
        bias = layer.bias is not None
        data = layer.weight.data
        if settings.quantize == "4bit":
            quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, device="meta",
                                          compute_dtype=compute_dtype, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type="nf4", module=quantized)
        else:
            quantized = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, device="meta",
                                            has_fp16_weights=False, threshold=6.0)
            quantized.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
        if bias:
            quantized.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
    # transformers' flags for a quantized model: PEFT reads them to pick its bitsandbytes LoRA layers
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = settings.quantize == "4bit", settings.quantize == "8bit"
    return targets


# ---- attach, save, load, merge ----------------------------------------------------------------------------------


def peft_config(settings: LoraSettings, targets: list[str], modules_to_save: list[str], model: nn.Module):
    """PEFT's config: the named linear layers as ``target_modules``, the MoE experts' 3-D weights (names that are
    parameters, not modules) as ``target_parameters``."""
    from peft import LoraConfig

    modules = dict(model.named_modules())
    parameters = [t for t in targets if t not in modules]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=[t for t in targets if t in modules], target_parameters=parameters or None,
                      modules_to_save=modules_to_save or None, bias="none")


def adapter_config(adapter_dir: str | Path):
    """The saved adapter's ``LoraConfig``; a folder that is not an adapter is named."""
    from peft import LoraConfig

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter (no adapter_config.json); pass a stageN/adapter folder "
                              "written by a LoRA stage")
    return LoraConfig.from_pretrained(str(path))


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The adapter's saved weights (``adapter_model.safetensors``, else a weights-only ``adapter_model.bin``),
    checked at the door: a damaged file or a pickle that would run code is one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path} could not be read as safetensors ({_first_line(err)}); the adapter is "
                                  "truncated or damaged: train or copy it again") from err
    path = path.with_name("adapter_model.bin")
    if path.is_file():
        state = load_state_file(path)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a mapping of names to tensors; it is not an adapter's "
                                  "weights: train or copy the adapter again")
        return state
    raise CheckpointError(f"{adapter_dir} holds no adapter weights (adapter_model.safetensors); pass a stageN/adapter "
                          "folder written by a LoRA stage")


def check_adapter(adapter_dir: str | Path):
    """``adapter_config`` and ``read_adapter_weights``: a wrong or damaged adapter is named before any model
    loads. Returns the ``LoraConfig``."""
    config = adapter_config(adapter_dir)
    read_adapter_weights(adapter_dir)
    return config


def attach(model: nn.Module, settings: LoraSettings, where: str):
    """Adapters on ``model`` (in place; PEFT initialises B = 0, so the model computes what it did); returns the
    ``PeftModel`` around it. Only adapters and ``modules_to_save`` train afterwards."""
    from peft import get_peft_model

    targets, saved = resolve_targets(model, settings, where)
    return get_peft_model(model, peft_config(settings, targets, saved, model))


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """``PeftModel.from_pretrained(model, adapter_dir)``, with a wrong folder or a model of another shape named."""
    from peft import PeftModel

    config = check_adapter(adapter_dir)  # PEFT's own loader would unpickle a .bin and trace back on damage
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=trainable)
    except RuntimeError as err:  # load_state_dict's size mismatches
        raise CheckpointError(f"{adapter_dir} was trained on a model of another shape ({_first_line(err)}); pass the "
                              f"checkpoint it adapts (recorded in {Path(adapter_dir) / 'base.json'}: "
                              f"{read_base(Path(adapter_dir))})") from err


def _first_line(err: Exception) -> str:
    lines = [x.strip() for x in str(err).splitlines() if "size mismatch" in x] or str(err).splitlines()[:1]
    return lines[0][:300] if lines else type(err).__name__


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Put a saved adapter's weights into an attached adapter of the same settings (resuming)."""
    from peft import set_peft_model_state_dict

    state = read_adapter_weights(adapter_dir)
    result = set_peft_model_state_dict(peft_model, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise CheckpointError(f"{adapter_dir} does not match this stage's lora settings (missing {missing[:3]})")


def save_adapter(peft_model, directory: Path, base: str | None, state: dict | None = None) -> None:
    """The adapter (PEFT's files) plus ``base.json``: the checkpoint it adapts, for resuming and merging.
    ``state``: the trained parameters under PEFT's names, where the model's own are shards (FSDP)."""
    # save_embedding_layers: PEFT would otherwise store the whole (frozen) text head when lm_head is a target
    peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False,
                               state_dict=state)
    (Path(directory) / "base.json").write_text(json.dumps({"base": base}) + "\n")


def read_base(adapter_dir: Path) -> str | None:
    """The checkpoint an adapter was trained on, as ``save_adapter`` recorded it (None: not recorded)."""
    path = Path(adapter_dir) / "base.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["base"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged ({err}); resume from another checkpoint") from err


def merge(peft_model) -> nn.Module:
    """The plain model with the adapters folded into its weights (``W + alpha/r * B @ A``) and the trained copies
    of ``modules_to_save`` in their places."""
    return peft_model.merge_and_unload()


def merge_saved(base: str, adapter_dir: Path) -> nn.Module:
    """A saved adapter folded into a fresh float copy of its base: the merge where the training model cannot merge
    in place (FSDP shards; a QLoRA base is quantized, and the adapters are folded into its float weights)."""

    return merge(load_adapter(UniGenModel.from_pretrained(base), adapter_dir))


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """group -> (trainable parameters, all parameters)."""
    return {g: (sum(p.numel() for _, p in ps if p.requires_grad), sum(p.numel() for _, p in ps))
            for g, ps in parameter_groups(model).items()}


