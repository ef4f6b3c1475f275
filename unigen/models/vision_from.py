"""``siglip_from=``: a pretrained SigLIP / ViT image encoder as ``UniGenModel.vision_model``.

A source is a local folder or a hub id (fetched as checkpoints are). Its ``config.json`` says which layout it is:

  * ``unigen-siglip``  the output of ``unigen train-siglip`` (its image tower)
  * ``unified``        a unigen, transformers Janus or DeepSeek Janus checkpoint (its ``vision_model``)
  * ``timm``           a timm ViT without class token saved by timm (``save_for_hf``, the hub's ``timm/*``
                       folders: ``config.json`` with ``architecture``), e.g. ``vit_large_patch16_siglip_384``
  * ``siglip``         transformers ``SiglipVisionModel`` / ``SiglipModel`` (its vision tower)
  * ``siglip2``        transformers ``Siglip2VisionModel`` / ``Siglip2Model``, read as a fixed-size encoder: its
                       square grid of position embeddings at their own size, one square image size

Sizes come from the source; the recipe's ``vision.select_layer`` picks the block whose output (after the final
LayerNorm, as Janus) is the feature. The helpers here that name the part in every error serve ``vq_from`` too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from unigen.config import SigLIPConfig
from unigen.config_io import build_config
from unigen.errors import CheckpointError, UniGenError
from unigen.models.checkpoint import (
    _load_safetensors,
    load_state,
    read_checkpoint,
    resolve_checkpoint_dir,
)
from unigen.models.model import SigLIPEncoder

# ---- shared by siglip_from and vq_from -----------------------------------------------------------


@contextmanager
def naming_the_part(key: str, source) -> Iterator[None]:
    """Every error raised while a part loads starts with the recipe key that named it (``siglip_from=PATH: ...``),
    so that a run built from three sources says which one was wrong."""
    try:
        yield
    except UniGenError as err:
        raise type(err)(f"{key}={source}: {err}") from err


def read_config_json(directory: Path, layouts: str) -> dict:
    """``config.json`` of a source folder as a dict; a folder without one is named with the layouts read."""
    path = directory / "config.json"
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:20]
        raise CheckpointError(f"{directory} has no config.json, so it is none of the layouts read here "
                              f"({layouts}). Found: {found or 'an empty directory'}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object of config keys")
    return raw


def is_unified_checkpoint(raw: dict) -> bool:
    return raw.get("model_type") in ("unigen", "janus") or {"language_config", "vision_config",
                                                             "gen_vision_config"} <= raw.keys()


def read_unified_part(directory: Path, prefix: str):
    """(the whole checkpoint's config, the weights under ``prefix`` without it): the Janus key mapping is
    ``checkpoint.read_checkpoint``'s, so a Janus part loads here exactly as in a whole model."""
    config, state = read_checkpoint(directory)
    return config, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def require_weights(directory: Path, names: tuple[str, ...]) -> None:
    if not any((directory / n).is_file() for n in names):
        found = sorted(p.name for p in directory.iterdir())[:20]
        raise CheckpointError(f"{directory} has a config.json but no weights: expected one of {list(names)}. "
                              f"Found: {found}")


def one_line(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:400]


# ---- siglip_from ---------------------------------------------------------------------------------

SIGLIP_LAYOUTS = ("unigen train-siglip output (model_type 'unigen-siglip'); a unigen, transformers Janus or "
                  "DeepSeek Janus checkpoint; a timm ViT saved by timm (config.json with 'architecture'); "
                  "transformers SiglipVisionModel / SiglipModel (model_type 'siglip_vision_model' / 'siglip'); "
                  "transformers Siglip2VisionModel / Siglip2Model ('siglip2_vision_model' / 'siglip2')")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")

# transformers' SigLIP / Siglip2 vision-tower names -> timm's (``SigLIPEncoder.vision_tower``), first match wins;
# q|k|v are fused afterwards into timm's qkv. The MAP head (``head.*``) is unused, as in Janus.
TRANSFORMERS_TO_TIMM: list[tuple[str, str]] = [
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"blocks.\1.attn.\2_proj."),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"post_layernorm\.", "norm."),
]
UNUSED_ENCODER_KEYS = re.compile(r"^(head\.|attn_pool\.|fc_norm\.|embeddings\.position_ids$)")
# transformers' hidden_act -> SigLIPConfig.mlp_act ("gelu_new" is the tanh formula written out)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def load_siglip_from(source: str | Path, config: SigLIPConfig) -> tuple[SigLIPEncoder, SigLIPConfig]:
    """The encoder of ``source`` with its weights (fp32), and the config that describes it: the source's sizes
    with ``config.select_layer`` and ``config.tiles`` (the recipe's) applied; the other fields of ``config`` are
    not used."""
    with naming_the_part("siglip_from", source):
        directory = resolve_checkpoint_dir(source)
        raw = read_config_json(directory, SIGLIP_LAYOUTS)
        found, state = _siglip_reader(directory, raw)(directory, raw)
        found = dataclasses.replace(found, depth=found.kept_depth, select_layer=-1)  # what the weights hold
        cfg = dataclasses.replace(found, select_layer=config.select_layer, tiles=config.tiles)
        kept = {k: v for k, v in state.items() if _block_index(k) < cfg.kept_depth}
        with torch.device("meta"):
            encoder = SigLIPEncoder(cfg)
        load_state(encoder, kept, torch.float32, directory)
    return encoder, cfg


def _block_index(key: str) -> int:
    match = re.match(r"vision_tower\.blocks\.(\d+)\.", key)
    return int(match.group(1)) if match else -1


def _siglip_reader(directory: Path, raw: dict) -> Callable[[Path, dict], tuple[SigLIPConfig, dict]]:
    model_type = raw.get("model_type")
    if model_type == "unigen-siglip":
        return _read_unigen_siglip
    if is_unified_checkpoint(raw):
        return _read_unified_encoder
    if "architecture" in raw:
        return _read_timm
    if model_type in ("siglip_vision_model", "siglip", "siglip2_vision_model", "siglip2"):
        return _read_transformers
    raise CheckpointError(f"{directory / 'config.json'} (model_type={model_type!r}) is no encoder layout "
                          f"siglip_from reads; supported: {SIGLIP_LAYOUTS}")


def _read_unigen_siglip(directory: Path, raw: dict) -> tuple[SigLIPConfig, dict]:
    cfg = build_config(SigLIPConfig, raw.get("vision", {}), f"{directory / 'config.json'} vision")
    require_weights(directory, ("model.safetensors",))
    state = _load_safetensors(directory / "model.safetensors")
    return cfg, {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}


def _read_unified_encoder(directory: Path, raw: dict) -> tuple[SigLIPConfig, dict]:
    config, state = read_unified_part(directory, "vision_model.")
    if config.encoder != "siglip":
        raise CheckpointError(f"{directory}'s understanding encoder is {config.encoder!r}, not a SigLIP ViT")
    return config.vision, state


def _read_timm(directory: Path, raw: dict) -> tuple[SigLIPConfig, dict]:
    """Built and loaded by timm itself (``local-dir:``), then read off the module."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    require_weights(directory, ("model.safetensors", "pytorch_model.bin"))
    try:
        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    except Exception as err:  # noqa: BLE001 - timm raises RuntimeError / KeyError / ValueError for a bad folder
        raise CheckpointError(f"timm could not build {raw['architecture']!r} from {directory} "
                              f"({one_line(err)})") from err
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"timm architecture {raw['architecture']!r} is a {type(model).__name__}; siglip_from "
                              "reads timm VisionTransformers (SigLIP's shape)")
    if model.num_prefix_tokens:
        raise CheckpointError(f"timm architecture {raw['architecture']!r} has {model.num_prefix_tokens} class / "
                              "register token(s); unigen's encoder, like SigLIP, has none")
    if not isinstance(model.norm, nn.LayerNorm):  # e.g. global_pool="avg": the norm comes after the pool (fc_norm)
        raise CheckpointError(f"timm model {raw['architecture']!r} has no LayerNorm after its last block "
                              f"({type(model.norm).__name__}); unigen's encoder, like SigLIP, ends with one")
    (size, size_w), (patch, patch_w) = model.patch_embed.img_size, model.patch_embed.patch_size
    if size != size_w or patch != patch_w:
        raise CheckpointError(f"timm model {raw['architecture']!r} reads {size}x{size_w} images in {patch}x{patch_w} "
                              "patches; unigen's encoder reads square images in square patches")
    block = model.blocks[0]
    cfg = SigLIPConfig(image_size=size, patch_size=patch, width=model.embed_dim, depth=len(model.blocks),
                       num_heads=block.attn.num_heads, layer_norm_eps=model.norm.eps,
                       mlp_ratio=_mlp_ratio(model.embed_dim, block.mlp.fc1.out_features),
                       mlp_act=_timm_activation(block.mlp.act, raw["architecture"]))
    state = {f"vision_tower.{k}": v for k, v in model.state_dict().items() if not UNUSED_ENCODER_KEYS.match(k)}
    return cfg, state


def _timm_activation(act: nn.Module, arch: str) -> str:
    name, approximate = type(act).__name__, getattr(act, "approximate", "none")
    if name == "GELU":  # torch's and timm's
        return "gelu" if approximate == "none" else "gelu_tanh"
    if name == "GELUTanh":
        return "gelu_tanh"
    raise CheckpointError(f"timm model {arch!r} uses the MLP activation {name}; unigen's encoder has exact or tanh "
                          "GELU")


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio that timm's ``int(width * mlp_ratio)`` turns back into ``hidden`` (4304 / 1152 alone gives 4303)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _read_transformers(directory: Path, raw: dict) -> tuple[SigLIPConfig, dict]:
    """Built and loaded by transformers' own ``from_pretrained`` (a full SiglipModel gives its vision tower)."""
    from transformers import Siglip2VisionModel, SiglipVisionModel

    siglip2 = raw["model_type"].startswith("siglip2")
    require_weights(directory, HF_WEIGHTS)
    try:
        model = (Siglip2VisionModel if siglip2 else SiglipVisionModel).from_pretrained(str(directory))
    except Exception as err:  # noqa: BLE001 - transformers raises OSError / ValueError / RuntimeError
        raise CheckpointError(f"transformers could not load {directory} ({one_line(err)})") from err
    c = model.config
    act = HF_ACTIVATIONS.get(c.hidden_act)
    if act is None:
        raise CheckpointError(f"{directory} uses hidden_act={c.hidden_act!r}; unigen's encoder has "
                              f"{sorted(HF_ACTIVATIONS)}")
    grid = math.isqrt(c.num_patches) if siglip2 else c.image_size // c.patch_size
    if siglip2 and grid * grid != c.num_patches:
        raise CheckpointError(f"{directory} has {c.num_patches} position embeddings, not a square grid; unigen reads "
                              "Siglip2 as a fixed-size encoder (one square grid, no native-resolution patching)")
    cfg = SigLIPConfig(image_size=grid * c.patch_size, patch_size=c.patch_size, width=c.hidden_size,
                       depth=c.num_hidden_layers, num_heads=c.num_attention_heads, layer_norm_eps=c.layer_norm_eps,
                       mlp_ratio=_mlp_ratio(c.hidden_size, c.intermediate_size), mlp_act=act)
    tower = getattr(model, "vision_model", model)  # transformers 5 dropped the inner vision_model module
    state = timm_names_from_transformers(tower.state_dict(), c.patch_size)
    return cfg, {f"vision_tower.{k}": v for k, v in state.items()}


def timm_names_from_transformers(state: dict[str, torch.Tensor], patch_size: int) -> dict[str, torch.Tensor]:
    """A transformers SigLIP / Siglip2 vision tower's weights under timm's names (``TRANSFORMERS_TO_TIMM``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if UNUSED_ENCODER_KEYS.match(key):
            continue
        pattern, repl = next(((p, r) for p, r in TRANSFORMERS_TO_TIMM if re.match(p, key)), (None, None))
        if pattern is None:
            raise CheckpointError(f"the vision tower has a weight with no place in unigen's encoder: {key}")
        out[re.sub("^" + pattern, repl, key)] = value
    for key in [k for k in out if ".attn.q_proj." in k]:
        out[key.replace(".q_proj.", ".qkv.")] = torch.cat([out.pop(key.replace(".q_proj.", f".{x}_proj."))
                                                           for x in "qkv"])
    out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    weight = out["patch_embed.proj.weight"]
    if weight.ndim == 2:  # Siglip2: a Linear over patches flattened as (row, column, channel), as its processor does
        out["patch_embed.proj.weight"] = weight.view(weight.shape[0], patch_size, patch_size, -1).permute(0, 3, 1, 2)
    return out
