"""rearlib.kernels.flash_attention against cuDNN's fused attention at reAR-B shapes (B 128, H 16, S 258, d 48, bf16).

Correctness (bf16 inputs in the stack's layouts against float32 math, dropout 0 and 0.1 with the kernels' own
mask), then a sweep of tile configurations, timing forward and backward separately (CUDA events, median of
reps), and the time to draw the attention-dropout words (one layer, and all 24 layers from one launch).
Run from the repository root on a CUDA machine: python benchmarks/attention/flash_micro.py
Writes $OUT/attention_flash_micro.json (default OUT: artifacts/bench)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from benchmarks.common import cuda_ms, out_path
import rearlib.kernels.flash_attention as fa

dev = torch.device("cuda")
B, H, S, D = 128, 16, 258, 48
C = H * D
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [B, H, S, D]}
import triton; out["triton"] = triton.__version__


def inputs(seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    qn = torch.randn(B, S, H, D, device=dev, generator=g).to(torch.bfloat16)
    kn = torch.randn(B, S, H, D, device=dev, generator=g).to(torch.bfloat16)
    qkv = torch.randn(B * S, 3 * C, device=dev, generator=g).to(torch.bfloat16)
    v = qkv.view(B, S, 3, H, D)[:, :, 2].transpose(1, 2)
    do = torch.randn(B * S, C, device=dev, generator=g).to(torch.bfloat16).view(B, S, H, D).transpose(1, 2)
    return qn.transpose(1, 2), kn.transpose(1, 2), v, do


def cudnn_fwd(q, k, v, p):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, p, True, False)
    return r[0], (r[1], r[6], r[7])


def cudnn_bwd(do, q, k, v, o, st, p):
    lse, seed, off = st
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(do, q, k, v, o, lse, seed, off, None, None,
                                                                        None, S, S, p, True)


def ref_grads(q, k, v, do, p, keep):
    qq, kk, vv = (t.float().detach().requires_grad_(True) for t in (q, k, v))
    o = fa.attention_reference(qq, kk, vv, p, keep)
    o.backward(do.float())
    return o.detach(), qq.grad, kk.grad, vv.grad


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def check():
    q, k, v, do = inputs()
    res = {}
    # p = 0: both kernels against float32 math
    ro, rq, rk, rv = ref_grads(q, k, v, do, 0.0, None)
    o, lse, _ = fa.flash_attention_forward(q, k, v, 0.0)
    g = fa.flash_attention_backward(do, q, k, v, o, lse, None, 0.0)
    oc, st = cudnn_fwd(q, k, v, 0.0)
    gc = cudnn_bwd(do, q, k, v, oc, st, 0.0)
    res["p0"] = {name: {"flash": maxdiff(a, r), "cudnn": maxdiff(c, r), "ref_max": float(r.abs().max())}
                 for name, a, c, r in zip(("o", "dq", "dk", "dv"), (o,) + tuple(g), (oc,) + tuple(gc),
                                          (ro, rq, rk, rv))}
    del ro, rq, rk, rv
    # p = 0.1: flash against float32 math with the kernels' mask
    bits = fa.attention_dropout_bits(B, H, S, 0.1, fa.attention_seed(dev))
    keep = fa.unpack_keep(bits, S).view(B, H, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    res["keep_rate_causal"] = float(keep[:, :, causal].float().mean())
    ro, rq, rk, rv = ref_grads(q, k, v, do, 0.1, keep)
    for atomic in (True, False):
        fa.FLASH_CONFIG["atomic_dq"] = atomic
        o, lse, bits = fa.flash_attention_forward(q, k, v, 0.1, bits)
        g = fa.flash_attention_backward(do, q, k, v, o, lse, bits, 0.1)
        res[f"p0.1 atomic_dq={atomic}"] = {name: {"flash": maxdiff(a, r), "ref_max": float(r.abs().max())}
                                           for name, a, r in zip(("o", "dq", "dk", "dv"), (o,) + tuple(g),
                                                                 (ro, rq, rk, rv))}
    fa.FLASH_CONFIG["atomic_dq"] = True
    return res


def timeit(fn, reps=20, inner=5):
    for _ in range(3):  # warm-up (compilation, autotuning)
        fn()
    torch.cuda.synchronize()
    return cuda_ms(fn, n=reps, inner=inner)


def bench_cudnn(p):
    q, k, v, do = inputs()
    o, st = cudnn_fwd(q, k, v, p)
    return {"fwd_ms": timeit(lambda: cudnn_fwd(q, k, v, p)),
            "bwd_ms": timeit(lambda: cudnn_bwd(do, q, k, v, o, st, p))}


def bench_flash(p, fwd_cfgs, bwd_cfgs):
    """fwd_cfgs: (fwd_m, fwd_n, warps, stages); bwd_cfgs: (tile, loop, warps, stages, atomic_dq)."""
    q, k, v, do = inputs()
    rows = []
    base = dict(fa.FLASH_CONFIG)
    bits = fa.attention_dropout_bits(B, H, S, p, fa.attention_seed(dev)) if p > 0 else None
    if p > 0:
        seeds = fa.attention_seed(dev, 24)
        rows.append({"dir": "bits", "ms": timeit(lambda: fa.attention_dropout_bits(B, H, S, p, fa.attention_seed(dev)))})
        rows.append({"dir": "bits x24 one launch", "ms": timeit(lambda: fa.attention_dropout_bits(B, H, S, p, seeds))})
        print(rows[-2:], flush=True)
    for c in fwd_cfgs:
        fa.FLASH_CONFIG.update(base, fwd_m=c[0], fwd_n=c[1], fwd_warps=c[2], fwd_stages=c[3])
        try:
            ms = timeit(lambda: fa.flash_attention_forward(q, k, v, p, bits))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a row too
            ms = repr(e)[:200]
        rows.append({"dir": "fwd", "cfg": c, "p": p, "ms": ms})
        print(rows[-1], flush=True)
    fa.FLASH_CONFIG.update(base)
    o, lse, bits = fa.flash_attention_forward(q, k, v, p, bits)
    for c in bwd_cfgs:
        fa.FLASH_CONFIG.update(base, bwd_tile=c[0], bwd_loop=c[1], bwd_warps=c[2], bwd_stages=c[3], atomic_dq=c[4])
        try:
            ms = timeit(lambda: fa.flash_attention_backward(do, q, k, v, o, lse, bits, p))
        except Exception as e:  # noqa: BLE001
            ms = repr(e)[:200]
        rows.append({"dir": "bwd", "cfg": c, "p": p, "ms": ms})
        print(rows[-1], flush=True)
    fa.FLASH_CONFIG.update(base)
    return rows


t0 = time.time()
out["check"] = check()
print(json.dumps(out["check"], indent=1), flush=True)
out["cudnn"] = {str(p): bench_cudnn(p) for p in (0.0, 0.1)}
print(out["cudnn"], flush=True)
fwd_cfgs = [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 64, 4, 3),
            (64, 16, 4, 2)]
bwd_cfgs = [(64, 64, 4, 2, True), (64, 64, 4, 3, True), (64, 32, 4, 2, True), (128, 64, 8, 2, True),
            (32, 64, 4, 2, True), (128, 32, 8, 2, True), (128, 64, 4, 2, True), (64, 64, 8, 2, True),
            (64, 128, 4, 2, True), (64, 64, 4, 2, False), (64, 32, 4, 2, False)]
out["flash"] = bench_flash(0.1, fwd_cfgs, bwd_cfgs)
out["flash_p0"] = bench_flash(0.0, fwd_cfgs[:3], bwd_cfgs[:3])
out["wall_s"] = time.time() - t0
json.dump(out, open(out_path("attention_flash_micro.json"), "w"), indent=1)
