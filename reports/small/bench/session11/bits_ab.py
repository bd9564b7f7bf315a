# Session 11: the triangular mask kernel against session 10's tile kernel: micro timing, equality, full-step A/B.
import json, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(__file__))
import fa_old
from rearlib import flash_attention as fa, fused_blocks
from common import cuda_ms, step_rows
OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "micro": [], "rows": []}
def save():
    json.dump(res, open(f"{OUT}/bits_ab.json", "w"), indent=1, default=str)
B, H, S, L = 128, 16, 258, 24
seed = fa.attention_seed(dev, L)
new, old = fa.attention_dropout_bits(B, H, S, 0.1, seed), fa_old.attention_dropout_bits(B, H, S, 0.1, seed)
causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
eq = all(torch.equal(fa.unpack_keep(new[l, :64], S)[:, causal], fa.unpack_keep(old[l, :64], S)[:, causal]) for l in range(L))
res["equal_causal_decisions"] = eq
print("equal", eq, flush=True)
def timeit(fn, n=20, inner=5):
    return cuda_ms(fn, n, inner)
cfgs = [(64, 2), (128, 4), (64, 1), (32, 1), (128, 2), (256, 4), (256, 8)]
for rep in range(2):
    res["micro"].append({"kernel": "old tiles 32x4", "ms": timeit(lambda: fa_old.attention_dropout_bits(B, H, S, 0.1, seed))})
    for blk, wp in cfgs:
        fa.FLASH_CONFIG["bits_block"], fa.FLASH_CONFIG["bits_warps"] = blk, wp
        res["micro"].append({"kernel": f"triangle block {blk} warps {wp}",
                             "ms": timeit(lambda: fa.attention_dropout_bits(B, H, S, 0.1, seed))})
    print(res["micro"][-len(cfgs) - 1:], flush=True)
save()
best = min((r for r in res["micro"] if r["kernel"].startswith("tri")), key=lambda r: r["ms"])["kernel"].split()
fa.FLASH_CONFIG["bits_block"], fa.FLASH_CONFIG["bits_warps"] = int(best[2]), int(best[4])
res["chosen"] = best
def switch(which):
    fused_blocks.attention_dropout_bits = fa.attention_dropout_bits if which == "new" else fa_old.attention_dropout_bits


step_rows(sys.argv[1:], switch, "mask_kernel", res, save, dev)
