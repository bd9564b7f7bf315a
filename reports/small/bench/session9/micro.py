# Kernel sweeps at reAR-B training shapes (exec'd by diag.py: res, save, dev, fb in scope).
import json, math
import __main__
import torch
import triton
import triton.language as tl
import rearlib.fused_blocks as fb
res, save, dev = __main__.res, __main__.save, __main__.dev
from rearlib import kernels as K

B, S, C, H, d, HID = 128, 258, 768, 16, 48, 3072
N = B * S
torch.manual_seed(0)
micro = res.setdefault("micro", {})


def timeit(fn, reps=10, inner=5):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / inner)
    ts.sort()
    return ts[len(ts) // 2]


def rec(key, row):
    micro.setdefault(key, []).append(row)
    print(key, json.dumps(row), flush=True)


# ---- roofline: plain copy
x = torch.empty(512 * 2**20, dtype=torch.bfloat16, device=dev).normal_()
y = torch.empty_like(x)
ms = timeit(lambda: y.copy_(x))
rec("roofline", {"what": "copy 1 GiB -> 1 GiB bf16", "ms": ms, "TBps": 2 * x.numel() * 2 / ms / 1e9})
del x, y

# ---- GELU
f = torch.randn(N, HID, device=dev, dtype=torch.bfloat16) * 2
keep = torch.rand(N, HID, device=dev) >= 0.1
dg = torch.randn(N, HID, device=dev, dtype=torch.bfloat16)
inv = 1 / 0.9
gbytes_f = f.numel() * 5
gbytes_b = f.numel() * 7


@triton.jit
def _phi_pdf(x, FAST: tl.constexpr):
    if FAST:
        # Numerical Recipes' erfc (fractional error < 1.2e-7): Phi(x) = erfc(-x / sqrt 2) / 2
        z = tl.abs(x) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.5 * z)
        p = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
            0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
        c = 0.5 * t * tl.exp(p - z * z)
        cdf = tl.where(x >= 0, 1.0 - c, c)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return cdf


@triton.jit
def _gelu_fwd_v(f_ptr, keep_ptr, g_ptr, n, inv_keep, FAST: tl.constexpr, COPY: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    x = tl.load(f_ptr + off, mask=m, other=0.0).to(tl.float32)
    if COPY:
        g = x
    else:
        g = x * _phi_pdf(x, FAST)
    g = tl.where(tl.load(keep_ptr + off, mask=m, other=0) != 0, g * inv_keep, 0.0)
    tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gelu_bwd_v(dg_ptr, f_ptr, keep_ptr, df_ptr, part_ptr, N, M, inv_keep, FAST: tl.constexpr, COPY: tl.constexpr,
                ROWS: tl.constexpr, BC: tl.constexpr):
    cb = tl.program_id(0)
    pid = tl.program_id(1)
    nprog = tl.num_programs(1)
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < M
    acc = tl.zeros([BC], tl.float32)
    for r0 in range(pid * ROWS, N, nprog * ROWS):
        rows = r0 + tl.arange(0, ROWS)
        m = (rows < N)[:, None] & cm[None, :]
        off = rows.to(tl.int64)[:, None] * M + cols[None, :]
        x = tl.load(f_ptr + off, mask=m, other=0.0).to(tl.float32)
        dd = tl.load(dg_ptr + off, mask=m, other=0.0).to(tl.float32)
        dd = tl.where(tl.load(keep_ptr + off, mask=m, other=0) != 0, dd * inv_keep, 0.0)
        if COPY:
            df = (dd + x).to(df_ptr.dtype.element_ty)
        else:
            pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
            df = (dd * (_phi_pdf(x, FAST) + x * pdf)).to(df_ptr.dtype.element_ty)
        tl.store(df_ptr + off, df, mask=m)
        acc += tl.sum(df.to(tl.float32), 0)
    tl.store(part_ptr + pid * M + cols, acc, mask=cm)


g_ref = fb.gelu_forward(f, keep, inv)
df_ref, db_ref = fb.gelu_backward(dg, f, keep, inv)
xs = torch.linspace(-12, 12, 2**20, device=dev, dtype=torch.float64)
for blk, w in [(4096, 8), (2048, 8), (2048, 4), (8192, 8), (8192, 16), (1024, 4)]:
    fb.GELU_CONFIG.update(fwd_block=blk, fwd_warps=w)
    ms = timeit(lambda: fb.gelu_forward(f, keep, inv))
    rec("gelu_fwd", {"kernel": "current", "block": blk, "warps": w, "ms": ms, "TBps": gbytes_f / ms / 1e9})
fb.GELU_CONFIG.update(fwd_block=4096, fwd_warps=8)
for fast, copy in [(False, False), (True, False), (False, True)]:
    for blk, w in [(4096, 8), (2048, 4), (8192, 8)]:
        g = torch.empty_like(f)
        run = lambda: _gelu_fwd_v[(triton.cdiv(f.numel(), blk),)](f, keep, g, f.numel(), inv, FAST=fast, COPY=copy,
                                                                   BLOCK=blk, num_warps=w)
        ms = timeit(run)
        err = None if copy else (g.float() - g_ref.float()).abs().max().item()
        rec("gelu_fwd", {"kernel": "fast_erf" if fast else ("copy_roofline" if copy else "v_libdevice"),
                         "block": blk, "warps": w, "ms": ms, "TBps": gbytes_f / ms / 1e9, "maxdiff_vs_current": err})
# accuracy of the fast Phi in float64 terms (fp32 kernel on a grid)
xf = xs.float()
phi = torch.empty_like(xf)


@triton.jit
def _phi_probe(x_ptr, o_ptr, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    tl.store(o_ptr + off, _phi_pdf(tl.load(x_ptr + off, mask=m, other=0.0), FAST), mask=m)


exact = 0.5 * torch.erfc(-xs / math.sqrt(2))
for fast in (False, True):
    _phi_probe[(triton.cdiv(xf.numel(), 1024),)](xf, phi, xf.numel(), FAST=fast, BLOCK=1024)
    rel = ((phi.double() - exact).abs() / exact.clamp_min(1e-300))
    gel = (xs * phi.double() - xs * exact).abs()
    rec("phi_accuracy", {"fast": fast, "max_abs_err_phi": (phi.double() - exact).abs().max().item(),
                         "max_rel_err_phi_x_gt_-10": rel[xs > -10].max().item(),
                         "max_abs_err_gelu": gel.max().item()})

for P in (352, 528, 1056, 176):
    for bc, w in [(1024, 4), (512, 4), (2048, 8), (1024, 8)]:
        fb.GELU_CONFIG.update(bwd_cols=bc, bwd_warps=w, bwd_programs=P)
        ms = timeit(lambda: fb.gelu_backward(dg, f, keep, inv))
        rec("gelu_bwd", {"kernel": "current", "cols": bc, "warps": w, "programs": P, "ms": ms,
                         "TBps": gbytes_b / ms / 1e9})
fb.GELU_CONFIG.update(bwd_cols=1024, bwd_warps=4, bwd_programs=352)
for fast, copy in [(False, False), (True, False), (False, True)]:
    for rows, bc, w, P in [(1, 1024, 4, 352), (2, 1024, 8, 352), (4, 1024, 8, 176), (4, 512, 8, 352),
                           (2, 512, 4, 704), (8, 256, 8, 352), (4, 256, 4, 1056)]:
        df = torch.empty_like(f)
        part = torch.empty(P, HID, dtype=torch.float32, device=dev)
        run = lambda: _gelu_bwd_v[(triton.cdiv(HID, bc), P)](dg, f, keep, df, part, N, HID, inv, FAST=fast, COPY=copy,
                                                            ROWS=rows, BC=bc, num_warps=w)
        ms = timeit(run)
        err = None if copy else (df.float() - df_ref.float()).abs().max().item()
        errb = None if copy else (part.sum(0) - db_ref).abs().max().item()
        rec("gelu_bwd", {"kernel": "fast_erf" if fast else ("copy_roofline" if copy else "v_libdevice"), "rows": rows,
                         "cols": bc, "warps": w, "programs": P, "ms": ms, "TBps": gbytes_b / ms / 1e9,
                         "maxdiff_df": err, "maxdiff_bias": errb})
del f, keep, dg, g_ref, df_ref
save()

# ---- dropout masks: 4 decisions per Philox call (current) vs 8 (16-bit halves)
@triton.jit
def _keep16_kernel(out_ptr, seed_ptr, n, thresh, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr).to(tl.int64) * 2147483648 + tl.load(seed_ptr + 1).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, pid * BLOCK + lane)
    base = pid.to(tl.int64) * (8 * BLOCK) + lane
    tl.store(out_ptr + base, (r0 & 0xFFFF).to(tl.int32) >= thresh, mask=base < n)
    tl.store(out_ptr + base + BLOCK, (r0 >> 16).to(tl.int32) >= thresh, mask=base + BLOCK < n)
    tl.store(out_ptr + base + 2 * BLOCK, (r1 & 0xFFFF).to(tl.int32) >= thresh, mask=base + 2 * BLOCK < n)
    tl.store(out_ptr + base + 3 * BLOCK, (r1 >> 16).to(tl.int32) >= thresh, mask=base + 3 * BLOCK < n)
    tl.store(out_ptr + base + 4 * BLOCK, (r2 & 0xFFFF).to(tl.int32) >= thresh, mask=base + 4 * BLOCK < n)
    tl.store(out_ptr + base + 5 * BLOCK, (r2 >> 16).to(tl.int32) >= thresh, mask=base + 5 * BLOCK < n)
    tl.store(out_ptr + base + 6 * BLOCK, (r3 & 0xFFFF).to(tl.int32) >= thresh, mask=base + 6 * BLOCK < n)
    tl.store(out_ptr + base + 7 * BLOCK, (r3 >> 16).to(tl.int32) >= thresh, mask=base + 7 * BLOCK < n)


shape = (24, N * (2 * C + HID))
K.register_ops()
ms = timeit(lambda: K.dropout_keep_mask(shape, 0.1, dev), reps=5, inner=2)
rec("mask", {"kernel": "current (4 per Philox call)", "ms": ms, "elements": shape[0] * shape[1]})
out = torch.empty(shape, dtype=torch.bool, device=dev)
seed = torch.tensor([12345, 678], device=dev)
for blk, w in [(1024, 4), (512, 4), (1024, 8), (2048, 8)]:
    run = lambda: _keep16_kernel[(triton.cdiv(out.numel(), 8 * blk),)](out, seed, out.numel(), 6554, BLOCK=blk,
                                                                        num_warps=w)
    ms = timeit(run, reps=5, inner=2)
    rec("mask", {"kernel": "16-bit halves (8 per Philox call)", "block": blk, "warps": w, "ms": ms,
                 "keep_rate": out[:2].float().mean().item()})
del out
save()

# ---- site backward (LN + residual + dropout, as in the block loop), with num_stages
mod = torch.randn(N, 24 * 6 * C, device=dev, dtype=torch.bfloat16) * 0.1
ch = lambda j: mod[:, j * C:(j + 1) * C]
xn = torch.randn(N, C, device=dev)
da = torch.randn(N, C, device=dev, dtype=torch.bfloat16)
br = torch.randn(N, C, device=dev, dtype=torch.bfloat16)
kp = torch.rand(N, C, device=dev) >= 0.1
w_ln = torch.randn(C, device=dev); b_ln = torch.randn(C, device=dev)
mean = xn.mean(1); rstd = 1 / xn.std(1)
dmod = torch.empty(N, 24 * 6 * C, device=dev, dtype=torch.bfloat16)
dch = lambda j: dmod[:, j * C:(j + 1) * C]
dx0 = torch.randn(N, C, device=dev)
dxn = dx0.clone()
sbytes = N * C * 29


def site_bwd(rows, warps, P, stages):
    dbr = torch.empty(N, C, dtype=torch.bfloat16, device=dev)
    part = torch.empty(P, 6, C, dtype=torch.float32, device=dev)
    fb._site_bwd_kernel[(P,)](dxn, da, xn, mean, rstd, w_ln, b_ln, ch(4), br, kp, ch(5), dbr, dch(5), dch(3),
                              dch(4), part, N, C, mod.stride(0), dmod.stride(0), 1 / 0.9, HAS_RES=True, HAS_KEEP=True,
                              HAS_LN=True, ROWS=rows, BLOCK_C=1024, num_warps=warps, num_stages=stages)
    return dbr, part


for rows, warps, P, stages in [(1, 8, 1056, 1), (1, 8, 1056, 2), (1, 8, 1056, 3), (1, 8, 264, 1), (1, 8, 396, 1),
                               (1, 8, 792, 1), (1, 8, 264, 3), (1, 16, 528, 1), (1, 16, 264, 1), (1, 16, 528, 3),
                               (2, 16, 528, 1), (2, 16, 264, 1), (1, 4, 528, 1), (1, 4, 1056, 3), (1, 8, 2112, 1)]:
    try:
        ms = timeit(lambda: site_bwd(rows, warps, P, stages))
        dxn.copy_(dx0); dbr, part = site_bwd(rows, warps, P, stages)
        if (rows, warps, P, stages) == (1, 8, 1056, 1):
            ref = (dxn.clone(), dbr, part.sum(0))
        err = max((dxn - ref[0]).abs().max().item(), (dbr.float() - ref[1].float()).abs().max().item(),
                  (part.sum(0) - ref[2]).abs().max().item())
        rec("site_bwd", {"rows": rows, "warps": warps, "programs": P, "stages": stages, "ms": ms,
                         "TBps": sbytes / ms / 1e9, "maxdiff": err})
    except Exception as e:
        rec("site_bwd", {"rows": rows, "warps": warps, "programs": P, "stages": stages, "error": str(e)[:200]})
del mod, dmod
save()

# ---- QK-norm backward
qkv = torch.randn(N, 3 * C, device=dev, dtype=torch.bfloat16)
dq, dk, dv = (torch.randn(B, S, H, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
wq, wk = torch.randn(d, device=dev), torch.randn(d, device=dev)
qbytes = N * C * 16


def qk_bwd(T, warps, P, stages):
    dqkv = torch.empty_like(qkv)
    part = torch.empty(P, 7, 16, 64, dtype=torch.float32, device=dev)
    fb._qknorm_bwd_kernel[(P,)](dq, dk, dv, qkv, wq, wk, dqkv, part, N, 1e-6, H=H, D=d, HP=16, DP=64, T=T,
                                num_warps=warps, num_stages=stages)
    return dqkv, part


ref = None
for T, warps, P, stages in [(1, 8, 1056, 1), (1, 8, 1056, 3), (1, 4, 1056, 1), (1, 4, 2112, 1), (1, 16, 528, 1),
                            (2, 8, 1056, 1), (2, 16, 528, 1), (2, 8, 528, 1), (1, 8, 528, 1), (1, 8, 2112, 1),
                            (4, 16, 264, 1), (1, 2, 4224, 1), (1, 4, 1056, 3)]:
    try:
        ms = timeit(lambda: qk_bwd(T, warps, P, stages))
        dqkv, part = qk_bwd(T, warps, P, stages)
        if ref is None:
            ref = (dqkv, part.sum(0))
        err = max((dqkv.float() - ref[0].float()).abs().max().item(), (part.sum(0) - ref[1]).abs().max().item())
        rec("qknorm_bwd", {"tokens": T, "warps": warps, "programs": P, "stages": stages, "ms": ms,
                           "TBps": qbytes / ms / 1e9, "maxdiff": err})
    except Exception as e:
        rec("qknorm_bwd", {"tokens": T, "warps": warps, "programs": P, "stages": stages, "error": str(e)[:200]})
