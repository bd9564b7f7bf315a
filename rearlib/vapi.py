"""VA-π post-training: pixel-space alignment of an AR generator by a GRPO-style policy gradient.

VA-π (Liao et al., arXiv 2512.19680) fine-tunes a trained generator so that the images its tokens decode to match
the real images. Everything below follows ``docs/paper.md``, Part II (VA-π); where the paper (v1) and the
released code (github.com/Lil-Shake/VA-Pi @ 3be8fce, ``train_c2i_grpo.py``) disagree, **the code's behaviour is the
default and the paper's is an option** (each such field of :class:`VAPIConfig` says so).

One step (:func:`vapi_step`), for a batch of B reference images I_b with ground-truth tokens x*_b (N tokens each,
codebook size K) and class labels c_b, with G = ``group_size``:

1. **Noisy context** (docs/paper.md, VA-π §1.3): x~*_b = K_ξ(x*_b): each teacher-forcing input position is replaced
   with probability ξ (``noise_rate``) by a token drawn uniformly from all K codes (``noise_kernel="code"``) or from
   the K - 1 codes other than the GT one (``"paper"``, Eq. 28-29). The class token is never corrupted. Only the
   first N - 1 positions are corrupted: x_N is never read by any prediction (the code corrupts the TF input,
   which is x*_{1..N-1}). One context per image, shared by its G samples, the update and the CE term.
2. **Rollout** (docs/paper.md, VA-π §1.5): one teacher-forced forward pass on (c_b, x~*_b), by default in ``eval()``
   mode, without grad, under bf16 autocast on CUDA (``rollout_mode``), gives logits l_{b,t} for t = 1..N. Then G tokens
   are drawn **independently at every position**: x^{(g)}_{b,t} ~ softmax(l_{b,t} / τ). The policy is therefore
   a factorised categorical over positions conditioned on the noisy GT prefix; samples never condition on one
   another. Old per-token log-probs log π_old(x^{(g)}_{b,t}) are kept.
3. **Reward** (docs/paper.md, VA-π §1.4, :func:`compute_rewards`): every sample is decoded by the frozen tokenizer,
   Î = decode(x^{(g)}_b), and R = -(w_mse · MSE(Î, I) + w_p · D_p(Î, I)), with MSE the per-image mean over C×H×W
   of squared differences of the images mapped to [-1, 1] (i.e. 4× the MSE in [0, 1] units) and D_p a per-image
   perceptual distance (LPIPS-VGG in the paper's code; here :func:`rearlib.metrics.perceptual_distance`: LPIPS-VGG
   where its ImageNet trunk is on disk, else ST-LPIPS(alex), named as such; or any callable).
4. **Advantages** (:func:`group_advantages`): A_{b,g} = clip((R_{b,g} - mean_g R_b) / (std_g R_b + 1e-8), ±5),
   std the unbiased (n - 1) standard deviation over the G samples of image b only (no batch normalisation).
5. **Update** (docs/paper.md, VA-π §1.6, :func:`vapi_loss`): a train-mode teacher-forced pass on the **same** contexts
   (``update_mode``; with dropout and class-label dropout 0.1 as the code's GPT in train mode) gives new
   log-probs; per-token ratio ρ = exp(log π_θ - log π_old); per-token PPO term
   -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A), averaged over the N tokens of a sequence and then over sequences; plus
   β · CE(logits, x*) (next-token cross-entropy on the GT tokens under the noisy context, mean over tokens);
   plus, optionally, κ · KL to a frozen copy of the initial model (off by default, as the released launchers).
   One optimizer step per sampling round (``ppo_epochs = num_minibatches = 1``, the code's effective setting),
   gradient-norm clip 1.0, AdamW (0.9, 0.999), weight decay 1e-4 on matrices only, constant lr.

Compute note: when the update pass is deterministic (``update_mode="eval"``, or a model without dropout and
``class_dropout = 0``), the G copies of a context give identical logits, so the update runs one forward per image
and gathers the G samples from it - the same numbers as G forwards, G times cheaper. Otherwise (the default) it
runs one forward per sequence, as the code does, so every copy gets its own dropout and label-dropout draw.

Entry points: :class:`VAPIConfig`, :func:`config_for_scale`, :func:`corrupt_context`, :func:`compute_rewards`,
:func:`group_advantages`, :func:`vapi_loss`, :func:`vapi_step`, :func:`post_train`, :func:`make_perceptual_fn`,
:class:`EmbeddedSource`; CLI ``python -m rearlib vapi --scale small --generator MODEL.pt --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.runtime import atomic_torch_save, atomic_write_text, resolve_device

from rearlib.scales import validate_scale
from rearlib import scales

CHECKPOINT_FORMAT = "rearlib.vapi/1"
NOISE_KERNELS = ("code", "paper")
MODES = ("train", "eval")
RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k3", "full")

#: Guard for the paper's sequence-level ratio: the summed log-ratio over N tokens is clamped to this magnitude
#: before exp() so that a float32 overflow cannot turn the loss into inf/NaN (exp(20) ~ 5e8 is already far outside
#: any clip range, so clipping behaviour is unchanged wherever the value is finite).
_MAX_SEQ_LOG_RATIO = 20.0


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAPIConfig:
    """Every setting of VA-π post-training. Defaults = the released C2I launcher (LlamaGen-XXL; docs/paper.md,
    VA-π §1.8).

    Group / policy-gradient:
        group_size: G, samples per image (paper Table 7 and code: 8). Must be >= 2 (the std needs two samples).
        batch_size: images per optimizer step (code: 128 = 8 GPUs x 16; "total batch size per step" in Table 7).
        clip_range: PPO ε (code only: ``--clip-range 0.2``; the paper does not state it; the argparse default
            1e-4 in the code is never used by a launcher).
        adv_clip: advantages are clipped to [-adv_clip, adv_clip] (Table 7 "Max Advantage Clip": 5). None: no clip.
        adv_eps: added to the unbiased group std (code: 1e-8).
        ratio_level: "token" (code: per-token ratio, per-token clip, mean over tokens then over sequences) or
            "sequence" (paper Eq. 11: ρ_i = π_θ(x_i|x~*) / π_old(x_i|x~*) of the whole sequence; numerically
            extreme at hundreds of tokens, see docs/paper.md, VA-π §3 item 5).
        temperature: τ of the rollout sampling distribution and of the log-probs in the ratio (code: 1.0; top-k 0
            and top-p 1.0 in the code, i.e. none, so they are not offered here).
    Prior / regularisers:
        ce_weight: β, weight of the next-token CE on GT tokens under the noisy context (Table 7 and code: 0.1).
        kl_coef: κ, weight of a KL to a frozen copy of the initial model (0 = off, as every released launcher;
            the paper's main method has no reference model). > 0 builds the reference in :func:`post_train`.
        kl_estimator: "k3" (code: exp(ref - cur) - (ref - cur) - 1 on the sampled tokens, mean over tokens then
            sequences) or "full" (exact KL(π_θ || π_ref) over the vocabulary, mean over positions).
    Contextual noise:
        noise_rate: ξ, per-position corruption probability of the teacher-forcing context (C2I launcher: 0; the
            paper's T2I setting: 0.5; Janus: 0.95 paper / 1.0 code).
        noise_kernel: "code" (uniform over all K codes, may redraw the GT id) or "paper" (uniform over the K - 1
            codes other than the GT id, Eq. 28-29).
    Reward:
        reward_mse_weight: w_mse (code: 1.0; not in the paper). MSE on images in [-1, 1], per image.
        reward_perceptual_weight: w_p = λ_p (code: 1.0; not in the paper). 0 disables the perceptual term.
            λ_p = 1 balances LPIPS (typical values 0.1-0.6) against MSE on [-1, 1]; ST-LPIPS lives on a smaller
            scale and the classifier distance "dfd" on a much larger one (a sum over layers, up to 2 per layer),
            so the same weight is a different reward - report the metric name with every result.
        perceptual: perceptual metric for :func:`make_perceptual_fn`, one of
            :data:`rearlib.metrics.PERCEPTUAL_CHOICES`. "auto" (default): LPIPS-VGG, the code's metric, when its
            weights are on disk, else ST-LPIPS(alex). "dfd" (the in-project classifier) only by name: it shares its
            network with the classifier-based FID, so a reward on it optimises that evaluator's features.
    Modes (the code's choice is the default):
        rollout_mode: "eval" (code: sampling forward in eval(), no grad, bf16) or "train" (dropout and class-label
            dropout active while sampling, as a LlamaGen GPT in train mode would do).
        update_mode: "train" (code: dropout 0.1 and class-label dropout active in the update pass) or "eval".
        class_dropout: probability that a sequence's label is replaced by the null class in a train-mode pass
            (the code's GPT: ``class_dropout_prob = 0.1``). Keeps the unconditional (CFG) branch trained.
        bf16: bf16 autocast for the rollout and update passes on CUDA (code: bf16 everywhere). Ignored on CPU.
    Optimisation:
        lr: constant learning rate (code: 1e-6 for LlamaGen-XXL with no warm-up and no schedule; ours differs,
            see :data:`scales.VAPI`).
        betas, weight_decay, adam_eps: AdamW (code: (0.9, 0.999), 1e-4 on parameters with ndim >= 2, eps 1e-8).
        grad_clip: max global gradient L2 norm (Table 7: 1.0); 0 disables.
        ppo_epochs: passes over one sampling round (code: 1).
        num_minibatches: optimizer steps per pass; images are split into this many groups-preserving
            minibatches (code: 1 - its 16 micro-batches all accumulate into one step).
        micro_batch_images: images per forward/backward in the update (memory only; 0 = the whole minibatch).
            The code's micro-batch of 8 sequences at G = 8 is one image.
        decode_batch: sequences per tokenizer decode / reward call (memory only).
        seed: seeds the data order, the context noise, the sampling and the dropout streams of :func:`post_train`.
    """

    group_size: int = 8
    batch_size: int = 128
    clip_range: float = 0.2
    adv_clip: float | None = 5.0
    adv_eps: float = 1e-8
    ratio_level: str = "token"
    temperature: float = 1.0
    ce_weight: float = 0.1
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    noise_rate: float = 0.0
    noise_kernel: str = "code"
    reward_mse_weight: float = 1.0
    reward_perceptual_weight: float = 1.0
    perceptual: str = "auto"
    rollout_mode: str = "eval"
    update_mode: str = "train"
    class_dropout: float = 0.1
    bf16: bool = True
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_images: int = 0
    decode_batch: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        ints = {"group_size": 2, "batch_size": 1, "ppo_epochs": 1, "num_minibatches": 1, "decode_batch": 1,
                "micro_batch_images": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"VAPIConfig.{name} must be an integer >= {lo}, got {v!r}"
                                 + (" (group-normalised advantages need at least 2 samples per image)"
                                    if name == "group_size" else ""))
        if self.num_minibatches > self.batch_size:
            raise ValueError(f"num_minibatches={self.num_minibatches} exceeds batch_size={self.batch_size} images")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range (PPO epsilon) must be > 0, got {self.clip_range}")
        if self.adv_clip is not None and not self.adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0 or None, got {self.adv_clip}")
        if not self.adv_eps >= 0:
            raise ValueError(f"adv_eps must be >= 0, got {self.adv_eps}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("ce_weight", "kl_coef", "reward_mse_weight", "reward_perceptual_weight", "weight_decay",
                     "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"VAPIConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.reward_mse_weight == 0 and self.reward_perceptual_weight == 0:
            raise ValueError("reward_mse_weight and reward_perceptual_weight are both 0: the reward would be constant")
        if not 0.0 <= self.noise_rate <= 1.0:
            raise ValueError(f"noise_rate (xi) must lie in [0, 1], got {self.noise_rate}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must lie in [0, 1), got {self.class_dropout}")
        for name, allowed in (("noise_kernel", NOISE_KERNELS), ("rollout_mode", MODES), ("update_mode", MODES),
                              ("ratio_level", RATIO_LEVELS), ("kl_estimator", KL_ESTIMATORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"VAPIConfig.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")

    def replace(self, **overrides: Any) -> "VAPIConfig":
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown VAPIConfig fields {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAPIConfig":
        from rearlib.runtime import config_from_dict

        return config_from_dict(cls, d, "fields")




def config_for_scale(scale: str, **overrides: Any) -> VAPIConfig:
    """The :class:`VAPIConfig` of ``scale`` (see :data:`scales.VAPI`) with field ``overrides``."""
    validate_scale(scale)
    return VAPIConfig(**{**scales.VAPI[scale]["config"], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the step
# ----------------------------------------------------------------------------------------------------------------
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


class RewardResult(NamedTuple):
    """``rewards`` [M] = -(w_mse * mse + w_p * perceptual); ``mse`` [M] on [-1, 1] images; ``perceptual`` [M]
    (zeros when w_p = 0); ``perceptual_metric``: the name of the perceptual distance used ("none" when off)."""

    rewards: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor
    perceptual_metric: str


def _check_image_batch(x: Any, name: str) -> torch.Tensor:
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
    decoded = _check_image_batch(decoded, "decoded")
    reference = _check_image_batch(reference, "reference")
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


def vapi_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cfg: VAPIConfig, *,
              ce: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
              kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VA-π objective to minimise for M sampled sequences of N tokens.

    Args:
        new_logp: [M, N] log π_θ of the sampled tokens (carries the gradient).
        old_logp: [M, N] log π_old of the same tokens from the rollout (treated as a constant).
        advantages: [M] one advantage per sequence (treated as a constant), broadcast to its tokens.
        cfg: uses ``clip_range`` ε, ``ratio_level``, ``ce_weight`` β, ``kl_coef`` κ.
        ce: scalar next-token CE on the GT tokens under the noisy context (required when β > 0).
        ref_logp: [M, N] log π_ref of the sampled tokens (the "k3" KL estimator; needed when κ > 0 and ``kl`` is
            not given).
        kl: a precomputed scalar KL (e.g. the exact "full" KL); takes precedence over ``ref_logp``.

    Definition (``ratio_level="token"``, the code): ρ_{i,t} = exp(new - old),
    L_pg = mean_i mean_t [ -min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1-ε, 1+ε) A_i) ]. With ``"sequence"`` (paper Eq. 11)
    ρ_i = exp(Σ_t (new - old)) and L_pg = mean_i [ -min(ρ_i A_i, clip(ρ_i) A_i) ]. Total
    L = L_pg + β · ce + κ · KL, KL_k3 = mean_i mean_t [exp(ref - new) - (ref - new) - 1].

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
    loss = pg
    zero = pg.detach() * 0
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


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------
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
    images = _check_image_batch(images, "images").to(device)
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
              ref_model: nn.Module | None = None) -> dict[str, Any]:
    """One VA-π sampling round and its update(s) (see the module docstring for the exact algorithm).

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
        perceptual_fn: callable(decoded, reference) -> [M] distances (or (values, name)); required when
            ``cfg.reward_perceptual_weight > 0``.
        ref_model: frozen reference for the optional KL (required when ``cfg.kl_coef > 0``).

    Returns a dict of Python floats (and the perceptual metric name): reward_mean / reward_std (over all B·G
    samples, unbiased) / reward_group_std (mean within-group std) / mse_mean / perceptual_mean /
    perceptual_metric, adv_abs_mean / adv_clip_frac, pg_loss, ce, kl, ratio_mean / ratio_min / ratio_max,
    clip_frac, clip_active, approx_kl, grad_norm (before clipping, last optimizer step), entropy (mean per-token
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
    if cfg.reward_perceptual_weight > 0 and perceptual_fn is None:
        raise ValueError("reward_perceptual_weight > 0 needs a perceptual_fn (see make_perceptual_fn)")
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
            # 4. Group-normalised, clipped advantages.
            adv = group_advantages(rewards, G, cfg.adv_clip, eps=cfg.adv_eps)                 # [B, G]
            unclipped = group_advantages(rewards, G, None, eps=cfg.adv_eps)
            del decoded, reference

        # 5. Update on the same contexts.
        model.train(cfg.update_mode == "train")
        shared = cfg.update_mode == "eval" or (not _has_dropout(model) and cfg.class_dropout == 0)
        sums: dict[str, float] = {}
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
                    loss, st = vapi_loss(new_logp, old_logp[idx].reshape(m * G, N), adv[idx].reshape(m * G), cfg,
                                         ce=ce, ref_logp=None if ref_logp is None else ref_logp[idx].reshape(m * G, N),
                                         kl=full_kl)
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


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, perceptual distance, data
# ----------------------------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: VAPIConfig, device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW as the code (LlamaGen's ``configure_optimizers``): weight decay on parameters with ndim >= 2 only
    (so biases and norm scales are not decayed), betas/eps/lr from ``cfg``, constant lr, fused on CUDA."""
    device = device or next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                             fused=True if device.type == "cuda" else None)


def make_perceptual_fn(prefer: str = "auto", *, scale: str = "smoke", device=None, classifier=None,
                       allow_substitute: bool = True, batch_size: int = 64) -> Callable:
    """A perceptual-distance callable for the reward, backed by :func:`rearlib.metrics.perceptual_distance`.

    ``prefer`` as there: "auto" is LPIPS-VGG when its weights are on disk, else ST-LPIPS(alex); an LPIPS named
    explicitly falls back to ST-LPIPS(alex) only with ``allow_substitute``; "dfd" uses the in-project classifier
    of ``scale`` (loaded once here rather than on every call). The returned function maps (a, b)
    [M, 3, H, W] in [0, 1] to distances [M] (float32 on a's device) and carries ``metric_name`` (e.g. "LPIPS-VGG"
    or "ST-LPIPS(alex)") and ``reason``.
    """
    import rearlib.metrics as metrics

    choice, name, reason = metrics.resolve_perceptual(prefer)
    if prefer.lower().startswith("lpips-") and not choice.startswith("lpips-") and not allow_substitute:
        raise metrics.LPIPSUnavailable(reason)
    if name == metrics.DFD_NAME and classifier is None:
        from rearlib.metrics.classifier import get_classifier

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


@dataclass(frozen=True)
class EmbeddedSource:
    """The embedded ShapeScenes-10 split as a batch source rendered directly on the device (fast on GPU).

    ``fetch(indices, device) -> (images [B, 3, R, R] in [0, 1], labels [B])`` via :func:`rearlib.data.render_batch`.
    """

    size: int
    resolution: int
    split: str = "train"
    seed: int = 0

    def __len__(self) -> int:
        return self.size

    def fetch(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        from rearlib.data import render_batch

        return render_batch(indices, self.resolution, self.seed, self.split, device=device)


class _Data:
    """Uniform access to the data forms :func:`post_train` accepts (see its docstring)."""

    def __init__(self, data: Any):
        self.tokens = None
        if hasattr(data, "fetch") and hasattr(data, "__len__"):
            self.kind, self.src = "source", data
        elif isinstance(data, dict):
            if "images" not in data or "labels" not in data:
                raise ValueError("a data dict needs 'images' [M, 3, H, W] and 'labels' [M] (optionally 'tokens')")
            self.kind, self.src = "tensors", (data["images"], data["labels"])
            self.tokens = data.get("tokens")
        elif isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(torch.is_tensor(x) for x in data):
            self.kind, self.src = "tensors", (data[0], data[1])
            self.tokens = data[2] if len(data) == 3 else None
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.kind, self.src = "dataset", data
        else:
            raise TypeError("data must be a Dataset of (image, label), a dict {'images', 'labels'[, 'tokens']}, a "
                            "tuple (images, labels[, tokens]) or an object with fetch(indices, device) and __len__")
        if self.kind == "tensors":
            im, lab = self.src
            if im.dim() != 4 or lab.dim() != 1 or im.shape[0] != lab.shape[0]:
                raise ValueError(f"images must be [M, 3, H, W] and labels [M]; got {tuple(im.shape)}, "
                                 f"{tuple(lab.shape)}")
            if self.tokens is not None and self.tokens.shape[0] != im.shape[0]:
                raise ValueError("tokens and images hold different numbers of items")

    def __len__(self) -> int:
        return len(self.src[0]) if self.kind == "tensors" else len(self.src)

    def fetch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.kind == "source":
            out = self.src.fetch(idx, device)
            images, labels = out[0], out[1]
            tokens = out[2] if len(out) > 2 else None
        elif self.kind == "tensors":
            cpu = idx.cpu()
            images, labels = self.src[0][cpu.to(self.src[0].device)], self.src[1][cpu.to(self.src[1].device)]
            tokens = None if self.tokens is None else self.tokens[cpu.to(self.tokens.device)]
        else:
            tokens = None
            items = [self.src[int(i)] for i in idx]
            images = torch.stack([torch.as_tensor(it[0]) for it in items])
            labels = torch.as_tensor([int(it[1]) for it in items])
        return images.to(device), torch.as_tensor(labels).to(device), None if tokens is None else tokens.to(device)


def _weights_fingerprint(model_or_sd: nn.Module | dict) -> str:
    """Short SHA-256 of a generator's weights (names and float32 values), to tie a checkpoint to its start."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    h = hashlib.sha256()
    for name, t in sorted(sd.items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rng_state(data_gen: torch.Generator, step_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    st = {"data": data_gen.get_state(), "step": step_gen.get_state(), "torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["torch_cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], data_gen, step_gen, device: torch.device) -> None:
    data_gen.set_state(st["data"])
    step_gen.set_state(st["step"])
    torch.set_rng_state(st["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in st:
        torch.cuda.set_rng_state(st["torch_cuda"], device)


# ----------------------------------------------------------------------------------------------------------------
# post_train
# ----------------------------------------------------------------------------------------------------------------
def post_train(model: nn.Module, tokenizer: nn.Module, data: Any, cfg: VAPIConfig, steps: int,
               out_dir: str | Path, device: str | torch.device = "auto", *, perceptual_fn: Callable | None = None,
               scale: str = "smoke", resume: bool = True, ckpt_every: int = 50, progress: bool = True,
               time_limit_s: float | None = None) -> dict[str, Any]:
    """Post-train ``model`` **in place** with VA-π for ``steps`` sampling rounds; resumable, atomic checkpoints.

    Args:
        model: the trained generator (its current weights are the starting point and, when ``cfg.kl_coef > 0``,
            the frozen reference). Moved to ``device``.
        tokenizer: the frozen tokenizer (moved to ``device``, set to eval, gradients off).
        data: a torch Dataset of (image [3, H, W] in [0, 1], label) items; a dict ``{"images", "labels"[,
            "tokens"]}`` or tuple ``(images, labels[, tokens])`` of tensors; or an object with ``__len__`` and
            ``fetch(indices, device) -> (images, labels[, tokens])`` such as :class:`EmbeddedSource`. Missing
            tokens are encoded on the fly with the tokenizer (as the code does).
        cfg: :class:`VAPIConfig`; each step draws ``cfg.batch_size`` distinct images uniformly at random (the code
            reshuffles the whole training set every step and takes its first batch).
        steps: total number of steps (a resumed run continues up to it).
        out_dir: receives ``checkpoint.pt`` (full state, every ``ckpt_every`` steps and at the end), ``model.pt``
            (final weights in the ``rearlib.train`` model format, loadable with ``rearlib.train.load_generator``),
            ``history.csv`` (one row per step) and ``result.json``.
        perceptual_fn: callable(a, b) -> [M]; default :func:`make_perceptual_fn` (``cfg.perceptual``, ``scale``).
        scale: used only to find the substitute perceptual network when LPIPS is unavailable.
        resume: continue from ``out_dir/checkpoint.pt`` when its config and starting weights match.
        time_limit_s: stop with a checkpoint after the first step past this many seconds (chunked GPU runs).

    Randomness: the batch order comes from a CPU generator seeded with ``cfg.seed``, the noise / sampling / label
    dropout from a device generator seeded with ``cfg.seed + 1``, and torch's global RNG (model dropout) is
    reseeded with ``cfg.seed + 2``; all three are checkpointed, so a resumed run equals an uninterrupted one
    (bit-exact on CPU; on CUDA up to nondeterministic kernels).

    Returns a dict: ``status`` ("completed" | "stopped"), ``step``, ``steps``, ``history`` (list of per-step
    dicts: step, reward_mean, ..., perceptual_metric, elapsed_s), ``history_df`` (pandas DataFrame of it),
    ``perceptual_metric``, ``wall_time_s`` (this call), ``train_time_s`` (all calls, excluding checkpoint I/O),
    file paths, ``base_fingerprint`` and ``model`` (the post-trained generator, eval mode).
    """
    from tqdm.auto import tqdm

    if not isinstance(cfg, VAPIConfig):
        raise TypeError(f"cfg must be a VAPIConfig, got {type(cfg).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(ckpt_every, int) or ckpt_every < 1:
        raise ValueError(f"ckpt_every must be an integer >= 1, got {ckpt_every!r}")
    t_call = time.perf_counter()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    out_dir = Path(out_dir)
    ckpt_path, model_path = out_dir / "checkpoint.pt", out_dir / "model.pt"
    hist_path, result_path = out_dir / "history.csv", out_dir / "result.json"

    src = _Data(data)
    if len(src) < cfg.batch_size:
        raise ValueError(f"the data holds {len(src)} images, fewer than batch_size={cfg.batch_size}")
    model.to(device)
    tokenizer.to(device).eval().requires_grad_(False)
    if int(tokenizer.codebook_size) != model.config.codebook_size:
        raise ValueError(f"tokenizer has {tokenizer.codebook_size} codes, generator {model.config.codebook_size}")
    if math.prod(tokenizer.grid_size) != model.config.seq_len:
        raise ValueError(f"tokenizer grid {tokenizer.grid_size} != generator seq_len {model.config.seq_len}")
    base_fp = _weights_fingerprint(model)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if perceptual_fn is None and cfg.reward_perceptual_weight > 0:
        perceptual_fn = make_perceptual_fn(cfg.perceptual, scale=scale, device=device)
    metric = perceptual_name(perceptual_fn) if cfg.reward_perceptual_weight > 0 else "none"

    optimizer = build_optimizer(model, cfg, device)
    data_gen = torch.Generator(device="cpu")
    data_gen.manual_seed(cfg.seed)
    step_gen = torch.Generator(device=device)
    step_gen.manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 2)  # dropout inside the model
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed + 2)

    step, history, train_time = 0, [], 0.0
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not a VA-pi checkpoint")
        if ck["vapi_config"] != cfg.to_dict():
            diff = sorted(k for k, v in cfg.to_dict().items() if ck["vapi_config"].get(k) != v)
            raise ValueError(f"{ckpt_path} was written with a different VAPIConfig (fields {diff}); use another "
                             f"out_dir or resume=False")
        if ck["base_fingerprint"] != base_fp and cfg.kl_coef == 0 and _weights_fingerprint(ck["model"]) == base_fp:
            # The same model object passed again after a stopped chunk (it was post-trained in place): continue.
            base_fp = ck["base_fingerprint"]
        if ck["base_fingerprint"] != base_fp:
            raise ValueError(f"{ckpt_path} post-trains a different starting model (fingerprint "
                             f"{ck['base_fingerprint']} vs {base_fp}); use another out_dir or resume=False")
        if ck["perceptual_metric"] != metric:
            raise ValueError(f"{ckpt_path} used perceptual metric {ck['perceptual_metric']}, now {metric}")
        model.load_state_dict(ck["model"], strict=True)
        optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"], data_gen, step_gen, device)
        step, history, train_time = int(ck["step"]), list(ck["history"]), float(ck["train_time_s"])
        del ck

    out_dir.mkdir(parents=True, exist_ok=True)
    base = {"vapi_config": cfg.to_dict(), "model_config": asdict(model.config), "base_fingerprint": base_fp,
            "perceptual_metric": metric, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "checkpoint": str(ckpt_path), "model_path": str(model_path), "history_path": str(hist_path)}

    def save_ckpt() -> None:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "vapi_config": cfg.to_dict(),
                           "model_config": asdict(model.config), "step": step, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "rng": _rng_state(data_gen, step_gen, device),
                           "history": history, "train_time_s": train_time, "base_fingerprint": base_fp,
                           "perceptual_metric": metric}, ckpt_path)

    def write_history() -> None:
        import pandas as pd

        atomic_write_text(hist_path, pd.DataFrame(history).to_csv(index=False))

    status = "completed"
    bar = tqdm(total=steps, initial=min(step, steps), disable=not progress, dynamic_ncols=True, desc="VA-pi")
    try:
        while step < steps:
            t_step = time.perf_counter()
            idx = torch.randperm(len(src), generator=data_gen)[:cfg.batch_size]
            images, labels, tokens = src.fetch(idx, device)
            stats = vapi_step(model, tokenizer, images, tokens, labels, optimizer, cfg, step_gen, perceptual_fn,
                              ref_model=ref_model)
            step += 1
            train_time += time.perf_counter() - t_step
            history.append({"step": step, "lr": optimizer.param_groups[0]["lr"], **stats,
                            "elapsed_s": train_time})
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward_mean']:.4f}", clip=f"{stats['clip_frac']:.3f}",
                            ce=f"{stats['ce']:.3f}")
            over = time_limit_s is not None and time.perf_counter() - t_call > time_limit_s
            if step % ckpt_every == 0 or step == steps or over:
                save_ckpt()
                write_history()
            if over and step < steps:
                status = "stopped"
                break
    finally:
        bar.close()
    if status == "completed":
        from rearlib.train import CHECKPOINT_FORMAT as TRAIN_FORMAT

        # The rearlib.train model format, so samplers/evaluators load it with rearlib.train.load_generator.
        atomic_torch_save({"format": TRAIN_FORMAT + "/model", "train_config": None,
                           "model_config": asdict(model.config), "step": step, "model": model.state_dict(),
                           "ema_model": None, "vapi_config": cfg.to_dict(), "vapi_base_fingerprint": base_fp,
                           "perceptual_metric": metric}, model_path)
        write_history()
    result = {**base, "status": status, "step": step, "steps": steps, "history": history,
              "wall_time_s": time.perf_counter() - t_call, "train_time_s": train_time,
              "final": {k: history[-1].get(k) for k in ("reward_mean", "mse_mean", "perceptual_mean", "ce",
                                                        "clip_frac", "kl")} if history else {}}
    atomic_write_text(result_path, json.dumps(result, indent=2, default=str))
    import pandas as pd

    result["history_df"] = pd.DataFrame(history)
    result["model"] = model.eval()
    return result


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def _parse_kv(items: list[str]) -> dict[str, Any]:
    from rearlib.train import _parse_kv as parse  # one key=value parser for every CLI

    return parse(items)


def _window_mean(history: list[dict], key: str, first: bool, frac: float = 0.1) -> float | None:
    if not history:
        return None
    n = max(1, int(len(history) * frac))
    rows = history[:n] if first else history[-n:]
    return sum(r[key] for r in rows) / len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rearlib vapi", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="small", help="smoke | small | paper (tokenizer, data pool, defaults)")
    p.add_argument("--generator", required=True, help="trained generator: rearlib.train model.pt or checkpoint.pt")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, model.pt, history.csv, result.json)")
    p.add_argument("--steps", type=int, default=None, help="default: scales.VAPI[scale]['steps']")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="VAPIConfig overrides (JSON values)")
    p.add_argument("--data-root", default=None, help="ImageNet root (paper scale)")
    p.add_argument("--data-size", type=int, default=None, help="embedded-data pool size (default per scale)")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the embedded dataset (the generator's training data used seed 0); not the VA-pi seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop with a checkpoint after this")
    p.add_argument("--fresh", action="store_true", help="do not resume from an existing checkpoint")
    args = p.parse_args(argv)

    scale = validate_scale(args.scale)
    from rearlib.tokenizers import get_tokenizer
    from rearlib.train import load_generator

    device = resolve_device(args.device)
    cfg = config_for_scale(scale, **_parse_kv(args.set))
    steps = args.steps or scales.VAPI[scale]["steps"]
    tok = get_tokenizer(scale, device, data_root=args.data_root)
    model = load_generator(args.generator, device)
    if scale == "paper":
        from rearlib.data import load_dataset

        data = load_dataset("imagenet", "train", tok.resolution, root=args.data_root)
    else:
        data = EmbeddedSource(args.data_size or scales.VAPI[scale]["data_size"], tok.resolution, "train", args.data_seed)
    res = post_train(model, tok, data, cfg, steps, args.out, device, scale=scale, resume=not args.fresh,
                     ckpt_every=args.ckpt_every, time_limit_s=args.time_limit)
    h = res["history"]
    summary = {k: res[k] for k in ("status", "step", "steps", "wall_time_s", "train_time_s", "perceptual_metric",
                                   "gpu", "model_path", "history_path")}
    summary.update({"reward_first10pct": _window_mean(h, "reward_mean", True),
                    "reward_last10pct": _window_mean(h, "reward_mean", False),
                    "mse_first10pct": _window_mean(h, "mse_mean", True),
                    "mse_last10pct": _window_mean(h, "mse_mean", False),
                    "sec_per_step": (res["train_time_s"] / res["step"]) if res["step"] else None,
                    "lr": cfg.lr, "batch_size": cfg.batch_size, "group_size": cfg.group_size})
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
