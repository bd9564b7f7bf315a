"""The papermill runner: order, outputs, provenance, SUMMARY, failure reporting and skipping unchanged work."""

import pytest
import json
import textwrap

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


def test_runner_reports_failure_keeps_others_and_skips_unchanged(tmp_path, capsys):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write(nbs, "01_ok", '''
# %%
import pandas as pd
ctx.save_csv(pd.DataFrame({"x": [1, 2]}), "01_table")
ctx.claim(claim="c", paper="p", ours="o", verdict="not tested")
''')
    _write(nbs, "02_broken", '''
# %%
x = 1
# %%
raise RuntimeError("deliberate failure")
''')
    _write(nbs, "03_after", '''
# %%
ctx.note("ran after a failure")
''')
    args = ["--scale", "smoke", "--notebooks-dir", str(nbs), "--reports-dir", str(tmp_path / "r"),
            "--figures-dir", str(tmp_path / "f"), "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "02_broken: failed in cell" in err and "deliberate failure" in err
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

    # second run: the two good notebooks are unchanged and skipped; the broken one runs (and fails) again
    assert main(args + ["--only", "01,03"]) == 0
    assert capsys.readouterr().out.count("[cached]") == 2


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
