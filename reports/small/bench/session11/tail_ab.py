# Session 11: flash attention with ragged-end tiles (16-row tail tiles past the last full 64-row tile) against
# session 10's kernels (fa_old.py = e2e0744): per-layer timing and agreement at reAR-B shapes, then full-step A/B.
import json, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
import fa_old
from rearlib import flash_attention as fa, fused_blocks
from common import cuda_ms, step_rows
OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "micro": {}, "maxdiff": {}, "rows": []}
def save():
    json.dump(res, open(f"{OUT}/tail_ab.json", "w"), indent=1, default=str)
def timeit(fn, n=20, inner=5):
    return cuda_ms(fn, n, inner)
B, H, S, D = 128, 16, 258, 48
g = torch.Generator(device=dev).manual_seed(0)
mk = lambda: torch.randn(B, S, H, D, device=dev, generator=g).to(torch.bfloat16).transpose(1, 2)
q, k, v, do = mk(), mk(), mk(), mk()
bits = fa.attention_dropout_bits(B, H, S, 0.1, fa.attention_seed(dev))
outs = {}
for name, mod in (("old", fa_old), ("new", fa)):
    for p in (0.0, 0.1):
        bb = bits if p else None
        o, lse, st = mod.flash_attention_forward(q, k, v, p, bb)
        res["micro"][f"{name}_fwd_p{p}"] = timeit(lambda: mod.flash_attention_forward(q, k, v, p, bb))
        res["micro"][f"{name}_bwd_p{p}"] = timeit(lambda: mod.flash_attention_backward(do, q, k, v, o, lse, st, p))
        outs[(name, p)] = (o,) + tuple(mod.flash_attention_backward(do, q, k, v, o, lse, st, p))
for p in (0.0, 0.1):
    res["maxdiff"][f"p{p}"] = [float((a.float() - b.float()).abs().max()) for a, b in zip(outs[("old", p)], outs[("new", p)])]
print(json.dumps(res, indent=0), flush=True)
save()
def switch(which):
    m = fa if which == "new" else fa_old
    fused_blocks.flash_attention_forward, fused_blocks.flash_attention_backward = (m.flash_attention_forward,
                                                                                   m.flash_attention_backward)


step_rows(sys.argv[1:], switch, "flash", res, save, dev)
