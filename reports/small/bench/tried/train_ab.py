# Full-step A/B in one process on one GPU: reAR-B, batch 128, one GeneratorConfig field set to each value in turn.
# usage (repository root, OUT set, the variant's .diff applied):
#   python reports/small/bench/tried/train_ab.py train_attention ar:split ar:sdpa rear:split
#   python reports/small/bench/tried/train_ab.py dropout_kernel ar:auto ar:bytes rear:auto
import json, os, sys, torch
from rearlib.bench import bench_training, peak_flops, _release
field, runs = sys.argv[1], [a.split(":") for a in sys.argv[2:]]
dev = torch.device("cuda"); peak, _ = peak_flops(dev)
rows = []
for variant, value in runs:
    r = bench_training("rear_b", variant, 128, fast=True, steps=20, warmup=5, device=dev, peak=peak,
                       model_overrides={field: value})
    r[field] = value
    print(json.dumps({k: r[k] for k in (field, "variant", "samples_per_s", "ms_per_step", "peak_mem_gib", "warmup_s")}), flush=True)
    rows.append(r); _release(dev)
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
              open(os.environ["OUT"] + f"/train_ab_{field}.json", "w"), indent=1, default=str)
