"""The training studies of notebooks 10-13 at our scale: what to train, what to evaluate, and a resumable CLI.

Studies (``docs/paper.md``, reAR §3):

* ``main`` (Table 1's AR vs reAR, Table 5's cost): plain AR and reAR with the zoo's recipe
  (``rearlib.scales.GENERATOR_TRAINING``), training seeds ``seeds``. Without CFG on every seed; with CFG: a sweep
  of (g, p) on training seed 0 with the *selection* sampling seed, then each variant's best (g, p) on every
  training seed with the *reporting* sampling seed (so the reported numbers carry no selection bias).
* ``noise`` (Table 3): the noisy-context schedules of ``rearlib.rear.PRESETS``.
* ``embedding`` (Tables 4 and 7): vanilla AR, tied codebook embedding, DE-only at several depths, EN + DE
  variants and lambda, without CFG (as the paper).
* ``scaling`` (Fig. 4): AR and reAR at several model sizes, FID at every snapshot.
* ``recipe``: the learning curve of the paper-proportioned recipe (AR and reAR), which sets its length.

The three ablation studies follow a *plan* (``--plan``, :func:`plan_settings`): its recipe, its training seeds
(every row gets each one), its tied-codebook row and its FID extractor. ``full`` (the default) is the
paper-proportioned recipe (warm-up a quarter of the run) on several seeds; ``short`` the one-seed 1000-step plan.

Sampling seeds: with base seed S (the notebooks' ``seed``), reported numbers use S + 1; S is a second draw, used
for the CFG selection sweep and to measure sampling noise (the FID change between two sampling seeds of the same
weights). Every evaluation is a cached record of :mod:`rearlib.experiments.evaluation`, keyed by the run's *recipe* (its
TrainConfig hash, :func:`rearlib.experiments.zoo.run_hash`) and the step, never by its weights: records made on a GPU
machine complete the notebooks anywhere, and a notebook whose records all exist loads no generator at all.

CLI (the GPU machine runs it in chunks; weights stay there, records travel)::

    python -m rearlib studies status --scale small [--study all] [--plan full|short]
    python -m rearlib studies run    --scale small --study main|noise|embedding|scaling|recipe|all [--time-limit S]
    python -m rearlib studies pack   --scale small --out records.tar.gz
    python -m rearlib studies unpack records.tar.gz

``run`` trains and evaluates whatever is missing, in a fixed order (training seed, study, run, evaluation: the
first seed of every row before any second one), and stops cleanly
before ``--time-limit`` seconds (a training that would not finish stops with a resumable checkpoint at its next
log step; ``--whole-runs`` starts only trainings expected to finish together with their evaluations). It prints
one line per item and a table.

A record belongs to one realization of its recipe (GPU training is not bit-reproducible). Weights never leave the
machine that trained them, so a run whose evaluations were cut off there is retrained elsewhere, and its later
records come from another realization; evaluating a run right after training it, and ``--whole-runs`` on a
machine's last command, keep this rare.

The parts, by role (this module re-exports their public names and holds the CLI):

* :mod:`~rearlib.experiments.studies_plan`: the paper's numbers, :class:`RunSpec`, :func:`resolve`,
  :func:`study_specs` and the mapping of the paper's layers (what to train);
* :mod:`~rearlib.experiments.studies_workspace`: :class:`Item` and the :class:`Workspace` that trains, evaluates
  and estimates (where it happens);
* :mod:`~rearlib.experiments.studies_runner`: :func:`run_studies` and :func:`status` (the resumable plan);
* :mod:`~rearlib.experiments.studies_results`: :func:`collect` and the notebooks' tables;
* :mod:`~rearlib.experiments.studies_transfer`: :func:`pack` and :func:`unpack` (records between machines);
* :mod:`~rearlib.experiments.studies_figures`: the notebooks' figures; the verdict rules are in
  :mod:`rearlib.experiments.verdicts`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from rearlib import cli_types, scales
from rearlib.experiments.studies_plan import (PAPER_DEPTH, PAPER_FIG4, PAPER_FINAL_DE, PAPER_TABLE3, PAPER_TABLE4,
                                              PAPER_TABLE5, PAPER_TABLE7, RECIPES, STUDIES, STUDIES_EXTRACTOR,
                                              Resolved, RunSpec, base_layers, embedding_rows, paper_layer,
                                              plan_extractors, plan_settings, resolve, settings, study_names,
                                              study_specs)
from rearlib.experiments.studies_results import (VARIANT_NAMES, collect, compare_seeds, embedding_table,
                                                 metric_columns, noise_table, provenance_note, run_means,
                                                 sampling_noise, scaling_tables, seed_means, learning_curve,
                                                 zoo_training_record)
from rearlib.experiments.studies_runner import item_line, run_studies, status
from rearlib.experiments.studies_transfer import pack, unpack
from rearlib.experiments.studies_workspace import Item, Workspace
from rearlib.metrics import EXTRACTORS
from rearlib.runtime import resolve_device

__all__ = ["STUDIES", "RECIPES", "STUDIES_EXTRACTOR", "PAPER_TABLE3", "PAPER_TABLE4", "PAPER_TABLE5", "PAPER_TABLE7",
           "PAPER_FIG4", "PAPER_DEPTH", "PAPER_FINAL_DE", "settings", "plan_settings", "plan_extractors",
           "study_names", "study_specs", "RunSpec",
           "Resolved", "resolve", "paper_layer", "base_layers", "embedding_rows", "Item", "Workspace",
           "run_studies", "status", "collect", "provenance_note", "sampling_noise", "metric_columns",
           "VARIANT_NAMES", "compare_seeds", "seed_means", "run_means", "noise_table", "embedding_table",
           "scaling_tables", "learning_curve",
           "zoo_training_record", "pack", "unpack", "main"]


def spread_over_gpus(argv: list[str], gpus: int, time_limit_s: float | None, t_start: float,
                     per_gpu: int = 1) -> list[int]:
    """Run ``studies run`` as ``gpus`` x ``per_gpu`` processes (``--shard i/n``; process i sees only GPU
    ``i % gpus`` through ``CUDA_VISIBLE_DEVICES``) and wait for all; their exit codes. Each writes the same records
    and run folders as one process would. Several processes on one GPU pay off only where one process leaves it
    partly idle (a small model's step bound by kernel launches rather than arithmetic)."""
    base = argv
    for option in ("--gpus", "--procs-per-gpu", "--time-limit"):
        base = _without_option(base, option)
    if time_limit_s is not None:  # the shards get what is left of this command's limit
        base += ["--time-limit", f"{max(1.0, time_limit_s - (time.monotonic() - t_start)):.0f}"]
    n = gpus * per_gpu
    procs = []
    for i in range(n):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i % gpus)}
        cmd = [sys.executable, "-m", "rearlib.experiments.studies", *base, "--shard", f"{i}/{n}"]
        procs.append(subprocess.Popen(cmd, env=env))
    return [p.wait() for p in procs]


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without option ``name`` and its value (``--name value`` or ``--name=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if not a.startswith(name + "="):
            out.append(a)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rearlib studies", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    helps = {"status": "print what is done and missing, with the estimated GPU time of the missing work "
                       "(computes nothing)",
             "run": "train and evaluate whatever is missing, in order, stopping cleanly before --time-limit"}
    for cmd in ("status", "run"):
        p = sub.add_parser(cmd, help=helps[cmd], description=helps[cmd])
        p.add_argument("--scale", default="small", choices=tuple(scales.STUDIES),
                       help="scale of the studies (default: small)")
        p.add_argument("--study", default="all", choices=STUDIES + ("all",),
                       help="one study, or all of them in order (default: all)")
        p.add_argument("--sample-seed", type=int, default=0, help="base sampling seed S (reports use S + 1)")
        p.add_argument("--device", default="auto" if cmd == "run" else "cpu",
                       help="torch device for training and evaluation: auto, cpu, cuda, cuda:N "
                            f"(default: {'auto' if cmd == 'run' else 'cpu'})")
        p.add_argument("--plan", default=None,
                       help="how the ablation studies train their rows: 'full' (the paper-proportioned recipe, "
                            "several training seeds) or 'short' (1000 steps, one seed); default: the scale's "
                            "(rearlib.scales.STUDIES)")
        p.add_argument("--extractor", default=None, choices=EXTRACTORS,
                       help="FID feature extractor (default: the plan's)")
        if cmd == "run":
            p.add_argument("--time-limit", type=cli_types.positive_seconds, default=None,
                           help="seconds from the start of this command; stop cleanly before it")
            p.add_argument("--whole-runs", action="store_true",
                           help="start a training only if it and the run's evaluations are expected to finish "
                                "within the limit (use it on a machine's last command: its weights are lost after)")
            p.add_argument("--no-progress", action="store_true", help="no progress bars while training and sampling")
            p.add_argument("--gpus", type=cli_types.count, default=1,
                           help="spread the plan over this many GPUs of this machine: one process per GPU, each "
                                "with its share of the runs, then one pass for what waited on another's run")
            p.add_argument("--procs-per-gpu", type=cli_types.count, default=1,
                           help="shard processes per GPU (with --gpus, or alone on one GPU): for models too small "
                                "to keep one GPU busy on their own")
            p.add_argument("--shard", type=cli_types.shard, default=None, metavar="I/N",
                           help="run only share I of N (what each --gpus process does; for several machines)")
    p = sub.add_parser("pack", help="write every evaluation record and training result of a scale (no weights) "
                                    "to a tar.gz", description="write every evaluation record and training "
                                                               "result of a scale (no weights) to a tar.gz")
    p.add_argument("--scale", default="small", choices=tuple(scales.STUDIES),
                   help="scale whose records are packed (default: small)")
    p.add_argument("--out", required=True, help="path of the archive to write (.tar.gz)")
    p = sub.add_parser("unpack", help="extract a pack archive into the artifact root (existing files are kept)",
                       description="extract a pack archive into the artifact root (existing files are kept)")
    p.add_argument("archive", help="a tar.gz written by `python -m rearlib studies pack`")
    return parser


def main(argv=None) -> int:
    """The command line: ``status``, ``run``, ``pack`` and ``unpack`` (see the module docstring)."""
    t_start = time.monotonic()
    args = _parser().parse_args(argv)
    if args.command == "unpack":
        unpack(args.archive)
        return 0
    if args.command == "pack":
        pack(args.scale, args.out)
        return 0
    dev = resolve_device(args.device)
    if dev.type == "cpu":
        # On a busy CPU OpenMP threads spin-waiting for each other made the sampler ~50x slower (measured in
        # notebook 04); one thread is faster and predictable.
        torch.set_num_threads(1)
    if args.command == "status":
        ws = Workspace(args.scale, dev, sample_seed=args.sample_seed, progress=False, extractor=args.extractor,
                       plan=args.plan)
        status(args.scale, args.study, ws=ws)
        return 0
    if args.gpus * args.procs_per_gpu > 1:
        if args.shard is not None:
            raise SystemExit("--gpus / --procs-per-gpu and --shard: pass one of them (--gpus starts one --shard "
                             "process per GPU)")
        codes = spread_over_gpus(list(sys.argv[1:] if argv is None else argv), args.gpus, args.time_limit, t_start,
                                 per_gpu=args.procs_per_gpu)
        if any(codes):
            print(f"shard processes exited with {codes}; the records they wrote are kept", file=sys.stderr)
            return 1
    ws = Workspace(args.scale, dev, sample_seed=args.sample_seed, progress=not args.no_progress,
                   extractor=args.extractor, plan=args.plan)
    # After the shards: one pass over the whole plan finishes what waited on another shard's run.
    res = run_studies(args.scale, args.study, time_limit_s=args.time_limit, whole_runs=args.whole_runs,
                      progress=not args.no_progress, t_start=t_start, ws=ws, shard=args.shard)
    print("\nitem table:")
    for row in res["items"]:
        print(f"  {item_line(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
