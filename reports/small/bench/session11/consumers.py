# Session 11 (run from .devrun/ with fb_old.py = fused_blocks at e2e0744): site and GELU kernels reading packed (bit) masks against session 10's byte masks, reAR-B shapes.
import json, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_ms
import fb_old
from rearlib import fused_blocks as fb
from rearlib.kernels import pack_keep
OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
def timeit(fn, n=10, inner=5):
    return cuda_ms(fn, n, inner)
N, C, M = 33024, 768, 3072
g = torch.Generator(device=dev).manual_seed(0)
r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device=dev, generator=g).to(dt)
out = {"gpu": torch.cuda.get_device_name(0), "ms": {}, "maxdiff": {}}
f, dg = r(N, M), r(N, M)
kb = torch.rand(N, M, device=dev, generator=g) >= 0.1
kw = pack_keep(kb)
for name, mod, k in (("bytes", fb_old, kb), ("bits", fb, kw)):
    out["ms"][f"gelu_fwd_{name}"] = timeit(lambda: mod.gelu_forward(f, k, 1 / 0.9))
    parts = torch.empty(mod.gelu_backward_partials(N, M, dev), device=dev)
    out["ms"][f"gelu_bwd_{name}"] = timeit(lambda: mod.gelu_backward(dg, f, k, 1 / 0.9, parts=parts))
a1, a2 = fb_old.gelu_forward(f, kb, 1 / 0.9), fb.gelu_forward(f, kw, 1 / 0.9)
out["maxdiff"]["gelu_fwd"] = (a1.float() - a2.float()).abs().max().item()
b1, b2 = fb_old.gelu_backward(dg, f, kb, 1 / 0.9)[0], fb.gelu_backward(dg, f, kw, 1 / 0.9)[0]
out["maxdiff"]["gelu_bwd"] = (b1.float() - b2.float()).abs().max().item()
x, br = r(N, C, dt=torch.float32), r(N, C)
modt = r(N, 6 * C)
w, b = 1 + 0.1 * r(C, dt=torch.float32), 0.1 * r(C, dt=torch.float32)
kb = torch.rand(N, C, device=dev, generator=g) >= 0.1
kw = pack_keep(kb)
res = {}
da, dxn = r(N, C), r(N, C, dt=torch.float32)  # session 11's run drew these inside the loop (see README)
for name, mod, k in (("bytes", fb_old, kb), ("bits", fb, kw)):
    R = mod.SiteResidual(br, k, modt[:, :C], 0.1)
    L = mod.SiteLN(w, b, modt[:, C:2 * C], modt[:, 2 * C:3 * C], 1e-6)
    out["ms"][f"site_fwd_{name}"] = timeit(lambda: mod.site_forward(x, R, L))
    xn, a, mean, rstd = mod.site_forward(x, R, L)
    dmod = torch.empty(N, 6 * C, device=dev, dtype=torch.bfloat16)
    parts = torch.empty(mod.site_backward_partials(N, C, dev), device=dev)
    out["ms"][f"site_bwd_{name}"] = timeit(lambda: mod.site_backward(dxn.clone(), da, xn, mean, rstd, R, L, dgate=dmod[:, :C], dshift=dmod[:, C:2*C], dscale=dmod[:, 2*C:3*C], parts=parts))
    res[name] = (xn, a, mod.site_backward(dxn.clone(), da, xn, mean, rstd, R, L, dgate=dmod[:, :C], dshift=dmod[:, C:2*C], dscale=dmod[:, 2*C:3*C])[:2])
out["ms"]["dxn_clone"] = timeit(lambda: dxn.clone())
out["maxdiff"]["site_xn"] = (res["bytes"][0] - res["bits"][0]).abs().max().item()
out["maxdiff"]["site_dx"] = (res["bytes"][2][0] - res["bits"][2][0]).abs().max().item()
out["maxdiff"]["site_dbr"] = (res["bytes"][2][1].float() - res["bits"][2][1].float()).abs().max().item()
print(json.dumps(out, indent=1), flush=True)
json.dump(out, open(f"{OUT}/consumers.json", "w"), indent=1)
