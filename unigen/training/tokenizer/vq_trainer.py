"""Train a LlamaGen VQ-16 image tokenizer (``unigen.models.vq.VQModel``, any size) on your own images.

Losses: reconstruction (L1/L2) + codebook + commitment, optional LPIPS-like perceptual (local VGG16
weights only) and optional PatchGAN hinge loss from ``disc_start``. Optionally starts as a plain
autoencoder and sets the codebook by k-means on its encoder outputs (``ae_warmup_steps``). Tracks per-code
usage over a window of steps and re-seeds dead codes from recent encoder outputs. Fixes LlamaGen's trainer bugs:
weight decay is applied (AdamW groups), resume restores the exact mid-epoch position (step, data
order, RNG, optimisers, discriminator, usage counts), and the discriminator is neither built while
``disc_weight`` is 0 nor run before ``disc_start``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unigen import runs
from unigen.config import VQConfig
from unigen.config_io import config_to_dict
from unigen.data.image_dataset import ImageDataset, to_pixels, to_uint8
from unigen.data.manifest import read_records
from unigen.data.sampler import holdout_size, split_holdout
from unigen.errors import CheckpointError, ConfigError
from unigen.models.vq import VQModel
from unigen.training import parallel
from unigen.training.engine import make_adamw
from unigen.training.tokenizer.common import param_groups
from unigen.training.tokenizer.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    hinge_d_loss,
    hinge_g_loss,
    load_vgg16_features,
)
from unigen.training.tokenizer.run_checks import read_tokenizer_config, read_weights
from unigen.training.tokenizer.trainer import TokenizerRunConfig, Trainer

log = logging.getLogger("unigen.training.tokenizer")


@dataclass
class VQTrainConfig(TokenizerRunConfig):
    vq: VQConfig = field(default_factory=VQConfig)
    random_flip: bool = False
    out_dir: str = "runs/vq"
    steps: int = 20_000
    # the quantizer always runs in fp32, whatever ``amp`` says
    # losses
    recon_loss: str = "l2"  # or "l1"
    recon_weight: float = 1.0
    # Extra reconstruction weight on pixels that differ from the image's border colour. A small object on a flat
    # background (Shapes, icons, documents) is a few percent of the pixels, so a plain mean lets its colour drift
    # at almost no cost; 0 turns the weighting off.
    foreground_weight: float = 0.0
    # Background pixels this close to the foreground count as foreground, so the weight is the same on both sides
    # of an edge: without a margin, growing the object into the background is the cheap error, and shapes fatten.
    foreground_margin: int = 2
    codebook_weight: float = 1.0  # scales codebook + commitment (commit beta lives in vq.commit_beta)
    perceptual_weight: float = 0.0
    perceptual_net_path: str | None = None  # torchvision vgg16 state dict; never downloaded
    disc_weight: float = 0.0  # 0: no discriminator is built or run
    disc_start: int = 0
    disc_lr: float | None = None  # default: lr
    disc_channels: int = 64
    disc_layers: int = 3
    # codebook health
    usage_window: int = 100  # steps per usage window; dead codes are re-seeded at the end of a window
    reinit_dead_codes: bool = True
    dead_threshold: int = 0  # a code used at most this often in a window is dead
    reinit_stop_fraction: float = 0.8  # no re-seeding after this share of the steps, so the codebook settles
    z_buffer_size: int = 4096
    # Autoencoder warm-up: for the first ``ae_warmup_steps`` the decoder sees the l2-normalised encoder output
    # (where the quantizer would put a code) and there are no VQ losses; then the codebook is set by spherical
    # k-means on encoder outputs of ``kmeans_batches`` batches. Quantizing from step 0 against a random codebook
    # lets a few codes win early and the rest die; codes placed where the encoder outputs already are all start
    # in use (tokenizers/README.md).
    ae_warmup_steps: int = 0
    kmeans_batches: int = 16
    kmeans_iters: int = 20
    sample_images: int = 8  # originals over reconstructions at every evaluation

    def __post_init__(self):
        super().__post_init__()
        if self.foreground_weight < 0:
            raise ConfigError(f"foreground_weight must be >= 0 (0 turns it off), got {self.foreground_weight}")
        if self.foreground_margin < 0:
            raise ConfigError(f"foreground_margin must be >= 0 pixels, got {self.foreground_margin}")
        if self.recon_loss not in ("l1", "l2"):
            raise ConfigError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        if self.ae_warmup_steps < 0 or self.ae_warmup_steps >= max(1, self.steps):
            raise ConfigError(f"ae_warmup_steps must be in [0, steps) = [0, {self.steps}), got {self.ae_warmup_steps}: "
                             "lower ae_warmup_steps (0 turns the warm-up off) or raise steps")
        if self.ae_warmup_steps and (self.kmeans_batches < 1 or self.kmeans_iters < 1):
            raise ConfigError("kmeans_batches and kmeans_iters must be >= 1 with ae_warmup_steps > 0, got "
                              f"{self.kmeans_batches} and {self.kmeans_iters}")
        if self.vq.base_channels % self.vq.norm_groups:
            raise ConfigError(f"vq.base_channels ({self.vq.base_channels}) must be a multiple of vq.norm_groups "
                              f"({self.vq.norm_groups}): every GroupNorm splits its channels into that many groups")


def foreground_mask(x: torch.Tensor, margin: int = 0, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel differs from its image's border colour (the per-channel median of the
    outermost pixels) by more than ``threshold`` in some channel, or lies within ``margin`` pixels (Chebyshev) of
    such a pixel; for images in [-1, 1]."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, C, 2H + 2W)
    background = border.median(dim=-1).values[..., None, None]
    mask = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    return F.max_pool2d(mask, 2 * margin + 1, stride=1, padding=margin) if margin else mask


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, kind: str, foreground_weight: float,
                        margin: int = 0) -> torch.Tensor:
    """L1 or L2 per pixel, averaged with weight 1 + ``foreground_weight`` on foreground pixels (``margin``: see
    ``foreground_mask``), normalised by the mean weight so the loss keeps the plain mean's scale."""
    err = (recon - x).abs() if kind == "l1" else (recon - x).square()
    if foreground_weight == 0:
        return err.mean()
    weight = 1 + foreground_weight * foreground_mask(x, margin)
    return (err * weight).mean() / weight.mean()


# ---- VQ checkpoints ------------------------------------------------------------------------

VQ_MODEL_TYPE = "unigen-vq"
# norm_groups changes no weight shape, so a mismatch would load silently: it must be checked too
_ARCH_FIELDS = ("codebook_size", "embed_dim", "base_channels", "channel_mult", "num_res_blocks", "z_channels",
                "image_size", "norm_groups", "local_encoder")


def save_vq(vq: VQModel, directory: str | Path) -> Path:
    """``config.json`` + ``model.safetensors`` (LlamaGen / Janus key names), each written atomically."""
    directory = Path(directory)
    config = {"model_type": VQ_MODEL_TYPE, **config_to_dict(vq.config)}
    state = {k: v.detach().float().contiguous().cpu() for k, v in vq.state_dict().items()}
    runs.atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p)))
    runs.write_json(directory / "config.json", config)
    return directory


def load_vq_config(directory: str | Path) -> VQConfig:
    return read_tokenizer_config(directory, VQ_MODEL_TYPE, VQConfig, "a VQ tokenizer config",
                                 "save_vq / unigen train-vq")


def load_vq(directory: str | Path, device: str | torch.device = "cpu") -> VQModel:
    """A trained VQ tokenizer from ``directory`` (a ``train-vq`` output or any of its checkpoints)."""
    vq = VQModel(load_vq_config(directory))
    vq.load_state_dict(read_weights(Path(directory) / "model.safetensors"))
    return vq.to(device).eval()


def load_vq_into(model, directory: str | Path) -> None:
    """Put a trained VQ tokenizer into ``UniGenModel.gen_vision_model``; the architectures must match."""
    cfg = load_vq_config(directory)
    _check_same(model.config.vq, cfg, _ARCH_FIELDS, "VQ tokenizer", directory)
    model.gen_vision_model.load_state_dict(read_weights(Path(directory) / "model.safetensors"))


def _check_same(want, got, names, what: str, directory) -> None:
    diff = {n: (getattr(want, n), getattr(got, n)) for n in names if getattr(want, n) != getattr(got, n)}
    if diff:
        detail = ", ".join(f"{n}: model {a!r} vs checkpoint {b!r}" for n, (a, b) in diff.items())
        raise CheckpointError(f"{what} in {directory} does not fit the model ({detail}); build the model with "
                              f"this config (load_*_config) instead")


# ---- codebook health -----------------------------------------------------------------------

class CodebookUsage:
    """Per-code counts over the current window of steps."""

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        """Count the global batch's ``codes`` (this process's, summed over the processes)."""
        counts = torch.bincount(codes.flatten(), minlength=self.counts.numel())
        self.counts += parallel.all_reduce_sum(counts, codes.device)

    def reset(self) -> None:
        self.counts.zero_()

    @staticmethod
    def stats(counts: torch.Tensor) -> dict[str, float]:
        """Share of codes used, and perplexity exp(H) of the code distribution (max = codebook size)."""
        total = counts.sum()
        if total == 0:
            return {"usage": 0.0, "perplexity": 0.0}
        p = counts[counts > 0].double() / total
        return {"usage": float((counts > 0).double().mean()), "perplexity": float(torch.exp(-(p * p.log()).sum()))}


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], recon clamped, on the 0..1 scale."""
    mse = ((recon.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


# ---- trainer -------------------------------------------------------------------------------

class VQTrainer(Trainer):
    """The VQ task: images, the VQ model (+ optional perceptual loss and discriminator), and the codebook's
    health (usage window, dead-code re-seeding, k-means init after the autoencoder warm-up)."""

    desc = "train-vq"
    what = "images"
    no_data = "data is empty: set data=PATH (a folder of images or a JSONL manifest)"

    def build_data(self):
        cfg = self.cfg
        records = read_records(cfg.data)
        if cfg.val_data:
            train_records, val_records = records, read_records(cfg.val_data)
        else:
            train_records, val_records = split_holdout(records, holdout_size(cfg.val_size, len(records)), cfg.seed)
        size = cfg.vq.image_size
        train_set = ImageDataset(train_records, size, cfg.cache_images, "training images", cfg.max_bad_fraction)
        if not val_records:
            return train_set, None
        return train_set, ImageDataset(val_records, size, cfg.cache_images, "val images", cfg.max_bad_fraction)

    def build(self, resume: Path | None) -> None:
        cfg = self.cfg
        log.info("VQ data: %d training images, %d val images at %dpx", len(self.train_set),
                 len(self.val_set) if self.val_set else 0, cfg.vq.image_size)
        self.model = VQModel(cfg.vq).to(self.device).train()
        codebook = self.model.quantize.embedding.weight
        groups = param_groups(self.model, cfg.weight_decay, no_decay=lambda n, p: p is codebook)
        self.optimizers["optimizer"] = make_adamw(groups, lr=cfg.lr, betas=cfg.betas)
        log.info("VQ model: %.2fM parameters, %d codes of dim %d, %dx%d tokens per image",
                 sum(p.numel() for p in self.model.parameters()) / 1e6, cfg.vq.codebook_size, cfg.vq.embed_dim,
                 cfg.vq.grid, cfg.vq.grid)
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            self.perceptual = PerceptualLoss(load_vgg16_features(cfg.perceptual_net_path)).to(self.device)
            log.info("perceptual loss: on (weight %g, VGG16 from %s)", cfg.perceptual_weight, cfg.perceptual_net_path)
        else:
            log.info("perceptual loss: off (perceptual_weight=0%s)", "" if cfg.perceptual_net_path else
                     "; no perceptual_net_path given: to enable it pass local VGG16 weights, nothing is downloaded")
        self.disc = None
        if cfg.disc_weight > 0:
            self.disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(self.device).train()
            self.optimizers["disc"] = make_adamw(param_groups(self.disc, cfg.weight_decay), lr=cfg.disc_lr or cfg.lr,
                                                 betas=cfg.betas)
            log.info("PatchGAN discriminator: on from step %d (weight %g)", cfg.disc_start, cfg.disc_weight)
        self.usage = CodebookUsage(cfg.vq.codebook_size)
        self.z_buffer = torch.zeros(0, cfg.vq.embed_dim)

    # -- one optimisation step
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.ae_warmup_steps and self.step == cfg.ae_warmup_steps:
            info = self.kmeans_init_codebook()
            self.metrics.write(self.step, "kmeans_init", info)
            log.info("step %d: end of the autoencoder warm-up, codebook set by k-means (%d of %d codes hold "
                     "points)", self.step, info["codes_with_points"], cfg.vq.codebook_size)
        images, _ = next(self.batches)
        x = to_pixels(images)
        if cfg.random_flip:  # drawn for the global batch on every process: their RNGs stay as one process's
            rows = slice(self.rank * x.shape[0], (self.rank + 1) * x.shape[0])
            flip = (torch.rand(x.shape[0] * self.world) < 0.5)[rows]
            x[flip] = x[flip].flip(-1)
        x = x.to(self.device, non_blocking=True)
        lr = self.schedulers[0].current()
        h, q, recon, loss, out = self.generator_loss(x)
        out["grad_norm"] = self.update(loss, self.model)
        if "g_adv" in out:
            out["d_loss"] = self.discriminator_step(x, recon)
        if q is not None:
            self.usage.update(q.codes)
        self._remember(h.detach().float())
        out.update(loss=loss.item(), lr=lr)
        return out

    def generator_loss(self, x: torch.Tensor):
        cfg, model = self.cfg, self.model
        amp = torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp)
        warming_up = self.step < cfg.ae_warmup_steps
        with amp:
            h = model.quant_conv(model.encoder(x))
            with torch.autocast(self.device.type, enabled=False):
                q = None if warming_up else model.quantize(h.float())
            # during the warm-up the decoder learns from the unquantized point on the unit sphere
            recon = model.decode_latent(F.normalize(h.float(), dim=1) if warming_up else q.quantized).float()
        rec = reconstruction_loss(recon, x, cfg.recon_loss, cfg.foreground_weight, cfg.foreground_margin)
        loss = cfg.recon_weight * rec
        out = {"recon": rec.item()}
        if q is not None:
            loss = loss + cfg.codebook_weight * (q.codebook_loss + q.commit_loss)
            out.update(codebook=q.codebook_loss.item(), commit=q.commit_loss.item())
        if self.perceptual is not None:
            with amp:
                p = self.perceptual(recon, x).float()
            loss = loss + cfg.perceptual_weight * p
            out["perceptual"] = p.item()
        if self.disc is not None and self.step >= cfg.disc_start:
            self.disc.requires_grad_(False)  # the generator loss must not leave gradients in D
            with amp:
                g = hinge_g_loss(self.disc(recon).float())
            self.disc.requires_grad_(True)
            loss = loss + cfg.disc_weight * g
            out["g_adv"] = g.item()
        return h, q, recon, loss, out

    def discriminator_step(self, x: torch.Tensor, recon: torch.Tensor) -> float:
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            d = hinge_d_loss(self.disc(x).float(), self.disc(recon.detach()).float())
        self.update(d, self.disc, "disc")
        return d.item()

    def _remember(self, h: torch.Tensor) -> None:
        """Keep a random sample of recent (normalised) encoder outputs to re-seed dead codes from: the global
        batch's, so every process re-seeds the same codes with the same points."""
        h = parallel.gather_rows(h)
        z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), dim=-1).cpu()
        keep = min(len(z), max(1, self.cfg.z_buffer_size // 16))
        z = z[torch.randperm(len(z))[:keep]]
        self.z_buffer = torch.cat([self.z_buffer, z])[-self.cfg.z_buffer_size:]

    @torch.no_grad()
    def reinit_dead_codes(self) -> int:
        """Re-seed codes used <= ``dead_threshold`` times this window with recent encoder outputs."""
        counts = self.usage.counts
        dead = (counts <= self.cfg.dead_threshold).nonzero().flatten()
        if len(dead) == 0 or len(self.z_buffer) == 0:
            return 0
        weight = self.model.quantize.embedding.weight
        live = counts > self.cfg.dead_threshold
        # keep the norm of live codes: the lookup normalises, but the gradient scale goes with 1/|e|
        scale = weight[live.to(weight.device)].norm(dim=1).mean() if live.any() else weight.norm(dim=1).mean()
        seeds = self.z_buffer[torch.randint(len(self.z_buffer), (len(dead),))]
        seeds = F.normalize(seeds + 1e-3 * torch.randn_like(seeds), dim=-1)
        dead_dev = dead.to(weight.device)
        weight[dead_dev] = seeds.to(weight) * scale
        state = self.optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):  # stale moments would drag the new code straight back
            if key in state:
                state[key][dead_dev] = 0
        return len(dead)

    @torch.no_grad()
    def kmeans_init_codebook(self) -> dict[str, float]:
        """Set the codebook to spherical k-means centres of normalised encoder outputs (end of the warm-up).

        The images come from their own seeded order, so the training data order (and resume) is untouched.
        """
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        n = min(len(self.train_set), cfg.kmeans_batches * cfg.batch_size * self.world)  # global batches
        index = torch.randperm(len(self.train_set), generator=gen)[:n].tolist()
        self.model.eval()
        feats = []
        for start in range(0, n, cfg.batch_size):
            x = to_pixels(torch.stack([self.train_set[i][0] for i in index[start:start + cfg.batch_size]]))
            h = self.model.quant_conv(self.model.encoder(x.to(self.device))).float()
            feats.append(F.normalize(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), dim=-1))
        self.model.train()
        z = torch.cat(feats)
        k = cfg.vq.codebook_size
        centres = z[torch.randint(len(z), (k,), generator=gen).to(z.device)].clone()
        for _ in range(cfg.kmeans_iters):
            assign = (z @ centres.t()).argmax(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, z)
            sizes = torch.bincount(assign, minlength=k)
            # an empty cluster keeps its centre; the others move to the (normalised) mean of their points
            centres = torch.where(sizes[:, None] > 0, F.normalize(sums, dim=-1), centres)
        weight = self.model.quantize.embedding.weight
        # the lookup normalises, but the gradient a code gets scales with 1/|e|: keep the initial norm
        weight.copy_(centres.to(weight) * weight.norm(dim=1).mean())
        parallel.broadcast_from_main(weight)  # float sums may differ in the last bit between processes' threads
        state = self.optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):  # moments from before the init would drag the codes away
            if key in state:
                state[key].zero_()
        used = int((torch.bincount((z @ centres.t()).argmax(1), minlength=k) > 0).sum())
        return {"codes_with_points": used, "points": len(z)}

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        data = self.val_set or self.train_set
        self.model.eval()
        scores, counts = [], torch.zeros(self.cfg.vq.codebook_size, dtype=torch.long)
        for start in range(0, len(data), self.cfg.batch_size):
            images = torch.stack([data[i][0] for i in range(start, min(len(data), start + self.cfg.batch_size))])
            x = to_pixels(images).to(self.device)
            recon, q = self.model(x)
            scores.append(psnr(recon.float(), x).cpu())
            counts += torch.bincount(q.codes.flatten().cpu(), minlength=counts.numel())
        self.model.train()
        stats = CodebookUsage.stats(counts)
        return {"psnr": float(torch.cat(scores).mean()), "usage": stats["usage"], "perplexity": stats["perplexity"]}

    @torch.no_grad()
    def save_samples(self, path: Path) -> None:
        """Originals (top row) over reconstructions (bottom row)."""
        from PIL import Image

        data = self.val_set or self.train_set
        n = min(self.cfg.sample_images, len(data))
        if n == 0:
            return
        x = to_pixels(torch.stack([data[i][0] for i in range(n)])).to(self.device)
        self.model.eval()
        recon = self.model(x)[0].float()
        self.model.train()
        grid = torch.cat([torch.cat(list(x.cpu()), -1), torch.cat(list(recon.cpu()), -1)], -2)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(grid).permute(1, 2, 0).numpy()).save(path)

    def eval_line(self, ev: dict[str, float]) -> str:
        return (f"psnr {ev['psnr']:.2f} dB, code usage {100 * ev['usage']:.1f}%, perplexity "
                f"{ev['perplexity']:.1f}")

    def after_eval(self) -> None:
        if self.cfg.sample_images:
            self.save_samples(self.out_dir / "samples" / f"step_{self.step:07d}.png")

    def log_extra(self) -> dict[str, float]:
        return CodebookUsage.stats(self.usage.counts)

    def on_step_end(self) -> None:
        cfg = self.cfg
        if self.step % cfg.usage_window == 0:
            if cfg.reinit_dead_codes and self.step < cfg.reinit_stop_fraction * cfg.steps:
                n = self.reinit_dead_codes()
                if n:
                    self.metrics.write(self.step, "reinit", {"dead_codes": n})
            self.usage.reset()

    # -- checkpoints: the weights, and the state beside the optimizer's
    def save_weights(self, directory: Path) -> None:
        save_vq(self.model, directory)

    def load_weights(self, path: Path) -> None:
        self.model.load_state_dict(read_weights(path / "model.safetensors"))

    def check_launch(self) -> None:
        if self.cfg.disc_weight > 0:
            raise ConfigError(f"disc_weight={self.cfg.disc_weight}: the PatchGAN discriminator trains in one process "
                              "(its BatchNorm would normalise each process's share of the batch, not the batch); "
                              "train it without a launcher, or set disc_weight=0")

    def extra_state(self) -> dict:
        state = {"usage_counts": self.usage.counts.clone(), "z_buffer": self.z_buffer.clone()}
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
            state["disc_optimizer"] = self.optimizers["disc"].state_dict()
        return state

    def load_extra_state(self, state: dict, path: Path) -> None:
        if self.disc is not None:
            if "disc" not in state:
                raise CheckpointError(f"{path} has no discriminator state but disc_weight > 0 now")
            self.disc.load_state_dict(state["disc"])
            self.optimizers["disc"].load_state_dict(state["disc_optimizer"])
        self.usage.counts = state["usage_counts"].clone()
        self.z_buffer = state["z_buffer"].clone()


def train_vq(cfg: VQTrainConfig, before_step: Callable[[], None] | None = None, max_steps: int | None = None) -> Path:
    """Train a VQ tokenizer as configured (``max_steps``: stop there, resumable); returns the output folder
    (``load_vq`` reads it)."""
    return VQTrainer(cfg).run(max_steps, before_step=before_step)


__all__ = ["VQTrainConfig", "VQTrainer", "load_vq", "load_vq_config", "load_vq_into", "save_vq",
           "train_vq"]
