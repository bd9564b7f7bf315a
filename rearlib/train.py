"""The one training loop for every generator variant: plain AR, reAR, every ablation and the tied baseline.

Everything that differs between the variants lives in two dataclasses: the generator preset (+ overrides) and a
:class:`rearlib.rear.ReARConfig`. The loop itself is the authors' recipe (docs/paper.md, reAR §1.8): AdamW (0.9, 0.96)
with weight decay 0.03 and their no-decay groups, linear warm-up from 0 to the peak lr then cosine decay to ``end_lr``,
grad-norm clip 1.0, class-label dropout 0.1, bf16 autocast.

Speed (CUDA): pretokenized data held on the GPU, batches and noise drawn by torch.Generators on the device,
bf16 autocast, ``torch.compile`` of the model and of the loss, fused AdamW, and no host synchronisation except
every ``log_every`` steps (statistics are accumulated on the device and read back once per window).
CPU: plain fp32 eager, which is what the tests use; on CPU a resumed run is bit-identical to one never stopped.

Reliability: checkpoints are written atomically (temporary file + rename) every ``ckpt_every`` steps with the
configs, step, model, optimizer, scheduler, EMA, log history and RNG states (torch CPU, CUDA, and both batch
generators of every rank). A non-finite loss stops training with an error naming the last good checkpoint, which
is never overwritten by a bad state. DDP: launched by ``torchrun`` (WORLD_SIZE > 1) the same code wraps the model
in DistributedDataParallel (nccl on GPU, gloo on CPU); every rank draws its own batches as a deterministic
function of (seed, rank) and rank 0 writes the files.

Entry points: :func:`train` and ``python -m rearlib train --preset small --rear rear --tokens FILE --steps N
--out DIR`` (see ``--help``); :func:`load_generator` rebuilds a trained generator from ``model.pt`` or a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rearlib.runtime import atomic_torch_save, atomic_write_text, resolve_device
from rearlib.rear import PRESETS as REAR_PRESETS
from rearlib.rear import ReARConfig, get_rear_config, make_noisy_context, rear_loss
from rearlib import scales

CHECKPOINT_FORMAT = "rearlib.train/1"

#: Substrings that put a parameter in the no-weight-decay group (the authors' list, docs/paper.md, reAR §1.8).
#: Together with ``ndim < 2``. Note that "ln" also matches e.g. ``adaln_before_head.*``, which the authors
#: therefore do not decay.
NO_DECAY_KEYS = ("ln", "bias", "embedding", "embed", "norm", "gamma", "mask_token", "latent_tokens")


# Fields that may differ between a checkpoint and the config used to resume it (they change no numbers).
_RESUME_FREE_FIELDS = ("log_every", "ckpt_every", "snapshot_every")
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
        betas, weight_decay: AdamW; decay is applied except to :data:`NO_DECAY_KEYS` parameters and ndim < 2.
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
        if len(self.betas) != 2:
            raise ValueError(f"betas must have two values, got {self.betas}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        from rearlib.runtime import config_from_dict

        return config_from_dict(cls, d, "fields")


def config_for_scale(scale: str, rear: str | ReARConfig = "rear", **overrides: Any) -> TrainConfig:
    """A TrainConfig with the per-scale defaults of :data:`scales.GENERATOR_TRAINING`, a reAR preset and field overrides."""
    if scale not in scales.GENERATOR_TRAINING:
        raise ValueError(f"unknown scale {scale!r}; allowed values: {', '.join(scales.GENERATOR_TRAINING)}")
    kw = dict(scales.GENERATOR_TRAINING[scale])
    kw.update(overrides)
    return TrainConfig(rear=get_rear_config(rear) if isinstance(rear, str) else rear, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (also used by rearlib.experiments.bench)
# ----------------------------------------------------------------------------------------------------------------

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


def build_model(cfg: TrainConfig, codebook: torch.Tensor | None, device: torch.device) -> nn.Module:
    """Build the generator for ``cfg`` with a seeded init (identical on every rank), on ``device``."""
    from rearlib.model import build_generator

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


# ----------------------------------------------------------------------------------------------------------------
# Data on the device
# ----------------------------------------------------------------------------------------------------------------

def _derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of the parts (stable across machines and Python versions)."""
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class DeviceBatches:
    """Batches of (tokens, labels) drawn from tensors held on the device, without a DataLoader or host sync.

    Every epoch uses one permutation of the M samples, shared by all ranks (its generator is seeded by ``seed``
    alone); rank r of W takes slice r of each block of W * batch consecutive indices, so ranks never see the same
    sample in one step. The remainder of an epoch that does not fill a block is dropped. Index arithmetic is
    host-side integers; the permutation and gathers run on the device.
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, batch: int, *, seed: int, rank: int,
                 world: int):
        self.tokens, self.labels, self.batch, self.rank, self.world = tokens, labels, batch, rank, world
        self.m = tokens.shape[0]
        self.block = batch * world
        # Epoch permutations cover at least one block even when M < W * batch (tiny test sets).
        self.reps = max(1, math.ceil(self.block / self.m))
        self.gen = torch.Generator(device=tokens.device)
        self.gen.manual_seed(_derive_seed(seed, 0xDA7A))
        self.epoch_state = self.gen.get_state()
        self.cursor = 0
        self.epoch = 0
        self.perm = self._new_perm()

    def _new_perm(self) -> torch.Tensor:
        self.epoch_state = self.gen.get_state()
        return torch.cat([torch.randperm(self.m, generator=self.gen, device=self.tokens.device)
                          for _ in range(self.reps)])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.block > self.perm.numel():
            self.perm = self._new_perm()
            self.cursor = 0
            self.epoch += 1
        start = self.cursor + self.rank * self.batch
        idx = self.perm[start:start + self.batch]
        self.cursor += self.block
        return self.tokens[idx].long(), self.labels[idx].long()

    def state_dict(self) -> dict[str, Any]:
        # The permutation is rebuilt from the generator state at the epoch start (it can be hundreds of MB).
        return {"epoch_state": self.epoch_state, "cursor": self.cursor, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["epoch_state"])
        self.perm = self._new_perm()
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])


def data_fingerprint(tokens: torch.Tensor, labels: torch.Tensor) -> str:
    """Short hash of the training data (shape, dtype and content; large sets hashed on a fixed row subsample)."""
    h = hashlib.sha256(f"{tuple(tokens.shape)}|{tokens.dtype}|{tuple(labels.shape)}".encode())
    rows = tokens.shape[0]
    sel = torch.arange(rows) if rows <= 200_000 else torch.linspace(0, rows - 1, 200_000).long()
    h.update(tokens[sel.to(tokens.device)].to(torch.int32).cpu().numpy().tobytes())
    h.update(labels[sel.to(labels.device)].to(torch.int32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def validate_data(tokens: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor | None, model_cfg: Any,
                  rear: ReARConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, dtypes and ranges against the generator config; flatten token grids to raster order."""
    if not isinstance(tokens, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("tokens and labels must be torch tensors")
    if tokens.is_floating_point() or labels.is_floating_point():
        raise TypeError(f"tokens and labels must be integer tensors, got {tokens.dtype} and {labels.dtype}")
    if tokens.dim() == 3:
        tokens = tokens.reshape(tokens.shape[0], -1)  # [M, h, w] -> raster order [M, h*w]
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [M, N] or [M, h, w], got shape {tuple(tokens.shape)}")
    if labels.shape != tokens.shape[:1]:
        raise ValueError(f"labels must be [M] = [{tokens.shape[0]}], got {tuple(labels.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("no training samples")
    n, k, c = model_cfg.seq_len, model_cfg.codebook_size, model_cfg.num_classes
    if tokens.shape[1] != n:
        raise ValueError(f"tokens have {tokens.shape[1]} positions but the generator's seq_len is {n}; "
                         f"pass model_overrides={{'seq_len': {tokens.shape[1]}}}")
    tmin, tmax = int(tokens.min()), int(tokens.max())
    if tmin < 0 or tmax >= k:
        raise ValueError(f"token ids span [{tmin}, {tmax}] but the codebook size is {k}; ids must lie in [0, {k})")
    lmin, lmax = int(labels.min()), int(labels.max())
    if lmin < 0 or lmax >= c:
        raise ValueError(f"labels span [{lmin}, {lmax}] but num_classes is {c}; labels must lie in [0, {c})")
    if codebook is not None:
        if codebook.dim() != 2 or codebook.shape[0] != k:
            raise ValueError(f"codebook must be [K={k}, D], got {tuple(codebook.shape)}")
    elif rear.uses_alignment:
        raise ValueError("the reAR alignment loss needs the tokenizer codebook [K, D]; pass codebook=...")
    return tokens, labels


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False  # we initialised the process group (and destroy it at the end)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) or when one is already initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                        int(os.environ.get("LOCAL_RANK", 0)), True)
    else:
        return DistInfo(), device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def concrete_device(device: torch.device) -> torch.device:
    """"cuda" -> "cuda:<current>": device generators and RNG states are per physical device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def _rng_state(device: torch.device, batches: DeviceBatches, noise_gen: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "batches": batches.state_dict(),
        "noise": noise_gen.get_state(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device, batches: DeviceBatches,
                   noise_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    batches.load_state_dict(state["batches"])
    noise_gen.set_state(state["noise"])


def _resume_key(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _RESUME_FREE_FIELDS}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (weights-only unpickling) and check its format tag."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, CHECKPOINT_FORMAT + "/model"):
        raise ValueError(f"{path} is not a rearlib.train checkpoint or model file")
    return ckpt


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu", *, ema: bool = False) -> nn.Module:
    """Rebuild a trained generator (eval mode) from ``model.pt`` or ``checkpoint.pt``; strict key/shape check.

    ``ema=True`` loads the EMA weights (error if the run kept none).
    """
    from rearlib.model import GeneratorConfig, build_generator

    ckpt = load_checkpoint(path)
    mc = GeneratorConfig(**ckpt["model_config"])
    model = build_generator(mc)
    if ema:
        if ckpt.get("ema_model") is None and ckpt.get("ema") is None:
            raise ValueError(f"{path} holds no EMA weights (train with ema_decay set)")
        sd = ckpt["ema_model"] if ckpt.get("ema_model") is not None else _ema_into(model, ckpt)
    else:
        sd = ckpt["model"]
    _strict_load(model, sd, str(path))
    return model.to(resolve_device(str(device)) if isinstance(device, str) else device).eval()


def snapshot_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``out_dir/model_step{step}.pt``: the weights after optimizer step ``step`` (``TrainConfig.snapshot_every``)."""
    return Path(out_dir) / f"model_step{int(step)}.pt"


def list_snapshots(out_dir: str | os.PathLike) -> dict[int, Path]:
    """{step: path} of the snapshots in ``out_dir``, sorted by step."""
    found = {}
    for p in Path(out_dir).glob("model_step*.pt"):
        tail = p.stem[len("model_step"):]
        if tail.isdigit():
            found[int(tail)] = p
    return dict(sorted(found.items()))


def _weights_file(cfg: TrainConfig, mc: Any, model: nn.Module, ema: EMA | None, step: int) -> dict[str, Any]:
    """The content of ``model.pt`` and of every snapshot: weights (and EMA weights) with their configs."""
    return {"format": CHECKPOINT_FORMAT + "/model", "train_config": cfg.to_dict(), "model_config": asdict(mc),
            "step": step, "model": model.state_dict(),
            "ema_model": ema.model_state_dict(model) if ema is not None else None}


def _write_snapshot(cfg: TrainConfig, mc: Any, model: nn.Module, ema: EMA | None, step: int, out_dir: Path,
                    device: torch.device, info: DistInfo) -> float:
    """Rank 0 writes ``model_step{step}.pt`` (the format of ``model.pt``); returns the seconds the write took."""
    if not info.is_main:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued steps belong to training time, not to the write
    t0 = time.perf_counter()
    atomic_torch_save(_weights_file(cfg, mc, model, ema, step), snapshot_path(out_dir, step))
    return time.perf_counter() - t0


def _ema_into(model: nn.Module, ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    sd = dict(ckpt["model"])
    sd.update({k: v.to(sd[k].dtype) for k, v in ckpt["ema"]["params"].items()})
    return sd


def _strict_load(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict), raising :class:`rearlib.model.StateDictMismatchError` (a ValueError) that names
    ``where`` and lists every missing, unexpected or mis-shaped entry."""
    from rearlib.model import StateDictMismatchError, check_state_dict

    try:
        check_state_dict(model, sd)
    except StateDictMismatchError as err:
        raise StateDictMismatchError(f"{where}: {err}") from None
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------------------

class Stepper:
    """One optimizer step (``grad_accum`` micro-batches) for any variant; shared by :func:`train` and the bench.

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
        self.noise_gen.manual_seed(_derive_seed(cfg.seed, info.rank, 0x0015E))
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
            from torch.nn.parallel import DistributedDataParallel as DDP

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
        self.nonfinite += (~torch.isfinite(out["loss"])).int()
        return out


# ----------------------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------------------

def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(cfg: TrainConfig, tokens: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor | None,
          out_dir: str | os.PathLike, device: str | torch.device = "auto", resume: bool = True, *,
          stop_at: int | None = None, time_limit_s: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a generator and return a result dict (also written to ``out_dir/result.json`` by rank 0).

    Args:
        cfg: the :class:`TrainConfig`.
        tokens: pretokenized images, integer [M, N] (raster order) or [M, h, w]; moved to the device once.
        labels: class labels [M] in [0, num_classes).
        codebook: tokenizer codebook [K, D] (alignment targets and tied baseline); None only for plain AR.
        out_dir: folder for ``checkpoint.pt`` (full state), ``model.pt`` (weights + configs) and ``result.json``.
        device: "auto", "cpu", "cuda" or a torch.device; under torchrun each rank uses cuda:LOCAL_RANK.
        resume: continue from ``out_dir/checkpoint.pt`` if present (its config must match; a finished run returns
            its stored result without training). False starts over (the old files are overwritten).
        stop_at: stop (with a checkpoint) after this optimizer step: chunked runs and resume tests.
        time_limit_s: stop (with a checkpoint) at the first log step after this many seconds of this call.
        progress: show the tqdm bar (rank 0 only).

    Returns:
        A dict with ``status`` ("completed" | "stopped"), ``step``, ``steps``, ``wall_time_s`` (this call),
        ``train_time_s`` (all calls), ``samples_per_s`` (steady state: after the first log window, global),
        ``final`` (last logged loss / ce / enc / dec / acc / eps / grad_norm), ``history`` (every logged window),
        ``gpu``, ``params``, file paths, and (not in the JSON) ``model``: the trained raw generator.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    device = concrete_device(resolve_device(str(device)) if not isinstance(device, torch.device) else device)
    info, device = init_distributed(device)
    try:
        return _train(cfg, tokens, labels, codebook, Path(out_dir), device, resume, info, stop_at, time_limit_s,
                      progress)
    finally:
        if info.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, tokens: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor | None,
           out_dir: Path, device: torch.device, resume: bool, info: DistInfo, stop_at: int | None,
           time_limit_s: float | None, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t_call = time.perf_counter()
    ckpt_path, model_path, result_path = out_dir / "checkpoint.pt", out_dir / "model.pt", out_dir / "result.json"
    if device.type == "cuda":
        # TF32 for any fp32 matmul left outside autocast (the authors train with TF32 on).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = build_model(cfg, codebook, device)
    mc = model.config
    tokens, labels = validate_data(tokens, labels, codebook, mc, cfg.rear)
    if cfg.rear.uses_alignment and codebook is not None and codebook.shape[1] != mc.z_dim:
        raise ValueError(f"codebook vectors have dimension {codebook.shape[1]} but the generator's z_dim is "
                         f"{mc.z_dim}; pass model_overrides={{'z_dim': {codebook.shape[1]}}}")
    fingerprint = data_fingerprint(tokens, labels)
    # Small integer dtypes keep a large token set compact on the device; batches are cast to long when drawn.
    tokens = tokens.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)

    batches = DeviceBatches(tokens, labels, cfg.batch_size, seed=cfg.seed, rank=info.rank, world=info.world)
    stepper = Stepper(cfg, model, codebook, batches, device, info)
    # Dropout streams differ per rank but are fixed by (seed, rank).
    torch.manual_seed(_derive_seed(cfg.seed, info.rank, 0xD0))
    if device.type == "cuda":
        torch.cuda.manual_seed(_derive_seed(cfg.seed, info.rank, 0xD1))

    step, history, train_time = 0, [], 0.0
    resumed_from = None
    if not resume and info.is_main:
        # Starting over: stale files of an earlier run must not be mistaken for this run's outputs.
        for f in (ckpt_path, model_path, result_path):
            f.unlink(missing_ok=True)
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if _resume_key(ckpt["train_config"]) != _resume_key(cfg.to_dict()):
            diff = sorted(k for k in cfg.to_dict() if k not in _RESUME_FREE_FIELDS
                          and ckpt["train_config"].get(k) != cfg.to_dict()[k])
            raise ValueError(f"{ckpt_path} was written by a different config (fields {diff} differ); use another "
                             f"out_dir or resume=False to start over")
        if ckpt["data_fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt_path} was trained on different data (fingerprint {ckpt['data_fingerprint']} "
                             f"vs {fingerprint}); use another out_dir or resume=False")
        if ckpt["world_size"] != info.world:
            raise ValueError(f"{ckpt_path} was written by {ckpt['world_size']} processes, this run has "
                             f"{info.world}; resume with the same number of processes (batch streams are per rank)")
        _strict_load(model, ckpt["model"], str(ckpt_path))
        stepper.optimizer.load_state_dict(ckpt["optimizer"])
        stepper.scheduler.load_state_dict(ckpt["scheduler"])
        if stepper.ema is not None:
            stepper.ema.load_state_dict(ckpt["ema"])
        _set_rng_state(ckpt["rng"][info.rank], device, batches, stepper.noise_gen)
        step, history, train_time = int(ckpt["step"]), list(ckpt["history"]), float(ckpt["train_time_s"])
        resumed_from = step
        del ckpt

    stepper.wrap()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    global_batch = cfg.batch_size * cfg.grad_accum * info.world
    base = {
        "train_config": cfg.to_dict(), "model_config": asdict(mc), "params": _model_params(model),
        "global_batch": global_batch, "world_size": info.world, "device": str(device), "gpu": gpu,
        "checkpoint": str(ckpt_path), "model_path": str(model_path), "resumed_from": resumed_from,
    }

    def save(step_now: int) -> None:
        # Called on every rank (the RNG gather is collective); only rank 0 writes.
        rng = _gather_objects(_rng_state(device, batches, stepper.noise_gen), info)
        if not info.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "train_config": cfg.to_dict(), "model_config": asdict(mc),
            "step": step_now, "model": model.state_dict(), "optimizer": stepper.optimizer.state_dict(),
            "scheduler": stepper.scheduler.state_dict(),
            "ema": stepper.ema.state_dict() if stepper.ema is not None else None,
            "rng": rng, "world_size": info.world, "data_fingerprint": fingerprint, "history": history,
            "train_time_s": train_time,
        }
        atomic_torch_save(state, ckpt_path)

    def check_finite(upto: int) -> None:
        bad = _all_reduce_mean(stepper.nonfinite.float(), info).item()
        if bad > 0:
            last = history[-1]["step"] if history else 0
            good = (f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists()
                    else "no checkpoint was written yet")
            raise FloatingPointError(
                f"non-finite loss at or before step {upto} (last finite log at step {last}); training stopped and "
                f"{good}. Lower lr, raise warmup_steps or check the data.")

    if step >= cfg.steps:
        if result_path.exists():
            res = json.loads(result_path.read_text())
            res["model"] = model.eval()
            return res

    out_dir.mkdir(parents=True, exist_ok=True)
    if stop_at is not None and step >= stop_at and step < cfg.steps:
        # Already past the requested stopping point (a chunked run re-launched): nothing to do.
        return {**base, "status": "stopped", "step": step, "steps": cfg.steps, "history": history,
                "wall_time_s": time.perf_counter() - t_call, "train_time_s": train_time, "samples_per_s": None,
                "final": {k: (history[-1] if history else {}).get(k) for k in ("loss", "ce", "enc", "dec", "acc")},
                "model": model.eval()}
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and info.is_main), dynamic_ncols=True,
               desc=f"train {cfg.model}" + ("" if cfg.rear.uses_noise or cfg.rear.uses_alignment else " (AR)"))
    window: dict[str, torch.Tensor] = {}
    window_steps, window_t0 = 0, time.perf_counter()
    timed_samples, timed_s = 0, 0.0
    first_window = True
    status = "completed"
    last_step_time = time.perf_counter()
    try:
        while step < cfg.steps:
            stats = stepper.step(step)
            step += 1
            window = stats if not window else {k: window[k] + v for k, v in stats.items()}
            window_steps += 1
            bar.update(1)
            if cfg.snapshot_every is not None and (step % cfg.snapshot_every == 0 or step == cfg.steps):
                # Snapshot write time (it syncs the device) is not training time, nor part of the window's rate.
                t_snap = _write_snapshot(cfg, mc, model, stepper.ema, step, out_dir, device, info)
                last_step_time += t_snap
                window_t0 += t_snap
            at_log = step % cfg.log_every == 0 or step == cfg.steps or step == stop_at
            at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps or step == stop_at
            if at_log or at_ckpt:
                # The only host sync: one read of the window's device statistics.
                vals = _all_reduce_mean(torch.stack([window[k] for k in window]) / window_steps, info).tolist()
                now = time.perf_counter()
                dt = now - window_t0
                train_time += now - last_step_time
                last_step_time = now
                rec = {"step": step, "lr": stepper.scheduler.get_last_lr()[0],
                       **{k: v for k, v in zip(window, vals)},
                       "samples_per_s": window_steps * global_batch / dt}
                check_finite(step)
                history.append(rec)
                if not first_window:  # the first window includes compilation / warm-up
                    timed_samples += window_steps * global_batch
                    timed_s += dt
                first_window = False
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}",
                                sps=f"{rec['samples_per_s']:.0f}")
                window, window_steps, window_t0 = {}, 0, time.perf_counter()
                stop = (stop_at is not None and step >= stop_at)
                if time_limit_s is not None:
                    over = torch.tensor(float(time.perf_counter() - t_call > time_limit_s), device=device)
                    stop = stop or _all_reduce_mean(over, info).item() > 0
                if at_ckpt or stop:
                    save(step)
                    last_step_time = time.perf_counter()  # checkpoint I/O is not training time
                    window_t0 = last_step_time
                if stop and step < cfg.steps:
                    status = "stopped"
                    break
    finally:
        bar.close()

    if info.enabled:
        # Cheap consistency check: every rank must hold the same parameters after DDP training.
        sums = _gather_objects(float(sum(p.detach().double().sum() for p in model.parameters())), info)
        if any(s != sums[0] for s in sums):
            raise RuntimeError(f"DDP ranks ended with different parameters (checksums {sums})")

    last = history[-1] if history else {}
    result = {
        **base, "status": status, "step": step, "steps": cfg.steps,
        "wall_time_s": time.perf_counter() - t_call, "train_time_s": train_time,
        "samples_per_s": (timed_samples / timed_s) if timed_s > 0 else (last.get("samples_per_s")),
        "final": {k: last.get(k) for k in ("loss", "ce", "enc", "dec", "acc", "eps", "perturbed", "grad_norm")},
        "history": history,
    }
    if info.is_main:
        if status == "completed":
            atomic_torch_save(_weights_file(cfg, mc, model, stepper.ema, step), model_path)
        atomic_write_text(result_path, json.dumps(result, indent=2, default=str))
    result["model"] = model.eval()
    if stepper.ema is not None:
        result["ema_state_dict"] = stepper.ema.model_state_dict(model)
    return result


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def load_pretokenized(path: str | os.PathLike, tokenizer: Any = None) -> dict[str, Any]:
    """Read training tokens from a file: returns {"tokens" [M, L] (compact dtype), "labels" [M], and optionally
    "codebook" [K, D], "num_classes"}.

    Accepted: a ``rearlib.tokenizers.pretokenize`` file (format "rearlib-tokens": tokens [N, V, L] with V views; every view
    becomes one training sample with its image's label; ``tokenizer`` (object or identity string) is checked
    against the file's tokenizer identity when given), or any torch / .npz dict with "tokens" ([M, L] or
    [M, h, w]) and "labels" [M] (and optionally "codebook", "num_classes").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretokenized file {path} not found; create it first with "
                                f"rearlib.tokenizers.pretokenize.pretokenize(...)")
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as z:
            d = {k: torch.from_numpy(z[k]) for k in z.files}
    else:
        d = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(d, dict) and d.get("format") == "rearlib-tokens":
        from rearlib.tokenizers.pretokenize import load_tokens

        ds = load_tokens(path, tokenizer if tokenizer is not None else d["tokenizer_identity"])
        n, v, length = ds.tokens.shape
        return {"tokens": ds.tokens.reshape(n * v, length), "labels": ds.labels.repeat_interleave(v),
                "codebook_size": ds.codebook_size, "tokenizer_identity": ds.tokenizer_identity}
    if not isinstance(d, dict) or "tokens" not in d or "labels" not in d:
        raise ValueError(f"{path} must hold a dict with 'tokens' and 'labels' (optionally 'codebook')")
    tokens = d["tokens"]
    if tokens.dim() == 3:
        tokens = tokens.reshape(tokens.shape[0], -1)
    return {**d, "tokens": tokens}


def _parse_kv(items: list[str]) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rearlib train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="generator preset (rearlib.model.PRESETS)")
    p.add_argument("--rear", default="rear", help=f"reAR preset: {', '.join(REAR_PRESETS)}")
    p.add_argument("--rear-set", nargs="*", default=[], metavar="K=V", help="ReARConfig overrides, JSON values")
    p.add_argument("--model-set", nargs="*", default=[], metavar="K=V", help="GeneratorConfig overrides")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="pretokenized file (rearlib.tokenizers.pretokenize file, or a .pt / .npz dict with "
                                      "tokens, labels[, codebook])")
    src.add_argument("--synthetic", type=int, metavar="M",
                     help="M random token sequences, labels and a random codebook in the preset's shapes: a speed "
                          "/ DDP smoke test without data (numbers mean nothing)")
    p.add_argument("--codebook", default=None, help="torch file with the codebook [K, D] (if not in --tokens)")
    p.add_argument("--tokenizer", default=None, choices=("smoke", "small", "paper"),
                   help="take the codebook from rearlib.tokenizers.get_tokenizer(SCALE) (and check the file's "
                        "tokenizer identity)")
    p.add_argument("--tokenizer-path", default=None, help="checkpoint path for --tokenizer small/paper")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, model.pt, result.json)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="per-process micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--end-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 4, as 62.5k/250k)")
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default: no EMA, as the authors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode (speed only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop with a checkpoint after this")
    p.add_argument("--fresh", action="store_true", help="do not resume from an existing checkpoint")
    args = p.parse_args(argv)

    tok = None
    if args.tokenizer is not None:
        from rearlib.tokenizers import get_tokenizer

        tok = get_tokenizer(args.tokenizer, "cpu", path=args.tokenizer_path)
    if args.synthetic is not None:
        from rearlib.model import get_config

        mc0 = get_config(args.preset, **_parse_kv(args.model_set))
        g = torch.Generator().manual_seed(args.seed)
        data = {"tokens": torch.randint(0, mc0.codebook_size, (args.synthetic, mc0.seq_len), generator=g),
                "labels": torch.randint(0, mc0.num_classes, (args.synthetic,), generator=g),
                "codebook": torch.randn(mc0.codebook_size, mc0.z_dim, generator=g)}
    else:
        data = load_pretokenized(args.tokens, tok)
    tokens, labels = data["tokens"], data["labels"]
    codebook = data.get("codebook")
    if tok is not None:
        codebook = tok.codebook.detach().float().cpu()
    if args.codebook:
        codebook = torch.load(args.codebook, map_location="cpu", weights_only=True)
        if isinstance(codebook, dict):
            codebook = codebook["codebook"]
    if codebook is None and "codebook_size" in data:
        model_ov_k = int(data["codebook_size"])
    else:
        model_ov_k = None
    model_ov = _parse_kv(args.model_set)
    # Shapes the data fixes, unless given explicitly.
    model_ov.setdefault("seq_len", int(tokens[0].numel()))
    if codebook is not None:
        model_ov.setdefault("codebook_size", int(codebook.shape[0]))
        model_ov.setdefault("z_dim", int(codebook.shape[1]))
    elif model_ov_k is not None:
        model_ov.setdefault("codebook_size", model_ov_k)
    if "num_classes" in data:
        model_ov.setdefault("num_classes", int(data["num_classes"]))
    cfg = TrainConfig(
        model=args.preset, model_overrides=model_ov, rear=get_rear_config(args.rear, **_parse_kv(args.rear_set)),
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, end_lr=args.end_lr,
        warmup_steps=args.warmup if args.warmup is not None else args.steps // 4, weight_decay=args.weight_decay,
        class_dropout=args.class_dropout, ema_decay=args.ema, seed=args.seed, ckpt_every=args.ckpt_every,
        log_every=args.log_every, compile=False if args.no_compile else (args.compile_mode or True))
    res = train(cfg, tokens, labels, codebook, args.out, device=args.device, resume=not args.fresh,
                stop_at=args.stop_at, time_limit_s=args.time_limit)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: res[k] for k in ("status", "step", "steps", "global_batch", "world_size", "gpu", "params",
                                       "wall_time_s", "train_time_s", "samples_per_s", "final")}
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
