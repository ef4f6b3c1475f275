"""Reading and writing checkpoints. All checkpoint-name mapping lives in this file.

Three layouts load:
  * ``unigen``       our own: config.json (``"model_type": "unigen"``) + safetensors (sharded with an index)
  * ``transformers`` ``JanusForConditionalGeneration.save_pretrained`` (deepseek-community/Janus-Pro-*)
  * ``official``     DeepSeek's ``multi_modality`` layout (deepseek-ai/Janus-1.3B, Janus-Pro-1B/7B)

Our module tree uses the official key names, so only the transformers layout is renamed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from unigen.config import SPECIAL_TOKEN_TEXT, LLMConfig, SigLIPConfig, TokenIds, UniGenConfig, VQConfig
from unigen.errors import CheckpointError, CheckpointNotFoundError
from unigen.models.lazy_weights import (
    LazyTensor,
    bin_tensors,
    cat,
    copy_of,
    materialize,
    safetensors_tensors,
    unsqueeze0,
)
from unigen.runs import atomic_write, write_json

# ---- locating files ----------------------------------------------------------------------

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "tokenizer*"]


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id fetched (or found in the cache) by huggingface_hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that contains config.json")
    text = str(path_or_hub_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist (and is not a hub id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=WEIGHT_PATTERNS))
    except Exception as err:  # offline, unknown repo, no cache: all end here with the reason
        raise CheckpointNotFoundError(
            f"{text!r} is not a local directory and could not be fetched from the hub ({type(err).__name__}: "
            f"{err}). Download it first or pass a local directory."
        ) from err


def detect_layout(directory: Path) -> str:
    config_path = directory / "config.json"
    if config_path.is_symlink() and not config_path.exists():
        raise CheckpointError(f"{config_path} is a symbolic link that leads nowhere (or to itself): "
                              f"{os.readlink(config_path)!r}; replace it with the config file")
    if config_path.exists() and not config_path.is_file():
        raise CheckpointError(f"{config_path} is not a file; the checkpoint's config.json must be a JSON file")
    if not config_path.is_file():
        found = sorted(p.name for p in directory.iterdir())[:20]
        raise CheckpointError(
            f"{directory} has no config.json, so it is none of the known layouts (unigen, transformers "
            f"Janus, DeepSeek official). Found: {found or 'an empty directory'}"
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(raw).__name__}, not an object of config keys; "
                              "it is not a model config")
    model_type = raw.get("model_type")
    if model_type == "unigen":
        return "unigen"
    if model_type == "janus":
        return "transformers"
    if {"language_config", "vision_config", "gen_vision_config"} <= raw.keys():
        return "official"
    raise CheckpointError(
        f"{config_path} has model_type={model_type!r} and keys {sorted(raw)[:12]}; expected a unigen config "
        "(model_type 'unigen'), a transformers Janus config (model_type 'janus') or DeepSeek's official "
        "config (language_config / vision_config / gen_vision_config sections)"
    )


def read_state_dict(directory: Path, lazy: bool = False) -> dict[str, torch.Tensor | LazyTensor]:
    """Weights from safetensors (single or sharded) or pickled .bin (only with weights_only=True); ``lazy``: as
    ``LazyTensor``s, read when materialized (``unigen.models.lazy_weights``)."""
    state = _lazy_state_dict(directory)
    return state if lazy else {k: materialize(v) for k, v in state.items()}


def _lazy_state_dict(directory: Path) -> dict[str, LazyTensor]:
    for index_name, loader in (("model.safetensors.index.json", safetensors_tensors),
                               ("pytorch_model.bin.index.json", bin_tensors)):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index} is not a valid shard index (a JSON object with a weight_map of "
                                      f"key -> file name): {type(err).__name__}: {err}") from err
            inside = directory.resolve()
            outside = [s for s in shards if not isinstance(s, str) or Path(s).is_absolute()
                       or not (directory / s).resolve().is_relative_to(inside)]
            if outside:
                raise CheckpointError(f"{index} names shard file(s) outside the checkpoint folder: {outside[:5]}; "
                                      "unigen reads weights only from inside it")
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard file(s) that are missing: {missing}")
            state: dict[str, LazyTensor] = {}
            for shard in shards:
                state.update(loader(directory / shard))
            return state
    for name, loader in (("model.safetensors", safetensors_tensors), ("pytorch_model.bin", bin_tensors)):
        if (directory / name).is_file():
            return loader(directory / name)
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(
        f"{directory} has a config.json but no weights: expected model.safetensors, pytorch_model.bin or a "
        f"sharded index (*.index.json). Found: {found}"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, read."""
    return {k: v.materialize() for k, v in safetensors_tensors(path).items()}


# ---- configs -------------------------------------------------------------------------------

# DeepSeek's named SigLIP presets (janus/models/siglip_vit.py)
SIGLIP_PRESETS = {
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, depth=24, num_heads=16,
                                     mlp_ratio=4.0),
    "siglip_so400m_patch14_384": dict(image_size=384, patch_size=14, width=1152, depth=27, num_heads=16,
                                      mlp_ratio=3.7362),
}
# Unigen extension: these extra keys in an official config's params describe small test models
OFFICIAL_VISION_EXTRA = {"width", "depth", "num_heads", "patch_size", "mlp_ratio"}
OFFICIAL_VQ_EXTRA = {"base_channels", "channel_mult", "z_channels", "num_res_blocks", "image_size"}


def _llm_config(text: dict) -> LLMConfig:
    from transformers import LlamaConfig

    # Janus-Pro-7B's language_config names only the layer count: the width comes from LlamaConfig
    # defaults (4096 / 11008 / 32 heads), so build through LlamaConfig to get exactly those.
    known = {k: v for k, v in text.items() if k not in ("architectures", "_name_or_path")}
    c = LlamaConfig(**known)
    if c.rope_parameters.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope scaling {c.rope_parameters} is not supported")
    return LLMConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(c.rope_parameters["rope_theta"]),
    )


def config_from_transformers(raw: dict) -> UniGenConfig:
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    llm = _llm_config(raw.get("text_config") or {})
    v = JanusVisionConfig(**(raw.get("vision_config") or {}))
    q = JanusVQVAEConfig(**(raw.get("vq_config") or {}))
    if v.use_qk_norm:
        raise CheckpointError("vision_config.use_qk_norm=true is not part of Janus's SigLIP; not supported")
    for name, value in (("vision_config.projection_dim", v.projection_dim),
                        ("vq_config.projection_dim", q.projection_dim),
                        ("vq_config.image_token_embed_dim", q.image_token_embed_dim)):
        if value != llm.hidden_size:
            raise CheckpointError(f"{name}={value} must equal text_config.hidden_size={llm.hidden_size}")
    grid = v.image_size // v.patch_size  # transformers ties the VQ grid to the SigLIP grid
    mult = tuple(q.channel_multiplier)
    return UniGenConfig(
        vision=SigLIPConfig(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                            depth=v.num_hidden_layers, num_heads=v.num_attention_heads,
                            mlp_ratio=float(v.mlp_ratio), layer_norm_eps=v.layer_norm_eps),
        vq=VQConfig(codebook_size=q.num_embeddings, embed_dim=q.embed_dim, base_channels=q.base_channels,
                    channel_mult=mult, num_res_blocks=q.num_res_blocks, z_channels=q.latent_channels,
                    image_size=grid * 2 ** (len(mult) - 1)),
        llm=llm,
        aligner_depth=v.depth,
        gen_aligner_depth=q.num_hidden_layers,
        gen_head_dim=q.projection_dim,
        tokens=TokenIds(image=raw.get("image_token_id", TokenIds.image)),
    )


def config_from_official(raw: dict) -> UniGenConfig:
    llm = _llm_config(raw["language_config"])
    vp = dict(raw["vision_config"].get("params", {}))
    name = vp.get("model_name", "siglip_large_patch16_384")
    if name not in SIGLIP_PRESETS:
        raise CheckpointError(f"unknown SigLIP model_name {name!r}; known: {sorted(SIGLIP_PRESETS)}")
    if vp.get("pixel_mean") or vp.get("pixel_std"):
        raise CheckpointError("vision params pixel_mean/pixel_std (in-tower normalisation) are not supported")
    vision = dict(SIGLIP_PRESETS[name])
    vision.update({k: vp[k] for k in OFFICIAL_VISION_EXTRA | {"image_size"} if k in vp})
    select = vp.get("select_layer", -1)  # official create_siglip_vit builds only the selected blocks
    vision["depth"] = min(vision["depth"], vision["depth"] + select + 1 if select <= 0 else select)

    gp = raw["gen_vision_config"].get("params", {})
    if raw["gen_vision_config"].get("cls", "VQ-16") != "VQ-16":
        raise CheckpointError(f"gen_vision_config.cls {raw['gen_vision_config'].get('cls')!r}: only VQ-16")
    vq = {k: gp[k] for k in OFFICIAL_VQ_EXTRA if k in gp}
    vq = VQConfig(codebook_size=gp.get("image_token_size", 16384), embed_dim=gp.get("n_embed", 8), **vq)

    aligner = raw["aligner_config"]["params"]
    gen_aligner = raw["gen_aligner_config"]["params"]
    head = raw["gen_head_config"]["params"]
    for where, got, want in (("aligner_config.params.n_embed", aligner.get("n_embed"), llm.hidden_size),
                             ("gen_aligner_config.params.n_embed", gen_aligner.get("n_embed"), llm.hidden_size),
                             ("gen_head_config.params.n_embed", head.get("n_embed"), llm.hidden_size),
                             ("gen_head_config.params.image_token_size", head.get("image_token_size"),
                              vq.codebook_size)):
        if got is not None and got != want:
            raise CheckpointError(f"{where}={got} disagrees with the model ({want})")
    return UniGenConfig(
        vision=SigLIPConfig(**vision), vq=vq, llm=llm,
        aligner_depth=aligner.get("depth", 2), gen_aligner_depth=gen_aligner.get("depth", 2),
        gen_head_dim=head.get("image_token_embed", llm.hidden_size),
    )


# ---- key names -------------------------------------------------------------------------------

# transformers Janus name -> official name, first match wins. q/k/v are fused afterwards.
_VIS = "vision_model.vision_tower"
HF_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"model\.vision_model\.embeddings\.position_embedding\.weight", f"{_VIS}.pos_embed"),
    (r"model\.vision_model\.embeddings\.patch_embedding\.", f"{_VIS}.patch_embed.proj."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", _VIS + r".blocks.\1.norm\2."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", _VIS + r".blocks.\1.attn.\2_proj."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.", _VIS + r".blocks.\1.attn.proj."),
    (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", _VIS + r".blocks.\1.mlp."),
    (r"model\.vision_model\.post_layernorm\.", f"{_VIS}.norm."),
    (r"model\.aligner\.", "aligner."),
    (r"model\.generation_aligner\.", "gen_aligner."),
    (r"model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"model\.generation_head\.vision_head\.", "gen_head.vision_head."),
    (r"model\.generation_embeddings\.", "gen_embed."),
    (r"model\.language_model\.", "language_model.model."),
    (r"lm_head\.", "language_model.lm_head."),
    (r"model\.vqmodel\.", "gen_vision_model."),
]
# inside the VQ
HF_VQ_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res."),
    (r"encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1."),
    (r"decoder\.up\.(\d+)\.block\.", r"decoder.conv_blocks.\1.res."),
    (r"decoder\.up\.(\d+)\.", r"decoder.conv_blocks.\1."),
    (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid.0."),
    (r"(encoder|decoder)\.mid\.attn_1\.", r"\1.mid.1."),
    (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid.2."),
]
# present in real checkpoints but unused at run time
IGNORED_KEYS = [r"vision_model\.vision_tower\.attn_pool\.", r"gen_vision_model\.quantize\.codebook_used$",
                r"\.rotary_emb\.inv_freq$"]


def _mlp_key(key: str) -> str:
    # transformers' MLP aligner: fc1 + hidden_layers.{i}; official: nn.Sequential layers.{0, 2, 4, ...}
    key = re.sub(r"^(aligner|gen_aligner)\.fc1\.", r"\1.layers.0.", key)
    return re.sub(r"^(aligner|gen_aligner)\.hidden_layers\.(\d+)\.",
                  lambda m: f"{m.group(1)}.layers.{2 * (int(m.group(2)) + 1)}.", key)


def official_from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        for pattern, repl in HF_TO_OFFICIAL:
            if re.match(pattern, key):
                new = re.sub("^" + pattern, repl, key)
                break
        else:
            unmapped.append(key)
            continue
        if new.startswith("gen_vision_model."):
            inner = new[len("gen_vision_model."):]
            for pattern, repl in HF_VQ_TO_OFFICIAL:
                if re.match(pattern, inner):
                    inner = re.sub("^" + pattern, repl, inner)
                    break
            new = "gen_vision_model." + inner
        new = _mlp_key(new)
        if new == f"{_VIS}.pos_embed":
            value = unsqueeze0(value)
        out[new] = value
    if unmapped:
        raise CheckpointError(f"transformers checkpoint has keys with no unigen equivalent: {unmapped[:20]}")
    # fuse q|k|v (official order) into timm's qkv
    for key in [k for k in out if ".attn.q_proj." in k]:
        parts = [out.pop(key.replace(".q_proj.", f".{x}_proj.")) for x in "qkv"]
        out[key.replace(".q_proj.", ".qkv.")] = cat(parts)
    return out


# ---- fused projections ---------------------------------------------------------------------------

# unigen's decoder keeps q|k|v and gate|up as one weight each; files keep DeepSeek's separate projections
_FUSED = {"self_attn.qkv_proj.weight": ("self_attn", ("q_proj", "k_proj", "v_proj")),
          "self_attn.qkv_proj.bias": ("self_attn", ("q_proj", "k_proj", "v_proj")),  # llm.qkv_bias (Qwen2)
          "mlp.gate_up_proj.weight": ("mlp", ("gate_proj", "up_proj"))}


def _fused_sizes(llm: LLMConfig, fused: str) -> list[int]:
    if fused.startswith("self_attn"):
        head_dim = llm.head_width
        return [llm.num_heads * head_dim, llm.num_kv_heads * head_dim, llm.num_kv_heads * head_dim]
    return [llm.intermediate_size, llm.intermediate_size]


def official_state_dict(state: dict[str, torch.Tensor], llm: LLMConfig) -> dict[str, torch.Tensor]:
    """In-memory keys -> checkpoint keys: every fused weight split into DeepSeek's projections."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        fused = next((f for f in _FUSED if key.endswith("." + f)), None)
        if fused is None:
            out[key] = value
            continue
        owner, parts = _FUSED[fused]
        prefix = key[: -len(fused)]
        kind = fused.rsplit(".", 1)[1]  # weight or bias
        for part, piece in zip(parts, value.split(_fused_sizes(llm, fused)), strict=True):
            out[f"{prefix}{owner}.{part}.{kind}"] = piece.contiguous()
    return out


def fused_state_dict(state: dict[str, torch.Tensor], llm: LLMConfig) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> in-memory keys (the inverse of :func:`official_state_dict`). A fused weight whose
    parts are not all present is left out, so that the strict load names what is missing."""
    out = dict(state)
    for fused, (owner, parts) in _FUSED.items():
        kind = fused.rsplit(".", 1)[1]  # weight or bias
        first = f".{owner}.{parts[0]}.{kind}"
        for key in [k for k in state if k.endswith(first)]:
            prefix = key[: -len(first)]
            names = [f"{prefix}.{owner}.{part}.{kind}" for part in parts]
            if all(n in state for n in names):
                out[f"{prefix}.{fused}"] = cat([out.pop(n) for n in names])
    return out


# ---- tokens ------------------------------------------------------------------------------------


def check_tokenizer_files(directory: Path) -> None:
    """A damaged tokenizer.json is named (the ``tokenizers`` library raises a bare Exception naming no file)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
            if name == "tokenizer.json":
                from tokenizers import Tokenizer

                Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception for any bad file
            raise CheckpointError(f"{path} is damaged and cannot be read as a tokenizer ({str(err)[:200]}); "
                                  "download or save the tokenizer again") from err


def token_ids_from_tokenizer(directory: Path, fallback: TokenIds) -> tuple[TokenIds, str | None]:
    """Special token ids (and the prompt format) read from the tokenizer saved beside the weights."""
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return fallback, None
    from transformers import AutoTokenizer

    check_tokenizer_files(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    vocab = tok.get_vocab()
    ids = {name: vocab[text] for name, text in SPECIAL_TOKEN_TEXT.items() if text in vocab}
    pad = tok.pad_token_id if tok.pad_token_id is not None else fallback.pad
    fmt = "janus-pro" if "<|User|>" in vocab else "janus"
    return TokenIds(**{**vars(fallback), **ids, "pad": pad}), fmt


def _token_ids_from_transformers_config(directory: Path, raw: dict, fallback: TokenIds) -> TokenIds:
    """bos/eos/pad from text_config; the CFG pad and image-start ids from generation_config.json."""
    text = raw.get("text_config") or {}
    ids = {name: text[f"{name}_token_id"] for name in ("bos", "eos", "pad") if text.get(f"{name}_token_id") is not None}
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        if gen.get("pad_token_id") is not None:  # transformers' Janus generate pads the CFG prompt with it
            ids["cfg_pad"] = gen["pad_token_id"]
        boi = (gen.get("generation_kwargs") or {}).get("boi_token_id")
        if boi is not None:
            ids["image_start"] = boi
    return TokenIds(**{**vars(fallback), **ids})


# ---- loading -------------------------------------------------------------------------------------


def load_config(directory: Path) -> tuple[UniGenConfig, str]:
    layout = detect_layout(directory)
    raw = json.loads((directory / "config.json").read_text())
    if layout == "unigen":
        return UniGenConfig.from_dict(raw), layout
    config = config_from_transformers(raw) if layout == "transformers" else config_from_official(raw)
    if layout == "transformers":
        config.tokens = _token_ids_from_transformers_config(directory, raw, config.tokens)
    tokens, fmt = token_ids_from_tokenizer(directory, config.tokens)
    config.tokens = tokens
    if fmt is not None:
        config.prompt_format = fmt
    return config, layout


def read_checkpoint(directory: Path, lazy: bool = False) -> tuple[UniGenConfig, dict[str, torch.Tensor | LazyTensor]]:
    """The config and the weights (under the in-memory names) of a checkpoint directory in any layout; ``lazy``:
    ``LazyTensor``s that ``load_state`` reads one at a time."""
    config, layout = load_config(directory)
    state = read_state_dict(directory, lazy=lazy)
    if layout == "transformers":
        state = official_from_transformers(state)
        if _ties_embeddings(json.loads((directory / "config.json").read_text())):
            # as transformers does: the head is the embedding (saved files then hold no lm_head.weight)
            state["language_model.lm_head.weight"] = copy_of(state["language_model.model.embed_tokens.weight"])
    return config, fused_state_dict(state, config.llm)


def _ties_embeddings(raw: dict) -> bool:
    """A transformers Janus config ties the text head to the embedding unless it says otherwise
    (``JanusConfig``'s default is ``tie_word_embeddings=True``; DeepSeek's checkpoints set it false)."""
    from transformers import JanusConfig

    return bool(raw.get("tie_word_embeddings", JanusConfig().tie_word_embeddings))


def load_state(model, state: dict[str, torch.Tensor | LazyTensor], dtype: torch.dtype, where: Path) -> None:
    """Strict load that names every missing, unexpected and mis-shaped key. Each weight is read (a lazy one) and
    cast into the model one at a time, so the peak is the loaded model plus one tensor."""
    state = {k: v for k, v in state.items() if not any(re.search(p, k) for p in IGNORED_KEYS)}
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {sorted(shapes)[:20]}")
    if problems:
        raise CheckpointError(f"weights in {where} do not fit the model its config describes; " + "; ".join(problems))
    for key in list(state):
        module, _, _ = key.rpartition(".")
        value = _aligned(materialize(state.pop(key), dtype))
        # the owning module alone: a whole-model load_state_dict per key would walk every module each time
        model.get_submodule(module).load_state_dict({key[len(module) + 1:] if module else key: value}, strict=False,
                                                    assign=True)
    _check_nothing_left_on_meta(model)
    check_finite_weights(model, where)


def check_finite_weights(model: torch.nn.Module, where) -> None:
    """A checkpoint with NaN or infinite weights samples black or random images without a word: name it."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise CheckpointError(f"the weights in {where} hold NaN or infinite values (first: {name}); the "
                                  "checkpoint is damaged or its training diverged: use an earlier checkpoint")


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 20) -> bool:
    # in chunks: isfinite over a whole embedding makes temporaries of its size, a load's peak beyond the weights
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in 64-byte aligned memory. Tensors read from a safetensors file sit at arbitrary offsets, and
    CPU matmul kernels round differently on unaligned weights: a loaded model would not compute bit for bit
    what the saved one did. Only misaligned tensors are copied, one at a time."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _check_nothing_left_on_meta(model) -> None:
    """The model was built on the meta device; every tensor must have come from the checkpoint."""
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left uninitialised after loading: {leftover[:10]}")


# ---- saving ----------------------------------------------------------------------------------------


def save_model(model, directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
    """config.json + safetensors (sharded with an index above ``max_shard_bytes``).

    huggingface_hub plans the shards and the index (``split_torch_state_dict_into_shards``, the planner inside
    its ``save_torch_state_dict``); the files are written here because that function writes each shard in
    place: every file goes under a temporary name and is renamed into place, so a crash never leaves a
    half-written file under a real name.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = official_state_dict(state, model.config.llm)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    for name, keys in split.filename_to_tensors.items():
        shard = {k: state[k] for k in keys}
        atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    index_path = directory / "model.safetensors.index.json"
    if split.is_sharded:
        write_json(index_path, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    write_json(directory / "config.json", model.config.to_dict())
    # drop what an earlier save with another sharding left behind
    stale = set(directory.glob("model*.safetensors")) - {directory / n for n in split.filename_to_tensors}
    if not split.is_sharded:
        stale.add(index_path)
    for path in stale:
        path.unlink(missing_ok=True)
