"""A hand-scheduled forward and backward of the whole block stack, for training on CUDA in bf16.

``torch.compile`` leaves the training step of reAR-B with about 48 ms per step of Inductor-generated elementwise
and reduction kernels (one H200, reports/small/bench/profile_rear_b_modules_bshd.json), most of it in the backward of
the adaLN sites: the LayerNorm backward, and one kernel that re-reads six tensors to assemble the [N, 6C]
modulation gradient (``cat``) that the adaLN weight GEMM needs. This module computes *the same function* as
:class:`rearlib.model.Block` stacked ``depth`` times, with

* every GEMM in cuBLAS (``torch.addmm``/``mm``), as before; the attention, dropout included, in the Triton kernels
  of :mod:`rearlib.kernels.flash_attention` (default, faster at reAR-B shapes) or in cuDNN (``attention="cudnn"``: the aten
  ops behind ``scaled_dot_product_attention``);
* the adaLN modulation of *all* blocks as one GEMM, [N, C] x [C, depth * 6C], because every block reads the same
  ``SiLU(cond)``; in the backward its weight gradient and its input gradient are again one GEMM each (K = N and
  K = depth * 6C: the sum over blocks happens inside the GEMM's float32 accumulator);
* one Triton kernel per *adaLN site* and direction. A site is ``x_new = x + gate * dropout(branch)`` followed by
  ``a = LN(x_new) * (1 + scale) + shift`` (either part optional). The forward writes ``x_new`` (float32, the
  residual stream as under autocast) and ``a`` (bf16). The backward reads each input once and writes the residual
  gradient, the branch gradient and the gate/shift/scale gradients *directly into their columns of the modulation
  gradient* (no ``cat``), plus per-program column sums for the LayerNorm affine and bias gradients. The residual
  add that ends block i and the LayerNorm that starts block i + 1 are one site;
* Triton kernels for the QK-norm and the GELU (+ dropout), forward and backward, the bias gradients again as
  per-program column sums; all column sums of a step are reduced once, at the end of the backward;
* the GEMM weights cast to bf16 by one multi-tensor copy, and the weight gradients written in float32 by cuBLAS.

Numerics: bf16 GEMM inputs with float32 accumulation, float32 LayerNorm statistics and residual stream, as the
compiled module path; results agree with it to bf16 round-off (different summation orders), not bitwise. The
GELU kernels use an erfc approximation (relative error ~1e-7, see ``_normal_cdf``) instead of libdevice's erf.
The dropout masks come from :func:`rearlib.kernels.dropout_keep_bits`, one bit per decision (the module path
uses the byte masks of :func:`rearlib.kernels.dropout_keep_mask`: same distribution and 16-bit draws, different
counters, so the random stream differs); the site and GELU kernels are bound by memory traffic, and the bits cut
their mask reads to an eighth. Measurements: reports/small/bench/
train_fused_blocks_ab.json and train_fused_blocks_tuning.json; see docs/performance.md.

Used by :meth:`rearlib.model.Generator` in training when ``GeneratorConfig.block_kernels`` selects it (see there);
everything else (embedding, head, loss, alignment heads) stays in the compiled module code. CPU runs (tests) use
plain-PyTorch stand-ins for the Triton kernels and the attention, selected by ``backend="torch"``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from rearlib.kernels.flash_attention import attention_dropout_bits, attention_seed, flash_attention_backward, flash_attention_forward
from rearlib.kernels.ops import _dropout_seed, dropout_keep_bits, pack_keep, triton, triton_available, unpack_keep

if triton is not None:  # triton is optional: CPU installs run the plain-PyTorch stand-ins
    import triton.language as tl

__all__ = ["SiteLN", "SiteResidual", "site_forward", "site_backward", "qknorm_forward", "qknorm_backward",
           "gelu_forward", "gelu_backward", "fused_block_stack", "BLOCK_PARAM_NAMES", "SITE_CONFIG", "QKNORM_CONFIG",
           "GELU_CONFIG"]

#: Names of one block's parameters in the order the stack function takes them (relative to the block module).
BLOCK_PARAM_NAMES = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight",
                     "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias", "attn.proj.weight",
                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
_NP = len(BLOCK_PARAM_NAMES)

#: Launch configuration of the site kernels: rows per program tile, warps, and the backward's programs per SM
#: (``bwd_programs``, when set, is an absolute count instead). Measured on an H200 at reAR-B shapes
#: (reports/small/bench/train_fused_blocks_tuning.json): 3 programs of 8 warps per SM is what fits in the registers at
#: once, so 3 x 132 programs run in one wave (0.247 ms per site) where 1056 ran in 2.7 (0.263 ms).
SITE_CONFIG = {"fwd_rows": 4, "fwd_warps": 8, "bwd_rows": 1, "bwd_warps": 8, "bwd_programs_per_sm": 3,
               "bwd_programs": None}

#: Rows of the column-sum output of :func:`site_backward`.
SUM_ROWS = ("ln_weight", "ln_bias", "shift", "scale", "gate", "branch")


class SiteLN(NamedTuple):
    """LayerNorm part of a site: affine weight/bias [C] (float32) and shift/scale [N, C] views (row stride any)."""
    weight: torch.Tensor
    bias: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    eps: float


class SiteResidual(NamedTuple):
    """Residual part: x_new = x + gate * branch * keep / (1 - p). ``keep``: the dropout decisions of the [N, C]
    branch packed 32 per int32 word in row-major order (:func:`rearlib.kernels.pack_keep`), None = no dropout."""
    branch: torch.Tensor
    keep: torch.Tensor | None
    gate: torch.Tensor
    p: float


# ----------------------------------------------------------------------------------------------------------------
# Site kernels
# ----------------------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _kept(keep_ptr, off, m):
        # Dropout decision of element ``off`` (flat row-major index) from the packed words (kernels.pack_keep):
        # bit off % 32 of word off // 32, one gathered load per element (rows that do not start on a word).
        return ((tl.load(keep_ptr + (off >> 5), mask=m, other=0) >> (off & 31).to(tl.int32)) & 1) != 0

    @triton.jit
    def _unpack_words(words, R: tl.constexpr, W: tl.constexpr):
        # [R, W] words -> [R, 32 W] decisions (bit t of word w = column 32 w + t): one load per 32 elements.
        bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
        return tl.reshape(bits, [R, 32 * W]) != 0

    @triton.jit
    def _kept_rows(keep_ptr, r64, rmask, C, off, m, R: tl.constexpr, BLOCK_C: tl.constexpr,
                   ALIGNED: tl.constexpr):
        # Decisions of the [R, BLOCK_C] tile of rows r64 of an [N, C] tensor. ALIGNED (C % 32 == 0): every row is
        # whole words, loaded as an [R, BLOCK_C / 32] tile and expanded in registers.
        if ALIGNED:
            wi = tl.arange(0, BLOCK_C // 32)
            words = tl.load(keep_ptr + r64[:, None] * (C // 32) + wi[None, :],
                            mask=rmask[:, None] & (wi[None, :] * 32 < C), other=0)
            return _unpack_words(words, R, BLOCK_C // 32)
        else:
            return _kept(keep_ptr, off, m)

    @triton.jit
    def _site_fwd_kernel(x_ptr, br_ptr, keep_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr,
                         xn_ptr, a_ptr, mean_ptr, rstd_ptr, N, C, s_mod, inv_keep, eps,
                         HAS_RES: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_LN: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < C
        m = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        off = r64[:, None] * C + cols[None, :]
        moff = r64[:, None] * s_mod + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            u = tl.load(br_ptr + off, mask=m, other=0.0).to(tl.float32)
            if HAS_KEEP:
                k = _kept_rows(keep_ptr, r64, rmask, C, off, m, ROWS, BLOCK_C, ALIGNED)
                u = tl.where(k, u * inv_keep, 0.0)
            g = tl.load(gate_ptr + moff, mask=m, other=0.0).to(tl.float32)
            x = x + g * u
            tl.store(xn_ptr + off, x, mask=m)
        if HAS_LN:
            mean = tl.sum(x, 1) / C
            xc = tl.where(m, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
            b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
            y = xc * rstd[:, None] * w[None, :] + b[None, :]
            sc = tl.load(scale_ptr + moff, mask=m, other=0.0).to(tl.float32)
            sh = tl.load(shift_ptr + moff, mask=m, other=0.0).to(tl.float32)
            tl.store(a_ptr + off, (y * (1.0 + sc) + sh).to(a_ptr.dtype.element_ty), mask=m)
            tl.store(mean_ptr + rows, mean, mask=rmask)
            tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _site_bwd_kernel(dxn_ptr, da_ptr, xn_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr,
                         br_ptr, keep_ptr, gate_ptr, dbr_ptr, dgate_ptr, dshift_ptr, dscale_ptr, sums_ptr,
                         N, C, s_mod, s_dmod, inv_keep,
                         HAS_RES: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_LN: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        acc_w = tl.zeros([BLOCK_C], tl.float32)
        acc_b = tl.zeros([BLOCK_C], tl.float32)
        acc_sh = tl.zeros([BLOCK_C], tl.float32)
        acc_sc = tl.zeros([BLOCK_C], tl.float32)
        acc_g = tl.zeros([BLOCK_C], tl.float32)
        acc_br = tl.zeros([BLOCK_C], tl.float32)
        if HAS_LN:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
            bb = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        for start in range(pid * ROWS, N, nprog * ROWS):
            rows = start + tl.arange(0, ROWS)
            rmask = rows < N
            m = rmask[:, None] & cmask[None, :]
            r64 = rows.to(tl.int64)
            off = r64[:, None] * C + cols[None, :]
            moff = r64[:, None] * s_mod + cols[None, :]
            doff = r64[:, None] * s_dmod + cols[None, :]
            dxn = tl.load(dxn_ptr + off, mask=m, other=0.0)
            if HAS_LN:
                da = tl.load(da_ptr + off, mask=m, other=0.0).to(tl.float32)
                mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
                rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
                xhat = tl.where(m, (tl.load(xn_ptr + off, mask=m, other=0.0) - mean[:, None]) * rstd[:, None], 0.0)
                y = xhat * w[None, :] + bb[None, :]
                sc = tl.load(scale_ptr + moff, mask=m, other=0.0).to(tl.float32)
                dsc = da * y
                tl.store(dshift_ptr + doff, da.to(dshift_ptr.dtype.element_ty), mask=m)
                tl.store(dscale_ptr + doff, dsc.to(dscale_ptr.dtype.element_ty), mask=m)
                acc_sh += tl.sum(da, 0)
                acc_sc += tl.sum(dsc, 0)
                dy = da * (1.0 + sc)
                acc_w += tl.sum(dy * xhat, 0)
                acc_b += tl.sum(dy, 0)
                g = dy * w[None, :]
                c1 = tl.sum(g * xhat, 1) / C
                c2 = tl.sum(g, 1) / C
                dxn = dxn + tl.where(m, rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None]), 0.0)
                tl.store(dxn_ptr + off, dxn, mask=m)
            if HAS_RES:
                u = tl.load(br_ptr + off, mask=m, other=0.0).to(tl.float32)
                gt = tl.load(gate_ptr + moff, mask=m, other=0.0).to(tl.float32)
                dbr = dxn * gt
                if HAS_KEEP:
                    k = _kept_rows(keep_ptr, r64, rmask, C, off, m, ROWS, BLOCK_C, ALIGNED)
                    u = tl.where(k, u * inv_keep, 0.0)
                    dbr = tl.where(k, dbr * inv_keep, 0.0)
                dg = dxn * u
                tl.store(dgate_ptr + doff, dg.to(dgate_ptr.dtype.element_ty), mask=m)
                tl.store(dbr_ptr + off, dbr.to(dbr_ptr.dtype.element_ty), mask=m)
                acc_g += tl.sum(dg, 0)
                acc_br += tl.sum(dbr, 0)
        base = sums_ptr + pid * 6 * C + cols
        tl.store(base, acc_w, mask=cmask)
        tl.store(base + C, acc_b, mask=cmask)
        tl.store(base + 2 * C, acc_sh, mask=cmask)
        tl.store(base + 3 * C, acc_sc, mask=cmask)
        tl.store(base + 4 * C, acc_g, mask=cmask)
        tl.store(base + 5 * C, acc_br, mask=cmask)


def _mod_stride(*views: torch.Tensor | None) -> int:
    strides = {v.stride(0) for v in views if v is not None}
    if len(strides) > 1 or any(v is not None and v.stride(1) != 1 for v in views):
        raise ValueError("modulation views must share one row stride and have unit column stride")
    return strides.pop() if strides else 0


def _hi(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in float64 if it is (the CPU tests run the stand-ins in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _use_kernel(x: torch.Tensor, interpret: bool) -> bool:
    return interpret or (x.is_cuda and triton_available())


def _check_keep(keep: torch.Tensor | None, n: int) -> None:
    if keep is not None and (keep.dtype != torch.int32 or keep.numel() * 32 < n):
        raise ValueError(f"dropout decisions must be packed 32 per int32 word (rearlib.kernels.pack_keep): "
                         f"expected >= {-(-n // 32)} int32 words for {n} elements, got {keep.dtype} "
                         f"{tuple(keep.shape)}")


def _pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _programs(cfg: dict, device: torch.device, units: int) -> int:
    """Programs of a persistent (grid-stride) backward kernel: ``cfg["bwd_programs"]`` if set, else
    ``bwd_programs_per_sm`` per streaming multiprocessor (8 in all on CPU, for the interpreter); at most ``units``."""
    n = cfg["bwd_programs"]
    if n is None and device.type == "cuda":
        n = cfg["bwd_programs_per_sm"] * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(units, 8 if n is None else n))


def _use_partials(parts: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Stand-ins: their exact sums as the partials of a single program (``parts[0]``, the rest zero)."""
    parts.zero_()
    parts[0].copy_(sums)
    return parts


def site_backward_partials(N: int, C: int, device, kernels: bool = True) -> tuple:
    """Shape of one :func:`site_backward` call's unreduced column sums ([programs, 6, C]; 1 program for the
    stand-ins): the stack collects them for all sites and reduces them once (not one reduction kernel per site)."""
    return (_programs(SITE_CONFIG, device, -(-N // SITE_CONFIG["bwd_rows"])) if kernels else 1, 6, C)


def site_forward(x: torch.Tensor, res: SiteResidual | None, ln: SiteLN | None, *, out_dtype=torch.bfloat16,
                 interpret: bool = False):
    """Forward of one adaLN site over [N, C] rows. Returns ``(x_new, a, mean, rstd)``: ``x_new`` float32 (``x``
    itself without ``res``), ``a`` in ``out_dtype`` and the float32 row statistics (None without ``ln``).

    Triton on CUDA (or on CPU tensors with ``interpret=True`` under ``TRITON_INTERPRET=1``), else PyTorch."""
    N, C = x.shape
    _check_keep(res.keep if res is not None else None, N * C)
    if not _use_kernel(x, interpret):
        return _site_forward_torch(x, res, ln, out_dtype)
    xn = torch.empty(N, C, dtype=torch.float32, device=x.device) if res is not None else x
    a = torch.empty(N, C, dtype=out_dtype, device=x.device) if ln is not None else None
    mean = torch.empty(N, dtype=torch.float32, device=x.device) if ln is not None else None
    rstd = torch.empty_like(mean) if ln is not None else None
    dummy = x
    s_mod = _mod_stride(res.gate if res else None, ln.shift if ln else None, ln.scale if ln else None)
    keep = res.keep if res is not None else None
    rows, warps = SITE_CONFIG["fwd_rows"], SITE_CONFIG["fwd_warps"]
    _site_fwd_kernel[(triton.cdiv(N, rows),)](
        x, res.branch if res else dummy, keep if keep is not None else dummy, res.gate if res else dummy,
        ln.weight if ln else dummy, ln.bias if ln else dummy, ln.shift if ln else dummy, ln.scale if ln else dummy,
        xn, a if ln else dummy, mean if ln else dummy, rstd if ln else dummy, N, C, s_mod,
        1.0 / (1.0 - res.p) if res else 1.0, ln.eps if ln else 0.0,
        HAS_RES=res is not None, HAS_KEEP=keep is not None, HAS_LN=ln is not None, ROWS=rows,
        BLOCK_C=_pow2(C), ALIGNED=C % 32 == 0, num_warps=warps)
    return xn, a, mean, rstd


def site_backward(dxn: torch.Tensor, da: torch.Tensor | None, xn: torch.Tensor, mean, rstd,
                  res: SiteResidual | None, ln: SiteLN | None, *, dgate: torch.Tensor | None = None,
                  dshift: torch.Tensor | None = None, dscale: torch.Tensor | None = None,
                  branch_dtype=torch.bfloat16, interpret: bool = False, parts: torch.Tensor | None = None):
    """Backward of :func:`site_forward`.

    ``dxn`` (float32 [N, C], the gradient reaching ``x_new`` from later sites and taps) is updated *in place* to
    the gradient of ``x``. ``da``: gradient of ``a``. The gate/shift/scale gradients are written into the given
    [N, C] views (columns of the modulation gradient). Returns ``(dx, dbranch, sums)`` with ``sums`` [6, C] the
    column sums in :data:`SUM_ROWS` order (LN weight/bias gradients, then the column sums of the shift, scale,
    gate and branch gradients: the bias gradients of the layers that produced them); rows that do not apply are 0.
    ``parts`` ([programs, 6, C] float32, see :func:`site_backward_partials`): write the per-program partial sums
    there and return them unreduced in place of ``sums``.
    """
    N, C = dxn.shape
    _check_keep(res.keep if res is not None else None, N * C)
    if not _use_kernel(dxn, interpret):
        dx, dbr, sums = _site_backward_torch(dxn, da, xn, mean, rstd, res, ln, dgate, dshift, dscale, branch_dtype)
        return dx, dbr, (sums if parts is None else _use_partials(parts, sums))
    if dxn.dtype != torch.float32 or not dxn.is_contiguous():
        raise ValueError("dxn must be a contiguous float32 tensor (it is updated in place)")
    dbr = torch.empty(N, C, dtype=branch_dtype, device=dxn.device) if res is not None else None
    rows, warps = SITE_CONFIG["bwd_rows"], SITE_CONFIG["bwd_warps"]
    part = parts if parts is not None else torch.empty(site_backward_partials(N, C, dxn.device), dtype=torch.float32,
                                                       device=dxn.device)
    grid = part.shape[0]
    d = dxn
    s_mod = _mod_stride(res.gate if res else None, ln.scale if ln else None)
    s_dmod = _mod_stride(dgate, dshift, dscale)
    keep = res.keep if res is not None else None
    _site_bwd_kernel[(grid,)](
        dxn, da if ln else d, xn if ln else d, mean if ln else d, rstd if ln else d, ln.weight if ln else d,
        ln.bias if ln else d, ln.scale if ln else d, res.branch if res else d, keep if keep is not None else d,
        res.gate if res else d, dbr if res else d, dgate if res else d, dshift if ln else d, dscale if ln else d,
        part, N, C, s_mod, s_dmod, 1.0 / (1.0 - res.p) if res else 1.0,
        HAS_RES=res is not None, HAS_KEEP=keep is not None, HAS_LN=ln is not None, ROWS=rows,
        BLOCK_C=_pow2(C), ALIGNED=C % 32 == 0, num_warps=warps)
    return dxn, dbr, (part if parts is not None else part.sum(0))


def _keep_like(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The packed decisions ``keep`` as a 0/1 tensor shaped like ``t`` (the stand-ins multiply by it)."""
    return unpack_keep(keep, t.shape).to(_hi(t).dtype)


def _residual_input(res: SiteResidual) -> torch.Tensor:
    u = _hi(res.branch)
    if res.keep is not None:
        u = u * _keep_like(res.keep, u) * (1.0 / (1.0 - res.p))
    return u


def _ln_rows(x: torch.Tensor, eps: float):
    """LayerNorm statistics over the last dim (at least float32): ``(xhat, mean, rstd)``, stats with keepdim."""
    xf = _hi(x)
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return xc * rstd, mean, rstd


def _ln_input_grad(g: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Gradient of a LayerNorm's input given ``g`` = the gradient of ``xhat`` (rstd broadcastable, keepdim)."""
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True))


def _site_forward_torch(x, res, ln, out_dtype):
    xn = x
    if res is not None:
        xn = _hi(x) + _hi(res.gate) * _residual_input(res)
    a = mean = rstd = None
    if ln is not None:
        xhat, mean, rstd = _ln_rows(xn, ln.eps)
        y = xhat * ln.weight + ln.bias
        a = (y * (1 + _hi(ln.scale)) + _hi(ln.shift)).to(out_dtype)
        mean, rstd = mean.squeeze(1), rstd.squeeze(1)
    return xn, a, mean, rstd


def _site_backward_torch(dxn, da, xn, mean, rstd, res, ln, dgate, dshift, dscale, branch_dtype):
    C = dxn.shape[1]
    sums = torch.zeros(6, C, dtype=dxn.dtype, device=dxn.device)
    if ln is not None:
        daf = _hi(da)
        xhat = (_hi(xn) - mean[:, None]) * rstd[:, None]
        y = xhat * ln.weight + ln.bias
        dshift.copy_(daf)
        dscale.copy_(daf * y)
        dy = daf * (1 + _hi(ln.scale))
        g = dy * ln.weight
        dxn += _ln_input_grad(g, xhat, rstd[:, None])
        sums[0], sums[1], sums[2], sums[3] = (dy * xhat).sum(0), dy.sum(0), daf.sum(0), (daf * y).sum(0)
    dbr = None
    if res is not None:
        u = _residual_input(res)
        dbr_f = dxn * _hi(res.gate)
        if res.keep is not None:
            dbr_f = dbr_f * _keep_like(res.keep, dbr_f) * (1.0 / (1.0 - res.p))
        dgate.copy_(dxn * u)
        dbr = dbr_f.to(branch_dtype)
        sums[4], sums[5] = (dxn * u).sum(0), dbr_f.sum(0)
    return dxn, dbr, sums


# ----------------------------------------------------------------------------------------------------------------
# QK-norm and GELU written out in PyTorch: the stand-ins for the Triton kernels below
# ----------------------------------------------------------------------------------------------------------------
def _qknorm_fwd(qkv, wq, bq, wk, bk, shape, eps: float, dtype):
    B, S, H, d = shape
    x = qkv.view(B, S, 3, H, d)
    qn = (_ln_rows(x[:, :, 0], eps)[0] * wq + bq).to(dtype)
    kn = (_ln_rows(x[:, :, 1], eps)[0] * wk + bk).to(dtype)
    return qn, kn  # [B, S, H, d] contiguous


def _qknorm_bwd(dq, dk, dv, qkv, wq, wk, shape, eps: float):
    """dq/dk/dv [B, S, H, d] (any strides) -> dqkv [N, 3C] in qkv's dtype and the column sums [7, H, d] the kernel
    accumulates (see :func:`qknorm_param_grads`)."""
    B, S, H, d = shape
    x = qkv.view(B, S, 3, H, d)

    def one(dy, xin, w):
        xhat, _, rstd = _ln_rows(xin, eps)
        dyf = _hi(dy)
        dx = _ln_input_grad(dyf * w, xhat, rstd)
        return dx.to(qkv.dtype), (dyf * xhat).sum((0, 1)), dyf.sum((0, 1))

    dqx, dwq, dbq = one(dq, x[:, :, 0], wq)
    dkx, dwk, dbk = one(dk, x[:, :, 1], wk)
    dqkv = torch.stack([dqx, dkx, dv.to(qkv.dtype)], dim=2).view(B * S, 3 * H * d)
    return dqkv, torch.cat([_hi(dqkv).sum(0).view(3, H, d), torch.stack([dwq, dbq, dwk, dbk])])


def _gelu_fwd(f, keep, inv_keep: float):
    g = F.gelu(_hi(f))
    if keep is not None:
        g = g * _keep_like(keep, g) * inv_keep
    return g.to(f.dtype)


def _gelu_bwd(dg, f, keep, inv_keep: float):
    x = _hi(f)
    d = _hi(dg)
    if keep is not None:
        d = d * _keep_like(keep, d) * inv_keep
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    df = (d * (cdf + x * pdf)).to(f.dtype)
    return df, _hi(df).sum(0)


# ----------------------------------------------------------------------------------------------------------------
# QK-norm kernels: rows of the qkv GEMM output viewed as [token, head, head_dim]
# ----------------------------------------------------------------------------------------------------------------
#: Launch configuration of the QK-norm kernels (tokens per tile, warps, backward programs per SM or in all, and
#: the backward's software-pipelining stages). H200, reAR-B shapes: 4 warps x 8 programs per SM with 3 stages took
#: 0.183 ms per call where 8 warps x 1056 programs took 0.227 (reports/small/bench/train_fused_blocks_tuning.json).
QKNORM_CONFIG = {"fwd_tokens": 4, "fwd_warps": 8, "bwd_tokens": 1, "bwd_warps": 4, "bwd_programs_per_sm": 8,
                 "bwd_programs": None, "bwd_stages": 3}

if triton is not None:
    @triton.jit
    def _ln_tile(x, w, b, m, eps, D: tl.constexpr):
        mean = tl.sum(x, 2) / D
        xc = tl.where(m, x - mean[:, :, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 2) / D + eps)
        xhat = xc * rstd[:, :, None]
        return xhat, rstd, xhat * w[None, None, :] + b[None, None, :]

    @triton.jit
    def _qknorm_fwd_kernel(qkv_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, qn_ptr, kn_ptr, NT, eps,
                           H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                           T: tl.constexpr):
        C = H * D
        tok = tl.program_id(0) * T + tl.arange(0, T)
        hh = tl.arange(0, HP)
        jj = tl.arange(0, DP)
        jm = jj < D
        m = (tok < NT)[:, None, None] & (hh < H)[None, :, None] & jm[None, None, :]
        t64 = tok.to(tl.int64)[:, None, None]
        inner = hh[None, :, None] * D + jj[None, None, :]
        src = t64 * (3 * C) + inner
        dst = t64 * C + inner
        x = tl.load(qkv_ptr + src, mask=m, other=0.0).to(tl.float32)
        _, _, y = _ln_tile(x, tl.load(wq_ptr + jj, mask=jm, other=0.0), tl.load(bq_ptr + jj, mask=jm, other=0.0),
                           m, eps, D)
        tl.store(qn_ptr + dst, y.to(qn_ptr.dtype.element_ty), mask=m)
        x = tl.load(qkv_ptr + src + C, mask=m, other=0.0).to(tl.float32)
        _, _, y = _ln_tile(x, tl.load(wk_ptr + jj, mask=jm, other=0.0), tl.load(bk_ptr + jj, mask=jm, other=0.0),
                           m, eps, D)
        tl.store(kn_ptr + dst, y.to(kn_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _ln_tile_bwd(dy, x, w, m, eps, D: tl.constexpr):
        xhat, rstd, _ = _ln_tile(x, w, w, m, eps, D)
        g = dy * w[None, None, :]
        c1 = tl.sum(g * xhat, 2) / D
        c2 = tl.sum(g, 2) / D
        dx = tl.where(m, rstd[:, :, None] * (g - xhat * c1[:, :, None] - c2[:, :, None]), 0.0)
        return dx, xhat

    @triton.jit
    def _qknorm_bwd_kernel(dq_ptr, dk_ptr, dv_ptr, qkv_ptr, wq_ptr, wk_ptr, dqkv_ptr, part_ptr, NT, eps,
                           H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                           T: tl.constexpr):
        C = H * D
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        hh = tl.arange(0, HP)
        jj = tl.arange(0, DP)
        jm = jj < D
        wq = tl.load(wq_ptr + jj, mask=jm, other=0.0)
        wk = tl.load(wk_ptr + jj, mask=jm, other=0.0)
        inner = hh[None, :, None] * D + jj[None, None, :]
        acc_q = tl.zeros([HP, DP], tl.float32)   # column sums of dqkv (the qkv bias gradient)
        acc_k = tl.zeros([HP, DP], tl.float32)
        acc_v = tl.zeros([HP, DP], tl.float32)
        acc_wq = tl.zeros([HP, DP], tl.float32)  # norm weight / bias gradients, per head
        acc_bq = tl.zeros([HP, DP], tl.float32)
        acc_wk = tl.zeros([HP, DP], tl.float32)
        acc_bk = tl.zeros([HP, DP], tl.float32)
        for start in range(pid * T, NT, nprog * T):
            tok = start + tl.arange(0, T)
            m = (tok < NT)[:, None, None] & (hh < H)[None, :, None] & jm[None, None, :]
            t64 = tok.to(tl.int64)[:, None, None]
            src = t64 * (3 * C) + inner
            dst = t64 * C + inner
            dy = tl.load(dq_ptr + dst, mask=m, other=0.0).to(tl.float32)
            dx, xhat = _ln_tile_bwd(dy, tl.load(qkv_ptr + src, mask=m, other=0.0).to(tl.float32), wq, m, eps, D)
            dxb = dx.to(dqkv_ptr.dtype.element_ty)
            tl.store(dqkv_ptr + src, dxb, mask=m)
            acc_q += tl.sum(dxb.to(tl.float32), 0)
            acc_wq += tl.sum(dy * xhat, 0)
            acc_bq += tl.sum(dy, 0)
            dy = tl.load(dk_ptr + dst, mask=m, other=0.0).to(tl.float32)
            dx, xhat = _ln_tile_bwd(dy, tl.load(qkv_ptr + src + C, mask=m, other=0.0).to(tl.float32), wk, m, eps, D)
            dxb = dx.to(dqkv_ptr.dtype.element_ty)
            tl.store(dqkv_ptr + src + C, dxb, mask=m)
            acc_k += tl.sum(dxb.to(tl.float32), 0)
            acc_wk += tl.sum(dy * xhat, 0)
            acc_bk += tl.sum(dy, 0)
            dv = tl.load(dv_ptr + dst, mask=m, other=0.0)
            tl.store(dqkv_ptr + src + 2 * C, dv.to(dqkv_ptr.dtype.element_ty), mask=m)
            acc_v += tl.sum(dv.to(tl.float32), 0)
        base = part_ptr + pid * (7 * HP * DP) + hh[:, None] * DP + jj[None, :]
        tl.store(base, acc_q)
        tl.store(base + HP * DP, acc_k)
        tl.store(base + 2 * HP * DP, acc_v)
        tl.store(base + 3 * HP * DP, acc_wq)
        tl.store(base + 4 * HP * DP, acc_bq)
        tl.store(base + 5 * HP * DP, acc_wk)
        tl.store(base + 6 * HP * DP, acc_bk)


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """A [B, S, H, d] tensor as the kernels read it (contiguous; cuDNN's gradients already are)."""
    return t if t.is_contiguous() else t.contiguous()


def qknorm_forward(qkv, wq, bq, wk, bk, shape, eps: float, dtype, *, interpret: bool = False):
    """QK-norm of the q and k parts of ``qkv`` [N, 3C]: returns ``(qn, kn)`` [B, S, H, d] in ``dtype``."""
    if not _use_kernel(qkv, interpret):
        return _qknorm_fwd(qkv, wq, bq, wk, bk, shape, eps, dtype)
    B, S, H, d = shape
    qn = torch.empty(B, S, H, d, dtype=dtype, device=qkv.device)
    kn = torch.empty_like(qn)
    T = QKNORM_CONFIG["fwd_tokens"]
    _qknorm_fwd_kernel[(triton.cdiv(B * S, T),)](
        qkv, wq, bq, wk, bk, qn, kn, B * S, eps, H=H, D=d, HP=_pow2(H),
        DP=_pow2(d), T=T, num_warps=QKNORM_CONFIG["fwd_warps"])
    return qn, kn


def qknorm_param_grads(s: torch.Tensor, H: int, d: int):
    """``(dwq, dbq, dwk, dbk, dbqkv)`` from the program-summed column sums ``s`` [..., 7, >= H, >= d] of the
    QK-norm backward (rows: the q, k, v parts of dqkv's column sums, then the q and k norms' weight and bias
    gradients per head); leading dimensions (blocks) are kept."""
    s = s[..., :H, :d]
    norms = s[..., 3:, :, :].sum(-2)  # the norm parameters are shared by the heads
    return (norms[..., 0, :], norms[..., 1, :], norms[..., 2, :], norms[..., 3, :],
            s[..., :3, :, :].reshape(*s.shape[:-3], 3 * H * d))


def qknorm_backward_partials(N: int, H: int, d: int, device, kernels: bool = True) -> tuple:
    """Shape of one :func:`qknorm_backward` call's unreduced column sums: [programs, 7, H, d] padded to powers
    of two (1 program for the stand-ins)."""
    T = QKNORM_CONFIG["bwd_tokens"]
    return (_programs(QKNORM_CONFIG, device, -(-N // T)) if kernels else 1, 7, _pow2(H), _pow2(d))


def qknorm_backward(dq, dk, dv, qkv, wq, wk, shape, eps: float, *, interpret: bool = False,
                    parts: torch.Tensor | None = None):
    """Backward of :func:`qknorm_forward` plus the v gradient: dq/dk/dv [B, S, H, d] -> ``(dqkv [N, 3C], dwq,
    dbq, dwk, dbk, dbqkv)`` (the norms' weight/bias gradients and the column sums of dqkv, the qkv bias gradient).
    With ``parts`` (see :func:`qknorm_backward_partials`): ``(dqkv, parts)``, the per-program column sums
    unreduced, for :func:`qknorm_param_grads` after summing over programs."""
    B, S, H, d = shape
    if not _use_kernel(qkv, interpret):
        dqkv, s7 = _qknorm_bwd(dq, dk, dv, qkv, wq, wk, shape, eps)
        if parts is None:
            return (dqkv,) + qknorm_param_grads(s7, H, d)
        padded = torch.zeros(parts.shape[1:], dtype=s7.dtype, device=s7.device)
        padded[:, :H, :d] = s7
        return dqkv, _use_partials(parts, padded)
    dqkv = torch.empty_like(qkv)
    T = QKNORM_CONFIG["bwd_tokens"]
    part = parts if parts is not None else torch.empty(qknorm_backward_partials(B * S, H, d, qkv.device),
                                                       dtype=torch.float32, device=qkv.device)
    grid, _, HP, DP = part.shape  # the kernel's padded head tile is the partials' layout
    _qknorm_bwd_kernel[(grid,)](_bshd(dq), _bshd(dk), _bshd(dv), qkv, wq, wk, dqkv, part, B * S, eps, H=H, D=d,
                                HP=HP, DP=DP, T=T, num_warps=QKNORM_CONFIG["bwd_warps"],
                                num_stages=QKNORM_CONFIG["bwd_stages"])
    if parts is not None:
        return dqkv, part
    return (dqkv,) + qknorm_param_grads(part.sum(0), H, d)


# ----------------------------------------------------------------------------------------------------------------
# GELU (erf) + dropout kernels over the fc1 output [N, hidden]
# ----------------------------------------------------------------------------------------------------------------
#: Launch configuration of the GELU kernels (elements per forward program; backward columns per tile, warps, row
#: programs per column block: per SM, or in all when ``bwd_programs`` is set). H200, reAR-B shapes
#: (reports/small/bench/train_fused_blocks_tuning.json): the backward took 0.238 ms per call with 8 warps x 8 programs
#: per SM against 0.274 with 4 warps x 352 programs.
GELU_CONFIG = {"fwd_block": 8192, "fwd_warps": 8, "bwd_cols": 1024, "bwd_warps": 8, "bwd_programs_per_sm": 8,
               "bwd_programs": None}

if triton is not None:
    @triton.jit
    def _normal_cdf(x):
        """Phi(x) = erfc(-x / sqrt 2) / 2 in float32 through the erfc approximation of Numerical Recipes (Press et
        al., ``erfcc``: fractional error below 1.2e-7 for every argument), one exp and one reciprocal. libdevice's
        erf made the GELU kernels compute-bound: on an H200 the forward took 0.182-0.189 ms per reAR-B call with it,
        0.152-0.160 with this, and 0.126 as a plain copy of the same bytes. Measured there on a grid over [-12, 12]: max
        absolute error of Phi 2.0e-7 (libdevice's erf: 6.9e-8), relative error 1.3e-5 down to x = -10 (libdevice:
        flushes to 0 below about -9); both far below the bf16 rounding of the GELU output."""
        z = tl.abs(x) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.5 * z)
        p = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
            0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
        half_erfc = 0.5 * t * tl.exp(p - z * z)
        return tl.where(x >= 0, 1.0 - half_erfc, half_erfc)

    @triton.jit
    def _gelu_fwd_kernel(f_ptr, keep_ptr, g_ptr, n, inv_keep, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
        # The flat block is an [BLOCK / 32, 32] tile, so that each row of it is one word of dropout decisions.
        W: tl.constexpr = BLOCK // 32
        wi = tl.program_id(0).to(tl.int64) * W + tl.arange(0, W)
        off = wi[:, None] * 32 + tl.arange(0, 32)[None, :]
        m = off < n
        x = tl.load(f_ptr + off, mask=m, other=0.0).to(tl.float32)
        g = x * _normal_cdf(x)
        if HAS_KEEP:
            words = tl.load(keep_ptr + wi, mask=wi * 32 < n, other=0)
            g = tl.where(((words[:, None] >> tl.arange(0, 32)[None, :]) & 1) != 0, g * inv_keep, 0.0)
        tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gelu_bwd_kernel(dg_ptr, f_ptr, keep_ptr, df_ptr, part_ptr, N, M, inv_keep, HAS_KEEP: tl.constexpr,
                         BC: tl.constexpr, ALIGNED: tl.constexpr):
        # Columns [cb BC, (cb + 1) BC) of rows pid, pid + nprog, ... as [BC / 32, 32] tiles (rows of 32 columns:
        # one word of decisions each when M % 32 == 0).
        cb = tl.program_id(0)
        pid = tl.program_id(1)
        nprog = tl.num_programs(1)
        W: tl.constexpr = BC // 32
        wi = cb * W + tl.arange(0, W)
        cols = wi[:, None] * 32 + tl.arange(0, 32)[None, :]
        cm = cols < M
        acc = tl.zeros([W, 32], tl.float32)
        for r in range(pid, N, nprog):
            r64 = tl.full([1], 0, tl.int64) + r  # int64 rows (a plain int in the interpreter)
            off = r64[:, None] * M + cols
            x = tl.load(f_ptr + off, mask=cm, other=0.0).to(tl.float32)
            d = tl.load(dg_ptr + off, mask=cm, other=0.0).to(tl.float32)
            if HAS_KEEP:
                if ALIGNED:
                    words = tl.load(keep_ptr + r64 * (M // 32) + wi, mask=wi * 32 < M, other=0)
                    k = ((words[:, None] >> tl.arange(0, 32)[None, :]) & 1) != 0
                else:
                    k = _kept(keep_ptr, off, cm)
                d = tl.where(k, d * inv_keep, 0.0)
            pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
            df = (d * (_normal_cdf(x) + x * pdf)).to(df_ptr.dtype.element_ty)
            tl.store(df_ptr + off, df, mask=cm)
            acc += df.to(tl.float32)
        tl.store(part_ptr + pid * M + cols, acc, mask=cm)


def gelu_forward(f, keep, inv_keep: float, *, interpret: bool = False):
    """``GELU(f) * keep * inv_keep`` (erf GELU in float32, one rounding to ``f``'s dtype). ``keep``: the dropout
    decisions packed 32 per int32 word (row-major, :func:`rearlib.kernels.pack_keep`), None = no dropout.
    The kernel's Phi is :func:`_normal_cdf` (relative error ~1e-7); the stand-in uses ``torch.erf``."""
    _check_keep(keep, f.numel())
    if not _use_kernel(f, interpret):
        return _gelu_fwd(f, keep, inv_keep)
    g = torch.empty_like(f)
    B = GELU_CONFIG["fwd_block"]
    _gelu_fwd_kernel[(triton.cdiv(f.numel(), B),)](f, keep if keep is not None else f, g, f.numel(), inv_keep,
                                                    HAS_KEEP=keep is not None, BLOCK=B,
                                                    num_warps=GELU_CONFIG["fwd_warps"])
    return g


def gelu_backward_partials(N: int, M: int, device, kernels: bool = True) -> tuple:
    """Shape of one :func:`gelu_backward` call's unreduced column sums ([programs, M]; 1 for the stand-in)."""
    return (_programs(GELU_CONFIG, device, N) if kernels else 1, M)


def gelu_backward(dg, f, keep, inv_keep: float, *, interpret: bool = False, parts: torch.Tensor | None = None):
    """Gradient of :func:`gelu_forward` with respect to ``f``, and its column sums (the fc1 bias gradient); with
    ``parts`` (see :func:`gelu_backward_partials`) the per-program column sums, unreduced."""
    _check_keep(keep, f.numel())
    if not _use_kernel(f, interpret):
        df, sums = _gelu_bwd(dg, f, keep, inv_keep)
        return df, (sums if parts is None else _use_partials(parts, sums))
    N, M = f.shape
    df = torch.empty_like(f)
    BC = GELU_CONFIG["bwd_cols"]
    part = parts if parts is not None else torch.empty(gelu_backward_partials(N, M, f.device), dtype=torch.float32,
                                                       device=f.device)
    P = part.shape[0]
    _gelu_bwd_kernel[(triton.cdiv(M, BC), P)](dg, f, keep if keep is not None else f, df, part, N, M, inv_keep,
                                              HAS_KEEP=keep is not None, BC=BC, ALIGNED=M % 32 == 0,
                                              num_warps=GELU_CONFIG["bwd_warps"])
    return df, (part if parts is not None else part.sum(0))


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------
#: Attention kernels of the Triton stack: "flash" = :mod:`rearlib.kernels.flash_attention` (default; measured faster at
#: reAR-B shapes on an H200, reports/small/bench/attention_flash_vs_cudnn_step.json), "cudnn" = the aten ops
#: behind ``scaled_dot_product_attention``.
ATTENTION_KERNELS = ("flash", "cudnn")
DEFAULT_ATTENTION = "flash"


def _attention_fwd(q, k, v, p: float, plan, bits=None):
    """Causal attention of [B, H, S, d] views; returns (out [B, H, S, d], saved state for the backward)."""
    if plan.backend == "triton" and plan.attention == "flash":
        o, lse, bits = flash_attention_forward(q, k, v, p, bits)
        return o, (lse, bits)
    if plan.backend == "triton":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, p, True, False)
        return res[0], (res[1], res[6], res[7])
    if p > 0:
        raise ValueError("the PyTorch stand-in of the fused stack has no attention dropout (tests use p = 0)")
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), None


def _attention_bwd(do, q, k, v, o, state, p: float, plan):
    if plan.backend == "triton" and plan.attention == "flash":
        lse, bits = state
        return flash_attention_backward(do, q, k, v, o, lse, bits, p)  # dq in float32: the QK-norm kernel reads it
    if plan.backend == "triton":
        lse, seed, offset = state
        S = q.shape[2]
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, o, lse, seed, offset, None, None, None, S, S, p, True)
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        return torch.autograd.grad(out, (qq, kk, vv), do)


# ----------------------------------------------------------------------------------------------------------------
# The stack
# ----------------------------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    depth: int
    heads: int
    dropout: float
    attn_dropout: float
    eps: float
    taps: tuple
    dtype: torch.dtype
    backend: str  # "triton" (CUDA) or "torch" (reference stand-ins)
    attention: str  # with "triton": "flash" or "cudnn" (ATTENTION_KERNELS)


def _keep_masks(plan: _Plan, N: int, C: int, hidden: int, device):
    """Every dropout mask of the step from one launch, packed 32 decisions per int32 word
    (:func:`rearlib.kernels.dropout_keep_bits`): per block (after proj [N, C], after the GELU [N, hidden], after
    fc2 [N, C]) as flat word pieces of one [depth, words] buffer; None without dropout."""
    if plan.dropout == 0.0:
        return [(None, None, None)] * plan.depth
    sizes = (N * C, N * hidden, N * C)
    words = [-(-n // 32) for n in sizes]
    if plan.backend == "triton":
        buf = dropout_keep_bits(plan.depth * sum(words) * 32, plan.dropout, _dropout_seed(device)).view(plan.depth, -1)
    else:
        buf = torch.stack([torch.cat([pack_keep(torch.rand(n, device=device) >= plan.dropout) for n in sizes])
                           for _ in range(plan.depth)])
    return [tuple(row.split(words)) for row in buf]


class _BlockStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, x0, cond, *params):
        with torch.autocast(x0.device.type, enabled=False):
            return _stack_forward(ctx, plan, x0, cond, params)

    @staticmethod
    def backward(ctx, dx_out, *dtaps):
        with torch.autocast(dx_out.device.type, enabled=False):
            return (None,) + _stack_backward(ctx, dx_out, dtaps)


#: Parameter indices (in :data:`BLOCK_PARAM_NAMES`) of the GEMM weights and biases the stack uses in the compute
#: dtype: qkv, proj, fc1, fc2 (weight, bias) and the adaLN modulation's.
_GEMM_PARAMS = (2, 3, 8, 9, 12, 13, 14, 15)


def _compute_dtype_params(P, dt):
    """Copies in ``dt`` of every GEMM weight and bias of the stack, from one multi-tensor copy (``_foreach_copy_``
    converts dtypes in a single kernel on CUDA, where per-tensor casts were 216 launches per reAR-B step). The
    adaLN weights and biases of all blocks land in one [D * 6C, C] matrix and one [D * 6C] vector (the single
    modulation GEMM's operands). Returns ``(W, w_ada, b_ada)``, ``W[i]`` block i's parameters with those replaced."""
    D, (sixC, C) = len(P), P[0][16].shape
    dev = P[0][16].device
    w_ada = torch.empty(D * sixC, C, dtype=dt, device=dev)
    b_ada = torch.empty(D * sixC, dtype=dt, device=dev)
    W, src, dst = [], [], []
    for i, p in enumerate(P):
        w = list(p)
        for j in _GEMM_PARAMS:
            w[j] = torch.empty(p[j].shape, dtype=dt, device=dev)
        w[16], w[17] = w_ada[i * sixC:(i + 1) * sixC], b_ada[i * sixC:(i + 1) * sixC]
        for j in _GEMM_PARAMS + (16, 17):
            src.append(p[j])
            dst.append(w[j])
        W.append(w)
    torch._foreach_copy_(dst, src)
    return W, w_ada, b_ada


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # mm with a float32 output from bf16 inputs (CUDA)


def _mm_hi(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` returned in float32 (at least): on CUDA cuBLAS writes the float32 accumulator directly, without a
    bf16 rounding and a separate cast kernel (the weight gradients' parameters are float32)."""
    if _MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return _hi(torch.mm(a, b))


def _stack_forward(ctx, plan: _Plan, x0, cond, params):
    B, S, C = x0.shape
    N, D, H, dt = B * S, plan.depth, plan.heads, plan.dtype
    d = C // H
    P = [params[i * _NP:(i + 1) * _NP] for i in range(D)]
    W, w_ada, b_ada = _compute_dtype_params(P, dt)
    silu_c = F.silu(_hi(cond.reshape(N, C))).to(dt)
    mod = torch.addmm(b_ada, silu_c, w_ada.t())  # [N, D * 6C]
    chunk = lambda i, j: mod[:, (6 * i + j) * C:(6 * i + j + 1) * C]  # noqa: E731 - j: shift1 scale1 gate1 shift2 scale2 gate2
    x = _hi(x0.reshape(N, C)).contiguous()
    layers, outs = [], []
    res = None
    masks = _keep_masks(plan, N, C, P[0][12].shape[0], x0.device)
    att_bits = [None] * D  # the attention-dropout decisions of every block, from one launch
    if plan.backend == "triton" and plan.attention == "flash" and plan.attn_dropout > 0:
        att_bits = attention_dropout_bits(B, H, S, plan.attn_dropout, attention_seed(x0.device, D))
    for i in range(D):
        p, w = P[i], W[i]
        ln1 = SiteLN(p[0], p[1], chunk(i, 0), chunk(i, 1), plan.eps)
        x, a1, mean1, rstd1 = site_forward(x, res, ln1, out_dtype=dt)
        if i > 0:
            outs.append(x)  # output of block i - 1
        qkv = torch.addmm(w[3], a1, w[2].t())
        qn, kn = qknorm_forward(qkv, p[4], p[5], p[6], p[7], (B, S, H, d), plan.eps, dt)
        q, k = qn.transpose(1, 2), kn.transpose(1, 2)
        v = qkv.view(B, S, 3, H, d)[:, :, 2].transpose(1, 2)
        o, att = _attention_fwd(q, k, v, plan.attn_dropout, plan, att_bits[i])
        o2 = o.transpose(1, 2).reshape(N, C)
        pr = torch.addmm(w[9], o2, w[8].t())
        keep_p, keep_g, keep_y = masks[i]
        ln2 = SiteLN(p[10], p[11], chunk(i, 3), chunk(i, 4), plan.eps)
        x1, a2, mean2, rstd2 = site_forward(x, SiteResidual(pr, keep_p, chunk(i, 2), plan.dropout), ln2, out_dtype=dt)
        f = torch.addmm(w[13], a2, w[12].t())
        g = gelu_forward(f, keep_g, 1.0 / (1.0 - plan.dropout))
        y = torch.addmm(w[15], g, w[14].t())
        res = SiteResidual(y, keep_y, chunk(i, 5), plan.dropout)
        layers.append(dict(xin=x, a1=a1, mean1=mean1, rstd1=rstd1, qkv=qkv, q=q, k=k, v=v, o=o, att=att, o2=o2,
                           pr=pr, keep_p=keep_p, x1=x1, a2=a2, mean2=mean2, rstd2=rstd2, f=f, keep_g=keep_g, g=g,
                           y=y, keep_y=keep_y))
        x = x1
    x, _, _, _ = site_forward(x, res, None, out_dtype=dt)
    outs.append(x)
    ctx.plan, ctx.shape, ctx.layers, ctx.last_res = plan, (B, S, C), layers, res
    ctx.W, ctx.P_dtypes = W, [[t.dtype for t in p] for p in P]
    ctx.silu_c, ctx.w_ada, ctx.mod, ctx.cond = silu_c, w_ada, mod, cond
    ctx.x0_dtype = x0.dtype
    # Outputs are kept as detached aliases: storing them as-is would tie the outputs to this node in a cycle.
    for L, xo in zip(layers[1:], outs[:-1]):
        L["xin"] = xo.detach()
    taps = tuple(outs[t].view(B, S, C) for t in plan.taps)
    return (outs[-1].view(B, S, C),) + taps


def _stack_backward(ctx, dx_out, dtaps):
    plan, (B, S, C), layers, W = ctx.plan, ctx.shape, ctx.layers, ctx.W
    N, D, H, dt = B * S, plan.depth, plan.heads, plan.dtype
    d = C // H
    inv = 1.0 / (1.0 - plan.dropout)
    dmod = torch.empty(N, D * 6 * C, dtype=dt, device=dx_out.device)
    dchunk = lambda i, j: dmod[:, (6 * i + j) * C:(6 * i + j + 1) * C]  # noqa: E731
    mchunk = lambda i, j: ctx.mod[:, (6 * i + j) * C:(6 * i + j + 1) * C]  # noqa: E731
    tap_grad = {t: g for t, g in zip(plan.taps, dtaps) if g is not None}
    grads = [[None] * _NP for _ in range(D)]
    # The column sums (LayerNorm, bias and adaLN-bias gradients) stay per-program partials until the end, where one
    # reduction per kernel type replaces one per call (~120 reduction launches per reAR-B step). Sites are numbered
    # in the order they run: 0 = after the last block, then block i's LN2 site k2(i) and LN1 site k2(i) + 1.
    dev, kern = dx_out.device, plan.backend == "triton"
    f32 = dict(dtype=torch.promote_types(dt, torch.float32), device=dev)  # float64 in the CPU tests
    site_parts = torch.empty((2 * D + 1,) + site_backward_partials(N, C, dev, kern), **f32)
    gelu_parts = torch.empty((D,) + gelu_backward_partials(N, layers[0]["f"].shape[1], dev, kern), **f32)
    qk_parts = torch.empty((D,) + qknorm_backward_partials(N, H, d, dev, kern), **f32)
    k2 = lambda i: 2 * (D - 1 - i) + 1  # noqa: E731

    dx = _hi(dx_out.reshape(N, C)).clone(memory_format=torch.contiguous_format)  # grads are materialised
    if D - 1 in tap_grad:
        dx += _hi(tap_grad[D - 1].reshape(N, C))
    res = ctx.last_res
    _, dy, _ = site_backward(dx, None, None, None, None, res, None, dgate=dchunk(D - 1, 5), branch_dtype=dt,
                             parts=site_parts[0])
    for i in range(D - 1, -1, -1):
        L, w, gr = layers[i], W[i], grads[i]
        # MLP
        gr[14] = _mm_hi(dy.t(), L["g"])
        dg = torch.mm(dy, w[14])
        df, _ = gelu_backward(dg, L["f"], L["keep_g"], inv, parts=gelu_parts[i])
        gr[12] = _mm_hi(df.t(), L["a2"])
        da2 = torch.mm(df, w[12])
        del dg, df, dy
        # LN2 site (with the attention branch's residual)
        ln2 = SiteLN(w[10], w[11], mchunk(i, 3), mchunk(i, 4), plan.eps)
        r2 = SiteResidual(L["pr"], L["keep_p"], mchunk(i, 2), plan.dropout)
        _, dpr, _ = site_backward(dx, da2, L["x1"], L["mean2"], L["rstd2"], r2, ln2, dgate=dchunk(i, 2),
                                  dshift=dchunk(i, 3), dscale=dchunk(i, 4), branch_dtype=dt, parts=site_parts[k2(i)])
        # attention
        gr[8] = _mm_hi(dpr.t(), L["o2"])
        do = torch.mm(dpr, w[8]).view(B, S, H, d).transpose(1, 2)
        dq, dk, dv = _attention_bwd(do, L["q"], L["k"], L["v"], L["o"], L["att"], plan.attn_dropout, plan)
        del do, dpr
        dqkv, _ = qknorm_backward(dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), L["qkv"], w[4], w[6],
                                  (B, S, H, d), plan.eps, parts=qk_parts[i])
        gr[2] = _mm_hi(dqkv.t(), L["a1"])
        da1 = torch.mm(dqkv, w[2])
        del dq, dk, dv, dqkv
        # LN1 site (with the previous block's MLP residual)
        if i - 1 in tap_grad:
            dx += _hi(tap_grad[i - 1].reshape(N, C))
        ln1 = SiteLN(w[0], w[1], mchunk(i, 0), mchunk(i, 1), plan.eps)
        res = None
        if i > 0:
            res = SiteResidual(layers[i - 1]["y"], layers[i - 1]["keep_y"], mchunk(i - 1, 5), plan.dropout)
        _, dy, _ = site_backward(dx, da1, L["xin"], L["mean1"], L["rstd1"], res, ln1,
                                 dgate=dchunk(i - 1, 5) if i > 0 else None, dshift=dchunk(i, 0),
                                 dscale=dchunk(i, 1), branch_dtype=dt, parts=site_parts[k2(i) + 1])
    # the column sums, rows as in SUM_ROWS: ln_weight ln_bias shift scale gate branch
    sums = site_parts.sum(1)  # [2D + 1, 6, C]
    gelu_sums = gelu_parts.sum(1)
    dwq, dbq, dwk, dbk, dbqkv = qknorm_param_grads(qk_parts.sum(1), H, d)
    ada_bias = []  # [block][shift1 scale1 gate1 shift2 scale2 gate2], gathered by one stack below
    for i in range(D):
        gr, s2, s1 = grads[i], sums[k2(i)], sums[k2(i) + 1]
        s_res = sums[0] if i == D - 1 else sums[k2(i + 1) + 1]  # the site holding block i's MLP residual
        gr[0], gr[1], gr[10], gr[11], gr[9], gr[15] = s1[0], s1[1], s2[0], s2[1], s2[5], s_res[5]
        gr[3], gr[4], gr[5], gr[6], gr[7], gr[13] = dbqkv[i], dwq[i], dbq[i], dwk[i], dbk[i], gelu_sums[i]
        ada_bias += [s1[2], s1[3], s2[4], s2[2], s2[3], s_res[4]]
    # adaLN of all blocks: one GEMM each for the weight and the input gradient
    dw_ada = _mm_hi(dmod.t(), ctx.silu_c)  # [D * 6C, C]
    dsilu = _mm_hi(dmod, ctx.w_ada)  # [N, C]
    c = _hi(ctx.cond.reshape(N, C))
    sig = torch.sigmoid(c)
    dcond = (dsilu * (sig * (1 + c * (1 - sig)))).view(ctx.cond.shape).to(ctx.cond.dtype)
    bias_ada = torch.stack(ada_bias).view(D, 6 * C)
    for i in range(D):
        grads[i][16] = dw_ada[i * 6 * C:(i + 1) * 6 * C]
        grads[i][17] = bias_ada[i]
    flat = []
    for gr, dts in zip(grads, ctx.P_dtypes):
        flat.extend(g.to(t) if g is not None else None for g, t in zip(gr, dts))
    return (dx.view(B, S, C).to(ctx.x0_dtype), dcond) + tuple(flat)


@torch.compiler.disable
def fused_block_stack(config, blocks: Sequence[torch.nn.Module], x: torch.Tensor, cond: torch.Tensor,
                      taps: Sequence[int] = (), *, dtype: torch.dtype = torch.bfloat16, backend: str = "triton",
                      attention: str | None = None):
    """Run ``blocks`` (the :class:`rearlib.model.Block` modules of a generator with ``config``) in training mode
    on ``x`` [B, S, C] with the per-position condition ``cond`` [B, S, C]; returns ``(x_out, {tap: output of
    block tap})`` as the module loop does. ``backend="triton"`` needs CUDA; ``"torch"`` is the plain-PyTorch
    stand-in (no attention dropout) that the CPU tests compare with the modules. ``attention``: the Triton
    backend's attention kernels (:data:`ATTENTION_KERNELS`; None = :data:`DEFAULT_ATTENTION`)."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    attention = DEFAULT_ATTENTION if attention is None else attention
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    if backend == "triton" and not (x.is_cuda and triton_available()):
        raise RuntimeError("the Triton block stack needs a CUDA tensor and Triton")
    taps = tuple(sorted(set(int(t) for t in taps)))
    plan = _Plan(len(blocks), config.heads, config.dropout, config.attn_dropout, blocks[0].norm1.eps, taps,
                 dtype, backend, attention)
    params = [blk.get_parameter(n) for blk in blocks for n in BLOCK_PARAM_NAMES]
    out = _BlockStack.apply(plan, x, cond, *params)
    return out[0], dict(zip(taps, out[1:]))
