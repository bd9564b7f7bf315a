"""Cost benchmark of the four diagnosis analyses on a GPU box, for planning the small-scale notebooks 05-08.

``python -m rearlib analysis benchmark`` runs them with random weights at the small-scale shapes (our 16x16-token
VQ tokenizer, K = 1024); the measured seconds, scaled linearly to the image counts of
``rearlib.scales.ANALYSIS["small"]``, are what notebooks 05-08 will cost at that scale. The numbers the analyses
return here mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from rearlib import scales
from rearlib.analysis.cka import cka_layers
from rearlib.analysis.context_noise import robustness
from rearlib.analysis.forced_decoding import exposure_bias
from rearlib.analysis.replacement import embedding_replacement
from rearlib.data import render_batch
from rearlib.metrics import dfd_distance
from rearlib.metrics.classifier import Classifier
from rearlib.model import build_generator
from rearlib.runtime import atomic_write_text, resolve_device
from rearlib.tokenizers.vqgan import VQTokenizer


def _benchmark(args) -> dict:
    """Time the four analyses on random weights at the small-scale shapes; seconds per analysis, measured on
    ``args.images`` images and extrapolated linearly to ``scales.ANALYSIS["small"]``."""
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    tok = VQTokenizer(dict(scales.VQ_TOKENIZER["small"]["model"])).to(dev).eval()
    h, w = tok.grid_size
    model = build_generator(args.preset, codebook_size=tok.codebook_size, z_dim=tok.code_dim,
                            seq_len=h * w).to(dev)
    with torch.no_grad():  # random non-degenerate weights (a fresh model's blocks are the identity)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    clf = Classifier(widths=(32, 64, 128, 256), resolution=tok.resolution).to(dev).eval()

    def perceptual(a, b):
        return dfd_distance(a, b, clf), "DFD[random classifier, benchmark only]"

    images, labels = render_batch(torch.arange(args.images), tok.resolution, split="val", device=dev)
    labels = labels % model.config.num_classes
    small = scales.ANALYSIS["small"]
    res = {"device": str(torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"), "preset": args.preset,
           "images": args.images, "batch_size": args.batch_size, "seq_len": h * w, "codebook": tok.codebook_size}

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    kw = dict(batch_size=args.batch_size, perceptual=perceptual, progress=False, generator=0)
    df, sec = timed(lambda: exposure_bias(model, tok, images, labels, ratios=small["ratios"], **kw))
    res["A_seconds"] = sec
    res["A_rows"] = len(df)
    res["A_seconds_small_scale"] = sec * small["images"] / args.images
    df, sec = timed(lambda: embedding_replacement(model, tok, images, labels, r_primes=small["r_primes"], **kw))
    res["B_seconds"] = sec
    res["B_rows"] = len(df)
    res["B_seconds_small_scale"] = sec * small["images"] / args.images
    df, sec = timed(lambda: robustness(model, images, labels, tokenizer=tok, batch_size=args.batch_size,
                                       generator=0, progress=False))
    res["C_seconds"] = sec
    res["C_seconds_small_scale"] = sec * small["images"] / args.images
    df, sec = timed(lambda: cka_layers(model, tok, images, labels, batch_size=args.batch_size, progress=False))
    res["D_seconds"] = sec
    res["D_seconds_small_scale"] = sec * small["cka_images"] / args.images
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rearlib analysis", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, help="what to run")
    b = sub.add_parser("benchmark", help="time the four analyses with random weights at the small-scale shapes "
                                         "(16x16 tokens, K = 1024) and extrapolate to scales.ANALYSIS['small']")
    b.add_argument("--preset", default="small",
                   help="generator architecture, a name of rearlib.model.PRESETS (default: %(default)s)")
    b.add_argument("--images", type=int, default=64,
                   help="images timed; the seconds are scaled linearly to the small-scale image counts "
                        "(default: %(default)s)")
    b.add_argument("--batch-size", type=int, default=scales.ANALYSIS["small"]["batch_size"],
                   help="rows per model call, as the notebooks use at small scale (default: %(default)s)")
    b.add_argument("--device", default="auto", help="torch device, or 'auto' for CUDA when available "
                                                    "(default: %(default)s)")
    b.add_argument("--out", default=None, help="write the result JSON here (atomically)")
    a = ap.parse_args(argv)
    res = _benchmark(a)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        atomic_write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
