"""The reAR / RAR DiT-style causal transformer, its static KV cache and official-checkpoint loading.

The network (``Generator``) computes the same function as the authors' ``modeling/rear.py``
(github.com/QY-H00/reAR @ 61cc871, derived from bytedance/1d-tokenizer RAR) and uses the same parameter names,
so their released state dicts load with strict name and shape checks. Nothing here is copied from that code; it
is written from the description in ``docs/paper.md``, reAR §1.2-§1.6, and checked against the
authors' own outputs (``shared/reference/fixtures/official_rear_tiny_seed0.pt``, see
``tests/test_official_conformance.py``).

Exact definitions (K = codebook size, N = image tokens, C = width, M = number of classes):

* **Id space** - one shared ``embeddings`` table with K + 1 + M + 1 rows: image tokens ``0..K-1``, mask token
  ``K`` (only used by the "mask" perturbation mode), class ``c`` -> ``K + 1 + c``, null class -> ``K + 1 + M``.
  The public API takes class *labels* in ``[0, M]``; label ``M`` (``model.null_class``) is the null class used by
  classifier-free guidance and label dropout.
* **Sequence** (length S = L + 2 for L image tokens): ``[CLS, class, x_1 .. x_L]``; CLS is the learnable vector
  ``cls_token``. Sequence position ``p``: CLS at 0, the class token at 1, ``x_t`` at ``t + 1``.
* **Positional embeddings** added to the sequence: ``pos_embed[p]`` (table N + ``pos_extra`` rows) plus the
  RAR "target-aware" embedding that tells each position *which position it predicts*: CLS gets zero, the position
  that predicts ``x_t`` (the class token for t = 1, ``x_{t-1}`` otherwise) gets ``target_aware_pos_embed[t + 1]``
  (the row of the target's own sequence position), and the last token of a complete sequence (``x_N``, which
  predicts nothing) gets zero. A prefix of length L < N uses the first L + 2 entries of this layout.
* **Condition** (adaLN input) at position ``p``: ``embeddings[class id] + timesteps_embeddings[p]``
  (table N + ``time_extra`` rows) - the class embedding is both the sequence token at position 1 and, per
  position, the adaLN condition of every block and of the final layer.
* **Block** (pre-LN, adaLN-Zero, 6C modulation ``SiLU -> Linear(C, 6C)`` chunked as
  shift/scale/gate for attention then for the MLP): ``x += g1 * Attn(LN1(x) * (1 + s1) + b1)``,
  ``x += g2 * MLP(LN2(x) * (1 + s2) + b2)``. LN1/LN2 are affine LayerNorms (eps 1e-6). Attention has a qkv bias,
  QK-norm (affine LayerNorm over the head dimension, eps 1e-6), causal mask over the whole sequence, attention
  dropout, and dropout after the output projection. MLP: ``fc1 (C -> ratio*C), GELU (erf), dropout, fc2, dropout``.
* **Head**: drop the CLS position, final adaLN (LayerNorm without affine, eps 1e-6; ``SiLU -> Linear(C, 2C)``
  chunked as **scale, shift** - RAR's order, the reverse of the blocks'), then ``lm_head`` Linear(C -> K) with bias.
  Output position ``i`` (0 = class token) gives the logits of ``x_{i+1}``. The head runs in float32 even under
  autocast (logits are always float32).
* **Alignment heads** (reAR codebook-embedding regularization) read the output of block ``encode_align_layer`` /
  ``decode_align_layer`` (0-based, before the final adaLN) over all S positions. ``align_head="silu3"`` (default,
  the released code, REPA's ``build_mlp``): ``Linear(C, P), SiLU, Linear(P, P), SiLU, Linear(P, z)``;
  ``"gelu2"`` (the paper's text, App. A): ``Linear(C, P), GELU, Linear(P, z)``. P = ``projector_dim``,
  z = ``z_dim`` = the tokenizer's code dimension. Unlike the official code (an if/elif), both heads may tap the
  same block.
* **Init**: Linear and Embedding weights and the learnable vectors/tables ~ truncated normal (std 0.02,
  cut at +-2 absolute as timm's ``trunc_normal_``), biases 0, LayerNorm weight 1 / bias 0, and the adaLN output
  Linear of every block and of the final layer all zero (adaLN-Zero): a fresh model's blocks are the identity.

``tied_codebook=True`` builds the paper's "tied codebook embedding" baseline (docs/paper.md, reAR §6 item 13; the
paper does not describe it, this is our construction): image-token inputs are ``codebook_in(E[x])`` with ``E`` the
frozen codebook buffer (set with :meth:`Generator.set_codebook`, rescaled by one scalar to unit RMS) and
``codebook_in = Linear(z -> C)``; logits are ``lm_head.proj(h) @ E.T + lm_head.bias`` with
``lm_head.proj = Linear(C -> z)``. Mask/class/null ids keep the ``embeddings`` table (its image rows are unused).

Training attention always uses ``F.scaled_dot_product_attention(is_causal=True)`` (no float mask, so the flash
kernel is eligible). Cached decoding takes an explicit :class:`KVCache` object as an argument - no module holds a
"caching enabled" flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.checkpoints import StateDictMismatchError, check_state_dict
from rearlib.kernels.fused_blocks import fused_block_stack
from rearlib.kernels.ops import DROPOUT_KERNELS, decode_attention, dropout, register_ops, triton_available

__all__ = [
    "GeneratorConfig",
    "GeneratorOutput",
    "Generator",
    "KVCache",
    "PRESETS",
    "build_generator",
    "get_config",
    "count_parameters",
    "estimate_flops_per_token",
    "infer_config_from_state_dict",
    "check_state_dict",
    "load_official_state_dict",
    "StateDictMismatchError",
]

_LN_EPS = 1e-6
#: GeneratorConfig.block_kernels: "auto" = the hand-scheduled block stack of :mod:`rearlib.kernels.fused_blocks` when
#: training on CUDA under bf16 autocast; "module" = always the Block modules (compiled by torch.compile).
BLOCK_KERNELS = ("auto", "module")


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a :class:`Generator` (all sizes exact; see the module docstring for the function).

    hidden: width C. depth: number of blocks. heads: attention heads (C % heads == 0).
    codebook_size: K image-token ids. num_classes: M class labels (plus one null class).
    seq_len: N image tokens per image (raster order). mlp_ratio: MLP hidden = int(C * mlp_ratio).
    dropout: on the attention output projection and inside the MLP. attn_dropout: on attention probabilities.
    dropout_kernel: where the ``dropout`` masks come from: "auto" = :func:`rearlib.kernels.dropout_keep_mask` on
    CUDA (the distribution of ``nn.Dropout`` with p to 2^-17, a different random stream, eight mask elements per
    Philox call), ``F.dropout`` elsewhere; "torch" = ``F.dropout`` everywhere. Speed only; attention-probability
    dropout stays in SDPA.
    block_kernels: "auto" = in CUDA training under bf16 autocast the blocks run as :func:`rearlib.kernels.fused_blocks.
    fused_block_stack` (same function, hand-scheduled: one adaLN GEMM for all blocks, Triton kernels; +7% samples/s
    on reAR-B in one A/B, more once tuned, see docs/performance.md); "module" = always the Block modules. Speed only.
    encode_align_layer / decode_align_layer: 0-based block whose output feeds the encode ("EN") / decode ("DE")
    alignment head; ``None`` disables that head. They may be equal (the official code cannot do that).
    align_head: "silu3" = Linear(C,P)-SiLU-Linear(P,P)-SiLU-Linear(P,z) as in the released code (default);
    "gelu2" = Linear(C,P)-GELU-Linear(P,z) as the paper's App. A describes.
    projector_dim: P. z_dim: the tokenizer's code dimension (alignment targets; tied-codebook projection size).
    tied_codebook: the "tied codebook embedding" baseline (module docstring).
    pos_extra / time_extra: extra rows of the positional / timestep tables beyond N (1024 / 100 as RAR).
    """

    hidden: int
    depth: int
    heads: int
    codebook_size: int
    num_classes: int
    seq_len: int
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attn_dropout: float = 0.1
    dropout_kernel: str = "auto"
    block_kernels: str = "auto"
    encode_align_layer: int | None = 0
    decode_align_layer: int | None = None
    align_head: str = "silu3"
    projector_dim: int = 2048
    z_dim: int = 256
    tied_codebook: bool = False
    pos_extra: int = 1024
    time_extra: int = 100

    def __post_init__(self):
        for name in ("hidden", "depth", "heads", "codebook_size", "num_classes", "seq_len", "projector_dim", "z_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GeneratorConfig.{name} must be a positive int, got {v!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        for name in ("encode_align_layer", "decode_align_layer"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.depth):
                raise ValueError(f"{name}={v} is not a block index in [0, {self.depth - 1}] (or None to disable)")
        if self.align_head not in ("silu3", "gelu2"):
            raise ValueError(f"align_head must be 'silu3' or 'gelu2', got {self.align_head!r}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dropout_kernel not in DROPOUT_KERNELS:
            raise ValueError(f"dropout_kernel must be one of {DROPOUT_KERNELS}, got {self.dropout_kernel!r}")
        if self.block_kernels not in BLOCK_KERNELS:
            raise ValueError(f"block_kernels must be one of {BLOCK_KERNELS}, got {self.block_kernels!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.pos_extra < 2 or self.time_extra < 2:
            raise ValueError("pos_extra and time_extra must be >= 2 (the sequence has N + 2 positions)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def vocab_size(self) -> int:
        """Rows of the shared embedding table: K image ids + mask + M classes + null."""
        return self.codebook_size + 1 + self.num_classes + 1

    def replace(self, **overrides) -> "GeneratorConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown GeneratorConfig fields {sorted(unknown)}; "
                             f"known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Presets. "tiny" is exactly the architecture of the official conformance fixture (so CPU tests and the fixture
# share one config; 0.45M parameters). "small" is ours for the 64 px embedded dataset (16x16 = 256 tokens):
# 8 x 256 with 4 heads (head dim 64, as the paper's models), DE at block 6 of 8 (the paper's 15/20 and 18/24 are
# both index/depth = 0.75), EN at 0; about 9.5M parameters without heads. It is sized by what this project can
# afford and ship: each AR/reAR run trains in a few minutes on one H200, the fp16 weights fit in two 16 MiB
# shards, and one decode step takes milliseconds on a laptop CPU (the teaching widgets sample live). The
# projector is 512 wide (2x hidden; the paper's 2048 is 2.7x its 768). Training overrides codebook_size /
# z_dim / num_classes to the tokenizer and dataset actually used. The "rear_*" presets are the released
# configs (configs/rear_{s,b,l}.yaml).
PRESETS: dict[str, GeneratorConfig] = {
    "tiny": GeneratorConfig(hidden=64, depth=4, heads=4, codebook_size=32, num_classes=10, seq_len=16,
                            encode_align_layer=0, decode_align_layer=2, projector_dim=128, z_dim=16),
    "small": GeneratorConfig(hidden=256, depth=8, heads=4, codebook_size=1024, num_classes=10, seq_len=256,
                             encode_align_layer=0, decode_align_layer=6, projector_dim=512, z_dim=32),
    "rear_s": GeneratorConfig(hidden=768, depth=20, heads=16, codebook_size=1024, num_classes=1000, seq_len=256,
                              encode_align_layer=0, decode_align_layer=15),
    "rear_b": GeneratorConfig(hidden=768, depth=24, heads=16, codebook_size=1024, num_classes=1000, seq_len=256,
                              encode_align_layer=0, decode_align_layer=18),
    "rear_l": GeneratorConfig(hidden=1024, depth=24, heads=16, codebook_size=1024, num_classes=1000, seq_len=256,
                              encode_align_layer=0, decode_align_layer=18),
}


def get_config(preset_or_config: str | GeneratorConfig | dict, **overrides) -> GeneratorConfig:
    """Resolve a preset name, a config or a dict of config fields, then apply ``overrides``."""
    if isinstance(preset_or_config, GeneratorConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, dict):
        cfg = GeneratorConfig(**preset_or_config)
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown generator preset {preset_or_config!r}; presets: {sorted(PRESETS)}")
        cfg = PRESETS[preset_or_config]
    else:
        raise TypeError(f"expected a preset name, GeneratorConfig or dict, got {type(preset_or_config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg


class GeneratorOutput(NamedTuple):
    """logits [B, L, K] (position i predicts x_{i+1}; position 0 is the class token);
    encode_z / decode_z [B, L + 2, z]: alignment-head outputs over [CLS, class, x_1..x_L], or None."""

    logits: torch.Tensor
    encode_z: torch.Tensor | None
    decode_z: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
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
    from torch.nn.attention.flex_attention import flex_attention

    def keep_up_to_pos(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= pos[0], score, float("-inf"))

    return flex_attention(q, k, v, score_mod=keep_up_to_pos)


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
    """Tied-codebook output: logits = proj(h) @ E.T + bias, E the (frozen, RMS-normalised) codebook [K, z]."""

    def __init__(self, C: int, z: int, K: int):
        super().__init__()
        self.proj = nn.Linear(C, z)
        self.bias = nn.Parameter(torch.zeros(K))

    def forward(self, h, codebook):
        return self.proj(h) @ codebook.to(h.dtype).t() + self.bias


def _align_mlp(cfg: GeneratorConfig) -> nn.Sequential:
    P = cfg.projector_dim
    if cfg.align_head == "silu3":
        return nn.Sequential(nn.Linear(cfg.hidden, P), nn.SiLU(), nn.Linear(P, P), nn.SiLU(), nn.Linear(P, cfg.z_dim))
    return nn.Sequential(nn.Linear(cfg.hidden, P), nn.GELU(), nn.Linear(P, cfg.z_dim))


# ----------------------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """reAR / RAR class-conditional raster AR transformer (see the module docstring for exact definitions).

    ``forward(tokens [B, L], classes [B], *, align=False) -> GeneratorOutput`` with L <= N (L = N in training;
    a [B, h, w] grid is flattened row-major). Class labels are in ``[0, num_classes]``; ``num_classes`` is the
    null class (``self.null_class``).
    """

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        cfg = self.config = config
        C, N = cfg.hidden, cfg.seq_len
        # Registration order = the official state-dict order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + cfg.pos_extra, C))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, N + cfg.pos_extra, C))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, N + cfg.time_extra, C))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        # _weight skips nn.Embedding's own normal_ init (reset_parameters() below re-initialises it anyway); on the
        # meta device that normal_ would import torch._dynamo (~10 s), which layout checks do not need.
        self.embeddings = nn.Embedding(cfg.vocab_size, C, _weight=torch.empty(cfg.vocab_size, C))
        self.adaln_before_head = FinalAdaLN(C)
        if cfg.tied_codebook:
            self.register_buffer("codebook", torch.zeros(cfg.codebook_size, cfg.z_dim))
            self.codebook_in = nn.Linear(cfg.z_dim, C)
            self.lm_head = TiedLMHead(C, cfg.z_dim, cfg.codebook_size)
            self._codebook_ready = False
            self.register_load_state_dict_post_hook(_mark_codebook_ready)
        else:
            self.lm_head = nn.Linear(C, cfg.codebook_size)
        self.encode_align_mlp = _align_mlp(cfg) if cfg.encode_align_layer is not None else None
        self.decode_align_mlp = _align_mlp(cfg) if cfg.decode_align_layer is not None else None
        self.reset_parameters()

    # ---- init --------------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) Linear/Embedding/tables, zero biases, unit LayerNorms, zero adaLN outputs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.adaln_before_head.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaln_before_head.adaLN_modulation[-1].bias)
        if self.config.tied_codebook:
            nn.init.zeros_(self.lm_head.bias)

    # ---- ids / small helpers -----------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def mask_token_id(self) -> int:
        return self.config.codebook_size

    def class_token_ids(self, classes: torch.Tensor) -> torch.Tensor:
        """Embedding-table ids of class labels (label c -> K + 1 + c; the null label M -> K + 1 + M)."""
        return classes + (self.config.codebook_size + 1)

    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Tied-codebook mode only: store the tokenizer codebook [K, z] (frozen), rescaled to unit RMS.

        The single scalar rescale keeps the tied input/output well conditioned whatever the tokenizer's code
        scale; it is absorbed by the trainable ``codebook_in`` / ``lm_head.proj`` and changes nothing else.
        """
        if not self.config.tied_codebook:
            raise ValueError("set_codebook() is only for tied_codebook=True models")
        K, z = self.config.codebook_size, self.config.z_dim
        if tuple(codebook.shape) != (K, z):
            raise ValueError(f"codebook must have shape [{K}, {z}] (codebook_size, z_dim), got {tuple(codebook.shape)}")
        cb = codebook.detach().to(self.codebook.device, torch.float32)
        rms = cb.pow(2).mean().sqrt().clamp_min(1e-12)
        self.codebook.copy_(cb / rms)
        self._codebook_ready = True

    def _check_inputs(self, tokens: torch.Tensor, classes: torch.Tensor, *, max_len: int | None = None):
        """Shape/dtype checks always; value-range checks unless compiling (they need one host sync on GPU)."""
        cfg = self.config
        max_len = cfg.seq_len if max_len is None else max_len
        if tokens.dim() == 3:
            tokens = tokens.flatten(1)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L] (or a [B, h, w] grid), got shape {tuple(tokens.shape)}")
        if classes.dim() != 1 or classes.shape[0] != tokens.shape[0]:
            raise ValueError(f"classes must be [B] with B = {tokens.shape[0]}, got shape {tuple(classes.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or classes.is_floating_point() or classes.is_complex():
            raise ValueError(f"tokens and classes must be integer tensors, got {tokens.dtype} and {classes.dtype}")
        if tokens.shape[1] > max_len:
            raise ValueError(f"got {tokens.shape[1]} tokens; this model takes at most {max_len} (seq_len)")
        if cfg.tied_codebook and not self._codebook_ready:
            raise RuntimeError("tied_codebook model: call model.set_codebook(tokenizer.codebook) first")
        if not torch.compiler.is_compiling():
            K, M = cfg.codebook_size, cfg.num_classes
            if tokens.numel() and bool(((tokens < 0) | (tokens > K)).any()):
                raise ValueError(f"token ids must be in [0, {K}] ({K} = mask token); got values in "
                                 f"[{int(tokens.min())}, {int(tokens.max())}]")
            if classes.numel() and bool(((classes < 0) | (classes > M)).any()):
                raise ValueError(f"class labels must be in [0, {M}] ({M} = null class); got values in "
                                 f"[{int(classes.min())}, {int(classes.max())}]")
        return tokens.long(), classes.long()

    # ---- embedding ----------------------------------------------------------------------------------------------
    def _position_table(self, S: int) -> torch.Tensor:
        """[1, S, C]: absolute + target-aware positional embedding of sequence positions 0..S-1 (S <= N + 2)."""
        N = self.config.seq_len
        ta = self.target_aware_pos_embed
        zero = torch.zeros_like(ta[:, :1])
        # Position 1 (class) predicts x_1 whose own position is 2, ..., position N predicts x_N at N + 1.
        layout = torch.cat([zero, ta[:, 2:N + 2], zero], dim=1)  # [1, N + 2, C]
        return self.pos_embed[:, :S] + layout[:, :S]

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.config.tied_codebook:
            return self.embeddings(tokens)
        K = self.config.codebook_size
        is_img = tokens < K
        img = self.codebook_in(self.codebook[tokens.clamp(max=K - 1)])
        other = self.embeddings(tokens)
        return torch.where(is_img[..., None], img.to(other.dtype) if img.dtype != other.dtype else img, other)

    def _embed(self, tokens: torch.Tensor, classes: torch.Tensor):
        """Sequence [CLS, class, x_1..x_L] with positional embeddings, and the per-position condition."""
        B, L = tokens.shape
        cls_emb = self.embeddings(self.class_token_ids(classes))[:, None]  # [B, 1, C]
        parts = [self.cls_token.expand(B, -1, -1), cls_emb]
        if L:
            parts.append(self._embed_tokens(tokens))
        x = torch.cat(parts, dim=1) + self._position_table(L + 2)
        cond = cls_emb + self.timesteps_embeddings[:, :L + 2]
        return x, cond

    def _logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # In eval mode (sampling, analysis) the final adaLN and lm_head run in float32 with autocast off: CFG
        # multiplies the cond - uncond logit difference by up to ~22, which would amplify bf16 logit rounding
        # (spacing 0.06 at |logit| ~ 10) into O(1) errors. It costs (2C^2 + CK) MACs per token, < 1% of the model.
        # In training they follow the ambient autocast, as in the authors' code (the loss upcasts the logits);
        # with this change reAR-B AR training went from 733 to 743 samples/s on an H200 (two machines, one run each).
        if self.training and torch.is_autocast_enabled(h.device.type):
            return self._head(h, cond)
        with torch.autocast(h.device.type, enabled=False):
            return self._head(h.float(), cond.float())

    def _head(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.adaln_before_head(h, cond)
        if self.config.tied_codebook:
            return self.lm_head(h, self.codebook)
        return self.lm_head(h)

    # ---- full (teacher-forced) passes ------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, classes: torch.Tensor, *, align: bool = False) -> GeneratorOutput:
        """Teacher-forced pass. tokens [B, L] ids in [0, K] (L <= N), classes [B] in [0, M].

        Returns logits [B, L, K] for positions [class, x_1..x_{L-1}] (logits[:, i] predicts x_{i+1}) and, when
        ``align``, the alignment heads' outputs [B, L + 2, z] over the full sequence (None for a disabled head).
        """
        tokens, classes = self._check_inputs(tokens, classes)
        cfg = self.config
        taps = ()
        if align:
            taps = tuple({l for l in (cfg.encode_align_layer, cfg.decode_align_layer) if l is not None})
        h, cond, feats = self._run(tokens, classes, taps)
        logits = self._logits(h[:, 1:-1], cond[:, 1:-1])
        enc = dec = None
        if align:
            if cfg.encode_align_layer is not None:
                enc = self.encode_align_mlp(feats[cfg.encode_align_layer])
            if cfg.decode_align_layer is not None:
                dec = self.decode_align_mlp(feats[cfg.decode_align_layer])
        return GeneratorOutput(logits, enc, dec)

    def _use_fused_stack(self, x: torch.Tensor, stop_after: int | None) -> bool:
        cfg = self.config
        return (cfg.block_kernels == "auto" and stop_after is None and self.training and x.is_cuda
                and torch.is_grad_enabled() and torch.is_autocast_enabled("cuda")
                and torch.get_autocast_dtype("cuda") == torch.bfloat16 and cfg.dropout_kernel == "auto"
                and triton_available())

    def _run(self, tokens, classes, taps=(), stop_after: int | None = None):
        x, cond = self._embed(tokens, classes)
        if self._use_fused_stack(x, stop_after):
            x, feats = fused_block_stack(self.config, self.blocks, x, cond, taps)
            return x, cond, feats
        feats = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, cond)
            if i in taps:
                feats[i] = x
            if stop_after is not None and i >= stop_after:
                break
        return x, cond, feats

    def forward_features(self, tokens: torch.Tensor, classes: torch.Tensor, layers) -> dict[int, torch.Tensor]:
        """Outputs of the given blocks (0-based; negative counts from the end), before the final adaLN.

        Returns {layer: [B, L + 2, C]} over [CLS, class, x_1..x_L]; stops after the deepest requested block.
        """
        tokens, classes = self._check_inputs(tokens, classes)
        D = self.config.depth
        layers = [int(l) for l in ([layers] if isinstance(layers, int) else layers)]
        norm = []
        for l in layers:
            if not -D <= l < D:
                raise ValueError(f"layer {l} out of range for a {D}-block model")
            norm.append(l % D)
        if not norm:
            return {}
        _, _, feats = self._run(tokens, classes, tuple(norm), stop_after=max(norm))
        return {l: feats[l % D] for l in layers}

    def full_logits(self, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits at every output position [class, x_1..x_L]: [B, L + 1, K] (the last predicts x_{L+1})."""
        tokens, classes = self._check_inputs(tokens, classes)
        h, cond, _ = self._run(tokens, classes)
        return self._logits(h[:, 1:], cond[:, 1:])

    def next_token_logits(self, prefix: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """No-cache reference: logits [B, K] of x_{L+1} given a prefix [B, L] (0 <= L < N), recomputing it."""
        prefix, classes = self._check_inputs(prefix, classes, max_len=self.config.seq_len - 1)
        h, cond, _ = self._run(prefix, classes)
        return self._logits(h[:, -1], cond[:, -1])

    # ---- cached inference --------------------------------------------------------------------------------------
    def new_kv_cache(self, batch_size: int, max_len: int | None = None, *, device=None, dtype=None) -> KVCache:
        """A zeroed static cache for ``batch_size`` rows and ``max_len`` positions (default N + 1)."""
        p = self.pos_embed
        max_len = self.config.seq_len + 1 if max_len is None else max_len
        if not 2 <= max_len <= self.config.seq_len + 2:
            raise ValueError(f"max_len must be in [2, {self.config.seq_len + 2}], got {max_len}")
        return KVCache(self.config.depth, batch_size, self.config.heads, max_len, self.config.head_dim,
                       device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)

    def prefill(self, prefix: torch.Tensor, classes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run [CLS, class, prefix] (prefix [B, L], L >= 0, usually 0), write cache positions [0, L + 2),
        return the logits [B, K] of x_{L+1}. Evaluation mode (no dropout) is the caller's responsibility."""
        prefix, classes = self._check_inputs(prefix, classes, max_len=self.config.seq_len - 1)
        if prefix.shape[0] != cache.batch or prefix.shape[1] + 2 > cache.max_len:
            raise ValueError(f"cache is [{cache.batch} rows, {cache.max_len} positions]; prefill needs "
                             f"{prefix.shape[0]} rows and {prefix.shape[1] + 2} positions")
        x, cond = self._embed(prefix, classes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cond, _CacheView(cache.k[i], cache.v[i], None, 0, None))
        return self._logits(x[:, -1], cond[:, -1])

    def stacked_block_adaln(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's adaLN output Linear stacked: weight [depth * 6C, C], bias [depth * 6C] (new tensors).

        The condition depends only on the class and the position, never on the tokens, so a decode step can
        compute all blocks' modulations in one GEMM from it (``decode_step(block_adaln=...)``) instead of one
        small GEMM per block: the same products, fewer and larger kernels."""
        lins = [blk.adaLN_modulation[-1] for blk in self.blocks]
        return (torch.cat([m.weight.detach() for m in lins]), torch.cat([m.bias.detach() for m in lins]))

    def decode_step(self, token: torch.Tensor, pos: torch.Tensor, classes: torch.Tensor, cache: KVCache, *,
                    kv_len: int | None = None, attention: str = "sdpa",
                    block_adaln: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Feed one token per row at sequence position ``pos`` and return the next-token logits [B, K].

        token: [B] ids (x_t); pos: LongTensor [1] on the model's device holding t + 1 (x_t's sequence position;
        a device tensor so a CUDA graph can replay the step without host syncs); classes: [B] labels;
        kv_len: static attention window (positions [0, kv_len)); must exceed pos - default ``cache.max_len``.
        attention: the kernel, one of :data:`DECODE_ATTENTION` (same result up to float round-off).
        block_adaln: :meth:`stacked_block_adaln` of this model (kept by the caller, refreshed when the weights
        change) to compute every block's modulation in one GEMM; None = per block (same result up to round-off).
        No value checks here (this is the hot loop; ``prefill`` checked the classes).
        """
        if attention not in DECODE_ATTENTION:
            raise ValueError(f"attention must be one of {DECODE_ATTENTION}, got {attention!r}")
        kv_len = cache.max_len if kv_len is None else kv_len
        B = token.shape[0]
        tok = token.view(B, 1)
        x = self._embed_tokens(tok) + self._position_table(self.config.seq_len + 2).index_select(1, pos)
        cond = self.embeddings(self.class_token_ids(classes))[:, None] + self.timesteps_embeddings.index_select(1, pos)
        mask = (torch.arange(kv_len, device=pos.device) <= pos).view(1, 1, 1, kv_len)
        mods = [None] * len(self.blocks)
        if block_adaln is not None:
            mods = F.linear(F.silu(cond), *block_adaln).chunk(len(self.blocks), dim=-1)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cond, _CacheView(cache.k[i], cache.v[i], pos, kv_len, mask, attention), mods[i])
        return self._logits(x, cond)[:, 0]


def _mark_codebook_ready(module, incompatible_keys):
    module._codebook_ready = True


# ----------------------------------------------------------------------------------------------------------------
# Builders, counts, FLOPs
# ----------------------------------------------------------------------------------------------------------------
def build_generator(preset_or_config: str | GeneratorConfig | dict = "tiny", *, device=None, **overrides) -> Generator:
    """Build a freshly initialised Generator from a preset name / config / dict with field ``overrides``.

    ``device="meta"`` builds shapes only (fast, no memory) - used for layout checks of the large presets.
    """
    cfg = get_config(preset_or_config, **overrides)
    if device is None:
        return Generator(cfg)
    with torch.device(device):
        return Generator(cfg)


def count_parameters(model_or_config, *, include_heads: bool = False) -> int:
    """Number of trainable parameters; ``include_heads=False`` excludes the alignment heads (218.40M / 260.92M /
    461.67M for reAR-S/B/L, docs/paper.md, reAR §5 item 1). Buffers (e.g. a tied codebook) are never counted."""
    model = model_or_config if isinstance(model_or_config, nn.Module) else build_generator(
        get_config(model_or_config), device="meta")
    n = 0
    for name, p in model.named_parameters():
        if not include_heads and name.startswith(("encode_align_mlp.", "decode_align_mlp.")):
            continue
        n += p.numel()
    return n


def estimate_flops_per_token(config: str | GeneratorConfig, *, training: bool = True, align: bool = True,
                             seq_len: int | None = None) -> float:
    """Model FLOPs per image token of a full teacher-forced pass (the MFU numerator). Exact definition, with
    S = N + 2 sequence positions and 2 FLOPs per multiply-accumulate:

    forward per image = 2 x [ S x depth x (qkv 3C^2 + proj C^2 + MLP 2*C*Cm + adaLN 6C^2)
                              + N x (final adaLN 2C^2 + lm_head C*K)      (the head sees positions 1..N)
                              + S x (enabled alignment heads' MACs, if ``align``) ]
                        + depth x 4 x C x S(S+1)/2   (QK^T and AV over the causal, unmasked pairs),
    divided by N. ``training`` multiplies by 3 (backward = 2 x forward). LayerNorms, softmax, embeddings and
    elementwise ops are ignored, as in nanoGPT's estimate. For the tied-codebook head, C*K becomes C*z + z*K.
    """
    cfg = get_config(config)
    N = cfg.seq_len if seq_len is None else seq_len
    S = N + 2
    C, Cm, K, D = cfg.hidden, cfg.mlp_hidden, cfg.codebook_size, cfg.depth
    macs = S * D * (3 * C * C + C * C + 2 * C * Cm + 6 * C * C)
    macs += N * (2 * C * C + (C * cfg.z_dim + cfg.z_dim * K if cfg.tied_codebook else C * K))
    if cfg.tied_codebook:
        macs += N * cfg.z_dim * C  # codebook_in on the N image-token inputs
    if align:
        P, z = cfg.projector_dim, cfg.z_dim
        head = C * P + (P * P if cfg.align_head == "silu3" else 0) + P * z
        macs += S * head * ((cfg.encode_align_layer is not None) + (cfg.decode_align_layer is not None))
    attn = D * 4 * C * S * (S + 1) / 2
    fwd = (2 * macs + attn) / N
    return fwd * (3 if training else 1)


# ----------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _read_state_dict(path_or_sd) -> dict:
    if isinstance(path_or_sd, (str, Path)):
        path = Path(path_or_sd)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # optional dependency, only for .safetensors files
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        sd = path_or_sd
    if not isinstance(sd, dict):
        raise TypeError(f"expected a state dict (dict of tensors), got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # fixture / wrapped checkpoints
        sd = sd["state_dict"]
    return sd


def infer_config_from_state_dict(state_dict: dict, **overrides) -> GeneratorConfig:
    """Read the architecture off tensor shapes (K, M, N, C, depth, heads from the QK-norm size, MLP ratio,
    head widths). The block indices the alignment heads tap are *not* stored in the weights: when the shapes
    equal a preset's, that preset's indices are used, otherwise pass ``decode_align_layer=`` /
    ``encode_align_layer=`` (EN defaults to 0 as in every official config)."""
    sd = state_dict
    try:
        C = sd["embeddings.weight"].shape[1]
        K = sd["lm_head.weight"].shape[0]
        M = sd["embeddings.weight"].shape[0] - K - 2
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        pos_rows = sd["pos_embed"].shape[1]
        time_rows = sd["timesteps_embeddings"].shape[1]
    except KeyError as e:
        raise StateDictMismatchError(f"not a reAR/RAR generator state dict: missing {e.args[0]!r}") from None
    pos_extra, time_extra = overrides.get("pos_extra", 1024), overrides.get("time_extra", 100)
    N = pos_rows - pos_extra
    if "seq_len" not in overrides and time_rows - time_extra != N:
        raise StateDictMismatchError(f"cannot infer seq_len: pos_embed has {pos_rows} rows, timesteps_embeddings "
                                     f"{time_rows}; pass seq_len= (and pos_extra= / time_extra=)")
    fields = dict(hidden=C, depth=depth, heads=C // head_dim, codebook_size=K, num_classes=M, seq_len=N,
                  mlp_ratio=mlp_hidden / C)
    has_enc, has_dec = "encode_align_mlp.0.weight" in sd, "decode_align_mlp.0.weight" in sd
    for prefix, present in (("encode_align_mlp", has_enc), ("decode_align_mlp", has_dec)):
        if present:
            lin = sorted(int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".") and k.endswith(".weight"))
            fields["projector_dim"] = sd[f"{prefix}.0.weight"].shape[0]
            fields["z_dim"] = sd[f"{prefix}.{lin[-1]}.weight"].shape[0]
            fields["align_head"] = "silu3" if len(lin) == 3 else "gelu2"
    fields = {**fields, **overrides}
    preset = next((p for p in PRESETS.values() if all(getattr(p, k) == v for k, v in fields.items()
                                                      if k in ("hidden", "depth", "heads", "codebook_size",
                                                               "num_classes", "seq_len", "projector_dim",
                                                               "z_dim"))), None)
    if "encode_align_layer" not in fields:
        fields["encode_align_layer"] = (preset.encode_align_layer if preset else 0) if has_enc else None
    if "decode_align_layer" not in fields:
        if has_dec and preset is None:
            raise StateDictMismatchError("the state dict has a decode alignment head but the block it taps is not "
                                         "stored in the weights; pass decode_align_layer=")
        fields["decode_align_layer"] = preset.decode_align_layer if has_dec else None
    return GeneratorConfig(**fields)


def load_official_state_dict(path_or_sd, preset_or_config: str | GeneratorConfig | dict | None = None, *,
                             device=None, **overrides) -> Generator:
    """Build a Generator and load an official (or our) state dict with strict name and shape checks.

    ``path_or_sd``: a path (``torch.load`` with ``weights_only=True``; ``.safetensors`` too) or a dict (a
    ``{"state_dict": ...}`` wrapper is unwrapped). ``preset_or_config``: preset name / config / dict, or None to
    infer it from the tensor shapes (:func:`infer_config_from_state_dict`). A state dict without alignment heads
    (e.g. an AR baseline) loads into a config with the heads disabled. Raises :class:`StateDictMismatchError`
    naming every missing, unexpected and mis-shaped key. Returns the model in eval mode.
    """
    sd = _read_state_dict(path_or_sd)
    if preset_or_config is None:
        cfg = infer_config_from_state_dict(sd, **overrides)
    else:
        cfg = get_config(preset_or_config, **overrides)
    with torch.device("meta"):
        model = Generator(cfg)
    check_state_dict(model, sd)
    # Assign float32 copies on the target device to the meta model (no second random init, no aliasing of the
    # caller's tensors). Checkpoints stored in bf16/fp16 are upcast: the Generator keeps float32 master weights.
    dev = torch.device(device or "cpu")
    sd = {k: v.to(device=dev, dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tied_codebook:
        model._codebook_ready = True
    return model.eval()
