"""Session 10: full reAR-B training step (rearlib.bench.bench_training, batch 128, 30 timed steps after 5 warm-up)
with the Triton stack's attention from rearlib.flash_attention ("flash") or cuDNN ("cudnn"), rows alternating in
one process. Usage: attention_ab.py rear:flash rear:cudnn ar:flash ...; writes $OUT/attention_ab.json."""
import json, os, sys
import torch
from rearlib import fused_blocks
from rearlib.bench import _release, bench_training, peak_flops

dev = torch.device("cuda")
peak, _ = peak_flops(dev)
rows = []
for spec in sys.argv[1:]:
    variant, which = spec.split(":")
    fused_blocks.DEFAULT_ATTENTION = which
    r = bench_training("rear_b", variant, 128, fast=True, steps=30, warmup=5, device=dev, peak=peak)
    r["attention"] = which
    print(json.dumps({k: r[k] for k in ("attention", "variant", "samples_per_s", "ms_per_step", "peak_mem_gib",
                                        "mfu", "host_syncs_per_step", "warmup_s", "loss")}), flush=True)
    rows.append(r)
    _release(dev)
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
              open(os.path.join(os.environ.get("OUT", "."), "attention_ab.json"), "w"), indent=1, default=str)
