"""Launch-configuration sweep of the block stack's adaLN site kernels (rearlib.kernels.fused_blocks.site_forward /
site_backward: residual + dropout + LayerNorm + modulate) at reAR-B training shapes (N = 128 * 258, C = 768):
rows per program and warps (forward), rows, warps and programs (backward); achieved TB/s counts each input and
output once. Run from the repository root on a CUDA machine: python benchmarks/fused_blocks/site_kernel_sweep.py
Writes $OUT/site_kernel_sweep.json (default OUT: artifacts/bench)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from benchmarks.common import out_path
import rearlib.kernels.fused_blocks as fb
from rearlib.kernels.ops import pack_keep
dev = "cuda"; N, C = 128 * 258, 768
g = torch.Generator(device=dev).manual_seed(0)
x = torch.randn(N, C, device=dev, generator=g)
br = torch.randn(N, C, device=dev, generator=g).bfloat16()
mod = (0.5 * torch.randn(N, 24 * 6 * C, device=dev, generator=g, dtype=torch.bfloat16))
keep = pack_keep(torch.rand(N, C, device=dev, generator=g) >= 0.1)  # one bit per decision, as the stack reads them
w, b = torch.ones(C, device=dev), torch.zeros(C, device=dev)
res = fb.SiteResidual(br, keep, mod[:, 2 * C:3 * C], 0.1)
ln = fb.SiteLN(w, b, mod[:, 3 * C:4 * C], mod[:, 4 * C:5 * C], 1e-6)
dmod = torch.empty_like(mod)
da = torch.randn(N, C, device=dev, generator=g).bfloat16()
dxn0 = torch.randn(N, C, device=dev, generator=g)
def t(fn, n=20):
    fn(); torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - s) / n * 1e3
rows = []
xn, a, mean, rstd = fb.site_forward(x, res, ln)
byt_f = N * C * (4 + 2 + 1 + 2 + 2 + 2 + 4 + 2)
for R, W in [(1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16), (8, 16)]:
    fb.SITE_CONFIG.update(fwd_rows=R, fwd_warps=W)
    ms = t(lambda: fb.site_forward(x, res, ln))
    rows.append({"dir": "fwd", "rows": R, "warps": W, "ms": ms, "TBps": byt_f / ms / 1e9}); print(rows[-1], flush=True)
byt_b = N * C * (4 + 2 + 4 + 2 + 2 + 1 + 2 + 4 + 2 + 2 + 2 + 2)
ref = None
for R, W, P in [(1, 4, 1056), (1, 8, 1056), (1, 4, 2112), (1, 8, 528), (2, 8, 1056), (2, 4, 1056), (1, 4, 4224), (1, 2, 4224), (2, 8, 4224), (4, 8, 1056)]:
    fb.SITE_CONFIG.update(bwd_rows=R, bwd_warps=W, bwd_programs=P)
    out = fb.site_backward(dxn0.clone(), da, xn, mean, rstd, res, ln, dgate=dmod[:, 2*C:3*C], dshift=dmod[:, 3*C:4*C], dscale=dmod[:, 4*C:5*C])
    if ref is None: ref = [o.clone() for o in (out[0], out[1], out[2])]
    err = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref))
    d = dxn0.clone()
    ms = t(lambda: fb.site_backward(d, da, xn, mean, rstd, res, ln, dgate=dmod[:, 2*C:3*C], dshift=dmod[:, 3*C:4*C], dscale=dmod[:, 4*C:5*C]))
    rows.append({"dir": "bwd", "rows": R, "warps": W, "programs": P, "ms": ms, "TBps": byt_b / ms / 1e9, "maxdiff_vs_first": err}); print(rows[-1], flush=True)
json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, open(out_path("site_kernel_sweep.json"), "w"), indent=1)
