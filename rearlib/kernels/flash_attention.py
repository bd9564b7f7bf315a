"""Causal attention with attention dropout for the training step, as Triton kernels (forward and backward).

reAR's blocks attend over S = 258 positions with 16 heads of d = 48. At that shape cuDNN's fused attention (the
kernel behind ``scaled_dot_product_attention``) reaches about 33 TFLOP/s on an H200: 22.8 ms of a 148 ms reAR-B
step (reports/small/bench/train_fused_blocks_tuning.json). These kernels compute the same function with the
FlashAttention-2 schedule (Dao, 2023; the Triton tutorial's split of the backward into a dK/dV and a dQ phase in
one program): scores and softmax statistics in float32, probabilities rounded to the input dtype for the two
value products, the head dimension padded to a power of two inside the tile (48 -> 64).

Layouts: ``q``, ``k``, ``v`` and ``do`` are [B, H, S, d] views with a unit stride in d and any other strides, so
the block stack passes its [B, S, H, d] QK-norm outputs and the v columns of the qkv GEMM output without copies;
the output and the gradients are written as [B, S, H, d] (the row layout the projection GEMMs and the QK-norm
backward read) and returned as [B, H, S, d] views of it. The log-sum-exp is kept in base 2.

**Attention dropout.** Each probability is kept with probability 1 - round(65536 p) / 65536 (16-bit draws, as
:func:`rearlib.kernels.keep_threshold`) and the kept ones are scaled by 1 / (1 - p); the softmax normaliser is
that of the undropped probabilities, as in ``F.dropout(softmax(s))``. :func:`attention_dropout_bits` draws the
decisions of a step once (all blocks in one launch; Philox-4x32-10, key ``seed``, counter ((i * ceil(S / 32) + w)
* 4 + byte, b * H + h), eight 16-bit draws per call) and packs them 32 per int32 word, key 32 w + t in bit t of
word (b * H + h, i, w); the forward and the backward read one or two words per row and key tile.
:func:`unpack_keep` expands them to a bool mask (tests).
The random stream differs from cuDNN's; the distribution is the same up to the 16-bit resolution of p.

CPU runs execute the kernels under Triton's interpreter (CPU tensors with ``TRITON_INTERPRET=1``);
:func:`attention_reference` is the same function in plain PyTorch for the tests.
"""

from __future__ import annotations

import math

import torch

from rearlib.kernels.ops import _dropout_seed, keep_threshold, triton

if triton is not None:  # triton is optional (CPU installs lack it); ops defines its Philox helpers only with it
    import triton.language as tl

    from rearlib.kernels.ops import _philox_byte, _philox_key

__all__ = ["flash_attention_forward", "flash_attention_backward", "attention_dropout_bits", "unpack_keep",
           "attention_reference", "attention_seed", "FLASH_CONFIG"]

#: Tiles and launch settings. Forward: ``fwd_m`` query rows per program, ``fwd_n`` keys per loop step. Backward:
#: each program owns ``bwd_tile`` keys (dK, dV: loop over query tiles of ``bwd_loop``) and then ``bwd_tile``
#: queries (dQ: loop over key tiles of ``bwd_loop``), so the causal work per program is balanced; with
#: ``atomic_dq`` the dQ contributions are added in the first loop instead. ``fwd_tail`` / ``bwd_tail``: query rows
#: per tile for the ragged end past the last full ``fwd_m`` / ``bwd_loop`` tile (S = 258 leaves 2 rows; the
#: backward uses it with dropout only). ``bits_*``: words per program and warps of the mask kernel.
#: Chosen from a sweep on an H200 at reAR-B shapes (reports/small/bench/attention_flash_micro.json).
FLASH_CONFIG = {"fwd_m": 64, "fwd_n": 32, "fwd_warps": 4, "fwd_stages": 3, "fwd_tail": 16,
                "bwd_tile": 64, "bwd_loop": 64, "bwd_tail": 16, "bwd_warps": 4, "bwd_stages": 2, "delta_rows": 64,
                "atomic_dq": True, "bits_block": 128, "bits_warps": 2}

_LOG2E = 1.4426950408889634


def attention_seed(device, n: int | None = None) -> torch.Tensor:
    """Philox keys for the dropout masks: int64 [2] (or [n, 2]: one key per call, from one launch) of draws in
    [0, 2^31) from torch's generator on ``device`` (no host sync; ``torch.manual_seed`` reproduces them)."""
    return _dropout_seed(device, n)


if triton is not None:
    @triton.jit
    def _bits_kernel(out_ptr, seed_ptr, S, NW, BH, T, thresh, BLOCK: tl.constexpr):
        # Program (f tile, layer * BH + bh). Only the T words a causal attention reads are drawn: rows 32 g ..
        # 32 g + 31 need words 0 .. g, so word number f (row-major over that triangle) lies in row group g with
        # 16 g (g + 1) <= f < 16 (g + 1) (g + 2). Word w of row i holds keys 32 w .. 32 w + 31, byte j of it from
        # the Philox call with counter ((i * NW + w) * 4 + j, b * H + h).
        f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        lbh = tl.program_id(1)
        layer = lbh // BH
        bh = lbh % BH
        g = ((tl.sqrt(1.0 + f.to(tl.float32) * 0.25) - 1.0) * 0.5).to(tl.int32)
        g = tl.where(16 * (g + 1) * (g + 2) <= f, g + 1, g)  # float rounding: at most one off either way
        g = tl.where(16 * g * (g + 1) > f, g - 1, g)
        r = f - 16 * g * (g + 1)
        rows = 32 * g + r // (g + 1)
        w = r - (rows - 32 * g) * (g + 1)
        key = _philox_key(seed_ptr + 2 * layer)
        c0 = ((rows * NW + w) * 4).to(tl.uint32)
        c1 = c0 * 0 + bh.to(tl.uint32)
        word = (_philox_byte(key, c0, c1, thresh) | (_philox_byte(key, c0 + 1, c1, thresh) << 8)
                | (_philox_byte(key, c0 + 2, c1, thresh) << 16) | (_philox_byte(key, c0 + 3, c1, thresh) << 24))
        tl.store(out_ptr + lbh.to(tl.int64) * S * NW + rows * NW + w, word, mask=f < T)

    @triton.jit
    def _keep(mbase, rows, start_n, NW, rm, BN: tl.constexpr):
        # Decisions of keys [start_n, start_n + BN) (BN <= 64, start_n a multiple of BN) for ``rows``: one or two
        # 32-bit words per row, loaded as row vectors and broadcast, so the tile needs no gather.
        c = start_n % 32 + tl.arange(0, BN)
        w0 = tl.load(mbase + rows * NW + start_n // 32, mask=rm, other=0)
        if BN > 32:
            w1 = tl.load(mbase + rows * NW + start_n // 32 + 1, mask=rm, other=0)
            w = tl.where(c[None, :] < 32, w0[:, None], w1[:, None])
        else:
            w = w0[:, None]
        return ((w >> (c % 32)[None, :]) & 1) != 0

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr,
                    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                    S, row0, qk_scale, inv_keep,
                    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    DROPOUT: tl.constexpr):
        start_m = row0 + tl.program_id(0) * BM
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        rows = start_m + tl.arange(0, BM)
        dd = tl.arange(0, DP)
        dm = dd < D
        rm = rows < S
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + dd[None, :], mask=rm[:, None] & dm[None, :],
                    other=0.0)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        NW = (S + 31) // 32
        mbase = mask_ptr + bh.to(tl.int64) * S * NW
        for start_n in range(0, tl.minimum(start_m + BM, S), BN):
            cols = start_n + tl.arange(0, BN)
            cm = cols < S
            k = tl.load(k_base + cols[:, None] * sks + dd[None, :], mask=cm[:, None] & dm[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            valid = (cols[None, :] <= rows[:, None]) & cm[None, :]
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_keep(mbase, rows, start_n, NW, rm, BN), p, 0.0)
            v = tl.load(v_base + cols[:, None] * svs + dd[None, :], mask=cm[:, None] & dm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc * (inv_keep / l_i)[:, None]
        tl.store(o_ptr + b * sob + h * soh + rows[:, None] * sos + dd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rm[:, None] & dm[None, :])
        tl.store(lse_ptr + bh.to(tl.int64) * S + rows, m_i + tl.log2(l_i), mask=rm)

    @triton.jit
    def _delta_kernel(o_ptr, do_ptr, delta_ptr, sob, soh, sos, sdb, sdh, sds, S,
                      H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
        # delta_i = sum_d dO_id O_id: the softmax backward's row term (O includes the dropout).
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        dd = tl.arange(0, DP)
        m = (rows < S)[:, None] & (dd < D)[None, :]
        o = tl.load(o_ptr + b * sob + h * soh + rows[:, None] * sos + dd[None, :], mask=m, other=0.0)
        do = tl.load(do_ptr + b * sdb + h * sdh + rows[:, None] * sds + dd[None, :], mask=m, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + bh.to(tl.int64) * S + rows, delta, mask=rows < S)

    @triton.jit
    def _bwd_rows(dk, dv, k, v, keys, km, start, start_m, q_base, do_base, lse_ptr, delta_ptr, stat, mbase, NW,
                  dq_ptr, g_base, sqs, sds, sgs, dd, dm, S, qk_scale, sm_scale, inv_keep, BL: tl.constexpr,
                  BT: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
        # One query tile [start_m, start_m + BL) of the dK/dV loop: its contributions to the program's dK and dV
        # (returned) and, with ATOMIC_DQ, its dQ added to the float32 buffer.
        rows = start_m + tl.arange(0, BL)
        rm = rows < S
        rd = rm[:, None] & dm[None, :]
        q = tl.load(q_base + rows[:, None] * sqs + dd[None, :], mask=rd, other=0.0)
        do = tl.load(do_base + rows[:, None] * sds + dd[None, :], mask=rd, other=0.0)
        lse = tl.load(lse_ptr + stat + rows, mask=rm, other=0.0)
        delta = tl.load(delta_ptr + stat + rows, mask=rm, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BL, BT]
        valid = (keys[None, :] <= rows[:, None]) & km[None, :] & rm[:, None]
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = _keep(mbase, rows, start, NW, rm, BT)
            pd = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            pd = p
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk += tl.dot(tl.trans(ds), q)
        if ATOMIC_DQ:
            tl.atomic_add(dq_ptr + g_base + rows[:, None] * sgs + dd[None, :], tl.dot(ds, k) * sm_scale, mask=rd,
                          sem="relaxed")
        return dk, dv

    @triton.jit
    def _bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dq_ptr, dk_ptr, dv_ptr,
                    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sgb, sgh, sgs,
                    S, qk_scale, sm_scale, inv_keep,
                    H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr,
                    BLT: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
        # Program j: dK, dV of keys [j BT, (j + 1) BT), looping over the query tiles that see them. dQ: either
        # added there into a float32 buffer (ATOMIC_DQ), or computed afterwards for queries [j BT, (j + 1) BT) by
        # a loop over the key tiles they see (recomputing scores and dP). Gradients are written as [B, S, H, d]
        # with strides (sgb, sgh, sgs).
        start = tl.program_id(0) * BT
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        dd = tl.arange(0, DP)
        dm = dd < D
        q_base = q_ptr + b * sqb + h * sqh
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        do_base = do_ptr + b * sdb + h * sdh
        g_base = b * sgb + h * sgh
        stat = bh.to(tl.int64) * S
        NW = (S + 31) // 32
        mbase = mask_ptr + stat * NW

        keys = start + tl.arange(0, BT)
        km = keys < S
        kd = km[:, None] & dm[None, :]
        k = tl.load(k_base + keys[:, None] * sks + dd[None, :], mask=kd, other=0.0)
        v = tl.load(v_base + keys[:, None] * svs + dd[None, :], mask=kd, other=0.0)
        dk = tl.zeros([BT, DP], tl.float32)
        dv = tl.zeros([BT, DP], tl.float32)
        # Query tiles of BL rows; with BLT < BL only up to the last full one, then the ragged end in tiles of BLT
        # rows (S = 258: the two rows past 256 cost a 16-row tile per key tile, not a 64-row one).
        if BLT < BL:
            s_full = (S // BL) * BL
        else:
            s_full = S
        for start_m in range((start // BL) * BL, s_full, BL):
            dk, dv = _bwd_rows(dk, dv, k, v, keys, km, start, start_m, q_base, do_base, lse_ptr, delta_ptr, stat,
                               mbase, NW, dq_ptr, g_base, sqs, sds, sgs, dd, dm, S, qk_scale, sm_scale, inv_keep,
                               BL, BT, DROPOUT, ATOMIC_DQ)
        if BLT < BL:
            for start_m in range(tl.maximum((start // BLT) * BLT, s_full), S, BLT):
                dk, dv = _bwd_rows(dk, dv, k, v, keys, km, start, start_m, q_base, do_base, lse_ptr, delta_ptr,
                                   stat, mbase, NW, dq_ptr, g_base, sqs, sds, sgs, dd, dm, S, qk_scale, sm_scale,
                                   inv_keep, BLT, BT, DROPOUT, ATOMIC_DQ)
        g_off = g_base + keys[:, None] * sgs + dd[None, :]
        tl.store(dk_ptr + g_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kd)
        tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=kd)

        if not ATOMIC_DQ:
            rows2 = start + tl.arange(0, BT)
            rm2 = rows2 < S
            rd2 = rm2[:, None] & dm[None, :]
            q2 = tl.load(q_base + rows2[:, None] * sqs + dd[None, :], mask=rd2, other=0.0)
            do2 = tl.load(do_base + rows2[:, None] * sds + dd[None, :], mask=rd2, other=0.0)
            lse2 = tl.load(lse_ptr + stat + rows2, mask=rm2, other=0.0)
            delta2 = tl.load(delta_ptr + stat + rows2, mask=rm2, other=0.0)
            dq = tl.zeros([BT, DP], tl.float32)
            for start_n in range(0, tl.minimum(start + BT, S), BL):
                cols = start_n + tl.arange(0, BL)
                cm = cols < S
                cd = cm[:, None] & dm[None, :]
                kt = tl.load(k_base + cols[:, None] * sks + dd[None, :], mask=cd, other=0.0)
                vt = tl.load(v_base + cols[:, None] * svs + dd[None, :], mask=cd, other=0.0)
                s2 = tl.dot(q2, tl.trans(kt)) * qk_scale  # [BT, BL]
                valid2 = (cols[None, :] <= rows2[:, None]) & cm[None, :] & rm2[:, None]
                p2 = tl.where(valid2, tl.exp2(s2 - lse2[:, None]), 0.0)
                dp2 = tl.dot(do2, tl.trans(vt))
                if DROPOUT:
                    keep2 = _keep(mbase, rows2, start_n, NW, rm2, BL)
                    dp2 = tl.where(keep2, dp2 * inv_keep, 0.0)
                ds2 = p2 * (dp2 - delta2[:, None])
                dq += tl.dot(ds2.to(kt.dtype), kt)
            tl.store(dq_ptr + g_base + rows2[:, None] * sgs + dd[None, :],
                     (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=rd2)


def _check(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash attention needs q, k, v of one [B, H, S, d] shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("flash attention needs a unit stride in the head dimension")
    if triton is None:
        raise RuntimeError("flash attention needs Triton")


def _bshd(B, H, S, D, like) -> torch.Tensor:
    """An empty [B, S, H, D] buffer viewed as [B, H, S, D]."""
    return torch.empty(B, S, H, D, dtype=like.dtype, device=like.device).transpose(1, 2)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _dropout_args(p: float):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {p}")
    return 1.0 / (1.0 - p), p > 0


def attention_dropout_bits(B: int, H: int, S: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The attention-dropout decisions for ``seed`` packed 32 per word: int32 [B * H, S, ceil(S / 32)], bit t of
    word (b * H + h, i, w) = key 32 w + t kept for query i (or [L, B * H, S, ceil(S / 32)] from one launch for a
    seed of shape [L, 2]: one layer each). Words wholly above the causal diagonal are left unwritten."""
    if triton is None:
        raise RuntimeError("needs Triton")
    if not 0.0 < p < 1.0:
        raise ValueError(f"attention dropout must be in (0, 1), got {p}")
    L = seed.shape[0] if seed.dim() == 2 else None
    NW = -(-S // 32)
    out = torch.empty(((L,) if L else ()) + (B * H, S, NW), dtype=torch.int32, device=seed.device)
    full, rem = divmod(S, 32)
    T = 16 * full * (full + 1) + rem * (full + 1)  # words on or below the diagonal (see _bits_kernel)
    BLOCK = FLASH_CONFIG["bits_block"]
    _bits_kernel[(triton.cdiv(T, BLOCK), (L or 1) * B * H)](
        out, seed, S, NW, B * H, T, keep_threshold(p), BLOCK=BLOCK, num_warps=FLASH_CONFIG["bits_warps"])
    return out


def unpack_keep(bits: torch.Tensor, S: int) -> torch.Tensor:
    """Bool [..., S, S] (True = kept) from :func:`attention_dropout_bits`' words; the causal part is meaningful."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    keep = (bits.unsqueeze(-1) >> shifts) & 1
    return keep.flatten(-2)[..., :S].bool()


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float = 0.0,
                            bits: torch.Tensor | None = None):
    """Causal ``softmax(q k^T / sqrt(d))`` with attention dropout ``p``, times ``v``.

    q, k, v: [B, H, S, d] (unit stride in d). ``bits``: the dropout decisions (:func:`attention_dropout_bits`;
    drawn from torch's generator when None and p > 0). Returns ``(o, lse, bits)``: ``o`` [B, H, S, d] (a view of
    a [B, S, H, d] buffer), ``lse`` float32 [B * H, S] (base-2 log-sum-exp of the scaled scores) and the bits,
    all three needed by the backward."""
    _check(q, k, v)
    B, H, S, D = q.shape
    inv_keep, drop = _dropout_args(p)
    if drop and bits is None:
        bits = attention_dropout_bits(B, H, S, p, attention_seed(q.device))
    cfg = FLASH_CONFIG
    o = _bshd(B, H, S, D, v)
    lse = torch.empty(B * H, S, dtype=torch.float32, device=q.device)
    # Full tiles of fwd_m query rows, then the ragged end (S % fwd_m rows) in tiles of fwd_tail rows.
    s_full = S - S % cfg["fwd_m"]
    for row0, BM, rows in ((0, cfg["fwd_m"], s_full), (s_full, cfg["fwd_tail"], S - s_full)):
        if rows:
            _fwd_kernel[(triton.cdiv(rows, BM), B * H)](
                q, k, v, o, lse, bits if drop else lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                S, row0, _LOG2E / math.sqrt(D), inv_keep, H=H, D=D, DP=triton.next_power_of_2(D), BM=BM,
                BN=cfg["fwd_n"], DROPOUT=drop, num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    return o, lse, bits


def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, bits: torch.Tensor | None, p: float = 0.0):
    """Gradients ``(dq, dk, dv)`` of :func:`flash_attention_forward` ([B, H, S, d] views of [B, S, H, d] buffers)
    given ``do`` (the output's gradient, any strides with a unit stride in d) and the forward's ``o``, ``lse``
    and ``bits``. With ``FLASH_CONFIG["atomic_dq"]`` dq is float32, accumulated by atomic adds (its last bits
    depend on the order the programs run in); without, it is recomputed per query tile, in q's dtype."""
    _check(q, k, v)
    if do.stride(-1) != 1 or o.stride(-1) != 1:
        raise ValueError("flash attention needs a unit stride in the head dimension")
    B, H, S, D = q.shape
    inv_keep, drop = _dropout_args(p)
    if drop and bits is None:
        raise ValueError("the backward of a dropout attention needs the forward's bits")
    DP = triton.next_power_of_2(D)
    cfg = FLASH_CONFIG
    delta = torch.empty_like(lse)
    R = cfg["delta_rows"]
    _delta_kernel[(triton.cdiv(S, R), B * H)](o, do, delta, *_strides(o), *_strides(do), S, H=H, D=D, DP=DP,
                                              BM=R)
    atomic = cfg["atomic_dq"]
    dq = (torch.zeros(B, S, H, D, dtype=torch.float32, device=q.device).transpose(1, 2) if atomic
          else _bshd(B, H, S, D, q))
    dk, dv = _bshd(B, H, S, D, q), _bshd(B, H, S, D, q)
    BT = cfg["bwd_tile"]
    # The ragged-end loop is used with dropout only: on an H200 at reAR-B shapes it made the backward faster with
    # dropout 0.1 (0.454-0.480 against 0.467-0.507 ms) and slower without (0.484-0.494 against 0.441-0.459 ms;
    # reports/small/bench/attention_tail_tiles_micro_run*.json).
    tail = cfg["bwd_tail"] if drop else cfg["bwd_loop"]
    _bwd_kernel[(triton.cdiv(S, BT), B * H)](
        q, k, v, do, lse, delta, bits if drop else lse, dq, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), S, _LOG2E / math.sqrt(D),
        1.0 / math.sqrt(D), inv_keep, H=H, D=D, DP=DP, BT=BT, BL=cfg["bwd_loop"], BLT=tail,
        DROPOUT=drop, ATOMIC_DQ=atomic, num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    return dq, dk, dv


def attention_reference(q, k, v, p: float = 0.0, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention in plain PyTorch (the dtype of the inputs): ``F.dropout(softmax(q k^T / sqrt(d)), p)
    @ v`` with the given ``keep`` mask [B, H, S, S] standing for the dropout draws."""
    S, D = q.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    if keep is not None:
        a = a * keep / (1.0 - p)
    return a @ v
