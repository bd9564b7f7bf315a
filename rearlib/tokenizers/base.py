"""The tokenizer interface every tokenizer implements, weight identities, strict state-dict loading and
checkpoint writing. See :mod:`rearlib.tokenizers` for the interface and the per-scale entry point."""


from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rearlib.checkpoints import load_state_dict_strict
from rearlib.runtime import atomic_torch_save, load_torch_file, resolve_device



CHECKPOINT_FORMAT = "rearlib-tokenizer"
CHECKPOINT_VERSION = 1


#: Every tokenizer class by its ``kind`` (filled as the classes are defined).
KINDS: dict[str, type] = {}


class TokenizerMismatchError(ValueError):
    """Data (a pretokenized cache, a checkpoint) was made with a different tokenizer than the one given."""


class Tokenizer(nn.Module):
    """Base class holding the shared interface; subclasses implement the four ``_``-free hooks below.

    Subclass hooks: ``encode_features(x) -> [B, D, h, w]``, ``quantize_features(z) -> [B, h, w]`` (long),
    ``decode_codes(q [B, D, h, w]) -> [B, 3, R, R]`` (unclamped), ``config_dict() -> dict`` (JSON-able),
    the ``codebook`` property, and the attributes ``kind`` (str) and ``resolution`` (int).
    """

    kind: str = "base"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        KINDS[cls.kind] = cls  # the checkpoint reader finds every tokenizer class by its ``kind``
    resolution: int

    # ---- hooks ------------------------------------------------------------------------------------------
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize_features(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def codebook(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def downsample_factor(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- derived properties -----------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def code_dim(self) -> int:
        return int(self.codebook.shape[1])

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.resolution // self.downsample_factor
        return (side, side)

    @property
    def num_tokens(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- public inference API ---------------------------------------------------------------------------
    def check_images(self, images: Any) -> torch.Tensor:
        """Validate a batch of images and return it as float32 on this tokenizer's device."""
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
        if images.ndim == 3:
            raise ValueError(f"images must be a batch [B,3,H,W]; got shape {tuple(images.shape)}: "
                             f"use images[None] for a single image")
        if images.ndim != 4:
            raise ValueError(f"images must have 4 dims [B,3,H,W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [0,1], got dtype {images.dtype}; "
                            f"for uint8 images use images.float() / 255")
        if images.shape[1] != 3:
            hint = " (channels-last input? use images.permute(0,3,1,2))" if images.shape[-1] == 3 else \
                   " (grayscale? use images.expand(-1,3,-1,-1))" if images.shape[1] == 1 else ""
            raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]} in shape "
                             f"{tuple(images.shape)}{hint}")
        R = self.resolution
        if tuple(images.shape[-2:]) != (R, R):
            raise ValueError(f"this tokenizer expects {R}x{R} images, got {images.shape[-2]}x{images.shape[-1]}; "
                             f"resize or crop to {R}x{R} first")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        lo, hi = float(images.min()), float(images.max())
        # A small tolerance for round-off from resizing; [-1,1] or [0,255] inputs are caught here.
        if lo < -1e-3 or hi > 1 + 1e-3 or lo != lo or hi != hi:
            raise ValueError(f"images must be in [0,1], got values in [{lo:.4g}, {hi:.4g}]; "
                             f"for [-1,1] images use (x + 1) / 2, for [0,255] use x / 255")
        return images.to(self.device, torch.float32)

    def check_tokens(self, tokens: Any) -> torch.Tensor:
        """Validate token ids and return them as LongTensor ``[B, h, w]`` on this tokenizer's device."""
        if not torch.is_tensor(tokens):
            raise TypeError(f"tokens must be a torch.Tensor of integer ids, got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        h, w = self.grid_size
        if tokens.ndim == 2 and tokens.shape[1] == h * w:
            tokens = tokens.reshape(tokens.shape[0], h, w)
        elif not (tokens.ndim == 3 and tuple(tokens.shape[1:]) == (h, w)):
            raise ValueError(f"tokens must have shape [B,{h},{w}] or [B,{h * w}] for this tokenizer, "
                             f"got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}) (codebook size), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]; ids >= {self.codebook_size} are "
                             f"special (mask/class) ids of the generator and cannot be decoded")
        return tokens.to(self.device, torch.long)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B,3,R,R]`` in [0,1] -> token ids LongTensor ``[B,h,w]`` (on this tokenizer's device)."""
        x = self.check_images(images)
        return self.quantize_features(self.encode_features(x))

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B,h,w]`` -> code vectors ``[B,D,h,w]`` (rows of ``codebook``), what the decoder consumes."""
        return F.embedding(tokens, self.codebook).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B,h,w]`` or ``[B,h*w]`` -> images ``[B,3,R,R]`` float32, clamped to [0,1]."""
        t = self.check_tokens(tokens)
        return self.decode_codes(self.lookup(t)).float().clamp(0.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """``decode(encode(images))``."""
        return self.decode(self.encode(images))

    @torch.no_grad()
    def nearest_codes(self, k: int = 1, return_similarity: bool = False):
        """Top-``k`` cosine neighbours of every code, excluding itself: LongTensor ``[K, k]``, most similar
        first (and their cosine similarities ``[K, k]`` when ``return_similarity``)."""
        return nearest_codes(self.codebook, k, return_similarity=return_similarity)

    def identity(self) -> str:
        """Stable ``"<kind>-<16 hex>"`` hash of the kind, config and weights (see the module docstring)."""
        return weights_identity(self.kind, self.config_dict(), self.state_dict())

    def extra_repr(self) -> str:
        h, w = self.grid_size
        return (f"kind={self.kind}, resolution={self.resolution}, grid={h}x{w}, codebook={self.codebook_size}"
                f"x{self.code_dim}")


# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------
def nearest_codes(codebook: torch.Tensor, k: int = 1, return_similarity: bool = False):
    """Top-``k`` cosine neighbours of every row of ``codebook`` ``[K, D]``, excluding the row itself."""
    K = codebook.shape[0]
    if not isinstance(k, int) or not 1 <= k <= K - 1:
        raise ValueError(f"k must be an int in [1, {K - 1}] for a codebook of {K} codes, got {k!r}")
    n = F.normalize(codebook.detach().float(), dim=1)
    sim = n @ n.T
    sim.fill_diagonal_(float("-inf"))  # exclude the code itself, even when another code is an exact copy
    vals, idx = sim.topk(k, dim=1)
    return (idx, vals) if return_similarity else idx


def weights_identity(kind: str, config: dict, state_dict: dict) -> str:
    """SHA-256 over ``kind``, the JSON config and every tensor as float32 (name-sorted), shortened to 16 hex.

    Weights are hashed as float32 on the CPU, so an fp16-stored checkpoint loaded into float32 has the same
    identity as the fp16-rounded model that was saved, on any device.
    """
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().to("cpu")
        t = t.float() if t.is_floating_point() else t.long()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def tokenizer_checkpoint(tokenizer: Tokenizer, dtype: torch.dtype = torch.float32, meta: dict | None = None) -> dict:
    """The dict :func:`save_tokenizer` writes: format/version, kind, config, weights (``dtype`` for floats),
    the identity of the weights *as stored* and free-form ``meta`` (metrics, provenance)."""
    sd = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).clone()
          for k, v in tokenizer.state_dict().items()}
    cfg = tokenizer.config_dict()
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": tokenizer.kind, "config": cfg,
        "state_dict": sd, "identity": weights_identity(tokenizer.kind, cfg, sd),
        # JSON round trip: meta must hold plain types only, so that torch.load(weights_only=True) reads it.
        "meta": json.loads(json.dumps(meta or {}, default=str)),
    }


def save_tokenizer(tokenizer: Tokenizer, path, dtype: torch.dtype = torch.float32, meta: dict | None = None) -> str:
    """Write a tokenizer checkpoint atomically (config + weights + identity); returns the stored identity.

    With ``dtype=torch.float16`` the stored weights are rounded; the identity then describes the rounded
    weights, which equals ``tokenizer.identity()`` only if the model was rounded first
    (:func:`round_weights_`), as the trainer does so that shipped metrics describe the shipped weights.
    """
    ckpt = tokenizer_checkpoint(tokenizer, dtype, meta)
    atomic_torch_save(ckpt, path)
    return ckpt["identity"]


def round_weights_(module: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Round every floating parameter/buffer to ``dtype`` precision in place (kept in its own dtype)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return module


def load_checkpoint(path_or_ckpt, device="cpu") -> Tokenizer:
    """Load a checkpoint written by :func:`save_tokenizer` (:func:`rearlib.tokenizers.load_tokenizer` also reads
    a plain MaskGIT-VQGAN state dict).

    The weights are checked strictly by name and shape, and the stored identity is verified after loading
    (a corrupted or edited file raises instead of silently computing something else).
    """
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if isinstance(path_or_ckpt, (str, os.PathLike)):
        path = Path(path_or_ckpt)
        ckpt = load_torch_file(path, "tokenizer checkpoint", "Restore it from the repository (git checkout) or "
                               "rebuild it; a cached smoke tokenizer under artifacts/ can simply be deleted.")
        where = str(path)
    else:
        ckpt, where = path_or_ckpt, "checkpoint dict"
    if not isinstance(ckpt, dict):
        raise ValueError(f"{where}: expected a dict, got {type(ckpt).__name__}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not a rearlib tokenizer checkpoint (no format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{where}: checkpoint version {ckpt.get('version')} is not supported "
                         f"(this rearlib reads version {CHECKPOINT_VERSION})")
    kinds = {k: cls.from_config for k, cls in KINDS.items() if k != "base"}
    if ckpt["kind"] not in kinds:
        raise ValueError(f"{where}: unknown tokenizer kind {ckpt['kind']!r}; known: {', '.join(kinds)}")
    tok = kinds[ckpt["kind"]](ckpt["config"])
    load_state_dict_strict(tok, ckpt["state_dict"], what=where)
    if "identity" in ckpt and tok.identity() != ckpt["identity"]:
        raise TokenizerMismatchError(f"{where}: weights hash to {tok.identity()} but the checkpoint records "
                                     f"{ckpt['identity']}; the file is corrupt or was edited")
    tok.checkpoint_meta = dict(ckpt.get("meta", {}))
    return tok.to(device).eval()
