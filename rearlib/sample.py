"""Sampling from a :class:`rearlib.model.Generator`: CFG schedule, KV-cached decoding, sharded FID samples.

Every public name is importable from here; the code is split by role:

* :mod:`rearlib.sample_rule` - the definitions (raster next-token sampling, the CFG schedule, temperature / top-k /
  top-p, Gumbel-max sampling, image seeds) and the pick every path shares;
* :mod:`rearlib.sample_generate` - :func:`generate` and :func:`generate_progressive`, and the plain loop (CPU,
  ``fast=False``, and ``use_cache=False``, the authors' evaluation behaviour kept as a reference);
* :mod:`rearlib.sample_fast_path` - the CUDA fast path: a compiled one-token decode step replayed as CUDA graphs;
* :mod:`rearlib.sample_fid` - sharded FID sample generation (PNGs and an ADM-style npz);
* :mod:`rearlib.sample_benchmark` - timings of the sampling paths.

This module holds the command line: ``python -m rearlib sample {fid,benchmark}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from rearlib import scales
from rearlib.experiments.zoo import load_shipped
from rearlib.model import build_generator, load_official_state_dict
from rearlib.runtime import atomic_write_text
from rearlib.sample_benchmark import H200_BANDWIDTH, benchmark_sampling  # noqa: F401
from rearlib.sample_fast_path import _FastDecoder, clear_sampler_cache, last_fast_path_info  # noqa: F401
from rearlib.sample_fid import _no_tf32, generate_fid_samples, merge_fid_samples  # noqa: F401
from rearlib.sample_generate import generate, generate_progressive  # noqa: F401
from rearlib.sample_rule import PAPER_CFG, cfg_scale_at, cfg_schedule, image_seed, image_seeds  # noqa: F401
from rearlib.scales import validate_scale
from rearlib.tokenizers import get_tokenizer
from rearlib.train import load_generator

__all__ = [
    "PAPER_CFG", "cfg_scale_at", "cfg_schedule", "image_seed", "image_seeds", "generate",
    "generate_fid_samples", "merge_fid_samples", "benchmark_sampling", "clear_sampler_cache", "last_fast_path_info",
]


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rearlib sample", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("benchmark", help="time sampling paths (random weights unless --checkpoint)")
    b.add_argument("--preset", default="rear_b", help="generator preset (rearlib.model.PRESETS); default rear_b")
    b.add_argument("--checkpoint", default=None, help="official-layout state dict (loaded strictly)")
    b.add_argument("--batch-size", type=int, default=128, help="images per sampler call (default 128)")
    b.add_argument("--no-cfg", action="store_true", help="time without classifier-free guidance (no doubled batch)")
    b.add_argument("--steps", type=int, default=None,
                   help="tokens per image (default: all N; images/s is also extrapolated to N tokens)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the median is reported (default 3)")
    b.add_argument("--modes", default=None,
                   help="comma list of benchmark_sampling modes: fast, fast-sdpa, fast-flex, fast-triton, "
                        "fast-deterministic, graph (CUDA only), cached, no_cache (default: the usual ones available)")
    b.add_argument("--kv-buckets", type=int, default=4,
                   help="attention-window buckets, one CUDA graph each (default 4)")
    b.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    b.add_argument("--out", default=None, help="write the result JSON here (atomically)")
    f = sub.add_parser("fid", help="sharded FID sample generation (PNGs + ADM npz); works under torchrun")
    f.add_argument("--generator", required=True,
                   help="rearlib.train model.pt / checkpoint.pt, or an official-layout state dict (see --preset)")
    f.add_argument("--preset", default=None, help="preset of an official state dict (default: infer from shapes)")
    f.add_argument("--scale", required=True, help="tokenizer scale: smoke | small | paper")
    f.add_argument("--tokenizer", default=None, help="tokenizer checkpoint path (default: the scale's)")
    f.add_argument("--num-per-class", type=int, default=None, help="default: scales.SAMPLING[scale]['num_per_class']")
    f.add_argument("--num-classes", type=int, default=None,
                   help="sample only the first N classes (default: all of the generator's; fewer only to rehearse)")
    f.add_argument("--out", required=True, help="output folder: images/{index:06d}.png and samples.npz")
    f.add_argument("--seed", type=int, default=0, help="run seed; image i gets image_seed(seed, i) (default 0)")
    f.add_argument("--batch-size", type=int, default=None,
                   help="images per sampler call (default: scales.SAMPLING[scale]['batch_size'])")
    f.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale g (default: the scale's; at paper, the preset's headline setting)")
    f.add_argument("--cfg-power", type=float, default=None,
                   help="power p of the guidance schedule, 0 = constant g (default as --cfg-scale)")
    f.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, 0 = greedy)")
    f.add_argument("--ema", action="store_true", help="use the EMA weights of a rearlib.train checkpoint")
    f.add_argument("--overwrite", action="store_true",
                   help="replace samples of another configuration found in --out (default: refuse; samples of this "
                        "same configuration are resumed either way)")
    a = ap.parse_args(argv)
    if a.cmd == "fid":
        _fid_cli(a)
    if a.cmd == "benchmark":
        device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else
                              ("cpu" if a.device == "auto" else a.device))
        if a.checkpoint:
            model = load_official_state_dict(a.checkpoint, a.preset, device=device)
        else:
            torch.manual_seed(0)
            model = build_generator(a.preset).to(device)
            # A fresh model has zero adaLN outputs (identity blocks); give every parameter random values so
            # the benchmark exercises a realistic, non-degenerate function (speed does not depend on values).
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.02)
        res = benchmark_sampling(model, a.batch_size, cfg=not a.no_cfg, steps=a.steps, repeats=a.repeats,
                                 modes=None if a.modes is None else a.modes.split(","), kv_buckets=a.kv_buckets)
        res["preset"] = a.preset
        text = json.dumps(res, indent=2)
        print(text)
        if a.out:
            atomic_write_text(a.out, text)
    return 0


def _load_any_generator(path: str, preset, device, *, ema: bool = False):
    """A rearlib.train model/checkpoint, a shipped rearlib.experiments.zoo generator, or an official-layout state dict."""
    errors = []
    loaders = [("a rearlib.train model/checkpoint", lambda: load_generator(path, device, ema=ema)),
               ("a shipped rearlib.experiments.zoo generator", lambda: load_shipped(path, device)),
               ("an official state dict", lambda: load_official_state_dict(path, preset, device=device))]
    for what, load in loaders[:1] if ema else loaders:  # only rearlib.train files keep EMA weights
        try:
            return load()
        except Exception as e:  # noqa: BLE001 - try the next format, report all
            errors.append(f" as {what}: {e}")
    raise SystemExit(f"cannot load {path}\n" + "\n".join(errors))


def _fid_cli(a) -> None:
    validate_scale(a.scale)
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this rank's GPU
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model = _load_any_generator(a.generator, a.preset, device, ema=a.ema)
    sc = scales.SAMPLING[a.scale]
    g, p = a.cfg_scale, a.cfg_power
    if g is None and a.scale == "paper":
        g, p = PAPER_CFG.get(a.preset or "", (None, None))
        if g is None:
            raise SystemExit(f"--cfg-scale/--cfg-power needed (paper headline settings exist for {list(PAPER_CFG)} "
                             f"via --preset)")
    g = sc["cfg_scale"] if g is None else g
    p = (sc["cfg_power"] if p is None else p) or 0.0
    tok = get_tokenizer(a.scale, device, path=a.tokenizer)
    res = generate_fid_samples(model, tok, a.num_per_class or sc["num_per_class"], a.out, seed=a.seed,
                               batch_size=a.batch_size or sc["batch_size"], cfg_scale=g, cfg_power=p,
                               classes=None if a.num_classes is None else list(range(a.num_classes)),
                               temperature=a.temperature, overwrite=a.overwrite)
    res.update(cfg_scale=g, cfg_power=p, seed=a.seed)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(res, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
