"""Train a small SigLIP image encoder from scratch with the sigmoid image-text loss.

For when no pretrained SigLIP is at hand. The image tower is ``unigen.models.model.SigLIPEncoder`` (timm ViT,
no class token), so its weights drop straight into ``UniGenModel.vision_model``; a MAP (attention
pool) head and a small text transformer exist only for the contrastive loss. The text side uses its own
word-level tokenizer trained on the captions (``tokenizer.json`` next to the weights).

Loss (Zhai et al. 2023): logits = exp(t) * img . txt + b with t = log 10, b = -10 at init;
loss = -sum log sigmoid(labels * logits) / batch, labels +1 for matching pairs and -1 otherwise.
Pairs whose captions are the same string count as matching (small worlds repeat captions).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from unigen import runs
from unigen.config import SigLIPConfig
from unigen.config_io import config_to_dict
from unigen.data.image_dataset import ImageDataset, to_pixels
from unigen.data.manifest import read_records
from unigen.data.sampler import holdout_size, split_holdout
from unigen.errors import ConfigError
from unigen.models.model import SigLIPEncoder
from unigen.models.siglip import SigLIPDualEncoder, SigLIPTowersConfig, TextTower, TextTowerConfig
from unigen.training import parallel
from unigen.training.engine import make_adamw
from unigen.training.tokenizer.common import param_groups
from unigen.training.tokenizer.run_checks import read_tokenizer_config, read_weights
from unigen.training.tokenizer.trainer import TokenizerRunConfig, Trainer
from unigen.training.tokenizer.vq_trainer import _check_same

log = logging.getLogger("unigen.training.tokenizer")

SIGLIP_MODEL_TYPE = "unigen-siglip"
_ARCH_FIELDS = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "layer_norm_eps", "stem")


def _small_vit() -> SigLIPConfig:
    return SigLIPConfig(image_size=224, patch_size=16, width=384, depth=12, num_heads=6)


@dataclass
class SigLIPTrainConfig(TokenizerRunConfig):
    vision: SigLIPConfig = field(default_factory=_small_vit)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 256
    text_key: str | None = None  # the caption's key in ``data``; default: the first of caption / text / prompt
    out_dir: str = "runs/siglip"
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float = -10.0
    same_text_positive: bool = True

    def towers(self) -> SigLIPTowersConfig:
        return SigLIPTowersConfig(self.vision, self.text, self.embed_dim)


def sigmoid_loss(logits: torch.Tensor, positive: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP loss; ``positive`` (B, B) bool marks matching pairs (default: the diagonal). Over the rows of some
    of the images only (b, B), it is that share of the loss times B / b."""
    if positive is None:
        positive = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    labels = positive.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


# ---- caption tokenizer ---------------------------------------------------------------------

def train_caption_tokenizer(captions: list[str]):
    """Word-level HF ``tokenizers`` tokenizer (lower-cased, punctuation split): ids 0 [PAD], 1 [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return tok


def tokenize(tok, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    encs = tok.encode_batch(texts)
    n = max(1, min(max_len, max(len(e.ids) for e in encs)))
    ids = torch.zeros(len(texts), n, dtype=torch.long)
    for i, e in enumerate(encs):
        row = e.ids[:n]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    mask = ids != 0
    mask[:, 0] = True  # an empty caption still has one (padding) token to pool
    return ids, mask


# ---- checkpoints ---------------------------------------------------------------------------

def save_siglip(model: SigLIPDualEncoder, tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    runs.atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p)))
    runs.atomic_write(directory / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    runs.write_json(directory / "config.json", {"model_type": SIGLIP_MODEL_TYPE, **config_to_dict(model.config)})
    return directory


def load_siglip_config(directory: str | Path) -> SigLIPTowersConfig:
    return read_tokenizer_config(directory, SIGLIP_MODEL_TYPE, SigLIPTowersConfig, "a trained SigLIP config",
                                 "unigen train-siglip")


def load_siglip_dual(directory: str | Path, device="cpu"):
    """(image-text ``SigLIPDualEncoder``, caption tokenizer) for retrieval / zero-shot use."""
    from tokenizers import Tokenizer

    directory = Path(directory)
    model = SigLIPDualEncoder(load_siglip_config(directory))
    model.load_state_dict(read_weights(directory / "model.safetensors"))
    return model.to(device).eval(), Tokenizer.from_file(str(directory / "tokenizer.json"))


def _vision_state(directory: Path) -> dict[str, torch.Tensor]:
    prefix = "vision_model."
    state = read_weights(Path(directory) / "model.safetensors")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_siglip(directory: str | Path, device="cpu") -> SigLIPEncoder:
    """The trained image tower alone: a ``SigLIPEncoder`` like ``UniGenModel.vision_model``."""
    enc = SigLIPEncoder(load_siglip_config(directory).vision)
    enc.load_state_dict(_vision_state(Path(directory)))
    return enc.to(device).eval()


def load_siglip_into(model, directory: str | Path) -> None:
    """Put the trained image tower into ``UniGenModel.vision_model``; the architectures must match."""

    _check_same(model.config.vision, load_siglip_config(directory).vision, _ARCH_FIELDS, "SigLIP encoder", directory)
    model.vision_model.load_state_dict(_vision_state(Path(directory)))


# ---- metrics -------------------------------------------------------------------------------

@torch.no_grad()
def zero_shot_scores(model: SigLIPDualEncoder, tok, images: torch.Tensor, captions: list[str], max_len: int,
                     batch_size: int = 256) -> dict[str, float]:
    """Held-out pairs; the classes are the distinct held-out captions.

    ``i2t``: share of images whose best-scoring caption is their own; ``t2i``: share of distinct captions
    whose best-scoring image carries that caption.
    """
    device = next(model.parameters()).device
    classes = sorted(set(captions))
    ids, mask = tokenize(tok, classes, max_len)
    txt = model.encode_text(ids.to(device), mask.to(device))
    img = torch.cat([model.encode_image(to_pixels(images[i:i + batch_size]).to(device))
                     for i in range(0, len(images), batch_size)])
    sim = img @ txt.t()  # (n_images, n_classes)
    target = torch.tensor([classes.index(c) for c in captions], device=device)
    i2t = (sim.argmax(1) == target).double().mean()
    best_image = sim.argmax(0)  # (n_classes,)
    t2i = (target[best_image] == torch.arange(len(classes), device=device)).double().mean()
    return {"i2t_acc": float(i2t), "t2i_acc": float(t2i), "n_classes": float(len(classes))}


# ---- trainer -------------------------------------------------------------------------------

class SigLIPTrainer(Trainer):
    """The SigLIP task: image-caption pairs, the dual encoder, its caption tokenizer, the sigmoid loss."""

    desc = "train-siglip"
    what = "pairs"
    no_data = 'data is empty: set data=PATH to a JSONL manifest of {"image": ..., "caption": ...}'

    def build_data(self):
        cfg = self.cfg
        records = read_records(cfg.data, need_text=True, text_key=cfg.text_key)
        if cfg.val_data:
            train_records = records
            val_records = read_records(cfg.val_data, need_text=True, text_key=cfg.text_key)
        else:
            train_records, val_records = split_holdout(records, holdout_size(cfg.val_size, len(records)), cfg.seed)
        size = cfg.vision.image_size
        train_set = ImageDataset(train_records, size, cfg.cache_images, "training images", cfg.max_bad_fraction)
        if not val_records:
            return train_set, None
        return train_set, ImageDataset(val_records, size, True, "val images", cfg.max_bad_fraction)

    def build(self, resume: Path | None) -> None:
        cfg = self.cfg
        if resume is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(resume / "tokenizer.json"))
        else:
            self.tokenizer = train_caption_tokenizer([r.text for r in self.train_set.records])
        towers = cfg.towers()
        if towers.text.vocab_size <= 0:
            towers.text.vocab_size = self.tokenizer.get_vocab_size()
        elif towers.text.vocab_size < self.tokenizer.get_vocab_size():
            raise ConfigError(f"text.vocab_size={towers.text.vocab_size} is smaller than the caption vocabulary "
                              f"({self.tokenizer.get_vocab_size()} words); leave it 0 to size it from the captions")
        self.model = SigLIPDualEncoder(towers, cfg.logit_scale_init, cfg.logit_bias_init).to(self.device).train()
        skip = {"logit_scale", "logit_bias", "text_model.pos_embed", "vision_model.vision_tower.pos_embed",
                "image_head.latent"}
        groups = param_groups(self.model, cfg.weight_decay, no_decay=lambda n, p: n in skip)
        self.optimizers["optimizer"] = make_adamw(groups, lr=cfg.lr, betas=cfg.betas)
        log.info("SigLIP data: %d training pairs, %d val pairs; image tower %.2fM, text tower %.2fM parameters, "
                 "caption vocabulary %d", len(self.train_set), len(self.val_set) if self.val_set else 0,
                 _millions(self.model.vision_model), _millions(self.model.text_model), towers.text.vocab_size)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = self.schedulers[0].current()
        images, captions = next(self.batches)
        x = to_pixels(images).to(self.device, non_blocking=True)
        ids, mask = tokenize(self.tokenizer, captions, cfg.text.max_len)
        # this process's images against every caption of the global batch: its rows of the loss, scaled (by
        # sigmoid_loss) so that their mean over the processes is the global batch's loss
        texts = parallel.gather_objects(captions)
        positive = torch.zeros(len(captions), len(texts), dtype=torch.bool)
        positive[range(len(captions)), range(self.rank * len(captions), (self.rank + 1) * len(captions))] = True
        if cfg.same_text_positive:
            positive |= torch.tensor([[a == b for b in texts] for a in captions])
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            img = self.model.encode_image(x)
            txt = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        logits = self.model.logits(img.float(), parallel.gather_rows(txt.float()))
        loss = sigmoid_loss(logits, positive.to(self.device))
        gn = self.update(loss, self.model)
        return {"loss": loss.item(), "lr": lr, "grad_norm": gn, "t": self.model.logit_scale.exp().item(),
                "b": self.model.logit_bias.item()}

    def evaluate(self) -> dict[str, float]:
        data = self.val_set or self.train_set
        images = torch.stack([data[i][0] for i in range(len(data))])
        captions = [data[i][1] for i in range(len(data))]
        self.model.eval()
        scores = zero_shot_scores(self.model, self.tokenizer, images, captions, self.cfg.text.max_len)
        self.model.train()
        return scores

    def eval_line(self, ev: dict[str, float]) -> str:
        return (f"zero-shot image->caption {100 * ev['i2t_acc']:.1f}%, caption->image {100 * ev['t2i_acc']:.1f}% "
                f"over {int(ev['n_classes'])} captions")

    def save_weights(self, directory: Path) -> None:
        save_siglip(self.model, self.tokenizer, directory)

    def load_weights(self, path: Path) -> None:
        self.model.load_state_dict(read_weights(path / "model.safetensors"))


def _millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def train_siglip(cfg: SigLIPTrainConfig, bar_position: int = 0, before_step: Callable[[], None] | None = None,
                 max_steps: int | None = None) -> Path:
    """Train as configured (``max_steps``: stop there, resumable); returns the output folder (``load_siglip`` /
    ``load_siglip_into`` read it)."""
    return SigLIPTrainer(cfg).run(max_steps, bar_position=bar_position, before_step=before_step)


__all__ = ["SigLIPDualEncoder", "SigLIPTowersConfig", "SigLIPTrainConfig", "SigLIPTrainer", "TextTower",
           "TextTowerConfig", "load_siglip", "load_siglip_dual", "load_siglip_into", "save_siglip", "train_siglip"]
