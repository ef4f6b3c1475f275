"""Named parameter groups, for trainers that freeze and unfreeze parts of the model per stage.

``GROUPS`` maps a group name to the top-level module that holds it. ``stage_groups`` applies the
fusion policy to a stage's list: with ``fusion: "cross_attention"`` (Method B) the cross-attention
blocks are trainable in every stage and the LLM stays frozen by default (Llama 3.2 Vision keeps its
text behaviour this way). ``train_llm`` overrides: ``True`` trains the LLM wherever the stage lists it
(also for Method B), ``False`` never trains it, ``None`` is the default just described.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

GROUPS: dict[str, str] = {
    "vision_encoder": "vision_model",  # SigLIP or the patch encoder (understanding)
    "aligner": "aligner",  # understanding features -> LLM width
    "vq": "gen_vision_model",  # VQ-16 image tokenizer (generation)
    "gen_embed": "gen_embed",
    "gen_aligner": "gen_aligner",
    "gen_head": "gen_head",
    "llm": "language_model",  # embeddings, decoder blocks, final norm, lm_head
    "cross_attention": "cross_attn_layers",  # Method B blocks (empty for Method A)
}


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of ``model`` in exactly one group, with its full name."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    owner = {module: group for group, module in GROUPS.items()}
    stray = []
    for name, param in model.named_parameters():
        group = owner.get(name.split(".", 1)[0])
        if group is None:
            stray.append(name)
        else:
            groups[group].append((name, param))
    if stray:
        raise ValueError(f"parameters outside every group (update unigen.models.param_groups.GROUPS): {stray[:10]}")
    return groups


def stage_groups(config, groups: Iterable[str], train_llm: bool | None = None) -> set[str]:
    """A stage's trainable groups after the fusion policy (see module docstring)."""
    chosen = set(groups)
    unknown = chosen - GROUPS.keys()
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; known: {sorted(GROUPS)}")
    if config.fusion == "cross_attention":
        chosen.add("cross_attention")
    if train_llm is False or (train_llm is None and config.fusion == "cross_attention"):
        chosen.discard("llm")
    return chosen


def set_trainable(model: nn.Module, groups: Iterable[str]) -> list[str]:
    """``requires_grad`` on exactly the parameters of ``groups``; returns the trainable names."""
    chosen = set(groups)
    names = []
    for group, params in parameter_groups(model).items():
        for name, param in params:
            param.requires_grad_(group in chosen)
            if group in chosen:
                names.append(name)
    return names
