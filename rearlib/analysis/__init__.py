"""The paper's diagnosis analyses (paper §3.1, App. B-C; docs/paper.md, reAR §2, choices of §6) as pure functions.

Every analysis is a function of (generator, tokenizer, images or tokens, class labels, settings, randomness) that
returns a tidy :class:`pandas.DataFrame` - one row per image per setting (CKA: one row per layer per target,
pooled over images) - and shows a tqdm bar. Notebooks aggregate with :func:`mean_ci` and put the paper's numbers
next to ours with :func:`paper_reference`.

Notation: ``x = (x_1..x_N)`` the ground-truth (GT) token sequence of an image (raster order), ``x̂`` the evaluated
sequence, ``z(k)`` the tokenizer's raw codebook vector of code ``k`` (``tokenizer.codebook[k]``), ``p_θ`` the
generator's *conditional* next-token distribution (class label given, no guidance, temperature 1).

Experiment A - exposure bias (:func:`exposure_bias`; paper §3.1 Fig. 3a, App. B Fig. 8a-d)
    For a GT ratio ``r`` let ``k = floor(r N)``. A set ``F`` of ``k`` positions is forced to GT:
    ``"perfect"`` context: ``F = {1..k}`` (front-loaded); ``"imperfect"`` context: ``F`` = a uniformly random
    ``k``-subset. Positions ``t = 1..N`` are produced in raster order: ``x̂_t = x_t`` if ``t ∈ F`` else a draw from
    the model given the current mixed prefix ``x̂_{<t}`` (the model keeps generating after every sampled, possibly
    wrong, token). Default draw: multinomial at temperature 1 without CFG (reAR §6 item 3); options: temperature,
    argmax, CFG (``s_t`` of :func:`rearlib.sample.cfg_scale_at`). The full ``x̂`` is decoded and compared with the real
    image (and with the tokenizer's reconstruction of ``x``, which isolates the generator's errors from the
    tokenizer's). Columns (besides the settings):

    * ``ctr`` = (1/N) Σ_t 1[x̂_t = x_t] of the final sequence (measured CTR; reAR §6 item 4: plot this, record
      ``ratio``). ``ctr_free`` = the same over the sampled positions only (chance agreement), NaN when nothing was
      sampled.
    * ``ppl`` = exp(-(1/N) Σ_t log p_θ(x̂_t | x̂_{<t})): the perplexity of the evaluated sequence under the model
      given its own prefix - **the quantity we plot as "perplexity"** (reAR §6 item 5; values above K are possible, as
      in the paper's Fig. 8). ``ppl_gt`` = exp(-(1/N) Σ_t log p_θ(x_t | x̂_{<t})): the GT tokens' perplexity given the
      evaluated prefix. Both are read off the very logits the decoding loop computed (conditional rows, before
      CFG and temperature), which equal the teacher-forced logits on ``x̂`` up to float round-off.
    * ``first_error`` = 0-based index of the first position with x̂_t != x_t (N when none).
    * image metrics (below).

Experiment B - embedding-nearest replacement (:func:`embedding_replacement`; §3.1 Fig. 3b, Fig. 7, Fig. 8e-g)
    Teacher forcing on ``x`` gives ``x̂_t = argmax p_θ(· | x_{<t})`` (Eq. 8). Each wrong position (x̂_t != x_t) is
    selected with probability ``r'`` and its token replaced by ``c(x_t)``; the sequence is decoded directly (no
    further generation). ``mode``: ``"nearest"`` c = the code with the highest cosine similarity to z(x_t) other
    than x_t itself (the paper's protocol; reAR §6 item 7: precomputed top-1 neighbour, ties -> lowest id); contrasts
    at the same positions: ``"farthest"`` (lowest cosine, other than x_t) and ``"random"`` (uniform over the K-1 codes
    other than x_t). A replacement never equals x_t, so CTR is unchanged by construction; this is checked for
    every row and a violation raises :class:`RuntimeError`. Selection uses one uniform ``v_t`` per (image,
    position, repeat) and selects ``v_t < r'``, so the selected sets are nested in ``r'`` and identical across
    modes (common random numbers). Columns: ``ctr``; ``n_wrong``, ``n_replaced`` (selected), ``n_changed``
    (selected positions whose token actually changed: the neighbour may already be the prediction);
    ``emb_sim_wrong`` / ``emb_sim_all`` = mean cos(z(x̂_t), z(x_t)) over wrong / all positions (reAR §6 item 6; "wrong"
    is our reading of the paper's "embedding similarity"); ``ppl`` / ``ppl_gt`` as in A for the replaced sequence
    (teacher-forced on it); ``ppl_tf`` = exp(-(1/N) Σ_t log p_θ(x̂_t | x_{<t})), the replaced tokens scored in the
    GT context the predictions were made in; ``*_delta`` = value minus the same image's value at r' = 0 (the
    plain teacher-forced argmax sequence; the paper's ΔPerplexity); image metrics.

Experiment C - robustness of next-token prediction (:func:`robustness`; App. C.1, Fig. 9a)
    Teacher-forced CTR, Eq. 8, of ``argmax p_θ(· | x̃_{<t})`` against the clean ``x_t`` for t = 1..N. ``"clean"``:
    x̃ = x. ``"noisy"``: exactly ``round(f (N - 1))`` of the context tokens x_1..x_{N-1} (x_N is context for
    nothing) are chosen uniformly without replacement and replaced by a uniform code different from the original
    (so the realised corruption rate is exactly f up to rounding; the paper's "10% replaced uniformly at random").
    Columns: ``ctr``, ``n_replaced``, ``noise_rate`` (realised), ``ctr_after_noisy`` / ``ctr_after_clean`` =
    CTR over targets x_{t+1} whose immediately preceding input x̃_t was / was not replaced (NaN for clean).

Experiment D - CKA layer analysis (:func:`cka_layers`; App. C.2, Fig. 9b-c)
    Rows = image-token positions pooled over images (reAR §6 item 9: clean input, CLS and class positions excluded).
    X = output of block ℓ (0-based, before the final adaLN; :meth:`Generator.forward_features`) at the input
    position of x_t. Targets: ``"encoded"`` Y = z(x_t) (the current token, t = 1..N); ``"decoded"`` Y = z(x_{t+1})
    (the next token, t = 1..N-1). Linear CKA (Eq. 13, the plug-in estimator of :func:`rearlib.metrics.linear_cka`)
    is accumulated over batches from centred cross-products in float64 (:class:`StreamingLinearCKA`), so every
    position of every image can be pooled without holding the rows. ``is_peak`` marks each curve's maximum.

Image metrics (A and B)
    Decoded images are compared with the real image (columns ``psnr``, ``ssim``, ``perceptual``; the paper's
    definition) and with the tokenizer's reconstruction of x (``psnr_recon``, ``ssim_recon``,
    ``perceptual_recon``). PSNR (L = 255) and SSIM on uint8 images via :mod:`rearlib.metrics`; ``perceptual`` is
    :func:`rearlib.metrics.perceptual_distance` - LPIPS-VGG when its ImageNet trunk is on disk, otherwise
    ST-LPIPS(alex) - and the column ``perceptual_metric`` holds the name of what was computed. Identical images give
    PSNR = +inf (use :func:`mean_ci`, which reports non-finite values separately).

Randomness
    ``generator`` (a :class:`torch.Generator` or an int seed) yields one base seed; every random draw of a row is
    made by a CPU generator seeded with SplitMix64(base seed, stream, image id, setting), so a row depends only
    on (model, image, settings, seed) - not on the batch it is in or the other settings requested (up to float
    round-off of batched kernels). In A the two protocols at the same (image, r, repeat) share their sampling
    uniforms (common random numbers), so their difference is not confounded by sampling luck.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rearlib import scales

__all__ = [
    "RATIOS", "R_PRIMES", "PROTOCOLS", "REPLACEMENT_MODES", "CKA_TARGETS",
    "forced_decode", "exposure_bias", "codebook_neighbours", "embedding_replacement",
    "teacher_forced_predictions", "perturb_context", "robustness",
    "StreamingLinearCKA", "cka_layers", "image_metrics", "encode_images", "mean_ci", "paper_reference",
]

RATIOS, R_PRIMES = scales.RATIOS, scales.R_PRIMES  # the paper's grids
PROTOCOLS = ("perfect", "imperfect")
REPLACEMENT_MODES = ("nearest", "random", "farthest")
CKA_TARGETS = ("encoded", "decoded")


# Random streams (part of every row seed, so the draws of different purposes are independent).
_STREAM_NOISE, _STREAM_SUBSET, _STREAM_SELECT, _STREAM_RANDOM_CODE, _STREAM_CONTEXT, _STREAM_CKA_ROWS = range(1, 7)
_MASK64 = (1 << 64) - 1


# ================================================================================================================
# Small helpers: seeds, checks, batching
# ================================================================================================================
def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _row_seed(*parts: int) -> int:
    """SplitMix64 fold of integers -> a 63-bit seed (order matters; negative ints are folded mod 2**64)."""
    z = 0
    for p in parts:
        z = _splitmix(z ^ (int(p) & _MASK64))
    return z >> 1


def _row_gen(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_row_seed(*parts))
    return g


def _base_seed(generator) -> int:
    """One base seed from a torch.Generator (advancing it), an int seed, or None (= seed 0)."""
    if generator is None:
        return 0
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return int(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}")


def _key(x: float) -> int:
    """Integer key of a setting value (ratios are keyed in millionths, so 0.3 and 0.30000000000000004 agree)."""
    return int(round(float(x) * 1_000_000))


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _model_dims(model) -> tuple[int, int, int]:
    cfg = getattr(model, "config", None)
    if cfg is None or not all(hasattr(cfg, a) for a in ("seq_len", "codebook_size", "num_classes")):
        raise TypeError("model must be a rearlib.model.Generator (needs .config with seq_len, codebook_size, "
                        f"num_classes); got {type(model).__name__}")
    return cfg.seq_len, cfg.codebook_size, cfg.num_classes


def _check_pair(model, tokenizer) -> None:
    N, K, _ = _model_dims(model)
    if tokenizer is None:
        return
    if int(tokenizer.codebook_size) != K:
        raise ValueError(f"tokenizer codebook_size {tokenizer.codebook_size} != generator codebook_size {K}: "
                         f"the generator was not trained on this tokenizer's codes")
    h, w = tokenizer.grid_size
    if h * w != N:
        raise ValueError(f"tokenizer grid {h}x{w} = {h * w} tokens != generator seq_len {N}")


def _flat_tokens(tokens, N: int, K: int, name: str = "tokens") -> torch.Tensor:
    if not torch.is_tensor(tokens):
        raise TypeError(f"{name} must be a LongTensor [B, N] or [B, h, w], got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {tokens.dtype}")
    t = tokens.reshape(tokens.shape[0], -1) if tokens.ndim == 3 else tokens
    if t.ndim != 2 or t.shape[1] != N:
        raise ValueError(f"{name} must be [B, {N}] or a [B, h, w] grid with h*w = {N}; got {tuple(tokens.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if int(t.min()) < 0 or int(t.max()) >= K:
        raise ValueError(f"{name} ids must be image codes in [0, {K}); got range [{int(t.min())}, {int(t.max())}]")
    return t.long()


def _check_labels(labels, B: int, M: int) -> torch.Tensor:
    lab = torch.as_tensor(labels)
    if lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels, got {lab.dtype}")
    lab = lab.reshape(-1).long()
    if lab.numel() != B:
        raise ValueError(f"got {lab.numel()} labels for {B} images")
    if int(lab.min()) < 0 or int(lab.max()) > M:
        raise ValueError(f"labels must be in [0, {M}] ({M} = null class); got [{int(lab.min())}, {int(lab.max())}]")
    return lab


def _check_ids(image_ids, B: int) -> list[int]:
    if image_ids is None:
        return list(range(B))
    ids = [int(i) for i in (image_ids.tolist() if torch.is_tensor(image_ids) else image_ids)]
    if len(ids) != B:
        raise ValueError(f"got {len(ids)} image_ids for {B} images")
    if len(set(ids)) != B:
        raise ValueError("image_ids must be unique (they key the random draws and identify rows)")
    return ids


def _check_fracs(values, name: str, *, allow_one: bool = True) -> list[float]:
    vals = [float(v) for v in ([values] if isinstance(values, (int, float)) else values)]
    if not vals:
        raise ValueError(f"{name} is empty")
    hi_ok = (lambda v: v <= 1.0) if allow_one else (lambda v: v < 1.0)
    bad = [v for v in vals if not (0.0 <= v and hi_ok(v)) or v != v]
    if bad:
        raise ValueError(f"{name} must lie in [0, 1{']' if allow_one else ')'}; got {bad}")
    if len(set(_key(v) for v in vals)) != len(vals):
        raise ValueError(f"{name} has duplicates: {vals}")
    return vals


def _check_choice(values, allowed: Sequence[str], name: str) -> list[str]:
    vals = [values] if isinstance(values, str) else list(values)
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}; got {vals}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{name} has duplicates: {vals}")
    return vals


def _check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _k_of(r: float, N: int) -> int:
    # floor(r N); the epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
    return min(N, int(math.floor(r * N + 1e-9)))


@contextlib.contextmanager
def _eval(*modules):
    """Evaluation mode (no dropout) for the duration; restores each module's mode afterwards."""
    states = [(m, m.training) for m in modules if m is not None and hasattr(m, "training")]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was in states:
            m.train(was)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if enabled else torch.bfloat16, enabled=enabled)


def _tqdm(iterable, desc: str, total: int | None, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False)


@torch.no_grad()
def encode_images(tokenizer, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``tokenizer.encode`` in batches: float images ``[B, 3, R, R]`` in [0, 1] -> LongTensor ``[B, h*w]``."""
    _check_batch_size(batch_size)
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise TypeError("images must be a float tensor [B, 3, R, R] in [0, 1]")
    out = [tokenizer.encode(images[s:s + batch_size]).reshape(min(batch_size, len(images) - s), -1)
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def _prepare(model, tokenizer, data, labels, images, image_ids, batch_size):
    """-> tokens [B, N] (model device), labels [B] (model device), real images [B,3,R,R] or None, ids."""
    N, K, M = _model_dims(model)
    _check_pair(model, tokenizer)
    dev = _model_device(model)
    if not torch.is_tensor(data):
        raise TypeError("data must be float images [B, 3, R, R] in [0, 1] or integer tokens [B, N] / [B, h, w]")
    if data.is_floating_point():
        if images is not None:
            raise ValueError("data are images already; pass images= only together with token data")
        if tokenizer is None:
            raise ValueError("image data need a tokenizer to encode them")
        images = data
        tokens = encode_images(tokenizer, images, batch_size)
    else:
        tokens = data
    tokens = _flat_tokens(tokens, N, K).to(dev)
    B = tokens.shape[0]
    if images is not None:
        if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4 or images.shape[0] != B:
            raise ValueError(f"images must be float [B={B}, 3, R, R] in [0, 1]; got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if tokenizer is not None and tuple(images.shape[-2:]) != (tokenizer.resolution, tokenizer.resolution):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the tokenizer decodes "
                             f"{tokenizer.resolution}x{tokenizer.resolution}")
    return tokens, _check_labels(labels, B, M).to(dev), images, _check_ids(image_ids, B)


# ================================================================================================================
# Image metrics
# ================================================================================================================
_IMAGE_METRICS = ("psnr", "ssim", "perceptual")


def image_metrics(decoded: torch.Tensor, reference: torch.Tensor, *, which: Sequence[str] = _IMAGE_METRICS,
                  perceptual: str | Callable | None = "auto", classifier=None, scale: str = "smoke"):
    """Per-image metrics of ``decoded`` vs ``reference`` (float ``[B, 3, H, W]`` in [0, 1]).

    Returns ``({"psnr": [B], "ssim": [B], "perceptual": [B]} float64 CPU tensors, perceptual metric name)``;
    metrics not in ``which`` are NaN. ``perceptual``: a ``prefer`` string for
    :func:`rearlib.metrics.perceptual_distance` (one of :data:`rearlib.metrics.PERCEPTUAL_CHOICES`, default
    ``"auto"``; ``classifier`` / ``scale`` are passed on for the ``"dfd"`` diagnostic), a callable ``(a, b) ->
    (values [B], name)``, or None (skipped, name ``"none"``).
    """
    import rearlib.metrics as M

    which = _check_choice(which, _IMAGE_METRICS, "which") if which else []
    B = decoded.shape[0]
    nan = torch.full((B,), float("nan"), dtype=torch.float64)
    out = {k: nan.clone() for k in _IMAGE_METRICS}
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


class _Scorer:
    """Decodes token rows and scores them against real images and reconstructions (A and B share it)."""

    def __init__(self, tokenizer, real_images, gt_tokens, *, which, perceptual, classifier, scale, references):
        self.tokenizer = tokenizer
        self.real = real_images
        self.gt = gt_tokens
        self.which = list(which) if which else []
        self.kw = dict(perceptual=perceptual, classifier=classifier, scale=scale)
        refs = _check_choice(references, ("image", "reconstruction"), "references") if references else []
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


def _image_columns(scorer: _Scorer) -> list[str]:
    cols = []
    for ref in (scorer.refs if scorer.which else []):
        cols += [k + ("" if ref == "image" else "_recon") for k in _IMAGE_METRICS]
    return cols


# ================================================================================================================
# Experiment A: decoding with forced positions
# ================================================================================================================
def _pick(logits: torch.Tensor, u: torch.Tensor, sampling: str, temperature: float) -> torch.Tensor:
    """logits [R, K] -> ids [R]. Multinomial by inverse CDF with one uniform u in (0, 1] per row: the first id
    whose cumulative probability reaches u * total (an exact draw from softmax(logits / T); zero-probability ids
    are never returned because u > 0). ``argmax`` (or T = 0): the first maximum."""
    if sampling == "argmax" or temperature == 0:
        return logits.argmax(-1)
    p = torch.softmax(logits.double() / temperature, dim=-1)
    cdf = p.cumsum(-1)
    v = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, v).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def forced_decode(model, gt: torch.Tensor, forced: torch.Tensor, labels: torch.Tensor, uniforms=None, *,
                  sampling: str = "multinomial", temperature: float = 1.0, cfg_scale: float | None = None,
                  cfg_power: float = 0.0, use_cache: bool = True, dtype: torch.dtype | None = None):
    """Raster decoding where the positions in ``forced`` take the GT token and every other position is drawn
    from the model given the current (mixed) prefix. Batched over rows.

    gt [R, N] LongTensor, forced [R, N] bool, labels [R], uniforms [R, N] in (0, 1] (one per row and step; needed
    for multinomial sampling). ``cfg_scale`` None or 1 = no guidance; otherwise the conditional and null-class rows
    run as one 2R batch and ``logits = u + (c - u) s_t`` with ``s_t`` from :func:`rearlib.sample.cfg_scale_at`.
    ``use_cache=True`` runs the model's static KV cache (``prefill`` then one ``decode_step`` per position);
    ``False`` recomputes the whole prefix at every step (reference path, same result up to round-off).
    A prefix forced in every row is computed in one parallel pass. Runs the model in eval mode.

    Returns ``(x̂ [R, N] long, logp_self [R, N] float64, logp_gt [R, N] float64)`` with
    ``logp_self[:, t] = log p_θ(x̂_t | x̂_{<t})`` and ``logp_gt[:, t] = log p_θ(x_t | x̂_{<t})`` under the
    conditional model (no CFG, temperature 1).
    """
    N, K, M = _model_dims(model)
    dev = _model_device(model)
    gt = _flat_tokens(gt, N, K, "gt").to(dev)
    R = gt.shape[0]
    forced = torch.as_tensor(forced, device=dev)
    if forced.dtype != torch.bool or tuple(forced.shape) != (R, N):
        raise ValueError(f"forced must be a bool tensor [R={R}, N={N}], got {forced.dtype} {tuple(forced.shape)}")
    labels = _check_labels(labels, R, M).to(dev)
    if sampling not in ("multinomial", "argmax"):
        raise ValueError(f"sampling must be 'multinomial' or 'argmax', got {sampling!r}")
    if not (temperature >= 0):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = sampling == "argmax" or temperature == 0
    if not greedy:
        if uniforms is None:
            raise ValueError("multinomial sampling needs uniforms [R, N] in (0, 1]")
        uniforms = torch.as_tensor(uniforms)
        if tuple(uniforms.shape) != (R, N) or float(uniforms.min()) <= 0 or float(uniforms.max()) > 1:
            raise ValueError(f"uniforms must be [R={R}, N={N}] with values in (0, 1]")
        uniforms = uniforms.to(dev, torch.float64)
    use_cfg = cfg_scale is not None and float(cfg_scale) != 1.0
    if use_cfg:
        from rearlib.sample import cfg_scale_at

        scales = [cfg_scale_at(t, N, float(cfg_scale), float(cfg_power)) for t in range(N)]
        rows_cls = torch.cat([labels, torch.full_like(labels, M)])
    else:
        rows_cls = labels
    dup = (lambda x: torch.cat([x, x])) if use_cfg else (lambda x: x)

    out = gt.clone()
    logp_self = torch.empty(R, N, dtype=torch.float64, device=dev)
    logp_gt = torch.empty(R, N, dtype=torch.float64, device=dev)

    def record(t: int, cond_logits: torch.Tensor) -> None:
        lp = torch.log_softmax(cond_logits.double(), dim=-1)
        logp_self[:, t] = lp.gather(1, out[:, t:t + 1]).squeeze(1)
        logp_gt[:, t] = lp.gather(1, gt[:, t:t + 1]).squeeze(1)

    # Leading positions forced in every row are teacher-forced: computed in one parallel pass (at most N - 1 of
    # them, so that the last step still goes through the decoding path that samples).
    lead = int(forced.long().cumprod(dim=1).sum(dim=1).min())
    L0 = min(lead, N - 1)
    with _eval(model), _autocast(dev, dtype):
        if L0 > 0:
            # full_logits on x_1..x_{L0-1} gives the distributions of x_1..x_{L0}.
            pre = model.full_logits(gt[:, :L0 - 1], labels).float()
            for t in range(L0):
                record(t, pre[:, t])
        if use_cache:
            cache = model.new_kv_cache(rows_cls.numel(), N + 1, dtype=dtype or torch.float32)
        for t in range(L0, N):
            if t == L0:
                prefix = dup(out[:, :t])
                logits = model.prefill(prefix, rows_cls, cache) if use_cache else \
                    model.next_token_logits(prefix, rows_cls)
            elif use_cache:
                # Feed x̂_t (0-based column t - 1) at its sequence position t + 1; the window covers [0, t + 2).
                pos = torch.full((1,), t, dtype=torch.long, device=dev) + 1
                logits = model.decode_step(dup(out[:, t - 1]), pos, rows_cls, cache, kv_len=t + 2)
            else:
                logits = model.next_token_logits(dup(out[:, :t]), rows_cls)
            logits = logits.float()
            cond = logits[:R]
            guided = logits[R:] + (cond - logits[R:]) * scales[t] if use_cfg else cond
            if not bool(forced[:, t].all()):
                drawn = _pick(guided, None if greedy else uniforms[:, t], "argmax" if greedy else "multinomial",
                              temperature)
                out[:, t] = torch.where(forced[:, t], gt[:, t], drawn)
            record(t, cond)
    return out, logp_self, logp_gt


def exposure_bias(model, tokenizer, data, labels, *, images=None, ratios=RATIOS, protocols=PROTOCOLS,
                  repeats: int = 1, sampling: str = "multinomial", temperature: float = 1.0,
                  cfg_scale: float | None = None, cfg_power: float = 0.0, generator=None, batch_size: int = 64,
                  use_cache: bool = True, dtype: torch.dtype | None = None, metrics: Sequence[str] = _IMAGE_METRICS,
                  perceptual: str | Callable | None = "auto", classifier=None, scale: str = "smoke",
                  references=("image", "reconstruction"), image_ids=None, return_outputs: bool = False,
                  progress: bool = True):
    """Experiment A (module docstring): perfect vs imperfect context at GT ratios ``ratios``.

    data: real images float ``[B, 3, R, R]`` in [0, 1] (encoded with ``tokenizer``) or GT tokens ``[B, N]`` /
    ``[B, h, w]`` (then ``images=`` may give the real images; without them only the reconstruction is compared).
    labels: ``[B]`` class labels used as the condition. ratios in [0, 1]; protocols ⊆ ("perfect", "imperfect");
    ``repeats`` independent draws per (image, protocol, ratio). sampling / temperature / cfg_scale / cfg_power:
    the free-running draw (default: multinomial, T = 1, no CFG). generator: torch.Generator or int seed.
    metrics ⊆ ("psnr", "ssim", "perceptual"); perceptual / classifier / scale: see :func:`image_metrics`;
    references ⊆ ("image", "reconstruction"). image_ids: ids of the images (default 0..B-1; key the draws).

    Returns a DataFrame with one row per (protocol, ratio, repeat, image); with ``return_outputs`` also a dict
    ``{"tokens": x̂ [rows, N], "forced": bool [rows, N], "images": decoded [rows, 3, R, R]}`` (CPU, row order).
    """
    N, K, M = _model_dims(model)
    batch_size = _check_batch_size(batch_size)
    if tokenizer is None:
        raise ValueError("exposure_bias needs the tokenizer (it decodes every evaluated sequence)")
    tokens, labels, real, ids = _prepare(model, tokenizer, data, labels, images, image_ids, batch_size)
    ratios = _check_fracs(ratios, "ratios")
    protocols = _check_choice(protocols, PROTOCOLS, "protocols")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if sampling not in ("multinomial", "argmax"):
        raise ValueError(f"sampling must be 'multinomial' or 'argmax', got {sampling!r}")
    base = _base_seed(generator)
    B = tokens.shape[0]
    lab_list = labels.tolist()
    scorer = _Scorer(tokenizer, real, tokens, which=metrics, perceptual=perceptual, classifier=classifier,
                     scale=scale, references=references)
    # Settings-major row order: consecutive rows share (protocol, ratio), so a batch's forced prefix is common.
    jobs = [(p, r, rep, i) for p in protocols for r in ratios for rep in range(repeats) for i in range(B)]
    records, out_tok, out_forced, out_img = [], [], [], []
    batches = [jobs[s:s + batch_size] for s in range(0, len(jobs), batch_size)]
    with _eval(model, tokenizer):
        for batch in _tqdm(batches, "exposure bias", len(batches), progress):
            idx = [j[3] for j in batch]
            R = len(batch)
            forced = torch.zeros(R, N, dtype=torch.bool)
            u = torch.empty(R, N, dtype=torch.float64)
            for row, (p, r, rep, i) in enumerate(batch):
                k = _k_of(r, N)
                if p == "perfect":
                    forced[row, :k] = True
                else:
                    perm = torch.randperm(N, generator=_row_gen(base, _STREAM_SUBSET, ids[i], _key(r), rep))
                    forced[row, perm[:k]] = True
                # Shared by both protocols at the same (image, r, repeat): common random numbers.
                u[row] = 1.0 - torch.rand(N, generator=_row_gen(base, _STREAM_NOISE, ids[i], _key(r), rep),
                                          dtype=torch.float64)
            gt = tokens[idx]
            xh, lp_self, lp_gt = forced_decode(model, gt, forced.to(gt.device), labels[idx], u, sampling=sampling,
                                               temperature=temperature, cfg_scale=cfg_scale, cfg_power=cfg_power,
                                               use_cache=use_cache, dtype=dtype)
            correct = xh == gt
            f_dev = forced.to(gt.device)
            free = ~f_dev
            n_free = free.sum(1)
            ctr_free = torch.where(n_free > 0, (correct & free).sum(1).double() / n_free.clamp_min(1),
                                   torch.full_like(n_free, float("nan"), dtype=torch.float64))
            wrong_any = (~correct).any(1)
            first_err = torch.where(wrong_any, (~correct).long().argmax(1), torch.full_like(n_free, N))
            cols, dec = scorer(xh, idx, need_images=return_outputs)
            ctr_free, first_err, n_forced = ctr_free.tolist(), first_err.tolist(), forced.sum(1).tolist()
            ctr = correct.double().mean(1).tolist()
            ppl = lp_self.mean(1).neg().exp().tolist()
            ppl_gt = lp_gt.mean(1).neg().exp().tolist()
            for row, (p, r, rep, i) in enumerate(batch):
                rec = {"image_id": ids[i], "label": lab_list[i], "protocol": p, "ratio": r, "repeat": rep,
                       "n_tokens": N, "n_forced": n_forced[row], "ctr": ctr[row],
                       "ctr_free": ctr_free[row], "first_error": first_err[row],
                       "ppl": ppl[row], "ppl_gt": ppl_gt[row]}
                rec.update({c: v[row] for c, v in cols.items()})
                records.append(rec)
            if return_outputs:
                out_tok.append(xh.cpu())
                out_forced.append(forced)
                out_img.append(dec.cpu())
    df = _finish(records, scorer, dict(sampling="argmax" if sampling == "argmax" or temperature == 0
                                       else "multinomial", temperature=float(temperature),
                                       cfg_scale=1.0 if cfg_scale is None else float(cfg_scale),
                                       cfg_power=float(cfg_power), seed=base))
    if return_outputs:
        return df, {"tokens": torch.cat(out_tok), "forced": torch.cat(out_forced), "images": torch.cat(out_img)}
    return df


def _finish(records: list[dict], scorer: _Scorer | None, constants: dict) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records)
    if scorer is not None:
        for c in _image_columns(scorer):
            if c not in df:
                df[c] = float("nan")
        df["perceptual_metric"] = scorer.metric_name
    for k, v in constants.items():
        df[k] = v
    return df


# ================================================================================================================
# Experiment B: embedding-nearest replacement
# ================================================================================================================
@torch.no_grad()
def codebook_neighbours(codebook) -> dict:
    """Nearest and farthest code of every code under cosine similarity, the code itself excluded.

    codebook: ``[K, D]`` tensor or a tokenizer (its ``.codebook``). Returns ``{"nearest": [K] long,
    "nearest_cos": [K] float64, "farthest": [K] long, "farthest_cos": [K] float64}`` (CPU). Similarities in
    float64; ties go to the lowest id. A zero code vector has cosine 0 to everything.
    """
    cb = codebook.codebook if hasattr(codebook, "codebook") and not torch.is_tensor(codebook) else codebook
    if not torch.is_tensor(cb) or cb.ndim != 2 or cb.shape[0] < 2:
        raise ValueError("codebook must be a [K, D] tensor with K >= 2 (or a tokenizer)")
    z = F.normalize(cb.detach().double().cpu(), dim=1)
    sim = z @ z.T
    eye = torch.eye(sim.shape[0], dtype=torch.bool)
    near = sim.masked_fill(eye, float("-inf"))
    far = sim.masked_fill(eye, float("inf"))
    n_cos, n_id = near.max(dim=1)
    f_cos, f_id = far.min(dim=1)
    return {"nearest": n_id, "nearest_cos": n_cos, "farthest": f_id, "farthest_cos": f_cos}


@torch.no_grad()
def teacher_forced_predictions(model, tokens: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64,
                               dtype: torch.dtype | None = None, return_log_probs: bool = False):
    """Teacher forcing on ``tokens`` ([B, N]): argmax predictions ``x̂_t = argmax p_θ(· | x_{<t})`` [B, N], and with
    ``return_log_probs`` the log-softmax ``[B, N, K]`` (float32, model device). Eval mode."""
    N, K, M = _model_dims(model)
    dev = _model_device(model)
    tokens = _flat_tokens(tokens, N, K).to(dev)
    labels = _check_labels(labels, tokens.shape[0], M).to(dev)
    preds, lps = [], []
    with _eval(model), _autocast(dev, dtype):
        for s in range(0, tokens.shape[0], _check_batch_size(batch_size)):
            logits = model(tokens[s:s + batch_size], labels[s:s + batch_size]).logits.float()
            preds.append(logits.argmax(-1))
            if return_log_probs:
                lps.append(torch.log_softmax(logits, dim=-1))
    pred = torch.cat(preds)
    return (pred, torch.cat(lps)) if return_log_probs else pred


@torch.no_grad()
def _sequence_log_probs(model, seqs, labels, others, batch_size, dtype):
    """Teacher forcing on ``seqs`` [R, N]: (log p(seqs_t | seqs_<t), log p(others_t | seqs_<t)), [R, N] float64
    each, computed batch by batch so that the [R, N, K] log-softmax is never held for all rows at once."""
    dev = _model_device(model)
    a, b = [], []
    with _eval(model), _autocast(dev, dtype):
        for s in range(0, seqs.shape[0], batch_size):
            lp = torch.log_softmax(model(seqs[s:s + batch_size], labels[s:s + batch_size]).logits.float(), dim=-1)
            a.append(lp.gather(-1, seqs[s:s + batch_size].unsqueeze(-1)).squeeze(-1).double())
            b.append(lp.gather(-1, others[s:s + batch_size].unsqueeze(-1)).squeeze(-1).double())
    return torch.cat(a), torch.cat(b)


def embedding_replacement(model, tokenizer, data, labels, *, images=None, r_primes=R_PRIMES,
                          modes=REPLACEMENT_MODES, repeats: int = 1, generator=None, batch_size: int = 64,
                          dtype: torch.dtype | None = None, metrics: Sequence[str] = _IMAGE_METRICS,
                          perceptual: str | Callable | None = "auto", classifier=None, scale: str = "smoke",
                          references=("image", "reconstruction"), image_ids=None, return_outputs: bool = False,
                          progress: bool = True):
    """Experiment B (module docstring): teacher-forced argmax predictions whose wrong tokens are replaced with
    probability r' by the nearest / a random / the farthest code of the TRUE token, decoded directly.

    Arguments as :func:`exposure_bias`; ``r_primes`` in [0, 1] (r' = 0 is always computed: it is the baseline of
    the ``*_delta`` columns), ``modes`` ⊆ ("nearest", "random", "farthest"). Returns one row per (mode, r',
    repeat, image); with ``return_outputs`` also ``{"tokens", "images"}`` in row order (CPU). Raises
    RuntimeError if a replaced sequence's CTR differs from the teacher-forced CTR (cannot happen unless the
    neighbour tables are wrong).
    """
    N, K, M = _model_dims(model)
    batch_size = _check_batch_size(batch_size)
    if tokenizer is None:
        raise ValueError("embedding_replacement needs the tokenizer (codebook neighbours and decoding)")
    tokens, labels, real, ids = _prepare(model, tokenizer, data, labels, images, image_ids, batch_size)
    r_primes = _check_fracs(r_primes, "r_primes")
    modes = _check_choice(modes, REPLACEMENT_MODES, "modes")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    requested = set(_key(r) for r in r_primes)
    if 0 not in requested:
        r_primes = [0.0] + r_primes
    base = _base_seed(generator)
    dev = tokens.device
    codebook = tokenizer.codebook.detach()
    nb = codebook_neighbours(codebook)
    table = {"nearest": nb["nearest"].to(dev), "farthest": nb["farthest"].to(dev)}
    B = tokens.shape[0]
    lab_list = labels.tolist()
    scorer = _Scorer(tokenizer, real, tokens, which=metrics, perceptual=perceptual, classifier=classifier,
                     scale=scale, references=references)
    from rearlib.metrics import embedding_similarity

    per_image = len(modes) * len(r_primes) * repeats
    img_chunk = max(1, batch_size // per_image)
    records, out_tok, out_img = [], [], []
    chunks = [list(range(s, min(B, s + img_chunk))) for s in range(0, B, img_chunk)]
    with _eval(model, tokenizer):
        for chunk in _tqdm(chunks, "embedding replacement", len(chunks), progress):
            gt = tokens[chunk]
            lab = labels[chunk]
            pred, lp_gt_ctx = teacher_forced_predictions(model, gt, lab, batch_size=batch_size, dtype=dtype,
                                                         return_log_probs=True)
            wrong = pred != gt
            ctr_tf = (~wrong).double().mean(1)
            rows, meta = [], []
            for rep in range(repeats):
                v = torch.stack([torch.rand(N, generator=_row_gen(base, _STREAM_SELECT, ids[i], rep),
                                            dtype=torch.float64) for i in chunk]).to(dev)
                # Uniform over the K - 1 codes other than the true one: draw in [0, K-1), skip the true id.
                rc = torch.stack([torch.randint(0, K - 1, (N,), generator=_row_gen(base, _STREAM_RANDOM_CODE,
                                                                                   ids[i], rep))
                                  for i in chunk]).to(dev)
                rc = rc + (rc >= gt).long()
                for mode in modes:
                    repl = rc if mode == "random" else table[mode][gt]
                    for rp in r_primes:
                        sel = wrong & (v < rp)
                        rows.append(torch.where(sel, repl, pred))
                        meta.append((mode, rp, rep, sel))
            seqs = torch.stack(rows, 1).reshape(-1, N)                      # [b * per_image, N], image-major
            n_per = len(rows)
            img_pos = [c for c in chunk for _ in range(n_per)]
            sel_all = torch.stack([m[3] for m in meta], 1).reshape(-1, N)
            rep_gt = gt.repeat_interleave(n_per, 0)
            rep_pred = pred.repeat_interleave(n_per, 0)
            ctr = (seqs == rep_gt).double().mean(1)
            ctr_ref = ctr_tf.repeat_interleave(n_per)
            if not torch.equal(ctr, ctr_ref):
                bad = int((ctr != ctr_ref).nonzero()[0])
                raise RuntimeError(f"replacement changed the CTR of row {bad} ({float(ctr_ref[bad]):.6f} -> "
                                   f"{float(ctr[bad]):.6f}); a replacement code equals the true token")
            lab_rows = lab.repeat_interleave(n_per)
            lp_self, lp_gt_rows = _sequence_log_probs(model, seqs, lab_rows, rep_gt, batch_size, dtype)
            # The replaced tokens scored in the GT context (the context the predictions were made in).
            local = torch.arange(len(chunk), device=dev).repeat_interleave(n_per)
            lp_tf = lp_gt_ctx[local[:, None], torch.arange(N, device=dev)[None, :], seqs].double()
            ctr = ctr.tolist()
            ppl = lp_self.mean(1).neg().exp().tolist()
            ppl_gt = lp_gt_rows.mean(1).neg().exp().tolist()
            ppl_tf = lp_tf.mean(1).neg().exp().tolist()
            sim_w = embedding_similarity(seqs, rep_gt, codebook, over="wrong").tolist()
            sim_a = embedding_similarity(seqs, rep_gt, codebook, over="all").tolist()
            n_wrong = (rep_pred != rep_gt).sum(1).tolist()
            n_sel = sel_all.sum(1).tolist()
            n_changed = (seqs != rep_pred).sum(1).tolist()
            cols, decs = {}, []
            for s in range(0, seqs.shape[0], batch_size):
                c, d = scorer(seqs[s:s + batch_size], img_pos[s:s + batch_size], need_images=return_outputs)
                for k, vals in c.items():
                    cols.setdefault(k, []).extend(vals)
                if return_outputs:
                    decs.append(d.cpu())
            for row in range(seqs.shape[0]):
                i = img_pos[row]
                mode, rp, rep, _ = meta[row % n_per]
                rec = {"image_id": ids[i], "label": lab_list[i], "mode": mode, "r_prime": rp, "repeat": rep,
                       "n_tokens": N, "ctr": ctr[row], "n_wrong": n_wrong[row], "n_replaced": n_sel[row],
                       "n_changed": n_changed[row], "emb_sim_wrong": sim_w[row], "emb_sim_all": sim_a[row],
                       "ppl": ppl[row], "ppl_gt": ppl_gt[row], "ppl_tf": ppl_tf[row]}
                rec.update({c: v[row] for c, v in cols.items()})
                records.append(rec)
            if return_outputs:
                out_tok.append(seqs.cpu())
                out_img.append(torch.cat(decs))
    df = _finish(records, scorer, dict(seed=base))
    # Deltas against the same (image, mode, repeat) at r' = 0.
    key = ["image_id", "mode", "repeat"]
    base_rows = df[df["r_prime"] == 0.0].set_index(key)
    for c in ["ppl", "ppl_gt", "ppl_tf", "emb_sim_wrong", "emb_sim_all"] + _image_columns(scorer):
        ref = base_rows[c].reindex(pd.MultiIndex.from_frame(df[key])).to_numpy()
        with np.errstate(invalid="ignore"):
            df[c + "_delta"] = df[c].to_numpy() - ref
    if 0 not in requested:
        keep = df["r_prime"] != 0.0
        df = df[keep].reset_index(drop=True)
        if return_outputs:
            m = torch.as_tensor(keep.to_numpy())
            out_tok, out_img = [torch.cat(out_tok)[m]], [torch.cat(out_img)[m]]
    if return_outputs:
        return df, {"tokens": torch.cat(out_tok), "images": torch.cat(out_img)}
    return df


# ================================================================================================================
# Experiment C: robustness of next-token prediction
# ================================================================================================================
def perturb_context(tokens: torch.Tensor, fraction: float, codebook_size: int, generators: Sequence[torch.Generator]):
    """Replace exactly ``round(fraction * (N - 1))`` of the context tokens x_1..x_{N-1} of each row, chosen
    uniformly without replacement, by a uniform code different from the original (one CPU generator per row).

    Returns ``(noisy [B, N], replaced [B, N] bool)``; x_N (context for no prediction) is never touched."""
    t = tokens
    B, N = t.shape
    if len(generators) != B:
        raise ValueError(f"need one generator per row ({B}), got {len(generators)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = int(round(fraction * (N - 1)))
    noisy = t.clone()
    replaced = torch.zeros(B, N, dtype=torch.bool)
    for b, g in enumerate(generators):
        pos = torch.randperm(N - 1, generator=g)[:n]
        new = torch.randint(0, codebook_size - 1, (n,), generator=g)
        pos_d = pos.to(t.device)
        orig = t[b, pos_d].cpu()
        new = new + (new >= orig).long()
        noisy[b, pos_d] = new.to(t.device)
        replaced[b, pos] = True
    return noisy, replaced.to(t.device)


def robustness(model, data, labels, *, tokenizer=None, noise_fraction: float = 0.1,
               conditions: Sequence[str] = ("clean", "noisy"), repeats: int = 1, generator=None,
               batch_size: int = 128, dtype: torch.dtype | None = None, image_ids=None,
               progress: bool = True) -> pd.DataFrame:
    """Experiment C (module docstring): teacher-forced CTR with clean context and with ``noise_fraction`` of the
    context replaced at random. data: GT tokens ``[B, N]`` (or images, encoded with ``tokenizer``).
    Returns one row per (condition, repeat, image); "clean" rows have ``repeat = 0`` only."""
    N, K, M = _model_dims(model)
    batch_size = _check_batch_size(batch_size)
    tokens, labels, _, ids = _prepare(model, tokenizer, data, labels, None, image_ids, batch_size)
    conditions = _check_choice(conditions, ("clean", "noisy"), "conditions")
    _check_fracs([noise_fraction], "noise_fraction")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    base = _base_seed(generator)
    B = tokens.shape[0]
    lab_list = labels.tolist()
    jobs = [(c, rep) for c in conditions for rep in (range(repeats) if c == "noisy" else [0])]
    records = []
    chunks = [list(range(s, min(B, s + batch_size))) for s in range(0, B, batch_size)]
    with _eval(model):
        for cond, rep in jobs:
            for chunk in _tqdm(chunks, f"robustness ({cond})", len(chunks), progress):
                gt = tokens[chunk]
                if cond == "clean":
                    inp, replaced = gt, torch.zeros_like(gt, dtype=torch.bool)
                else:
                    gens = [_row_gen(base, _STREAM_CONTEXT, ids[i], _key(noise_fraction), rep) for i in chunk]
                    inp, replaced = perturb_context(gt, noise_fraction, K, gens)
                pred = teacher_forced_predictions(model, inp, labels[chunk], batch_size=batch_size, dtype=dtype)
                correct = pred == gt
                # Target x_{t+1} (column t) follows input x̃_t (column t-1); column 0 follows the class token.
                after_noisy = torch.zeros_like(replaced)
                after_noisy[:, 1:] = replaced[:, :-1]
                nan = torch.full((len(chunk),), float("nan"), dtype=torch.float64, device=gt.device)
                n_an, n_ac = after_noisy.sum(1), (~after_noisy).sum(1)
                c_an = torch.where(n_an > 0, (correct & after_noisy).sum(1) / n_an.clamp_min(1), nan)
                c_ac = (correct & ~after_noisy).sum(1) / n_ac.clamp_min(1) if cond == "noisy" else nan
                n_rep = replaced.sum(1).tolist()
                ctr, c_an, c_ac = correct.double().mean(1).tolist(), c_an.tolist(), c_ac.tolist()
                for row, i in enumerate(chunk):
                    records.append({
                        "image_id": ids[i], "label": lab_list[i], "condition": cond,
                        "noise_fraction": noise_fraction if cond == "noisy" else 0.0, "repeat": rep,
                        "n_tokens": N, "n_replaced": n_rep[row], "noise_rate": n_rep[row] / (N - 1),
                        "ctr": ctr[row], "ctr_after_noisy": c_an[row], "ctr_after_clean": c_ac[row],
                    })
    return _finish(records, None, dict(seed=base))


# ================================================================================================================
# Experiment D: CKA
# ================================================================================================================
class StreamingLinearCKA:
    """Linear CKA (Eq. 13) of row-paired matrices X [n, p], Y [n, q] fed in batches of rows.

    Keeps float64 sums of the shifted rows a = x - s_x, b = y - s_y (shifts = the first batch's means, for
    numerical safety) and of their cross-products; then the centred matrices are
    C_ab = Σ a bᵀ - (Σa)(Σb)ᵀ / n (likewise C_aa, C_bb) and CKA = ||C_ab||_F² / (||C_aa||_F ||C_bb||_F), which is
    exactly :func:`rearlib.metrics.linear_cka` on the stacked rows. Memory O(p² + q² + pq), whatever n is.
    """

    def __init__(self):
        self.n = 0
        self.sx = self.sy = None

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> "StreamingLinearCKA":
        if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise ValueError(f"X, Y must be [n, p], [n, q] with the same n; got {tuple(X.shape)}, {tuple(Y.shape)}")
        if X.shape[0] == 0:
            return self
        X, Y = X.double(), Y.to(X.device).double()
        if self.sx is None:
            self.sx, self.sy = X.mean(0), Y.mean(0)
            p, q = X.shape[1], Y.shape[1]
            z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=X.device)  # noqa: E731
            self.a, self.b, self.ab, self.aa, self.bb = z(p), z(q), z(p, q), z(p, p), z(q, q)
        elif X.shape[1] != self.a.shape[0] or Y.shape[1] != self.b.shape[0]:
            raise ValueError("feature dimensions changed between updates")
        a, b = X - self.sx, Y - self.sy
        self.a += a.sum(0)
        self.b += b.sum(0)
        self.ab += a.T @ b
        self.aa += a.T @ a
        self.bb += b.T @ b
        self.n += X.shape[0]
        return self

    def value(self) -> float:
        if self.n < 2:
            raise ValueError("CKA needs at least 2 rows")
        n = self.n
        cab = self.ab - torch.outer(self.a, self.b) / n
        caa = self.aa - torch.outer(self.a, self.a) / n
        cbb = self.bb - torch.outer(self.b, self.b) / n
        den = torch.linalg.matrix_norm(caa) * torch.linalg.matrix_norm(cbb)
        if den <= 0:
            raise ValueError("CKA is undefined when X or Y is constant across rows")
        return float(torch.linalg.matrix_norm(cab) ** 2 / den)


@torch.no_grad()
def cka_layers(model, codebook, data, labels, *, tokenizer=None, layers=None, targets=CKA_TARGETS,
               include_class_position: bool = False, max_rows_per_image: int | None = None, generator=None,
               batch_size: int = 64, dtype: torch.dtype | None = None, image_ids=None,
               progress: bool = True) -> pd.DataFrame:
    """Experiment D (module docstring): linear CKA between every block's output and the current ("encoded") /
    next ("decoded") token's codebook vectors, pooled over images and positions.

    codebook: ``[K, D]`` raw code vectors or a tokenizer (its ``.codebook``; then image data are encoded with it).
    layers: block indices (default all, 0..depth-1). include_class_position: also pair the class-token position
    with z(x_1) in the "decoded" rows (the reAR decode loss covers it; default off: image-token positions only).
    max_rows_per_image: optional random subset of positions per image (shared by all layers and targets).
    Returns one row per (target, layer) with ``cka``, ``n_rows``, ``n_images``, ``depth``, ``relative_depth``
    (layer / (depth - 1)) and ``is_peak`` (the layer of highest CKA per target).
    """
    N, K, M = _model_dims(model)
    batch_size = _check_batch_size(batch_size)
    is_tok = hasattr(codebook, "codebook") and not torch.is_tensor(codebook)
    tok = codebook if is_tok else tokenizer
    cb = codebook.codebook.detach() if is_tok else torch.as_tensor(codebook).detach()
    if cb.ndim != 2 or cb.shape[0] != K:
        raise ValueError(f"codebook must be [K={K}, D]; got {tuple(cb.shape)}")
    tokens, labels, _, ids = _prepare(model, tok, data, labels, None, image_ids, batch_size)
    targets = _check_choice(targets, CKA_TARGETS, "targets")
    depth = model.config.depth
    layers = list(range(depth)) if layers is None else [int(l) % depth for l in layers]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct block indices; got {layers}")
    if max_rows_per_image is not None and (not isinstance(max_rows_per_image, int) or max_rows_per_image < 1):
        raise ValueError(f"max_rows_per_image must be a positive int or None, got {max_rows_per_image!r}")
    base = _base_seed(generator)
    dev = tokens.device
    cb = cb.to(dev).float()
    acc = {(t, l): StreamingLinearCKA() for t in targets for l in layers}
    n_rows = {t: 0 for t in targets}
    B = tokens.shape[0]
    chunks = [list(range(s, min(B, s + batch_size))) for s in range(0, B, batch_size)]
    with _eval(model), _autocast(dev, dtype):
        for chunk in _tqdm(chunks, "CKA", len(chunks), progress):
            gt = tokens[chunk]
            feats = model.forward_features(gt, labels[chunk], layers)   # {l: [b, N + 2, C]}
            b = len(chunk)
            # Rows: (image, input position of x_t) for t = 1..N -> sequence position t + 1.
            keep = torch.ones(b, N, dtype=torch.bool)
            if max_rows_per_image is not None and max_rows_per_image < N:
                keep.zero_()
                for r, i in enumerate(chunk):
                    keep[r, torch.randperm(N, generator=_row_gen(base, _STREAM_CKA_ROWS, ids[i]))
                         [:max_rows_per_image]] = True
            keep = keep.to(dev)
            z = cb[gt]                                                    # [b, N, D]
            for t in targets:
                if t == "encoded":
                    m = keep                                              # x_t with z(x_t), t = 1..N
                    ys = z[m]
                else:
                    m = keep.clone()
                    m[:, -1] = False                                      # x_N has no next token
                    ys = torch.roll(z, -1, dims=1)[m]                     # x_t with z(x_{t+1})
                for l in layers:
                    h = feats[l][:, 2:].float()                           # image-token positions
                    xs = h[m]
                    if t == "decoded" and include_class_position:
                        xs = torch.cat([xs, feats[l][:, 1].float()])
                        ys_l = torch.cat([ys, z[:, 0]])
                    else:
                        ys_l = ys
                    acc[(t, l)].update(xs, ys_l)
                n_rows[t] += int(m.sum()) + (b if t == "decoded" and include_class_position else 0)
    records = []
    for t in targets:
        vals = {l: acc[(t, l)].value() for l in layers}
        peak = max(vals, key=vals.get)
        for l in layers:
            records.append({"target": t, "layer": l, "cka": vals[l], "n_rows": n_rows[t], "n_images": B,
                            "depth": depth, "relative_depth": l / max(1, depth - 1), "is_peak": l == peak})
    return _finish(records, None, dict(include_class_position=include_class_position, method="linear (plug-in)"))


# ================================================================================================================
# Aggregation and the paper's numbers
# ================================================================================================================
def mean_ci(df: pd.DataFrame, by: Sequence[str], values: Sequence[str], *, level: float = 0.95) -> pd.DataFrame:
    """Mean and Student-t confidence interval of each ``values`` column per group of ``by`` (tidy, long).

    Per (group, metric): ``n`` finite values, ``n_nonfinite`` (e.g. PSNR = inf for identical images, excluded),
    ``mean``, ``std`` (ddof 1), ``sem`` = std / sqrt(n), ``ci_low`` / ``ci_high`` = mean ∓ t_{(1+level)/2, n-1} sem
    (NaN when n < 2).
    """
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    by, values = list(by), list(values)
    missing = [c for c in by + values if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the DataFrame (has {list(df.columns)})")
    out = []
    for keys, g in (df.groupby(by, sort=True, dropna=False) if by else [((), df)]):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for v in values:
            x = pd.to_numeric(g[v], errors="coerce").to_numpy(dtype=float)
            fin = x[np.isfinite(x)]
            n = len(fin)
            mean = float(fin.mean()) if n else float("nan")
            std = float(fin.std(ddof=1)) if n > 1 else float("nan")
            sem = std / math.sqrt(n) if n > 1 else float("nan")
            half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sem if n > 1 else float("nan")
            out.append({**dict(zip(by, keys)), "metric": v, "n": n, "n_nonfinite": int(len(x) - n),
                        "mean": mean, "std": std, "sem": sem, "ci_low": mean - half, "ci_high": mean + half,
                        "level": level})
    return pd.DataFrame(out)


# Digitised from docs/paper.md, reAR §2.1-§2.4 (sources: the project page's figure files, reAR §0:
# exposure_bias.png / app_exposure_bias.png, embedding_unawareness.png / app_emb_similarity.png, analysis.png;
# bar labels exact).
_PAPER_A = {  # ratio: (LPIPS imperfect, LPIPS perfect, PSNR imperfect, PSNR perfect)
    0.1: (0.65, 0.59, 9.7, 10.7), 0.2: (0.58, 0.50, 10.8, 11.6), 0.3: (0.55, 0.44, 11.3, 11.9),
    0.4: (0.46, 0.38, 12.5, 13.0), 0.5: (0.40, 0.32, 13.7, 13.7), 0.6: (0.31, 0.24, 15.7, 15.8),
    0.7: (0.23, 0.19, 16.6, 16.7), 0.8: (0.17, 0.12, 18.3, 18.6), 0.9: (0.10, 0.06, 21.2, 21.6),
}
_PAPER_B = {  # r': (LPIPS exact, PSNR exact, embedding similarity ≈, ΔPPL ≈)
    0.0: (0.317, 14.80, 0.50, 0.0), 0.2: (0.287, 15.47, 0.57, 55.0), 0.4: (0.275, 15.90, 0.65, 140.0),
    0.6: (0.272, 16.23, 0.72, 245.0), 0.8: (0.269, 16.31, 0.80, 390.0),
}
_PAPER_C = {  # (model, data): (clean %, noisy %)
    ("AR", "trained"): (12.8, 9.1), ("AR", "unseen"): (11.8, 8.3),
    ("reAR", "trained"): (12.9, 9.5), ("reAR", "unseen"): (12.3, 9.0),
}
_PAPER_D = {  # (model, target): CKA at layers 0, 5, 10, 15, 19 of a 20-block model
    ("AR", "encoded"): (0.39, 0.14, 0.07, 0.05, 0.02), ("reAR", "encoded"): (0.74, 0.26, 0.14, 0.06, 0.02),
    ("AR", "decoded"): (0.035, 0.068, 0.063, 0.099, 0.067), ("reAR", "decoded"): (0.037, 0.062, 0.071, 0.130, 0.068),
}
_EXPERIMENT_NAMES = {"A": "A", "exposure_bias": "A", "B": "B", "replacement": "B", "embedding_replacement": "B",
                     "C": "C", "robustness": "C", "D": "D", "cka": "D", "cka_layers": "D"}


def ci_of(x, *, level: float = 0.95) -> dict:
    """Mean and Student-t interval of a 1-D array (non-finite values dropped, as :func:`mean_ci`):
    ``{"mean", "lo", "hi", "n"}``."""
    s = mean_ci(pd.DataFrame({"v": np.asarray(x, float)}), by=[], values=["v"], level=level).iloc[0]
    return {"mean": s["mean"], "lo": s["ci_low"], "hi": s["ci_high"], "n": int(s["n"])}


def paper_reference(experiment: str) -> pd.DataFrame:
    """The paper's numbers for an analysis, as a tidy DataFrame (docs/paper.md, reAR §2.1-§2.4).

    ``"A"`` / ``"exposure_bias"``: protocol, ratio, ctr (the paper plots CTR ≈ r), perceptual (LPIPS, backbone not
    stated), psnr - digitised ±0.01 LPIPS / ±0.2 dB. ``"B"`` / ``"replacement"``: r_prime, perceptual, psnr (exact
    bar labels), emb_sim and ppl_delta (digitised). ``"C"`` / ``"robustness"``: model, data (trained / unseen),
    condition (clean / noisy), ctr (fraction) and ctr_percent (printed values). ``"D"`` / ``"cka"``: model,
    target (encoded / decoded), layer, relative_depth (of 20 blocks), cka (digitised ±0.005). Every frame has
    ``source`` and ``precision`` columns; the analysis model/checkpoint/number of images are not stated in the
    paper (docs/paper.md, reAR §2).
    """
    e = _EXPERIMENT_NAMES.get(experiment)
    if e is None:
        raise ValueError(f"unknown experiment {experiment!r}; use one of {sorted(_EXPERIMENT_NAMES)}")
    rows = []
    if e == "A":
        for r, (li, lp, pi, pp) in _PAPER_A.items():
            rows.append({"protocol": "imperfect", "ratio": r, "ctr": r, "perceptual": li, "psnr": pi})
            rows.append({"protocol": "perfect", "ratio": r, "ctr": r, "perceptual": lp, "psnr": pp})
        df = pd.DataFrame(rows)
        df["perceptual_metric"] = "LPIPS (paper; backbone not stated)"
        df["source"] = "Fig. 3a / Fig. 8a-b (exposure_bias.png, app_exposure_bias.png)"
        df["precision"] = "digitised: ±0.01 LPIPS, ±0.2 dB"
    elif e == "B":
        for r, (lp, ps, sim, dppl) in _PAPER_B.items():
            rows.append({"r_prime": r, "perceptual": lp, "psnr": ps, "emb_sim": sim, "ppl_delta": dppl})
        df = pd.DataFrame(rows)
        df["perceptual_metric"] = "LPIPS (paper; backbone not stated)"
        df["source"] = "Fig. 3b / Fig. 8e-g (embedding_unawareness.png, app_emb_similarity.png)"
        df["precision"] = "perceptual, psnr: exact bar labels; emb_sim, ppl_delta: digitised"
    elif e == "C":
        for (model, data), (clean, noisy) in _PAPER_C.items():
            for cond, v in (("clean", clean), ("noisy", noisy)):
                rows.append({"model": model, "data": data, "condition": cond, "ctr": v / 100.0, "ctr_percent": v,
                             "noise_fraction": 0.1 if cond == "noisy" else 0.0})
        df = pd.DataFrame(rows)
        df["source"] = "App. C.1, Fig. 9a"
        df["precision"] = "exact (printed values)"
    else:
        layers = (0, 5, 10, 15, 19)
        for (model, target), vals in _PAPER_D.items():
            for l, v in zip(layers, vals):
                rows.append({"model": model, "target": target, "layer": l, "relative_depth": l / 19, "cka": v})
        df = pd.DataFrame(rows)
        df["source"] = "App. C.2, Fig. 9b-c (analysis.png)"
        df["precision"] = "digitised: ±0.005"
    return df


# ================================================================================================================
# CLI: cost benchmark on a GPU box (random weights; for planning the small-scale notebooks)
# ================================================================================================================
def _benchmark(args) -> dict:
    from rearlib.runtime import resolve_device
    from rearlib.metrics.classifier import Classifier
    from rearlib.metrics import dfd_distance
    from rearlib.model import build_generator
    from rearlib.tokenizers.vqgan import VQTokenizer
    from rearlib.data import render_batch

    dev = resolve_device(args.device)
    torch.manual_seed(0)
    tok = VQTokenizer(dict(scales.VQ_TOKENIZER["small"]["model"])).to(dev).eval()
    h, w = tok.grid_size
    model = build_generator(args.preset, codebook_size=tok.codebook_size, z_dim=tok.code_dim,
                            seq_len=h * w).to(dev)
    with torch.no_grad():  # random non-degenerate weights (a fresh model's blocks are the identity)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    clf = Classifier(widths=(32, 64, 128, 256), resolution=tok.resolution).to(dev).eval()

    def perceptual(a, b):
        return dfd_distance(a, b, clf), "DFD[random classifier, benchmark only]"

    images, labels = render_batch(torch.arange(args.images), tok.resolution, split="val", device=dev)
    labels = labels % model.config.num_classes
    small = scales.ANALYSIS["small"]
    res = {"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"), "preset": args.preset,
           "images": args.images, "batch_size": args.batch_size, "seq_len": h * w, "codebook": tok.codebook_size}

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    kw = dict(batch_size=args.batch_size, perceptual=perceptual, progress=False, generator=0)
    df, sec = timed(lambda: exposure_bias(model, tok, images, labels, ratios=small["ratios"], **kw))
    res["A_seconds"] = sec
    res["A_rows"] = len(df)
    res["A_seconds_small_scale"] = sec * small["images"] / args.images
    df, sec = timed(lambda: embedding_replacement(model, tok, images, labels, r_primes=small["r_primes"], **kw))
    res["B_seconds"] = sec
    res["B_rows"] = len(df)
    res["B_seconds_small_scale"] = sec * small["images"] / args.images
    df, sec = timed(lambda: robustness(model, images, labels, tokenizer=tok, batch_size=args.batch_size,
                                       generator=0, progress=False))
    res["C_seconds"] = sec
    res["C_seconds_small_scale"] = sec * small["images"] / args.images
    df, sec = timed(lambda: cka_layers(model, tok, images, labels, batch_size=args.batch_size, progress=False))
    res["D_seconds"] = sec
    res["D_seconds_small_scale"] = sec * small["cka_images"] / args.images
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rearlib analysis", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("benchmark", help="time the four analyses with random weights at the small-scale shapes "
                                         "(16x16 tokens, K = 1024) and extrapolate to scales.ANALYSIS['small']")
    b.add_argument("--preset", default="small")
    b.add_argument("--images", type=int, default=64)
    b.add_argument("--batch-size", type=int, default=scales.ANALYSIS["small"]["batch_size"])
    b.add_argument("--device", default="auto")
    b.add_argument("--out", default=None, help="write the result JSON here (atomically)")
    a = ap.parse_args(argv)
    res = _benchmark(a)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        from rearlib.runtime import atomic_write_text

        atomic_write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
