"""The VQ trainer's foreground-weighted reconstruction loss."""
import pytest
import torch
import torch.nn.functional as F

from unigen.errors import ConfigError
from unigen.training.tokenizer.vq_trainer import VQTrainConfig, foreground_mask, reconstruction_loss


def _object_on(background: float) -> torch.Tensor:
    x = torch.full((2, 3, 16, 16), background)
    x[0, :, 4:8, 5:9] = torch.tensor([0.9, 0.7, -0.8])[:, None, None]  # a yellow-ish square
    x[1, 0, 10:12, 2:6] = background + 0.05  # under the threshold: still background
    return x


@pytest.mark.parametrize("background", [-1.0, 0.3])
def test_foreground_mask_marks_pixels_off_the_border_colour(background):
    mask = foreground_mask(_object_on(background))
    expected = torch.zeros(2, 1, 16, 16)
    expected[0, :, 4:8, 5:9] = 1
    assert torch.equal(mask, expected)


def test_margin_grows_the_mask_by_that_many_pixels_on_every_side():
    x = _object_on(-1.0)
    expected = torch.zeros(2, 1, 16, 16)
    expected[0, :, 2:10, 3:11] = 1  # rows 4:8, columns 5:9, two more on each side
    assert torch.equal(foreground_mask(x, margin=2), expected)


def test_with_a_margin_an_edge_costs_the_same_grown_or_shrunk():
    x = _object_on(-1.0)
    yellow = x[0, :, 4, 5].clone()
    grown, shrunk = x.clone(), x.clone()
    grown[0, :, 8, 5:9] = yellow[:, None]  # one row of background painted as the object
    shrunk[0, :, 7, 5:9] = -1.0  # the object's last row painted as background
    assert reconstruction_loss(grown, x, "l2", 4.0, margin=2) == pytest.approx(
        reconstruction_loss(shrunk, x, "l2", 4.0, margin=2).item(), rel=1e-6)
    # without one, growing into the background is the cheaper error
    assert reconstruction_loss(grown, x, "l2", 4.0) < reconstruction_loss(shrunk, x, "l2", 4.0) / 2


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_zero_weight_is_the_plain_mean(kind):
    x, recon = _object_on(-1.0), torch.randn(2, 3, 16, 16)
    plain = F.l1_loss(recon, x) if kind == "l1" else F.mse_loss(recon, x)
    assert torch.equal(reconstruction_loss(recon, x, kind, 0.0), plain)


def test_foreground_error_costs_more_than_the_same_error_on_the_background():
    x = _object_on(-1.0)
    on_object, on_background = x.clone(), x.clone()
    on_object[0, :, 4:6, 5:9] += 0.5  # 8 pixels of the object
    on_background[0, :, 12:14, 5:9] += 0.5  # 8 background pixels
    w = 4.0
    a, b = reconstruction_loss(on_object, x, "l2", w), reconstruction_loss(on_background, x, "l2", w)
    # 16 of 512 pixels are foreground: mean weight 1 + 4 * 16 / 512, so the ratio is exactly 1 + w
    assert a / b == pytest.approx(1 + w, rel=1e-6)
    mean_weight = 1 + w * 16 / 512
    assert b.item() == pytest.approx(F.mse_loss(on_background, x).item() / mean_weight, rel=1e-6)


def test_negative_foreground_weight_or_margin_is_refused():
    with pytest.raises(ConfigError, match="foreground_weight must be >= 0"):
        VQTrainConfig(foreground_weight=-1.0)
    with pytest.raises(ConfigError, match="foreground_margin must be >= 0 pixels"):
        VQTrainConfig(foreground_margin=-1)
