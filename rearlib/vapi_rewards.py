"""The VA-π reward and advantages (docs/paper.md, VA-π §1.4): per-image reconstruction reward
R = -(w_mse · MSE + w_p · D_p) of decoded samples against their reference image, the perceptual distance D_p behind
it, the within-group spread of each term (and the λ_p = w_p that equalises them), the group-normalised, clipped
advantages computed from R, and the same reward measured on held-out images."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from rearlib import metrics
from rearlib.metrics.classifier import get_classifier
from rearlib.vapi_config import VAPIConfig


class RewardResult(NamedTuple):
    """``rewards`` [M] = -(w_mse * mse + w_p * perceptual) over the terms the config selects; ``mse`` [M] on [-1, 1]
    images (always measured); ``perceptual`` [M] (zeros when not measured); ``perceptual_metric``: the name of the
    perceptual distance measured ("none" when it was not)."""

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
                    perceptual_fn: Callable | None = None, *, measure_perceptual: bool = False) -> RewardResult:
    """Per-image reconstruction reward R = -(w_mse · MSE + w_p · D_p) (docs/paper.md, VA-π §1.4).

    ``decoded``, ``reference``: float [M, 3, H, W] in [0, 1], same shape. MSE = mean over C×H×W of
    ((2·decoded - 1) - (2·reference - 1))², i.e. on [-1, 1] images as the code. ``perceptual_fn(decoded,
    reference)`` returns per-image distances [M] (a tensor), or a pair ``(values, metric_name)`` such as
    :class:`rearlib.metrics.PerceptualResult`; it is required when the perceptual term enters the reward
    (``cfg.uses_perceptual``; :func:`make_perceptual_fn` builds the default). Its name is reported in
    ``perceptual_metric``. Only the terms ``cfg`` selects (``reward_terms`` and the weights) enter R; MSE is always
    measured, and D_p also when it is not in R if ``measure_perceptual`` and a ``perceptual_fn`` is given (to
    compare the terms' spreads, or to score held-out images on both).
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
    if cfg.uses_perceptual and perceptual_fn is None:
        raise ValueError("the reward's perceptual term (reward_terms / reward_perceptual_weight) needs a "
                         "perceptual_fn; build the default with rearlib.vapi.make_perceptual_fn(cfg.perceptual) or "
                         "pass any callable(a, b) -> [M]")
    if cfg.uses_perceptual or (measure_perceptual and perceptual_fn is not None):
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
    w_mse = cfg.reward_mse_weight if cfg.uses_mse else 0.0
    w_p = cfg.reward_perceptual_weight if cfg.uses_perceptual else 0.0
    rewards = -(w_mse * mse + w_p * perc)
    return RewardResult(rewards, mse, perc, name)


def _as_groups(x: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    """``x`` [B * G] (image-major) or [B, G] as a float [B, G] view."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor [B * G] or [B, G]")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (the unbiased std needs 2 samples), got {group_size!r}")
    if x.dim() == 2:
        if x.shape[1] != group_size:
            raise ValueError(f"{name} [B, G] has G = {x.shape[1]} but group_size = {group_size}")
        return x.float()
    if x.dim() == 1:
        if x.shape[0] % group_size or x.shape[0] == 0:
            raise ValueError(f"{name}: {x.shape[0]} values are not a whole number of groups of {group_size}")
        return x.float().view(-1, group_size)
    raise ValueError(f"{name} must be [B * G] or [B, G], got shape {tuple(x.shape)}")


def group_std_mean(x: torch.Tensor, group_size: int) -> float:
    """Mean over groups of the unbiased standard deviation within each group of ``group_size`` values
    (``x`` [B * G] image-major, or [B, G]): the spread the group normalisation of the advantages sees."""
    return float(_as_groups(x, group_size, "x").std(1, correction=1).mean())


class RewardSpreads(NamedTuple):
    """Within-group spreads of the two reward terms (:func:`reward_spreads`).

    ``mse_spread``, ``perceptual_spread``: mean over groups of the unbiased std of the term among the G samples of
    one image; ``lambda_p``: the perceptual weight that makes ``lambda_p * perceptual_spread`` equal
    ``mse_weight * mse_spread``; ``groups``: number of groups."""

    mse_spread: float
    perceptual_spread: float
    lambda_p: float
    groups: int


def reward_spreads(mse: torch.Tensor, perceptual: torch.Tensor, group_size: int, *,
                   mse_weight: float = 1.0) -> RewardSpreads:
    """How much each reward term varies among the G samples of one image, and the λ_p that equalises them.

    After group normalisation only within-group differences matter, so a term whose within-group spread is 80x
    the other's decides the advantages alone, whatever the terms' mean values. ``mse``, ``perceptual``: per-sample
    values [B * G] (image-major, as :func:`vapi_step` lays them out) or [B, G], e.g. the ``mse`` / ``perceptual``
    of a :class:`RewardResult` measured with ``measure_perceptual=True`` on a base model's rollouts. Returns
    :class:`RewardSpreads`; λ_p = ``mse_weight`` · mse_spread / perceptual_spread (use it as
    ``reward_perceptual_weight`` with ``reward_mse_weight = mse_weight``). A perceptual term that never varies
    within a group leaves λ_p undefined and raises.
    """
    m = _as_groups(mse, group_size, "mse")
    p = _as_groups(perceptual, group_size, "perceptual")
    if m.shape != p.shape:
        raise ValueError(f"mse {tuple(mse.shape)} and perceptual {tuple(perceptual.shape)} hold different samples")
    if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(p).all())):
        raise ValueError("mse and perceptual must be finite")
    if not mse_weight > 0:
        raise ValueError(f"mse_weight must be > 0, got {mse_weight}")
    ms, ps = float(m.std(1, correction=1).mean()), float(p.std(1, correction=1).mean())
    if ps == 0:
        raise ValueError("the perceptual term has no spread within any group (every sample of an image scores the "
                         "same), so no λ_p can balance it against the MSE")
    return RewardSpreads(ms, ps, mse_weight * ms / ps, m.shape[0])


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float | None = 5.0, *,
                     eps: float = 1e-8) -> torch.Tensor:
    """Group-normalised advantages A = clip((r - mean_g) / (std_g + eps), -clip, clip).

    ``rewards``: [B * G] (groups contiguous: image-major, as :func:`vapi_step` lays them out) or [B, G]. mean_g and
    std_g are over the G rewards of one image; std is the unbiased (n - 1) standard deviation (torch's default, as
    the code). A group whose rewards all tie gets advantage 0. Returns a tensor of the input's shape.
    """
    r = _as_groups(rewards, group_size, "rewards")
    shape = rewards.shape
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
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


class HeldoutRewards(NamedTuple):
    """Per-image results of :func:`heldout_reconstruction_reward` for n images and S draws per image.

    ``rewards``, ``mse``, ``perceptual``: [n, S] (``perceptual`` zeros without a perceptual callable); ``ce`` [n]:
    teacher-forced cross-entropy of the GT tokens (nats/token, τ = 1); ``ctr`` [n]: fraction of positions whose
    argmax is the GT token; ``perceptual_metric``: name of the perceptual distance ("none" without one)."""

    rewards: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor
    ce: torch.Tensor
    ctr: torch.Tensor
    perceptual_metric: str


@torch.no_grad()
def heldout_reconstruction_reward(model, tokenizer, images: torch.Tensor, labels: torch.Tensor,
                                  tokens: torch.Tensor, cfg: VAPIConfig, perceptual_fn: Callable | None = None, *,
                                  seed: int, samples_per_image: int = 1, batch: int = 250) -> HeldoutRewards:
    """The VA-π reconstruction reward of ``model`` on held-out images: what post-training optimises, measured on
    images it never saw.

    For each image, the model predicts every token from the true prefix (teacher forcing, eval mode, clean context;
    the caller's train/eval mode is restored), ``samples_per_image`` tokens are drawn independently at every
    position from softmax(logits / ``cfg.temperature``) - the rollout policy of a VA-π step with ξ = 0 - and each
    draw is decoded by ``tokenizer`` and scored against the real image by :func:`compute_rewards` under ``cfg``
    (the run's reward terms and weights, λ_p included; the perceptual distance is measured whenever
    ``perceptual_fn`` is given, also when it is not in the reward). The draws come from a generator seeded with
    ``seed``, so models scored with the same seed get the same random numbers (common random numbers).

    ``images`` [n, 3, H, W] in [0, 1], ``labels`` [n], ``tokens`` [n, N] (their GT tokens). ``batch``: images per
    forward pass; decoding runs ``cfg.decode_batch`` sequences at a time. With ``samples_per_image`` = G the result
    also feeds :func:`reward_spreads` (``res.mse``, ``res.perceptual``), e.g. to choose λ_p on a base model.
    """
    images = check_image_batch(images, "images")
    if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.shape[0] != images.shape[0]:
        raise ValueError(f"tokens must be [n, N] with n = {images.shape[0]} images, got "
                         f"{tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [n] = [{images.shape[0]}], got {tuple(labels.shape)}")
    for name, v in (("samples_per_image", samples_per_image), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    n, seq_len = tokens.shape
    k, S = int(tokenizer.codebook_size), samples_per_image
    gen = torch.Generator(device=images.device).manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    parts: dict[str, list] = {"rewards": [], "mse": [], "perceptual": [], "ce": [], "ctr": []}
    metric = "none"
    try:
        for s in range(0, n, batch):
            t, y, img = tokens[s:s + batch], labels[s:s + batch], images[s:s + batch]
            b = len(t)
            logits = model(t, y).logits.float()  # logits[:, i] predicts x_i from the true prefix x_{<i}
            probs = (logits / cfg.temperature).softmax(-1)
            draw = torch.multinomial(probs.reshape(-1, k), S, replacement=True, generator=gen)
            draw = draw.view(b, seq_len, S).permute(0, 2, 1).reshape(b * S, seq_len)     # image-major
            decoded = torch.cat([tokenizer.decode(draw[i:i + cfg.decode_batch]).float()
                                 for i in range(0, b * S, cfg.decode_batch)])
            rr = compute_rewards(decoded.to(img.device), img.repeat_interleave(S, 0), cfg, perceptual_fn,
                                 measure_perceptual=True)
            metric = rr.perceptual_metric
            parts["rewards"].append(rr.rewards.view(b, S).cpu())
            parts["mse"].append(rr.mse.view(b, S).cpu())
            parts["perceptual"].append(rr.perceptual.view(b, S).cpu())
            parts["ce"].append(F.cross_entropy(logits.transpose(1, 2), t.long(), reduction="none").mean(1).cpu())
            parts["ctr"].append((logits.argmax(-1) == t).float().mean(1).cpu())
    finally:
        model.train(was_training)
    cat = {key: torch.cat(v) for key, v in parts.items()}
    return HeldoutRewards(cat["rewards"], cat["mse"], cat["perceptual"], cat["ce"], cat["ctr"], metric)
