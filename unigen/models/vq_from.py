"""``vq_from=``: a pretrained VQ-16 image tokenizer as ``UniGenModel.gen_vision_model``.

Sources:

  * ``llamagen``  a LlamaGen VQ checkpoint file (``vq_ds16_c2i.pt``): a torch file whose ``"ema"``, ``"model"`` or
                  ``"state_dict"`` entry (the order LlamaGen's own loaders try) holds LlamaGen's weights, read with
                  ``weights_only=True``; also a ``.safetensors`` file of those weights
  * ``unigen-vq`` the output of ``unigen train-vq`` (a folder)
  * ``unified``   a unigen, transformers Janus or DeepSeek Janus checkpoint folder (its ``gen_vision_model``;
                  Janus's VQ is LlamaGen's VQ-16)

``VQModel`` keeps LlamaGen's module names, so LlamaGen's keys need no renaming; its sizes are read off the weights
(LlamaGen's files hold no config). A LlamaGen file has no image size: the recipe's ``vq.image_size`` is used.
LlamaGen's quantiser is assumed l2-normalised (``codebook_l2_norm=True``, its default and the VQ-16 release's).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from unigen.config import VQConfig
from unigen.config_io import build_config
from unigen.errors import CheckpointError, CheckpointNotFoundError
from unigen.models.checkpoint import _load_safetensors, load_state, resolve_checkpoint_dir
from unigen.models.vision_from import (
    is_unified_checkpoint,
    naming_the_part,
    one_line,
    read_config_json,
    read_unified_part,
    require_weights,
)
from unigen.models.vq import VQModel

VQ_LAYOUTS = ("a LlamaGen VQ checkpoint file (vq_ds16_c2i.pt: a torch file with an 'ema', 'model' or "
              "'state_dict' entry, or a .safetensors file of its weights); unigen train-vq output (model_type "
              "'unigen-vq'); a unigen, transformers Janus or DeepSeek Janus checkpoint folder")
LLAMAGEN_ENTRIES = ("ema", "model", "state_dict")  # LlamaGen's vq_demo.py tries them in this order
LLAMAGEN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
LLAMAGEN_GROUPS = 32  # LlamaGen's Normalize: GroupNorm(32, eps=1e-6) everywhere
UNUSED_VQ_KEYS = re.compile(r"^quantize\.codebook_used$")  # LlamaGen's usage buffer (show_usage), unused here


def load_vq_from(source: str | Path, config: VQConfig) -> tuple[VQModel, VQConfig]:
    """The VQ of ``source`` with its weights (fp32), and its config. Only ``config.image_size`` is used, and only
    for a LlamaGen file (which holds none); the other sources bring their own."""
    with naming_the_part("vq_from", source):
        path = Path(source).expanduser()
        if path.suffix in LLAMAGEN_SUFFIXES and not path.exists():
            raise CheckpointNotFoundError(f"{path} does not exist (a LlamaGen VQ checkpoint file was expected)")
        if path.is_file():
            found, state = _read_llamagen(path, config.image_size)
            where = path
        else:
            where = resolve_checkpoint_dir(source)
            raw = read_config_json(where, VQ_LAYOUTS)
            found, state = _read_vq_folder(where, raw)
        state = {k: v for k, v in state.items() if not UNUSED_VQ_KEYS.match(k)}
        with torch.device("meta"):
            vq = VQModel(found)
        load_state(vq, state, torch.float32, where)
    return vq, found


def _read_vq_folder(directory: Path, raw: dict) -> tuple[VQConfig, dict[str, torch.Tensor]]:
    if raw.get("model_type") == "unigen-vq":
        values = {k: v for k, v in raw.items() if k != "model_type"}
        cfg = build_config(VQConfig, values, str(directory / "config.json"))
        require_weights(directory, ("model.safetensors",))
        return cfg, _load_safetensors(directory / "model.safetensors")
    if is_unified_checkpoint(raw):
        config, state = read_unified_part(directory, "gen_vision_model.")
        return config.vq, state
    raise CheckpointError(f"{directory / 'config.json'} (model_type={raw.get('model_type')!r}) is no VQ layout "
                          f"vq_from reads; supported: {VQ_LAYOUTS}")


def _read_llamagen(path: Path, image_size: int) -> tuple[VQConfig, dict[str, torch.Tensor]]:
    state = read_llamagen_weights(path)
    return llamagen_config(state, image_size, path), state


def read_llamagen_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        # weights_only: a file from the internet must never run code when it is read
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError / EOFError
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch file ({one_line(err)[:200]}); "
                              "a LlamaGen training checkpoint also pickles its argparse args: save only its "
                              "weights, torch.save({'model': ckpt['model']}, PATH), and pass that file") from err
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()) and \
            "encoder.conv_in.weight" in blob:
        return blob  # a bare state dict
    entry = next((k for k in LLAMAGEN_ENTRIES if isinstance(blob, dict) and isinstance(blob.get(k), dict)), None)
    if entry is None:
        keys = sorted(map(str, blob))[:10] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path} holds {keys}, none of LlamaGen's weight entries {list(LLAMAGEN_ENTRIES)}; "
                              f"vq_from reads {VQ_LAYOUTS}")
    return blob[entry]


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{path} has no {key}: these are not a LlamaGen VQ's weights "
                              f"(first keys: {sorted(state)[:8]})")
    return state[key].shape


def llamagen_config(state: dict[str, torch.Tensor], image_size: int, path: Path) -> VQConfig:
    """LlamaGen's VQ sizes, read off its weights (its ``ModelArgs`` are not saved)."""
    base = _shape(state, "encoder.conv_in.weight", path)[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    mult = tuple(_shape(state, f"encoder.conv_blocks.{i}.res.0.conv1.weight", path)[0] // base for i in levels)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    codebook_size, embed_dim = _shape(state, "quantize.embedding.weight", path)
    return VQConfig(codebook_size=codebook_size, embed_dim=embed_dim, base_channels=base, channel_mult=mult,
                    num_res_blocks=len(blocks), z_channels=_shape(state, "encoder.conv_out.weight", path)[0],
                    norm_groups=LLAMAGEN_GROUPS, image_size=image_size)
