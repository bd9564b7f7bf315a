"""The hand-scheduled block stack (rearlib.kernels.fused_blocks) against the Block modules it replaces in training."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rearlib.kernels.fused_blocks import SiteLN, SiteResidual, fused_block_stack, site_backward, site_forward
from rearlib.kernels.ops import pack_keep, triton_available
from rearlib.model import build_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def _random_model(**overrides):
    torch.manual_seed(0)
    m = build_generator("tiny", dropout=0.0, attn_dropout=0.0, **overrides).double().train()
    with torch.no_grad():  # adaLN-Zero starts as the identity; give every parameter a non-trivial value
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_stack_equals_the_block_modules_forward_and_backward():
    """Outputs, taps and every gradient (block parameters, the input and the condition) of the fused stack equal
    the Block modules' (float64, no dropout; the stand-ins for the Triton kernels and cuDNN are plain PyTorch)."""
    m = _random_model()
    tokens = torch.randint(0, m.config.codebook_size, (3, m.config.seq_len))
    x0, c0 = m._embed(tokens, torch.tensor([0, 4, 10]))
    x0, c0 = x0.detach(), c0.detach().expand_as(x0).contiguous()
    taps = (0, 2, 3)
    g = torch.Generator().manual_seed(1)
    r_out, r_taps = torch.randn(x0.shape, generator=g, dtype=x0.dtype), {t: torch.randn(x0.shape, generator=g,
                                                                                         dtype=x0.dtype) for t in taps}

    def run(fused):
        m.zero_grad(set_to_none=True)
        x, c = x0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        if fused:
            out, feats = fused_block_stack(m.config, m.blocks, x, c, taps, dtype=torch.float64, backend="torch")
        else:
            h, feats = x, {}
            for i, blk in enumerate(m.blocks):
                h = blk(h, c)
                if i in taps:
                    feats[i] = h
            out = h
        loss = (out * r_out).sum() + sum((feats[t] * r_taps[t]).sum() for t in taps)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.blocks.named_parameters()}
        return out.detach(), {t: f.detach() for t, f in feats.items()}, grads, x.grad, c.grad

    want, got = run(False), run(True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    for t in taps:
        torch.testing.assert_close(got[1][t], want[1][t], rtol=1e-10, atol=1e-10)
    assert set(got[2]) == set(want[2])
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-9, atol=1e-9, msg=n)
    torch.testing.assert_close(got[3], want[3], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[4], want[4], rtol=1e-9, atol=1e-9)


def test_stack_draws_packed_dropout_masks_per_block():
    """The stack's dropout masks: per block three flat word pieces (after proj [N, C], after the GELU [N, hidden],
    after fc2 [N, C]) of ceil(n / 32) int32 words, keep rate 1 - p; a stack with dropout runs forward and
    backward (stand-ins) and its output differs from the deterministic one."""
    from rearlib.kernels.fused_blocks import _keep_masks, _Plan
    from rearlib.kernels.ops import unpack_keep

    plan = _Plan(3, 2, 0.25, 0.0, 1e-6, (), torch.float64, "torch", "flash")
    N, C, hidden = 70, 12, 48
    torch.manual_seed(0)
    masks = _keep_masks(plan, N, C, hidden, torch.device("cpu"))
    assert len(masks) == 3
    rates = []
    for block in masks:
        assert [m.dtype for m in block] == [torch.int32] * 3
        assert [m.numel() for m in block] == [-(-N * C // 32), -(-N * hidden // 32), -(-N * C // 32)]
        rates += [unpack_keep(m, (n,)).double().mean().item() for m, n in zip(block, (N * C, N * hidden, N * C))]
    assert abs(sum(rates) / len(rates) - 0.75) < 0.02, rates
    assert _keep_masks(plan._replace(dropout=0.0), N, C, hidden, torch.device("cpu")) == [(None, None, None)] * 3

    m = _random_model()
    tokens = torch.randint(0, m.config.codebook_size, (2, m.config.seq_len))
    x0, c0 = m._embed(tokens, torch.tensor([0, 4]))
    x0, c0 = x0.detach().requires_grad_(True), c0.detach().expand_as(x0).contiguous()
    plain, _ = fused_block_stack(m.config, m.blocks, x0, c0, dtype=torch.float64, backend="torch")
    cfg = m.config.__class__(**{**m.config.__dict__, "dropout": 0.25})
    out, _ = fused_block_stack(cfg, m.blocks, x0, c0, dtype=torch.float64, backend="torch")
    out.sum().backward()
    assert torch.isfinite(x0.grad).all() and not torch.allclose(out, plain)


def test_site_stand_in_with_dropout_matches_autograd():
    """The site's closed-form backward (here its PyTorch stand-in, which the kernel test below compares with the
    Triton kernels) equals autograd through the plain formula, with a dropout mask on the residual branch."""
    g = torch.Generator().manual_seed(0)
    N, C, p = 7, 12, 0.25
    x, br = torch.randn(N, C, generator=g, dtype=torch.float64), torch.randn(N, C, generator=g, dtype=torch.float64)
    mod = torch.randn(N, 3 * C, generator=g, dtype=torch.float64) * 0.5
    w, b = 1 + 0.1 * torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    keep = torch.rand(N, C, generator=g) >= p
    leaves = [t.clone().requires_grad_(True) for t in (x, br, mod, w, b)]
    xl, brl, modl, wl, bl = leaves
    xn = xl + modl[:, :C] * brl * keep / (1 - p)
    a = torch.nn.functional.layer_norm(xn, (C,), wl, bl, 1e-6) * (1 + modl[:, 2 * C:]) + modl[:, C:2 * C]
    dxn_in, da = torch.randn(N, C, generator=g, dtype=torch.float64), torch.randn(N, C, generator=g, dtype=torch.float64)
    ((xn * dxn_in).sum() + (a * da).sum()).backward()

    res = SiteResidual(br, pack_keep(keep), mod[:, :C], p)
    ln = SiteLN(w, b, mod[:, C:2 * C], mod[:, 2 * C:], 1e-6)
    xn2, a2, mean, rstd = site_forward(x, res, ln, out_dtype=torch.float64)
    torch.testing.assert_close(xn2, xn.detach())
    torch.testing.assert_close(a2, a.detach())
    dmod = torch.zeros(N, 3 * C, dtype=torch.float64)
    dx, dbr, sums = site_backward(dxn_in.clone(), da, xn2, mean, rstd, res, ln, dgate=dmod[:, :C],
                                  dshift=dmod[:, C:2 * C], dscale=dmod[:, 2 * C:], branch_dtype=torch.float64)
    torch.testing.assert_close(dx, xl.grad)
    torch.testing.assert_close(dbr, brl.grad)
    torch.testing.assert_close(dmod, modl.grad)
    torch.testing.assert_close(sums[0], wl.grad)
    torch.testing.assert_close(sums[1], bl.grad)
    torch.testing.assert_close(sums[2:5], modl.grad.view(N, 3, C).sum(0)[[1, 2, 0]])
    torch.testing.assert_close(sums[5], brl.grad.sum(0))


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_site_kernels_match_the_stand_ins_in_the_interpreter():
    """The Triton site kernels, run on CPU by Triton's interpreter, against the PyTorch stand-ins: every flag
    combination, a width that is not a power of two, bf16 activations, modulation views with a row stride."""
    code = textwrap.dedent("""
        import torch
        from rearlib.kernels.ops import pack_keep
        import rearlib.kernels.fused_blocks as fb
        fb.SITE_CONFIG.update(bwd_programs=3)  # several rows per program, so the column sums accumulate
        g = torch.Generator().manual_seed(0)
        worst = {}
        N = 37
        # C = 64: rows of whole dropout words (loaded as word tiles); C = 48: rows that start inside a word
        for has_res, has_keep, has_ln, C in [(1, 1, 1, 48), (1, 1, 1, 64), (1, 0, 1, 48), (0, 0, 1, 48),
                                             (1, 1, 0, 48), (1, 1, 0, 64)]:
            x = torch.randn(N, C, generator=g)
            br = torch.randn(N, C, generator=g).bfloat16()
            mod = (0.5 * torch.randn(N, 2, 6 * C, generator=g)).bfloat16()[:, 1]  # row stride 12 C
            keep = (torch.rand(N, C, generator=g) >= 0.1) if has_keep else None
            w, b = 1 + 0.1 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)
            packed = pack_keep(keep) if has_keep else None
            res = fb.SiteResidual(br, packed, mod[:, 2 * C:3 * C], 0.1) if has_res else None
            ln = fb.SiteLN(w, b, mod[:, :C], mod[:, C:2 * C], 1e-6) if has_ln else None
            outs = [fb.site_forward(x, res, ln, interpret=k) for k in (False, True)]
            for name, a, b_ in zip(("xn", "a", "mean", "rstd"), *outs):
                if a is not None:
                    worst[name] = max(worst.get(name, 0), (a.float() - b_.float()).abs().max().item())
            xn, _, mean, rstd = outs[0]
            da = torch.randn(N, C, generator=g).bfloat16() if has_ln else None
            dxn = torch.randn(N, C, generator=g)
            got = []
            for k in (False, True):
                dmod = torch.zeros(N, 2, 6 * C, dtype=torch.bfloat16)[:, 0]
                dx, dbr, sums = fb.site_backward(dxn.clone(), da, xn, mean, rstd, res, ln, dgate=dmod[:, 5 * C:],
                                                 dshift=dmod[:, 3 * C:4 * C], dscale=dmod[:, 4 * C:5 * C],
                                                 interpret=k)
                got.append((dx, dbr, sums, dmod.clone()))
            for name, a, b_ in zip(("dx", "dbranch", "sums", "dmod"), *got):
                if a is not None:
                    worst[name] = max(worst.get(name, 0), (a.float() - b_.float()).abs().max().item())
            # unreduced per-program sums (what the stack collects) add up to the same column sums
            parts = torch.full(fb.site_backward_partials(N, C, x.device), float("nan"))
            dmod = torch.zeros(N, 2, 6 * C, dtype=torch.bfloat16)[:, 0]
            _, _, out = fb.site_backward(dxn.clone(), da, xn, mean, rstd, res, ln, dgate=dmod[:, 5 * C:],
                                         dshift=dmod[:, 3 * C:4 * C], dscale=dmod[:, 4 * C:5 * C], interpret=True,
                                         parts=parts)
            assert out is parts and parts.shape[0] == 3
            worst["sums"] = max(worst["sums"], (parts.sum(0) - got[1][2]).abs().max().item())
        print("worst", worst)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = eval(r.stdout.split("worst")[-1])
    assert set(worst) == {"xn", "a", "mean", "rstd", "dx", "dbranch", "sums", "dmod"}, worst
    for name, tol in {"xn": 1e-5, "mean": 1e-5, "rstd": 1e-4, "dx": 1e-4, "sums": 1e-3}.items():
        assert worst[name] < tol, worst
    for name in ("a", "dbranch", "dmod"):  # bf16 outputs: at most one rounding apart (magnitudes < 8)
        assert worst[name] <= 0.0625, worst


def test_block_kernels_switch_and_cpu_training_uses_the_modules():
    with pytest.raises(ValueError, match="block_kernels"):
        build_generator("tiny", block_kernels="fast")
    m = build_generator("tiny").train()
    x = torch.zeros(2, 5, m.config.hidden)
    assert not m._use_fused_stack(x, None)  # CPU
    assert build_generator("tiny", block_kernels="module").config.block_kernels == "module"
    with pytest.raises(RuntimeError, match="CUDA"):
        fused_block_stack(m.config, m.blocks, x, x, ())


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_qknorm_kernels_match_the_stand_ins_in_the_interpreter():
    """QK-norm forward and backward kernels (Triton's interpreter on CPU) against the PyTorch stand-ins: 3 heads
    of width 12 (neither a power of two), bf16 qkv, non-contiguous incoming gradients, and the column sums."""
    code = textwrap.dedent("""
        import torch
        import rearlib.kernels.fused_blocks as fb
        fb.QKNORM_CONFIG.update(bwd_programs=4)
        g = torch.Generator().manual_seed(0)
        B, S, H, d = 2, 5, 3, 12
        C = H * d
        qkv = torch.randn(B * S, 3 * C, generator=g).bfloat16()
        wq, bq, wk, bk = (1 + 0.2 * torch.randn(d, generator=g) for _ in range(4))
        f = [fb.qknorm_forward(qkv, wq, bq, wk, bk, (B, S, H, d), 1e-6, torch.bfloat16, interpret=k) for k in (0, 1)]
        worst = {"fwd": max((a.float() - b.float()).abs().max().item() for a, b in zip(*f))}
        grads = [torch.randn(B, H, S, d, generator=g).bfloat16().transpose(1, 2) for _ in range(3)]  # strided
        b_ = [fb.qknorm_backward(*grads, qkv, wq, wk, (B, S, H, d), 1e-6, interpret=k) for k in (0, 1)]
        worst["dqkv"] = (b_[0][0].float() - b_[1][0].float()).abs().max().item()
        worst["norm_grads"] = max((a - b).abs().max().item() for a, b in zip(b_[0][1:5], b_[1][1:5]))
        # the qkv bias gradient is the column sum of the kernel's own (bf16) dqkv
        worst["bias"] = (b_[1][5] - b_[1][0].float().sum(0)).abs().max().item()
        parts = torch.full(fb.qknorm_backward_partials(B * S, H, d, qkv.device), float("nan"))
        _, out = fb.qknorm_backward(*grads, qkv, wq, wk, (B, S, H, d), 1e-6, interpret=True, parts=parts)
        assert out is parts and parts.shape == (4, 7, 4, 16)
        worst["bias"] = max(worst["bias"], max((a - b).abs().max().item() for a, b in
                                               zip(fb.qknorm_param_grads(parts.sum(0), H, d), b_[1][1:])))
        assert b_[1][0].shape == qkv.shape and b_[1][5].shape == (3 * C,) and b_[1][1].shape == (d,)
        print("worst", worst)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = eval(r.stdout.split("worst")[-1])
    assert worst["fwd"] <= 0.0625 and worst["dqkv"] <= 0.0625, worst  # one bf16 rounding (magnitudes < 8)
    assert worst["norm_grads"] < 1e-4 and worst["bias"] < 1e-4, worst


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_gelu_kernels_match_the_stand_ins_in_the_interpreter():
    code = textwrap.dedent("""
        import torch
        from rearlib.kernels.ops import pack_keep
        import rearlib.kernels.fused_blocks as fb
        fb.GELU_CONFIG.update(fwd_block=64, bwd_cols=32, bwd_programs=3)  # several blocks, rows per program
        g = torch.Generator().manual_seed(0)
        N = 7
        worst = {}
        for M, drop in [(80, False), (80, True), (96, True)]:  # 96: rows of whole dropout words
            f = (2 * torch.randn(N, M, generator=g)).bfloat16()
            dg = torch.randn(N, M, generator=g).bfloat16()
            keep = pack_keep(torch.rand(N, M, generator=g) >= 0.2) if drop else None
            a, b = (fb.gelu_forward(f, keep, 1.25, interpret=k) for k in (0, 1))
            worst["fwd"] = max(worst.get("fwd", 0), (a.float() - b.float()).abs().max().item())
            (da, sa), (db, sb) = (fb.gelu_backward(dg, f, keep, 1.25, interpret=k) for k in (0, 1))
            worst["bwd"] = max(worst.get("bwd", 0), (da.float() - db.float()).abs().max().item())
            worst["bias"] = max(worst.get("bias", 0), (sb - db.float().sum(0)).abs().max().item())
        print("worst", worst)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = eval(r.stdout.split("worst")[-1])
    assert worst["fwd"] <= 0.0625 and worst["bwd"] <= 0.0625 and worst["bias"] < 1e-4, worst


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_gelu_kernels_are_the_erf_gelu_to_float32_accuracy():
    """The kernels' Phi is an erfc approximation (``_normal_cdf``), not libdevice's erf: on float32 inputs over
    [-12, 12] the GELU and its derivative agree with float64 ``torch.erf`` to float32 round-off, absolutely and,
    down to x = -10, relatively (the tail, where GELU(x) ~ 1e-23, is where a poor erf would show)."""
    code = textwrap.dedent("""
        import math, torch
        import rearlib.kernels.fused_blocks as fb
        fb.GELU_CONFIG.update(fwd_block=1024, bwd_cols=512, bwd_programs=4)
        x64 = torch.linspace(-12, 12, 4 * 8191, dtype=torch.float64)
        f = x64.float().view(4, -1)
        x = f.double()
        cdf = 0.5 * torch.erfc(-x / math.sqrt(2))
        want_g, want_d = x * cdf, cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        g = fb.gelu_forward(f, None, 1.0, interpret=True).double()
        d, _ = fb.gelu_backward(torch.ones_like(f), f, None, 1.0, interpret=True)
        tail = x > -10
        print("err", {"g_abs": (g - want_g).abs().max().item(), "d_abs": (d.double() - want_d).abs().max().item(),
                      "g_rel": ((g - want_g).abs() / want_g.abs())[tail].max().item()})
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    err = eval(r.stdout.split("err")[-1])
    assert err["g_abs"] < 2e-6 and err["d_abs"] < 1e-6 and err["g_rel"] < 1e-4, err


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton")
def test_fused_stack_on_gpu_is_as_accurate_as_the_bf16_modules():
    """CUDA bf16 training runs the fused stack (Triton kernels, cuDNN attention, float32 weight gradients from
    cuBLAS, column sums reduced once per step). Without dropout, its parameter gradients are as close to float32
    Block modules as the bf16 Block modules' own (median relative error); with dropout, a step is finite."""
    import torch.nn.functional as F

    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = build_generator("small", dropout=0.0, attn_dropout=0.0, device=dev).train()
    with torch.no_grad():  # adaLN-Zero starts as the identity: make every gradient non-trivial
        for n, p in m.named_parameters():
            if "adaLN" in n or "norm" in n:
                p.add_(0.02 * torch.randn_like(p))
    cfg = m.config
    tokens = torch.randint(0, cfg.codebook_size, (8, cfg.seq_len), device=dev)
    classes = torch.randint(0, cfg.num_classes, (8,), device=dev)

    def grads(kernels, amp):
        m.config = cfg.replace(block_kernels=kernels)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            assert m._use_fused_stack(tokens, None) == (amp and kernels == "auto")
            o = m(tokens, classes, align=True)
            loss = (F.cross_entropy(o.logits.float().flatten(0, 1), tokens.flatten())
                    + o.encode_z.float().square().mean() + o.decode_z.float().square().mean())
        loss.backward()
        return {n: p.grad.float().clone() for n, p in m.named_parameters()}

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref = grads("module", False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def median_err(g):
        assert set(g) == set(ref)
        errs = sorted(((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref
                      if "k_norm.bias" not in n)  # zero in exact arithmetic (softmax shift invariance)
        return errs[len(errs) // 2]

    fused, modules = median_err(grads("auto", True)), median_err(grads("module", True))
    assert fused < 0.02 and fused < 1.5 * modules, (fused, modules)

    m = build_generator("small", device=dev).train()  # dropout 0.1, attention dropout 0.1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert m._use_fused_stack(tokens, None)
        loss = F.cross_entropy(m(tokens, classes).logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
