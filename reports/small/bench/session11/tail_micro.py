# Session 11: ragged-end tiles vs session 10's flash kernels, interleaved rounds (reAR-B shapes, one H200).
import json, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_ms
import fa_old
from rearlib import flash_attention as fa
OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
def timeit(fn, n=20, inner=5):
    return cuda_ms(fn, n, inner)
B, H, S, D = 128, 16, 258, 48
g = torch.Generator(device=dev).manual_seed(0)
mk = lambda: torch.randn(B, S, H, D, device=dev, generator=g).to(torch.bfloat16).transpose(1, 2)
q, k, v, do = mk(), mk(), mk(), mk()
bits = fa.attention_dropout_bits(B, H, S, 0.1, fa.attention_seed(dev))
rows = []
for rnd in range(int(os.environ.get("ROUNDS", 3))):
    for p in (0.0, 0.1):
        for name, mod in (("old", fa_old), ("new", fa)) if rnd % 2 == 0 else (("new", fa), ("old", fa_old)):
            bb = bits if p else None
            o, lse, st = mod.flash_attention_forward(q, k, v, p, bb)
            rows.append({"round": rnd, "kernels": name, "p": p,
                         "fwd_ms": timeit(lambda: mod.flash_attention_forward(q, k, v, p, bb)),
                         "bwd_ms": timeit(lambda: mod.flash_attention_backward(do, q, k, v, o, lse, st, p))})
            print(rows[-1], flush=True)
json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, open(f"{OUT}/tail_micro.json", "w"), indent=1)
