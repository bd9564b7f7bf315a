"""Triton kernels for two hot spots: the sampler's decode attention and the training step's dropout masks.

**Decode attention** - one query per (row, head) attending over a KV cache prefix.

A decode step of reAR-B (batch 128 with CFG = 256 rows, 16 heads) reads the whole K/V prefix of every row and
layer: about 2.4 GB per step at the mean prefix of 129 positions, the largest memory traffic of sampling.
FlexAttention's compiled decode kernel spent 53% of the step there at about 42% of the H200's bandwidth, and
it needs attention-window buckets (one CUDA graph each) so that early steps do not read the whole cache.

:func:`decode_attention` reads exactly the prefix ``[0, pos]`` (the length comes from a device tensor, so one
CUDA graph serves every step) with one program per (row, head) and an online softmax accumulated in float32,
as flash-decoding does (Dao et al.). It is registered as the custom op ``rearlib::decode_attention`` so that
``torch.compile`` keeps it in a full graph. :func:`decode_attention_reference` is the same function in plain
PyTorch, used by the tests (the kernel itself also runs on CPU tensors under ``TRITON_INTERPRET=1``).

**Dropout masks** - reAR-B draws 151M dropout decisions per block and training step (batch 128: after the
attention projection, after the GELU and after fc2). :func:`dropout_keep_mask` makes them from every Philox-4x32-10
call (``tl.randint4x``): four 32-bit words, each split into two 16-bit uniform draws, so eight decisions per call.
The kernel is bound by Philox's arithmetic, not by its stores: on an H200 the 3.65G decisions of a reAR-B step took
4.14 ms with one decision per word and 2.37 ms with two (reports/small/bench/train_fused_blocks_tuning.json).
:func:`dropout` applies the mask as ``x * keep / (1 - p)``, a multiply Inductor fuses into the neighbouring kernels.
The fused block stack (:mod:`rearlib.kernels.fused_blocks`) reads the same kind of decisions packed one bit each
(:func:`dropout_keep_bits`, :func:`pack_keep`, :func:`unpack_keep`): 1.87 against 2.41 ms per reAR-B step for the
mask kernel, and an eighth of the mask bytes for its memory-bound kernels (measured on an H200, see
docs/performance.md and reports/small/bench/dropout_bits_ab_run2.json).
The distribution is that of ``nn.Dropout`` up to the 16-bit resolution of p: each element is kept independently
with probability 1 - round(65536 p) / 65536 (:func:`keep_threshold`; 0.89999390 for p = 0.1). The random stream
differs, and the kernel's seed comes from torch's CUDA generator, so ``torch.manual_seed`` and checkpointed RNG
states reproduce it.

Measured on an H200 (torch 2.11, reports/small/bench/): in the compiled reAR-B training step the kernels that
carry dropout took 44.1 ms per step with Inductor's own random numbers and 37.3 ms with these masks, mask kernel
included, and AR training went from 743 to 762 samples/s. In isolation (one compiled GELU + dropout at the same
size) Inductor's version was the faster one, 0.80 against 0.98 ms forward and backward: the gain is a property of
the fused kernels of the whole step, not of the mask kernel alone.
"""

from __future__ import annotations

import torch

__all__ = ["decode_attention", "decode_attention_reference", "dropout", "dropout_keep_mask", "dropout_keep_bits",
           "pack_keep", "unpack_keep", "keep_threshold",
           "register_ops", "triton_available", "KERNEL_CONFIG", "DROPOUT_BLOCK", "DROPOUT_KERNELS"]

#: Launch configuration. Measured on an H200 (reAR-B decode shapes, see reports/small/bench/); ``block_n`` keys
#: per loop iteration.
KERNEL_CONFIG = {"block_n": 16, "num_warps": 1, "num_stages": 2}
#: Philox calls per program of the dropout-mask kernel (each gives eight mask elements, two per 32-bit word).
DROPOUT_BLOCK = 1024
#: Words (32 decisions, four Philox calls) per program of the packed dropout-mask kernel.
DROPOUT_BITS_BLOCK = 256
#: Where :func:`dropout` takes its masks from: "auto" = this module's kernel on CUDA, "torch" = F.dropout.
DROPOUT_KERNELS = ("auto", "torch")

try:  # Triton ships with CUDA builds of torch; CPU-only installs run without this kernel.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def triton_available() -> bool:
    return triton is not None


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """softmax(q k[:, :, :pos+1]^T * scale) v[:, :, :pos+1] in float32; q [B, H, 1, D], k/v [B, H, L, D]."""
    n = int(pos.reshape(-1)[0]) + 1
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k[:, :, :n].float().transpose(-1, -2)) * scale
    return (torch.softmax(s, dim=-1) @ v[:, :, :n].float()).to(v.dtype)


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, scale,
                                 s_qb, s_qh, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh,
                                 H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        n_keys = tl.load(pos_ptr).to(tl.int32) + 1
        d = tl.arange(0, DP)  # DP = D rounded up to a power of two (reAR's heads are 48 wide)
        d_ok = d < D
        # (the cast: under torch.compile the float scale arrives as float64)
        q = (tl.load(q_ptr + b * s_qb + h * s_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale).to(tl.float32)
        k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
        v_base = v_ptr + b.to(tl.int64) * s_vb + h * s_vh
        m = tl.full([1], float("-inf"), tl.float32)
        l_sum = tl.zeros([1], tl.float32)
        acc = tl.zeros([DP], tl.float32)
        offs = tl.arange(0, BLOCK_N)
        for start in range(0, n_keys, BLOCK_N):
            n = start + offs
            valid = n < n_keys
            ok = valid[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None] * s_kn + d[None, :], mask=ok, other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_base + n[:, None] * s_vn + d[None, :], mask=ok, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            l_sum = l_sum * alpha + tl.sum(p, 0)
            m = m_new
        tl.store(o_ptr + b * s_ob + h * s_oh + d, (acc / l_sum).to(o_ptr.dtype.element_ty), mask=d_ok)

    def _launch(q, k, v, pos, scale, out, launcher):
        B, H, _, D = q.shape
        cfg = KERNEL_CONFIG
        launcher(_decode_attention_kernel)[(B * H,)](
            q, k, v, out, pos, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), H=H, D=D, DP=triton.next_power_of_2(D), BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        return out

    @triton.jit
    def _philox_key(seed_ptr):
        # Two 31-bit draws make one 62-bit Philox key (see _dropout_seed).
        return tl.load(seed_ptr).to(tl.int64) * 2147483648 + tl.load(seed_ptr + 1).to(tl.int64)

    @triton.jit
    def _bit(draw, thresh, t: tl.constexpr):
        return (draw.to(tl.int32) >= thresh).to(tl.int32) << t

    @triton.jit
    def _philox_byte(key, c0, c1, thresh):
        # One Philox-4x32-10 call at counter (c0, c1, 0, 0): four words split into eight 16-bit draws, decision t
        # (draw >= thresh: kept) in bit t of the result.
        z = c0 * 0
        r0, r1, r2, r3 = tl.random.philox(key, c0, c1, z, z)
        return (_bit(r0 & 0xFFFF, thresh, 0) | _bit(r0 >> 16, thresh, 1) | _bit(r1 & 0xFFFF, thresh, 2)
                | _bit(r1 >> 16, thresh, 3) | _bit(r2 & 0xFFFF, thresh, 4) | _bit(r2 >> 16, thresh, 5)
                | _bit(r3 & 0xFFFF, thresh, 6) | _bit(r3 >> 16, thresh, 7))

    @triton.jit
    def _keep_bits_kernel(out_ptr, seed_ptr, nwords, thresh, BLOCK: tl.constexpr):
        # Word j holds elements 32 j .. 32 j + 31; its byte b comes from the Philox call at counter 4 j + b (a
        # 64-bit counter split into (c0, c1)).
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        key = _philox_key(seed_ptr)
        c = 4 * j
        c0 = (c & 0xFFFFFFFF).to(tl.uint32)
        c1 = (c >> 32).to(tl.uint32)
        word = (_philox_byte(key, c0, c1, thresh) | (_philox_byte(key, c0 + 1, c1, thresh) << 8)
                | (_philox_byte(key, c0 + 2, c1, thresh) << 16) | (_philox_byte(key, c0 + 3, c1, thresh) << 24))
        tl.store(out_ptr + j, word, mask=j < nwords)

    @triton.jit
    def _store_halves(out_ptr, base, n, word, thresh, BLOCK: tl.constexpr):
        # The low and the high 16 bits of one Philox word are two independent uniform draws in [0, 65536).
        tl.store(out_ptr + base, (word & 0xFFFF).to(tl.int32) >= thresh, mask=base < n)
        tl.store(out_ptr + base + BLOCK, (word >> 16).to(tl.int32) >= thresh, mask=base + BLOCK < n)

    @triton.jit
    def _keep_mask_kernel(out_ptr, seed_ptr, n, thresh, BLOCK: tl.constexpr):
        # Program i covers elements [8 BLOCK i, 8 BLOCK (i + 1)): Philox counter c = BLOCK i + lane gives the four
        # words whose halves are elements lane + {0, ..., 7} BLOCK, so each of the eight stores is contiguous.
        pid = tl.program_id(0)
        lane = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(_philox_key(seed_ptr), pid * BLOCK + lane)
        base = pid.to(tl.int64) * (8 * BLOCK) + lane
        _store_halves(out_ptr, base, n, r0, thresh, BLOCK)
        _store_halves(out_ptr, base + 2 * BLOCK, n, r1, thresh, BLOCK)
        _store_halves(out_ptr, base + 4 * BLOCK, n, r2, thresh, BLOCK)
        _store_halves(out_ptr, base + 6 * BLOCK, n, r3, thresh, BLOCK)

    def _launch_keep_mask(out, seed, p, launcher):
        n = out.numel()
        launcher(_keep_mask_kernel)[(triton.cdiv(n, 8 * DROPOUT_BLOCK),)](out, seed, n, keep_threshold(p),
                                                                          BLOCK=DROPOUT_BLOCK, num_warps=4)
        return out


_OPS_REGISTERED = False


def register_ops() -> bool:
    """Register the custom ops ``rearlib::decode_attention`` and ``rearlib::dropout_keep_mask`` (once; False without
    Triton). Done on first use rather than at import: ``torch.library.triton_op`` imports TorchInductor (about 2 s),
    which CPU users of the model need not pay. Call it outside ``torch.compile`` before the first compiled call
    (the model's layers and the sampler do)."""
    global _OPS_REGISTERED
    if _OPS_REGISTERED or triton is None:
        return triton is not None

    @torch.library.triton_op("rearlib::decode_attention", mutates_args=())
    def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                             scale: float) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=v.dtype, device=q.device)
        return _launch(q, k, v, pos, scale, out, torch.library.wrap_triton)

    @torch.library.triton_op("rearlib::dropout_keep_mask", mutates_args=())
    def _keep_mask_op(shape: list[int], seed: torch.Tensor, p: float) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.bool, device=seed.device)
        return _launch_keep_mask(out, seed, p, torch.library.wrap_triton)

    _OPS_REGISTERED = True
    return True


def keep_threshold(p: float) -> int:
    """The mask kernel keeps an element when its 16-bit draw is >= this: round(65536 p), so the keep probability
    is 1 - round(65536 p) / 65536, within 2^-17 of 1 - p (0.1 -> 0.89999390)."""
    return int(round(p * 65536))


def _dropout_seed(device: torch.device, n: int | None = None) -> torch.Tensor:
    """Philox keys of the mask kernels: two draws in [0, 2^31) from torch's generator for ``device`` (a traceable
    op, so no host sync), int64 [2], or [n, 2] for n keys from one draw."""
    return torch.randint(0, 2 ** 31, (2,) if n is None else (n, 2), device=device, dtype=torch.int64)


def dropout_keep_mask(shape, p: float, device: torch.device | str = "cuda", *,
                      seed: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of ``shape``, each element True (kept) independently with probability 1 - p (to 2^-17, see
    :func:`keep_threshold`).

    ``seed``: int64 tensor of two values in [0, 2^31) on ``device`` (default: drawn from torch's generator).
    Needs Triton and a CUDA device (see :func:`dropout_keep_mask_interpreted` for CPU tests).
    """
    if triton is None:
        raise RuntimeError("dropout_keep_mask needs Triton; use torch.nn.functional.dropout")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    register_ops()
    seed = _dropout_seed(torch.device(device)) if seed is None else seed
    return torch.ops.rearlib.dropout_keep_mask([int(d) for d in shape], seed, float(p))


def dropout_keep_mask_interpreted(shape, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The mask kernel launched directly on CPU tensors (needs ``TRITON_INTERPRET=1`` before Triton's import)."""
    if triton is None:
        raise RuntimeError("needs Triton")
    out = torch.empty(list(shape), dtype=torch.bool, device=seed.device)
    return _launch_keep_mask(out, seed, float(p), lambda kern: kern)


def dropout_keep_bits(n: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``n`` dropout decisions packed 32 per word: int32 [ceil(n / 32)], bit t of word j = element 32 j + t kept
    (probability 1 - round(65536 p) / 65536, :func:`keep_threshold`), drawn on ``seed``'s device.

    The fused block stack reads these instead of :func:`dropout_keep_mask`'s bytes: its GELU and site kernels are
    bound by memory traffic, and a bit per decision is an eighth of the mask bytes they read. Word j's byte b is
    the Philox-4x32-10 call at counter 4 j + b (key ``seed``, two values in [0, 2^31); see
    :func:`_dropout_seed`), each call's four words split into eight 16-bit draws, draw t -> bit t. CUDA tensors,
    or CPU tensors under ``TRITON_INTERPRET=1`` (tests). :func:`pack_keep` / :func:`unpack_keep` convert."""
    if triton is None:
        raise RuntimeError("dropout_keep_bits needs Triton")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    words = -(-int(n) // 32)
    out = torch.empty(words, dtype=torch.int32, device=seed.device)
    _keep_bits_kernel[(triton.cdiv(words, DROPOUT_BITS_BLOCK),)](out, seed, words, keep_threshold(p),
                                                                 BLOCK=DROPOUT_BITS_BLOCK, num_warps=4)
    return out


def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask (any shape, read in row-major order) as :func:`dropout_keep_bits` words: int32 [ceil(n / 32)]."""
    flat = keep.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 32)]).view(-1, 32)
    words = (flat << torch.arange(32, device=flat.device)).sum(1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_keep(words: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_keep`: the first prod(shape) decisions of ``words`` as a bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    bits = (words.reshape(-1, 1) >> torch.arange(32, device=words.device, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:n].view(*shape).bool()


def dropout(x: torch.Tensor, p: float, training: bool = True, kernel: str = "auto") -> torch.Tensor:
    """Inverted dropout, ``x * keep / (1 - p)``: as ``F.dropout(x, p, training)``, with the mask from
    :func:`dropout_keep_mask` when ``kernel`` is "auto" and ``x`` is a CUDA tensor (Triton available), else from
    ``F.dropout`` itself (CPU, or ``kernel="torch"``)."""
    if kernel not in DROPOUT_KERNELS:
        raise ValueError(f"dropout kernel must be one of {DROPOUT_KERNELS}, got {kernel!r}")
    if not training or p == 0.0:
        return x
    if kernel == "torch" or triton is None or x.device.type != "cuda":
        return torch.nn.functional.dropout(x, p, True)
    keep = dropout_keep_mask(x.shape, p, x.device)
    return x * keep * (1.0 / (1.0 - p))


def _check(q, k, v, pos):
    if q.dim() != 4 or q.shape[2] != 1 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"decode_attention needs q [B, H, 1, D] and k/v [B, H, L, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention needs a unit stride in the head dimension")
    if pos.numel() != 1:
        raise ValueError(f"pos must hold one position, got shape {tuple(pos.shape)}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of one query per (row, head) over cache positions ``[0, pos]`` (keys after ``pos`` unread).

    q [B, H, 1, D] (any float dtype), k/v [B, H, L, D] with L > pos, pos an integer tensor with one element on
    the same device. Returns [B, H, 1, D] in v's dtype; scores, softmax and the weighted sum are float32.
    Needs Triton (CUDA builds of torch); raises RuntimeError otherwise.
    """
    if triton is None:
        raise RuntimeError("decode_attention needs Triton; use another decode attention kernel")
    _check(q, k, v, pos)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    register_ops()
    return torch.ops.rearlib.decode_attention(q, k, v, pos, scale)


def decode_attention_interpreted(q, k, v, pos, scale: float | None = None) -> torch.Tensor:
    """Run the kernel directly (no custom op); with ``TRITON_INTERPRET=1`` set before Triton is imported this
    executes it on CPU tensors - how the tests check the kernel's arithmetic without a GPU."""
    if triton is None:
        raise RuntimeError("needs Triton")
    _check(q, k, v, pos)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=v.dtype, device=q.device)
    return _launch(q, k, v, pos, scale, out, lambda kern: kern)
