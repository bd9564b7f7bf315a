# Session 11: the final code's full step on a second machine (reAR, AR, reAR; one process).
import json, os, sys
import torch
from rearlib.bench import _release, bench_training, peak_flops
OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
peak, _ = peak_flops(dev)
rows = []
for variant in sys.argv[1:]:
    r = bench_training("rear_b", variant, 128, fast=True, steps=30, warmup=5, device=dev, peak=peak)
    print(json.dumps({k: r[k] for k in ("variant", "samples_per_s", "ms_per_step", "peak_mem_gib", "mfu",
                                        "host_syncs_per_step", "loss")}), flush=True)
    rows.append(r)
    _release(dev)
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
              open(f"{OUT}/final_rows.json", "w"), indent=1, default=str)
