"""Named model sizes (litgpt's ``Config.from_name``): a recipe names one instead of pasting its numbers.

A YAML section that holds ``preset: NAME`` gets that preset's values, then its own keys over them::

    model: {preset: shapes, vision: {stem: patch}}       # a training recipe (train/*.yaml): the whole model
    vq: {preset: shapes}                                 # a tokenizer recipe (tokenizers/*.yaml): that part only

so a visual tokenizer and the unified model that loads it are the same size by construction. ``key=value``
overrides apply after the preset (``model.llm.num_layers=2``), and ``model.preset=smoke`` picks another one.
Only sizes live here; sampling defaults (guidance scale, temperature) stay in the recipes that trained them.
"""

from __future__ import annotations

import copy
from typing import Any

from unigen.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # The Shapes world (64x64 flat-colour shapes, docs/shapes-world.md): a small unified model trained from
    # scratch on 2 CPU cores (`make demo`).
    "shapes": {
        "vision": {
            "image_size": 64,
            "patch_size": 16,  # 4x4 = 16 image tokens in the LLM: understanding rows 2.5x shorter than at 8
            "width": 128,
            "depth": 4,
            "num_heads": 4,
            # 3x3 convs instead of the patch embedding: a patch embedding must learn each edge once per offset
            "stem": "conv",
        },
        "vq": {  # 3 downsamples -> 8x8 = 64 codes per image
            "image_size": 64,
            "base_channels": 16,  # 32 is no better on flat-colour shapes and 2x slower
            # shallower stacks reconstruct better per second but spread images over more codes, which the
            # generator must then predict (docs/EXPERIMENTS.md)
            "channel_mult": [1, 2, 2, 4],
            "num_res_blocks": 1,
            "z_channels": 64,
            "embed_dim": 8,
            "codebook_size": 512,
            "norm_groups": 4,  # 32 groups learn flat colours far more slowly
            "local_encoder": True,  # a code sees only its neighbourhood: the empty background gets a few regular codes
        },
        "llm": {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 688, "num_layers": 4, "num_heads": 4,
                "num_kv_heads": 4, "max_position_embeddings": 512},
        "gen_head_dim": 256,
    },
    # A tiny model that trains on any manifest in well under a minute: tests and install checks (train/smoke.yaml).
    "smoke": {
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
        "vq": {"image_size": 32, "codebook_size": 64, "embed_dim": 8, "base_channels": 32, "channel_mult": [1, 1, 2],
               "num_res_blocks": 1, "z_channels": 32},
        "llm": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
                "num_kv_heads": 4, "max_position_embeddings": 512},
        "gen_head_dim": 64,
    },
}
WHOLE_MODEL = "model"  # the section name that takes a whole preset; any other takes the preset's part of that name


def preset(name: str, section: str = WHOLE_MODEL, where: str = "preset") -> dict[str, Any]:
    """A fresh copy of preset ``name`` (``section="model"``) or of its part ``section`` (``vq``, ``vision``, ...)."""
    if name not in PRESETS:
        raise ConfigError(f"{where}: unknown model preset {name!r}; known: {sorted(PRESETS)}")
    values = PRESETS[name] if section == WHOLE_MODEL else PRESETS[name].get(section)
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: preset {name!r} has no {section!r} part; name it in a model: section or in one "
                          f"of {sorted(k for k, v in PRESETS[name].items() if isinstance(v, dict))}")
    return copy.deepcopy(values)
