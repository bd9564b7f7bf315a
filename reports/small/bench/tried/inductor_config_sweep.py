# One training-bench row (reAR-B AR, batch 128) under Inductor config patches given as JSON in argv[1].
import json, os, sys, time, torch
import torch._inductor.config as ic, torch._functorch.config as fc
name, patches = sys.argv[1], json.loads(sys.argv[2])
for k, v in patches.items():
    mod, attr = (fc, k[3:]) if k.startswith("fc.") else (ic, k)
    obj = mod
    *path, last = attr.split(".")
    for pth in path: obj = getattr(obj, pth)
    setattr(obj, last, v)
from rearlib.bench import bench_training, peak_flops
dev = torch.device("cuda"); peak, _ = peak_flops(dev)
r = bench_training("rear_b", "ar", 128, fast=True, steps=20, warmup=5, device=dev, peak=peak,
                   compile_mode=os.environ.get("MODE") or None)
r["config"] = name; r["patches"] = patches
print(json.dumps({k: r[k] for k in ("config", "samples_per_s", "ms_per_step", "peak_mem_gib", "warmup_s")}), flush=True)
with open(os.environ["OUT"] + "/sweep.jsonl", "a") as f: f.write(json.dumps(r, default=str) + "\n")
