"""Reconstruction metrics of a tokenizer: per-image PSNR / SSIM on uint8 images, code usage and perplexity."""

from __future__ import annotations

import math

import torch

from rearlib.tokenizers.base import Tokenizer

__all__ = ["to_uint8", "psnr_ssim", "code_usage", "evaluate"]


def to_uint8(images: torch.Tensor):
    """float [B,3,H,W] in [0,1] -> numpy uint8 [B,H,W,3], round(255 x) (as rearlib.metrics.to_uint8)."""
    return (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def psnr_ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB, L = 255) and SSIM (scikit-image defaults, 7x7 window, channel_axis) on uint8 images."""
    # Here, not at the top: scikit-image takes about two seconds to import and only evaluation needs it.
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = to_uint8(reference), to_uint8(reconstruction)
    psnr = [float(peak_signal_noise_ratio(x, y, data_range=255)) for x, y in zip(a, b)]
    ssim = [float(structural_similarity(x, y, data_range=255, channel_axis=-1)) for x, y in zip(a, b)]
    return psnr, ssim


def code_usage(tokens: torch.Tensor, codebook_size: int) -> dict:
    """``usage``: fraction of the K codes that occur at least once in ``tokens``; ``perplexity``:
    ``exp(-sum_k p_k log p_k)`` of the empirical code frequencies ``p`` (K when uniform, 1 when one code);
    ``counts``: the per-code counts (LongTensor [K], CPU)."""
    counts = torch.bincount(tokens.flatten().cpu(), minlength=codebook_size)
    p = counts.double() / counts.sum().clamp_min(1)
    ent = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(math.exp(ent)), "counts": counts}


@torch.no_grad()
def evaluate(tokenizer: Tokenizer, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Reconstruction PSNR/SSIM (means over images), L1/MSE in [0,1] units, and code usage/perplexity."""
    recs, toks = [], []
    for i in range(0, images.shape[0], batch_size):
        t = tokenizer.encode(images[i:i + batch_size])
        toks.append(t.cpu())
        recs.append(tokenizer.decode(t).cpu())
    rec, tok = torch.cat(recs), torch.cat(toks)
    ref = images.cpu().float()
    psnr, ssim = psnr_ssim(ref, rec)
    use = code_usage(tok, tokenizer.codebook_size)
    return {"n_images": int(images.shape[0]), "psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim),
            "l1": float((rec - ref).abs().mean()), "mse": float(((rec - ref) ** 2).mean()),
            "usage": use["usage"], "perplexity": use["perplexity"]}

