"""Speed of training (plain AR vs reAR) and sampling, fast paths vs plain paths, in one run.

``python -m rearlib bench --preset rear_b --batch 128 --out reports/small/bench/bench_train_rear_b.json`` measures, on one GPU:

* training samples/s of every variant in ``--variants`` (default: plain AR and reAR, same model preset and batch)
  with our training step (:class:`rearlib.train.Stepper`: the very code ``train()`` runs) on random tokens held on
  the device; the reAR overhead = samples/s(AR) / samples/s(reAR) - 1;
* for each, the *fast* path (bf16 autocast, ``torch.compile`` of model and loss, fused AdamW) and the *plain*
  path (eager fp32 with TF32 off, for-each AdamW) unless ``--no-plain``;
* model FLOP utilisation: MFU = samples/s * N * F / peak, where F = ``rearlib.model.estimate_flops_per_token``
  (training FLOPs per image token: 6 x the multiply-accumulates of every Linear applied per position incl. the
  enabled alignment heads, + causal attention, see its docstring) and peak = the GPU's dense bf16 tensor peak
  (H100/H200: 989 TFLOP/s; override with ``--peak-tflops``). The plain fp32 rows use the same bf16 peak, so their
  MFU says how much of the chip they leave unused;
* peak GPU memory of each training configuration (``torch.cuda.max_memory_allocated``);
* sampling images/s of :func:`rearlib.sample.benchmark_sampling` (KV-cached paths vs full recomputation) when
  that function exists.

Timing: ``--warmup`` untimed optimizer steps (they include compilation), then ``--steps`` timed steps bracketed by
``torch.cuda.synchronize``. On CPU it runs the one CPU path (eager fp32) and is only a smoke test
(``--preset tiny``). Prints a table and writes JSON (``--out``) plus a CSV beside it.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm

from rearlib.model import build_generator, estimate_flops_per_token, get_config
from rearlib.rear import get_rear_config
from rearlib.runtime import atomic_write_text, hardware_info, resolve_device, tf32
from rearlib.sample import _FastDecoder
from rearlib.train import (COMPILE_MODES, DeviceBatches, DistInfo, Stepper, TrainConfig, build_model, concrete_device,
                           generator_overrides)
from rearlib.train_config import parse_overrides

#: Dense bf16 tensor-core peaks (FLOP/s) by GPU name fragment; MFU is left empty for other devices.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float | None, str]:
    if override_tflops is not None:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given)"
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16_FLOPS.items():
        if key in name:
            return val, f"{val / 1e12:g} TFLOP/s dense bf16 ({key})"
    return None, f"unknown for {name}; pass --peak-tflops"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_stepper(preset: str, variant: str, batch: int, device: torch.device, *, fast: bool = True,
                     seed: int = 0, model_overrides: dict | None = None, compile_mode: str | None = None) -> Stepper:
    """The training step ``train()`` runs (:class:`rearlib.train.Stepper`, wrapped, model in train mode) for
    ``variant`` (a reAR preset name) of model ``preset`` on random tokens, labels and codebook held on ``device``.
    fast: bf16 autocast + ``torch.compile`` (``compile_mode``, rearlib.train.COMPILE_MODES; None = default) + fused
    AdamW, else eager fp32. Build it under :func:`rearlib.experiments.tf32` as the timing code does."""
    # A long schedule keeps t ~ 0, so the noise is on (its cost does not depend on eps anyway).
    cfg = TrainConfig(model=preset, model_overrides=dict(model_overrides or {}), rear=get_rear_config(variant),
                      steps=1_000_000, batch_size=batch, warmup_steps=10, seed=seed,
                      compile=(compile_mode or True) if fast else False, bf16=fast, fused_adamw=fast,
                      log_every=10**9, ckpt_every=10**9)
    mc = get_config(preset, **generator_overrides(cfg))
    g = torch.Generator().manual_seed(seed)
    m = max(4 * batch, 64)
    tokens = torch.randint(0, mc.codebook_size, (m, mc.seq_len), generator=g).to(device)
    labels = torch.randint(0, mc.num_classes, (m,), generator=g).to(device)
    codebook = torch.randn(mc.codebook_size, mc.z_dim, generator=g).to(device)
    model = build_model(cfg, codebook, device)
    stepper = Stepper(cfg, model, codebook, DeviceBatches(tokens, labels, batch, seed=seed, rank=0, world=1),
                      device, DistInfo())
    stepper.wrap()
    model.train()
    return stepper


def bench_training(preset: str, variant: str, batch: int, *, fast: bool, steps: int, warmup: int,
                   device: torch.device, seed: int = 0, model_overrides: dict | None = None,
                   peak: float | None = None, compile_mode: str | None = None) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of ``variant`` (a reAR preset name) on random data; returns one row.
    compile_mode: a torch.compile mode for the fast path (rearlib.train.COMPILE_MODES; None = default)."""
    rear = get_rear_config(variant)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # fast: TF32 for anything left outside autocast (as train() does); plain: true fp32.
    with tf32(fast):
        stepper = training_stepper(preset, variant, batch, device, fast=fast, seed=seed,
                                   model_overrides=model_overrides, compile_mode=compile_mode)
        model = stepper.raw
        mc = model.config
        t0 = time.perf_counter()
        for s in range(warmup):
            stepper.step(s)
        _sync(device)
        warm_s = time.perf_counter() - t0
        syncs = count_host_syncs(stepper, warmup, device)
        t0 = time.perf_counter()
        for s in range(warmup + 1, warmup + 1 + steps):
            stats = stepper.step(s)
        _sync(device)
        dt = time.perf_counter() - t0
        loss = float(stats["loss"])
    sps = steps * batch / dt
    flops_tok = estimate_flops_per_token(model.config, training=True, align=rear.uses_alignment)
    row = {
        "kind": "train", "preset": preset, "variant": variant,
        "path": _path_name(fast, device) + (f" [{compile_mode}]" if fast and compile_mode else ""),
        "batch": batch, "steps": steps, "samples_per_s": sps, "ms_per_step": 1e3 * dt / steps,
        "tflops_per_s": sps * mc.seq_len * flops_tok / 1e12,
        "mfu": (sps * mc.seq_len * flops_tok / peak) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "warmup_s": warm_s, "host_syncs_per_step": syncs, "loss": loss,
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_sample": mc.seq_len * flops_tok,
    }
    del stepper, model
    _release(device)
    return row


def count_host_syncs(stepper: Stepper, step: int, device: torch.device) -> int | None:
    """Number of device->host synchronisations one optimizer step performs (CUDA's sync debug mode), else None.

    The eager plain path is expected to show the model's input-range checks (skipped under torch.compile); the
    fast path should show 0: perturbation, loss and optimizer never read device values on the host.
    """
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stepper.step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return count_sync_reports(str(w.message) for w in caught)


def count_sync_reports(messages) -> int:
    """How many of the warning ``messages`` are CUDA sync-debug reports ("called a synchronizing CUDA operation").
    Only those count: the first ``set_sync_debug_mode`` call of a process emits another warning that mentions
    synchronisation, which earlier counted as one sync in the first row of every run ("error" mode raised
    nothing in that step: benchmarks/training_step/first_row_sync.py)."""
    return sum("called a synchronizing cuda operation" in m.lower() for m in messages)


def _path_name(fast: bool, device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu eager fp32"
    return "fast (bf16+compile+fused)" if fast else "plain (eager fp32)"


def _release(device: torch.device) -> None:
    gc.collect()
    try:
        # Imported here: a torch build may lack dynamo (the except below).
        import torch._dynamo

        torch._dynamo.reset()  # each configuration compiles its own graphs; drop the old ones
    except Exception:  # pragma: no cover - dynamo unavailable
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_sampling(preset: str, batch: int, device: torch.device, *, steps: int | None, repeats: int,
                   modes: list[str] | None, model_overrides: dict | None = None) -> list[dict[str, Any]]:
    """Rows from rearlib.sample.benchmark_sampling (random weights), or [] when that function is missing."""
    try:  # imported here so that a missing benchmark_sampling gives [] (see the docstring)
        from rearlib.sample import benchmark_sampling
    except ImportError:
        return []

    torch.manual_seed(0)
    model = build_generator(preset, **dict(model_overrides or {})).to(device).eval()
    with torch.no_grad():  # a fresh model's adaLN outputs are zero (identity blocks); use non-degenerate weights
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    res = benchmark_sampling(model, batch, cfg=True, steps=steps, repeats=repeats, modes=modes)
    rows = []
    for mode, r in res["modes"].items():
        rows.append({"kind": "sample", "preset": preset, "variant": "-", "path": mode, "batch": batch,
                     "steps": res["steps"], "images_per_s": r["images_per_s_full"], "ms_per_step": r["ms_per_step"],
                     "peak_mem_gib": r.get("peak_memory_gib"), "bandwidth_tb_s": r.get("achieved_bandwidth_tb_s"),
                     "fraction_of_bw": r.get("fraction_of_h200_bw"), "warmup_s": r.get("warmup_seconds"),
                     "cfg": res["cfg"]})
    del model
    _release(device)
    return rows


#: Kernel-name patterns of :func:`kernel_categories`, checked in this order (cuDNN attention names contain "sm90").
KERNEL_CATEGORIES = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "dot_do_o")),  # dot_do_o: cuDNN's rowsum(dO * O)
    ("GEMM", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("dropout masks (rearlib.kernels.ops)", ("_keep_mask_kernel",)),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("Inductor-fused elementwise / reductions", ("triton_",)),
)


def kernel_categories(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Microseconds per step by kind of kernel (:data:`KERNEL_CATEGORIES`, else "other") over kernel rows
    ``{"kernel", "us_per_step"}``, largest first. Rows named in parentheses (totals) are skipped."""
    out: dict[str, float] = {}
    for r in rows:
        name = r["kernel"]
        if name.startswith("("):
            continue
        low = name.lower()
        cat = next((c for c, pats in KERNEL_CATEGORIES if any(p in low for p in pats)), "other")
        out[cat] = out.get(cat, 0.0) + r["us_per_step"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _kernel_table(prof, per: int, top: int) -> dict[str, Any]:
    """``kernels``: the ``top`` device kernels of a torch.profiler run by total time, per step (``per`` steps
    profiled), then their total; ``categories_us_per_step``: :func:`kernel_categories` over every kernel."""
    rows = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue  # CPU-side ops and annotated regions (e.g. "Optimizer.step#AdamW.step") would count the
            # kernels inside them a second time
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:110], "calls_per_step": e.count / per, "us_per_step": t / per})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["us_per_step"] / total if total else None
    table = rows[:top] + [{"kernel": "(all device kernels)", "calls_per_step": sum(r["calls_per_step"] for r in rows),
                           "us_per_step": total, "share": 1.0}]
    return {"kernels": table, "categories_us_per_step": kernel_categories(rows)}


def profile_training(preset: str, variant: str, batch: int, device: torch.device, *, steps: int = 3,
                     warmup: int = 5, top: int = 25) -> dict[str, Any]:
    """Device-kernel breakdown of the fast training step (torch.profiler over ``steps`` steps after warm-up)."""
    with tf32(True):
        stepper = training_stepper(preset, variant, batch, device)
        for s in range(warmup):
            stepper.step(s)
        _sync(device)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(warmup, warmup + steps):
                stepper.step(s)
            _sync(device)
        wall = (time.perf_counter() - t0) / steps
    out = {"kind": "train", "preset": preset, "variant": variant, "batch": batch,
           "wall_ms_per_step_profiled": 1e3 * wall, **_kernel_table(prof, steps, top)}
    del stepper
    _release(device)
    return out


def profile_sampling(preset: str, batch: int, device: torch.device, *, steps: int | None = None, top: int = 25,
                     cfg: bool = True) -> dict[str, Any]:
    """Device-kernel breakdown of the compiled decode step (run without CUDA graphs so kernels are visible).

    steps: decode steps profiled, default a whole image (N - 1), so attention over the growing prefix is
    weighted as in real sampling (the first steps alone understate it)."""
    torch.manual_seed(0)
    model = build_generator(preset).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    dec = _FastDecoder(model, batch, use_cfg=cfg, top_k=None, top_p_on=False, greedy=False, dtype=torch.bfloat16,
                       compile_step=True, kv_buckets=4, use_graphs=False)
    classes = torch.arange(batch, device=device) % model.config.num_classes
    steps = model.config.seq_len - 1 if steps is None else steps
    st = dict(num_tokens=steps + 1, use_cfg=cfg, cfg_scale=4.0, cfg_power=0.0, temperature=1.0, top_p=None)
    seeds = list(range(batch))
    with torch.no_grad():
        dec.run(classes, seeds, st)
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            dec.run(classes, seeds, st)
            _sync(device)
    out = {"kind": "sample", "preset": preset, "batch": batch, "cfg": cfg,
           **_kernel_table(prof, steps, top)}
    del dec, model
    _release(device)
    return out


def run(preset: str = "rear_b", batch: int = 128, *, variants=("ar", "rear"), steps: int = 20, warmup: int = 5,
        plain: bool = True, plain_steps: int | None = None, sampling: bool = True, sample_batch: int | None = None,
        sample_steps: int | None = None, sample_repeats: int = 2, sample_modes: list[str] | None = None,
        device: str = "auto", peak_tflops: float | None = None, model_overrides: dict | None = None,
        progress: bool = True, compile_mode: str | None = None) -> dict[str, Any]:
    """All measurements; returns {"rows": [...], "summary": {...}, "hardware": ..., "peak": ...}."""
    dev = concrete_device(resolve_device(device))
    peak, peak_desc = peak_flops(dev, peak_tflops)
    paths = [True] if dev.type == "cuda" else [False]
    if dev.type == "cuda" and plain:
        paths.append(False)
    jobs = [(v, f) for f in paths for v in variants]
    rows = []
    for v, f in tqdm(jobs, desc="bench train", disable=not progress):
        n = steps if f or plain_steps is None else plain_steps
        rows.append(bench_training(preset, v, batch, fast=f, steps=n, warmup=warmup if f else min(warmup, 2),
                                   device=dev, model_overrides=model_overrides, peak=peak,
                                   compile_mode=compile_mode))
    if sampling:
        rows += bench_sampling(preset, sample_batch or batch, dev, steps=sample_steps, repeats=sample_repeats,
                               modes=sample_modes, model_overrides=model_overrides)
    summary: dict[str, Any] = {}
    train_rows = [r for r in rows if r["kind"] == "train"]
    for r in train_rows:
        summary[f"{r['variant']} | {r['path']}"] = round(r["samples_per_s"], 2)
    for path in {r["path"] for r in train_rows}:
        by = {r["variant"]: r for r in train_rows if r["path"] == path}
        if "ar" in by:
            for v, r in by.items():
                if v != "ar":
                    summary[f"overhead {v} vs ar | {path}"] = by["ar"]["samples_per_s"] / r["samples_per_s"] - 1
    fast_rows = {r["variant"]: r for r in train_rows if r["path"].startswith("fast")}
    plain_rows = {r["variant"]: r for r in train_rows if r["path"].startswith("plain")}
    for v in fast_rows.keys() & plain_rows.keys():
        summary[f"speed-up fast vs plain | {v}"] = fast_rows[v]["samples_per_s"] / plain_rows[v]["samples_per_s"]
    return {"preset": preset, "batch": batch, "rows": rows, "summary": summary, "peak": peak_desc,
            "hardware": hardware_info()}


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("kind", "{}"), ("variant", "{}"), ("path", "{}"), ("batch", "{}"), ("samples_per_s", "{:.1f}"),
            ("images_per_s", "{:.2f}"), ("ms_per_step", "{:.2f}"), ("tflops_per_s", "{:.1f}"), ("mfu", "{:.1%}"),
            ("peak_mem_gib", "{:.2f}"), ("host_syncs_per_step", "{}"), ("warmup_s", "{:.1f}")]
    cells = [[c for c, _ in cols]]
    for r in rows:
        line = []
        for c, f in cols:
            v = r.get(c)
            line.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells)


def write_outputs(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """JSON at ``out`` and a CSV (one row per measurement) beside it, both written atomically."""
    out = Path(out)
    atomic_write_text(out, json.dumps(result, indent=2, default=str))
    keys: list[str] = []
    for r in result["rows"]:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in result["rows"]:
        w.writerow(r)
    csv_path = out.with_suffix(".csv")
    atomic_write_text(csv_path, buf.getvalue())
    return out, csv_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rearlib bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="rear_b", help="model preset of rearlib.model (e.g. small, rear_b, rear_l)")
    p.add_argument("--batch", type=int, default=128, help="training batch per step")
    p.add_argument("--variants", default="ar,rear", help="comma list of reAR presets (rearlib.rear.PRESETS)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (include compilation)")
    p.add_argument("--plain-steps", type=int, default=None, help="timed steps for the slow plain path")
    p.add_argument("--no-plain", action="store_true", help="skip the eager fp32 comparison")
    p.add_argument("--no-sampling", action="store_true", help="training only")
    p.add_argument("--no-train", action="store_true", help="sampling only")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampler call (default: --batch)")
    p.add_argument("--sample-steps", type=int, default=None, help="tokens per image to time (default all)")
    p.add_argument("--sample-repeats", type=int, default=2, help="timed repetitions of each sampling mode")
    p.add_argument("--sample-modes", default=None, help="comma list (rearlib.sample.benchmark_sampling modes)")
    p.add_argument("--model-set", nargs="*", default=[], metavar="K=V", help="GeneratorConfig overrides")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU for MFU (default: looked up from the GPU name)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of the fast training path (default: torch's default)")
    p.add_argument("--device", default="auto", help="cuda or cuda:N (timings on CPU are not meaningful)")
    p.add_argument("--out", default=None, help="JSON path (a CSV is written beside it)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: device-kernel breakdown (torch.profiler) of the fast training step of "
                        "each variant and of the compiled decode step; JSON to --out")
    a = p.parse_args(argv)
    if a.profile:
        dev = concrete_device(resolve_device(a.device))
        if dev.type != "cuda":
            raise SystemExit("--profile needs a CUDA device")
        res = {"hardware": hardware_info(), "profiles": []}
        for v in ([] if a.no_train else [v for v in a.variants.split(",") if v]):
            res["profiles"].append(profile_training(a.preset, v, a.batch, dev))
        if not a.no_sampling:
            res["profiles"].append(profile_sampling(a.preset, a.sample_batch or a.batch, dev))
        for prof in res["profiles"]:
            print(f"\n== {prof['kind']} {prof.get('variant', '')} batch {prof['batch']}"
                  + (f", {prof['wall_ms_per_step_profiled']:.1f} ms/step wall" if "wall_ms_per_step_profiled" in prof
                     else ""))
            for r in prof["kernels"]:
                print(f"{r['us_per_step']:10.1f} us {r['calls_per_step']:7.1f}x {100 * (r['share'] or 0):5.1f}%  "
                      f"{r['kernel']}")
            total = sum(prof["categories_us_per_step"].values()) or 1.0
            print("by kind: " + ", ".join(f"{c} {us / 1e3:.1f} ms ({100 * us / total:.0f}%)"
                                          for c, us in prof["categories_us_per_step"].items()))
        if a.out:
            atomic_write_text(Path(a.out), json.dumps(res, indent=2, default=str))
        return 0

    variants = () if a.no_train else tuple(v for v in a.variants.split(",") if v)
    res = run(a.preset, a.batch, variants=variants, steps=a.steps, warmup=a.warmup,
              plain=not a.no_plain, plain_steps=a.plain_steps, sampling=not a.no_sampling,
              sample_batch=a.sample_batch, sample_steps=a.sample_steps, sample_repeats=a.sample_repeats,
              sample_modes=a.sample_modes.split(",") if a.sample_modes else None, device=a.device,
              peak_tflops=a.peak_tflops, model_overrides=parse_overrides(a.model_set), compile_mode=a.compile_mode)
    print(f"device: {res['hardware'].get('gpu') or 'cpu'}   peak used for MFU: {res['peak']}")
    print(format_table(res["rows"]))
    for k, v in res["summary"].items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if a.out:
        j, c = write_outputs(res, a.out)
        print(f"wrote {j} and {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
