"""The sampler's Triton decode-attention kernel, the one-GEMM adaLN of a decode step, and the FID CLI's loader."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from philox_reference import kept
from rearlib.kernels.ops import decode_attention_reference, keep_threshold, pack_keep, triton_available, unpack_keep
from rearlib.model import build_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def test_reference_reads_only_the_prefix():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (1, 10, 10))
    pos = torch.tensor([4])
    out = decode_attention_reference(q, k, v, pos)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:], v2[:, :, 5:] = 1e4, -1e4  # keys after pos must not matter
    assert torch.equal(decode_attention_reference(q, k2, v2, pos), out)
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_triton_kernel_matches_the_reference_in_the_interpreter():
    """The kernel's own arithmetic, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1 must be set
    before Triton is imported, hence the subprocess): head widths 16 and 48 (reAR's, not a power of two), the
    first, a middle and the last position, garbage after pos, bf16 cache."""
    code = textwrap.dedent("""
        import torch
        from rearlib.kernels.ops import decode_attention_interpreted, decode_attention_reference
        g = torch.Generator().manual_seed(0)
        worst = 0.0
        for B, H, L, D, p in [(2, 2, 20, 16, 0), (2, 3, 40, 48, 17), (1, 2, 40, 48, 39)]:
            q = torch.randn(B, H, 1, D, generator=g)
            k = torch.randn(B, H, L, D, generator=g).bfloat16()
            v = torch.randn(B, H, L, D, generator=g).bfloat16()
            k[:, :, p + 1:] = 1e4
            v[:, :, p + 1:] = float("nan")
            pos = torch.tensor([p])
            out = decode_attention_interpreted(q, k, v, pos)
            assert out.shape == (B, H, 1, D) and out.dtype == torch.bfloat16
            worst = max(worst, (out.float() - decode_attention_reference(q, k, v, pos).float()).abs().max().item())
        print("worst", worst)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    worst = float(r.stdout.split("worst")[-1])
    assert worst < 1e-2  # one bf16 rounding of outputs of magnitude < 2


def test_triton_kernel_input_checks():
    from rearlib.kernels.ops import _check
    q, kv = torch.zeros(2, 3, 1, 8), torch.zeros(2, 3, 10, 8)
    _check(q, kv, kv, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"q \[B, H, 1, D\]"):
        _check(torch.zeros(2, 3, 2, 8), kv, kv, torch.tensor([3]))
    with pytest.raises(ValueError, match="one position"):
        _check(q, kv, kv, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="unit stride"):
        _check(q, kv.transpose(2, 3).contiguous().transpose(2, 3), kv, torch.tensor([3]))


def test_triton_attention_needs_cuda():
    from rearlib.sample import _FastDecoder
    m = build_generator("tiny").eval()
    with pytest.raises(ValueError, match="triton"):
        _FastDecoder(m, 2, use_cfg=False, top_k=None, top_p_on=False, greedy=False, dtype=torch.float32,
                     compile_step=False, kv_buckets=1, use_graphs=False, attention="triton")


def test_one_gemm_adaln_equals_per_block_modulation():
    """decode_step(block_adaln=stacked_block_adaln()) computes what the per-block adaLN Linears compute."""
    m = build_generator("tiny")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    m.eval()
    W, b = m.stacked_block_adaln()
    C, D = m.config.hidden, m.config.depth
    assert W.shape == (D * 6 * C, C) and b.shape == (D * 6 * C,)
    classes = torch.tensor([1, 4, m.null_class])
    prefix = torch.randint(0, m.config.codebook_size, (3, 5), generator=g)
    outs = []
    for adaln in (None, (W, b)):
        cache = m.new_kv_cache(3)
        with torch.no_grad():
            m.prefill(prefix[:, :4], classes, cache)
            outs.append(m.decode_step(prefix[:, 4], torch.tensor([6]), classes, cache, block_adaln=adaln))  # x_5 sits at position 6
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = m.next_token_logits(prefix, classes)
    torch.testing.assert_close(outs[1], ref, rtol=1e-4, atol=1e-4)


def test_fid_cli_loads_every_generator_format(tmp_path):
    from rearlib.sample import _load_any_generator
    shipped = REPO / "data" / "checkpoints" / "generator_small_rear_seed0.pt"
    m = _load_any_generator(str(shipped), None, torch.device("cpu"))
    assert m.config.depth == 8 and not m.training
    official = tmp_path / "official.pt"
    torch.save(build_generator("tiny").state_dict(), official)
    assert _load_any_generator(str(official), "tiny", torch.device("cpu")).config.hidden == 64
    bad = tmp_path / "bad.pt"
    torch.save({"nothing": torch.zeros(1)}, bad)
    with pytest.raises(SystemExit, match="rearlib.train.*\n.*zoo.*\n.*official"):
        _load_any_generator(str(bad), None, torch.device("cpu"))


def test_deterministic_compile_excludes_a_compile_mode():
    from rearlib.sample import _FastDecoder
    m = build_generator("tiny").eval()
    with pytest.raises(ValueError, match="deterministic"):
        _FastDecoder(m, 2, use_cfg=False, top_k=None, top_p_on=False, greedy=False, dtype=torch.float32,
                     compile_step=True, kv_buckets=1, use_graphs=False, deterministic=True,
                     compile_mode="max-autotune")


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_dropout_mask_kernel_in_the_interpreter():
    """The mask kernel on CPU through Triton's interpreter: keep rate 1 - p within 5 binomial sigmas for three p,
    a fixed seed gives a fixed mask, another seed an independent one, a length that is not a multiple of the
    program size extends the mask without changing its prefix, and p = 0 keeps everything."""
    code = textwrap.dedent("""
        import torch
        from rearlib.kernels.ops import dropout_keep_mask_interpreted as mask
        seed = torch.tensor([12345, 678], dtype=torch.int64)
        n = 3 * 4096 + 77
        for p in (0.1, 0.5, 0.9):
            m = mask((3, n // 3), p, seed) if n % 3 == 0 else mask((n,), p, seed)
            sigma = (p * (1 - p) / n) ** 0.5
            assert m.dtype == torch.bool and m.numel() == n
            assert abs(m.float().mean().item() - (1 - p)) < 5 * sigma, (p, m.float().mean())
        a = mask((n,), 0.1, seed)
        assert torch.equal(a, mask((n,), 0.1, seed))
        b = mask((n,), 0.1, torch.tensor([12345, 679]))
        agree = (a == b).float().mean().item()
        assert abs(agree - (0.9 ** 2 + 0.1 ** 2)) < 0.02, agree  # independent streams
        assert torch.equal(mask((n + 5000,), 0.1, seed)[:n], a)
        assert mask((4, 33), 0.0, seed).all()
        # no correlation between the four words of one Philox call (elements i and i + 1024 of a program)
        x = mask((8 * 4096,), 0.5, seed).view(8, 4, 1024).float()
        c = ((x[:, 0] - 0.5) * (x[:, 1] - 0.5)).mean().item() / 0.25
        assert abs(c) < 5 / (8 * 1024) ** 0.5, c
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_pack_keep_round_trips_and_orders_bits():
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 12), (3, 32), (1,), (5, 33)]:
        keep = torch.rand(shape, generator=g) >= 0.3
        words = pack_keep(keep)
        assert words.dtype == torch.int32 and words.numel() == -(-keep.numel() // 32)
        assert torch.equal(unpack_keep(words, shape), keep)
    one = torch.zeros(70, dtype=torch.bool)
    one[[33, 31]] = True
    assert pack_keep(one).tolist() == [-2 ** 31, 2, 0]  # element 32 j + t is bit t of word j


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_packed_dropout_bits_follow_philox_in_the_interpreter():
    """dropout_keep_bits (several programs, a length that is not a multiple of 32) against an independent numpy
    Philox-4x32-10 at the documented counters (word j, byte b: counter 4 j + b; draw t of a call -> bit 8 b + t);
    p = 0 keeps everything."""
    code = textwrap.dedent("""
        import torch
        import rearlib.kernels.ops as kernels
        kernels.DROPOUT_BITS_BLOCK = 16
        w = kernels.dropout_keep_bits(3000, 0.3, torch.tensor([1234567, 89]))
        assert w.dtype == torch.int32 and w.numel() == 94
        assert kernels.unpack_keep(kernels.dropout_keep_bits(100, 0.0, torch.tensor([1, 2])), (100,)).all()
        print("keep", kernels.unpack_keep(w, (3000,)).to(torch.uint8).tolist())
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = np.array(eval(r.stdout.split("keep")[-1]), dtype=bool)
    e = np.arange(3000)
    c0 = (4 * (e // 32) + (e % 32) // 8).astype(np.uint64)
    expected = kept(c0, np.zeros_like(c0), 1234567 * 2 ** 31 + 89, e % 8, keep_threshold(0.3))
    assert np.array_equal(got, expected)
    assert 0.65 < got.mean() < 0.75


def test_dropout_routes_cpu_to_torch_and_checks_arguments():
    from rearlib.kernels.ops import dropout, dropout_keep_mask
    x = torch.randn(64, 32)
    torch.manual_seed(0)
    got = dropout(x, 0.25, training=True)
    torch.manual_seed(0)
    torch.testing.assert_close(got, torch.nn.functional.dropout(x, 0.25, True), rtol=0, atol=0)
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0, training=True) is x
    with pytest.raises(ValueError, match="dropout kernel"):
        dropout(x, 0.1, kernel="fast")
    if triton_available():
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            dropout_keep_mask((4,), 1.0, "cpu")
    with pytest.raises(ValueError, match="dropout_kernel"):
        build_generator("tiny", dropout_kernel="philox")


def test_head_precision_follows_autocast_only_in_training():
    """Training under bf16 autocast gives bf16 logits (the authors' code); eval keeps the float32 head (CFG)."""
    m = build_generator("tiny")
    tokens = torch.randint(0, m.config.codebook_size, (2, 6))
    classes = torch.tensor([0, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.train()(tokens, classes).logits.dtype == torch.bfloat16
        assert m.eval()(tokens, classes).logits.dtype == torch.float32
    assert m.train()(tokens, classes).logits.dtype == torch.float32


def test_fid_decode_runs_without_tf32_and_restores_the_flags():
    from rearlib.sample import _no_tf32
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with _no_tf32():
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton")
def test_dropout_kernel_on_gpu_eager_and_compiled():
    """On CUDA: keep rate 1 - p, kept values scaled by 1 / (1 - p), gradient = mask / (1 - p), the same mask again
    after the same torch.manual_seed, both eagerly and under torch.compile; a compiled training step with it."""
    from rearlib.kernels.ops import dropout
    # Not a multiple of the program size. Nonzero values: ``y != 0`` below marks the kept elements, and CUDA's randn
    # gives exact zeros (a uniform draw of 1.0) often enough at 3M elements to fail ~1 run in 10.
    x = (torch.rand(1000, 3077, device="cuda") + 0.5).requires_grad_(True)
    sigma = (0.1 * 0.9 / x.numel()) ** 0.5
    compiled = torch.compile(lambda t: dropout(t, 0.1, True))
    for fn in (lambda t: dropout(t, 0.1, True), compiled):
        torch.manual_seed(5)
        y = fn(x)
        torch.manual_seed(5)
        assert torch.equal(y, fn(x))
        keep = y != 0
        assert abs(keep.float().mean().item() - 0.9) < 5 * sigma
        torch.testing.assert_close(y[keep], x[keep] / 0.9)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(g, keep.float() / 0.9)
    m = build_generator("tiny").cuda().train()
    step = torch.compile(lambda t, c: m(t, c).logits.float().logsumexp(-1).mean())
    tokens = torch.randint(0, m.config.codebook_size, (8, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step(tokens, torch.arange(8, device="cuda") % 10)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and Triton")
def test_packed_mask_kernels_on_gpu_follow_philox():
    """The compiled (not interpreted) mask kernels of the training stack against the numpy Philox reference: the
    packed dropout words (several programs, a ragged end) and the causal attention-dropout words (S = 258, two
    layers from one launch)."""
    import rearlib.kernels.flash_attention as fa
    from rearlib.kernels.ops import dropout_keep_bits

    dev = torch.device("cuda")
    n = 100_003
    got = unpack_keep(dropout_keep_bits(n, 0.1, torch.tensor([987654, 321], device=dev)), (n,)).cpu().numpy()
    e = np.arange(n)
    c0 = (4 * (e // 32) + (e % 32) // 8).astype(np.uint64)
    assert np.array_equal(got, kept(c0, np.zeros_like(c0), 987654 * 2 ** 31 + 321, e % 8, keep_threshold(0.1)))

    B, H, S = 2, 3, 258
    seeds = [(5, 6), (2 ** 31 - 1, 12345)]
    keep = fa.unpack_keep(fa.attention_dropout_bits(B, H, S, 0.1, torch.tensor(seeds, device=dev)), S).cpu().numpy()
    i, j = np.tril_indices(S)
    c0 = ((i * (-(-S // 32)) + j // 32) * 4 + (j % 32) // 8).astype(np.uint64)
    for layer, (a, b) in enumerate(seeds):
        for bh in range(B * H):
            want = kept(c0, np.full_like(c0, bh), a * 2 ** 31 + b, (j % 32) % 8, keep_threshold(0.1))
            assert np.array_equal(keep[layer, bh][i, j], want), (layer, bh)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fid_decode_does_not_depend_on_the_row_on_gpu():
    """With TF32 off (as FID generation decodes), an image decodes to the same pixels at any row of the batch."""
    from rearlib.sample import _no_tf32
    from rearlib.tokenizers import get_tokenizer
    tok = get_tokenizer("small", torch.device("cuda"), progress=False)
    t = torch.randint(0, tok.codebook_size, (16, 256), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad(), _no_tf32():
        a = tok.decode(t)
        b = tok.decode(torch.roll(t, 1, 0)).roll(-1, 0)
    assert torch.equal(a, b)
