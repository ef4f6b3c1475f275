"""Optional VQ losses: an LPIPS-like perceptual distance on VGG16 features and a PatchGAN discriminator."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_vgg16_features(path: str | Path | None) -> nn.Sequential:
    """torchvision's ``vgg16().features`` with weights read from a local file; never downloads.

    Accepts the torchvision ImageNet state dict (``vgg16-397923af.pth``, keys ``features.N.*``) or a
    features-only one (keys ``N.*``), as ``.pth``/``.pt``/``.bin`` or ``.safetensors``.
    """
    if not path:
        raise ValueError(
            "perceptual_weight > 0 needs VGG16 weights, and none were given: set perceptual_net_path to a local "
            "torchvision vgg16 state dict (e.g. vgg16-397923af.pth); nothing is downloaded. "
            "Or set perceptual_weight=0 to train without the perceptual loss."
        )
    from torchvision.models import vgg16

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"perceptual_net_path {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    features = vgg16(weights=None).features
    missing, unexpected = features.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path} is not a VGG16 state dict: missing {missing[:6]} (unexpected {unexpected[:6]})")
    return features


class PerceptualLoss(nn.Module):
    """LPIPS-like: unit-normalise each tapped feature map over channels, squared difference, spatial mean,
    channel sum, layer sum. (LPIPS without its learned per-channel weights, i.e. all weights 1.)"""

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...] = VGG16_TAPS):
        super().__init__()
        self.features = features[: max(taps) + 1].eval().requires_grad_(False)
        self.taps = set(taps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never switch to train mode

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the perceptual distance; inputs in [-1, 1]."""
        total = recon.new_zeros(())
        for a, b in zip(self._feats(recon), self._feats(target), strict=True):
            total = total + (a - b).pow(2).sum(1).mean()
        return total


class PatchDiscriminator(nn.Module):
    """pix2pix / LlamaGen PatchGAN: strided 4x4 convs -> one real/fake logit per patch."""

    def __init__(self, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
