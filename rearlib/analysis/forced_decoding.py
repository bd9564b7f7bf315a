"""Experiment A - exposure bias: decoding with forced positions (paper §3.1 Fig. 3a, App. B Fig. 8a-d;
docs/paper.md, reAR §2.1; notebook 05).

Notation (shared by every analysis): ``x = (x_1..x_N)`` the ground-truth (GT) token sequence of an image (raster
order), ``x̂`` the evaluated sequence, ``p_θ`` the generator's *conditional* next-token distribution (class label
given, no guidance, temperature 1).

For a GT ratio ``r`` let ``k = floor(r N)``. A set ``F`` of ``k`` positions is forced to GT: ``"perfect"`` context:
``F = {1..k}`` (front-loaded); ``"imperfect"`` context: ``F`` = a uniformly random ``k``-subset. Positions
``t = 1..N`` are produced in raster order: ``x̂_t = x_t`` if ``t ∈ F`` else a draw from the model given the current
mixed prefix ``x̂_{<t}`` (the model keeps generating after every sampled, possibly wrong, token). Default draw:
multinomial at temperature 1 without CFG (reAR §6 item 3); options: temperature, argmax, CFG (``s_t`` of
:func:`rearlib.sample.cfg_scale_at`). The full ``x̂`` is decoded and compared with the real image (and with the
tokenizer's reconstruction of ``x``; :mod:`rearlib.analysis.scoring`). Columns (besides the settings):

* ``ctr`` = (1/N) Σ_t 1[x̂_t = x_t] of the final sequence (measured CTR; reAR §6 item 4: plot this, record
  ``ratio``). ``ctr_free`` = the same over the sampled positions only (chance agreement), NaN when nothing was
  sampled.
* ``ppl`` = exp(-(1/N) Σ_t log p_θ(x̂_t | x̂_{<t})): the perplexity of the evaluated sequence under the model given
  its own prefix - **the quantity we plot as "perplexity"** (reAR §6 item 5; values above K are possible, as in
  the paper's Fig. 8). ``ppl_gt`` = exp(-(1/N) Σ_t log p_θ(x_t | x̂_{<t})): the GT tokens' perplexity given the
  evaluated prefix. Both are read off the very logits the decoding loop computed (conditional rows, before CFG
  and temperature), which equal the teacher-forced logits on ``x̂`` up to float round-off.
* ``first_error`` = 0-based index of the first position with x̂_t != x_t (N when none).
* image metrics (:mod:`rearlib.analysis.scoring`).

The two protocols at the same (image, r, repeat) share their sampling uniforms (common random numbers), so their
difference is not confounded by sampling luck.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from rearlib import scales
from rearlib.analysis.common import (STREAM_NOISE, STREAM_SUBSET, base_seed, check_batch_size, check_choice,
                                     check_fracs, check_labels, eval_mode, finish_frame, flat_tokens,
                                     maybe_autocast, model_device, model_dims, prepare, progress_bar, row_gen,
                                     setting_key)
from rearlib.analysis.scoring import IMAGE_METRICS, Scorer
from rearlib.sample import cfg_scale_at

RATIOS = scales.RATIOS  # the paper's grid of GT ratios r
PROTOCOLS = ("perfect", "imperfect")


def _k_of(r: float, N: int) -> int:
    # floor(r N); the epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
    return min(N, int(math.floor(r * N + 1e-9)))


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
    N, K, M = model_dims(model)
    dev = model_device(model)
    gt = flat_tokens(gt, N, K, "gt").to(dev)
    R = gt.shape[0]
    forced = torch.as_tensor(forced, device=dev)
    if forced.dtype != torch.bool or tuple(forced.shape) != (R, N):
        raise ValueError(f"forced must be a bool tensor [R={R}, N={N}], got {forced.dtype} {tuple(forced.shape)}")
    labels = check_labels(labels, R, M).to(dev)
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
        cfg_scales = [cfg_scale_at(t, N, float(cfg_scale), float(cfg_power)) for t in range(N)]
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
    with eval_mode(model), maybe_autocast(dev, dtype):
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
            guided = logits[R:] + (cond - logits[R:]) * cfg_scales[t] if use_cfg else cond
            if not bool(forced[:, t].all()):
                drawn = _pick(guided, None if greedy else uniforms[:, t], "argmax" if greedy else "multinomial",
                              temperature)
                out[:, t] = torch.where(forced[:, t], gt[:, t], drawn)
            record(t, cond)
    return out, logp_self, logp_gt


def exposure_bias(model, tokenizer, data, labels, *, images=None, ratios=RATIOS, protocols=PROTOCOLS,
                  repeats: int = 1, sampling: str = "multinomial", temperature: float = 1.0,
                  cfg_scale: float | None = None, cfg_power: float = 0.0, generator=None, batch_size: int = 64,
                  use_cache: bool = True, dtype: torch.dtype | None = None, metrics: Sequence[str] = IMAGE_METRICS,
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
    N, K, M = model_dims(model)
    batch_size = check_batch_size(batch_size)
    if tokenizer is None:
        raise ValueError("exposure_bias needs the tokenizer (it decodes every evaluated sequence)")
    tokens, labels, real, ids = prepare(model, tokenizer, data, labels, images, image_ids, batch_size)
    ratios = check_fracs(ratios, "ratios")
    protocols = check_choice(protocols, PROTOCOLS, "protocols")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if sampling not in ("multinomial", "argmax"):
        raise ValueError(f"sampling must be 'multinomial' or 'argmax', got {sampling!r}")
    base = base_seed(generator)
    B = tokens.shape[0]
    lab_list = labels.tolist()
    scorer = Scorer(tokenizer, real, tokens, which=metrics, perceptual=perceptual, classifier=classifier,
                     scale=scale, references=references)
    # Settings-major row order: consecutive rows share (protocol, ratio), so a batch's forced prefix is common.
    jobs = [(p, r, rep, i) for p in protocols for r in ratios for rep in range(repeats) for i in range(B)]
    records, out_tok, out_forced, out_img = [], [], [], []
    batches = [jobs[s:s + batch_size] for s in range(0, len(jobs), batch_size)]
    with eval_mode(model, tokenizer):
        for batch in progress_bar(batches, "exposure bias", len(batches), progress):
            idx = [j[3] for j in batch]
            R = len(batch)
            forced = torch.zeros(R, N, dtype=torch.bool)
            u = torch.empty(R, N, dtype=torch.float64)
            for row, (p, r, rep, i) in enumerate(batch):
                k = _k_of(r, N)
                if p == "perfect":
                    forced[row, :k] = True
                else:
                    perm = torch.randperm(N, generator=row_gen(base, STREAM_SUBSET, ids[i], setting_key(r), rep))
                    forced[row, perm[:k]] = True
                # Shared by both protocols at the same (image, r, repeat): common random numbers.
                u[row] = 1.0 - torch.rand(N, generator=row_gen(base, STREAM_NOISE, ids[i], setting_key(r), rep),
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
    df = finish_frame(records, scorer, dict(sampling="argmax" if sampling == "argmax" or temperature == 0
                                       else "multinomial", temperature=float(temperature),
                                       cfg_scale=1.0 if cfg_scale is None else float(cfg_scale),
                                       cfg_power=float(cfg_power), seed=base))
    if return_outputs:
        return df, {"tokens": torch.cat(out_tok), "forced": torch.cat(out_forced), "images": torch.cat(out_img)}
    return df
