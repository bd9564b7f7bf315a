"""rearlib.kernels.flash_attention: the Triton causal attention (with attention dropout) of the training stack."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from philox_reference import kept
import rearlib.kernels.flash_attention as fa
from rearlib.kernels.ops import triton_available

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs Triton")


@needs_triton
def test_flash_kernels_match_float64_attention_in_the_interpreter():
    """Forward and backward kernels (Triton's interpreter on CPU, float64 inputs in the stack's strided layouts:
    q/k as [B, S, H, d] buffers, v as a column slice of a qkv buffer) against softmax attention with the kernels'
    own dropout decisions; both dQ schedules; the per-layer decisions of a one-launch [L, 2] seed equal separate
    launches; the keep rate is 1 - p."""
    code = textwrap.dedent("""
        import torch
        import rearlib.kernels.flash_attention as fa
        torch.manual_seed(0)
        worst = {}
        for (B, H, S, D, p) in [(2, 3, 37, 48, 0.0), (2, 3, 37, 48, 0.25), (1, 2, 70, 16, 0.1), (1, 1, 128, 16, 0.1)]:
            f = torch.float64
            q = torch.randn(B, S, H, D, dtype=f).transpose(1, 2)
            k = torch.randn(B, S, H, D, dtype=f).transpose(1, 2)
            v = torch.randn(B, S, 3, H, D, dtype=f)[:, :, 2].transpose(1, 2)
            do = torch.randn(B, S, H, D, dtype=f).transpose(1, 2)
            seeds = torch.tensor([[3, 4], [12345, 678]])
            bits = keep = None
            if p > 0:
                bits = fa.attention_dropout_bits(B, H, S, p, seeds[1])
                both = fa.attention_dropout_bits(B, H, S, p, seeds)
                causal = torch.ones(S, S, dtype=torch.bool).tril()
                assert torch.equal(fa.unpack_keep(both[1], S)[:, causal], fa.unpack_keep(bits, S)[:, causal])
                assert not torch.equal(fa.unpack_keep(both[0], S)[:, causal], fa.unpack_keep(bits, S)[:, causal])
                keep = fa.unpack_keep(bits, S).view(B, H, S, S)
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            ref = fa.attention_reference(qq, kk, vv, p, keep)
            ref.backward(do)
            for atomic in (True, False):
                fa.FLASH_CONFIG["atomic_dq"] = atomic
                o, lse, st = fa.flash_attention_forward(q, k, v, p, bits)
                assert o.shape == q.shape and o.transpose(1, 2).is_contiguous()
                g = fa.flash_attention_backward(do, q, k, v, o, lse, st, p)
                assert g[0].dtype == (torch.float32 if atomic else f)
                for name, a, b in zip(("o", "dq", "dk", "dv"), (o,) + g, (ref, qq.grad, kk.grad, vv.grad)):
                    worst[name] = max(worst.get(name, 0.0), (a.double() - b).abs().max().item())
        S = 128
        keep = fa.unpack_keep(fa.attention_dropout_bits(8, 4, S, 0.25, torch.tensor([5, 7])), S)
        worst["keep_rate"] = keep[:, torch.ones(S, S, dtype=torch.bool).tril()].double().mean().item()
        print("worst", worst)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = eval(r.stdout.split("worst")[-1])
    assert worst["o"] < 1e-12, worst  # float64 end to end
    for name in ("dq", "dk", "dv"):  # the log-sum-exp and the row terms are kept in float32
        assert worst[name] < 1e-5, worst
    # 264192 causal decisions at keep probability 0.75: 5 standard deviations are 0.0042
    assert abs(worst["keep_rate"] - 0.75) < 0.0042, worst


@needs_triton
def test_dropout_decisions_follow_the_documented_philox_counters():
    """Every causal decision of attention_dropout_bits equals an independent numpy Philox evaluated at the
    documented counter ((i * ceil(S / 32) + w) * 4 + byte, b * H + h), draw t of a call kept iff >= the 16-bit
    threshold; this pins the kernel's enumeration of the causal words (S not a multiple of 32, several groups)."""
    import numpy as np

    from rearlib.kernels.ops import keep_threshold

    code = textwrap.dedent("""
        import torch
        import rearlib.kernels.flash_attention as fa
        bits = fa.attention_dropout_bits(2, 3, 75, 0.3, torch.tensor([[11, 22], [1234567, 89]]))
        print("keep", fa.unpack_keep(bits, 75).to(torch.uint8).flatten().tolist())
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    L, BH, S = 2, 6, 75
    got = np.array(eval(r.stdout.split("keep")[-1]), dtype=bool).reshape(L, BH, S, S)
    NW, thresh = -(-S // 32), keep_threshold(0.3)
    i, j = np.tril_indices(S)
    w, t = j // 32, j % 32
    for layer, (a, b) in enumerate([(11, 22), (1234567, 89)]):
        key = a * 2 ** 31 + b
        for bh in range(BH):
            c0 = ((i * NW + w) * 4 + t // 8).astype(np.uint64)
            expected = kept(c0, np.full_like(c0, bh), key, t % 8, thresh)
            assert np.array_equal(got[layer, bh][i, j], expected), (layer, bh)


def test_flash_attention_rejects_bad_inputs():
    q = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="shape"):
        fa.flash_attention_forward(q, q[:, :1], q)
    with pytest.raises(ValueError, match="unit stride"):
        fa.flash_attention_forward(q.transpose(-1, -2), q.transpose(-1, -2), q.transpose(-1, -2))
    if triton_available():
        with pytest.raises(ValueError, match="dropout"):
            fa.flash_attention_forward(q, q, q, 1.0)
        with pytest.raises(ValueError, match="bits"):
            fa.flash_attention_backward(q, q, q, q, q, torch.zeros(2, 5), None, 0.1)
        with pytest.raises(ValueError, match="dropout"):
            fa.attention_dropout_bits(1, 2, 5, 0.0, torch.tensor([1, 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton")
def test_flash_attention_on_gpu_is_as_accurate_as_cudnn():
    """bf16 at reAR's head shape (d = 48, S = 258): without dropout, output and gradients are as close to float32
    attention as cuDNN's (within 1.5x of its max error); with dropout 0.1, as close to float32 attention with
    the same decisions (within 2x: kept values are scaled by 1 / 0.9); the causal keep rate is 0.9."""
    dev = torch.device("cuda")
    B, H, S, D = 8, 16, 258, 48
    g = torch.Generator(device=dev).manual_seed(0)
    x = [torch.randn(B, S, H, D, device=dev, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(4)]
    q, k, v, do = x

    def ref(p, keep):
        qq, kk, vv = (t.float().detach().requires_grad_(True) for t in (q, k, v))
        o = fa.attention_reference(qq, kk, vv, p, keep)
        o.backward(do.float())
        return (o.detach(), qq.grad, kk.grad, vv.grad)

    err = lambda a, b: [(x.float() - y).abs().max().item() for x, y in zip(a, b)]  # noqa: E731
    r0 = ref(0.0, None)
    o, lse, _ = fa.flash_attention_forward(q, k, v, 0.0)
    flash = err((o,) + fa.flash_attention_backward(do, q, k, v, o, lse, None, 0.0), r0)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)
    oc, lse_c, seed, off = res[0], res[1], res[6], res[7]
    gc = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(do, q, k, v, oc, lse_c, seed, off, None, None,
                                                                      None, S, S, 0.0, True)
    cudnn = err((oc,) + tuple(gc), r0)
    assert all(f <= 1.5 * c + 1e-3 for f, c in zip(flash, cudnn)), (flash, cudnn)
    bits = fa.attention_dropout_bits(B, H, S, 0.1, fa.attention_seed(dev))
    keep = fa.unpack_keep(bits, S).view(B, H, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    assert abs(keep[:, :, causal].float().mean().item() - 0.9) < 0.002
    o, lse, bits = fa.flash_attention_forward(q, k, v, 0.1, bits)
    drop = err((o,) + fa.flash_attention_backward(do, q, k, v, o, lse, bits, 0.1), ref(0.1, keep))
    assert all(f <= 2.0 * c + 1e-3 for f, c in zip(drop, cudnn)), (drop, cudnn)  # values scaled by 1 / 0.9
