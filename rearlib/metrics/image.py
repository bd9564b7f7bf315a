"""Image metrics on quantised images: :func:`to_uint8`, PSNR and SSIM (scikit-image).

Images in: float tensors ``[B, 3, H, W]`` in [0, 1]. They are quantised to uint8 (``round(255 x)``) before PSNR/SSIM,
exactly as a PNG on disk would be. The input checks here (:func:`_check_images`, :func:`_image_pair`) are shared by
the perceptual distances (:mod:`rearlib.metrics.perceptual`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def _check_images(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch tensor [B, 3, H, W] in [0, 1]")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be [B, C, H, W] with C in (1, 3); got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be float in [0, 1] (got {x.dtype}); this API takes float images and "
                        f"quantises them itself")
    lo, hi = float(x.min()), float(x.max())
    # Decoders clamp to [0, 1]; a range like [-1, 1] means the caller passed the wrong convention.
    if lo < -0.02 or hi > 1.02:
        raise ValueError(f"{name} must be in [0, 1]; found range [{lo:.3f}, {hi:.3f}] "
                         f"(a [-1, 1] tensor? use (x + 1) / 2)")
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, C, H, W] in [0, 1] -> uint8 [B, C, H, W], round(255 x), as a PNG writer would store it."""
    x = _check_images(images, "images")
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _uint8_hwc(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def _image_pair(a, b):
    a, b = _check_images(a, "a"), _check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on uint8 images: 10 log10(255^2 / MSE) (Eq. 10-11, L = 255).

    ``skimage.metrics.peak_signal_noise_ratio(a_u8, b_u8, data_range=255)`` per image; identical images give
    +inf (average with care: the notebooks report the mean over finite values and the count of infinities).
    """
    from skimage.metrics import peak_signal_noise_ratio  # here, not at the top: skimage.metrics takes ~2 s to import

    a, b = _image_pair(a, b)
    ua, ub = _uint8_hwc(a), _uint8_hwc(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divide by zero for identical images -> inf, by design
        vals = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(ua, ub)]
    return torch.tensor(vals, dtype=torch.float64)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM on uint8 images: ``skimage.metrics.structural_similarity(a_u8, b_u8, channel_axis=-1,
    data_range=255)`` (scikit-image defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03), then averaged by the
    caller. Images must be at least 7x7. (SSIM is not used in the paper; it is offered as a familiar extra.)
    """
    from skimage.metrics import structural_similarity  # here, not at the top: skimage.metrics takes ~2 s to import

    a, b = _image_pair(a, b)
    if min(a.shape[-2:]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels (scikit-image's window); got {tuple(a.shape[-2:])}")
    ua, ub = _uint8_hwc(a), _uint8_hwc(b)
    return torch.tensor([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(ua, ub)],
                        dtype=torch.float64)
