# Session 7: one reAR-B training-bench row under Inductor config patches. Run on a CUDA machine from the repository root:
#   OUT=/tmp/o python3 reports/small/bench/tried/inductor_patch_ab.py cat4 '{"max_pointwise_cat_inputs": 4}'
# One training-bench row (reAR-B AR, batch 128) under Inductor config patches (JSON argv[2]); unknown keys are skipped.
import json, os, sys, torch
import torch._inductor.config as ic
name, patches = sys.argv[1], json.loads(sys.argv[2])
applied = {}
for k, v in patches.items():
    if hasattr(ic, k):
        setattr(ic, k, v); applied[k] = v
from rearlib.bench import bench_training, peak_flops
dev = torch.device("cuda"); peak, _ = peak_flops(dev)
r = bench_training("rear_b", os.environ.get("VARIANT", "ar"), 128, fast=True, steps=20, warmup=5, device=dev, peak=peak)
r["config"] = name; r["patches"] = applied
print(json.dumps({k: r[k] for k in ("config", "patches", "variant", "samples_per_s", "ms_per_step", "peak_mem_gib", "warmup_s", "loss")}), flush=True)
with open(os.environ["OUT"] + "/ab.jsonl", "a") as f: f.write(json.dumps(r, default=str) + "\n")
