"""Files of a generator training run: the full checkpoint (``checkpoint.pt``, for exact resume), the weights file
(``model.pt`` and the ``model_step{N}.pt`` snapshots) and :func:`load_generator`, which rebuilds a generator from
either.

Format tags: ``rearlib.train/1`` for a checkpoint, ``rearlib.train/1/model`` for a weights file. Files are read with
weights-only unpickling and loaded with a strict key and shape check.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rearlib.checkpoints import StateDictMismatchError, check_state_dict
from rearlib.model import GeneratorConfig, build_generator
from rearlib.runtime import atomic_torch_save, resolve_device
from rearlib.train_config import TrainConfig
from rearlib.train_data import DeviceBatches
from rearlib.train_distributed import DistInfo
from rearlib.train_step import EMA

CHECKPOINT_FORMAT = "rearlib.train/1"

#: Fields that may differ between a checkpoint and the config used to resume it (they change no numbers).
RESUME_FREE_FIELDS = ("log_every", "ckpt_every", "snapshot_every")


def resume_key(d: dict[str, Any]) -> dict[str, Any]:
    """The part of a ``TrainConfig.to_dict()`` that must match for a checkpoint to be resumed."""
    return {k: v for k, v in d.items() if k not in RESUME_FREE_FIELDS}


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, fingerprint: str, world: int, path: Path) -> None:
    """Raise ValueError unless ``ckpt`` continues this run: same config (up to :data:`RESUME_FREE_FIELDS`), same
    data fingerprint and same number of processes (batch streams are per rank)."""
    if resume_key(ckpt["train_config"]) != resume_key(cfg.to_dict()):
        diff = sorted(k for k in cfg.to_dict() if k not in RESUME_FREE_FIELDS
                      and ckpt["train_config"].get(k) != cfg.to_dict()[k])
        raise ValueError(f"{path} was written by a different config (fields {diff} differ); use another "
                         f"out_dir or resume=False to start over")
    if ckpt["data_fingerprint"] != fingerprint:
        raise ValueError(f"{path} was trained on different data (fingerprint {ckpt['data_fingerprint']} "
                         f"vs {fingerprint}); use another out_dir or resume=False")
    if ckpt["world_size"] != world:
        raise ValueError(f"{path} was written by {ckpt['world_size']} processes, this run has "
                         f"{world}; resume with the same number of processes (batch streams are per rank)")


def rng_state(device: torch.device, batches: DeviceBatches, noise_gen: torch.Generator) -> dict[str, Any]:
    """Every random stream of one rank: torch CPU, CUDA, the batch order and the noise generator."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "batches": batches.state_dict(),
        "noise": noise_gen.get_state(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device, batches: DeviceBatches,
                  noise_gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    batches.load_state_dict(state["batches"])
    noise_gen.set_state(state["noise"])


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
    ckpt = load_checkpoint(path)
    mc = GeneratorConfig(**ckpt["model_config"])
    model = build_generator(mc)
    if ema:
        if ckpt.get("ema_model") is None and ckpt.get("ema") is None:
            raise ValueError(f"{path} holds no EMA weights (train with ema_decay set)")
        sd = ckpt["ema_model"] if ckpt.get("ema_model") is not None else _ema_into(ckpt)
    else:
        sd = ckpt["model"]
    strict_load(model, sd, str(path))
    return model.to(resolve_device(str(device)) if isinstance(device, str) else device).eval()


def _ema_into(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint's model state dict with its EMA parameters in place of the trained ones."""
    sd = dict(ckpt["model"])
    sd.update({k: v.to(sd[k].dtype) for k, v in ckpt["ema"]["params"].items()})
    return sd


def strict_load(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict), raising :class:`rearlib.model.StateDictMismatchError` (a ValueError) that names
    ``where`` and lists every missing, unexpected or mis-shaped entry."""
    try:
        check_state_dict(model, sd)
    except StateDictMismatchError as err:
        raise StateDictMismatchError(f"{where}: {err}") from None
    model.load_state_dict(sd, strict=True)


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


def weights_file(cfg: TrainConfig, mc: Any, model: nn.Module, ema: EMA | None, step: int) -> dict[str, Any]:
    """The content of ``model.pt`` and of every snapshot: weights (and EMA weights) with their configs."""
    return {"format": CHECKPOINT_FORMAT + "/model", "train_config": cfg.to_dict(), "model_config": asdict(mc),
            "step": step, "model": model.state_dict(),
            "ema_model": ema.model_state_dict(model) if ema is not None else None}


def write_snapshot(cfg: TrainConfig, mc: Any, model: nn.Module, ema: EMA | None, step: int, out_dir: Path,
                   device: torch.device, info: DistInfo) -> float:
    """Rank 0 writes ``model_step{step}.pt`` (the format of ``model.pt``); returns the seconds the write took."""
    if not info.is_main:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued steps belong to training time, not to the write
    t0 = time.perf_counter()
    atomic_torch_save(weights_file(cfg, mc, model, ema, step), snapshot_path(out_dir, step))
    return time.perf_counter() - t0
