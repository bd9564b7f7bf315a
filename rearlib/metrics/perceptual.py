"""Perceptual distances between images, each returned with the name of the metric actually computed.

* LPIPS (Zhang et al. 2018, the ``lpips`` package; VGG / AlexNet / SqueezeNet trunks), built offline from
  torchvision's ImageNet weights when they are in the torch hub cache;
* ST-LPIPS, shift-tolerant LPIPS (Ghildyal & Liu 2022, ``stlpips-pytorch``, whose wheel carries its weights): the
  offline default, always named ``"ST-LPIPS(<net>)"``, never LPIPS;
* DFD, an LPIPS-style distance in the in-project classifier's features (:mod:`rearlib.metrics.classifier`), a
  diagnostic used only when asked for by name.

:func:`resolve_perceptual` says what a ``prefer`` choice computes on this machine and why; :func:`perceptual_distance`
computes it and returns a :class:`PerceptualResult` (values, metric name). Images in: float ``[B, 3, H, W]`` in
[0, 1], fed to the LPIPS-family networks on [-1, 1] without resizing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from rearlib.metrics.classifier import get_classifier
from rearlib.metrics.image import _image_pair

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
    # Imported here, not at the top: torchvision takes seconds to import and only LPIPS needs it.
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
    import lpips  # here, not at the top: lpips imports torchvision, which takes seconds

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
    # Imported here, not at the top: lpips and torchvision take seconds to import; only LPIPS needs them.
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
    from stlpips_pytorch import stlpips  # here, not at the top: it imports torchvision (seconds)

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
        classifier = get_classifier(scale, device or "cpu")
    return PerceptualResult(dfd_distance(a, b, classifier, batch_size=batch_size), DFD_NAME)
