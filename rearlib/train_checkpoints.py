"""Files of a generator training run: the full checkpoint (``checkpoint.pt``, for exact resume), the weights file
(``model.pt`` and the ``model_step{N}.pt`` snapshots) and :func:`load_generator`, which rebuilds a generator from
either.

Format tags: ``rearlib.train/1`` for a checkpoint, ``rearlib.train/1/model`` for a weights file. Files are read with
weights-only unpickling and loaded with a strict key and shape check; a file that is damaged or holds non-finite
weights is refused with an error naming it.

:class:`RunFolder` keeps ``checkpoint.pt`` honest: no file with non-finite state is written, the checkpoint before
the last one is kept (as ``checkpoint.prev.pt``) until a finite loss has been computed from the last one's weights,
and the files of an earlier run that a fresh run replaces stay in place until that run has a checkpoint.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rearlib.checkpoints import StateDictMismatchError, check_state_dict
from rearlib.model import GeneratorConfig, build_generator
from rearlib.runtime import atomic_torch_save, load_torch_file, resolve_device
from rearlib.train_config import TrainConfig
from rearlib.train_data import DeviceBatches
from rearlib.train_distributed import DistInfo
from rearlib.train_step import EMA

CHECKPOINT_FORMAT = "rearlib.train/1"

#: What to do about a damaged checkpoint or weights file, for :func:`load_checkpoint`'s errors.
REPLACE_FILE_HINT = ("Copy the file again from where it was made, or retrain it (python -m rearlib train ... writes "
                     "model.pt and checkpoint.pt).")
RESUME_HINT = ("Move it out of the run folder (or pass --fresh / resume=False) to start this run over, or put back "
               "an intact copy to resume.")

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


class NonFiniteCheckpointError(ValueError):
    """A checkpoint or weights file holds NaN or infinite weights or optimizer state (a diverged run)."""


def _named_tensors(obj: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts / lists / tuples, with a readable path (``model['lm_head.weight']``)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _named_tensors(v, f"{prefix}[{k!r}]" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _named_tensors(v, f"{prefix}[{i}]")


def first_nonfinite(obj: Any) -> str | None:
    """The path of the first floating tensor in ``obj`` holding NaN or inf, or None. One host sync per device."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in _named_tensors(obj):
        if t.is_floating_point() and t.numel() and t.device.type != "meta":
            by_device.setdefault(t.device, []).append((name, t))
    for group in by_device.values():
        ok = torch.stack([torch.isfinite(t).all() for _, t in group]).cpu()
        if not bool(ok.all()):
            return group[int((~ok).nonzero()[0])][0]
    return None


def training_state(ckpt: dict[str, Any], model: nn.Module | None = None,
                   optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """The numeric state of a checkpoint or weights file: weights, EMA and optimizer state (not RNG states).
    Given the live ``model`` and ``optimizer``, the optimizer state is keyed by parameter name (an error can then
    name ``optimizer['lm_head.weight']['exp_avg_sq']`` instead of a parameter index)."""
    out = {k: ckpt.get(k) for k in ("model", "ema_model", "ema", "optimizer") if ckpt.get(k) is not None}
    if model is not None and optimizer is not None and "optimizer" in out:
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names.get(id(p), str(i)) for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]
        out["optimizer"] = {order[i] if isinstance(i, int) and i < len(order) else str(i): v
                            for i, v in out["optimizer"]["state"].items()}
    return out


def load_checkpoint(path: str | os.PathLike, fix: str = REPLACE_FILE_HINT) -> dict[str, Any]:
    """Read a training checkpoint (weights-only unpickling) and check its format tag and that its weights and
    optimizer state are finite. Errors name the file; ``fix`` says what to do about a damaged one."""
    ckpt = load_torch_file(path, "rearlib.train checkpoint / weights file", fix)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, CHECKPOINT_FORMAT + "/model"):
        raise ValueError(f"{path} is not a rearlib.train checkpoint or model file")
    bad = first_nonfinite(training_state(ckpt))
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"{path} holds non-finite values (NaN or inf) in {bad}: it was written by a run that diverged and "
            f"cannot be used. {fix}")
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued steps belong to training time, not to the write
    t0 = time.perf_counter()
    # Every rank checks (the weights are the same on all), so that all of them stop together.
    content = weights_file(cfg, mc, model, ema, step)
    bad = first_nonfinite(training_state(content))
    if bad is not None:
        raise FloatingPointError(f"non-finite weights ({bad}) after optimizer step {step}; the snapshot "
                                 f"{snapshot_path(out_dir, step)} was not written. Lower lr or raise warmup_steps.")
    if not info.is_main:
        return 0.0
    atomic_torch_save(content, snapshot_path(out_dir, step))
    return time.perf_counter() - t0


#: The files of a run folder that belong to one run (snapshots ``model_step{N}.pt`` too).
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "model.pt", "result.json")

#: Temporary files of :func:`rearlib.runtime.atomic_write_bytes` (``.<name>.<random>.tmp``) for the run files;
#: one outlives its write only when the process was killed during the write.
TMP_PATTERNS = tuple(f".{name}.*.tmp" for name in RUN_FILES) + (".model_step*.pt.*.tmp", ".write-test.*.tmp")


def prepare_out_dir(out_dir: Path) -> list[str]:
    """Create ``out_dir``, make sure files can be written there, and remove the temporary files that killed
    writes left behind. Returns the names removed; raises OSError naming the folder if it is not writable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        msg = (f"output folder {out_dir} is not writable ({err.strerror or err}); choose another --out / out_dir "
               f"or make it writable. Nothing was trained.")
        raise (OSError(err.errno, msg) if err.errno else OSError(msg)) from err
    removed = sorted({p.name for pattern in TMP_PATTERNS for p in out_dir.glob(pattern) if p.is_file()})
    for name in removed:
        (out_dir / name).unlink(missing_ok=True)
    return removed


def run_files(out_dir: Path) -> list[Path]:
    """The files of a run present in ``out_dir`` (checkpoints, weights, result, snapshots)."""
    found = [out_dir / n for n in RUN_FILES if (out_dir / n).is_file()]
    return found + list(list_snapshots(out_dir).values())


class RunFolder:
    """The checkpoint files of one run in its folder (rank 0 only writes; see the module docstring).

    ``step``: the step of ``checkpoint.pt`` when it is this run's (None when it is absent or an earlier run's);
    ``verified``: a finite loss has been computed from its weights. ``replacing``: an earlier run's files that a
    fresh run (resume=False) removes once it has written its own first checkpoint.
    """

    def __init__(self, out_dir: Path, replacing: list[Path], log: Callable[[str], None]):
        self.ckpt, self.prev = out_dir / "checkpoint.pt", out_dir / "checkpoint.prev.pt"
        self.replacing, self.log = replacing, log
        self.step: int | None = None
        self.prev_step: int | None = None
        self.verified = False

    def resumed(self, step: int) -> None:
        self.step, self.verified = step, False

    def checked(self, upto: int) -> None:
        """The losses up to optimizer step ``upto`` were finite (so those computed from the last checkpoint's
        weights, if it is older): its fallback is no longer needed."""
        if self.step is not None and upto > self.step:
            self.verified = True
            self.prev.unlink(missing_ok=True)
            self.prev_step = None

    def write(self, state: dict[str, Any], step: int) -> None:
        if self.replacing:
            atomic_torch_save(state, self.ckpt)
            for f in self.replacing:
                if f != self.ckpt:
                    f.unlink(missing_ok=True)
            self.log(f"replaced the earlier run's files in {self.ckpt.parent} by this run's checkpoint "
                     f"(step {step})")
            self.replacing = []
        else:
            if self.verified and self.ckpt.exists():
                # The verified checkpoint stays the fallback until the new one's weights gave a finite loss.
                self.prev.unlink(missing_ok=True)
                try:
                    os.link(self.ckpt, self.prev)
                except OSError:  # file systems without hard links
                    shutil.copy2(self.ckpt, self.prev)
                self.prev_step = self.step
            atomic_torch_save(state, self.ckpt)
        self.step, self.verified = step, False

    def finished(self) -> None:
        """A completed run needs no fallback checkpoint."""
        self.prev.unlink(missing_ok=True)

    def last_good(self) -> str:
        """Where the last good state is, for an error message."""
        if self.step is None:
            extra = (f" (the earlier run's files in {self.ckpt.parent} were left as they were)"
                     if self.replacing else "")
            return f"no checkpoint of this run was written yet{extra}"
        return f"the last good checkpoint is {self.ckpt} (step {self.step})"

    def diverged(self, first_bad: int) -> str:
        """A non-finite loss appeared at optimizer step ``first_bad`` (1-based; it was computed from the weights
        after step ``first_bad - 1``). Discard a checkpoint of those or later weights, put back the one before it
        if it was kept, and say where the last good state is."""
        if self.step is None or self.step < first_bad - 1:
            if self.step is not None:  # a finite loss came from its weights: it is good, the fallback is not needed
                self.prev.unlink(missing_ok=True)
            return self.last_good()
        bad_step = self.step
        if self.prev.exists():
            prev_step = self.prev_step if self.prev_step is not None else _step_of(self.prev)
            os.replace(self.prev, self.ckpt)
            self.step, self.prev_step, self.verified = prev_step, None, True
            return (f"the last good checkpoint is {self.ckpt} (step {prev_step}); the checkpoint of step {bad_step}, "
                    f"whose weights gave that loss, was discarded")
        self.ckpt.unlink(missing_ok=True)
        self.step = None
        return (f"no good checkpoint is left: the checkpoint of step {bad_step}, whose weights gave that loss, was "
                f"deleted")


def _step_of(path: Path) -> int | str:
    try:  # mmap: only the small "step" entry is read from a possibly large file
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError):
        # the message is still useful without it
        return "unknown"
