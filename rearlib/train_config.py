"""What defines a generator training run: :class:`TrainConfig`, the per-scale recipe and the generator shape the
config implies.

``TrainConfig.to_dict()`` names a run's artifact folder (its hash is the cache key), so its fields and their order
are part of the on-disk format.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from rearlib import scales
from rearlib.rear import PRESETS as REAR_PRESETS
from rearlib.rear import ReARConfig, get_rear_config
from rearlib.runtime import config_from_dict

#: torch.compile modes TrainConfig.compile may name (True = "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Everything that defines a training run (hashable to name its artifact folder).

    Attributes:
        model: generator preset name in ``rearlib.model.PRESETS`` ("tiny", "small", "rear_s", "rear_b", "rear_l").
        model_overrides: GeneratorConfig field overrides, e.g. ``{"codebook_size": 512, "seq_len": 64}``.
        rear: the reAR objective (:class:`ReARConfig`; ``get_rear_config("ar")`` for plain AR).
        steps: number of optimizer steps; training progress t = step / steps drives the noise schedule.
        batch_size: micro-batch per process. Global batch = batch_size * grad_accum * world_size.
        grad_accum: micro-batches per optimizer step.
        lr, end_lr, warmup_steps: lr(s) = lr * s / warmup for s < warmup, then
            end_lr + (lr - end_lr) * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2.
        betas, weight_decay: AdamW; decay is applied except to :data:`rearlib.train_step.NO_DECAY_KEYS`
            parameters and ndim < 2.
        grad_clip: max global grad L2 norm (0 disables).
        class_dropout: probability of replacing a label by the null class (CFG training).
        ema_decay: None, or the decay of an exponential moving average of the parameters (updated every step).
        seed: model init, batch order, noise and dropout streams all derive from it (and the rank).
        ckpt_every, log_every: intervals in optimizer steps (logging is the only host sync).
        snapshot_every: None, or N: after every N-th optimizer step (and the last) rank 0 also writes
            ``model_step{step}.pt`` (weights + configs, the format of ``model.pt``; :func:`load_generator` reads it),
            e.g. for FID-against-steps curves. It changes no numbers of the run (a run may be resumed with another
            value), and its write time is excluded from ``train_time_s`` and samples/s.
        compile, bf16, fused_adamw: CUDA fast paths (ignored on CPU, which always runs fp32 eager). ``compile`` may
            also name a ``torch.compile`` mode (:data:`COMPILE_MODES`, e.g. "max-autotune-no-cudagraphs"); True is
            the default mode. It changes speed only (and float round-off).
    """

    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    rear: ReARConfig = field(default_factory=lambda: REAR_PRESETS["rear"])
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 4e-4
    end_lr: float = 1e-5
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.96)
    weight_decay: float = 0.03
    grad_clip: float = 1.0
    class_dropout: float = 0.1
    ema_decay: float | None = None
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 20
    snapshot_every: int | None = None
    compile: bool | str = True
    bf16: bool = True
    fused_adamw: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rear, dict):
            self.rear = ReARConfig.from_dict(self.rear)
        elif isinstance(self.rear, str):
            self.rear = get_rear_config(self.rear)
        self.betas = tuple(float(b) for b in self.betas)
        # inf/nan pass the range checks below (inf > 0) and turn the first update into NaN weights.
        for name in ("lr", "end_lr", "weight_decay", "grad_clip", "class_dropout", "ema_decay", "betas"):
            v = getattr(self, name)
            values = v if name == "betas" else ([] if v is None and name == "ema_decay" else [v])
            if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in values):
                what = "finite numbers" if name == "betas" else "a finite number"
                raise ValueError(f"TrainConfig.{name} must be {what}, got {v!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0 (0 disables), got weight_decay="
                             f"{self.weight_decay}, grad_clip={self.grad_clip}")
        for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        if self.snapshot_every is not None and (isinstance(self.snapshot_every, bool)
                                                or not isinstance(self.snapshot_every, int)
                                                or self.snapshot_every < 1):
            raise ValueError(f"TrainConfig.snapshot_every must be None or an integer >= 1, "
                             f"got {self.snapshot_every!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        if not (self.lr > 0 and 0 <= self.end_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= end_lr <= lr, got lr={self.lr}, end_lr={self.end_lr}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout must lie in [0, 1), got {self.class_dropout}")
        if not (isinstance(self.compile, bool) or self.compile in COMPILE_MODES):
            raise ValueError(f"TrainConfig.compile must be True/False or a torch.compile mode {COMPILE_MODES}, "
                             f"got {self.compile!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be None or in (0, 1), got {self.ema_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {self.betas}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, d, "fields")


def config_for_scale(scale: str, rear: str | ReARConfig = "rear", **overrides: Any) -> TrainConfig:
    """A TrainConfig with the per-scale defaults of :data:`scales.GENERATOR_TRAINING`, a reAR preset and field
    overrides."""
    if scale not in scales.GENERATOR_TRAINING:
        raise ValueError(f"unknown scale {scale!r}; allowed values: {', '.join(scales.GENERATOR_TRAINING)}")
    kw = dict(scales.GENERATOR_TRAINING[scale])
    kw.update(overrides)
    return TrainConfig(rear=get_rear_config(rear) if isinstance(rear, str) else rear, **kw)


def generator_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """GeneratorConfig overrides implied by the config: model_overrides plus the reAR head / tied switches.

    A head is built only when its alignment term is on (an unused head would cost time and leave DDP with
    parameters that get no gradient); ``ReARConfig.encode_layer`` / ``decode_layer`` pick the tapped block.
    """
    ov = dict(cfg.model_overrides)
    r = cfg.rear
    wanted: dict[str, Any] = {"tied_codebook": r.tied_codebook}
    if not r.encode_align or r.align_weight == 0:
        wanted["encode_align_layer"] = None
    elif r.encode_layer is not None:
        wanted["encode_align_layer"] = r.encode_layer
    if not r.decode_align or r.align_weight == 0:
        wanted["decode_align_layer"] = None
    elif r.decode_layer is not None:
        wanted["decode_align_layer"] = r.decode_layer
    for k, v in wanted.items():
        if k in ov and ov[k] != v:
            raise ValueError(f"model_overrides[{k!r}]={ov[k]!r} contradicts the reAR config (which needs {v!r}); "
                             f"set it through ReARConfig instead")
        ov[k] = v
    return ov


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Command-line ``KEY=VALUE`` config overrides as a dict; values are read as JSON where they parse
    (``3``, ``0.5``, ``true``, ``[1, 2]``), else kept as strings. Shared by every CLI that takes overrides."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"expected key=value, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
