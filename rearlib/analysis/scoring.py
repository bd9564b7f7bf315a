"""Image metrics of decoded token sequences (experiments A and B).

Decoded images are compared with the real image (columns ``psnr``, ``ssim``, ``perceptual``; the paper's
definition) and with the tokenizer's reconstruction of x (``psnr_recon``, ``ssim_recon``, ``perceptual_recon``),
which isolates the generator's errors from the tokenizer's. PSNR (L = 255) and SSIM on uint8 images via
:mod:`rearlib.metrics`; ``perceptual`` is :func:`rearlib.metrics.perceptual_distance` - LPIPS-VGG when its ImageNet
trunk is on disk, otherwise ST-LPIPS(alex) - and the column ``perceptual_metric`` holds the name of what was
computed. Identical images give PSNR = +inf (use :func:`rearlib.analysis.mean_ci`, which reports non-finite values
separately).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

import rearlib.metrics as M
from rearlib.analysis.common import check_choice

IMAGE_METRICS = ("psnr", "ssim", "perceptual")


def image_metrics(decoded: torch.Tensor, reference: torch.Tensor, *, which: Sequence[str] = IMAGE_METRICS,
                  perceptual: str | Callable | None = "auto", classifier=None, scale: str = "smoke"):
    """Per-image metrics of ``decoded`` vs ``reference`` (float ``[B, 3, H, W]`` in [0, 1]).

    Returns ``({"psnr": [B], "ssim": [B], "perceptual": [B]} float64 CPU tensors, perceptual metric name)``;
    metrics not in ``which`` are NaN. ``perceptual``: a ``prefer`` string for
    :func:`rearlib.metrics.perceptual_distance` (one of :data:`rearlib.metrics.PERCEPTUAL_CHOICES`, default
    ``"auto"``; ``classifier`` / ``scale`` are passed on for the ``"dfd"`` diagnostic), a callable ``(a, b) ->
    (values [B], name)``, or None (skipped, name ``"none"``).
    """
    which = check_choice(which, IMAGE_METRICS, "which") if which else []
    B = decoded.shape[0]
    nan = torch.full((B,), float("nan"), dtype=torch.float64)
    out = {k: nan.clone() for k in IMAGE_METRICS}
    name = "none"
    if "psnr" in which:
        out["psnr"] = M.psnr(decoded, reference)
    if "ssim" in which:
        out["ssim"] = M.ssim(decoded, reference)
    if "perceptual" in which and perceptual is not None:
        if callable(perceptual):
            vals, name = perceptual(decoded, reference)
        else:
            vals, name = M.perceptual_distance(decoded, reference, perceptual, classifier=classifier, scale=scale,
                                               device=decoded.device)
        out["perceptual"] = torch.as_tensor(vals, dtype=torch.float64).reshape(-1).cpu()
    return out, str(name)


class Scorer:
    """Decodes token rows and scores them against real images and reconstructions (A and B share it)."""

    def __init__(self, tokenizer, real_images, gt_tokens, *, which, perceptual, classifier, scale, references):
        self.tokenizer = tokenizer
        self.real = real_images
        self.gt = gt_tokens
        self.which = list(which) if which else []
        self.kw = dict(perceptual=perceptual, classifier=classifier, scale=scale)
        refs = check_choice(references, ("image", "reconstruction"), "references") if references else []
        if real_images is None and "image" in refs:
            refs = [r for r in refs if r != "image"]  # token-only data: no real image to compare with
        self.refs = refs
        self.metric_name = "none"
        self._recon: dict[int, torch.Tensor] = {}

    def reconstruction(self, idx: list[int]) -> torch.Tensor:
        missing = sorted({i for i in idx if i not in self._recon})
        if missing:
            rec = self.tokenizer.decode(self.gt[missing])
            for i, im in zip(missing, rec):
                self._recon[i] = im
        return torch.stack([self._recon[i] for i in idx])

    @property
    def columns(self) -> list[str]:
        """The image-metric columns of a row: ``psnr``, ``ssim``, ``perceptual`` per reference, with the suffix
        ``_recon`` against the reconstruction (empty when no metric is computed)."""
        cols = []
        for ref in (self.refs if self.which else []):
            cols += [k + ("" if ref == "image" else "_recon") for k in IMAGE_METRICS]
        return cols

    @property
    def active(self) -> bool:
        """Whether any image metric is computed (otherwise rows need no decoding)."""
        return bool(self.refs and self.which)

    def __call__(self, tokens: torch.Tensor, idx: list[int], *, need_images: bool = False):
        """tokens [R, N] on any device, idx: image positions (into the data) of each row -> (columns, images).
        Decodes only when a metric or the caller needs the images (else returns ({}, None))."""
        if not (self.active or need_images):
            return {}, None
        dec = self.tokenizer.decode(tokens)
        cols = {}
        for ref in self.refs:
            if ref == "image":
                target = self.real[idx].to(dec.device, torch.float32)
                suffix = ""
            else:
                target = self.reconstruction(idx).to(dec.device)
                suffix = "_recon"
            vals, name = image_metrics(dec, target, which=self.which, **self.kw)
            if "perceptual" in self.which and self.kw["perceptual"] is not None:
                self.metric_name = name
            for k, v in vals.items():
                cols[k + suffix] = v.tolist()
        return cols, dec
