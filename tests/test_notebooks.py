"""Every numbered notebook runs at smoke scale under papermill, and its .py/.ipynb pair is in sync."""

import json

import pytest

from rearlib.experiments.notebook import check, notebook_scripts
from rearlib.experiments.reproduce import run_notebook

SCRIPTS = notebook_scripts()


def test_notebook_pairs_in_sync_and_without_outputs():
    assert SCRIPTS, "no notebooks found"
    assert check() == []


@pytest.fixture(scope="session")
def smoke_out(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke_run")


@pytest.mark.notebook
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_notebook_runs_at_smoke(script, smoke_out):
    params = {"scale": "smoke", "seed": 0, "device": "cpu", "reports_dir": str(smoke_out / "reports"),
              "figures_dir": str(smoke_out / "figures")}
    executed = smoke_out / "executed" / f"{script.stem}.ipynb"
    run_notebook(script, params, executed, cwd=script.parent.parent)
    claims = json.loads((smoke_out / "reports" / "smoke" / "claims" / f"{script.stem}.json").read_text())
    assert claims["scale"] == "smoke"
    assert any((smoke_out / "figures" / "smoke").glob(f"{script.stem[:2]}_*.png")), "the notebook saved no figure"
    assert any((smoke_out / "reports" / "smoke").glob(f"{script.stem[:2]}_*.csv")), "the notebook saved no CSV"


@pytest.mark.notebook
def test_bad_parameter_fails_in_first_cell_with_allowed_values(tmp_path):
    import papermill as pm

    script = SCRIPTS[0]
    with pytest.raises(pm.PapermillExecutionError) as err:
        run_notebook(script, {"scale": "huge", "reports_dir": str(tmp_path), "figures_dir": str(tmp_path)},
                     tmp_path / "out.ipynb", cwd=script.parent.parent)
    assert "smoke, small, paper" in str(err.value.evalue)
    nb = json.loads((tmp_path / "out.ipynb").read_text())
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    # parameters, injected parameters, then the setup cell: the error is in the first cell that does work
    failed = [i for i, c in enumerate(code_cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert failed == [2]
