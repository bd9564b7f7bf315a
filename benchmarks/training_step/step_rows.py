"""Full reAR-B training step of the current code, one row per argument (rearlib.experiments.bench.bench_training, batch 128,
bf16 + torch.compile + fused AdamW, 30 timed steps after 5 warm-up), all rows in one process.
Run from the repository root on a CUDA machine: python benchmarks/training_step/step_rows.py rear ar rear
Writes $OUT/train_step_rows.json (default OUT: artifacts/bench)."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from benchmarks.common import out_path
from rearlib.experiments.bench import _release, bench_training, peak_flops

dev = torch.device("cuda")
peak, _ = peak_flops(dev)
rows = []
for variant in sys.argv[1:] or ["rear", "ar", "rear"]:
    r = bench_training("rear_b", variant, 128, fast=True, steps=30, warmup=5, device=dev, peak=peak)
    print(json.dumps({k: r[k] for k in ("variant", "samples_per_s", "ms_per_step", "peak_mem_gib", "mfu",
                                        "host_syncs_per_step", "loss")}), flush=True)
    rows.append(r)
    _release(dev)
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
              open(out_path("train_step_rows.json"), "w"), indent=1, default=str)
