"""Timing of the sampling paths of :mod:`rearlib.sample` (token generation only) with the achieved memory bandwidth."""

from __future__ import annotations

import time

import torch

from rearlib.model import Generator
from rearlib.sample_fast_path import _bucket_for, _buckets, last_fast_path_info
from rearlib.sample_generate import generate
from rearlib.sample_rule import _unwrap

__all__ = ["benchmark_sampling"]

H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e peak of one H200


def _decode_bytes_per_step(model: Generator, rows: int, kv_len: float, dtype: torch.dtype) -> float:
    """Bytes a decode step must move at least: block weights (in ``dtype``) + float32 head + the K/V window
    read (rows x layers x 2 x kv_len x C) + one K/V position written."""
    cfg = model.config
    el = torch.empty((), dtype=dtype).element_size()
    block_w = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    head_w = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith(("adaln_before_head.", "lm_head.")))
    kv = rows * cfg.depth * 2 * (kv_len + 1) * cfg.hidden * el
    return block_w * el + head_w * 4 + kv


def benchmark_sampling(model: Generator, batch_size: int, *, cfg: bool = True, steps: int | None = None,
                       warmup: int = 1, repeats: int = 3, modes=None, cfg_scale: float = 4.0, cfg_power: float = 0.0,
                       kv_buckets: int = 4, seed: int = 0) -> dict:
    """Time token generation (tokenizer decoding excluded) for ``batch_size`` images with each path in ``modes``.

    modes: subset of ("fast", "fast-sdpa", "fast-flex", "fast-triton", "fast-deterministic", "graph", "cached",
    "no_cache"); default ("fast", "fast-triton", "graph", "cached", "no_cache") where available ("fast*" and "graph"
    need CUDA). "fast" is the compiled CUDA-graph step with its default attention kernel, "fast-sdpa" /
    "fast-flex" the same step with that kernel instead, "fast-deterministic" the step compiled in Inductor's
    deterministic mode as FID generation uses it (``generate(deterministic=True)``). steps: tokens per image
    (default N); images/s is extrapolated to N tokens when
    steps < N (``images_per_s_full``). Reports per mode: seconds per batch (median over ``repeats`` after
    ``warmup`` untimed runs, which include compilation/capture), ms/step, images/s, peak memory, and for the
    cached GPU paths the achieved bandwidth = (bytes a step must move, :func:`_decode_bytes_per_step`, at the
    mean attention window) / (time per step), also as a fraction of the H200's 4.8 TB/s.
    """
    model = _unwrap(model)
    device = model.pos_embed.device
    N = model.config.seq_len
    steps = N if steps is None else int(steps)
    avail = (("fast", "fast-sdpa", "fast-flex", "fast-triton", "fast-deterministic", "graph", "cached", "no_cache")
             if device.type == "cuda" else ("cached", "no_cache"))
    optional = ("fast-sdpa", "fast-flex", "fast-deterministic")
    modes = tuple(m for m in avail if m not in optional) if modes is None else tuple(modes)
    bad = [m for m in modes if m not in avail]
    if bad:
        raise ValueError(f"modes {bad} not available on {device.type}; available: {avail}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    classes = torch.arange(batch_size, device=device) % model.config.num_classes
    kw = dict(cfg_scale=cfg_scale if cfg else None, cfg_power=cfg_power, seed=seed, num_tokens=steps,
              kv_buckets=kv_buckets, dtype=dtype)
    rows = 2 * batch_size if cfg else batch_size
    result = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
              "batch_size": batch_size, "cfg": cfg, "steps": steps, "seq_len": N, "dtype": str(dtype),
              "params": sum(p.numel() for p in model.parameters()), "modes": {}}
    buckets = _buckets(N + 1, kv_buckets)
    mean_window = sum(_bucket_for(t + 2, buckets) for t in range(1, steps)) / max(1, steps - 1)
    exact_window = sum(t + 2 for t in range(1, steps)) / max(1, steps - 1)
    tokens_by_mode = {}
    for mode in modes:
        mkw = dict(kw, fast={"graph": "graph", "cached": False, "no_cache": False}.get(mode, True),
                   use_cache=mode != "no_cache")
        if mode == "fast-deterministic":
            mkw["deterministic"] = True
        elif mode.startswith("fast-"):
            mkw["decode_attention"] = mode.split("-", 1)[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t_setup = time.perf_counter()
        for _ in range(max(0, warmup)):
            tokens_by_mode[mode] = generate(model, classes, **mkw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        setup = time.perf_counter() - t_setup
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            tokens_by_mode[mode] = generate(model, classes, **mkw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        r = {"seconds_per_batch": sec, "ms_per_step": 1e3 * sec / steps, "images_per_s": batch_size / sec,
             "images_per_s_full": batch_size / (sec * N / steps), "warmup_seconds": setup}
        fast_info = last_fast_path_info() if mode.startswith("fast") or mode == "graph" else {}
        if fast_info:
            r["path"] = fast_info.get("mode")
        if device.type == "cuda":
            r["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if mode != "no_cache":
                # the Triton kernel reads exactly the prefix; the other kernels read their bucket's window
                window = exact_window if fast_info.get("attention") == "triton" else mean_window
                bps = _decode_bytes_per_step(model, rows, window, dtype)
                bw = bps / (sec / steps)
                r.update(bytes_per_step=bps, achieved_bandwidth_tb_s=bw / 1e12, fraction_of_h200_bw=bw / H200_BANDWIDTH)
        result["modes"][mode] = r
    if len(tokens_by_mode) > 1:
        ref = next(iter(tokens_by_mode.values()))
        result["token_agreement_vs_first_mode"] = {
            m: float((t == ref).float().mean()) for m, t in tokens_by_mode.items()}
    return result

