# Session 11: packed (1 bit) dropout masks in the fused stack against session 10's byte masks (fb_old.py =
# HEAD's fused_blocks): mask-kernel micro timing, then full-step A/B in one process.
import json, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import fb_old
from rearlib import fused_blocks, kernels, model
from common import cuda_ms, step_rows
OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "micro": [], "rows": []}
def save():
    json.dump(res, open(f"{OUT}/packed_ab.json", "w"), indent=1, default=str)
def timeit(fn, n=10, inner=3):
    return cuda_ms(fn, n, inner)
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
def switch(which):
    model.fused_block_stack = fused_blocks.fused_block_stack if which == "bits" else fb_old.fused_block_stack


step_rows(sys.argv[1:], switch, "masks", res, save, dev)
