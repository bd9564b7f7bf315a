"""The studies' results as tables: what notebooks 04 and 10-13 show, from cached records.

:func:`collect` gathers a study's runs and evaluations (computing missing records first when asked);
:func:`sampling_noise` measures the FID change between two sampling seeds of the same weights, reported beside
the verdicts (the spread between training runs contains it); the remaining functions build each notebook's table:
:func:`compare_seeds` (notebook 10: AR vs reAR over training seeds, the rule's interval), :func:`noise_table`
(notebook 11, Table 3), :func:`embedding_table` (notebook 12, Tables 4 and 7), :func:`scaling_tables`
(notebook 13, Fig. 4) and :func:`zoo_training_record` (notebook 04: a zoo generator's training record).

The claims of notebooks 10-13 are judged by the training-seed rules of :mod:`rearlib.experiments.verdicts`
(:func:`~rearlib.experiments.verdicts.seed_difference_verdict`, :func:`~rearlib.experiments.verdicts.
insensitivity_verdict`) on ``{training seed: value}`` mappings (:func:`seed_values`); :func:`claim_verdict` turns
the verdicts on the differences a claim names into the claim's verdict, :func:`difference_text` and
:func:`spread_note` say what the verdict rests on: the interval over training seeds, the spread of each side over
training seeds and, apart from it, the sampling noise.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from rearlib import scales
from rearlib.experiments import zoo
from rearlib.experiments.evaluation import SECONDARY_IS, load_record, setting_label
from rearlib.experiments.studies_plan import PAPER_TABLE3, STUDIES, STUDIES_EXTRACTOR, embedding_rows, study_specs
from rearlib.experiments.studies_runner import run_studies
from rearlib.experiments.studies_workspace import Workspace
from rearlib.experiments.verdicts import SeedVerdict, final, seed_difference_verdict, smoke_note
from rearlib.metrics import extractor_has_logits, metric_label
from rearlib.runtime import read_json

#: The variants of the studies' comparisons, by preset.
VARIANT_NAMES = {"ar": "AR", "rear": "reAR"}
CC = "class consistency"


def metric_columns(extractor: str = STUDIES_EXTRACTOR) -> tuple[str, str, str, str, str, str]:
    """The labeled metric columns of the studies' evaluations: (FID, IS, KID, precision, recall, class
    consistency), e.g. "FID[rearlib-classifier]" (never an unlabeled FID-like number). With the Inception FID
    network, which has no logits, IS is the classifier's ("IS[rearlib-classifier]")."""
    fid, kid, prec, rec = (metric_label(k, extractor) for k in ("fid", "kid_mean", "precision", "recall"))
    isc = metric_label("isc_mean", extractor if extractor_has_logits(extractor) else SECONDARY_IS)
    return fid, isc, kid, prec, rec, CC


def _noise_text(r) -> str:
    if r.noise == "none":
        return "none"
    if r.noise == "fixed":
        return f"fixed {r.noise_max:g}"
    if r.noise == "uniform":
        return f"U(0, {r.noise_max:g})"
    return f"U(0, {r.noise_max:g}·max(0, 1 - t/{r.anneal_end:g}))"


def provenance_note(result: dict) -> str:
    """Where a collected study's trainings and evaluation records were made (a notebook may only tabulate them)."""
    gpus = sorted({str(g) for g in result["runs"].get("GPU", []) if g is not None})
    ev = result["evals"]
    where = sorted({str(g if isinstance(g, str) and g else d) for g, d in zip(ev.get("eval GPU", []),
                                                                          ev.get("eval device", []))})
    return (f"trainings ran on: {', '.join(gpus) or 'unknown'}; evaluation records made on: "
            f"{', '.join(where) or 'unknown'} (this notebook tabulates the cached records and loads no model "
            f"when all of them exist)")


def collect(scale: str, study: str, *, device="auto", sample_seed: int = 0, compute: bool = True,
            progress: bool = True, ws: Workspace | None = None, extractor: str | None = None,
            plan: str | None = None) -> dict:
    """Everything a study notebook shows, from records; missing records are computed first when ``compute``.

    Returns {"runs": DataFrame (one row per run: spec, layers, training record), "evals": DataFrame (one row
    per evaluation: run, step, setting, role, labeled metrics, provenance), "floor": dict (real training images,
    the same count), "workspace": the Workspace}. At ``small`` without a GPU, missing records raise a
    FileNotFoundError that says how to make them (``python -m rearlib studies run`` on a GPU, or ``unpack``).
    """
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; allowed: {', '.join(STUDIES)}")
    ws = ws or Workspace(scale, device, sample_seed=sample_seed, progress=progress, extractor=extractor, plan=plan)
    missing = [it for it in ws.items(study) if it.pending or not ws.is_done(it)]
    if missing and compute:
        if scale != "smoke" and ws.device.type != "cuda":
            raise FileNotFoundError(
                f"{len(missing)} evaluation record(s) of the {study!r} study are missing at scale {scale!r} and this "
                f"machine has no GPU. On a GPU: python -m rearlib studies run --scale {scale} --study {study} "
                f"--plan {ws.plan['name']}; "
                f"then bring them here with `python -m rearlib studies pack/unpack`.")
        res = run_studies(scale, study, ws=ws, progress=progress, log=(print if progress else (lambda *a: None)))
        if res["missing"]:
            raise RuntimeError(f"{res['missing']} evaluation(s) of {study!r} are still missing: {res['reason']}")
    elif missing:
        raise FileNotFoundError(f"{len(missing)} evaluation record(s) of the {study!r} study are missing "
                                f"(compute=False)")
    run_rows, seen = [], set()
    for spec in study_specs(scale, study, ws.plan["name"]):
        run = ws.resolve(spec)
        if run.run_hash in seen:
            continue
        seen.add(run.run_hash)
        r = ws.training_result(run) or {}
        rc = run.cfg.rear
        final = r.get("final") or {}
        run_rows.append({
            "run": spec.name, "preset": spec.rear, "overrides": json.dumps(spec.overrides) if spec.overrides else "",
            "seed": spec.seed, "recipe": spec.recipe, "size": run.size, "model": run.size_label,
            "heads": run.heads, "EN": run.encode_layer, "DE": run.decode_layer,
            "lambda": rc.align_weight if rc.uses_alignment else 0.0, "noise": _noise_text(rc),
            "tied": rc.tied_codebook, "steps": run.steps, "batch": run.cfg.batch_size * run.cfg.grad_accum,
            "params": r.get("params"), "train time (s)": r.get("train_time_s"),
            "wall time (s)": r.get("wall_time_s"), "samples/s": r.get("samples_per_s"), "GPU": r.get("gpu") or "CPU",
            "final loss": final.get("loss"), "final CE": final.get("ce"), "run hash": run.run_hash,
            "trained": bool(r), "source": r.get("source", ""),
        })
    eval_rows = []
    floor = None
    for it in ws.items(study):
        rec = load_record(it.key)
        if it.floor:
            floor = dict(rec["row"]) if rec else None
            continue
        if rec is None:
            continue
        prov = rec.get("provenance", {})
        eval_rows.append({
            "run": it.run.spec.name, "preset": it.run.spec.rear, "seed": it.run.spec.seed, "size": it.run.size,
            "model": it.run.size_label, "step": it.step, "steps": it.run.steps,
            "setting": setting_label(it.cfg_scale, it.cfg_power),
            "cfg_scale": it.cfg_scale if it.cfg_scale is not None else 1.0,
            "cfg_power": it.cfg_power if it.cfg_scale is not None else float("nan"),
            "sample_seed": it.sample_seed, "role": it.role, **rec["row"],
            "eval device": prov.get("device"), "eval GPU": prov.get("gpu"), "run hash": it.run.run_hash,
        })
    return {"runs": pd.DataFrame(run_rows), "evals": pd.DataFrame(eval_rows), "floor": floor, "workspace": ws}


def sampling_noise(evals, fid_col: str, rows: Iterable[str], report_seed: int, noise_seed: int,
                   setting: str | Mapping[str, str] = "no CFG") -> float:
    """max over ``rows`` of |FID(report seed) - FID(noise seed)| of the final weights, without CFG or at
    ``setting`` (one setting label for every row, or ``{run: setting}``, e.g. each variant's best CFG)."""
    rows = list(rows)
    settings = setting if isinstance(setting, Mapping) else {r: setting for r in rows}
    d = evals[(evals["step"] == evals["steps"]) & evals["run"].isin(rows)]
    d = d[d["setting"] == d["run"].map(settings)]
    out = []
    for _, g in d.groupby(["run", "seed"]):  # the same weights: one training seed of one row
        a = g.loc[g["sample_seed"] == report_seed, fid_col]
        b = g.loc[g["sample_seed"] == noise_seed, fid_col]
        if len(a) and len(b):
            out.append(abs(float(a.iloc[0]) - float(b.iloc[0])))
    if not out:
        raise ValueError(f"no pair of sampling seeds ({report_seed}, {noise_seed}) for rows {rows} at {setting!r}")
    return max(out)


# ----------------------------------------------------------------------------------------------------------------
# The notebooks' tables
# ----------------------------------------------------------------------------------------------------------------
def compare_seeds(reported: pd.DataFrame, metrics: Sequence[tuple[str, bool]],
                  conditions: Sequence[str] = ("no CFG", "best CFG")) -> pd.DataFrame:
    """AR vs reAR over training seeds, one row per (condition, metric): means, sample standard deviations, the
    values, the verdict rule's 95% t-interval of reAR - AR (:func:`seed_comparison`: paired by training seed when
    both variants have the same seeds, Welch's otherwise; "test" says which, NaN bounds with one seed), Welch's
    two-sided t-test of reAR vs AR and whether the mean ± 2 SE intervals overlap (cruder checks, kept beside it).

    ``reported``: one row per evaluation with columns "condition", "model" ("AR" / "reAR"), "seed" and the
    metrics; ``metrics``: (column, lower is better) pairs. Welch p is NaN with fewer than two values per side or
    when no value varies.
    """
    def se(x):
        return x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")

    rows = []
    for cond in conditions:
        for metric, lower_better in metrics:
            d = reported[reported["condition"] == cond]
            a = d.loc[d["model"] == "AR"].sort_values("seed")[metric].astype(float).to_numpy()
            b = d.loc[d["model"] == "reAR"].sort_values("seed")[metric].astype(float).to_numpy()
            if len(a) > 1 and len(b) > 1 and (a.std() > 0 or b.std() > 0):
                p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
            else:
                p = float("nan")
            overlap = not (abs(b.mean() - a.mean()) > 2 * (se(a) + se(b)))
            better = b.mean() < a.mean() if lower_better else b.mean() > a.mean()
            rule = seed_comparison(reported, metric, lower_better, cond)
            rows.append({"condition": cond, "metric": metric, "AR mean": a.mean(),
                         "AR sd": a.std(ddof=1) if len(a) > 1 else float("nan"), "reAR mean": b.mean(),
                         "reAR sd": b.std(ddof=1) if len(b) > 1 else float("nan"), "reAR - AR": b.mean() - a.mean(),
                         "AR values": ", ".join(f"{x:.4g}" for x in a),
                         "reAR values": ", ".join(f"{x:.4g}" for x in b), "test": rule.test, "CI low": rule.lo,
                         "CI high": rule.hi, "Welch p": p, "2 SE overlap": overlap,
                         "reAR better": better, "lower is better": lower_better, "n seeds": min(len(a), len(b))})
    return pd.DataFrame(rows)


def seed_values(frame: pd.DataFrame, col: str, seed_col: str = "seed") -> dict[int, float]:
    """``{training seed: value of col}``, one row of ``frame`` per seed, as the verdict rules take them (the seeds
    let them pair two variants trained with the same seeds, which share the batch order)."""
    if frame[seed_col].duplicated().any():
        raise ValueError(f"a training seed appears twice in the rows of {col!r}: {frame[seed_col].tolist()}")
    return {int(k): float(v) for k, v in zip(frame[seed_col], frame[col])}


def seed_comparison(reported: pd.DataFrame, metric: str, lower_is_better: bool, condition: str, *,
                    sampling_noise: float | None = None) -> SeedVerdict:
    """The rule's verdict (:func:`~rearlib.experiments.verdicts.seed_difference_verdict`, not smoke-capped:
    :func:`claim_verdict` applies the scale) on reAR - AR under ``condition``, over training seeds."""
    d = reported[reported["condition"] == condition]
    return seed_difference_verdict(seed_values(d[d["model"] == "AR"], metric),
                                   seed_values(d[d["model"] == "reAR"], metric),
                                   expected="lower" if lower_is_better else "higher", sampling_noise=sampling_noise)


# ----------------------------------------------------------------------------------------------------------------
# Claims: verdicts of the training-seed rules, and what they rest on
# ----------------------------------------------------------------------------------------------------------------
#: Verdicts of the seed rules, weakest first: a claim that names several differences is as strong as its weakest.
STRENGTH = ("not reproduced", "inconclusive", "direction reproduced", "reproduced")
#: Why one training seed per run decides nothing, whatever the size of the difference.
ONE_SEED = ("one training seed per run: no interval over training seeds, so no difference is established, even one "
            "beyond the sampling noise (the spread between training seeds includes the sampling noise and is unknown)")
#: The margin of a claim of insensitivity, as a fraction of the baseline's FID. The paper's λ rows (Table 4)
#: differ from λ = 1 by at most 0.4% of its FID, well inside it, while adding the regularization that λ weighs
#: (vanilla AR -> EN@0 + DE@15, 7.5% of FID in Table 4) lies outside it: the margin separates "no effect" from the
#: effect at stake.
INSENSITIVITY_MARGIN = 0.05


def against_paper(v: SeedVerdict) -> str:
    """The rule's verdict as a verdict against the paper. A difference judged without the paper's magnitude stops at
    "direction reproduced": our FID network and data are not the paper's, so only the direction is compared."""
    if v.rule == "difference" and v.verdict == "reproduced" and v.paper_effect is None:
        return "direction reproduced"
    return v.verdict


def _num(x: float, relative: bool, sign: bool = True) -> str:
    """A difference (``sign``: signed, "of the baseline" when relative) or a bound in the metric's units, or in
    percent of the baseline when ``relative``."""
    if not relative:
        return f"{x:+.3g}" if sign else f"{x:.3g}"
    return f"{100 * x:+.3g}% of the baseline" if sign else f"{100 * x:.3g}%"


def _one_seed_part(v: SeedVerdict, expected: str | None) -> str:
    """'+4.66: beyond the sampling noise 4.15, in the paper's direction' (a difference without interval)."""
    noise = v.sampling_noise
    parts = [_num(v.diff, v.relative)]
    if v.rule == "insensitivity" and v.margin is not None:
        parts.append(f"{'within' if abs(v.diff) <= v.margin else 'beyond'} the margin "
                     f"±{_num(v.margin, v.relative, sign=False)}")
    if noise is not None:
        parts.append(f"{'beyond' if abs(v.diff) > noise else 'within'} the sampling noise "
                     f"{_num(noise, v.relative, sign=False)}")
    if expected is not None and v.rule == "difference" and v.diff != 0:
        agrees = (v.diff < 0) == (expected == "lower")
        parts.append("in the paper's direction" if agrees else "opposite to the paper's direction")
    return parts[0] + ": " + ", ".join(parts[1:]) if len(parts) > 1 else parts[0]


def claim_verdict(parts: SeedVerdict | Mapping[str, SeedVerdict], *, expected: str | None = None,
                  smoke: bool = False) -> tuple[str, str]:
    """(verdict, reason) of a claim that names one or more differences (``{label: verdict}``), each judged by a
    seed rule of :mod:`rearlib.experiments.verdicts` without ``smoke``.

    Each part counts as :func:`against_paper` says; the claim is as strong as its weakest part (:data:`STRENGTH`:
    one part the other way beyond its interval makes it "not reproduced", one without a decision "inconclusive").
    ``expected`` ("lower" / "higher", what the paper says of each variant against its baseline) lets the reason say
    whether a difference without an interval goes the paper's way. At ``smoke``: "not tested", the reason keeping
    what the rule would have said.
    """
    if isinstance(parts, SeedVerdict):
        parts = {"": parts}
    if not parts:
        raise ValueError("a claim names at least one difference")
    verdicts = {k: against_paper(v) for k, v in parts.items()}
    unknown = sorted({x for x in verdicts.values() if x not in STRENGTH})
    if unknown:
        raise ValueError(f"parts must be judged without smoke (got {unknown}); claim_verdict applies the scale")
    verdict = min(verdicts.values(), key=STRENGTH.index)

    def label(k: str) -> str:
        return f"{k}: " if k else ""

    if all(v.test == "none" for v in parts.values()):
        reason = "; ".join([ONE_SEED] + [label(k) + _one_seed_part(v, expected) for k, v in parts.items()])
    else:
        capped = ("the interval excludes 0 on the paper's side; only the direction is compared (another feature "
                  "network and dataset than the paper's)")
        reason = "; ".join(label(k) + (v.reason if verdicts[k] == v.verdict else capped) for k, v in parts.items())
    if smoke:
        return final(verdict, True), smoke_note(verdict, True)
    return verdict, reason


def difference_text(v: SeedVerdict) -> str:
    """'-2.41, 95% CI [-3.39, -1.42] (paired t over 3 seeds)', or the difference alone without an interval."""
    if v.test == "none":
        return f"{_num(v.diff, v.relative)} (one training seed: no interval)"
    how = (f"paired t over {v.n_baseline} seeds" if v.test == "paired" else
           f"Welch t over {v.n_baseline} / {v.n_variant} seeds")
    lo, hi = (f"{100 * x:+.3g}%" if v.relative else f"{x:+.3g}" for x in (v.lo, v.hi))
    return f"{_num(v.diff, v.relative)}, {100 * v.level:.3g}% CI [{lo}, {hi}] ({how})"


def spread_note(parts: SeedVerdict | Mapping[str, SeedVerdict], noise_what: str) -> str:
    """The training-seed spread (sd and number of seeds of each side) and, apart, the sampling noise
    (``noise_what`` says how it was measured) of the comparisons a claim names."""
    if isinstance(parts, SeedVerdict):
        parts = {"baseline / variant": parts}
    vs = list(parts.values())
    if all(v.n_baseline < 2 and v.n_variant < 2 for v in vs):
        spread = "training-seed spread unknown: one training seed per run (an sd needs two)"
    else:
        spread = "training-seed spread (sd, ddof 1) " + "; ".join(
            f"{k}: {v.baseline_std:.2g} / {v.variant_std:.2g} (n = {v.n_baseline} / {v.n_variant} seeds)"
            for k, v in parts.items())
    noises = {v.sampling_noise for v in vs if v.sampling_noise is not None}
    if not noises:
        return spread
    noise = ", ".join(_num(x, vs[0].relative, sign=False) for x in sorted(noises)) + (
        " of the baseline" if vs[0].relative else "")
    return f"{spread}; sampling noise, apart from it: {noise} ({noise_what})"


def seed_means(reported: pd.DataFrame, by: str | list[str] = "run") -> pd.DataFrame:
    """Per ``by`` (a row of a study): the mean over training seeds of every numeric column of ``reported`` (one
    row per evaluation), "seeds" (how many) and "<column> sd" (the sample standard deviation over training seeds,
    NaN with one seed) of each metric."""
    keys = [by] if isinstance(by, str) else list(by)
    numeric = [c for c in reported.columns if c not in keys + ["seed", "sample_seed", "step", "steps"]
               and pd.api.types.is_numeric_dtype(reported[c])]
    g = reported.groupby(keys, sort=False)
    out = g[numeric].mean()
    out["seeds"] = g["seed"].nunique()
    for c in numeric:
        out[f"{c} sd"] = g[c].std(ddof=1)
    for c in ("step", "steps"):
        if c in reported.columns:
            out[c] = g[c].first()
    return out


def run_means(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table with one row per study row (over training seeds): descriptive columns from the first seed,
    cost columns averaged, the GPUs listed, "seeds" counted."""
    g = runs.groupby("run", sort=False)
    out = g.first()
    for c in ("samples/s", "train time (s)", "wall time (s)", "final loss", "final CE"):
        if c in runs.columns:
            out[c] = g[c].mean()
    out["GPU"] = g["GPU"].agg(lambda x: ", ".join(sorted({str(v) for v in x})))
    out["seeds"] = g["seed"].nunique()
    return out


def noise_table(runs: pd.DataFrame, evals: pd.DataFrame, noise: float,
                extractor: str = STUDIES_EXTRACTOR) -> pd.DataFrame:
    """Table 3 next to ours: one row per noise setting with the paper's FID, our metrics at the reporting seed
    (means over training seeds, with the FID's sd over them), the difference to the final schedule, whether it
    exceeds the sampling ``noise``, and the training cost."""
    fid, isc, kid, _, _, cc = metric_columns(extractor)
    rep = seed_means(evals[evals["role"] == "report"])
    rr = run_means(runs)
    rows = []
    for name, (setting, paper_fid) in PAPER_TABLE3.items():
        r, t = rep.loc[name], rr.loc[name]
        rows.append({"row": name, "paper setting": setting, "paper FID": paper_fid,
                     "paper Δ vs final": paper_fid - PAPER_TABLE3["rear"][1],
                     "noise (ours)": t["noise"], "EN": t["EN"], "DE": t["DE"], fid: r[fid],
                     f"{fid} sd": r[f"{fid} sd"], "seeds": int(r["seeds"]),
                     "Δ vs final": r[fid] - rep.loc["rear", fid], isc: r.get(isc, np.nan), kid: r[kid], cc: r[cc],
                     "n generated": int(r["n generated"]), "steps": t["steps"], "samples/s": t["samples/s"],
                     "train time (s)": t["train time (s)"], "GPU": t["GPU"]})
    table = pd.DataFrame(rows)
    table["sampling noise"] = noise
    table["beyond noise"] = table["Δ vs final"].abs() > noise
    return table


def embedding_table(scale: str, runs: pd.DataFrame, evals: pd.DataFrame, noise: float,
                    extractor: str = STUDIES_EXTRACTOR, plan: str | None = None) -> pd.DataFrame:
    """Tables 4 and 7 next to ours: one row per paper setting (Table 4, then Table 7; a run the paper lacks gets
    one row of its own) joined to the run it maps to, with our metrics (means over training seeds) and the FID
    difference to vanilla AR."""
    fid, isc, kid, _, _, cc = metric_columns(extractor)
    rep = seed_means(evals[evals["role"] == "report"])
    rr = run_means(runs)
    rows = []
    for r in embedding_rows(scale, plan):
        name = r["name"]
        for table_name, setting, pfid, pis in r["paper"] or [("-", "(not in the paper)", np.nan, np.nan)]:
            rows.append({"paper table": table_name, "paper setting": setting, "paper FID": pfid, "paper IS": pis,
                         "run": name, "EN": rr.loc[name, "EN"], "DE": rr.loc[name, "DE"],
                         "lambda": rr.loc[name, "lambda"], "noise": rr.loc[name, "noise"],
                         "tied": rr.loc[name, "tied"], fid: rep.loc[name, fid], f"{fid} sd": rep.loc[name, f"{fid} sd"],
                         "seeds": int(rep.loc[name, "seeds"]), isc: rep.loc[name].get(isc, np.nan),
                         kid: rep.loc[name, kid], cc: rep.loc[name, cc],
                         "n generated": int(rep.loc[name, "n generated"]),
                         "samples/s": rr.loc[name, "samples/s"], "params": rr.loc[name, "params"],
                         "GPU": rr.loc[name, "GPU"]})
    table = pd.DataFrame(rows)
    table["Δ FID vs vanilla AR"] = table[fid] - rep.loc["ar", fid]
    table["sampling noise"] = noise
    return table


def scaling_tables(runs: pd.DataFrame, evals: pd.DataFrame, sizes: Sequence[str],
                   noise: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Fig. 4 at our scale: (runs ordered by size, variant and training seed, cost per size (reAR / AR time per
    step, from the mean samples/s over training seeds), the reported evaluation at every snapshot of every training
    seed ordered by size, variant, step and seed, with the sampling ``noise``)."""
    order = {s: i for i, s in enumerate(sizes)}

    def by_size(c):
        return c.map(order) if c.name == "size" else c

    runs = runs.assign(variant=runs["preset"].map(VARIANT_NAMES))
    runs = runs.sort_values(["size", "variant", "seed"], key=by_size)
    cost = runs.pivot_table(index="size", columns="variant", values="samples/s", aggfunc="mean")
    cost["reAR / AR time per step"] = cost["AR"] / cost["reAR"]
    cost = cost.reindex(list(sizes))
    curve = evals[evals["role"] == "report"].copy()
    curve["variant"] = curve["preset"].map(VARIANT_NAMES)
    curve = curve.sort_values(["size", "variant", "step", "seed"], key=by_size)
    curve["sampling noise"] = noise
    return runs, cost, curve


def learning_curve(evals: pd.DataFrame, fid: str, per_steps: int = 1000) -> pd.DataFrame:
    """The recipe study's learning curve: one row per variant and snapshot step (the reported sampling seed), with
    the relative change of FID per ``per_steps`` steps since the previous snapshot (negative: still improving)."""
    curve = evals[evals["role"] == "report"].copy()
    curve["variant"] = curve["preset"].map(VARIANT_NAMES)
    curve = curve.sort_values(["variant", "step"]).reset_index(drop=True)
    prev = curve.groupby("variant")[[fid, "step"]].shift()
    curve[f"relative change of {fid} per {per_steps} steps"] = (
        (curve[fid] / prev[fid] - 1) * per_steps / (curve["step"] - prev["step"]))
    return curve


def zoo_training_record(scale: str, name: str, variant: str, model, tokenizer, seed: int = 0) -> dict:
    """One row of a zoo generator's training record: steps, epochs, time, steady-state samples/s and s/epoch,
    GPU, the last logging window's loss terms, and where the record came from (the shipped checkpoint's
    metadata, or the zoo's ``result.json`` of a run trained here)."""
    info = getattr(model, "zoo_info", None)
    if info and info.get("result"):
        r, source = info["result"], info["path"]
    else:  # trained here (smoke): its result.json sits in the run folder
        path = zoo.run_dir(scale, variant, tokenizer, seed) / "result.json"
        r, source = read_json(path, "training result"), str(path)
    cfg = zoo.train_config(scale, variant, tokenizer, seed)
    d = scales.GENERATOR_DATA[scale]
    n_seq = d["train_size"] * (2 if d["flip"] else 1)
    batch = cfg.batch_size * cfg.grad_accum
    sps = r.get("samples_per_s")
    final = r.get("final") or {}
    return {"model": name, "variant": variant, "params": r.get("params"), "steps": r.get("step"),
            "global batch (recipe)": batch, "train sequences": n_seq, "epochs": r.get("step", 0) * batch / n_seq,
            "train time (s)": r.get("train_time_s"), "samples/s": sps,
            "s/epoch": n_seq / sps if sps else float("nan"), "GPU": r.get("gpu") or "CPU",
            "final loss": final.get("loss"), "final CE": final.get("ce"), "final acc": final.get("acc"),
            "final L_enc (-cos)": final.get("enc"), "final L_dec (-cos)": final.get("dec"), "source": source}
