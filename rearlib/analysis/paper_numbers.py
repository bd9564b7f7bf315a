"""Every number of the reAR paper that notebooks 05-08 compare with, each with where in the paper it comes from.

The paper's figures and tables are transcribed in docs/paper.md, reAR §2.1-§2.4 (the diagnosis experiments) and
§1 (the method); the figure files themselves are the project page's (reAR §0): ``exposure_bias.png`` /
``app_exposure_bias.png`` (Fig. 3a / 8a-d), ``embedding_unawareness.png`` / ``app_emb_similarity.png`` (Fig. 3b /
8e-g) and ``analysis.png`` (Fig. 9). Values read off a plot are *digitised* (their precision is stated); bar labels
and printed values are exact. :func:`paper_reference` returns the figure values as tidy tables; the constants
below are the other paper numbers the notebooks use (the tokenizer and model of the analyses, the tolerances of
the verdicts). The analysis model, checkpoint and number of images are not stated in the paper (reAR §2).
"""

from __future__ import annotations

import pandas as pd

# ----------------------------------------------------------------------------------------------------------------
# The paper's setting (docs/paper.md, reAR §1.1, §1.3, §1.8)
# ----------------------------------------------------------------------------------------------------------------
#: The tokenizer of every analysis: MaskGIT-VQGAN, f = 16 (a 256 px image -> 16x16 tokens), K = 1024 codes of
#: dimension 256 (reAR §1.1).
TOKENIZER = {"name": "MaskGIT-VQGAN", "downsampling": 16, "resolution": 256, "codebook_size": 1024, "code_dim": 256}
#: The analysis model: the CKA axis runs over layers 0..19, i.e. a 20-block, reAR-S-sized generator (reAR §2.4,
#: §6 item 1) of width 768 (reAR-S, reAR §1.3).
ANALYSIS_DEPTH = 20
ANALYSIS_HIDDEN = 768
#: Training length of the paper's generators: 400 epochs of ImageNet (reAR §1.8, Table 1).
TRAINING_EPOCHS = 400

# ----------------------------------------------------------------------------------------------------------------
# Experiment A - exposure bias (paper §3.1 Fig. 3a, App. B Fig. 8a-d; reAR §2.1; notebook 05)
# ----------------------------------------------------------------------------------------------------------------
#: ratio r: (LPIPS imperfect, LPIPS perfect, PSNR imperfect, PSNR perfect); digitised, ±0.01 LPIPS, ±0.2 dB.
EXPOSURE_BIAS = {
    0.1: (0.65, 0.59, 9.7, 10.7), 0.2: (0.58, 0.50, 10.8, 11.6), 0.3: (0.55, 0.44, 11.3, 11.9),
    0.4: (0.46, 0.38, 12.5, 13.0), 0.5: (0.40, 0.32, 13.7, 13.7), 0.6: (0.31, 0.24, 15.7, 15.8),
    0.7: (0.23, 0.19, 16.6, 16.7), 0.8: (0.17, 0.12, 18.3, 18.6), 0.9: (0.10, 0.06, 21.2, 21.6),
}
#: Precision of the paper's imperfect - perfect difference, read off two digitised curves: the tolerance of the
#: "reproduced" verdict in notebook 05.
EXPOSURE_BIAS_TOLERANCE = {"perceptual": 0.02, "psnr": 0.3}
#: The x-axis range of Fig. 8c-d (perplexity of the evaluated sequences; reAR §2 and §6 item 5).
PERPLEXITY_RANGE = (1450, 1950)

# ----------------------------------------------------------------------------------------------------------------
# Experiment B - embedding-nearest replacement (paper §3.1 Fig. 3b, App. B Fig. 7, 8e-g; reAR §2.2; notebook 06)
# ----------------------------------------------------------------------------------------------------------------
#: r': (LPIPS, PSNR: exact bar labels; embedding similarity, ΔPerplexity: digitised).
REPLACEMENT = {
    0.0: (0.317, 14.80, 0.50, 0.0), 0.2: (0.287, 15.47, 0.57, 55.0), 0.4: (0.275, 15.90, 0.65, 140.0),
    0.6: (0.272, 16.23, 0.72, 245.0), 0.8: (0.269, 16.31, 0.80, 390.0),
}
#: Tolerance of the "reproduced" verdict in notebook 06: half a unit of the printed bar labels (LPIPS to 3
#: decimals, PSNR to 2) and the digitisation precision of similarity and ΔPerplexity.
REPLACEMENT_TOLERANCE = {"perceptual": 0.005, "psnr": 0.05, "emb_sim": 0.03, "ppl_delta": 20.0}

# ----------------------------------------------------------------------------------------------------------------
# Experiment C - robustness of next-token prediction (paper App. C.1, Fig. 9a; reAR §2.3; notebook 07)
# ----------------------------------------------------------------------------------------------------------------
#: (model, data): (clean %, noisy %) teacher-forced CTR, printed on the bars and in the text (exact).
ROBUSTNESS = {
    ("AR", "trained"): (12.8, 9.1), ("AR", "unseen"): (11.8, 8.3),
    ("reAR", "trained"): (12.9, 9.5), ("reAR", "unseen"): (12.3, 9.0),
}
#: Fraction of the context replaced uniformly at random in the noisy condition ("10%").
NOISE_FRACTION = 0.1
#: The paper prints CTR to one decimal: the tolerance (percentage points) of the verdicts in notebook 07.
ROBUSTNESS_TOLERANCE_PP = 0.1

# ----------------------------------------------------------------------------------------------------------------
# Experiment D - CKA layer analysis (paper App. C.2, Fig. 9b-c; reAR §2.4; notebook 08)
# ----------------------------------------------------------------------------------------------------------------
#: The layers plotted in Fig. 9b-c (of the 20-block model).
CKA_LAYERS = (0, 5, 10, 15, 19)
#: (model, target): CKA at :data:`CKA_LAYERS`; digitised with precision :data:`CKA_PRECISION`.
CKA_PRECISION = 0.005
CKA = {
    ("AR", "encoded"): (0.39, 0.14, 0.07, 0.05, 0.02), ("reAR", "encoded"): (0.74, 0.26, 0.14, 0.06, 0.02),
    ("AR", "decoded"): (0.035, 0.068, 0.063, 0.099, 0.067), ("reAR", "decoded"): (0.037, 0.062, 0.071, 0.130, 0.068),
}
#: reAR's alignment layers: EN at the input block, DE at layer 15 of 20 (about three quarters of the depth), the
#: peak of the decoded CKA (reAR §1.6, §2.4, §6 item 10).
ENCODE_LAYER = 0
DECODE_LAYER = 15
#: Precision of a reAR - AR difference of two digitised CKA values: the tolerance of the verdict in notebook 08.
CKA_TOLERANCE = 0.01

_EXPERIMENT_NAMES = {"A": "A", "exposure_bias": "A", "B": "B", "replacement": "B", "embedding_replacement": "B",
                     "C": "C", "robustness": "C", "D": "D", "cka": "D", "cka_layers": "D"}


def paper_reference(experiment: str) -> pd.DataFrame:
    """The paper's numbers for an analysis, as a tidy DataFrame (docs/paper.md, reAR §2.1-§2.4).

    ``"A"`` / ``"exposure_bias"``: protocol, ratio, ctr (the paper plots CTR ≈ r), perceptual (LPIPS, backbone not
    stated), psnr - digitised ±0.01 LPIPS / ±0.2 dB. ``"B"`` / ``"replacement"``: r_prime, perceptual, psnr (exact
    bar labels), emb_sim and ppl_delta (digitised). ``"C"`` / ``"robustness"``: model, data (trained / unseen),
    condition (clean / noisy), ctr (fraction) and ctr_percent (printed values). ``"D"`` / ``"cka"``: model,
    target (encoded / decoded), layer, relative_depth (of 20 blocks), cka (digitised ±0.005). Every frame has
    ``source`` and ``precision`` columns; the analysis model/checkpoint/number of images are not stated in the
    paper (docs/paper.md, reAR §2).
    """
    e = _EXPERIMENT_NAMES.get(experiment)
    if e is None:
        raise ValueError(f"unknown experiment {experiment!r}; use one of {sorted(_EXPERIMENT_NAMES)}")
    rows = []
    if e == "A":
        for r, (li, lp, pi, pp) in EXPOSURE_BIAS.items():
            rows.append({"protocol": "imperfect", "ratio": r, "ctr": r, "perceptual": li, "psnr": pi})
            rows.append({"protocol": "perfect", "ratio": r, "ctr": r, "perceptual": lp, "psnr": pp})
        df = pd.DataFrame(rows)
        df["perceptual_metric"] = "LPIPS (paper; backbone not stated)"
        df["source"] = "Fig. 3a / Fig. 8a-b (exposure_bias.png, app_exposure_bias.png)"
        df["precision"] = "digitised: ±0.01 LPIPS, ±0.2 dB"
    elif e == "B":
        for r, (lp, ps, sim, dppl) in REPLACEMENT.items():
            rows.append({"r_prime": r, "perceptual": lp, "psnr": ps, "emb_sim": sim, "ppl_delta": dppl})
        df = pd.DataFrame(rows)
        df["perceptual_metric"] = "LPIPS (paper; backbone not stated)"
        df["source"] = "Fig. 3b / Fig. 8e-g (embedding_unawareness.png, app_emb_similarity.png)"
        df["precision"] = "perceptual, psnr: exact bar labels; emb_sim, ppl_delta: digitised"
    elif e == "C":
        for (model, data), (clean, noisy) in ROBUSTNESS.items():
            for cond, v in (("clean", clean), ("noisy", noisy)):
                rows.append({"model": model, "data": data, "condition": cond, "ctr": v / 100.0, "ctr_percent": v,
                             "noise_fraction": NOISE_FRACTION if cond == "noisy" else 0.0})
        df = pd.DataFrame(rows)
        df["source"] = "App. C.1, Fig. 9a"
        df["precision"] = "exact (printed values)"
    else:
        for (model, target), vals in CKA.items():
            for l, v in zip(CKA_LAYERS, vals):
                rows.append({"model": model, "target": target, "layer": l, "relative_depth": l / (ANALYSIS_DEPTH - 1),
                             "cka": v})
        df = pd.DataFrame(rows)
        df["source"] = "App. C.2, Fig. 9b-c (analysis.png)"
        df["precision"] = "digitised: ±0.005"
    return df


def exposure_bias_gap() -> pd.DataFrame:
    """The paper's imperfect - perfect difference per ratio (index ``ratio``; columns ``perceptual`` (LPIPS) and
    ``psnr`` (dB)), from the digitised Fig. 3a / 8a-b."""
    ref = paper_reference("A")
    cols = ["perceptual", "psnr"]
    return (ref[ref.protocol == "imperfect"].set_index("ratio")[cols]
            - ref[ref.protocol == "perfect"].set_index("ratio")[cols])


def robustness_percent() -> pd.Series:
    """The paper's teacher-forced CTR (%) indexed by (model, data, condition) (Fig. 9a)."""
    return paper_reference("C").set_index(["model", "data", "condition"])["ctr_percent"]


def cka_values() -> pd.Series:
    """The paper's CKA indexed by (model, target, layer) (Fig. 9b-c, digitised)."""
    return paper_reference("D").set_index(["model", "target", "layer"])["cka"].sort_index()
