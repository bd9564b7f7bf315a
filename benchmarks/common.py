"""Shared by the benchmark scripts: the output folder, a CUDA-event timer and the full-step A/B loop (one process).

Every script starts by putting the repository root on ``sys.path`` (so ``rearlib`` and ``benchmarks.common``
import from a clean clone without installing anything) and is run from the repository root, e.g.
``python benchmarks/attention/flash_micro.py``.
"""
import json
import os

import torch

#: The repository root (the folder that holds ``rearlib/`` and ``benchmarks/``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def out_path(name: str) -> str:
    """Where a script writes its result ``name``: ``$OUT/name``, by default ``artifacts/bench/name`` (git-ignored).
    Committed results live in ``reports/small/bench/``; copy a new result there by hand."""
    out = os.environ.get("OUT") or os.path.join(ROOT, "artifacts", "bench")
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, name)


def cuda_ms(fn, n=20, inner=5):
    """Median over ``n`` samples of the mean time of ``inner`` back-to-back calls, in ms (CUDA events)."""
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    ts.sort()
    return ts[len(ts) // 2]


def step_rows(specs, switch, label, res, save, dev):
    """For each "variant:which" in ``specs``: ``switch(which)``, then one reAR-B bench_training row (batch 128, 30
    timed steps after 5 warm-up) tagged ``label = which``, appended to ``res["rows"]`` and saved."""
    from rearlib.experiments.bench import _release, bench_training, peak_flops

    peak, _ = peak_flops(dev)
    for spec in specs:
        variant, which = spec.split(":")
        switch(which)
        r = bench_training("rear_b", variant, 128, fast=True, steps=30, warmup=5, device=dev, peak=peak)
        r[label] = which
        print(json.dumps({k: r[k] for k in (label, "variant", "samples_per_s", "ms_per_step", "peak_mem_gib",
                                            "mfu", "host_syncs_per_step", "loss")}), flush=True)
        res["rows"].append(r)
        _release(dev)
        save()
