"""Our own VQ tokenizer (VQGAN-style CNN + vector quantizer) and its trainer.

Every public name is importable from here; the code is split by role: :mod:`rearlib.tokenizers.vqgan_model`
(the network, the quantizer and :class:`VQTokenizer`, with their definitions), :mod:`rearlib.tokenizers.vqgan_training`
(the loss, :func:`train_vq` and the per-scale cache :func:`get_or_train`) and :mod:`rearlib.tokenizers.vqgan_metrics`
(PSNR / SSIM, code usage, :func:`evaluate`). This module holds the command line.

CLI: ``python -m rearlib vqgan train --scale small --out data/checkpoints/tokenizer_small.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from rearlib import scales
from rearlib.runtime import atomic_write_text
from rearlib.tokenizers.base import load_checkpoint, save_tokenizer
from rearlib.tokenizers.vqgan_metrics import code_usage, evaluate, psnr_ssim, to_uint8  # noqa: F401
from rearlib.tokenizers.vqgan_model import (Decoder, Encoder, ResBlock, Upsample, VectorQuantizer,  # noqa: F401
                                            VQConfig, VQTokenizer)
from rearlib.tokenizers.vqgan_training import (TRAINER_VERSION, PatchDiscriminator, VQTrainConfig,  # noqa: F401
                                               _render, get_or_train, reconstruction_loss, scale_configs,
                                               train_vq)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rearlib vqgan", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a VQ tokenizer and write a checkpoint + metrics JSON")
    t.add_argument("--scale", default="small", choices=[s for s, v in scales.VQ_TOKENIZER.items() if v],
                   help="model and training settings of this scale (scales.VQ_TOKENIZER); default small")
    t.add_argument("--out", required=True, help="checkpoint path (.pt); metrics go to the same path with .json")
    t.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    t.add_argument("--steps", type=int, default=None, help="override the scale's number of steps")
    t.add_argument("--time-budget", type=float, default=None, help="seconds; overrides the scale's budget")
    t.add_argument("--adv-weight", type=float, default=None, help="> 0 enables the PatchGAN term")
    t.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    t.add_argument("--seed", type=int, default=None, help="override the scale's training seed")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="evaluate a tokenizer checkpoint on ShapeScenes-10 val")
    e.add_argument("checkpoint", help="tokenizer checkpoint (.pt) to evaluate")
    e.add_argument("--n", type=int, default=512, help="number of val images, the first n (default 512)")
    e.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    a = p.parse_args(argv)
    if a.cmd == "eval":
        tok = load_checkpoint(a.checkpoint, a.device)
        val = _render(torch.arange(a.n), tok.resolution, "val", 0, tok.device)
        print(json.dumps(evaluate(tok, val), indent=2))
        return 0

    mc, tc = scale_configs(a.scale)
    over = {"steps": a.steps, "time_budget_s": a.time_budget, "adv_weight": a.adv_weight, "seed": a.seed}
    tc = VQTrainConfig.from_dict({**asdict(tc), **{k: v for k, v in over.items() if v is not None},
                                **({"compile": True} if a.compile else {})})
    out = Path(a.out)
    # Ship fp16 weights (half the size); the weights are rounded before evaluation, so the printed metrics
    # describe exactly the shipped file.
    model, metrics = train_vq(mc, tc, device=a.device, progress=not a.no_progress, round_to=torch.float16)
    metrics["identity"] = model.identity()
    metrics["checkpoint"] = str(out)
    ident = save_tokenizer(model, out, dtype=torch.float16, meta={"metrics": metrics})
    assert ident == metrics["identity"]
    metrics["checkpoint_bytes"] = out.stat().st_size
    summary = {k: v for k, v in metrics.items() if k not in ("history", "restarts")}
    summary["final_train_rec_loss"] = metrics["history"][-1]["rec_loss"] if metrics["history"] else None
    summary["restarted_codes_total"] = sum(r["restarted"] for r in metrics["restarts"])
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2))
    v = metrics["val"]
    gpu = metrics["hardware"].get("gpu") or "none (CPU)"
    print(f"[vqgan] {a.scale}: {mc.resolution}px, grid {mc.resolution // mc.downsample_factor}x"
          f"{mc.resolution // mc.downsample_factor}, K={mc.codebook_size}, D={mc.code_dim}, "
          f"{metrics['num_params'] / 1e6:.2f}M params")
    print(f"[vqgan] steps {metrics['steps_done']}/{tc.steps} (batch {tc.batch_size}), train wall "
          f"{metrics['train_wall_s']:.1f}s, {metrics['images_per_s']:.0f} img/s, GPU: {gpu}"
          + ("  [stopped by the time budget]" if metrics["stopped_by_time_budget"] else ""))
    print(f"[vqgan] val ({v['n_images']} images): PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}, "
          f"codebook usage {v['usage']:.3f}, code perplexity {v['perplexity']:.1f} (of K={mc.codebook_size})")
    print(f"[vqgan] wrote {out} ({metrics['checkpoint_bytes'] / 2**20:.2f} MiB, identity {ident}) and "
          f"{out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
