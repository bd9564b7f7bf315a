"""One VA-π step (:func:`vapi_step`): noisy teacher-forcing context, rollout, reward, advantages and the PPO-style
update, with the pieces it is made of (:func:`corrupt_context`, :func:`vapi_loss`) and the optimizer it steps
(:func:`build_optimizer`). The algorithm is spelled out in the docstring of :mod:`rearlib.vapi`; the controls
(``cfg.control``) in :mod:`rearlib.vapi_controls`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rearlib.vapi_config import NOISE_KERNELS, VAPIConfig
from rearlib.vapi_controls import shuffle_rewards
from rearlib.vapi_rewards import check_image_batch, compute_rewards, group_advantages, group_std_mean

#: Guard for the paper's sequence-level ratio: the summed log-ratio over N tokens is clamped to this magnitude
#: before exp() so that a float32 overflow cannot turn the loss into inf/NaN (exp(20) ~ 5e8 is already far outside
#: any clip range, so clipping behaviour is unchanged wherever the value is finite).
_MAX_SEQ_LOG_RATIO = 20.0


def corrupt_context(tokens: torch.Tensor, rate: float, codebook_size: int, kernel: str = "code", *,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contextual-noise kernel K_ξ applied to teacher-forcing inputs.

    Each position t = 1..N-1 of ``tokens`` [B, N] is replaced independently with probability ``rate``; position N
    is never replaced (it is not the input of any prediction). Replacement ids: ``kernel="code"`` uniform over
    [0, K) (may equal the GT id; the position still counts as replaced, as in the released code), ``"paper"``
    uniform over the K - 1 ids other than the GT id (Eq. 28-29). ``rate = 0`` returns the input unchanged and
    draws no random numbers.

    Returns (noisy tokens [B, N] long, replaced mask [B, N] bool).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, N], got shape {tuple(tokens.shape)}")
    if kernel not in NOISE_KERNELS:
        raise ValueError(f"unknown noise kernel {kernel!r}; allowed: {', '.join(NOISE_KERNELS)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    if kernel == "paper" and codebook_size < 2:
        raise ValueError("the 'paper' kernel needs codebook_size >= 2 (it excludes the GT id)")
    tokens = tokens.long()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    if rate == 0.0:
        return tokens, mask
    B, N = tokens.shape
    u = torch.rand(B, N, generator=generator, device=tokens.device)
    mask = u < rate
    mask[:, -1] = False
    if kernel == "code":
        repl = torch.randint(0, codebook_size, (B, N), generator=generator, device=tokens.device)
    else:
        # GT + U{1..K-1} mod K is uniform over the K - 1 other ids.
        shift = torch.randint(1, codebook_size, (B, N), generator=generator, device=tokens.device)
        repl = (tokens + shift) % codebook_size
    return torch.where(mask, repl, tokens), mask


def vapi_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cfg: VAPIConfig, *,
              ce: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
              kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VA-π objective to minimise for M sampled sequences of N tokens.

    Args:
        new_logp: [M, N] log π_θ of the sampled tokens (carries the gradient).
        old_logp: [M, N] log π_old of the same tokens from the rollout (treated as a constant).
        advantages: [M] one advantage per sequence (treated as a constant), broadcast to its tokens.
        cfg: uses ``clip_range`` ε, ``ratio_level``, ``ce_weight`` β, ``kl_coef`` κ and ``control`` (with
            "prior_only" the policy-gradient term is reported but left out of the loss).
        ce: scalar next-token CE on the GT tokens under the noisy context (required when β > 0).
        ref_logp: [M, N] log π_ref of the sampled tokens (the "k3" KL estimator; needed when κ > 0 and ``kl`` is
            not given).
        kl: a precomputed scalar KL (e.g. the exact "full" KL); takes precedence over ``ref_logp``.

    Definition (``ratio_level="token"``, the code): ρ_{i,t} = exp(new - old),
    L_pg = mean_i mean_t [ -min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1-ε, 1+ε) A_i) ]. With ``"sequence"`` (paper Eq. 11)
    ρ_i = exp(Σ_t (new - old)) and L_pg = mean_i [ -min(ρ_i A_i, clip(ρ_i) A_i) ]. Total
    L = L_pg + β · ce + κ · KL (``control="prior_only"``: L = β · ce + κ · KL), KL_k3 = mean_i mean_t
    [exp(ref - new) - (ref - new) - 1].

    Returns (loss, stats) with detached scalar stats: pg_loss, ce, kl, ratio_mean/min/max, clip_frac (fraction of
    ratios outside [1-ε, 1+ε]), clip_active (fraction where the clip zeroes the gradient), approx_kl
    (mean of (ρ - 1) - log ρ, an estimate of KL(π_old || π_θ)).
    """
    if new_logp.dim() != 2 or old_logp.shape != new_logp.shape:
        raise ValueError(f"new_logp and old_logp must both be [M, N]; got {tuple(new_logp.shape)} and "
                         f"{tuple(old_logp.shape)}")
    if advantages.shape != new_logp.shape[:1]:
        raise ValueError(f"advantages must be [M] = [{new_logp.shape[0]}], got {tuple(advantages.shape)}")
    eps = cfg.clip_range
    old_logp = old_logp.detach().float()
    adv = advantages.detach().float()
    new_logp = new_logp.float()
    token_log_ratio = new_logp - old_logp
    if cfg.ratio_level == "token":
        log_ratio = token_log_ratio
        A = adv[:, None]
    else:
        log_ratio = token_log_ratio.sum(1).clamp(-_MAX_SEQ_LOG_RATIO, _MAX_SEQ_LOG_RATIO)
        A = adv
    ratio = log_ratio.exp()
    surr = torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
    pg = -(surr.mean(1).mean(0) if cfg.ratio_level == "token" else surr.mean())
    zero = pg.detach() * 0
    loss = pg if cfg.control != "prior_only" else zero
    ce_val = zero
    if cfg.ce_weight > 0:
        if ce is None:
            raise ValueError("cfg.ce_weight > 0 but no ce was given (the CE on GT tokens under the noisy context)")
        loss = loss + cfg.ce_weight * ce
    if ce is not None:
        ce_val = ce.detach().float()
    kl_val = zero
    if cfg.kl_coef > 0:
        if kl is None:
            if ref_logp is None:
                raise ValueError("cfg.kl_coef > 0 needs ref_logp (k3 estimator) or a precomputed kl")
            if ref_logp.shape != new_logp.shape:
                raise ValueError(f"ref_logp must be [M, N] like new_logp, got {tuple(ref_logp.shape)}")
            d = ref_logp.detach().float() - new_logp
            kl = (d.exp() - d - 1).mean(1).mean(0)
        loss = loss + cfg.kl_coef * kl
        kl_val = kl.detach().float()
    with torch.no_grad():
        r = ratio.detach()
        outside = (r < 1 - eps) | (r > 1 + eps)
        active = ((A > 0) & (r > 1 + eps)) | ((A < 0) & (r < 1 - eps))
        tr = token_log_ratio.detach()
        stats = {
            "pg_loss": pg.detach(), "ce": ce_val, "kl": kl_val,
            "ratio_mean": r.mean(), "ratio_min": r.min(), "ratio_max": r.max(),
            "clip_frac": outside.float().mean(), "clip_active": active.float().mean(),
            "approx_kl": (tr.exp() - 1 - tr).mean(),
        }
    return loss, stats


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None) -> torch.Tensor:
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def _check_batch(model: nn.Module, tokenizer: nn.Module, images, tokens, labels, device):
    cfg_m = model.config
    K, N = cfg_m.codebook_size, cfg_m.seq_len
    if int(tokenizer.codebook_size) != K:
        raise ValueError(f"tokenizer has {tokenizer.codebook_size} codes but the generator predicts {K}")
    images = check_image_batch(images, "images").to(device)
    if tokens is None:
        tokens = tokenizer.encode(images)
    if not torch.is_tensor(tokens) or tokens.is_floating_point():
        raise TypeError("tokens must be an integer tensor [B, h, w] or [B, N]")
    tokens = tokens.to(device).long().reshape(tokens.shape[0], -1)
    B = images.shape[0]
    if tokens.shape != (B, N):
        raise ValueError(f"tokens must hold {N} ids per image for this generator ([B, {N}] or a grid), got "
                         f"{tuple(tokens.shape)} for {B} images")
    if bool(((tokens < 0) | (tokens >= K)).any()):
        raise ValueError(f"GT token ids must be in [0, {K})")
    labels = torch.as_tensor(labels, device=device).long().reshape(-1)
    if labels.shape != (B,):
        raise ValueError(f"labels must be [B] = [{B}], got {tuple(labels.shape)}")
    if bool(((labels < 0) | (labels >= cfg_m.num_classes)).any()):
        raise ValueError(f"labels must be real classes in [0, {cfg_m.num_classes}) (the null class is only used "
                         f"by label dropout)")
    return images, tokens, labels


def _decode(tokenizer: nn.Module, seqs: torch.Tensor, chunk: int, device: torch.device) -> torch.Tensor:
    outs = [tokenizer.decode(seqs[i:i + chunk]).to(device) for i in range(0, seqs.shape[0], chunk)]
    return torch.cat(outs).float()


def vapi_step(model: nn.Module, tokenizer: nn.Module, images: torch.Tensor, tokens: torch.Tensor | None,
              labels: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: VAPIConfig,
              generator: torch.Generator | None = None, perceptual_fn: Callable | None = None, *,
              ref_model: nn.Module | None = None,
              shuffle_generator: torch.Generator | None = None) -> dict[str, Any]:
    """One VA-π sampling round and its update(s) (the docstring of :mod:`rearlib.vapi` spells out the algorithm).

    Args:
        model: a :class:`rearlib.model.Generator` (trainable), on its device.
        tokenizer: frozen tokenizer with ``decode`` / ``encode`` / ``codebook_size`` (the contract interface).
        images: reference images [B, 3, H, W] in [0, 1] (the reward's targets), H = W = tokenizer resolution.
        tokens: their GT tokens [B, h, w] or [B, N]; None encodes ``images`` with the tokenizer.
        labels: class labels [B] in [0, num_classes).
        optimizer: built over ``model``'s parameters (:func:`build_optimizer`); its lr is used as is.
        cfg: :class:`VAPIConfig` (``batch_size`` is not enforced here: B is whatever is passed).
        generator: torch.Generator on the model's device driving the noise, sampling, label dropout and minibatch
            order (dropout inside the model uses the global RNG). None uses the global RNG.
        perceptual_fn: callable(decoded, reference) -> [M] distances (or (values, name)); required when the
            perceptual term enters the reward (``cfg.uses_perceptual``).
        ref_model: frozen reference for the optional KL (required when ``cfg.kl_coef > 0``).
        shuffle_generator: CPU torch.Generator of the reward permutations (required by
            ``cfg.control="shuffled_rewards"``; :func:`rearlib.vapi_controls.shuffle_generator`). A stream of its
            own, so that the shuffled run draws the same contexts and samples as the method with the same seeds.

    On-policy ratio: the rollout's log-probs are the ratio's denominator, except where the update pass computes
    exactly the rollout's function (both deterministic: eval mode or no dropout, and no optimizer step yet in this
    round). There the update's own log-probs, detached, are the denominator, so the ratio is exactly 1 rather than
    1 up to the rounding of a differently batched (bf16) forward; ``rollout_logp_gap`` reports that rounding.

    Returns a dict of Python floats (and the perceptual metric name): reward_mean / reward_std (over all B·G
    samples, unbiased) / reward_group_std (mean within-group std) / mse_mean / perceptual_mean /
    perceptual_metric, mse_group_std / perceptual_group_std (each term's mean within-group std, unweighted; NaN
    for a term not measured), control, adv_abs_mean / adv_clip_frac, pg_loss, ce, kl, ratio_mean / ratio_min /
    ratio_max, clip_frac, clip_active, approx_kl, approx_kl_first / clip_frac_first (of the round's first
    micro-batch, where θ = θ_old: what differs there is the rollout and update passes, e.g. dropout),
    rollout_logp_gap (mean |log π_update - log π_rollout| of the sampled tokens before the first optimizer step),
    grad_norm (before clipping, last optimizer step), entropy (mean per-token
    entropy of the rollout policy), gt_logp (mean rollout log-prob of the GT tokens), sample_gt_match (fraction
    of sampled tokens equal to the GT token), context_replaced (fraction of the N - 1 context positions
    replaced), n_sequences, shared_forward, optimizer_steps, step_time_s.
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model is on {device}; create it with "
                         f"torch.Generator(device={str(device)!r})")
    if cfg.kl_coef > 0 and ref_model is None:
        raise ValueError("cfg.kl_coef > 0 needs ref_model (a frozen copy of the initial generator)")
    if cfg.uses_perceptual and perceptual_fn is None:
        raise ValueError("the reward's perceptual term (reward_terms / reward_perceptual_weight) needs a "
                         "perceptual_fn (see make_perceptual_fn)")
    if cfg.control == "shuffled_rewards" and shuffle_generator is None:
        raise ValueError("control='shuffled_rewards' needs shuffle_generator "
                         "(rearlib.vapi_controls.shuffle_generator(cfg.seed))")
    images, tokens, labels = _check_batch(model, tokenizer, images, tokens, labels, device)
    B, N = tokens.shape
    G, K = cfg.group_size, model.config.codebook_size
    null = model.config.num_classes
    tau = cfg.temperature
    was_training = model.training

    try:
        # 1. One noisy teacher-forcing context per image, shared by its G samples, the update and the CE term.
        ctx, replaced = corrupt_context(tokens, cfg.noise_rate, K, cfg.noise_kernel, generator=generator)

        # 2. Rollout: one teacher-forced pass, G independent draws per position.
        model.train(cfg.rollout_mode == "train")
        roll_labels = labels
        if cfg.rollout_mode == "train":
            roll_labels = _drop_labels(labels, cfg.class_dropout, null, generator)
        with torch.no_grad():
            with _autocast(device, cfg.bf16):
                logits_old = model(ctx, roll_labels).logits
            if not bool(torch.isfinite(logits_old).all()):
                raise FloatingPointError("the generator produced non-finite logits in the rollout; its weights are "
                                         "broken (a previous step diverged?) - reload the last good checkpoint")
            logp_all = F.log_softmax(logits_old.float() / tau, dim=-1)                       # [B, N, K]
            probs = logp_all.exp()
            samples = torch.multinomial(probs.reshape(B * N, K), G, replacement=True, generator=generator)
            samples = samples.view(B, N, G).permute(0, 2, 1).contiguous()                    # [B, G, N]
            old_logp = logp_all.gather(-1, samples.permute(0, 2, 1)).permute(0, 2, 1)        # [B, G, N]
            entropy = -(probs * logp_all).sum(-1).mean()
            gt_logp = logp_all.gather(-1, tokens[..., None]).mean()
            sample_gt = (samples == tokens[:, None, :]).float().mean()
            ref_logp = ref_logp_all = None
            if cfg.kl_coef > 0:
                with _autocast(device, cfg.bf16):
                    ref_logits = ref_model(ctx, labels).logits
                ref_logp_all = F.log_softmax(ref_logits.float() / tau, dim=-1)
                ref_logp = ref_logp_all.gather(-1, samples.permute(0, 2, 1)).permute(0, 2, 1)
            del logits_old, probs

            # 3. Decode every sample with the frozen tokenizer and score it against its reference image.
            decoded = _decode(tokenizer, samples.view(B * G, N), cfg.decode_batch, device)
            reference = images.repeat_interleave(G, dim=0)
            rr = compute_rewards(decoded, reference, cfg, perceptual_fn)
            rewards = rr.rewards.view(B, G)
            # 4. Group-normalised, clipped advantages (of permuted rewards in the shuffled control).
            adv_rewards = shuffle_rewards(rewards, shuffle_generator) if cfg.control == "shuffled_rewards" \
                else rewards
            adv = group_advantages(adv_rewards, G, cfg.adv_clip, eps=cfg.adv_eps)             # [B, G]
            unclipped = group_advantages(adv_rewards, G, None, eps=cfg.adv_eps)
            del decoded, reference

        # 5. Update on the same contexts.
        model.train(cfg.update_mode == "train")
        no_dropout = not _has_dropout(model) and cfg.class_dropout == 0
        shared = cfg.update_mode == "eval" or no_dropout
        same_function = shared and (cfg.rollout_mode == "eval" or no_dropout)
        sums: dict[str, float] = {}
        first: dict[str, float] = {}
        gap_sum, gap_n = torch.zeros((), device=device), 0
        n_acc, opt_steps, gnorm = 0, 0, float("nan")
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=generator, device=device) if cfg.num_minibatches > 1 else \
                torch.arange(B, device=device)
            for mb in order.tensor_split(cfg.num_minibatches):
                step_b = mb.numel()
                micro = cfg.micro_batch_images or step_b
                optimizer.zero_grad(set_to_none=True)
                for idx in mb.split(micro):
                    m = idx.numel()
                    if shared:
                        with _autocast(device, cfg.bf16):
                            logits = model(ctx[idx], labels[idx]).logits.float()              # [m, N, K]
                        lp = F.log_softmax(logits / tau, dim=-1)
                        new_logp = lp.gather(-1, samples[idx].permute(0, 2, 1)).permute(0, 2, 1).reshape(m * G, N)
                        ce = F.cross_entropy(logits.reshape(-1, K), tokens[idx].reshape(-1))
                        full_kl = None
                        if cfg.kl_coef > 0 and cfg.kl_estimator == "full":
                            full_kl = (lp.exp() * (lp - ref_logp_all[idx])).sum(-1).mean()
                    else:
                        rows = idx.repeat_interleave(G)
                        upd_labels = labels[rows]
                        if cfg.update_mode == "train":
                            upd_labels = _drop_labels(upd_labels, cfg.class_dropout, null, generator)
                        with _autocast(device, cfg.bf16):
                            logits = model(ctx[rows], upd_labels).logits.float()              # [m*G, N, K]
                        lp = F.log_softmax(logits / tau, dim=-1)
                        new_logp = lp.gather(-1, samples[idx].reshape(m * G, N, 1)).squeeze(-1)
                        ce = F.cross_entropy(logits.reshape(-1, K), tokens[rows].reshape(-1))
                        full_kl = None
                        if cfg.kl_coef > 0 and cfg.kl_estimator == "full":
                            full_kl = (lp.exp() * (lp - ref_logp_all[rows])).sum(-1).mean()
                    old = old_logp[idx].reshape(m * G, N)
                    if opt_steps == 0:
                        gap_sum += (new_logp.detach() - old).abs().sum()
                        gap_n += old.numel()
                        if same_function:
                            # θ = θ_old and the same deterministic function: the on-policy ratio is 1 by definition.
                            old = new_logp.detach()
                            old_logp[idx] = old.view(m, G, N)
                    loss, st = vapi_loss(new_logp, old, adv[idx].reshape(m * G), cfg,
                                         ce=ce, ref_logp=None if ref_logp is None else ref_logp[idx].reshape(m * G, N),
                                         kl=full_kl)
                    if not first:
                        first = {"approx_kl_first": float(st["approx_kl"]), "clip_frac_first": float(st["clip_frac"])}
                    if not bool(torch.isfinite(loss)):
                        optimizer.zero_grad(set_to_none=True)
                        raise FloatingPointError(
                            f"non-finite VA-pi loss ({float(loss)}): pg={float(st['pg_loss'])}, ce={float(st['ce'])}, "
                            f"kl={float(st['kl'])}; lower lr or check inputs")
                    # Micro-batches are weighted by their share of the minibatch, so the accumulated gradient is the
                    # gradient of the minibatch mean (the code's /16 with 16 equal micro-batches).
                    (loss * (m / step_b)).backward()
                    for k, v in st.items():  # image-weighted means; min / max over the whole round
                        if k == "ratio_min":
                            sums[k] = min(sums.get(k, math.inf), float(v))
                        elif k == "ratio_max":
                            sums[k] = max(sums.get(k, -math.inf), float(v))
                        else:
                            sums[k] = sums.get(k, 0.0) + float(v) * m
                    n_acc += m
                if cfg.grad_clip > 0:
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                else:
                    gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params
                                                                        if p.grad is not None])))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                opt_steps += 1
    finally:
        model.train(was_training)  # restore the caller's mode, also on error

    out: dict[str, Any] = {k: (v if k in ("ratio_min", "ratio_max") else v / n_acc) for k, v in sums.items()}
    flat_r = rr.rewards
    out.update({
        "reward_mean": float(flat_r.mean()),
        "reward_std": float(flat_r.std(correction=1)) if flat_r.numel() > 1 else 0.0,
        "reward_group_std": float(rewards.std(1, correction=1).mean()),
        "mse_mean": float(rr.mse.mean()),
        "perceptual_mean": float(rr.perceptual.mean()),
        "perceptual_metric": rr.perceptual_metric,
        "mse_group_std": group_std_mean(rr.mse, G),
        "perceptual_group_std": group_std_mean(rr.perceptual, G) if rr.perceptual_metric != "none" else math.nan,
        "control": cfg.control,
        **first,
        "rollout_logp_gap": float(gap_sum) / max(gap_n, 1),
        "adv_abs_mean": float(adv.abs().mean()),
        "adv_clip_frac": float((unclipped.abs() > cfg.adv_clip).float().mean()) if cfg.adv_clip is not None else 0.0,
        "grad_norm": gnorm,
        "entropy": float(entropy),
        "gt_logp": float(gt_logp),
        "sample_gt_match": float(sample_gt),
        "context_replaced": float(replaced[:, :-1].float().mean()) if N > 1 else 0.0,
        "n_sequences": B * G,
        "shared_forward": bool(shared),
        "optimizer_steps": opt_steps,
        "step_time_s": time.perf_counter() - t0,
    })
    return out


def build_optimizer(model: nn.Module, cfg: VAPIConfig, device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW as the code (LlamaGen's ``configure_optimizers``): weight decay on parameters with ndim >= 2 only
    (so biases and norm scales are not decayed), betas/eps/lr from ``cfg``, constant lr, fused on CUDA."""
    device = device or next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                             fused=True if device.type == "cuda" else None)
