"""The paper's diagnosis analyses (paper §3.1, App. B-C; docs/paper.md, reAR §2, choices of §6) as pure functions.

Every analysis is a function of (generator, tokenizer, images or tokens, class labels, settings, randomness) that
returns a tidy :class:`pandas.DataFrame` - one row per image per setting (CKA: one row per layer per target,
pooled over images) - and shows a tqdm bar. Notebooks aggregate with :func:`mean_ci` and put the paper's numbers
next to ours with :func:`paper_reference`.

Notation: ``x = (x_1..x_N)`` the ground-truth (GT) token sequence of an image (raster order), ``x̂`` the evaluated
sequence, ``z(k)`` the tokenizer's raw codebook vector of code ``k`` (``tokenizer.codebook[k]``), ``p_θ`` the
generator's *conditional* next-token distribution (class label given, no guidance, temperature 1). A row depends
only on (model, image, settings, seed), not on the batch it is in (:mod:`~rearlib.analysis.common`).

Modules (each experiment's module docstring defines its protocol and columns):

* :mod:`~rearlib.analysis.forced_decoding` - experiment A, exposure bias (notebook 05): :func:`forced_decode`,
  :func:`exposure_bias`.
* :mod:`~rearlib.analysis.replacement` - experiment B, embedding-nearest replacement (notebook 06):
  :func:`codebook_neighbours`, :func:`embedding_replacement`.
* :mod:`~rearlib.analysis.context_noise` - experiment C, robustness of next-token prediction to context noise
  (notebook 07): :func:`perturb_context`, :func:`robustness`.
* :mod:`~rearlib.analysis.cka` - experiment D, CKA between block outputs and codebook vectors (notebook 08):
  :class:`StreamingLinearCKA`, :func:`cka_layers`.
* :mod:`~rearlib.analysis.scoring` - image metrics of decoded sequences (A and B): :func:`image_metrics`.
* :mod:`~rearlib.analysis.common` - seeds, input checks and model evaluation shared by all four:
  :func:`encode_images`, :func:`teacher_forced_predictions`.
* :mod:`~rearlib.analysis.stats` - means with t-intervals: :func:`mean_ci`, :func:`ci_of`, ``welch_diff``,
  ``format_ci``.
* :mod:`~rearlib.analysis.paper_numbers` - every paper number notebooks 05-08 compare with, with its source:
  :func:`paper_reference`.
* :mod:`~rearlib.analysis.findings` - from rows to the notebooks' effects, verdicts and claim rows
  (``run_per_model``, ``exposure_bias_findings``, ``replacement_findings``, ``robustness_findings``,
  ``cka_findings``).
* :mod:`~rearlib.analysis.cost` - ``python -m rearlib analysis benchmark``, the GPU cost of the four analyses.

The figures of notebooks 05-08 are drawn by :mod:`rearlib.plots`.
"""

from __future__ import annotations

from rearlib.analysis.cka import CKA_TARGETS, StreamingLinearCKA, cka_layers
from rearlib.analysis.common import encode_images, teacher_forced_predictions
from rearlib.analysis.context_noise import perturb_context, robustness
from rearlib.analysis.findings import (MODEL_NAMES, Findings, cka_findings, cka_fold_matrix, cka_peaks,
                                      exposure_bias_findings, paired_diff, replacement_findings,
                                      replacement_values, robustness_findings, robustness_per_image, run_per_model)
from rearlib.analysis.forced_decoding import PROTOCOLS, RATIOS, exposure_bias, forced_decode
from rearlib.analysis.paper_numbers import paper_reference
from rearlib.analysis.replacement import R_PRIMES, REPLACEMENT_MODES, codebook_neighbours, embedding_replacement
from rearlib.analysis.scoring import image_metrics
from rearlib.analysis.stats import ci_of, format_ci, mean_ci, welch_diff

__all__ = [
    "RATIOS", "R_PRIMES", "PROTOCOLS", "REPLACEMENT_MODES", "CKA_TARGETS",
    "forced_decode", "exposure_bias", "codebook_neighbours", "embedding_replacement",
    "teacher_forced_predictions", "perturb_context", "robustness",
    "StreamingLinearCKA", "cka_layers", "image_metrics", "encode_images", "mean_ci", "ci_of", "welch_diff",
    "format_ci", "paper_reference", "MODEL_NAMES", "Findings", "run_per_model", "paired_diff",
    "exposure_bias_findings", "replacement_values", "replacement_findings", "robustness_per_image",
    "robustness_findings", "cka_peaks", "cka_fold_matrix", "cka_findings",
]
