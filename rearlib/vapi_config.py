"""The settings of VA-π post-training: :class:`VAPIConfig` (defaults = the released C2I launcher) and its
per-scale values (:data:`rearlib.scales.VAPI`)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

from rearlib import scales
from rearlib.runtime import config_from_dict
from rearlib.scales import validate_scale

NOISE_KERNELS = ("code", "paper")
MODES = ("train", "eval")
RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k3", "full")
#: Which update a run performs: the method, or one of its controls (same seeds, same data, same rollout).
CONTROLS = ("full", "prior_only", "shuffled_rewards")
#: Which reconstruction terms enter the reward.
REWARD_TERMS = ("mse", "perceptual", "both")


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
        reward_terms: which terms enter R: "both" (the paper and code: R = -(w_mse · MSE + λ_p · D_p)), "mse" or
            "perceptual" (the one-term rows of the paper's Table 4). A term enters only if it is selected here and
            its weight is > 0, so "both" with one weight 0 is a one-term reward too.
        reward_mse_weight: w_mse (code: 1.0; not in the paper). MSE on images in [-1, 1], per image.
        reward_perceptual_weight: w_p = λ_p (code: 1.0; not in the paper). 0 disables the perceptual term.
            λ_p = 1 balances LPIPS-VGG (typical values 0.1-0.6) against MSE on [-1, 1] only roughly, and other
            metrics live on other scales, so the same weight is a different reward. What matters after group
            normalisation is each term's spread among the G samples of one image: :func:`rearlib.vapi.reward_spreads`
            reports both spreads and the λ_p that equalises them, and every step logs them (``mse_group_std``,
            ``perceptual_group_std``). Report the metric name and λ_p with every result.
        perceptual: perceptual metric for :func:`make_perceptual_fn`, one of
            :data:`rearlib.metrics.PERCEPTUAL_CHOICES`. "auto" (the class default): LPIPS-VGG, the code's metric,
            when its weights are on disk, else ST-LPIPS(alex); the smoke and small scales ask for "st-lpips-alex"
            explicitly so that a run's reward does not depend on which weights a machine happens to cache. "dfd"
            (the in-project classifier, labeled ``DFD[rearlib-classifier]``) only by name: it shares its network
            with the classifier-based FID, so a reward on it optimises that evaluator's features.
    Control (each a run with the same seeds as the method, to tell what the reward contributes):
        control: "full" (the method), "prior_only" (the paper's Table 4 row with no reward term: the update is
            β · CE (+ κ · KL) alone; rollouts and rewards are still computed and logged, the policy-gradient term is
            left out of the loss) or "shuffled_rewards" (the B·G rewards of a round are permuted across the whole
            batch, by a generator seeded from ``seed``, before the advantages: the same reward values reach random
            samples, so whatever this run gains over "prior_only" does not come from the reward).
    Modes (the code's choice is the default):
        rollout_mode: "eval" (code: sampling forward in eval(), no grad, bf16) or "train" (dropout and class-label
            dropout active while sampling, as a LlamaGen GPT in train mode would do).
        update_mode: "train" (code: dropout 0.1, attention dropout 0.1 and class-label dropout 0.1 active in the
            update pass) or "eval" (no dropout in the update: on-policy, the ratio is exactly 1 until the first
            optimizer step of the round). The class default is the code's; the smoke and small scales use "eval",
            a documented deviation. With the code's arrangement (eval-mode rollout, train-mode update) the ratio
            differs from 1 only through dropout, and on the small generator (G = 8, 32 images per step) every run
            logged approx_kl 0.18-0.27 per token and clip fraction 0.63-0.70; a policy gradient computed with
            shuffled rewards had the same norm as the real one and cosine 0.68 with it, against -0.05 with the
            update in eval mode. About half of each train-mode update therefore does not depend on the reward.
            "train" stays available, and is the paper scale's setting, for fidelity to the released code.
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
            The gradients of the micro-batches accumulate into one optimizer step per minibatch, weighted by their
            share of it, so 128 images x G = 8 per step with ``micro_batch_images=16`` is 8 accumulated
            micro-batches of 128 sequences and the same update as one pass over all 1024. The code's micro-batch of
            8 sequences at G = 8 is one image.
        decode_batch: sequences per tokenizer decode / reward call (memory only).
        seed: seeds the data order, the context noise, the sampling, the dropout and the reward-permutation streams
            of :func:`post_train`.
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
    reward_terms: str = "both"
    reward_mse_weight: float = 1.0
    reward_perceptual_weight: float = 1.0
    perceptual: str = "auto"
    control: str = "full"
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
        for name, allowed in (("reward_terms", REWARD_TERMS), ("control", CONTROLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"VAPIConfig.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.reward_terms == "mse" and self.reward_mse_weight == 0:
            raise ValueError("reward_terms='mse' with reward_mse_weight=0: the reward would be constant")
        if self.reward_terms == "perceptual" and self.reward_perceptual_weight == 0:
            raise ValueError("reward_terms='perceptual' with reward_perceptual_weight=0: the reward would be constant")
        if self.control == "prior_only" and self.ce_weight == 0:
            raise ValueError("control='prior_only' updates with the CE prior alone, so it needs ce_weight > 0 "
                             f"(got {self.ce_weight})")
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

    @property
    def uses_mse(self) -> bool:
        """Whether the MSE term enters the reward."""
        return self.reward_terms in ("mse", "both") and self.reward_mse_weight > 0

    @property
    def uses_perceptual(self) -> bool:
        """Whether the perceptual term enters the reward (and a perceptual callable is needed)."""
        return self.reward_terms in ("perceptual", "both") and self.reward_perceptual_weight > 0

    def replace(self, **overrides: Any) -> VAPIConfig:
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown VAPIConfig fields {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAPIConfig:
        return config_from_dict(cls, d, "fields")


def config_for_scale(scale: str, **overrides: Any) -> VAPIConfig:
    """The :class:`VAPIConfig` of ``scale`` (see :data:`scales.VAPI`) with field ``overrides``."""
    validate_scale(scale)
    return VAPIConfig(**{**scales.VAPI[scale]["config"], **overrides})


def lr_sweep_configs(scale: str, **overrides: Any) -> dict[float, VAPIConfig]:
    """The learning-rate sweep of ``scale``: {lr: config} for every lr of ``scales.VAPI[scale]["lr_sweep"]``, each
    the scale's config with the sweep's settings (``"sweep_config"``: images per step, G, accumulation) and then
    ``overrides`` (e.g. ``seed``); ``lr`` itself cannot be overridden here. Its steps: ``"sweep_steps"``."""
    validate_scale(scale)
    if "lr" in overrides:
        raise ValueError("lr_sweep_configs sets lr from the sweep; pass the other overrides only")
    entry = scales.VAPI[scale]
    return {float(lr): config_for_scale(scale, **{**entry["sweep_config"], **overrides, "lr": lr})
            for lr in entry["lr_sweep"]}


def control_configs(cfg: VAPIConfig, controls: tuple[str, ...] = CONTROLS) -> dict[str, VAPIConfig]:
    """{control: ``cfg`` with that control}: the method and its controls under otherwise identical settings and
    seeds (e.g. ``control_configs(cfg, scales.VAPI[scale]["controls"])``)."""
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown controls {unknown}; allowed: {', '.join(CONTROLS)}")
    return {c: cfg.replace(control=c) for c in controls}
