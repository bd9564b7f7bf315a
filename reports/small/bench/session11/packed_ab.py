# Session 11: packed (1 bit) dropout masks in the fused stack against session 10's byte masks (fb_old.py =
# HEAD's fused_blocks): mask-kernel micro timing, then full-step A/B in one process.
import json, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import fb_old
from rearlib import fused_blocks, kernels, model
from rearlib.bench import _release, bench_training, peak_flops
OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "micro": [], "rows": []}
def save():
    json.dump(res, open(f"{OUT}/packed_ab.json", "w"), indent=1, default=str)
def timeit(fn, n=10, inner=3):
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(inner):
            fn()
        b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / inner)
    ts.sort(); return ts[len(ts) // 2]
n = 24 * 33024 * 4608
seed = torch.tensor([123, 456], device=dev)
w = kernels.dropout_keep_bits(n, 0.1, seed)
res["keep_rate_bits"] = kernels.unpack_keep(w[:10**7], (32 * 10**7,)).float().mean().item()
for blk in (128, 256, 512, 1024):
    kernels.DROPOUT_BITS_BLOCK = blk
    res["micro"].append({"kernel": f"bits block {blk}", "ms": timeit(lambda: kernels.dropout_keep_bits(n, 0.1, seed))})
res["micro"].append({"kernel": "bytes (session 10)", "ms": timeit(lambda: kernels.dropout_keep_mask((24, n // 24), 0.1, dev))})
print(res, flush=True)
best = min((r for r in res["micro"] if r["kernel"].startswith("bits")), key=lambda r: r["ms"])
kernels.DROPOUT_BITS_BLOCK = int(best["kernel"].split()[-1])
res["chosen_block"] = kernels.DROPOUT_BITS_BLOCK
save()
peak, _ = peak_flops(dev)
for spec in sys.argv[1:]:
    variant, which = spec.split(":")
    model.fused_block_stack = fused_blocks.fused_block_stack if which == "bits" else fb_old.fused_block_stack
    r = bench_training("rear_b", variant, 128, fast=True, steps=30, warmup=5, device=dev, peak=peak)
    r["masks"] = which
    print(json.dumps({k: r[k] for k in ("masks", "variant", "samples_per_s", "ms_per_step", "peak_mem_gib",
                                        "mfu", "host_syncs_per_step", "loss")}), flush=True)
    res["rows"].append(r)
    _release(dev)
    save()
