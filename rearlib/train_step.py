"""The generator training step and what it is built from: the seeded model, the authors' AdamW groups and lr
schedule (docs/paper.md, reAR §1.8), an EMA of the weights, and :class:`Stepper`, the one optimizer step shared by
:func:`rearlib.train.train` and the speed bench (:mod:`rearlib.experiments.bench`)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rearlib.model import build_generator
from rearlib.rear import make_noisy_context, rear_loss
from rearlib.train_config import TrainConfig, generator_overrides
from rearlib.train_data import DeviceBatches, derive_seed
from rearlib.train_distributed import DistInfo

#: Substrings that put a parameter in the no-weight-decay group (the authors' list, docs/paper.md, reAR §1.8).
#: Together with ``ndim < 2``. Note that "ln" also matches e.g. ``adaln_before_head.*``, which the authors
#: therefore do not decay.
NO_DECAY_KEYS = ("ln", "bias", "embedding", "embed", "norm", "gamma", "mask_token", "latent_tokens")


def build_model(cfg: TrainConfig, codebook: torch.Tensor | None, device: torch.device) -> nn.Module:
    """Build the generator for ``cfg`` with a seeded init (identical on every rank), on ``device``."""
    torch.manual_seed(cfg.seed)
    model = build_generator(cfg.model, **generator_overrides(cfg))
    mc = model.config
    if cfg.rear.uses_alignment:
        if cfg.rear.encode_align and mc.encode_align_layer is None:
            raise ValueError(f"preset {cfg.model!r} has no encode_align_layer; set ReARConfig.encode_layer")
        if cfg.rear.decode_align and mc.decode_align_layer is None:
            raise ValueError(f"preset {cfg.model!r} has no decode_align_layer; set ReARConfig.decode_layer")
    model.to(device)
    if mc.tied_codebook:
        if codebook is None:
            raise ValueError("the tied-codebook baseline needs the tokenizer codebook [K, D]")
        model.set_codebook(codebook.to(device))
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weights, none for ndim < 2 or names containing any of :data:`NO_DECAY_KEYS`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def no_decay_names(model: nn.Module) -> list[str]:
    """Names of the parameters AdamW does not decay (for inspection and tests)."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and (p.ndim < 2 or any(k in n for k in NO_DECAY_KEYS))]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (fused on CUDA when ``cfg.fused_adamw``)."""
    fused = bool(cfg.fused_adamw and device.type == "cuda")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up from 0, then cosine to end_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The :func:`lr_at` schedule as a LambdaLR (stepped once per optimizer step)."""
    # LambdaLR multiplies each group's initial lr (= cfg.lr) by the factor.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(cfg, s) / cfg.lr)


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copies), buffers copied as-is."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "params": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if set(params) != set(self.names):
            raise ValueError(f"EMA state does not match the model: missing {sorted(set(self.names) - set(params))}, "
                             f"unexpected {sorted(set(params) - set(self.names))}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(params[n])

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA parameters in place of the trained ones."""
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n, s in zip(self.names, self.shadow):
            sd[n] = s.to(sd[n].dtype).clone()
        return sd


class Stepper:
    """One optimizer step (``grad_accum`` micro-batches) for any variant; shared by ``train()`` and the bench.

    Holds the (possibly DDP-wrapped and compiled) model, the loss, optimizer, scheduler, EMA and the two device
    generators: ``batches`` (epoch permutations, shared seed) and ``noise_gen`` (label dropout and perturbation,
    seeded by (seed, rank)). ``step(step_index)`` returns the micro-batch-averaged statistics as device tensors.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, codebook: torch.Tensor | None, batches: DeviceBatches,
                 device: torch.device, info: DistInfo):
        self.cfg, self.raw, self.device, self.info = cfg, model, device, info
        self.codebook = codebook.to(device=device, dtype=torch.float32) if codebook is not None else None
        self.batches = batches
        self.noise_gen = torch.Generator(device=device)
        self.noise_gen.manual_seed(derive_seed(cfg.seed, info.rank, 0x0015E))
        self.optimizer = build_optimizer(model, cfg, device)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fast = device.type == "cuda"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.fast and cfg.bf16
                         else contextlib.nullcontext())
        self.null_class = model.null_class
        self.codebook_size = model.config.codebook_size
        self.align = cfg.rear.uses_alignment
        self.forward_model: nn.Module = model
        self.ddp_model: nn.Module | None = None
        self.loss_fn = self._loss
        self.nonfinite = torch.zeros((), dtype=torch.int32, device=device)
        # 1-based optimizer step of the first non-finite loss (0: none yet); it tells whether the weights of the
        # last checkpoint are the ones that produced it.
        self.first_nonfinite = torch.zeros((), dtype=torch.int64, device=device)

    def wrap(self) -> None:
        """Compile, then DDP-wrap (after any checkpoint was loaded into the raw model).

        Compiling the module and wrapping the compiled module in DDP is nanoGPT's well-tested order; DDP's
        gradient all-reduce (and ``no_sync`` for accumulation micro-steps) then stays plain eager DDP.
        """
        m: nn.Module = self.raw
        if self.fast and self.cfg.compile:
            mode = self.cfg.compile if isinstance(self.cfg.compile, str) else None
            m = torch.compile(m, mode=mode)
            self.loss_fn = torch.compile(self._loss, mode=mode)
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            m = DDP(m, device_ids=ids)
            self.ddp_model = m
        self.forward_model = m

    def _loss(self, out, targets, mask, eps):
        return rear_loss(out, targets, mask, self.codebook, self.cfg.rear, eps=eps)

    def micro_step(self, t: float, scale: float) -> dict[str, torch.Tensor]:
        tokens, labels = self.batches.next()
        g = self.noise_gen
        if self.cfg.class_dropout > 0:
            drop = torch.rand(labels.shape, generator=g, device=self.device) < self.cfg.class_dropout
            classes = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        else:
            classes = labels
        noisy, mask, eps = make_noisy_context(self.cfg.rear, tokens, t, codebook_size=self.codebook_size,
                                              generator=g)
        with self.autocast:
            out = self.forward_model(noisy, classes, align=self.align)
        loss, stats = self.loss_fn(out, tokens, mask, eps)
        (loss * scale).backward()
        return stats

    def step(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        t = min(1.0, step / cfg.steps)
        total: dict[str, torch.Tensor] | None = None
        for i in range(cfg.grad_accum):
            last = i == cfg.grad_accum - 1
            sync = (contextlib.nullcontext() if (last or self.ddp_model is None)
                    else self.ddp_model.no_sync())
            with sync:
                stats = self.micro_step(t, 1.0 / cfg.grad_accum)
            total = stats if total is None else {k: total[k] + v for k, v in stats.items()}
        assert total is not None
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw)
        out = {k: v / cfg.grad_accum for k, v in total.items()}
        out["grad_norm"] = gnorm.detach().float()
        # Counted on the device; read back (and acted upon) only at log / checkpoint time.
        bad = ~torch.isfinite(out["loss"])
        self.nonfinite += bad.int()
        self.first_nonfinite = torch.where(bad & (self.first_nonfinite == 0), step + 1, self.first_nonfinite)
        return out
