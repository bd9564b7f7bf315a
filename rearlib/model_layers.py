"""The layers of a :class:`rearlib.model.Generator` (exact definitions in :mod:`rearlib.model`'s docstring):
dropout, attention (training, prefill and one-token decode), MLP, the adaLN-Zero block, the final adaLN, the
tied-codebook head and code lift, and the alignment heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.kernels.ops import decode_attention, dropout, register_ops
from rearlib.model_config import GeneratorConfig
from rearlib.model_kv_cache import _CacheView, _flex_single_query_attention, _single_query_attention

__all__ = ["Dropout", "Attention", "Mlp", "Block", "FinalAdaLN", "TiedLMHead", "CodeLift"]

_LN_EPS = 1e-6


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose masks come from :func:`rearlib.kernels.dropout` (the fast mask kernel on CUDA)."""

    def __init__(self, p: float, kernel: str = "auto"):
        super().__init__(p)
        self.kernel = kernel
        if kernel == "auto" and p > 0 and torch.cuda.is_available():
            register_ops()  # here, outside torch.compile, not at the first (compiled) forward

    def forward(self, x):
        return dropout(x, self.p, self.training, self.kernel)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float, dropout_kernel: str = "auto"):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=_LN_EPS)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=_LN_EPS)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop, dropout_kernel)

    def forward(self, x: torch.Tensor, cache: _CacheView | None = None) -> torch.Tensor:
        B, S, C = x.shape
        # QK-norm on the [B, S, H, d] views, then transpose: SDPA gets BSHD-strided q/k/v, so in training cuDNN
        # writes O, dQ, dK and dV in that layout and no transposing copies surround the attention (one H200:
        # reAR-B training 746 -> 800-803 samples/s, reports/small/bench/train_qknorm_layout_ab.json). For a
        # one-position decode step the transposed views have the memory layout of contiguous [B, H, 1, d].
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            # Training / full recomputation: causal over the whole sequence (CLS and class token included).
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.attn_drop if self.training else 0.0)
        elif cache.pos is None:
            # Prefill from position 0: store k/v, attend causally among the new positions only.
            cache.k[:, :, :S] = k.to(cache.k.dtype)
            cache.v[:, :, :S] = v.to(cache.v.dtype)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # One decode step: write this position, attend over a static window [0, kv_len) masked to <= pos.
            cache.k.index_copy_(2, cache.pos, k.to(cache.k.dtype))
            cache.v.index_copy_(2, cache.pos, v.to(cache.v.dtype))
            kc, vc = cache.k[:, :, :cache.kv_len], cache.v[:, :, :cache.kv_len]
            if cache.attention == "triton":
                o = decode_attention(q, cache.k, cache.v, cache.pos)
            elif cache.attention == "reduce":
                o = _single_query_attention(q, kc, vc, cache.mask)
            elif cache.attention == "flex":
                o = _flex_single_query_attention(q.to(kc.dtype), kc, vc, cache.pos)
            else:
                o = F.scaled_dot_product_attention(q.to(kc.dtype), kc, vc, attn_mask=cache.mask)
        o = o.transpose(1, 2).reshape(B, S, C)
        if not torch.is_autocast_enabled(o.device.type) and o.dtype != x.dtype:
            o = o.to(x.dtype)
        return self.proj_drop(self.proj(o))



class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> dropout -> fc2 -> dropout (timm's ``Mlp`` layout, names fc1/fc2)."""

    def __init__(self, dim: int, hidden: int, drop: float, dropout_kernel: str = "auto"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = Dropout(drop, dropout_kernel)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = Dropout(drop, dropout_kernel)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-LN DiT block with adaLN-Zero; the condition ``c`` is per position ([B, S, C])."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        C = cfg.hidden
        self.norm1 = nn.LayerNorm(C, eps=_LN_EPS)
        self.attn = Attention(C, cfg.heads, cfg.attn_dropout, cfg.dropout, cfg.dropout_kernel)
        self.norm2 = nn.LayerNorm(C, eps=_LN_EPS)
        self.mlp = Mlp(C, cfg.mlp_hidden, cfg.dropout, cfg.dropout_kernel)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x, c, cache: _CacheView | None = None, mod: torch.Tensor | None = None):
        """``mod``: this block's precomputed ``adaLN_modulation(c)`` [..., 6C] (the decode step computes every
        block's in one GEMM, see :meth:`Generator.stacked_block_adaln`); None computes it here from ``c``."""
        mod = self.adaLN_modulation(c) if mod is None else mod
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1), cache)
        x = x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))
        return x


class FinalAdaLN(nn.Module):
    """LayerNorm without affine, then ``* (1 + scale) + shift`` with (scale, shift) = chunk(Linear(SiLU(c)), 2)."""

    def __init__(self, C: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(C, eps=_LN_EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return _modulate(self.norm_final(x), shift, scale)


class TiedLMHead(nn.Module):
    """Tied-codebook output: logits = proj(h) @ U.T + bias, U the code table [K, D] shared with the input side (the
    frozen RMS-normalised codebook, or its :class:`CodeLift`)."""

    def __init__(self, C: int, D: int, K: int):
        super().__init__()
        self.proj = nn.Linear(C, D)
        self.bias = nn.Parameter(torch.zeros(K))

    def forward(self, h, codes):
        return self.proj(h) @ codes.to(h.dtype).t() + self.bias


class CodeLift(nn.Module):
    """Code vectors e [.., z] -> u = normalize(fc2(GELU(fc1(e)))) [.., D], one unit vector per code.

    A linear map would keep the K lifted codes in a z-dimensional subspace; the GELU lets them span up to
    min(K, D) dimensions. Unit length fixes the scale of the shared table, so the learned ``codebook_in`` /
    ``proj`` set the input and logit scales (a unit row times the 0.02-std init of ``codebook_in`` gives the
    0.02-std entries of the untied embedding table).
    """

    def __init__(self, z: int, D: int):
        super().__init__()
        self.fc1 = nn.Linear(z, D)
        self.fc2 = nn.Linear(D, D)

    def forward(self, codes):
        return F.normalize(self.fc2(F.gelu(self.fc1(codes))), dim=-1)


def _align_mlp(cfg: GeneratorConfig) -> nn.Sequential:
    P = cfg.projector_dim
    if cfg.align_head == "silu3":
        return nn.Sequential(nn.Linear(cfg.hidden, P), nn.SiLU(), nn.Linear(P, P), nn.SiLU(), nn.Linear(P, cfg.z_dim))
    return nn.Sequential(nn.Linear(cfg.hidden, P), nn.GELU(), nn.Linear(P, cfg.z_dim))

