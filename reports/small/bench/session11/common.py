"""Shared by the session-11 scripts: CUDA-event timing and the full-step A/B loop (one process)."""
import json

import torch

from rearlib.bench import _release, bench_training, peak_flops


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
