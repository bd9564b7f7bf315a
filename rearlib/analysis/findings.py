"""From the analyses' rows to what notebooks 05-08 report: the paired effects, the verdicts on the paper's claims
and the claim rows of SUMMARY.md.

Each ``*_findings`` function takes the tidy rows a notebook computed (one row per model, setting and image, as
:func:`run_per_model` assembles them) and returns a :class:`Findings`: the claim rows for
:meth:`rearlib.experiments.notebook.Context.claim`, the effects behind them, the verdict the rule gives before the
smoke-scale override, the tables the notebook saves, remarks for :meth:`~rearlib.experiments.notebook.Context.note`
and the further numbers its generated text reads. Verdicts follow :mod:`rearlib.experiments.verdicts`; at
``smoke`` scale every verdict is "not tested" and the note keeps what the rule would give. The paper's numbers and
the tolerances come from :mod:`rearlib.analysis.paper_numbers`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rearlib.analysis import paper_numbers as PN
from rearlib.analysis.stats import ci_of, format_ci, welch_diff
from rearlib.experiments.verdicts import effect_verdict, final, smoke_note

#: Display names of the generator variants.
MODEL_NAMES = {"ar": "AR", "rear": "reAR"}


def run_per_model(analysis, models: dict, *args, names: dict = MODEL_NAMES, **kwargs) -> pd.DataFrame:
    """``analysis(model, *args, **kwargs)`` for every generator of ``models`` (variant -> model), stacked with the
    display name in a first column ``model``; prints the rows and seconds per model."""
    frames = []
    for variant, model in models.items():
        t0 = time.time()
        df = analysis(model, *args, **kwargs)
        df.insert(0, "model", names[variant])
        frames.append(df)
        print(f"{names[variant]}: {len(df)} rows in {time.time() - t0:.1f}s")
    return pd.concat(frames, ignore_index=True)


@dataclass
class Findings:
    """What a diagnosis notebook reports (see the module docstring)."""

    claims: list[dict]                       # keyword arguments of Context.claim: claim, paper, ours, verdict, note
    effects: dict                            # effect name -> {"mean", "lo", "hi", "n"}
    rule: dict                               # claim key -> the rule's verdict (before the smoke override)
    tables: dict = field(default_factory=dict)   # CSV name -> DataFrame
    notes: list = field(default_factory=list)    # remarks for Context.note
    values: dict = field(default_factory=dict)   # further numbers the generated text reads


def _claim(claim: str, paper: str, ours: str, verdict: str, smoke: bool, note: str = "") -> dict:
    """One claim row: the verdict becomes "not tested" at smoke scale, where the note says what the rule gives."""
    return {"claim": claim, "paper": paper, "ours": ours, "verdict": final(verdict, smoke),
            "note": smoke_note(verdict, smoke) or note}


# ================================================================================================================
# Notebook 05 - exposure bias (experiment A)
# ================================================================================================================
def paired_diff(frame: pd.DataFrame, value: str, a: str = "imperfect", b: str = "perfect") -> pd.DataFrame:
    """[images x ratios] of value(a) - value(b) for one model's rows of :func:`rearlib.analysis.exposure_bias`
    (pairs share image, ratio and repeat; rows indexed by (image_id, repeat), columns by ratio)."""
    piv = frame.pivot_table(index=["image_id", "repeat"], columns=["protocol", "ratio"], values=value)
    return piv[a] - piv[b]


def exposure_bias_findings(rows: pd.DataFrame, ratios, metric: str, scale: str, resolution: int) -> Findings:
    """Imperfect - perfect per image, averaged over the ratios (one number per image) and per ratio, for every model
    of ``rows``; the paper's claims are judged on AR. ``ratios``: the grid the rows were computed on (in order);
    ``metric``: the perceptual metric's name; ``resolution``: our images' side (for the note on comparability)."""
    smoke = scale == "smoke"
    effects, per_ratio = {}, []
    for mname in rows["model"].unique():
        sub = rows[rows.model == mname]
        for value in ("perceptual", "psnr", "ppl", "ctr"):
            d = paired_diff(sub, value)
            effects[(mname, value)] = ci_of(d.mean(axis=1))
            for r in d.columns:
                per_ratio.append({"model": mname, "metric": value, "ratio": r, **ci_of(d[r])})
    per_ratio = pd.DataFrame(per_ratio)
    per_ratio["perceptual_metric"] = metric
    paper_gap = PN.exposure_bias_gap()
    paper_mean_gap = paper_gap.mean()
    tol = PN.EXPOSURE_BIAS_TOLERANCE
    e_lp, e_ps = effects[("AR", "perceptual")], effects[("AR", "psnr")]
    comparable_lp = scale == "paper" and metric.startswith("LPIPS")
    v_lp = effect_verdict(e_lp, +1, paper_mean_gap["perceptual"], tol["perceptual"], comparable_lp)
    v_ps = effect_verdict(e_ps, -1, paper_mean_gap["psnr"], tol["psnr"], scale == "paper")

    def sig(m, v, s):  # ratios at which the per-ratio CI excludes 0 with sign s
        return int(((per_ratio.model == m) & (per_ratio.metric == v)
                    & ((per_ratio.lo > 0) if s > 0 else (per_ratio.hi < 0))).sum())

    n_r = len(ratios)
    claims = [
        _claim("Exposure bias: at the same number of GT tokens, interleaved (imperfect) context gives a worse "
               "perceptual distance than front-loaded (perfect) context",
               f"LPIPS imperfect - perfect = {paper_mean_gap['perceptual']:+.3f} on average over r = "
               f"{min(PN.EXPOSURE_BIAS)}..{max(PN.EXPOSURE_BIAS)} "
               f"(range {paper_gap['perceptual'].min():+.2f} to {paper_gap['perceptual'].max():+.2f}; Fig. 3a/8a)",
               f"AR: {metric} imperfect - perfect = {e_lp['mean']:+.4f} [95% CI {e_lp['lo']:+.4f}, "
               f"{e_lp['hi']:+.4f}], n = {e_lp['n']} images, mean over {n_r} ratios; CI > 0 at "
               f"{sig('AR', 'perceptual', +1)}/{n_r} ratios",
               v_lp, smoke, f"magnitude not comparable: {metric} at {resolution} px" if not comparable_lp else ""),
        _claim("Exposure bias in PSNR: imperfect context gives a lower PSNR than perfect context",
               f"PSNR imperfect - perfect = {paper_mean_gap['psnr']:+.2f} dB on average (range "
               f"{paper_gap['psnr'].min():+.1f} to {paper_gap['psnr'].max():+.1f} dB; Fig. 8b)",
               f"AR: {e_ps['mean']:+.3f} dB [95% CI {e_ps['lo']:+.3f}, {e_ps['hi']:+.3f}], n = {e_ps['n']} images; "
               f"CI < 0 at {sig('AR', 'psnr', -1)}/{n_r} ratios",
               v_ps, smoke),
    ]
    # "Even where its perplexity is lower": the ratios at which imperfect context has a lower perplexity (CI < 0)
    # and, among those, the ratios at which it still has the worse perceptual distance (CI > 0).
    pr_ar = per_ratio[per_ratio.model == "AR"].set_index(["metric", "ratio"])
    low_ppl = [r for r in ratios if pr_ar.loc[("ppl", r), "hi"] < 0]
    worse_too = [r for r in low_ppl if pr_ar.loc[("perceptual", r), "lo"] > 0]
    if not low_ppl:
        v_ppl = "not tested"
        why_ppl = "imperfect context never has a significantly lower perplexity here, so the case does not arise"
    else:
        v_ppl = "direction reproduced" if len(worse_too) == len(low_ppl) else "not reproduced"
        why_ppl = f"of the {len(low_ppl)} ratios where imperfect perplexity is lower, {len(worse_too)} are also worse"
    lo_ppl, hi_ppl = PN.PERPLEXITY_RANGE
    claims.append(_claim(
        "Perplexity does not rank image quality: imperfect context is worse even where its perplexity is lower",
        f"App. B.3 / Fig. 8c-d: points scattered, non-monotone; perplexity ~{lo_ppl}-{hi_ppl}",
        f"AR: imperfect - perfect perplexity {effects[('AR', 'ppl')]['mean']:+.2f} on average; lower (CI < 0) "
        f"at r = {low_ppl}; of these worse in {metric} (CI > 0) at r = {worse_too}",
        v_ppl, smoke, why_ppl))
    notes = []
    if "reAR" in rows["model"].values:
        d_ar = paired_diff(rows[rows.model == "AR"], "perceptual").mean(axis=1)
        d_re = paired_diff(rows[rows.model == "reAR"], "perceptual").mean(axis=1)
        gap_change = ci_of((d_ar - d_re).to_numpy())
        notes.append(f"reAR vs AR (not a paper claim): exposure-bias gap in {metric} AR - reAR = "
                     f"{format_ci(gap_change, 4, words=True)} (paired over {gap_change['n']} images; positive = "
                     "reAR suffers less)")
    return Findings(claims=claims, effects=effects, rule={"perceptual": v_lp, "psnr": v_ps, "ppl": v_ppl},
                    tables={"05_exposure_bias_paired_differences": per_ratio}, notes=notes,
                    values={"per_ratio": per_ratio, "paper_gap": paper_gap, "paper_mean_gap": paper_mean_gap})


# ================================================================================================================
# Notebook 06 - embedding-nearest replacement (experiment B)
# ================================================================================================================
def replacement_values(rows: pd.DataFrame, model: str, mode: str, r_prime: float, col: str) -> pd.Series:
    """Per-image values of one setting of :func:`rearlib.analysis.embedding_replacement`'s rows, indexed by
    (image_id, repeat), so that two settings subtract pairwise."""
    sub = rows[(rows.model == model) & (rows["mode"] == mode) & (rows.r_prime == r_prime)]
    return sub.set_index(["image_id", "repeat"])[col].sort_index()


def replacement_findings(rows: pd.DataFrame, r_max: float, metric: str, scale: str) -> Findings:
    """The effect of replacing wrong tokens at rate ``r_max`` against r' = 0 (the ``*_delta`` columns, paired per
    image) on AR, and the contrast nearest < random < farthest at ``r_max``."""
    smoke = scale == "smoke"
    at = lambda *a: replacement_values(rows, *a)  # noqa: E731
    paper_at = PN.paper_reference("B").set_index("r_prime")
    has_paper = r_max in paper_at.index
    paper_delta = {c: (paper_at.loc[r_max, c] - paper_at.loc[0.0, c]) if has_paper else None
                   for c in ("perceptual", "psnr", "emb_sim", "ppl_delta")}
    paper_delta["ppl_delta"] = paper_at.loc[r_max, "ppl_delta"] if has_paper else None
    on_paper = scale == "paper"
    tol = PN.REPLACEMENT_TOLERANCE
    claim_specs = [  # (our column, paper key, sign, comparable, claim text)
        ("perceptual_delta", "perceptual", -1, on_paper and metric.startswith("LPIPS"),
         "Replacing wrong tokens by the embedding-nearest code (CTR unchanged) improves perceptual quality"),
        ("psnr_delta", "psnr", +1, on_paper, "... and raises PSNR"),
        ("emb_sim_wrong_delta", "emb_sim", +1, on_paper,
         "... because it raises the embedding similarity of the wrong tokens to the truth"),
        ("ppl_delta", "ppl_delta", +1, on_paper,
         "... while the perplexity of the sequence rises (likelihood does not see the improvement)"),
    ]
    effects, claims, rule = {}, [], {}
    for col, key, sign, comp, text in claim_specs:
        e = ci_of(at("AR", "nearest", r_max, col))
        effects[col] = e
        v = rule[col] = effect_verdict(e, sign, paper_delta[key], tol[key], comp)
        unit = {"perceptual_delta": f" {metric}", "psnr_delta": " dB"}.get(col, "")
        pv = paper_delta[key]
        digits = {"perceptual": 3, "psnr": 2, "emb_sim": 2}.get(key, 0)
        claims.append(_claim(
            text + f" (r′ = 0 → {r_max})",
            (f"{pv:+.{digits}f}" if pv is not None else "n/a") + f" ({key}; Fig. 3b/8e-g"
            + (", LPIPS)" if key == "perceptual" else ")"),
            f"AR: {format_ci(e, 4)}{unit}, n = {e['n']} images; CTR unchanged (asserted)",
            v, smoke, "magnitude not comparable at this scale" if not comp else ""))
    # The implied contrast: at the same positions and the same CTR, nearest < random < farthest.
    d_rn = ci_of(at("AR", "random", r_max, "perceptual") - at("AR", "nearest", r_max, "perceptual"))
    d_fr = ci_of(at("AR", "farthest", r_max, "perceptual") - at("AR", "random", r_max, "perceptual"))
    v_rn, v_fr = effect_verdict(d_rn, +1), effect_verdict(d_fr, +1)
    v_contrast = rule["contrast"] = "direction reproduced" if v_rn == v_fr == "direction reproduced" else \
        "not reproduced"
    effects["random-nearest"], effects["farthest-random"] = d_rn, d_fr
    claims.append(_claim(
        "At equal CTR the embedding distance of the wrong tokens decides quality: nearest < random < farthest "
        f"replacement in perceptual distance (r′ = {r_max})",
        "not measured; the paper's reading of Fig. 3b (embedding-nearest errors are benign)",
        f"AR: random - nearest = {format_ci(d_rn, 4)}, farthest - random = {format_ci(d_fr, 4)} {metric}, "
        f"n = {d_rn['n']} images",
        v_contrast, smoke, "our contrast; both differences must be > 0"))
    eff_df = pd.DataFrame([{"effect": k, **v} for k, v in effects.items()])
    eff_df["perceptual_metric"], eff_df["r_prime"] = metric, r_max
    notes, values = [], {"paper_delta": paper_delta, "paper_at": paper_at}
    if "reAR" in rows["model"].values:
        d_sim = ci_of(at("reAR", "nearest", 0.0, "emb_sim_wrong") - at("AR", "nearest", 0.0, "emb_sim_wrong"))
        values["rear_minus_ar_similarity"] = d_sim
        notes.append(f"reAR vs AR (not a paper claim): cosine of own wrong predictions to the truth, reAR - AR = "
                     f"{format_ci(d_sim, 4)}, n = {d_sim['n']}")
    return Findings(claims=claims, effects=effects, rule=rule, tables={"06_embedding_replacement_effects": eff_df},
                    notes=notes, values=values)


# ================================================================================================================
# Notebook 07 - robustness of next-token prediction (experiment C)
# ================================================================================================================
def robustness_per_image(rows: pd.DataFrame, model: str, data: str, condition: str) -> pd.Series:
    """Per-image CTR (%) of one cell of :func:`rearlib.analysis.robustness`'s rows (with ``model``, ``data`` and
    ``ctr_percent`` columns), averaged over noise repeats, indexed by image."""
    sub = rows[(rows.model == model) & (rows.data == data) & (rows.condition == condition)]
    return sub.groupby("image_id")["ctr_percent"].mean().sort_index()


def robustness_findings(rows: pd.DataFrame, noise_fraction: float, scale: str, n_images: dict,
                        train_desc: str) -> Findings:
    """Differences in percentage points of teacher-forced CTR: reAR - AR (paired per image), the generalization
    gap of AR minus that of reAR (Welch), the drop under noise of AR minus that of reAR (paired), and the drop of
    each model. ``n_images``: {"trained": n, "unseen": n}; ``train_desc``: how our generators were trained."""
    smoke = scale == "smoke"
    per_image = lambda *a: robustness_per_image(rows, *a)  # noqa: E731
    P = PN.robustness_percent()
    comp = scale == "paper"
    tol = PN.ROBUSTNESS_TOLERANCE_PP
    fmt = lambda e: format_ci(e, 2, " pp")  # noqa: E731
    effects, claims, rule = {}, [], {}
    # reAR above AR on unseen data, clean and noisy.
    for cond in ("clean", "noisy"):
        e = ci_of(per_image("reAR", "unseen", cond) - per_image("AR", "unseen", cond))
        pv = P[("reAR", "unseen", cond)] - P[("AR", "unseen", cond)]
        name = f"reAR - AR, unseen, {cond}"
        v = rule[name] = effect_verdict(e, +1, pv, tol, comp)
        effects[name] = e
        claims.append(_claim(
            f"reAR predicts the next token of unseen images better than AR ({cond} context)",
            f"{P[('reAR', 'unseen', cond)]:.1f}% vs {P[('AR', 'unseen', cond)]:.1f}% ({pv:+.1f} pp; Fig. 9a)",
            f"{per_image('reAR', 'unseen', cond).mean():.2f}% vs {per_image('AR', 'unseen', cond).mean():.2f}%"
            f": {fmt(e)}, n = {e['n']} unseen images", v, smoke))
    # A smaller generalization gap for reAR (difference in differences).
    for cond in ("clean", "noisy"):
        d_tr = per_image("AR", "trained", cond) - per_image("reAR", "trained", cond)
        d_un = per_image("AR", "unseen", cond) - per_image("reAR", "unseen", cond)
        e = welch_diff(d_tr, d_un)  # = gap(AR) - gap(reAR)
        gap = {m: welch_diff(per_image(m, "trained", cond), per_image(m, "unseen", cond)) for m in ("AR", "reAR")}
        pg = {m: P[(m, "trained", cond)] - P[(m, "unseen", cond)] for m in ("AR", "reAR")}
        name = f"gap(AR) - gap(reAR), {cond}"
        v = rule[name] = effect_verdict(e, +1, pg["AR"] - pg["reAR"], tol, comp)
        effects[name] = e
        claims.append(_claim(
            f"reAR generalizes better: smaller trained - unseen CTR gap than AR ({cond} context)",
            f"gap AR {pg['AR']:.1f} pp, reAR {pg['reAR']:.1f} pp (difference {pg['AR'] - pg['reAR']:+.1f})",
            f"gap AR {fmt(gap['AR'])}, reAR {fmt(gap['reAR'])}; AR - reAR {fmt(e)}, "
            f"n = {n_images['trained']} + {n_images['unseen']} images", v, smoke, f"our training: {train_desc}"))
    # Noise costs reAR less (both data sets).
    for data in ("unseen", "trained"):
        drop = {m: per_image(m, data, "clean") - per_image(m, data, "noisy") for m in ("AR", "reAR")}
        e = ci_of(drop["AR"] - drop["reAR"])
        pd_ = {m: P[(m, data, "clean")] - P[(m, data, "noisy")] for m in ("AR", "reAR")}
        name = f"drop(AR) - drop(reAR), {data}"
        v = rule[name] = effect_verdict(e, +1, pd_["AR"] - pd_["reAR"], tol, comp)
        effects[name] = e
        claims.append(_claim(
            f"reAR is more robust to {noise_fraction:.0%} random context noise: a smaller CTR drop than AR "
            f"({data} data)",
            f"drop AR {pd_['AR']:.1f} pp, reAR {pd_['reAR']:.1f} pp (difference {pd_['AR'] - pd_['reAR']:+.1f})",
            f"drop AR {drop['AR'].mean():.2f} pp, reAR {drop['reAR'].mean():.2f} pp; AR - reAR {fmt(e)}, "
            f"n = {e['n']} images", v, smoke))
    # The noise itself hurts both models (a check that the perturbation matters).
    for m in ("AR", "reAR"):
        e = ci_of(per_image(m, "unseen", "noisy") - per_image(m, "unseen", "clean"))
        pv = P[(m, "unseen", "noisy")] - P[(m, "unseen", "clean")]
        name = f"noisy - clean, {m}, unseen"
        v = rule[name] = effect_verdict(e, -1, pv, tol, comp)
        effects[name] = e
        claims.append(_claim(f"{noise_fraction:.0%} random context noise lowers the teacher-forced CTR of {m}",
                             f"{pv:+.1f} pp on unseen data", f"{fmt(e)}, n = {e['n']} unseen images", v, smoke))
    eff_df = pd.DataFrame([{"effect": k, **v} for k, v in effects.items()])
    paper_diff = {  # the paper's counterparts of the three headline effects
        "reAR - AR, unseen, clean": P[("reAR", "unseen", "clean")] - P[("AR", "unseen", "clean")],
        "gap(AR) - gap(reAR), clean": (P[("AR", "trained", "clean")] - P[("AR", "unseen", "clean")])
        - (P[("reAR", "trained", "clean")] - P[("reAR", "unseen", "clean")]),
        "drop(AR) - drop(reAR), unseen": (P[("AR", "unseen", "clean")] - P[("AR", "unseen", "noisy")])
        - (P[("reAR", "unseen", "clean")] - P[("reAR", "unseen", "noisy")]),
    }
    gap_ar = welch_diff(per_image("AR", "trained", "clean"), per_image("AR", "unseen", "clean"))
    return Findings(claims=claims, effects=effects, rule=rule, tables={"07_robustness_effects": eff_df},
                    values={"paper": P, "paper_diff": paper_diff, "gap_ar": gap_ar})


# ================================================================================================================
# Notebook 08 - CKA layer analysis (experiment D)
# ================================================================================================================
def cka_peaks(wide: pd.DataFrame) -> dict:
    """{(model, target): layer of the highest mean CKA} of a wide table (columns model, target, layer, cka; ties
    go to the lower layer)."""
    peaks = {}
    for (mname, target), sub in wide.groupby(["model", "target"], sort=False):
        sub = sub.sort_values("layer")
        peaks[(mname, target)] = int(sub.loc[sub["cka"].idxmax(), "layer"])
    return peaks


def cka_fold_matrix(fold_rows: pd.DataFrame, model: str, target: str) -> pd.DataFrame:
    """[folds x layers] CKA of one model and target (rows of :func:`rearlib.analysis.cka_layers` with ``model``
    and ``fold`` columns)."""
    sub = fold_rows[(fold_rows.model == model) & (fold_rows.target == target)]
    return sub.pivot_table(index="fold", columns="layer", values="cka").sort_index()


def cka_findings(fold_rows: pd.DataFrame, wide: pd.DataFrame, depth: int, encode_layer: int, decode_layer: int,
                 n_images: int, scale: str) -> Findings:
    """Per-fold statistics (the same folds for AR and reAR) of the paper's four CKA findings: the encoded curve
    peaks at the input and decays, the decoded curve is lower, peaks near 3/4 depth and drops at the end, and
    reAR raises the CKA at its alignment layers (``encode_layer``, ``decode_layer`` of our reAR).
    ``wide``: :func:`rearlib.plots.wide_ci` of the per-fold means (model, target, layer, cka); ``n_images``: images
    over all folds."""
    smoke = scale == "smoke"
    fm = lambda m, t: cka_fold_matrix(fold_rows, m, t)  # noqa: E731
    fmt = format_ci
    peaks = cka_peaks(wide)
    models = ("AR", "reAR")
    n_folds = fold_rows["fold"].nunique()
    excludes0 = lambda e: e["lo"] > 0  # noqa: E731  (all effects below are oriented so the claim means > 0)
    P = PN.cka_values()
    last = depth - 1
    p_depth, p_de, p_last = PN.ANALYSIS_DEPTH, PN.DECODE_LAYER, PN.ANALYSIS_DEPTH - 1
    target_layer = p_de / p_last * (depth - 1)  # the paper's peak position at our depth
    claims, rule = [], {}
    # The encoded CKA peaks at the input layer and decays to the last block.
    d1 = {m: ci_of(fm(m, "encoded")[0] - fm(m, "encoded")[last]) for m in models}
    mono = {m: int((np.diff(wide[(wide.model == m) & (wide.target == "encoded")].sort_values("layer")["cka"])
                    <= 0).sum()) for m in models}
    ok_peak = all(peaks[(m, "encoded")] == 0 for m in models)
    v1 = rule["encoded decays"] = ("reproduced" if ok_peak and all(excludes0(d1[m]) for m in d1) else
                                   "direction reproduced" if all(excludes0(d1[m]) for m in d1) else "not reproduced")
    claims.append(_claim(
        "The encoded-embedding CKA peaks at the input layer and decays with depth",
        f"AR {P[('AR', 'encoded', 0)]:.2f} → {P[('AR', 'encoded', p_last)]:.2f}, reAR "
        f"{P[('reAR', 'encoded', 0)]:.2f} → {P[('reAR', 'encoded', p_last)]:.2f} (layer 0 → {p_last} of {p_depth})",
        f"peak at layer AR {peaks[('AR', 'encoded')]}, reAR {peaks[('reAR', 'encoded')]} of {depth}; layer 0 - "
        f"layer {last}: AR {fmt(d1['AR'])}, reAR {fmt(d1['reAR'])}; non-increasing steps AR "
        f"{mono['AR']}/{depth - 1}, reAR {mono['reAR']}/{depth - 1}; {n_folds} folds, {n_images} images",
        v1, smoke, "direction reproduced = decays but peaks elsewhere than layer 0"))
    # Decoded CKA is lower than encoded CKA (compare each curve's maximum).
    d2 = {m: ci_of(fm(m, "encoded").max(axis=1) - fm(m, "decoded").max(axis=1)) for m in models}
    v2 = rule["decoded lower"] = "reproduced" if all(excludes0(d2[m]) for m in d2) else "not reproduced"
    claims.append(_claim(
        "CKA with the decoded (next-token) embedding is lower than with the encoded (current) one",
        f"maxima: AR {max(P['AR', 'encoded']):.2f} vs {max(P['AR', 'decoded']):.3f}, reAR "
        f"{max(P['reAR', 'encoded']):.2f} vs {max(P['reAR', 'decoded']):.3f}",
        f"max encoded - max decoded: AR {fmt(d2['AR'])}, reAR {fmt(d2['reAR'])}", v2, smoke))
    # The decoded CKA peaks near 3/4 depth and drops again in the last block(s).
    d3 = {m: ci_of(fm(m, "decoded")[peaks[(m, "decoded")]] - fm(m, "decoded")[last]) for m in models}
    near = all(abs(peaks[(m, "decoded")] - target_layer) <= 1 for m in models)
    drops = all(peaks[(m, "decoded")] < last and excludes0(d3[m]) for m in models)
    late = all(0.5 < peaks[(m, "decoded")] / max(1, last) < 1 for m in models)
    v3 = rule["decoded peak"] = ("reproduced" if near and drops else
                                 "direction reproduced" if late and drops else "not reproduced")
    claims.append(_claim(
        "The decoded-embedding CKA peaks around 3/4 depth and drops again in the final layers "
        "(the rationale for DE@3/4 depth)",
        f"peak at layer {p_de} of {p_depth} (relative {p_de / p_last:.2f}), lower at {p_last}, for AR and reAR",
        f"peak at layer AR {peaks[('AR', 'decoded')]}, reAR {peaks[('reAR', 'decoded')]} of {depth} (paper's "
        f"position at our depth: {target_layer:.1f}); peak - last block: "
        + ", ".join(f"{m} " + ("peak is the last block" if peaks[(m, "decoded")] == last else fmt(d3[m]))
                    for m in models),
        v3, smoke, "direction reproduced = peak in the second half (not last) and a drop, but more than one "
                   "block from 3/4 depth"))
    # reAR raises the CKA at its alignment layers.
    comp = scale == "paper"
    tol = PN.CKA_TOLERANCE
    d4 = {}
    for target, layer, p_layer in (("encoded", encode_layer, PN.ENCODE_LAYER),
                                   ("decoded", decode_layer, PN.DECODE_LAYER)):
        e = ci_of(fm("reAR", target)[layer] - fm("AR", target)[layer])
        pv = P[("reAR", target, p_layer)] - P[("AR", target, p_layer)]
        v = rule[f"reAR raises {target}"] = (
            "reproduced" if comp and layer == p_layer and excludes0(e) and e["lo"] - tol <= pv <= e["hi"] + tol else
            "direction reproduced" if excludes0(e) else "not reproduced")
        claims.append(_claim(
            f"reAR raises the {target}-embedding CKA at its {'EN' if target == 'encoded' else 'DE'} layer",
            f"layer {p_layer}: AR {P[('AR', target, p_layer)]:.3f} → reAR {P[('reAR', target, p_layer)]:.3f} "
            f"({pv:+.3f}, digitised ±{PN.CKA_PRECISION})",
            f"layer {layer} of {depth}: AR {fm('AR', target)[layer].mean():.3f} → reAR "
            f"{fm('reAR', target)[layer].mean():.3f} ({fmt(e)}, paired over {e['n']} folds)",
            v, smoke, "magnitude not comparable at this scale" if not comp else ""))
        d4[target] = e
    effects = {**{f"encoded: layer 0 - layer {last}, {m}": d1[m] for m in models},
               **{f"max encoded - max decoded, {m}": d2[m] for m in models},
               **{f"decoded: peak - layer {last}, {m}": d3[m] for m in models},
               **{f"reAR - AR, {t}": e for t, e in d4.items()}}
    return Findings(claims=claims, effects=effects, rule=rule,
                    values={"peaks": peaks, "paper": P, "target_layer": target_layer, "near": near,
                            "encoded_at_0": {m: fm(m, "encoded")[0].mean() for m in models}})
