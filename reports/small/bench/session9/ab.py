# Full-step A/B in one process: the new fused stack vs the session-8 one (HEAD copies in rearlib/*_old.py).
import json, os, sys, torch
import rearlib.model as M
from rearlib import fused_blocks as new
from rearlib import fused_blocks_old as old
from rearlib import fused_blocks_mid as mid
from rearlib.bench import bench_training, peak_flops, _release
dev = torch.device("cuda"); peak, _ = peak_flops(dev)
rows = []
for spec in sys.argv[1:]:
    variant, which = spec.split(":")
    over = {}
    if which == "module":
        over = {"block_kernels": "module"}
    else:
        M.fused_block_stack = {"new": new, "mid": mid, "old": old}[which].fused_block_stack
    r = bench_training("rear_b", variant, 128, fast=True, steps=30, warmup=5, device=dev, peak=peak,
                       model_overrides=over)
    r["stack"] = which
    print(json.dumps({k: r[k] for k in ("stack", "variant", "samples_per_s", "ms_per_step", "peak_mem_gib", "mfu",
                                        "host_syncs_per_step", "warmup_s")}), flush=True)
    rows.append(r); _release(dev)
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
              open(os.environ["OUT"] + "/ab.json", "w"), indent=1, default=str)
