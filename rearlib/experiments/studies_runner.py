"""Running the studies' plan: train and evaluate whatever is missing within a time limit, and report what is left.

:func:`run_studies` walks each study's items in order (:meth:`~rearlib.experiments.studies_workspace.Workspace.items`),
trains a run when its weights are missing and evaluates every missing record, stopping cleanly before the time
limit (a training that would not finish stops with a resumable checkpoint). :func:`status` prints what is done
and missing with the estimated GPU time of the missing work, computing nothing.
"""

from __future__ import annotations

import math
import time

from rearlib.experiments.studies_plan import study_names, study_specs
from rearlib.experiments.studies_workspace import Item, Workspace
from rearlib.runtime import artifacts_root, config_hash


def format_seconds(s: float | None) -> str:
    """``s`` right-aligned with one decimal, or "-"."""
    return "-" if s is None else f"{s:7.1f}"


def run_label(run) -> str:
    """A run's row name with its training seed ("rear seed1"; the main study's names carry it already)."""
    name = run.spec.name
    return name if name.endswith(f"seed{run.spec.seed}") else f"{name} seed{run.spec.seed}"


def item_line(row: dict) -> str:
    """One row of the progress table of :func:`run_studies` as a line of text."""
    return (f"{row['study']:<9} {row['run']:<22} {row['what']:<34} {row['status']:<26} "
            f"{format_seconds(row.get('wall s'))}")


def shard_owners(ws: Workspace, study: str, n_shards: int) -> dict[str, int]:
    """Run hash -> shard (0..n_shards-1): runs in plan order, dealt out in turn, so every shard gets a share of
    each study and the first seed of every row is spread before the later ones (the plan lists runs seed-major)."""
    owners: dict[str, int] = {}
    for name, seed in seed_passes(ws, study):
        for it in ws.items(name):
            if it.run is not None and it.run.spec.seed == seed and it.run.run_hash not in owners:
                owners[it.run.run_hash] = len(owners) % n_shards
    return owners


def seed_passes(ws: Workspace, study: str) -> list[tuple[str, int]]:
    """(study, training seed) in the order :func:`run_studies` works through them: seed-major over the studies, so
    that the first seed of every row of every study finishes before any second seed (a plan cut short by time is
    then as wide as it can be); the real-image floors and other seedless items go with the first pass."""
    names = study_names(study)
    seeds = sorted({spec.seed for n in names for spec in study_specs(ws.scale, n, ws.plan["name"])})
    return [(n, s) for s in seeds or [0] for n in names]


def run_studies(scale: str, study: str = "all", *, device="auto", sample_seed: int = 0,
                time_limit_s: float | None = None, whole_runs: bool = False, progress: bool = True,
                t_start: float | None = None, ws: Workspace | None = None, extractor: str | None = None,
                plan: str | None = None, shard: tuple[int, int] | None = None, log=print) -> dict:
    """Train and evaluate whatever is missing, in order, stopping cleanly before ``time_limit_s``.

    Order: :func:`seed_passes` (every row's first training seed before any row's second). ``t_start``: the
    ``time.monotonic()`` the limit counts from (default: now). ``whole_runs``: start a training
    only when it and the run's evaluations are expected to finish within the limit. ``shard=(i, n)``: only the
    runs :func:`shard_owners` gives to shard ``i`` of ``n`` (and, for shard 0, the real-image floors), so that
    ``n`` processes, one per GPU, share the plan; an item that waits on another shard's run stays pending for a
    later unsharded pass. Returns {"stopped": bool, "reason": str, "items": [rows of the progress table],
    "missing": int}.
    """
    if time_limit_s is not None and not (math.isfinite(float(time_limit_s)) and float(time_limit_s) > 0):
        # Such a limit would stop before the first item and report success having done nothing.
        raise ValueError(f"time_limit_s must be a positive, finite number of seconds (or None for no limit), "
                         f"got {time_limit_s!r}")
    t0 = time.monotonic() if t_start is None else t_start
    deadline = None if time_limit_s is None else t0 + float(time_limit_s)
    ws = ws or Workspace(scale, device, sample_seed=sample_seed, progress=progress, extractor=extractor, plan=plan)
    owners = None
    if shard is not None:
        index, n_shards = shard
        if not (isinstance(n_shards, int) and n_shards >= 1 and isinstance(index, int) and 0 <= index < n_shards):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
        owners = shard_owners(ws, study, n_shards)
    reserve = ws.st["est_run_overhead_s"] + 5.0  # checkpoint write, model load, the last log window
    table: list[dict] = []
    stopped, reason = False, ""

    def left() -> float:
        return math.inf if deadline is None else deadline - time.monotonic()

    def note(row: dict) -> None:
        table.append(row)
        log(f"[{time.monotonic() - t0:7.1f} s] {item_line(row)}")

    seen_keys: set[str] = set()
    for name, seed in seed_passes(ws, study):
        i = 0
        while True:
            # re-planned: the main study's sweep grows and its best-CFG items appear after it
            items = [it for it in ws.items(name) if it.run is None or it.run.spec.seed == seed]
            if i >= len(items):
                break
            item = items[i]
            i += 1
            run_name = run_label(item.run) if item.run else "-"
            what = item.label if item.floor or item.pending else f"step {item.step}: {item.label}"
            base = {"study": name, "run": run_name, "what": what}
            if owners is not None and (owners.get(item.run.run_hash, 0) if item.run else 0) != shard[0]:
                continue  # another process's share
            if item.pending:
                note({**base, "status": "pending", "wall s": None})
                continue
            k = config_hash(item.key)
            if k in seen_keys or ws.is_done(item):
                if k not in seen_keys:
                    note({**base, "status": "done", "wall s": None})
                seen_keys.add(k)
                continue
            if item.floor:
                if left() < ws.estimate_eval_s(item) + 5:
                    stopped, reason = True, "time limit (before an evaluation)"
                    break
                t = time.monotonic()
                ws.evaluate(item)
                note({**base, "status": "evaluated", "wall s": time.monotonic() - t})
                seen_keys.add(k)
                continue
            run = item.run
            if not ws.weights_available(run, item.step):
                est = ws.estimate_train_s(run)
                if whole_runs:  # the run's evaluations too: weights that are gone cannot be evaluated later
                    est += sum(ws.estimate_eval_s(it) for it in items[i - 1:]
                               if it.run is not None and it.run.run_hash == run.run_hash and not ws.is_done(it))
                budget = left() - reserve
                if budget < min(60.0, est) or (whole_runs and budget < est):
                    stopped, reason = True, (f"time limit (training {run.spec.name} needs ~{est:.0f} s, "
                                             f"{max(0.0, budget):.0f} s left)")
                    break
                t = time.monotonic()
                res = ws.train(run, deadline=deadline, reserve_s=reserve)
                wall = time.monotonic() - t
                note({"study": name, "run": run_label(run), "what": f"train {run.steps} steps ({run.size_label})",
                      "status": f"{res['status']} at step {res['step']}", "wall s": wall})
                if res["status"] != "completed":
                    stopped, reason = True, (f"time limit during training of {run.spec.name} (checkpoint at step "
                                             f"{res['step']}; the same command on this machine resumes it)")
                    break
                if not ws.weights_available(run, item.step):
                    raise RuntimeError(f"{run.spec.name} finished but its weights for step {item.step} are missing "
                                       f"in {artifacts_root() / 'generators' / run.run_hash}")
            est = ws.estimate_eval_s(item) + (ws.st["est_model_s"] if ws._model is None else 0.0)
            if left() < est:
                stopped, reason = True, "time limit (before an evaluation)"
                break
            t = time.monotonic()
            ws.evaluate(item)
            note({**base, "status": "evaluated", "wall s": time.monotonic() - t})
            seen_keys.add(k)
        if stopped:
            break
    ws.release_model()
    missing = sum(1 for it in _all_items(ws, study) if it.pending or not ws.is_done(it))
    log(f"{'stopped: ' + reason if stopped else 'finished'}; {missing} evaluation(s) missing; "
        f"{time.monotonic() - t0:.0f} s")
    return {"stopped": stopped, "reason": reason, "items": table, "missing": missing}


def _all_items(ws: Workspace, study: str) -> list[Item]:
    """The items of ``study`` ("all": of every study), each record once."""
    seen, out = set(), []
    for name in study_names(study):
        for it in ws.items(name):
            k = config_hash(it.key) if it.key else f"pending:{name}:{it.pending}:{it.run.run_hash if it.run else ''}"
            if k not in seen:
                seen.add(k)
                out.append(it)
    return out


def status(scale: str, study: str = "all", *, sample_seed: int = 0, device="cpu", ws: Workspace | None = None,
           extractor: str | None = None, plan: str | None = None, log=print) -> dict:
    """Print what is done and missing (and the estimated GPU time of the missing work); nothing is computed."""
    ws = ws or Workspace(scale, device, sample_seed=sample_seed, progress=False, extractor=extractor, plan=plan)
    log(f"plan {ws.plan['name']!r}: ablation rows on the {ws.plan['recipe']!r} recipe, training seeds "
        f"{list(ws.plan['seeds'])}, FID extractor {ws.extractor}"
        + (f" (secondary, labeled: {ws.secondary})" if ws.secondary else ""))
    rows, est_total = [], 0.0
    trained_est: set[str] = set()  # shared runs and records are counted once, by the first study that needs them
    counted: set[str] = set()
    for name in study_names(study):
        est = 0.0
        done = missing = 0
        for it in ws.items(name):
            ok = ws.is_done(it)
            done += ok
            missing += not ok
            k = config_hash(it.key) if it.key else f"pending:{id(it)}"
            if not ok and k not in counted:
                counted.add(k)
                if it.run is not None and not ws.weights_available(it.run, it.step or it.run.steps) \
                        and it.run.run_hash not in trained_est:
                    trained_est.add(it.run.run_hash)
                    est += ws.estimate_train_s(it.run)
                est += ws.estimate_eval_s(it)
            rows.append({"study": name, "run": run_label(it.run) if it.run else "-",
                         "what": it.label if it.floor or it.pending else f"step {it.step}: {it.label}",
                         "status": "done" if ok else ("pending" if it.pending else "missing")})
        log(f"{name:<10} done {done:3d}, missing {missing:3d}; estimated {est / 60:5.1f} min of GPU work "
            f"(one H200, at the measured rates of rearlib.scales.STUDIES; runs shared with an earlier study not "
            f"counted again)")
        est_total += est
    for r in rows:
        if r["status"] != "done":
            log(f"   {r['study']:<9} {r['run']:<22} {r['what']:<40} {r['status']}")
    log(f"total estimated {est_total / 60:.1f} min")
    return {"rows": rows, "estimated_s": est_total}
