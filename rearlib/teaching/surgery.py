"""Token surgery: which tokens of an image are made wrong, and what replaces them (pure functions, no widgets).

The paper's point (paper §3.1; docs/paper.md, reAR §2.1-§2.2): a visual AR model is trained and judged on token
*indices*, but the tokenizer decodes code *vectors*. Two sequences with the same correct-token ratio (CTR) can
decode to very different images, and an error early in the context changes everything the model writes after it.

Definitions (N tokens in raster order, K codes, x = the image's ground-truth (GT) tokens, z(k) = the tokenizer's
codebook vector of code k):

* **Error positions** (:func:`error_positions`): ``"early"`` = raster positions 0..k-1, ``"late"`` = N-k..N-1,
  ``"random"`` = k positions uniform without replacement (``torch.randperm`` seeded by ``seed``), ``"clicked"`` =
  the cells the user clicked (k is then their number).
* **Replacements** (:func:`replace_tokens`): ``"nearest"`` = the code of highest cosine similarity to z(x_t)
  other than x_t itself, ``"farthest"`` = the code of lowest cosine (both from
  :func:`rearlib.analysis.codebook_neighbours`, the tables of notebook 06); ``"random"`` = uniform over the K-1
  codes other than x_t, drawn once for every position from ``seed`` (:func:`random_codes`), so every placement
  uses the same code at the same position. None of them equals x_t, so **CTR = 1 - k/N exactly** (checked).
* **Continuation** (:func:`continue_after_error`, replacement ``"continue"``): positions before the first chosen
  position p keep x; position p gets the ``"random"`` code; the generator then writes p+1..N-1 itself in raster
  order given its own, mixed prefix (multinomial at temperature 1 without guidance, uniforms from ``seed``;
  :func:`rearlib.analysis.forced_decode` with its KV cache). This is the paper's exposure-bias setting
  (Experiment A) for one image; the other chosen positions are written by the model too, and CTR is measured.
* **Image metrics** of a decoded image against the original image (the paper's definition, not against the
  tokenizer's reconstruction): PSNR (dB, L = 255) and SSIM on uint8 images, and a perceptual distance - LPIPS-VGG
  when its weights are cached locally, otherwise ST-LPIPS(alex), a shift-tolerant LPIPS whose weights ship on PyPI -
  all through :func:`rearlib.analysis.image_metrics`.
* **Context errors** (:meth:`~rearlib.teaching.widgets.ARvsReAR.context_errors`, the paper's App. C.1 robustness
  probe on one image): k of the context tokens x_1..x_{N-1} (x_N is context for nothing) are replaced by random
  codes; each model predicts every token by teacher forcing, ``x̂_t = argmax p(· | x̃_{<t})``. ``ctr`` = (1/N)
  Σ 1[x̂_t = x_t] with the clean (``x̃ = x``) and the corrupted context; ``ctr_after_error`` = the same over the
  targets right after a corrupted token (in the clean rows: the same targets with the clean context, the baseline;
  NaN when k = 0); the N predictions are decoded into an image and compared with the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rearlib.analysis import forced_decode
from rearlib.sample import image_seed


PLACEMENTS = ("clicked", "early", "late", "random")
REPLACEMENTS = ("nearest", "random", "farthest", "continue")
CONTEXT_PLACEMENTS = ("random", "early", "late")
#: What :class:`~rearlib.teaching.widgets.SameCTR` varies at fixed CTR, and the levels of each factor (plotted in
#: this order).
FACTORS = {"embedding distance": ("nearest", "random", "farthest"), "error position": ("early", "random", "late")}
_STREAM_RANDOM_CODE, _STREAM_POSITIONS, _STREAM_CONTINUE = 1, 2, 3


def _stream_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) of a user seed: independent draws per purpose."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    g = torch.Generator()
    g.manual_seed(image_seed(int(seed), stream))
    return g


def _check_gt(gt, codebook_size: int | None = None) -> torch.Tensor:
    if not torch.is_tensor(gt) or gt.ndim != 1 or gt.is_floating_point() or gt.dtype == torch.bool:
        raise TypeError(f"gt must be a 1-D integer tensor of token ids [N] (raster order); got "
                        f"{tuple(gt.shape) if torch.is_tensor(gt) else type(gt).__name__}")
    if gt.numel() == 0:
        raise ValueError("gt is empty")
    if codebook_size is not None and (int(gt.min()) < 0 or int(gt.max()) >= codebook_size):
        raise ValueError(f"gt ids must be in [0, {codebook_size}); got [{int(gt.min())}, {int(gt.max())}]")
    return gt.long()


def _check_positions(positions, n_tokens: int) -> torch.Tensor:
    pos = torch.as_tensor(positions if positions is not None else [], dtype=torch.long).reshape(-1).cpu()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n_tokens):
        raise ValueError(f"positions must be in [0, {n_tokens}); got [{int(pos.min())}, {int(pos.max())}]")
    if pos.unique().numel() != pos.numel():
        raise ValueError("positions must be distinct")
    return pos.sort().values


def error_positions(n_tokens: int, k: int, placement: str, *, seed: int = 0, clicked=None) -> torch.Tensor:
    """Sorted raster positions (LongTensor) of the wrong tokens; see the module docstring for each placement.

    ``k`` in [0, n_tokens] (ignored for ``"clicked"``, whose positions are ``clicked``)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "clicked":
        return _check_positions(sorted(set(int(c) for c in (clicked or ()))), n_tokens)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n_tokens:
        raise ValueError(f"k must be an int in [0, {n_tokens}], got {k!r}")
    k = int(k)
    if placement == "early":
        return torch.arange(k)
    if placement == "late":
        return torch.arange(n_tokens - k, n_tokens)
    return torch.randperm(n_tokens, generator=_stream_generator(seed, _STREAM_POSITIONS))[:k].sort().values


def random_codes(gt: torch.Tensor, codebook_size: int, seed: int = 0) -> torch.Tensor:
    """One code per position, uniform over the ``codebook_size - 1`` codes other than ``gt[t]`` ([N], CPU).

    Drawn as u_t ~ U{0..K-2} from ``seed``, then u_t + 1[u_t >= x_t] (which skips x_t): the code at a position
    depends only on (seed, position, x_t), never on which other positions are replaced."""
    gt = _check_gt(gt, codebook_size).cpu()
    if codebook_size < 2:
        raise ValueError("codebook_size must be >= 2")
    u = torch.randint(0, codebook_size - 1, (gt.numel(),), generator=_stream_generator(seed, _STREAM_RANDOM_CODE))
    return u + (u >= gt).long()


def replace_tokens(gt: torch.Tensor, positions, mode: str, *, codebook_size: int, neighbours: dict | None = None,
                   seed: int = 0) -> torch.Tensor:
    """``gt`` ([N]) with the tokens at ``positions`` replaced by their ``mode`` code ("nearest" / "farthest" /
    "random"; see the module docstring). ``neighbours``: :func:`rearlib.analysis.codebook_neighbours` of the
    tokenizer (needed for nearest / farthest). Returns a new CPU LongTensor [N]; every replaced token differs
    from the GT token (RuntimeError otherwise), so CTR = 1 - len(positions) / N."""
    gt = _check_gt(gt, codebook_size).cpu()
    pos = _check_positions(positions, gt.numel())
    if mode == "random":
        repl = random_codes(gt, codebook_size, seed)
    elif mode in ("nearest", "farthest"):
        if neighbours is None or mode not in neighbours:
            raise ValueError(f"mode {mode!r} needs neighbours=rearlib.analysis.codebook_neighbours(codebook)")
        table = neighbours[mode].cpu()
        if table.numel() != codebook_size:
            raise ValueError(f"neighbour table has {table.numel()} codes, codebook_size is {codebook_size}")
        repl = table[gt]
    else:
        raise ValueError(f"mode must be 'nearest', 'random' or 'farthest' (use continue_after_error for "
                         f"'continue'); got {mode!r}")
    out = gt.clone()
    out[pos] = repl[pos]
    if bool((out[pos] == gt[pos]).any()):
        raise RuntimeError(f"a {mode} replacement equals the true token (the neighbour table is wrong)")
    return out


def continue_after_error(model, gt: torch.Tensor, positions, label: int, *, seed: int = 0,
                         temperature: float = 1.0) -> tuple[torch.Tensor, int | None]:
    """The generator's continuation after the first wrong token (module docstring, "Continuation").

    Returns ``(tokens [N] on the CPU, p)`` with p the first error position, or ``(gt, None)`` without positions.
    """
    cfg = model.config
    gt = _check_gt(gt, cfg.codebook_size).cpu()
    if gt.numel() != cfg.seq_len:
        raise ValueError(f"gt has {gt.numel()} tokens, the generator writes {cfg.seq_len}")
    pos = _check_positions(positions, gt.numel())
    if pos.numel() == 0:
        return gt.clone(), None
    p = int(pos[0])
    start = gt.clone()
    start[p] = random_codes(gt, cfg.codebook_size, seed)[p]
    forced = torch.zeros(1, gt.numel(), dtype=torch.bool)
    forced[0, :p + 1] = True
    # One uniform in (0, 1] per step (forced_decode's inverse-CDF draw needs u > 0).
    u = 1.0 - torch.rand(1, gt.numel(), generator=_stream_generator(seed, _STREAM_CONTINUE), dtype=torch.float64)
    dev = next(model.parameters()).device
    out, _, _ = forced_decode(model, start[None].to(dev), forced.to(dev), torch.tensor([int(label)], device=dev), u,
                              temperature=temperature)
    return out[0].cpu(), p


@dataclass
class SurgeryResult:
    """What :meth:`~rearlib.teaching.widgets.TokenSurgery.compute` returns. Images are float [3, R, R] CPU; metrics
    against ``original``."""

    image: object
    label: int
    placement: str
    replacement: str
    model: str | None
    seed: int
    gt: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    first_error: int | None
    original: torch.Tensor
    reconstruction: torch.Tensor
    decoded: torch.Tensor
    ctr: float
    psnr: float
    ssim: float
    perceptual: float
    recon_psnr: float
    recon_ssim: float
    recon_perceptual: float
    perceptual_metric: str
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return int(self.positions.numel())

    def row(self) -> dict:
        """A flat record (no tensors) for a DataFrame."""
        return {"image": self.image, "label": self.label, "placement": self.placement,
                "replacement": self.replacement, "model": self.model, "seed": self.seed, "k": self.k,
                "n_tokens": int(self.gt.numel()), "first_error": self.first_error, "ctr": self.ctr,
                "psnr": self.psnr, "ssim": self.ssim, "perceptual": self.perceptual,
                "recon_psnr": self.recon_psnr, "recon_ssim": self.recon_ssim,
                "recon_perceptual": self.recon_perceptual, "perceptual_metric": self.perceptual_metric,
                "seconds": self.seconds}
