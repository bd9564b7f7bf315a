"""Image tokenizers: the common interface, checkpoint I/O and ``get_tokenizer(scale, ...)``.

Two tokenizers implement the interface below:

* :class:`rearlib.tokenizers.vqgan.VQTokenizer` — our own VQGAN-style tokenizer, trained in-project (``smoke`` trains a
  tiny one in seconds and caches it; ``small`` ships a checkpoint in ``data/checkpoints/``).
* :class:`rearlib.tokenizers.maskgit_vqgan.MaskGITVQGAN` — a port of the MaskGIT-VQGAN the paper uses (``paper`` scale),
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

import os
from pathlib import Path

import torch

from rearlib.runtime import REPO_ROOT, load_torch_file, resolve_device

from rearlib.scales import validate_scale
from rearlib.checkpoints import StateDictMismatchError, check_state_dict, load_state_dict_strict
from rearlib.tokenizers.base import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, KINDS, Tokenizer, TokenizerMismatchError,
                                     load_checkpoint, nearest_codes, round_weights_, save_tokenizer,
                                     tokenizer_checkpoint, weights_identity)
from rearlib.tokenizers.maskgit_vqgan import MaskGITVQGAN, load_maskgit_vqgan
from rearlib.tokenizers.vqgan import VQConfig, VQTokenizer, get_or_train

__all__ = ["Tokenizer", "VQTokenizer", "VQConfig", "MaskGITVQGAN", "get_tokenizer", "load_tokenizer", "load_checkpoint",
           "save_tokenizer", "tokenizer_checkpoint", "load_maskgit_vqgan", "find_maskgit_checkpoint", "nearest_codes",
           "weights_identity", "round_weights_", "check_state_dict", "load_state_dict_strict", "StateDictMismatchError",
           "TokenizerMismatchError", "KINDS", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]
from rearlib import scales



def load_tokenizer(path_or_ckpt, device="cpu") -> Tokenizer:
    """Load a checkpoint written by :func:`save_tokenizer` or a plain MaskGIT-VQGAN state dict (the authors'
    ``.bin``). The weights are checked strictly by name and shape, and the stored identity is verified after
    loading (a corrupted or edited file raises instead of silently computing something else)."""
    ckpt = path_or_ckpt
    if isinstance(path_or_ckpt, (str, os.PathLike)):
        ckpt = load_torch_file(path_or_ckpt, "tokenizer checkpoint", "Re-download or restore the file.")
    if isinstance(ckpt, dict) and ckpt.get("format") != CHECKPOINT_FORMAT and any(k.startswith("quantize.") for k in ckpt):
        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        return load_maskgit_vqgan(ckpt).to(device).eval()
    return load_checkpoint(ckpt, device)


# ----------------------------------------------------------------------------------------------------------
# Per-scale entry point
# ----------------------------------------------------------------------------------------------------------
def find_maskgit_checkpoint(path=None, data_root=None) -> Path:
    """Resolve the MaskGIT-VQGAN weights: explicit ``path``, ``$REARLIB_MASKGIT_VQGAN``, then the known file
    names (``maskgitvq.bin``, ``maskgit-vqgan-imagenet-f16-256.bin``) under ``data_root``,
    ``data_root/checkpoints``, ``data_root/ckpt``, the repository's ``data/checkpoints/`` and ``ckpt/``.
    Raises FileNotFoundError listing every path tried."""
    cfg = scales.TOKENIZER["paper"]
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

    ``smoke``: trains a tiny :class:`~rearlib.tokenizers.vqgan.VQTokenizer` (under 30 s on 2 CPU cores) the first time
    and caches it under ``artifacts/tokenizer/<config hash>/``. ``small``: loads the shipped
    ``data/checkpoints/tokenizer_small.pt`` (or ``path``). ``paper``: loads MaskGIT-VQGAN from ``path`` /
    ``$REARLIB_MASKGIT_VQGAN`` / ``data_root`` (see :func:`find_maskgit_checkpoint`).
    """
    validate_scale(scale)
    device = resolve_device(device) if isinstance(device, (str, type(None))) else torch.device(device)
    if scale == "smoke":
        return get_or_train("smoke", device=device, progress=progress).to(device).eval()
    if scale == "small":
        ckpt = Path(path) if path is not None else REPO_ROOT / scales.TOKENIZER["small"]["checkpoint"]
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"small-scale tokenizer checkpoint {ckpt} not found. It ships with the repository; to rebuild it "
                f"on a GPU run: python -m rearlib vqgan train --scale small --out {scales.TOKENIZER['small']['checkpoint']}")
        return load_tokenizer(ckpt, device)
    ckpt = find_maskgit_checkpoint(path, data_root)
    return load_maskgit_vqgan(ckpt, config={"resolution": scales.TOKENIZER["paper"]["resolution"]}).to(device).eval()
