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
generators of every rank). A non-finite loss, or non-finite weights or optimizer state at a checkpoint, stops
training with an error naming the last good checkpoint: one whose state is finite and whose weights gave a finite
loss (:class:`rearlib.train_checkpoints.RunFolder`). The output folder is checked to be writable before training,
temporary files of writes killed half-way are removed at the next start, and a fresh run (``resume=False``) leaves
an earlier run's files in place until it has a checkpoint of its own. DDP: launched by ``torchrun``
(WORLD_SIZE > 1) the same code wraps the model in DistributedDataParallel (nccl on GPU, gloo on CPU); every rank
draws its own batches as a deterministic function of (seed, rank) and rank 0 writes the files.

Entry points: :func:`train` and ``python -m rearlib train --preset small --rear rear --tokens FILE --steps N
--out DIR`` (see ``--help``); :func:`load_generator` rebuilds a trained generator from ``model.pt`` or a checkpoint.

Layout: this module holds the loop and the CLI and re-exports the public names of its pieces:
:mod:`rearlib.train_config` (TrainConfig, the per-scale recipe), :mod:`rearlib.train_data` (reading, checking and
batching the tokens), :mod:`rearlib.train_step` (model, optimizer, schedule, EMA, the Stepper),
:mod:`rearlib.train_distributed` (process group, collectives) and :mod:`rearlib.train_checkpoints` (checkpoint,
weights and snapshot files, load_generator).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rearlib import cli_types
from rearlib.model import get_config
from rearlib.rear import PRESETS as REAR_PRESETS
from rearlib.rear import get_rear_config
from rearlib.runtime import (UnreadableFileError, atomic_torch_save, atomic_write_text, load_torch_file, read_json,
                             resolve_device)
from rearlib.tokenizers import get_tokenizer
from rearlib.train_checkpoints import (
    CHECKPOINT_FORMAT,
    RESUME_FREE_FIELDS,
    RESUME_HINT,
    NonFiniteCheckpointError,
    RunFolder,
    check_resumable,
    first_nonfinite,
    list_snapshots,
    load_checkpoint,
    load_generator,
    prepare_out_dir,
    resume_key,
    rng_state,
    run_files,
    set_rng_state,
    snapshot_path,
    strict_load,
    training_state,
    weights_file,
    write_snapshot,
)
from rearlib.train_config import (
    COMPILE_MODES,
    TrainConfig,
    config_for_scale,
    generator_overrides,
    parse_overrides,
)
from rearlib.train_data import (
    DeviceBatches,
    data_fingerprint,
    derive_seed,
    load_pretokenized,
    validate_data,
)
from rearlib.train_distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    close_distributed,
    concrete_device,
    gather_objects,
    init_distributed,
)
from rearlib.train_step import (
    EMA,
    NO_DECAY_KEYS,
    Stepper,
    build_model,
    build_optimizer,
    build_scheduler,
    lr_at,
    no_decay_names,
    param_groups,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "COMPILE_MODES",
    "EMA",
    "NO_DECAY_KEYS",
    "RESUME_FREE_FIELDS",
    "DeviceBatches",
    "DistInfo",
    "NonFiniteCheckpointError",
    "Stepper",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "concrete_device",
    "config_for_scale",
    "data_fingerprint",
    "generator_overrides",
    "init_distributed",
    "list_snapshots",
    "load_checkpoint",
    "load_generator",
    "load_pretokenized",
    "lr_at",
    "main",
    "no_decay_names",
    "param_groups",
    "parse_overrides",
    "resume_key",
    "snapshot_path",
    "train",
    "validate_data",
]


def _model_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _log(msg: str) -> None:
    tqdm.write(f"train: {msg}", file=sys.stderr)


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
            its stored result without training). False starts over: an earlier run's files stay until this run
            writes its first checkpoint, which replaces them (a kill before that leaves them intact).
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
        close_distributed(info)


def _train(cfg: TrainConfig, tokens: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor | None,
           out_dir: Path, device: torch.device, resume: bool, info: DistInfo, stop_at: int | None,
           time_limit_s: float | None, progress: bool) -> dict[str, Any]:
    t_call = time.perf_counter()
    ckpt_path, model_path, result_path = out_dir / "checkpoint.pt", out_dir / "model.pt", out_dir / "result.json"
    # Before any work: an unwritable folder would otherwise surface at the first checkpoint.
    problem, replacing = None, []
    if info.is_main:
        try:
            removed = prepare_out_dir(out_dir)
        except OSError as err:
            problem = err
        else:
            if removed:
                _log(f"removed {len(removed)} unfinished temporary file(s) left in {out_dir} by writes that were "
                     f"killed: {', '.join(removed)}")
            if not resume:
                replacing = run_files(out_dir)
                if replacing:
                    _log(f"starting over (resume=False): the earlier run's files in {out_dir} "
                         f"({', '.join(f.name for f in replacing)}) are kept until this run writes its first "
                         f"checkpoint, which replaces them")
    if all_reduce_mean(torch.tensor(float(problem is not None), device=device), info).item() > 0:
        raise problem if problem is not None else OSError(f"output folder {out_dir} is not writable (see rank 0)")
    files = RunFolder(out_dir, replacing, _log)
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
    torch.manual_seed(derive_seed(cfg.seed, info.rank, 0xD0))
    if device.type == "cuda":
        torch.cuda.manual_seed(derive_seed(cfg.seed, info.rank, 0xD1))

    step, history, train_time = 0, [], 0.0
    resumed_from = None
    barrier(info)
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, RESUME_HINT)
        check_resumable(ckpt, cfg, fingerprint, info.world, ckpt_path)
        strict_load(model, ckpt["model"], str(ckpt_path))
        stepper.optimizer.load_state_dict(ckpt["optimizer"])
        stepper.scheduler.load_state_dict(ckpt["scheduler"])
        if stepper.ema is not None:
            stepper.ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"][info.rank], device, batches, stepper.noise_gen)
        step, history, train_time = int(ckpt["step"]), list(ckpt["history"]), float(ckpt["train_time_s"])
        resumed_from = step
        files.resumed(step)
        del ckpt

    stepper.wrap()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    global_batch = cfg.batch_size * cfg.grad_accum * info.world
    base = {
        "train_config": cfg.to_dict(), "model_config": asdict(mc), "params": _model_params(model),
        "global_batch": global_batch, "world_size": info.world, "device": str(device), "gpu": gpu,
        "checkpoint": str(ckpt_path), "model_path": str(model_path), "resumed_from": resumed_from,
    }

    saved_at = None

    def save(step_now: int) -> None:
        # Called on every rank (the RNG gather is collective); only rank 0 writes.
        nonlocal saved_at
        rng = gather_objects(rng_state(device, batches, stepper.noise_gen), info)
        state = {
            "format": CHECKPOINT_FORMAT, "train_config": cfg.to_dict(), "model_config": asdict(mc),
            "step": step_now, "model": model.state_dict(), "optimizer": stepper.optimizer.state_dict(),
            "scheduler": stepper.scheduler.state_dict(),
            "ema": stepper.ema.state_dict() if stepper.ema is not None else None,
            "rng": rng, "world_size": info.world, "data_fingerprint": fingerprint, "history": history,
            "train_time_s": train_time,
        }
        # The losses were checked, but they were computed before this step's update: an update can overflow.
        # Every rank checks (DDP keeps the state equal) so that all of them stop together.
        bad = first_nonfinite(training_state(state, model, stepper.optimizer))
        if bad is not None:
            good = files.last_good() if info.is_main else "rank 0 names the last good checkpoint"
            raise FloatingPointError(
                f"non-finite values in {bad} after optimizer step {step_now} (its loss was finite: the update "
                f"overflowed); training stopped and {good}. Lower lr or raise warmup_steps.")
        saved_at = step_now
        if info.is_main:
            files.write(state, step_now)

    def check_finite(upto: int) -> None:
        bad = all_reduce_mean(stepper.nonfinite.float(), info).item()
        if bad > 0:
            last = history[-1]["step"] if history else 0
            first = min(s for s in gather_objects(int(stepper.first_nonfinite), info) if s > 0)
            good = files.diverged(first) if info.is_main else "rank 0 names the last good checkpoint"
            raise FloatingPointError(
                f"non-finite loss at step {first} (last finite log at step {last}); training stopped and "
                f"{good}. Lower lr, raise warmup_steps or check the data.")
        if info.is_main:
            files.checked(upto)

    if step >= cfg.steps and result_path.exists():
        try:
            res = read_json(result_path, "training result")
            res["model"] = model.eval()
            return res
        except UnreadableFileError as err:  # ours to rebuild: the checkpoint holds everything it records
            warnings.warn(f"{err}; writing it again from {ckpt_path.name}", stacklevel=2)

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
                t_snap = 0.0
                if not resume and saved_at is None:
                    # A fresh run replaces an earlier run's files (snapshots too) only once it has a checkpoint.
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # queued steps belong to training time
                    t_snap = time.perf_counter()
                    check_finite(step)
                    save(step)
                    t_snap = time.perf_counter() - t_snap
                # Snapshot write time (it syncs the device) is not training time, nor part of the window's rate.
                t_snap += write_snapshot(cfg, mc, model, stepper.ema, step, out_dir, device, info)
                last_step_time += t_snap
                window_t0 += t_snap
            at_log = step % cfg.log_every == 0 or step == cfg.steps or step == stop_at
            at_ckpt = step % cfg.ckpt_every == 0 or step == cfg.steps or step == stop_at
            if at_log or at_ckpt:
                # The only host sync: one read of the window's device statistics.
                vals = all_reduce_mean(torch.stack([window[k] for k in window]) / window_steps, info).tolist()
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
                    stop = stop or all_reduce_mean(over, info).item() > 0
                if (at_ckpt or stop) and saved_at != step:
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
        sums = gather_objects(float(sum(p.detach().double().sum() for p in model.parameters())), info)
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
            atomic_torch_save(weights_file(cfg, mc, model, stepper.ema, step), model_path)
            files.finished()
        atomic_write_text(result_path, json.dumps(result, indent=2, default=str))
    result["model"] = model.eval()
    if stepper.ema is not None:
        result["ema_state_dict"] = stepper.ema.model_state_dict(model)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rearlib train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="generator preset (rearlib.model.PRESETS)")
    p.add_argument("--rear", default="rear", help=f"reAR preset: {', '.join(REAR_PRESETS)}")
    p.add_argument("--rear-set", nargs="*", default=[], metavar="K=V", help="ReARConfig overrides, JSON values")
    p.add_argument("--model-set", nargs="*", default=[], metavar="K=V", help="GeneratorConfig overrides")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="pretokenized file (rearlib.tokenizers.pretokenize file, or a .pt / .npz dict "
                                      "with tokens, labels[, codebook])")
    src.add_argument("--synthetic", type=cli_types.count, metavar="M",
                     help="M random token sequences, labels and a random codebook in the preset's shapes: a speed "
                          "/ DDP smoke test without data (numbers mean nothing)")
    p.add_argument("--codebook", default=None, help="torch file with the codebook [K, D] (if not in --tokens)")
    p.add_argument("--tokenizer", default=None, choices=("smoke", "small", "paper"),
                   help="take the codebook from rearlib.tokenizers.get_tokenizer(SCALE) (and check the file's "
                        "tokenizer identity)")
    p.add_argument("--tokenizer-path", default=None, help="checkpoint path for --tokenizer small/paper")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, model.pt, result.json)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="per-process micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step; global batch = batch size x grad accum x processes")
    p.add_argument("--lr", type=cli_types.finite_float, default=4e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--end-lr", type=cli_types.finite_float, default=1e-5,
                   help="learning rate at the end of the cosine decay (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 4, as 62.5k/250k)")
    p.add_argument("--weight-decay", type=cli_types.finite_float, default=0.03,
                   help="AdamW weight decay of the decayed group (default: %(default)s)")
    p.add_argument("--class-dropout", type=cli_types.finite_float, default=0.1,
                   help="probability of replacing a label by the null class, for CFG (default: %(default)s)")
    p.add_argument("--ema", type=cli_types.finite_float, default=None, help="EMA decay (default: no EMA, as the authors)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model init, batch order, noise and dropout (default: %(default)s)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval in steps (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=50,
                   help="logging interval in steps, the only host sync (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="run the CUDA path without torch.compile")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode (speed only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop with a checkpoint after this optimizer step (a later call resumes)")
    p.add_argument("--time-limit", type=cli_types.finite_float, default=None,
                   help="seconds; stop with a checkpoint after this")
    p.add_argument("--fresh", action="store_true",
                   help="do not resume from an existing checkpoint; the earlier run's files stay until this run's "
                        "first checkpoint replaces them")
    return p


def _cli_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(tokens, labels, codebook or None, GeneratorConfig overrides) from the command-line options."""
    tok = None
    if args.tokenizer is not None:
        tok = get_tokenizer(args.tokenizer, "cpu", path=args.tokenizer_path)
    if args.synthetic is not None:
        mc0 = get_config(args.preset, **parse_overrides(args.model_set))
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
        codebook = load_torch_file(args.codebook, "codebook file (--codebook)",
                                   "Pass a torch file holding the codebook tensor [K, D] or a dict with 'codebook'.")
        if isinstance(codebook, dict):
            codebook = codebook["codebook"]
    if codebook is None and "codebook_size" in data:
        model_ov_k = int(data["codebook_size"])
    else:
        model_ov_k = None
    model_ov = parse_overrides(args.model_set)
    # Shapes the data fixes, unless given explicitly.
    model_ov.setdefault("seq_len", int(tokens[0].numel()))
    if codebook is not None:
        model_ov.setdefault("codebook_size", int(codebook.shape[0]))
        model_ov.setdefault("z_dim", int(codebook.shape[1]))
    elif model_ov_k is not None:
        model_ov.setdefault("codebook_size", model_ov_k)
    if "num_classes" in data:
        model_ov.setdefault("num_classes", int(data["num_classes"]))
    return tokens, labels, codebook, model_ov


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tokens, labels, codebook, model_ov = _cli_data(args)
    cfg = TrainConfig(
        model=args.preset, model_overrides=model_ov,
        rear=get_rear_config(args.rear, **parse_overrides(args.rear_set)),
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
