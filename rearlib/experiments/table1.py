"""Table 1 of the paper on given generators: sample 50 images per class, score them against a reference batch.

The paper's protocol (``docs/paper.md``, reAR §1.9 and §4): raster-order sampling at temperature 1 with the
power-cosine guidance schedule, 50 images per class for the 1000 classes (50,000), decoded by MaskGIT-VQGAN, and
FID / IS / precision / recall from the ADM evaluation suite against ``VIRTUAL_imagenet256_labeled.npz`` (FID
against its stored whole-train-set statistics). Here:

* :func:`sample_model` writes ``images/{index:06d}.png`` and the ADM-style ``samples.npz`` (which the TF evaluator
  can read as well) with :func:`rearlib.sample.generate_fid_samples`; with ``gpus > 1`` it launches
  ``torchrun -m rearlib sample fid`` over that many GPUs of this machine (images do not depend on the number of
  ranks, and an interrupted run resumes);
* :func:`score_samples` computes FID / KID / precision / recall with the Inception FID network
  (:mod:`rearlib.metrics.inception`) and IS only where an Inception with logits is on this machine;
* :data:`GUIDANCE` holds the two sets of guidance settings: the authors' released configs (the default, as the
  project follows the released code) and the paper's appendix values (the option).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rearlib.metrics.distribution import distribution_metrics, inception_available
from rearlib.runtime import REPO_ROOT, artifacts_root
from rearlib.sample_fid import generate_fid_samples

#: (g, p) of the power-cosine guidance per released model. "released": the authors' configs/rear_{s,b,l}.yaml;
#: "paper": the paper's App. A (reAR-L also reported at g = 11 with the same p).
GUIDANCE = {
    "released": {"rear_s": (22.0, 2.75), "rear_b": (15.0, 2.5), "rear_l": (15.0, 2.5)},
    "paper": {"rear_s": (22.0, 2.75), "rear_b": (14.5, 2.25), "rear_l": (10.0, 1.75)},
}
#: The paper's Table 1 rows for the released models: (FID, IS) with the App. A guidance.
PAPER_TABLE1 = {"rear_s": (2.00, 295.7), "rear_b": (1.91, 300.9), "rear_l": (1.86, 316.9)}
#: Sample count of the published protocol (50 per class x 1000 classes).
PAPER_SAMPLES = 50_000


def guidance(preset: str, settings: str = "released") -> tuple[float, float]:
    """(g, p) of ``preset`` under ``settings`` ("released" or "paper")."""
    if settings not in GUIDANCE:
        raise ValueError(f"cfg_settings must be one of {list(GUIDANCE)}, got {settings!r}")
    if preset not in GUIDANCE[settings]:
        raise ValueError(f"no published guidance for {preset!r}; known: {list(GUIDANCE[settings])}")
    return GUIDANCE[settings][preset]


def torchrun_command(checkpoint: Path, preset: str | None, out_dir: Path, *, gpus: int, scale: str,
                     num_per_class: int, seed: int, batch_size: int, cfg_scale: float, cfg_power: float,
                     tokenizer_path=None, n_classes: int | None = None) -> list[str]:
    """The ``torchrun`` command that samples over ``gpus`` GPUs of this machine (one process per GPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "rearlib.sample", "fid", "--generator", str(checkpoint), "--scale", scale,
           "--num-per-class", str(num_per_class), "--out", str(out_dir), "--seed", str(seed),
           "--batch-size", str(batch_size), "--cfg-scale", str(cfg_scale), "--cfg-power", str(cfg_power)]
    if preset:
        cmd += ["--preset", preset]
    if tokenizer_path:
        cmd += ["--tokenizer", str(tokenizer_path)]
    if n_classes:
        cmd += ["--num-classes", str(n_classes)]
    return cmd


def sample_model(model, tokenizer, out_dir, *, num_per_class: int, seed: int, batch_size: int, cfg_scale: float,
                 cfg_power: float, gpus: int = 1, checkpoint=None, preset: str | None = None, scale: str = "paper",
                 tokenizer_path=None, n_classes: int | None = None, progress: bool = True) -> dict:
    """Sample ``num_per_class`` images for every class of ``model`` into ``out_dir`` (resumed if interrupted) and
    return ``{"npz", "num_images", "generated", "seconds", "images_per_s", "gpus", "peak_memory_gib"}``.

    ``gpus > 1`` runs ``torchrun`` (:func:`torchrun_command`) on ``checkpoint``; ``model`` is then not used here.
    ``n_classes`` limits the run to the first classes (a rehearsal of the path; the protocol uses all of them).
    """
    out_dir = Path(out_dir)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus must be an integer >= 1, got {gpus!r}")
    t0 = time.perf_counter()
    if gpus > 1:
        if checkpoint is None:
            raise ValueError("gpus > 1 samples in torchrun processes, which load the generator from its file: pass "
                             "checkpoint=")
        cmd = torchrun_command(Path(checkpoint), preset, out_dir, gpus=gpus, scale=scale,
                               num_per_class=num_per_class, seed=seed, batch_size=batch_size, cfg_scale=cfg_scale,
                               cfg_power=cfg_power, tokenizer_path=tokenizer_path, n_classes=n_classes)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                           os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun sampling failed (exit {done.returncode}): {' '.join(cmd)}\n"
                               f"{done.stderr[-3000:]}")
        res = json.loads(done.stdout[done.stdout.index("{"):])
        peak = None
    else:
        cuda = next(model.parameters()).device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        classes = None if n_classes is None else list(range(n_classes))
        res = generate_fid_samples(model, tokenizer, num_per_class, out_dir, seed=seed, batch_size=batch_size,
                                   classes=classes, cfg_scale=cfg_scale, cfg_power=cfg_power, progress=progress)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    seconds = time.perf_counter() - t0
    made = int(res.get("generated", res["num_images"]))
    return {"npz": str(Path(res.get("npz") or out_dir / "samples.npz")), "num_images": int(res["num_images"]),
            "generated": made, "seconds": seconds, "images_per_s": made / seconds if made else math.nan,
            "gpus": gpus, "peak_memory_gib": peak}


def score_samples(npz, reference, *, device="auto", cache_name: str | None = None, scale: str = "paper") -> dict:
    """FID / KID / precision / recall of the samples in ``npz`` against ``reference`` (an ADM npz path or uint8
    images) with the Inception FID network; IS with torch-fidelity's Inception when its weights (which have
    logits) are on this machine, else NaN with ``is_note`` saying why."""
    out = distribution_metrics(npz, reference, extractor="inception-v3-fid", device=device, cache_name=cache_name,
                               scale=scale)
    if inception_available():
        isc = distribution_metrics(npz, reference, extractor="inception-v3-compat", fid=False, isc=True, kid=False,
                                   prc=False, device=device, scale=scale)
        out["isc_mean"], out["isc_std"] = isc["isc_mean"], isc["isc_std"]
        out["is_note"] = "IS from torch-fidelity's Inception-v3 (logits)"
    else:
        out["isc_mean"] = out["isc_std"] = math.nan
        out["is_note"] = ("IS not computed: the Inception FID network has no logits and torch-fidelity's Inception "
                          "weights are not on this machine")
    return out


def fid_verdict(fid: float, paper_fid: float, n_samples: int, tolerance: float = 0.05) -> tuple[str, str]:
    """(verdict, note) of one Table 1 FID: comparable only at the paper's 50,000 samples (FID is biased upward at
    fewer); then "reproduced" within ``tolerance`` relative, else "not reproduced"."""
    if not np.isfinite(fid):
        return "not tested", "FID was not computed"
    if n_samples != PAPER_SAMPLES:
        return "not tested", (f"{n_samples:,} samples; the paper's protocol uses {PAPER_SAMPLES:,} and FID is "
                              f"biased upward at fewer, so the values are not comparable")
    rel = abs(fid - paper_fid) / paper_fid
    if rel <= tolerance:
        return "reproduced", f"within {rel:.1%} of the paper (tolerance {tolerance:.0%})"
    return "not reproduced", f"{rel:.1%} from the paper (tolerance {tolerance:.0%})"


def default_samples_dir(scale: str, name: str, settings: str) -> Path:
    """``artifacts/table1/<scale>/<model>-<settings>``: where a model's samples live unless a folder is given."""
    return artifacts_root() / "table1" / scale / f"{name}-{settings}"


