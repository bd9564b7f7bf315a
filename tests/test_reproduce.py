"""The papermill runner: order, outputs, provenance, SUMMARY, failure reporting and skipping unchanged work."""

import json
import re
import textwrap

import pytest

from rearlib.experiments.notebook import NOTEBOOK_DIR, check_int_param, setup
import rearlib.experiments.reproduce as reproduce
from rearlib.experiments.reproduce import build_summary, main, select

HEADER = '''# %% tags=["parameters"]
scale = "smoke"
seed = 0
device = "auto"
reports_dir = "reports"
figures_dir = "figures"
# %%
from rearlib.experiments.notebook import setup
ctx = setup(notebook="{name}", scale=scale, seed=seed, device=device, reports_dir=reports_dir, figures_dir=figures_dir)
'''


def _write(folder, name, body):
    (folder / f"{name}.py").write_text(HEADER.format(name=name) + textwrap.dedent(body))


@pytest.fixture(autouse=True)
def _fixed_library_digest(monkeypatch):
    # The runner re-runs a notebook when the library's sources change; these tests are about the runner alone.
    monkeypatch.setattr(reproduce, "_library_digest", lambda: "fixed")


def test_runner_reports_failure_keeps_others_and_skips_unchanged(tmp_path, capfd, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # kernels' IPC sockets must not land in the working folder
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    # --jobs 3: the two good notebooks wait (up to a minute) for each other's mark, so they finish only if they ran
    # side by side; 04_generators times the device and must run alone, after both.
    meet = (f"import time, pathlib\nmarks = pathlib.Path({str(marks)!r})\n(marks / ctx.notebook).write_text(str(time.time()))\n"
            "t0 = time.time()\nwhile len(list(marks.glob('0[13]_*'))) < 2:\n"
            "    assert time.time() - t0 < 60, 'the other notebook never ran beside this one'\n    time.sleep(0.1)\n"
            "(marks / (ctx.notebook + '.end')).write_text(str(time.time()))\n")
    _write(nbs, "01_ok", '''
# %%
import pandas as pd
ctx.save_csv(pd.DataFrame({"x": [1, 2]}), "01_table")
ctx.claim(claim="c", paper="p", ours="o", verdict="not tested")
# %%
''' + meet)
    _write(nbs, "02_broken", '''
# %%
x = 1
# %%
raise RuntimeError("deliberate failure")
''')
    _write(nbs, "03_after", '''
# %%
ctx.note("ran after a failure")
# %%
''' + meet)
    _write(nbs, "04_generators", f"# %%\nimport time, pathlib\npathlib.Path({str(marks)!r}, 'timed').write_text(str(time.time()))\n")
    args = ["--scale", "smoke", "--notebooks-dir", str(nbs), "--reports-dir", str(tmp_path / "r"),
            "--figures-dir", str(tmp_path / "f"), "--device", "cpu", "--jobs", "3"]
    assert main(args) == 1
    err = capfd.readouterr().err
    assert "02_broken: failed in cell" in err and "deliberate failure" in err
    ends = [float((marks / f"{n}.end").read_text()) for n in ("01_ok", "03_after")]
    assert float((marks / "timed").read_text()) > max(ends)  # the timed notebook ran alone, after the others
    reports = tmp_path / "r" / "smoke"
    prov = json.loads((reports / "provenance.json").read_text())
    assert prov["notebooks"]["01_ok"]["status"] == "ok" and prov["notebooks"]["03_after"]["status"] == "ok"
    assert prov["notebooks"]["02_broken"]["status"] == "failed"
    assert prov["notebooks"]["02_broken"]["failed_cell"] is not None
    assert {"torch", "papermill"} <= set(prov["versions"]) and "hardware" in prov
    assert (reports / "01_table.csv").exists()
    assert (reports / "notebooks" / "02_broken.ipynb").exists()  # the failed notebook is kept for reading
    summary = (reports / "SUMMARY.md").read_text()
    assert "| 01_ok | c | p | o | **not tested** |" in summary and "ran after a failure" in summary
    assert list(work.iterdir()) == []

    # second run: the two good notebooks are unchanged and skipped; the broken one runs (and fails) again
    # (children compute their keys themselves, with the real library digest, in both runs)
    assert main(args + ["--only", "01,03"]) == 0
    assert capfd.readouterr().out.count("[cached]") == 2


def test_jobs_run_timed_notebooks_alone_after_the_others():
    from pathlib import Path
    nbs = [Path(f"{n}.py") for n in ("01_data", "04_generators", "05_exposure_bias", "14_teaching", "08_cka")]
    side, alone = reproduce.split_for_jobs(nbs, 3)
    assert [s.stem for s in side] == ["01_data", "05_exposure_bias", "08_cka"]
    assert [s.stem for s in alone] == ["04_generators", "14_teaching"]
    assert reproduce.split_for_jobs(nbs, 1) == ([], nbs)
    assert reproduce.split_for_jobs(nbs[:2], 3) == ([], nbs[:2])  # one untimed notebook: nothing to overlap
    # a child runner gets the runner's options and only the --param items its notebook declares
    import argparse
    args = argparse.Namespace(scale="paper", seed=2, device="cuda", reports_dir="r", figures_dir="f",
                              notebooks_dir="nbs", param=["ckpt=/w/ar.bin", "n=3"], force=True)
    cmd = reproduce._child_command(args, "05_exposure_bias", {"ckpt", "scale"})
    assert cmd[cmd.index("--only") + 1] == "05_exposure_bias" and cmd[cmd.index("--seed") + 1] == "2"
    assert "--param=ckpt=/w/ar.bin" in cmd and not any("n=3" in c for c in cmd) and cmd[-1] == "--force"
    assert Path(cmd[cmd.index("--reports-dir") + 1]).is_absolute()


def test_select_by_number_or_name(tmp_path):
    from pathlib import Path

    scripts = [Path("01_data.py"), Path("02_tokenizer.py"), Path("10_x.py")]
    assert select(scripts, "2") == [scripts[1]]
    assert select(scripts, "01_data,10") == [scripts[0], scripts[2]]
    import pytest

    with pytest.raises(SystemExit, match="unknown notebook"):
        select(scripts, "07")


def test_summary_warns_that_smoke_numbers_mean_nothing(tmp_path):
    (tmp_path / "claims").mkdir()
    text = build_summary(tmp_path, "smoke", {"hardware": {}, "notebooks": {}})
    assert "not meaningful" in text


def test_large_tables_are_written_gzipped(tmp_path):
    import gzip

    import pandas as pd

    from rearlib.experiments.notebook import setup

    ctx = setup(notebook="99_t", scale="smoke", reports_dir=tmp_path / "r", figures_dir=tmp_path / "f", quiet=True)
    small = pd.DataFrame({"x": range(10)})
    big = pd.DataFrame({"x": range(200_000), "y": ["some text"] * 200_000})
    assert ctx.save_csv(small, "a").name == "a.csv"
    path = ctx.save_csv(big, "b", compress_over_bytes=1_000_000)
    assert path.name == "b.csv.gz" and not (path.parent / "b.csv").exists()
    assert pd.read_csv(path).equals(big)
    assert gzip.decompress(path.read_bytes()).startswith(b"x,y")
    # a table that shrinks below the threshold replaces its stale compressed version
    assert ctx.save_csv(small, "b").name == "b.csv" and not path.exists()


def test_python_m_rearlib_lists_and_runs_every_command_line_tool(capsys):
    import importlib
    import pathlib

    from rearlib.__main__ import COMMANDS, main

    listed = {module for _, module, _ in COMMANDS}
    root = pathlib.Path(importlib.import_module("rearlib").__file__).parent
    with_main = {".".join(("rearlib",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                 for p in root.rglob("*.py") if p.name != "__main__.py" and 'if __name__ == "__main__"' in p.read_text()}
    assert with_main == listed
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name, _, _ in COMMANDS)
    assert main(["no-such-tool"]) == 2 and "unknown command 'no-such-tool'" in capsys.readouterr().err
    for name, _, _ in COMMANDS:  # every command answers --help through the dispatcher
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert f"python -m rearlib {name}" in capsys.readouterr().out


def test_relative_output_folders_are_under_the_repository_whatever_the_working_folder(tmp_path, monkeypatch):
    import shutil
    import uuid

    from rearlib.runtime import REPO_ROOT

    monkeypatch.chdir(tmp_path)  # e.g. JupyterLab runs a notebook with notebooks/ as its working folder
    name = f".test-outputs-{uuid.uuid4().hex[:8]}"
    try:
        ctx = setup("99_test", "smoke", reports_dir=f"{name}/reports", figures_dir=f"{name}/figures", quiet=True)
        assert ctx.reports == REPO_ROOT / name / "reports" / "smoke"
        assert ctx.figures == REPO_ROOT / name / "figures" / "smoke"
        assert (ctx.reports / "claims" / "99_test.json").is_file()
        assert not (tmp_path / name).exists()
    finally:
        shutil.rmtree(REPO_ROOT / name, ignore_errors=True)
    absolute = setup("99_test", "smoke", reports_dir=tmp_path / "r", figures_dir=tmp_path / "f", quiet=True)
    assert absolute.reports == tmp_path / "r" / "smoke"


def test_every_command_line_option_and_subcommand_is_explained(monkeypatch, capsys):
    import argparse

    from rearlib.__main__ import COMMANDS, main

    seen = []
    add_argument = argparse._ActionsContainer.add_argument
    add_parser = argparse._SubParsersAction.add_parser

    def recording_add_argument(self, *args, **kwargs):
        action = add_argument(self, *args, **kwargs)
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            seen.append((command, "/".join(action.option_strings) or action.dest, action.help))
        return action

    def recording_add_parser(self, name, **kwargs):
        seen.append((command, f"subcommand {name}", kwargs.get("help")))
        return add_parser(self, name, **kwargs)

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", recording_add_argument)
    monkeypatch.setattr(argparse._SubParsersAction, "add_parser", recording_add_parser)
    for command, _, _ in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
    capsys.readouterr()
    assert {c for c, _, _ in seen} == {c for c, _, _ in COMMANDS}
    unexplained = [f"{c}: {opt}" for c, opt, text in seen if not (text and text.strip())]
    assert not unexplained, "options without help text:\n" + "\n".join(unexplained)


def test_smoke_figures_are_stamped_not_meaningful_and_others_are_not(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def texts(scale):
        ctx = setup("99_test", scale, reports_dir=tmp_path / "r", figures_dir=tmp_path / "f", quiet=True)
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        path = ctx.save_fig(fig, "curve")
        ctx.save_fig(fig, "curve")  # saving twice stamps once
        plt.close(fig)
        assert path.is_file() and path.stat().st_size > 0
        return [t.get_text() for t in fig.texts]

    assert texts("smoke") == ["smoke scale: not meaningful"]
    assert texts("small") == []


def _args(tmp_path, nbs, scale="smoke"):
    return ["--scale", scale, "--notebooks-dir", str(nbs), "--reports-dir", str(tmp_path / "r"),
            "--figures-dir", str(tmp_path / "f"), "--device", "cpu", "--no-cell-progress"]


def test_notebook_parameters_from_the_command_line_and_skips_by_scale(tmp_path, capsys):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    (nbs / "02_params.py").write_text(HEADER.replace('figures_dir = "figures"', 'figures_dir = "figures"\nckpt = None\nn = 1')
                                      .format(name="02_params") + textwrap.dedent('''
        # %%
        ctx.note(f"ckpt={ckpt!r} n={n!r}")
        '''))
    _write(nbs, "04_generators", "# %%\nraise RuntimeError('must not run at paper scale')\n")
    assert main(_args(tmp_path, nbs, "paper") + ["--param", "ckpt=/weights/ar.bin", "--param", "n=3"]) == 0
    out = capsys.readouterr().out
    assert "[skipped] 04_generators: runs at smoke / small only" in out
    prov = json.loads((tmp_path / "r" / "paper" / "provenance.json").read_text())
    assert prov["notebooks"]["04_generators"]["status"] == "skipped (smoke/small only)"
    assert prov["notebooks"]["02_params"]["params"] == {"ckpt": "/weights/ar.bin", "n": 3}
    notes = json.loads((tmp_path / "r" / "paper" / "claims" / "02_params.json").read_text())["notes"]
    assert notes == ["ckpt='/weights/ar.bin' n=3"]
    assert "skipped (smoke/small only)" in (tmp_path / "r" / "paper" / "SUMMARY.md").read_text()
    with pytest.raises(SystemExit, match="no selected notebook has such a parameter"):
        main(_args(tmp_path, nbs) + ["--param", "ckpnt=/typo"])
    with pytest.raises(SystemExit, match="set by the runner's own option --seed"):
        main(_args(tmp_path, nbs) + ["--param", "seed=3"])
    with pytest.raises(SystemExit, match="--only is empty"):
        main(_args(tmp_path, nbs) + ["--only", ""])


def test_an_interrupted_run_is_never_reported_as_cached(tmp_path, capsys, monkeypatch):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write(nbs, "01_ok", "# %%\nctx.claim(claim='c', paper='p', ours='o', verdict='not tested')\n")
    assert main(_args(tmp_path, nbs)) == 0
    real_run = reproduce.run_notebook

    def interrupted(script, params, out_path, **kw):
        out_path.write_text("{}")  # half a notebook, as a kill midway leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "run_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(_args(tmp_path, nbs) + ["--force"])
    prov = json.loads((tmp_path / "r" / "smoke" / "provenance.json").read_text())
    assert prov["notebooks"]["01_ok"]["status"] == "interrupted"
    monkeypatch.setattr(reproduce, "run_notebook", real_run)
    capsys.readouterr()
    assert main(_args(tmp_path, nbs)) == 0  # no --force: the interrupted notebook runs again
    out = capsys.readouterr().out
    assert "[ok] 01_ok" in out and "[cached]" not in out
    # a run killed without a chance to record anything (SIGKILL) leaves "running", which is re-run as well
    prov_path = tmp_path / "r" / "smoke" / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["notebooks"]["01_ok"]["status"] = "running"
    prov_path.write_text(json.dumps(prov))
    assert main(_args(tmp_path, nbs)) == 0 and "[ok] 01_ok" in capsys.readouterr().out


def test_concurrent_provenance_updates_keep_every_record(tmp_path):
    import threading

    reports = tmp_path / "smoke"
    reports.mkdir()
    writers = [reproduce.Provenance(reports, {"scale": "smoke"}) for _ in range(4)]
    threads = [threading.Thread(target=lambda w=w, i=i: [w.update(f"{i:02d}_nb{j}", {"status": "ok"})
                                                         for j in range(10)]) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads((reports / "provenance.json").read_text())["notebooks"]) == 40


def test_check_int_param_names_the_parameter():
    assert check_int_param("n_images", 3) == 3 and check_int_param("n_images", None, optional=True) is None
    assert check_int_param("n_folds", 2, minimum=2) == 2
    for bad in (0, -1, 2.5, True, "8", None):
        with pytest.raises(ValueError, match=r"parameter n_images must be an integer >= 1, got"):
            check_int_param("n_images", bad)
    with pytest.raises(ValueError, match=r"n_folds must be an integer >= 2 or None, got 1"):
        check_int_param("n_folds", 1, minimum=2, optional=True)


def _run_first_cells(name, tmp_path, **params):
    """Run a notebook's parameters cell, then ``params`` as papermill would inject them, then its first cell."""
    parts = re.split(r"(?m)^(# %%.*)$", (NOTEBOOK_DIR / f"{name}.py").read_text())
    cells = list(zip(parts[1::2], parts[2::2]))
    at = next(i for i, (head, _) in enumerate(cells) if "parameters" in head)
    first = next(body for head, body in cells[at + 1:] if "[markdown]" not in head)
    ns = {}
    exec(cells[at][1], ns)
    ns.update(reports_dir=str(tmp_path / "r"), figures_dir=str(tmp_path / "f"), device="cpu", **params)
    exec(first, ns)
    return ns


@pytest.mark.parametrize("name,param,bad", [
    ("05_exposure_bias", "n_images", -1), ("05_exposure_bias", "n_images", 0), ("05_exposure_bias", "n_examples", 0),
    ("06_embedding_replacement", "n_images", 0), ("06_embedding_replacement", "n_examples", -2),
    ("07_robustness", "n_images", 0), ("07_robustness", "n_images", 2.5),
    ("08_cka", "n_images", 0), ("08_cka", "n_images", 1), ("08_cka", "n_folds", 1),
])
def test_diagnosis_notebooks_check_their_counts_in_the_first_cell(tmp_path, name, param, bad):
    assert _run_first_cells(name, tmp_path)["ctx"].notebook == name  # the defaults pass
    with pytest.raises(ValueError, match=rf"parameter {param} must be an integer"):
        _run_first_cells(name, tmp_path, **{param: bad})
