"""Metrics: token-level (CTR, perplexity, embedding similarity), image-level (PSNR, SSIM, LPIPS or ST-LPIPS),
distribution-level (FID / KID / precision-recall through torch-fidelity, IS where logits exist) and CKA.

Modules (every name below is also importable from :mod:`rearlib.metrics` itself):

* :mod:`~rearlib.metrics.tokens`: correct-token ratio, perplexities, codebook-embedding similarity.
* :mod:`~rearlib.metrics.image`: :func:`to_uint8`, PSNR and SSIM (scikit-image), and the image input checks.
* :mod:`~rearlib.metrics.perceptual`: LPIPS, ST-LPIPS and DFD; :func:`resolve_perceptual` and
  :func:`perceptual_distance`, which return the name of the metric actually computed.
* :mod:`~rearlib.metrics.distribution`: FID / IS / KID / precision-recall through torch-fidelity
  (:func:`distribution_metrics`), the feature extractors (:data:`EXTRACTORS`), their names (:func:`metric_label`,
  :func:`inception_fid_identity`) and ADM reference batches (:func:`load_adm_reference`).
* :mod:`~rearlib.metrics.cka`: linear and minibatch CKA, per layer.
* :mod:`~rearlib.metrics.inception`: the Inception-v3 FID network, registered with torch-fidelity.
* :mod:`~rearlib.metrics.classifier`: the in-project classifier (a diagnostic feature network), its training CLI.

Conventions (see README "Metrics" and docs/paper.md, reAR §2, §4, §6):

* Images in: float tensors ``[B, 3, H, W]`` in [0, 1]. They are quantised to uint8 (``round(255 x)``) before
  PSNR/SSIM and before torch-fidelity, exactly as a PNG on disk would be.
* Tokens in: LongTensor ``[B, N]`` (raster order) or ``[B, h, w]`` (flattened row-major); ``[N]`` is one sequence.
* Per-sample functions return a float64 tensor ``[B]``; aggregate with ``.mean()`` (or ``nanmean`` where a
  value can be undefined, documented per function).
* The library does the work: PSNR/SSIM are scikit-image, LPIPS is the ``lpips`` package, ST-LPIPS is
  ``stlpips-pytorch``, FID/IS/KID/PR are torch-fidelity with the Inception-v3 FID network of
  :mod:`rearlib.metrics.inception`. What is ours: input checks, conversions, offline detection, weight loading, CKA.
* Every metric is named for what it is. A perceptual distance or a distribution metric always comes with the name
  of what was actually computed (``"LPIPS-VGG"``, ``"ST-LPIPS(alex)"``, ``"FID"``, and for the in-project
  classifier, a diagnostic asked for by name, ``"DFD[rearlib-classifier]"`` / ``"FID[rearlib-classifier]"``).
  Tables and axes use that name; ST-LPIPS is never called LPIPS, the in-project extractor never "Inception".
"""

from __future__ import annotations

from rearlib.metrics.cka import cka_by_layer, linear_cka, linear_cka_gram, minibatch_cka, unbiased_hsic
from rearlib.metrics.distribution import (DEFAULT_EXTRACTOR, EXTRACTORS, INCEPTION_EXTRACTORS, UInt8Images,
                                          check_extractor, distribution_metrics, extractor_has_logits, feature_statistics,
                                          inception_available, inception_weights_file, load_adm_reference,
                                          metric_label)
from rearlib.metrics.image import psnr, ssim, to_uint8
from rearlib.metrics.perceptual import (DFD_NAME, LPIPS_NETS, PERCEPTUAL_CHOICES, ST_LPIPS_NETS, LPIPSUnavailable,
                                        PerceptualResult, dfd_distance, load_lpips, load_st_lpips,
                                        lpips_backbone_file, lpips_distance, lpips_status, perceptual_distance,
                                        perceptual_metric_name, resolve_perceptual, st_lpips_distance, st_lpips_name,
                                        st_lpips_status, st_lpips_weights_file)
from rearlib.metrics.tokens import (context_perplexities, correct_token_ratio, embedding_similarity,
                                    sequence_perplexity, token_log_probs)

# Also reachable here, outside __all__: further public names, and the model caches and warning memory that tests reset.
from rearlib.metrics.distribution import inception_fid_identity  # noqa: F401
from rearlib.metrics.perceptual import DEFAULT_OFFLINE_PERCEPTUAL, ST_LPIPS_ENV, ST_LPIPS_MIN_SIZE  # noqa: F401
from rearlib.metrics.perceptual import _lpips_models, _st_lpips_models, _warned  # noqa: F401

__all__ = [
    "correct_token_ratio", "token_log_probs", "sequence_perplexity", "context_perplexities", "embedding_similarity",
    "to_uint8", "psnr", "ssim",
    "LPIPS_NETS", "ST_LPIPS_NETS", "DFD_NAME", "PERCEPTUAL_CHOICES", "LPIPSUnavailable", "lpips_backbone_file",
    "lpips_status", "load_lpips", "lpips_distance", "st_lpips_name", "st_lpips_weights_file", "st_lpips_status",
    "load_st_lpips", "st_lpips_distance", "dfd_distance", "PerceptualResult", "resolve_perceptual",
    "perceptual_metric_name", "perceptual_distance",
    "EXTRACTORS", "DEFAULT_EXTRACTOR", "INCEPTION_EXTRACTORS", "check_extractor", "extractor_has_logits",
    "UInt8Images", "inception_weights_file", "inception_available", "metric_label",
    "load_adm_reference", "distribution_metrics", "feature_statistics",
    "linear_cka", "linear_cka_gram", "unbiased_hsic", "minibatch_cka", "cka_by_layer",
]
