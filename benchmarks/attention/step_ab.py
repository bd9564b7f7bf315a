"""Full reAR-B training step (rearlib.experiments.bench.bench_training, batch 128, 30 timed steps after 5 warm-up) with the
block stack's attention from rearlib.kernels.flash_attention ("flash", the default) or cuDNN ("cudnn"), rows alternating
in one process. Run from the repository root on a CUDA machine:
    python benchmarks/attention/step_ab.py rear:flash rear:cudnn ar:flash ar:cudnn rear:flash rear:cudnn
Writes $OUT/attention_flash_vs_cudnn_step.json (default OUT: artifacts/bench)."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from benchmarks.common import out_path, step_rows
import rearlib.kernels.fused_blocks as fused_blocks

dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}


def save():
    json.dump(res, open(out_path("attention_flash_vs_cudnn_step.json"), "w"), indent=1, default=str)


def switch(which):
    fused_blocks.DEFAULT_ATTENTION = which


step_rows(sys.argv[1:] or ["rear:flash", "rear:cudnn", "ar:flash", "ar:cudnn"], switch, "attention", res, save, dev)
