"""Cached decoding of a :class:`rearlib.model.Generator`: the static :class:`KVCache`, the per-layer view the
attention layers receive, and the single-query attention kernels a decode step can use (:data:`DECODE_ATTENTION`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["KVCache", "DECODE_ATTENTION"]


class KVCache:
    """Static per-layer key/value cache for ``batch`` rows and ``max_len`` sequence positions.

    ``k[l]`` and ``v[l]`` are ``[batch, heads, max_len, head_dim]`` tensors allocated once (zeros) and written in
    place by position (prefill writes ``[0, S)``, a decode step writes one position) - never grown with ``cat``,
    so their addresses are stable (a requirement of CUDA-graph replay). ``max_len = N + 1`` suffices for sampling:
    the last token x_N is never fed back. The cache is a plain object passed explicitly to
    :meth:`Generator.prefill` / :meth:`Generator.decode_step`.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int, *,
                 device=None, dtype=torch.float32):
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs batch > 0 and max_len > 0, got {batch}, {max_len}")
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.batch, self.max_len, self.dtype = batch, max_len, dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def zero_(self) -> "KVCache":
        for t in self.k + self.v:
            t.zero_()
        return self


class _CacheView(NamedTuple):
    """What one attention layer needs for cached inference (built by Generator, passed down explicitly)."""

    k: torch.Tensor          # [B, H, max_len, hd] (this layer's slice of the KVCache)
    v: torch.Tensor
    pos: torch.Tensor | None  # decode: LongTensor [1], sequence position of the single new token; prefill: None
    kv_len: int              # decode: attend over cache positions [0, kv_len) (static, >= pos + 1)
    mask: torch.Tensor | None  # decode: bool [1, 1, 1, kv_len], True where position <= pos
    attention: str = "sdpa"  # decode kernel, one of DECODE_ATTENTION (see Generator.decode_step)


#: Kernels a decode step can attend with (all compute the same masked softmax attention; the choice is speed):
#: "sdpa": F.scaled_dot_product_attention with the window mask (eager default); "reduce": two float32
#: multiply-and-sum reductions that torch.compile fuses (see _single_query_attention); "flex": FlexAttention,
#: whose split-KV decoding kernel torch.compile generates (CUDA + torch.compile only); "triton": our kernel
#: (rearlib.kernels.decode_attention) that reads exactly positions [0, pos] whatever the window (CUDA + Triton).
DECODE_ATTENTION = ("sdpa", "reduce", "flex", "triton")


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked to ``mask``) v for one query per (row, head): q [B, H, 1, d], k/v [B, H, W, d].

    Written as two multiply-and-sum reductions accumulated in float32 (as SDPA's kernels accumulate) instead of
    calling SDPA: with an explicit mask and a single query, SDPA dispatched to a cuDNN kernel that took 83 us per
    layer, 58% of a reAR-B decode step on an H200 (batch 128 with CFG, profiled); these took 34 us at the same
    window. Meant for torch.compile, where the casts fuse into the reductions (the bf16 cache is never
    materialised in float32); eagerly SDPA is faster.
    """
    scores = (q.float() * k.float()).sum(-1, keepdim=True) * (q.shape[-1] ** -0.5)  # [B, H, W, 1]
    scores = scores.masked_fill(~mask.view(1, 1, -1, 1), float("-inf"))
    probs = torch.softmax(scores, dim=2)
    return (probs * v.float()).sum(2, keepdim=True).to(v.dtype)  # [B, H, 1, d]


def _flex_single_query_attention(q, k, v, pos):
    """FlexAttention over the static window with keys after ``pos`` masked out (q [B, H, 1, d], pos LongTensor [1])."""
    # Here, not at the top: FlexAttention exists from torch 2.5 on, and only this optional kernel needs it.
    from torch.nn.attention.flex_attention import flex_attention

    def keep_up_to_pos(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= pos[0], score, float("-inf"))

    return flex_attention(q, k, v, score_mod=keep_up_to_pos)

