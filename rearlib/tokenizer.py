"""Image tokenizers: the common interface, checkpoint I/O and ``get_tokenizer(scale, ...)``.

Two tokenizers implement the interface below:

* :class:`rearlib.vqgan.VQTokenizer` — our own VQGAN-style tokenizer, trained in-project (``smoke`` trains a
  tiny one in seconds and caches it; ``small`` ships a checkpoint in ``data/checkpoints/``).
* :class:`rearlib.maskgit_vqgan.MaskGITVQGAN` — a port of the MaskGIT-VQGAN the paper uses (``paper`` scale),
  which loads the official ``maskgit-vqgan-imagenet-f16-256.bin`` state dict.

The interface (every tokenizer is an ``nn.Module``):

``encode(images)``
    float32 ``[B, 3, R, R]`` in [0, 1] (``R = resolution``) -> LongTensor ``[B, h, w]`` of code ids in
    ``[0, codebook_size)``; raster (row-major) order when flattened.
``decode(tokens)``
    LongTensor ``[B, h, w]`` or ``[B, h*w]`` -> float32 ``[B, 3, R, R]`` clamped to [0, 1].
``codebook``
    ``[K, D]`` float tensor: the code vectors the decoder consumes (the reAR alignment targets).
``codebook_size`` (K), ``code_dim`` (D), ``grid_size`` ``(h, w)``, ``resolution`` (R).
``identity()``
    ``"<kind>-<16 hex>"``: SHA-256 of the kind, the config and every weight (as float32 bytes, in name order).
    Two tokenizers that compute the same function with the same weights have the same identity on every
    device; pretokenized caches carry it so that a cache made with another tokenizer is refused.
``nearest_codes(k)``
    ``[K, k]`` ids of the ``k`` codebook vectors with the highest cosine similarity to each code, excluding
    the code itself (ties broken by ``torch.topk``), most similar first.

``encode``/``decode`` are inference calls: they run under ``torch.no_grad()``, move inputs to the tokenizer's
device and validate their inputs with messages that say what to do. Differentiable pieces are exposed as
``encode_features`` (continuous encoder output), ``quantize_features`` and ``decode_codes`` (unclamped).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Per-scale settings of the facade. The model/training settings of our own tokenizer live in
#: ``rearlib.vqgan.SCALES``; the MaskGIT-VQGAN architecture is inferred from its state dict.
SCALES = {
    "smoke": {"kind": "vq", "source": "trained on first use, cached under artifacts/tokenizer/<hash>/"},
    "small": {"kind": "vq", "checkpoint": "data/checkpoints/tokenizer_small.pt"},
    "paper": {
        "kind": "maskgit_vqgan",
        "resolution": 256,
        # Looked for in this order when no explicit path is given (first hit wins).
        "env": "REARLIB_MASKGIT_VQGAN",
        "filenames": ("maskgitvq.bin", "maskgit-vqgan-imagenet-f16-256.bin"),
        "folders": ("data/checkpoints", "ckpt"),
    },
}

CHECKPOINT_FORMAT = "rearlib-tokenizer"
CHECKPOINT_VERSION = 1


class TokenizerMismatchError(ValueError):
    """Data (a pretokenized cache, a checkpoint) was made with a different tokenizer than the one given."""


class Tokenizer(nn.Module):
    """Base class holding the shared interface; subclasses implement the four ``_``-free hooks below.

    Subclass hooks: ``encode_features(x) -> [B, D, h, w]``, ``quantize_features(z) -> [B, h, w]`` (long),
    ``decode_codes(q [B, D, h, w]) -> [B, 3, R, R]`` (unclamped), ``config_dict() -> dict`` (JSON-able),
    the ``codebook`` property, and the attributes ``kind`` (str) and ``resolution`` (int).
    """

    kind: str = "base"
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


def check_state_dict(model: nn.Module, state_dict: dict, what: str = "state dict") -> None:
    """Raise ``KeyError``/``ValueError`` naming every missing, unexpected and mis-shaped key (no partial loads)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items() if torch.is_tensor(v)}
    non_tensor = sorted(k for k, v in state_dict.items() if not torch.is_tensor(v))
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if not (missing or unexpected or shapes or non_tensor):
        return

    def _list(keys, fmt=str, limit=25):
        body = "\n".join(f"    {fmt(k)}" for k in keys[:limit])
        return body + (f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else "")

    parts = [f"{what} does not match {type(model).__name__} ({len(given)} tensors given, {len(expected)} expected)"]
    if missing:
        parts.append(f"  missing keys ({len(missing)}):\n" + _list(missing))
    if unexpected:
        parts.append(f"  unexpected keys ({len(unexpected)}):\n" + _list(unexpected))
    if shapes:
        parts.append(f"  mis-shaped keys ({len(shapes)}):\n"
                     + _list(shapes, lambda k: f"{k}: expected {expected[k]}, got {given[k]}"))
    if non_tensor:
        parts.append(f"  non-tensor entries ({len(non_tensor)}):\n" + _list(non_tensor))
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if missing and unexpected and len(prefixes) == 1 and all(k.split(".", 1)[-1] in expected for k in unexpected):
        parts.append(f"  hint: every unexpected key starts with {prefixes.pop()!r}.; strip that prefix first")
    raise StateDictMismatchError("\n".join(parts), missing=missing, unexpected=unexpected, mis_shaped=shapes)


class StateDictMismatchError(ValueError):
    """A state dict does not match a model; ``.missing``, ``.unexpected``, ``.mis_shaped`` list the keys."""

    def __init__(self, message: str, missing=(), unexpected=(), mis_shaped=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)


def load_state_dict_strict(model: nn.Module, state_dict: dict, what: str = "state dict") -> None:
    """Check names and shapes first (raising a full report), then load with ``strict=True``."""
    check_state_dict(model, state_dict, what)
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state_dict.items()}, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def _kinds():
    from rearlib import maskgit_vqgan, vqgan

    return {vqgan.VQTokenizer.kind: vqgan.VQTokenizer.from_config, maskgit_vqgan.MaskGITVQGAN.kind:
            maskgit_vqgan.MaskGITVQGAN.from_config}


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
    from rearlib.experiments import atomic_torch_save

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


def load_tokenizer(path_or_ckpt, device="cpu") -> Tokenizer:
    """Load a checkpoint written by :func:`save_tokenizer` (or a plain MaskGIT-VQGAN state dict).

    The weights are checked strictly by name and shape, and the stored identity is verified after loading
    (a corrupted or edited file raises instead of silently computing something else).
    """
    from rearlib.experiments import resolve_device

    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if isinstance(path_or_ckpt, (str, os.PathLike)):
        path = Path(path_or_ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer checkpoint {path} not found")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        where = str(path)
    else:
        ckpt, where = path_or_ckpt, "checkpoint dict"
    if not isinstance(ckpt, dict):
        raise ValueError(f"{where}: expected a dict, got {type(ckpt).__name__}")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        if any(k.startswith("quantize.") for k in ckpt):
            from rearlib.maskgit_vqgan import load_maskgit_vqgan

            return load_maskgit_vqgan(ckpt).to(device).eval()
        raise ValueError(f"{where} is not a rearlib tokenizer checkpoint (no format={CHECKPOINT_FORMAT!r}) "
                         f"nor a MaskGIT-VQGAN state dict")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{where}: checkpoint version {ckpt.get('version')} is not supported "
                         f"(this rearlib reads version {CHECKPOINT_VERSION})")
    kinds = _kinds()
    if ckpt["kind"] not in kinds:
        raise ValueError(f"{where}: unknown tokenizer kind {ckpt['kind']!r}; known: {', '.join(kinds)}")
    tok = kinds[ckpt["kind"]](ckpt["config"])
    load_state_dict_strict(tok, ckpt["state_dict"], what=where)
    if "identity" in ckpt and tok.identity() != ckpt["identity"]:
        raise TokenizerMismatchError(f"{where}: weights hash to {tok.identity()} but the checkpoint records "
                                     f"{ckpt['identity']}; the file is corrupt or was edited")
    tok.checkpoint_meta = dict(ckpt.get("meta", {}))
    return tok.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# Per-scale entry point
# ----------------------------------------------------------------------------------------------------------
def find_maskgit_checkpoint(path=None, data_root=None) -> Path:
    """Resolve the MaskGIT-VQGAN weights: explicit ``path``, ``$REARLIB_MASKGIT_VQGAN``, then the known file
    names (``maskgitvq.bin``, ``maskgit-vqgan-imagenet-f16-256.bin``) under ``data_root``,
    ``data_root/checkpoints``, ``data_root/ckpt``, the repository's ``data/checkpoints/`` and ``ckpt/``.
    Raises FileNotFoundError listing every path tried."""
    cfg = SCALES["paper"]
    tried = []
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get(cfg["env"]):
        candidates.append(Path(os.environ[cfg["env"]]))
    else:
        roots = [Path(data_root), Path(data_root) / "checkpoints", Path(data_root) / "ckpt"] if data_root else []
        folders = roots + [REPO_ROOT / f for f in cfg["folders"]]
        candidates += [folder / name for folder in folders for name in cfg["filenames"]]
    for c in candidates:
        tried.append(str(c))
        if c.is_file():
            return c
    raise FileNotFoundError(
        "MaskGIT-VQGAN weights not found; tried:\n  " + "\n  ".join(tried) + "\nDownload "
        "maskgit-vqgan-imagenet-f16-256.bin from the Hugging Face repo fun-research/TiTok and pass "
        f"path=..., set ${cfg['env']}, or place it as data/checkpoints/maskgitvq.bin.")


def get_tokenizer(scale: str, device="auto", *, data_root=None, path=None, progress: bool = True) -> Tokenizer:
    """The tokenizer of a scale, in eval mode on ``device``.

    ``smoke``: trains a tiny :class:`~rearlib.vqgan.VQTokenizer` (under 30 s on 2 CPU cores) the first time
    and caches it under ``artifacts/tokenizer/<config hash>/``. ``small``: loads the shipped
    ``data/checkpoints/tokenizer_small.pt`` (or ``path``). ``paper``: loads MaskGIT-VQGAN from ``path`` /
    ``$REARLIB_MASKGIT_VQGAN`` / ``data_root`` (see :func:`find_maskgit_checkpoint`).
    """
    from rearlib.experiments import resolve_device, validate_scale

    validate_scale(scale)
    device = resolve_device(device) if isinstance(device, (str, type(None))) else torch.device(device)
    if scale == "smoke":
        from rearlib.vqgan import get_or_train

        return get_or_train("smoke", device=device, progress=progress).to(device).eval()
    if scale == "small":
        ckpt = Path(path) if path is not None else REPO_ROOT / SCALES["small"]["checkpoint"]
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"small-scale tokenizer checkpoint {ckpt} not found. It ships with the repository; to rebuild it "
                f"on a GPU run: python -m rearlib.vqgan train --scale small --out {SCALES['small']['checkpoint']}")
        return load_tokenizer(ckpt, device)
    from rearlib.maskgit_vqgan import load_maskgit_vqgan

    ckpt = find_maskgit_checkpoint(path, data_root)
    return load_maskgit_vqgan(ckpt, config={"resolution": SCALES["paper"]["resolution"]}).to(device).eval()


def __getattr__(name):  # lazy re-exports, so `from rearlib.tokenizer import VQTokenizer` works without cycles
    if name in ("VQTokenizer", "VQConfig"):
        from rearlib import vqgan

        return getattr(vqgan, name)
    if name in ("MaskGITVQGAN", "load_maskgit_vqgan"):
        from rearlib import maskgit_vqgan

        return getattr(maskgit_vqgan, name)
    raise AttributeError(f"module 'rearlib.tokenizer' has no attribute {name!r}")
