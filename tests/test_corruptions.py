"""Image corruptions: seeded, shape- and dtype-preserving, stronger with severity, right in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freetickets_hub.evaluation import CORRUPTIONS, SEVERITIES, CorruptionTransform, corrupt


def _textured(channels: int) -> torch.Tensor:
    """A smooth pattern plus fine detail, away from 0 and 255 so every corruption has room to act."""
    yy, xx = np.mgrid[:24, :24]
    base = 128 + 60 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + 20 * ((xx + yy) % 2)
    image = np.stack([base + 10 * c for c in range(channels)])
    return torch.from_numpy(image.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_corruption_is_seeded_and_grows_with_severity(name, channels):
    image = _textured(channels)
    change = {}
    for severity in SEVERITIES:
        transform = CorruptionTransform(name, severity, seed=0)
        out = transform(image, 7)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        assert torch.equal(out, transform(image, 7))  # same seed and index: same image, whatever the batching
        change[severity] = (out.float() - image.float()).abs().mean().item()
    assert change[1] > 0, f"{name} at severity 1 leaves the image unchanged"
    assert change[5] > change[1], f"{name}: severity 5 changes less than severity 1 ({change})"


def test_noise_depends_on_seed_and_image_index():
    image = _textured(1)
    noise = CorruptionTransform("gaussian_noise", 3, seed=0)
    assert not torch.equal(noise(image, 0), noise(image, 1))
    assert not torch.equal(noise(image, 0), CorruptionTransform("gaussian_noise", 3, seed=1)(image, 0))


def test_closed_forms():
    rng = np.random.default_rng(0)
    flat = torch.full((1, 8, 8), 100, dtype=torch.uint8)
    assert corrupt(flat, "brightness", 5, rng).unique().tolist() == [round(100 + 0.3 * 255)]
    two_level = torch.tensor([[[50, 150]] * 2], dtype=torch.uint8)  # mean 100
    assert corrupt(two_level, "contrast", 2, rng).unique().tolist() == [75, 125]  # (x - 100) * 0.5 + 100
    impulse = corrupt(_textured(3), "impulse_noise", 5, rng)
    changed = impulse != _textured(3)
    assert set(impulse[changed].unique().tolist()) <= {0, 255}
    assert 0.03 < changed.float().mean().item() < 0.1  # p = 0.07 of the values are hit
    assert torch.equal(corrupt(flat, "gaussian_blur", 5, rng), flat)  # blurs keep a flat image
    assert torch.equal(corrupt(flat, "defocus_blur", 5, rng), flat)


def test_bad_names_and_severities():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        CorruptionTransform("fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt(_textured(1), "contrast", 6, np.random.default_rng(0))
