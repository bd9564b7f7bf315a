"""rearlib.experiments.studies and training snapshots: specs, canonical run hashes, the resumable plan, the
notebook-free path when every record exists, pack/unpack, the CLI (help and time limit) and the notebooks' tables
and figure (CPU, smoke scale, shrunken plans)."""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from scipy.stats import t as scipy_t

import rearlib.experiments.studies as ST
import rearlib.experiments.studies_plan as SP
import rearlib.experiments.studies_results as SR
import rearlib.experiments.studies_workspace as SW
import rearlib.experiments.verdicts as V
import rearlib.experiments.zoo as zoo
from rearlib import scales
from rearlib.experiments import studies_runner
from rearlib.experiments.studies import RunSpec, Workspace, paper_layer, resolve
from rearlib.experiments.studies_figures import VARIANT_COLORS, plot_fid_vs_steps
from rearlib.experiments.studies_transfer import MEMBER
from rearlib.rear import get_rear_config
from rearlib.tokenizers import get_tokenizer
from rearlib.train import TrainConfig, list_snapshots, load_generator, snapshot_path, train

matplotlib.use("Agg")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ snapshots

def toy_data():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (48,), generator=g)
    tokens = (labels[:, None] * 3 + torch.arange(16)[None]) % 32
    return tokens, labels, torch.randn(32, 16, generator=g)


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(model="tiny", rear=get_rear_config("rear"), steps=8, batch_size=8, warmup_steps=2, lr=1e-3,
                log_every=2, ckpt_every=4, snapshot_every=3)
    base.update(kw)
    return TrainConfig(**base)


def test_snapshots_are_written_resume_exactly_and_load(tmp_path):
    tokens, labels, cb = toy_data()
    cfg = tiny_cfg()
    full = train(cfg, tokens, labels, cb, tmp_path / "full", device="cpu", progress=False)
    assert sorted(list_snapshots(tmp_path / "full")) == [3, 6, 8]  # every 3 steps and the last
    # stopped at step 4 and resumed with another snapshot interval (a resume-free field): the same numbers
    part = train(cfg, tokens, labels, cb, tmp_path / "split", device="cpu", progress=False, stop_at=4)
    assert part["status"] == "stopped" and sorted(list_snapshots(tmp_path / "split")) == [3]
    rest = train(tiny_cfg(snapshot_every=2), tokens, labels, cb, tmp_path / "split", device="cpu", progress=False)
    assert rest["resumed_from"] == 4 and sorted(list_snapshots(tmp_path / "split")) == [3, 6, 8]
    for a, b in zip(full["model"].state_dict().values(), rest["model"].state_dict().values()):
        assert torch.equal(a, b)
    s3a = torch.load(snapshot_path(tmp_path / "full", 3), weights_only=True)
    s3b = torch.load(snapshot_path(tmp_path / "split", 3), weights_only=True)
    assert s3a["step"] == 3 and all(torch.equal(s3a["model"][k], s3b["model"][k]) for k in s3a["model"])
    last = load_generator(snapshot_path(tmp_path / "full", 8))
    final = load_generator(tmp_path / "full" / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), final.state_dict().values()))
    early = load_generator(snapshot_path(tmp_path / "full", 3))
    assert not torch.equal(early.lm_head.weight, final.lm_head.weight)
    # a run without snapshots resumes under a config that asks for them (and the other way round)
    train(tiny_cfg(snapshot_every=None), tokens, labels, cb, tmp_path / "plain", device="cpu", progress=False,
          stop_at=2)
    done = train(cfg, tokens, labels, cb, tmp_path / "plain", device="cpu", progress=False)
    assert done["status"] == "completed" and sorted(list_snapshots(tmp_path / "plain")) == [3, 6, 8]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="snapshot_every"):
            tiny_cfg(snapshot_every=bad)


# ------------------------------------------------------------------------------------------------ specs

@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("smoke", "cpu", progress=False)


def test_paper_layer_mapping_matches_the_brief():
    # small: 8 blocks, default DE 6 (= the paper's DE@15 of 20)
    got = {k: paper_layer(k, 6, 8) for k in (5, 10, 13, 14, 15, 16, 17, 20)}
    assert got == {5: 2, 10: 4, 13: 5, 14: 6, 15: 6, 16: 6, 17: 7, 20: 7}
    names = [r["name"] for r in ST.embedding_rows("small")]
    assert names == ["ar", "tied", "de_only@4", "de_only@5", "de_only@6", "de_only@7", "rear DE@7", "rear EN@2",
                     "rear", "rear lambda=0.5", "rear lambda=1.5"]
    de6 = next(r for r in ST.embedding_rows("small") if r["name"] == "de_only@6")
    assert {s for _, s, _, _ in de6["paper"]} == {"+ DE@15", "DE@14", "DE@15", "DE@16"}


def test_spec_validation_errors(tok):
    with pytest.raises(ValueError, match="unknown reAR preset"):
        resolve("smoke", RunSpec("x", rear="nope"), tok)
    with pytest.raises(ValueError, match="unknown ReARConfig fields"):
        resolve("smoke", RunSpec("x", rear="rear", rear_overrides={"depth": 3}), tok)
    with pytest.raises(ValueError, match="out of range"):
        resolve("smoke", RunSpec("x", rear="de_only", rear_overrides={"decode_layer": 4}), tok)  # tiny: 4 blocks
    with pytest.raises(ValueError, match="out of range"):
        resolve("smoke", RunSpec("x", rear="rear", size="xs", rear_overrides={"encode_layer": 2}), tok)
    with pytest.raises(ValueError, match="alignment term is off"):
        resolve("smoke", RunSpec("x", rear="ar", rear_overrides={"decode_layer": 1}), tok)
    with pytest.raises(ValueError, match="unknown model size"):
        resolve("smoke", RunSpec("x", size="huge"), tok)
    with pytest.raises(ValueError, match="unknown recipe"):
        RunSpec("x", recipe="long")
    with pytest.raises(ValueError, match="seed"):
        RunSpec("x", seed=-1)
    with pytest.raises(ValueError, match="unknown study"):
        ST.study_specs("smoke", "everything")
    with pytest.raises(ValueError, match="smoke, small"):
        ST.settings("paper")


def test_equal_runs_share_one_hash(tok):
    h = lambda spec: resolve("smoke", spec, tok).run_hash  # noqa: E731
    # an explicit default layer is the default run; the scaling study's base-size rows are the ablation rows
    assert h(RunSpec("a", rear="rear", rear_overrides={"decode_layer": 2, "encode_layer": 0})) == h(RunSpec("rear"))
    first = lambda study: {s.name: s for s in ST.study_specs("smoke", study) if s.seed == 0}  # noqa: E731
    scaling, noise, emb = first("scaling"), first("noise"), first("embedding")
    assert h(scaling["rear"]) == h(noise["rear"]) == h(emb["rear"]) and h(scaling["ar"]) == h(emb["ar"])
    recipe = ST.plan_settings("smoke")["recipe"]
    assert h(emb["de_only@2"]) == h(RunSpec("d", rear="de_only", recipe=recipe))
    assert h(emb["de_only@1"]) != h(emb["de_only@2"])
    # the recipe study's runs are the full plan's base-size AR and reAR rows (one training serves both)
    assert {h(s) for s in ST.study_specs("smoke", "recipe")} == {h(scaling["ar"]), h(scaling["rear"])}
    # the main study's seed-0 runs are the zoo's runs (the shipped checkpoints at small)
    main = {s.name: s for s in ST.study_specs("smoke", "main")}
    assert h(main["ar seed0"]) == zoo.run_hash("smoke", "ar", tok, 0)
    assert resolve("smoke", main["rear seed0"], tok).variant == "rear"
    # at small the full plan's main comparison trains with the ablations' paper-shaped recipe (a quarter of the run
    # warms up; its seed-0 runs are the recipe study's); the short plan's keeps the 5000-step recipe of its records
    assert {s.recipe for s in ST.study_specs("small", "main", "short")} == {"short_main"}
    full_cfg = resolve("small", ST.study_specs("small", "main", "full")[0], tok).cfg
    assert full_cfg.warmup_steps * 4 == full_cfg.steps == 8000
    short_cfg = resolve("small", ST.study_specs("small", "main", "short")[0], tok).cfg
    assert (short_cfg.steps, short_cfg.warmup_steps, short_cfg.snapshot_every) == (5000, 250, None)
    hs = lambda spec: resolve("small", spec, tok).run_hash  # noqa: E731
    assert [hs(s) for s in ST.study_specs("small", "recipe")] == [hs(s) for s in ST.study_specs("small", "main", "full")
                                                                  if s.seed == 0]
    # a size sets its own default DE (3/4 depth) for aligned variants only
    med = resolve("smoke", RunSpec("m", rear="rear", size="medium"), tok)
    assert med.decode_layer == 4 and med.cfg.model_overrides["depth"] == 6
    assert resolve("smoke", RunSpec("m", rear="ar", size="medium"), tok).decode_layer is None
    assert resolve("smoke", RunSpec("s", size="xs"), tok).snapshot_steps == [6, 12]


# ------------------------------------------------------------------------------------------------ the plan

@pytest.fixture
def shrunk(monkeypatch, tok, tmp_path):
    """A two-row noise study with 4-step runs and 2 samples per class, in a temporary artifact root.

    The tokenizer and classifier are loaded from the shared cache first (training them is not under test).
    """

    plan = dict(scales.STUDIES["smoke"])
    plan["recipes"] = {"main": dict(steps=4, warmup_steps=1, log_every=2, ckpt_every=4),
                       "ablation": dict(steps=4, warmup_steps=1, log_every=2, ckpt_every=4, snapshot_every=2),
                       "paper_shape": dict(steps=4, warmup_steps=1, log_every=2, ckpt_every=4, snapshot_every=2)}
    plan["seeds"], plan["cfg_scales"], plan["cfg_powers"] = (0, 1), (3.0,), (0.0,)
    one = dict(recipe="ablation", main_recipe="main", seeds=(0,), tied="tied", extractor="rearlib-classifier",
               secondary=None, cfg_max_added=1)
    plan["plans"], plan["plan"] = {"one": one, "two": dict(one, seeds=(0, 1))}, "one"
    monkeypatch.setitem(scales.STUDIES, "smoke", plan)
    monkeypatch.setattr(SP, "PAPER_TABLE3", {k: SP.PAPER_TABLE3[k] for k in ("align_only", "rear")})
    monkeypatch.setitem(scales.EVALUATION, "smoke", dict(scales.EVALUATION["smoke"], n_ref=64, batch=20,
                                                         n_per_class=2))
    ws = Workspace("smoke", "cpu", progress=False)
    root = tmp_path / "gpu_box"
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(root))
    return ws, root


def test_a_plan_secondary_network_scores_every_study_but_the_learning_curve(shrunk, monkeypatch):
    """A plan's secondary network enters the key of every main / ablation evaluation (and its floor), not the recipe
    study's learning curve, whose snapshots are not kept; a secondary equal to the primary is dropped."""
    plans = dict(scales.STUDIES["smoke"]["plans"])
    plans["sec"] = dict(plans["one"], secondary="inception-v3-fid")
    monkeypatch.setitem(scales.STUDIES["smoke"], "plans", plans)
    assert ST.plan_extractors("smoke", "sec") == ("rearlib-classifier", "inception-v3-fid")
    assert ST.plan_extractors("smoke", "sec", extractor="inception-v3-fid") == ("inception-v3-fid", None)
    assert ST.plan_extractors("smoke", "one") == ("rearlib-classifier", None)
    ws = Workspace("smoke", "cpu", progress=False, plan="sec")
    main = [it for it in ws.items("main") if not it.pending]  # a pending item (best CFG unknown) has no key yet
    recipe = ws.items("recipe")
    assert main and recipe and all(it.key.get("secondary_extractor") == "inception-v3-fid" for it in main)
    assert all("secondary_extractor" not in it.key for it in recipe)
    plain = Workspace("smoke", "cpu", progress=False, plan="one")  # the recipe study's records are shared with it
    assert [it.key for it in plain.items("recipe")] == [it.key for it in recipe]


def _forbid_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a generator was loaded or trained although every record exists")

    monkeypatch.setattr(zoo, "load_run", boom)
    monkeypatch.setattr(zoo, "train_generator", boom)
    monkeypatch.setattr(zoo, "get_generator", boom)
    monkeypatch.setattr(Workspace, "load_model", boom)


def test_run_then_collect_without_models_pack_unpack(shrunk, monkeypatch, tmp_path):
    ws, root = shrunk
    lines = []
    res = ST.run_studies("smoke", "noise", ws=ws, log=lines.append)
    assert not res["stopped"] and res["missing"] == 0
    statuses = [r["status"] for r in res["items"]]
    assert statuses.count("completed at step 4") == 2 and statuses.count("evaluated") == 4  # floor + 2 + noise
    assert any("finished; 0 evaluation(s) missing" in line for line in lines)
    # a second run finds everything done
    again = ST.run_studies("smoke", "noise", ws=ws, log=lambda *a: None)
    assert {r["status"] for r in again["items"]} == {"done"}

    # every record exists: collecting the study loads, trains and samples nothing
    with monkeypatch.context() as m:
        _forbid_models(m)
        out = ST.collect("smoke", "noise", ws=ws, progress=False)
    runs, evals = out["runs"], out["evals"]
    assert list(runs["run"]) == ["align_only", "rear"] and runs["trained"].all()
    assert (runs["steps"] == 4).all() and runs["samples/s"].gt(0).all()
    assert set(evals["role"]) == {"report", "noise"} and len(evals) == 3
    assert out["floor"]["n generated"] == 20
    noise = ST.sampling_noise(evals, "FID[rearlib-classifier]", ["rear"], 1, 0)
    assert noise >= 0

    # pack on the "GPU box", unpack on a fresh "CPU box": the notebook path needs no weights there either
    archive = tmp_path / "records.tar.gz"
    info = ST.pack("smoke", archive, ws=ws, log=lambda *a: None)
    assert info["records"] == 4 and info["results"] == 2
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert not any(n.endswith(".pt") for n in names) and all(MEMBER.match(n) for n in names)
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path / "cpu_box"))
    assert ST.unpack(archive, log=lambda *a: None) == {"written": len(names), "kept": 0}
    assert ST.unpack(archive, log=lambda *a: None) == {"written": 0, "kept": len(names)}
    with monkeypatch.context() as m:
        _forbid_models(m)
        there = ST.collect("smoke", "noise", ws=ws, progress=False, compute=False)
    cols = ["run", "FID[rearlib-classifier]", "sample_seed"]
    assert there["evals"][cols].equals(evals[cols])
    assert there["runs"]["samples/s"].tolist() == runs["samples/s"].tolist()


def test_unpack_refuses_foreign_members(tmp_path, monkeypatch):
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path / "root"))
    for name, data in (("../evil.json", b"{}"), ("eval_records/0123456789ab/record.json", b"not json"),
                       ("generators/0123456789ab/model.pt", b"x")):
        archive = tmp_path / "bad.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        with pytest.raises(ValueError):
            ST.unpack(archive, log=lambda *a: None)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*.json"))


def test_time_limit_stops_cleanly_and_a_stopped_training_resumes(shrunk, monkeypatch, capsys):
    ws, root = shrunk
    with monkeypatch.context() as m:
        m.setattr(ST, "Workspace", lambda *a, **k: ws)  # the CLI builds its own; reuse the loaded one
        # a limit too short for any work: the command ends cleanly, having trained nothing
        assert ST.main(["run", "--scale", "smoke", "--study", "noise", "--time-limit", "1", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "stopped: time limit" in out and "item table" in out
        assert not list(root.glob("generators/*/model.pt"))
        ST.main(["status", "--scale", "smoke", "--study", "noise"])
        assert "missing" in capsys.readouterr().out
    with monkeypatch.context() as m:
        # --whole-runs: do not start a training that is not expected to finish
        m.setattr(Workspace, "estimate_train_s", lambda self, run: 1e6)
        res = ST.run_studies("smoke", "noise", ws=ws, time_limit_s=120, whole_runs=True, log=lambda *a: None)
        assert res["stopped"] and "align_only needs ~" in res["reason"]
        assert float(res["reason"].split("needs ~")[1].split(" s")[0]) > 1e6  # training + the run's evaluations
        assert not list(root.glob("generators/*/checkpoint.pt"))
    # a training stopped by its time limit leaves a checkpoint; the next command resumes it
    run = ws.resolve(ST.study_specs("smoke", "noise")[0])
    part = ws.train(run, time_limit_s=0.0)
    assert part["status"] == "stopped" and part["step"] == 2
    res = ST.run_studies("smoke", "noise", ws=ws, time_limit_s=300, log=lambda *a: None)  # trains to a deadline
    assert not res["stopped"] and res["missing"] == 0
    result = json.loads((root / "generators" / run.run_hash / "result.json").read_text())
    assert result["resumed_from"] == 2 and result["status"] == "completed"


@pytest.mark.parametrize("limit", ["-5", "0", "nan", "inf"])
def test_a_time_limit_that_allows_nothing_is_an_error_naming_the_option(limit, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ST, "Workspace", lambda *a, **k: calls.append("workspace"))
    monkeypatch.setattr(ST, "run_studies", lambda *a, **k: calls.append("run") or {"items": []})
    with pytest.raises(SystemExit) as err:
        ST.main(["run", "--scale", "smoke", "--time-limit", limit, "--device", "cpu", "--no-progress"])
    assert err.value.code != 0 and "--time-limit" in capsys.readouterr().err and not calls
    with pytest.raises(ValueError, match="time_limit_s"):  # the function refuses it too, before any work
        studies_runner.run_studies("smoke", "noise", time_limit_s=float(limit), ws=object(), log=lambda *a: None)


# ------------------------------------------------------------------------------------- the CLI and the facade

def test_every_subcommand_and_option_of_the_cli_explains_itself():
    parser = ST._parser()
    assert parser.prog == "python -m rearlib studies"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"status", "run", "pack", "unpack"}
    assert all(choice.help for choice in sub._choices_actions)
    for name, p in sub.choices.items():
        options = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
        assert options and all(a.help for a in options), name


def test_the_public_names_stay_importable_from_the_studies_module():
    for name in ST.__all__:
        assert getattr(ST, name) is not None
    assert ST.Workspace is SW.Workspace and ST.collect is SR.collect
    assert ST.study_specs is SP.study_specs and ST.PAPER_TABLE3 is SP.PAPER_TABLE3


# ------------------------------------------------------------------------------------------------ the notebooks' tables

def test_compare_seeds_runs_welch_on_the_seed_values():
    fid = "FID[rearlib-classifier]"
    rows = [{"condition": "no CFG", "model": m, "seed": s, fid: v, "IS": 5.0}
            for m, vals in (("AR", (3.0, 3.1, 2.9)), ("reAR", (2.0, 2.1, 1.9))) for s, v in enumerate(vals)]
    out = ST.compare_seeds(pd.DataFrame(rows), [(fid, True), ("IS", False)], conditions=("no CFG",))
    f, i = out.iloc[0], out.iloc[1]
    assert f["AR mean"] == pytest.approx(3.0) and f["reAR - AR"] == pytest.approx(-1.0)
    assert f["reAR better"] and f["Welch p"] < 0.01 and not f["2 SE overlap"] and f["n seeds"] == 3
    assert f["AR values"] == "3, 3.1, 2.9"
    assert i["Welch p"] != i["Welch p"] and not i["reAR better"]  # no value varies: no test (NaN)


def _frames(names, fid_of, seeds=(0,), spread=0.0, **run_cols):
    """Runs and reported evaluations of ``names`` on each training seed; seed i's FID is fid_of(n) +- spread
    (alternating, so the mean over an even number of seeds is fid_of(n))."""
    fid, isc, kid, _, _, cc = ST.metric_columns()
    runs = pd.DataFrame([{"run": n, "seed": s, "noise": "x", "EN": 0, "DE": 2, "steps": 12,
                          "samples/s": 100.0 + s, "train time (s)": 1.0, "GPU": "CPU", "lambda": 1.0, "tied": False,
                          "params": 10, "model": "4x64", **run_cols} for s in seeds for n in names])
    evals = pd.DataFrame([{"run": n, "seed": s, "role": "report", fid: fid_of(n) + spread * (-1) ** i, isc: 2.0,
                           kid: 0.1, cc: 0.5, "n generated": 80} for i, s in enumerate(seeds) for n in names])
    return runs, evals


def test_the_noise_table_sets_each_row_against_the_final_schedule():
    names = list(SP.PAPER_TABLE3)
    runs, evals = _frames(names, lambda n: 10.0 if n == "rear" else 12.0 if n == "fixed_0.5" else 10.5)
    table = ST.noise_table(runs, evals, noise=1.0)
    assert list(table["row"]) == names and (table["sampling noise"] == 1.0).all()
    row = table.set_index("row")
    assert row.loc["fixed_0.5", "Δ vs final"] == 2.0 and row.loc["fixed_0.5", "beyond noise"]
    assert not row.loc["align_only", "beyond noise"] and row.loc["rear", "Δ vs final"] == 0.0
    assert row.loc["fixed_0.5", "paper Δ vs final"] == pytest.approx(1.15)


def test_tables_of_several_training_seeds_show_the_mean_and_the_spread():
    names = list(SP.PAPER_TABLE3)
    fid = ST.metric_columns()[0]
    runs, evals = _frames(names, lambda n: 10.0 if n == "rear" else 12.0, seeds=(0, 1), spread=0.25)
    row = ST.noise_table(runs, evals, noise=1.0).set_index("row")
    assert row.loc["fixed_0.5", fid] == pytest.approx(12.0) and row.loc["fixed_0.5", "Δ vs final"] == 2.0
    assert row.loc["rear", f"{fid} sd"] == pytest.approx(0.5 / 2 ** 0.5) and row.loc["rear", "seeds"] == 2
    assert row.loc["rear", "samples/s"] == pytest.approx(100.5)  # cost averaged over the seeds' runs
    one = ST.noise_table(*_frames(names, lambda n: 10.0), noise=1.0).set_index("row")
    assert one["seeds"].eq(1).all() and one[f"{fid} sd"].isna().all()  # one seed: no spread to show


def test_the_embedding_table_has_one_row_per_paper_setting(tok):
    rows = ST.embedding_rows("smoke")
    names = [r["name"] for r in rows]
    runs, evals = _frames(names, lambda n: 20.0 if n == "ar" else 19.0)
    table = ST.embedding_table("smoke", runs, evals, noise=0.5)
    assert len(table) == sum(max(1, len(r["paper"])) for r in rows)
    assert table.loc[table["run"] == "ar", "Δ FID vs vanilla AR"].iloc[0] == 0.0
    assert (table.loc[table["run"] != "ar", "Δ FID vs vanilla AR"] == -1.0).all()
    assert list(table.loc[table["paper table"] == "Table 7", "paper setting"]) == [s for s, *_ in SP.PAPER_TABLE7]


def test_scaling_tables_and_the_fid_figure_tell_ar_from_rear():
    fid, _, _, _, _, cc = ST.metric_columns()
    sizes = ("xs", "tiny")
    runs = pd.DataFrame([{"run": f"{p} {s}", "preset": p, "size": s, "seed": 0,
                          "samples/s": 100.0 if p == "ar" else 90.0}
                         for s in reversed(sizes) for p in ("rear", "ar")])
    evals = pd.DataFrame([{"run": f"{p} {s}", "preset": p, "size": s, "model": "2x32", "step": step, "steps": 12,
                           "seed": 0, "role": "report", fid: 100.0 - step / 10, cc: 0.1}
                          for s in sizes for p in ("ar", "rear") for step in (12, 6)])
    runs, cost, curve = ST.scaling_tables(runs, evals, sizes, noise=0.5)
    assert list(zip(runs["size"], runs["variant"])) == [("xs", "AR"), ("xs", "reAR"), ("tiny", "AR"), ("tiny", "reAR")]
    assert list(cost.index) == list(sizes) and cost["reAR / AR time per step"].tolist() == pytest.approx([10 / 9] * 2)
    assert curve["step"].tolist()[:2] == [6, 12] and (curve["sampling noise"] == 0.5).all()
    fig = plot_fid_vs_steps(curve, sizes=sizes, fid=fid, cc=cc, noise=0.5, floor_fid=1.0, scale="smoke")
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    colors = {matplotlib.colors.to_hex(h[0].get_color()) for h, label in zip(handles, labels) if label in
              VARIANT_COLORS}
    assert colors == {matplotlib.colors.to_hex(c) for c in VARIANT_COLORS.values()}
    assert "lower is better" in ax.get_ylabel()
    assert "real train images" in fig.axes[-1].texts[0].get_text()  # the floor is stated, not drawn off-scale
    plt.close("all")


def test_two_processes_asking_for_one_run_take_turns_and_the_second_reuses_it(tok, tmp_path, monkeypatch):
    import threading
    import time as _time

    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path))

    class FakeTokens:
        def tensors(self):
            return torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, dtype=torch.long)

    monkeypatch.setattr(zoo, "get_tokens", lambda *a, **k: FakeTokens())
    active, overlaps, trained = [], [], []

    def fake_train(cfg, tokens, labels, codebook, out, **kw):  # finishes a run unless it is already finished
        active.append(1)
        overlaps.append(len(active) > 1)
        try:
            done = out / "result.json"
            if not done.exists():
                _time.sleep(0.3)
                out.mkdir(parents=True, exist_ok=True)
                done.write_text('{"status": "completed"}')
                trained.append(threading.current_thread().name)
            return json.loads(done.read_text())
        finally:
            active.pop()

    monkeypatch.setattr(zoo, "train", fake_train)
    results = []
    threads = [threading.Thread(target=lambda: results.append(zoo.train_generator("smoke", "ar", tok, 0,
                                                                                  device="cpu", progress=False)),
                                name=f"caller{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [{"status": "completed"}] * 2
    assert overlaps == [False, False] and len(trained) == 1  # one trained, the other waited and reused


def test_shards_share_the_plan_and_one_more_pass_finishes_it(shrunk, monkeypatch):
    ws, _ = shrunk
    owners = studies_runner.shard_owners(ws, "noise", 2)
    assert sorted(owners.values()) == [0, 1]  # two runs, one each
    trained = []
    real_train = Workspace.train

    def counting_train(self, run, *a, **k):
        trained.append(run.spec.name)
        return real_train(self, run, *a, **k)

    monkeypatch.setattr(Workspace, "train", counting_train)
    first = ST.run_studies("smoke", "noise", ws=ws, shard=(0, 2), log=lambda *a: None)
    ran0 = {r["run"] for r in first["items"]}
    assert first["missing"] > 0 and len(trained) == 1 and "-" in ran0  # shard 0 also takes the real-image floor
    second = ST.run_studies("smoke", "noise", ws=ws, shard=(1, 2), log=lambda *a: None)
    assert {r["run"] for r in second["items"]}.isdisjoint(ran0) and len(trained) == 2
    assert second["missing"] == 0  # the two shares cover the plan
    final = ST.run_studies("smoke", "noise", ws=ws, log=lambda *a: None)
    assert {r["status"] for r in final["items"]} == {"done"} and len(trained) == 2
    with pytest.raises(ValueError, match="shard"):
        ST.run_studies("smoke", "noise", ws=ws, shard=(2, 2), log=lambda *a: None)


def test_gpus_option_starts_one_shard_process_per_gpu(monkeypatch):
    started = []

    class FakeProc:
        def __init__(self, cmd, env):
            started.append((cmd, env["CUDA_VISIBLE_DEVICES"]))

        def wait(self):
            return 0

    monkeypatch.setattr(ST.subprocess, "Popen", FakeProc)
    codes = ST.spread_over_gpus(["run", "--scale", "small", "--gpus", "3", "--time-limit", "500"], 3, 500.0,
                                __import__("time").monotonic())
    assert codes == [0, 0, 0] and [gpu for _, gpu in started] == ["0", "1", "2"]
    for i, (cmd, _) in enumerate(started):
        assert cmd[-2:] == ["--shard", f"{i}/3"] and "--gpus" not in cmd
        assert cmd.count("--time-limit") == 1 and float(cmd[cmd.index("--time-limit") + 1]) <= 500

    # Two processes per GPU: shards 0..5, dealt over the GPUs in turn.
    started.clear()
    codes = ST.spread_over_gpus(["run", "--gpus", "3", "--procs-per-gpu", "2"], 3, None, 0.0, per_gpu=2)
    assert codes == [0] * 6 and [gpu for _, gpu in started] == ["0", "1", "2", "0", "1", "2"]
    assert [cmd[-1] for cmd, _ in started] == [f"{i}/6" for i in range(6)]
    assert all("--procs-per-gpu" not in cmd and "--time-limit" not in cmd for cmd, _ in started)


# ------------------------------------------------------------------------------------------------ claims of notebooks 10-13

def test_compare_seeds_gives_the_rule_paired_interval():
    fid = "FID[rearlib-classifier]"
    ar, rear = (5.0, 5.2, 6.0), (3.0, 2.9, 3.1)
    rows = [{"condition": "no CFG", "model": m, "seed": s, fid: v}
            for m, vals in (("AR", ar), ("reAR", rear)) for s, v in enumerate(vals)]
    out = ST.compare_seeds(pd.DataFrame(rows), [(fid, True)], conditions=("no CFG",)).iloc[0]
    d = [b - a for a, b in zip(ar, rear)]  # the same seeds on both sides: paired by seed
    half = scipy_t.ppf(0.975, 2) * statistics.stdev(d) / 3 ** 0.5
    assert out["test"] == "paired"
    assert out["CI low"] == pytest.approx(statistics.mean(d) - half)
    assert out["CI high"] == pytest.approx(statistics.mean(d) + half)


def test_one_seed_per_run_is_inconclusive_even_beyond_the_sampling_noise():
    far = V.seed_difference_verdict({0: 38.6}, {0: 48.6}, expected="lower", sampling_noise=4.15)
    near = V.seed_difference_verdict({0: 52.5}, {0: 50.0}, expected="lower", sampling_noise=4.15)
    verdict, reason = SR.claim_verdict(far, expected="lower")
    assert verdict == "inconclusive" and "one training seed" in reason
    assert "+10: beyond the sampling noise 4.15, opposite to the paper's direction" in reason
    verdict, reason = SR.claim_verdict({"a": far, "b": near}, expected="lower")
    assert verdict == "inconclusive"
    assert "a: +10: beyond" in reason and "b: -2.5: within the sampling noise 4.15, in the paper's direction" in reason
    assert SR.difference_text(far) == "+10 (one training seed: no interval)"
    note = SR.spread_note({"a": far, "b": near}, "two sampling seeds")
    assert "spread unknown: one training seed per run" in note and "4.15 (two sampling seeds)" in note


def test_a_claim_is_as_strong_as_its_weakest_difference_and_stops_at_the_direction():
    ar = {0: 5.0, 1: 5.2, 2: 6.0}
    better = V.seed_difference_verdict(ar, {0: 3.0, 1: 2.9, 2: 3.1}, expected="lower", sampling_noise=0.5)
    unclear = V.seed_difference_verdict(ar, {0: 4.0, 1: 6.5, 2: 5.0}, expected="lower")
    worse = V.seed_difference_verdict(ar, {0: 7.0, 1: 7.1, 2: 8.0}, expected="lower")
    assert better.verdict == "reproduced"  # no paper magnitude: the rule judges the direction only ...
    verdict, reason = SR.claim_verdict(better, expected="lower")
    assert verdict == "direction reproduced" and "only the direction is compared" in reason  # ... and says so
    assert SR.claim_verdict({"x": better, "y": unclear})[0] == "inconclusive"
    assert SR.claim_verdict({"x": better, "y": unclear, "z": worse})[0] == "not reproduced"
    exact = V.seed_difference_verdict(ar, {0: 3.0, 1: 2.9, 2: 3.1}, expected="lower", paper_effect=-2.4)
    assert SR.claim_verdict(exact)[0] == "reproduced"  # a paper magnitude inside the interval is kept
    note = SR.spread_note({"AR / reAR": better}, "seed-0 models")
    assert f"AR / reAR: {statistics.stdev(ar.values()):.2g} / 0.1 (n = 3 / 3 seeds)" in note
    assert "sampling noise, apart from it: 0.5 (seed-0 models)" in note
    assert SR.difference_text(better).endswith("(paired t over 3 seeds)") and "95% CI [" in SR.difference_text(better)


def test_claim_verdict_at_smoke_and_its_refusals():
    v = V.seed_difference_verdict({0: 5.0, 1: 5.2}, {0: 3.0, 1: 3.1}, expected="lower")
    verdict, reason = SR.claim_verdict(v, expected="lower", smoke=True)
    assert verdict == "not tested" and V.SMOKE_NOTE in reason and "direction reproduced" in reason
    smoked = V.seed_difference_verdict({0: 5.0, 1: 5.2}, {0: 3.0, 1: 3.1}, expected="lower", smoke=True)
    with pytest.raises(ValueError, match="without smoke"):
        SR.claim_verdict(smoked)  # a smoke-capped part would hide the verdict the scale must cap
    with pytest.raises(ValueError, match="at least one"):
        SR.claim_verdict({})


def test_insensitivity_needs_the_interval_inside_the_margin():
    m = SR.INSENSITIVITY_MARGIN
    one = V.insensitivity_verdict({0: 48.6}, {0: 48.7}, margin=m, relative=True, sampling_noise=4.15)
    verdict, reason = SR.claim_verdict({"λ=0.5 - λ=1": one})
    assert verdict == "inconclusive" and "within the margin ±5%" in reason  # one seed: no interval, even inside
    assert "sampling noise 8.54%" in reason
    tight = V.insensitivity_verdict({0: 40.0, 1: 40.4, 2: 39.8}, {0: 40.1, 1: 40.3, 2: 39.9}, margin=m,
                                    relative=True)
    loose = V.insensitivity_verdict({0: 40.0, 1: 44.0, 2: 36.0}, {0: 41.0, 1: 35.0, 2: 44.0}, margin=m,
                                    relative=True)
    assert SR.claim_verdict({"a": tight})[0] == "reproduced"
    assert SR.claim_verdict({"a": tight, "b": loose})[0] == "inconclusive"  # no difference detected is not none
    assert "% of the baseline" in SR.difference_text(tight)


def test_sampling_noise_at_each_variant_best_cfg():
    fid = "FID"
    rows = [("ar seed0", "no CFG", 0, 5.0), ("ar seed0", "no CFG", 1, 5.5), ("ar seed0", "CFG g=1.5 p=0", 0, 1.0),
            ("ar seed0", "CFG g=1.5 p=0", 1, 1.1), ("rear seed0", "no CFG", 0, 3.0), ("rear seed0", "no CFG", 1, 3.2),
            ("rear seed0", "CFG g=2 p=2", 0, 0.9), ("rear seed0", "CFG g=2 p=2", 1, 1.2),
            ("rear seed0", "CFG g=1.5 p=0", 0, 2.0), ("rear seed0", "CFG g=1.5 p=0", 1, 4.0)]
    evals = pd.DataFrame([{"run": r, "seed": 0, "setting": s, "sample_seed": k, fid: v, "step": 10, "steps": 10}
                          for r, s, k, v in rows])
    runs = ["ar seed0", "rear seed0"]
    # a row with several training seeds: the pair of sampling seeds is taken within one training seed's weights
    several = pd.DataFrame([{"run": "x", "seed": t, "setting": "no CFG", "sample_seed": k, fid: v, "step": 10,
                             "steps": 10} for t, k, v in ((1, 1, 50.0), (0, 1, 3.0), (0, 0, 3.1))])
    assert SR.sampling_noise(several, fid, ["x"], 1, 0) == pytest.approx(0.1)
    assert SR.sampling_noise(evals, fid, runs, 1, 0) == pytest.approx(0.5)  # without CFG, as before
    best = {"ar seed0": "CFG g=1.5 p=0", "rear seed0": "CFG g=2 p=2"}  # each at its own best setting only
    assert SR.sampling_noise(evals, fid, runs, 1, 0, setting=best) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no pair of sampling seeds"):
        SR.sampling_noise(evals, fid, runs, 1, 0, setting="CFG g=3 p=0")


# -- the CFG sweep grows until it brackets the optimum --------------------------------------------------------
def test_sweep_extends_upwards_until_the_best_scale_is_bracketed():
    fid = lambda g: (g - 4.4) ** 2  # noqa: E731  optimum above the base grid
    st = SP.sweep_state((1.5, 2.0, 3.0), fid, max_added=3)
    assert st.scales == (1.5, 2.0, 3.0, 4.0, 5.0) and st.best == 4.0 and st.bracketed and st.next_scale is None


def test_sweep_extends_down_to_no_guidance_and_stops_there():
    fid = lambda g: g  # noqa: E731  guidance only hurts: g = 1 (no guidance) is best, nothing lies below it
    st = SP.sweep_state((1.5, 2.0, 3.0), fid, max_added=3)
    assert st.scales == (1.0, 1.5, 2.0, 3.0) and st.best == 1.0 and st.bracketed


def test_sweep_that_keeps_improving_stops_at_its_limit_unbracketed():
    fid = lambda g: -g  # noqa: E731
    st = SP.sweep_state((1.5, 2.0, 3.0), fid, max_added=2)
    assert st.scales == (1.5, 2.0, 3.0, 4.0, 5.0) and st.best == 5.0 and not st.bracketed
    assert SP.sweep_state((1.5, 2.0, 3.0), fid, max_added=0).scales == (1.5, 2.0, 3.0)


def test_sweep_asks_for_missing_points_before_deciding():
    done = {1.5: 3.0, 2.0: 2.0}
    st = SP.sweep_state((1.5, 2.0, 3.0), done.get, max_added=3)
    assert st.next_scale == 3.0 and st.best is None and not st.bracketed
    done[3.0] = 1.0  # best at the top edge: the next point is one grid step above
    assert SP.sweep_state((1.5, 2.0, 3.0), done.get, max_added=3).next_scale == 4.0
    with pytest.raises(ValueError, match="guidance scales must be >= 1"):
        SP.sweep_state((0.5, 2.0), done.get, max_added=1)


def test_the_plan_runs_seed_major_so_every_row_has_one_seed_before_any_has_two(shrunk):
    _, _ = shrunk
    ws = SW.Workspace("smoke", "cpu", progress=False, plan="two")
    assert studies_runner.seed_passes(ws, "all") == [(n, s) for s in (0, 1) for n in SP.STUDIES]
    res = ST.run_studies("smoke", "noise", ws=ws, log=lambda *a: None)
    assert not res["stopped"] and res["missing"] == 0
    trained = [r["run"] for r in res["items"] if r["what"].startswith("train")]
    assert trained == ["align_only seed0", "rear seed0", "align_only seed1", "rear seed1"]
    # the second sampling seed (sampling noise) is drawn once, from the first training seed's weights
    noise_items = [it for it in ws.items("noise") if it.role == "noise"]
    assert [(it.run.spec.name, it.run.spec.seed) for it in noise_items] == [("rear", 0)]
    runs = ST.collect("smoke", "noise", ws=ws, progress=False)["runs"]
    assert sorted(zip(runs["run"], runs["seed"])) == [("align_only", 0), ("align_only", 1), ("rear", 0), ("rear", 1)]
    with pytest.raises(ValueError, match="unknown plan 'long'.*plans: one, two"):
        SW.Workspace("smoke", "cpu", progress=False, plan="long")
