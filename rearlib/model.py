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

``tied_codebook`` builds the paper's "tied codebook embedding" baseline (Table 4: FID 21.08 against vanilla AR's
21.32). The paper names it and nothing more (docs/paper.md, reAR §6 item 13): not how the codebook enters the input,
whether the output is tied to it, nor how a code dimension z is reconciled with the width C. What it does fix is the
idea: one table of per-code vectors derived from the tokenizer's codebook serves both as the input embedding of an
image token and as the output embedding its logit is a dot product with. Both variants below share a code table
``U`` [K, D] between input and output, with ``E`` the frozen codebook buffer (set with
:meth:`Generator.set_codebook`, rescaled by one scalar to unit RMS): image-token inputs are ``codebook_in(U[x])``
(``codebook_in = Linear(D -> C)``), logits are ``lm_head.proj(h) @ U.T + lm_head.bias``
(``lm_head.proj = Linear(C -> D)``); mask/class/null ids keep the ``embeddings`` table (its image rows are unused).

* ``True`` (or ``"codebook"``): ``U = E``, D = z. The logits of all K codes are then linear in z numbers, so every
  next-token logit vector lies in one z-dimensional affine subspace of R^K and a [positions, K] logit matrix has
  rank <= z + 1. With the paper's 256-d codebook that is a mild limit (and this variant is the closer reading of
  the paper at that scale); with a 32-d codebook and K = 1024 it is a handicap the paper's baseline did not have.
* ``"projected"``: ``U = code_lift(E)`` with :class:`~rearlib.model_layers.CodeLift`
  (``normalize(fc2(GELU(fc1(e))))``, z -> D -> D, D = ``config.tied_dim`` = max(z, 256)). The nonlinearity lets the
  K lifted codes span min(K, D) dimensions, so the logits' rank is bounded by D >= 256 (the paper's bound with its
  256-d codebook) rather than by z, while every per-code vector is still a function of the code's codebook vector
  alone: the lift is smooth, so codes close in the codebook get close rows of ``U``, and the model has no free
  per-code parameter except the logit bias. We prefer this to a free table initialised from the codebook, which
  would drift into ordinary weight tying and lose the codebook as the source of the embedding. ``fc1`` starts with
  weights N(0, 1/z), so that its pre-activations (codebook rows of unit RMS) have unit variance and the GELU works
  in its curved range from the first step; at the 0.02-std init of other layers they would have std 0.02 sqrt(z)
  (0.11 for z = 32) and the lift would be nearly linear, i.e. nearly of rank z again.

Training attention always uses ``F.scaled_dot_product_attention(is_causal=True)`` (no float mask, so the flash
kernel is eligible). Cached decoding takes an explicit :class:`KVCache` object as an argument - no module holds a
"caching enabled" flag.

Around the :class:`Generator` here: :mod:`rearlib.model_config` (:class:`GeneratorConfig`, the presets),
:mod:`rearlib.model_layers` (blocks and heads), :mod:`rearlib.model_kv_cache` (:class:`KVCache`, decode attention)
and :mod:`rearlib.model_official` (reading the authors' state dicts); their public names are importable from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.checkpoints import StateDictMismatchError, check_state_dict
from rearlib.kernels.fused_blocks import fused_block_stack
from rearlib.kernels.ops import triton_available
from rearlib.model_config import BLOCK_KERNELS, PRESETS, GeneratorConfig, get_config  # noqa: F401
from rearlib.model_kv_cache import DECODE_ATTENTION, KVCache, _CacheView
from rearlib.model_layers import (Attention, Block, CodeLift, Dropout, FinalAdaLN, Mlp, TiedLMHead,  # noqa: F401
                                  _align_mlp)
from rearlib.model_official import infer_config_from_state_dict, read_state_dict

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


class GeneratorOutput(NamedTuple):
    """logits [B, L, K] (position i predicts x_{i+1}; position 0 is the class token);
    encode_z / decode_z [B, L + 2, z]: alignment-head outputs over [CLS, class, x_1..x_L], or None."""

    logits: torch.Tensor
    encode_z: torch.Tensor | None
    decode_z: torch.Tensor | None


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
            if cfg.tied_mode == "projected":
                self.code_lift = CodeLift(cfg.z_dim, cfg.tied_dim)
            self.codebook_in = nn.Linear(cfg.tied_dim, C)
            self.lm_head = TiedLMHead(C, cfg.tied_dim, cfg.codebook_size)
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
        if self.config.tied_mode == "projected":  # unit-variance pre-activations (the model docstring says why)
            nn.init.normal_(self.code_lift.fc1.weight, std=self.config.z_dim ** -0.5)

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
        """Tied-codebook modes only: store the tokenizer codebook [K, z] (frozen), rescaled to unit RMS.

        The single scalar rescale keeps the tied input/output well conditioned whatever the tokenizer's code
        scale; it is absorbed by the trainable ``codebook_in`` / ``lm_head.proj`` (or ``code_lift.fc1``) and
        changes nothing else.
        """
        if not self.config.tied_codebook:
            raise ValueError("set_codebook() is only for tied_codebook models (True, 'codebook' or 'projected')")
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

    def _code_table(self, codes: torch.Tensor) -> torch.Tensor:
        """Rows of the tied code table U for codebook rows ``codes`` (the lift is row-wise, so lifting the gathered
        rows equals gathering rows of the lifted table)."""
        return self.code_lift(codes) if self.config.tied_mode == "projected" else codes

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.config.tied_codebook:
            return self.embeddings(tokens)
        K = self.config.codebook_size
        is_img = tokens < K
        img = self.codebook_in(self._code_table(self.codebook[tokens.clamp(max=K - 1)]))
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
            return self.lm_head(h, self._code_table(self.codebook))
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
    elementwise ops are ignored, as in nanoGPT's estimate. For the tied-codebook head, C*K becomes C*D + D*K with
    D = ``tied_dim``, and the N image-token inputs add ``codebook_in`` (D*C each) and, when "projected", their lift
    (z*D + D*D each). Not per token, and so not counted: the "projected" head lifts all K codes once per forward
    pass, 2*K*(z*D + D*D) FLOPs whatever the batch.
    """
    cfg = get_config(config)
    N = cfg.seq_len if seq_len is None else seq_len
    S = N + 2
    C, Cm, K, D = cfg.hidden, cfg.mlp_hidden, cfg.codebook_size, cfg.depth
    macs = S * D * (3 * C * C + C * C + 2 * C * Cm + 6 * C * C)
    Dt = cfg.tied_dim
    macs += N * (2 * C * C + (C * Dt + Dt * K if cfg.tied_codebook else C * K))
    if cfg.tied_codebook:
        macs += N * Dt * C  # codebook_in on the N image-token inputs
    if cfg.tied_mode == "projected":
        macs += N * (cfg.z_dim * Dt + Dt * Dt)  # the lift of the N input codes
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
def load_official_state_dict(path_or_sd, preset_or_config: str | GeneratorConfig | dict | None = None, *,
                             device=None, **overrides) -> Generator:
    """Build a Generator and load an official (or our) state dict with strict name and shape checks.

    ``path_or_sd``: a path (``torch.load`` with ``weights_only=True``; ``.safetensors`` too) or a dict (a
    ``{"state_dict": ...}`` wrapper is unwrapped). ``preset_or_config``: preset name / config / dict, or None to
    infer it from the tensor shapes (:func:`infer_config_from_state_dict`). A state dict without alignment heads
    (e.g. an AR baseline) loads into a config with the heads disabled. Raises :class:`StateDictMismatchError`
    naming every missing, unexpected and mis-shaped key, and a ValueError naming a tensor that holds NaN or inf
    (or the file, if it cannot be read). Returns the model in eval mode.
    """
    sd = read_state_dict(path_or_sd)
    what = f"state dict {path_or_sd}" if isinstance(path_or_sd, (str, Path)) else "state dict"
    if preset_or_config is None:
        cfg = infer_config_from_state_dict(sd, **overrides)
    else:
        cfg = get_config(preset_or_config, **overrides)
    with torch.device("meta"):
        model = Generator(cfg)
    check_state_dict(model, sd, what)
    bad = next((k for k, v in sd.items() if v.is_floating_point() and v.device.type != "meta"
                and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"{what} holds non-finite values (NaN or inf) in {bad}: it comes from a run that diverged "
                         f"or is damaged; use an intact copy")
    # Assign float32 copies on the target device to the meta model (no second random init, no aliasing of the
    # caller's tensors). Checkpoints stored in bf16/fp16 are upcast: the Generator keeps float32 master weights.
    dev = torch.device(device or "cpu")
    sd = {k: v.to(device=dev, dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tied_codebook:
        model._codebook_ready = True
    return model.eval()
