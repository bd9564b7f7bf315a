"""The VA-π reward and advantages (docs/paper.md, VA-π §1.4): per-image reconstruction reward
R = -(w_mse · MSE + w_p · D_p) of decoded samples against their reference image, the perceptual distance D_p behind
it, and the group-normalised, clipped advantages computed from R."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from rearlib import metrics
from rearlib.metrics.classifier import get_classifier
from rearlib.vapi_config import VAPIConfig


class RewardResult(NamedTuple):
    """``rewards`` [M] = -(w_mse * mse + w_p * perceptual); ``mse`` [M] on [-1, 1] images; ``perceptual`` [M]
    (zeros when w_p = 0); ``perceptual_metric``: the name of the perceptual distance used ("none" when off)."""

    rewards: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor
    perceptual_metric: str


def check_image_batch(x: Any, name: str) -> torch.Tensor:
    """``x`` if it is a float image batch [M, 3, H, W] in [0, 1] (M > 0), else a TypeError / ValueError."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor [M, 3, H, W] in [0, 1], got "
                        f"{type(x).__name__ if not torch.is_tensor(x) else x.dtype}")
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [M, 3, H, W] with M > 0, got {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} must be finite and in [0, 1] (images), got values in [{lo:.4g}, {hi:.4g}]; "
                         f"for [-1, 1] images use (x + 1) / 2")
    return x


def perceptual_name(fn: Callable | None) -> str:
    """The metric name a perceptual callable reports: its ``metric_name`` attribute, else its ``__name__``."""
    if fn is None:
        return "none"
    return str(getattr(fn, "metric_name", None) or getattr(fn, "__name__", None) or type(fn).__name__)


@torch.no_grad()
def compute_rewards(decoded: torch.Tensor, reference: torch.Tensor, cfg: VAPIConfig,
                    perceptual_fn: Callable | None = None) -> RewardResult:
    """Per-image reconstruction reward R = -(w_mse · MSE + w_p · D_p) (docs/paper.md, VA-π §1.4).

    ``decoded``, ``reference``: float [M, 3, H, W] in [0, 1], same shape. MSE = mean over C×H×W of
    ((2·decoded - 1) - (2·reference - 1))², i.e. on [-1, 1] images as the code. ``perceptual_fn(decoded,
    reference)`` returns per-image distances [M] (a tensor), or a pair ``(values, metric_name)`` such as
    :class:`rearlib.metrics.PerceptualResult`; it is required when ``cfg.reward_perceptual_weight > 0``
    (:func:`make_perceptual_fn` builds the default). Its name is reported in ``perceptual_metric``.
    """
    decoded = check_image_batch(decoded, "decoded")
    reference = check_image_batch(reference, "reference")
    if decoded.shape != reference.shape:
        raise ValueError(f"decoded {tuple(decoded.shape)} and reference {tuple(reference.shape)} differ in shape; "
                         f"the reward compares images at the tokenizer's resolution")
    a, b = decoded.float(), reference.to(decoded.device).float()
    mse = ((a * 2 - 1) - (b * 2 - 1)).pow(2).flatten(1).mean(1)
    perc = torch.zeros_like(mse)
    name = "none"
    if cfg.reward_perceptual_weight > 0:
        if perceptual_fn is None:
            raise ValueError("reward_perceptual_weight > 0 needs a perceptual_fn; build the default with "
                             "rearlib.vapi.make_perceptual_fn(cfg.perceptual) or pass any callable(a, b) -> [M]")
        out = perceptual_fn(a, b)
        name = perceptual_name(perceptual_fn)
        if isinstance(out, tuple):  # (values, metric name), e.g. metrics.PerceptualResult
            out, name = out[0], str(out[1])
        out = torch.as_tensor(out).to(device=mse.device, dtype=torch.float32).flatten()
        if out.shape != mse.shape:
            raise ValueError(f"perceptual_fn returned {tuple(out.shape)} values for {mse.shape[0]} images")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"perceptual_fn ({name}) returned non-finite distances")
        perc = out
    rewards = -(cfg.reward_mse_weight * mse + cfg.reward_perceptual_weight * perc)
    return RewardResult(rewards, mse, perc, name)


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float | None = 5.0, *,
                     eps: float = 1e-8) -> torch.Tensor:
    """Group-normalised advantages A = clip((r - mean_g) / (std_g + eps), -clip, clip).

    ``rewards``: [B * G] (groups contiguous: image-major, as :func:`vapi_step` lays them out) or [B, G]. mean_g and
    std_g are over the G rewards of one image; std is the unbiased (n - 1) standard deviation (torch's default, as
    the code). A group whose rewards all tie gets advantage 0. Returns a tensor of the input's shape.
    """
    if not torch.is_tensor(rewards) or not rewards.is_floating_point():
        raise TypeError("rewards must be a float tensor")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (the unbiased std needs 2 samples), got {group_size!r}")
    shape = rewards.shape
    if rewards.dim() == 2:
        if shape[1] != group_size:
            raise ValueError(f"rewards [B, G] has G = {shape[1]} but group_size = {group_size}")
        r = rewards
    elif rewards.dim() == 1:
        if shape[0] % group_size:
            raise ValueError(f"{shape[0]} rewards are not a whole number of groups of {group_size}")
        r = rewards.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be [B * G] or [B, G], got shape {tuple(shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    r = r.float()
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, correction=1) + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(shape)


def make_perceptual_fn(prefer: str = "auto", *, scale: str = "smoke", device=None, classifier=None,
                       allow_substitute: bool = True, batch_size: int = 64) -> Callable:
    """A perceptual-distance callable for the reward, backed by :func:`rearlib.metrics.perceptual_distance`.

    ``prefer`` as there: "auto" is LPIPS-VGG when its weights are on disk, else ST-LPIPS(alex); an LPIPS named
    explicitly falls back to ST-LPIPS(alex) only with ``allow_substitute``; "dfd" uses the in-project classifier
    of ``scale`` (loaded once here rather than on every call). The returned function maps (a, b)
    [M, 3, H, W] in [0, 1] to distances [M] (float32 on a's device) and carries ``metric_name`` (e.g. "LPIPS-VGG"
    or "ST-LPIPS(alex)") and ``reason``.
    """
    choice, name, reason = metrics.resolve_perceptual(prefer)
    if prefer.lower().startswith("lpips-") and not choice.startswith("lpips-") and not allow_substitute:
        raise metrics.LPIPSUnavailable(reason)
    if name == metrics.DFD_NAME and classifier is None:
        classifier = get_classifier(scale, device or "cpu")

    def perceptual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        res = metrics.perceptual_distance(a, b, prefer, classifier=classifier, scale=scale, device=device,
                                          batch_size=batch_size, allow_substitute=allow_substitute)
        if res.metric != name:  # the environment changed under us: never mislabel a number
            raise RuntimeError(f"perceptual metric changed from {name} to {res.metric} during the run")
        return res.values.to(device=a.device, dtype=torch.float32)

    perceptual.metric_name = name
    perceptual.reason = reason
    return perceptual
