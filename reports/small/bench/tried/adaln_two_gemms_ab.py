# A/B in one process: adaLN modulation as one [T, 6C] GEMM (current) vs two [T, 3C] GEMMs (attention half, MLP half)
# so the backward never assembles a [T, 6C] gradient; reAR-B AR batch 128, then reAR with the split.
# usage (repository root, OUT set, no diff needed: it monkeypatches Block.forward): python reports/small/bench/tried/adaln_two_gemms_ab.py
import json, os, torch, torch.nn.functional as F
from rearlib import model as M
from rearlib.bench import bench_training, peak_flops, _release
dev = torch.device("cuda"); peak, _ = peak_flops(dev)
orig = M.Block.forward

def split_forward(self, x, c, cache=None, mod=None):
    if mod is not None:
        return orig(self, x, c, cache, mod)
    lin, C = self.adaLN_modulation[1], x.shape[-1]
    s = F.silu(c)
    shift1, scale1, gate1 = F.linear(s, lin.weight[:3 * C], lin.bias[:3 * C]).chunk(3, dim=-1)
    x = x + gate1 * self.attn(M._modulate(self.norm1(x), shift1, scale1), cache)
    shift2, scale2, gate2 = F.linear(s, lin.weight[3 * C:], lin.bias[3 * C:]).chunk(3, dim=-1)
    return x + gate2 * self.mlp(M._modulate(self.norm2(x), shift2, scale2))

rows = []
for name, variant, fwd in [("two GEMMs", "ar", split_forward), ("one GEMM", "ar", orig), ("two GEMMs", "rear", split_forward)]:
    M.Block.forward = fwd
    torch._dynamo.reset()
    r = bench_training("rear_b", variant, 128, fast=True, steps=20, warmup=5, device=dev, peak=peak)
    r["adaln"] = name
    print(json.dumps({k: r[k] for k in ("adaln", "variant", "samples_per_s", "ms_per_step", "peak_mem_gib", "warmup_s", "loss")}), flush=True)
    rows.append(r); _release(dev)
    json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
              open(os.environ["OUT"] + "/train_adaln_split_ab.json", "w"), indent=1, default=str)
