"""Notebook 09's model-by-model work (rearlib.vapi_units): records replace weights, and never mix realisations."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from rearlib import vapi
from rearlib.experiments.evaluation import Evaluator, record_path, run_model_key
from rearlib.model import build_generator
from rearlib.vapi_config import config_for_scale
from rearlib.vapi_report import METHOD, StudyRun, heldout_images
from rearlib.vapi_units import VAPIStudy, cached_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _study(tok, clf, model) -> VAPIStudy:
    cfg = config_for_scale("smoke", batch_size=2, group_size=2, reward_terms="mse", lr=1e-2)
    return VAPIStudy(
        scale="smoke", tokenizer=tok,
        evaluator=Evaluator("smoke", tok, clf, "cpu", n_ref=32, batch=20, progress=False,
                            extractor="rearlib-classifier"),
        base_models={"AR": model}, base_keys={"AR": run_model_key("test-ar", 1)},
        runs={METHOD: StudyRun("AR", "MSE", "method", cfg, 2)}, seeds=[0],
        source=vapi.EmbeddedSource(16, tok.resolution, "train", 0), data_size=16, data_seed=0,
        heldout=heldout_images(tok, 8, 0, "cpu"), heldout_cfg=cfg, heldout_seed=1, perceptual_fn=None,
        perceptual="none", n_per_class=2, cfg_by_model={"AR": (2.0, 0.0)}, grid_models=("AR", METHOD),
        grid_per_class=1, grid_seed=0, progress=False)


def _fids(unit) -> list[float]:
    return [r["FID[rearlib-classifier]"] for r in unit.evals]


def test_a_unit_is_made_once_then_read_from_records_without_weights(smoke_parts, tmp_path, monkeypatch):
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path))
    tok, clf, model = smoke_parts
    study = _study(tok, clf, model)

    base = study.unit(("AR", None))
    assert base.work == "scored" and base.result is None
    assert [(r["CFG"], r["sample_seed"]) for r in base.evals] == [("no CFG", 0), ("CFG", 0)]
    assert study.unit(("AR", None)).work == "records"

    first = study.unit((METHOD, 0))
    assert first.work == "trained" and first.result["step"] == 2 and first.result["steps_this_call"] == 2
    assert first.grid.dtype == torch.uint8 and first.grid.shape == (10, 3, tok.resolution, tok.resolution)
    assert first.heldout["model"] == METHOD and first.heldout["n images"] == 8
    key = study.model_key((METHOD, 0), first.result)
    assert key["weights"] == first.result["final_fingerprint"]

    # The weights are gone (another machine): the records alone give the same unit; nothing is trained.
    folder = study.run_dir(METHOD, 0)
    for f in ("checkpoint.pt", "model.pt"):
        (folder / f).unlink()
    with monkeypatch.context() as m:
        m.setattr(VAPIStudy, "post_train", lambda *a: pytest.fail("post-trained although every record exists"))
        again = study.unit((METHOD, 0))
    assert again.work == "records"
    assert _fids(again) == _fids(first) and again.heldout == first.heldout and torch.equal(again.grid, first.grid)

    # One record is missing and the weights are gone: the run is trained again. Another realisation (here: other
    # starting weights under the same recipe key) is scored under its own weights' key, with none of the old records.
    record_path(study.evaluator.key(key, n_per_class=2, cfg_scale=2.0, cfg_power=0.0, sample_seed=0)).unlink()
    other = build_generator("tiny", codebook_size=tok.codebook_size, seq_len=tok.num_tokens, z_dim=tok.code_dim)
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    study.base_models = {"AR": other.eval()}
    redo = study.unit((METHOD, 0))
    assert redo.work == "trained"
    assert redo.result["final_fingerprint"] != first.result["final_fingerprint"]
    assert vapi.finished_run(folder)["final_fingerprint"] == redo.result["final_fingerprint"]
    assert all(a != b for a, b in zip(_fids(redo), _fids(first)))
    assert not torch.equal(redo.grid, first.grid)


def test_finished_run_needs_a_completed_record(tmp_path):
    assert vapi.finished_run(tmp_path) is None
    (tmp_path / "result.json").write_text('{"status": "stopped", "step": 1}')
    assert vapi.finished_run(tmp_path) is None
    (tmp_path / "result.json").write_text('{"status": "completed", "step": 2, "final_fingerprint": "ab", '
                                          '"history": [{"step": 1}, {"step": 2}]}')
    done = vapi.finished_run(tmp_path)
    assert done["step"] == 2 and list(done["history_df"]["step"]) == [1, 2]
    (tmp_path / "result.json").write_text('{"status": "compl')
    with pytest.warns(UserWarning, match="unfinished"):
        assert vapi.finished_run(tmp_path) is None


def test_cached_table_is_made_once_and_read_back_equal(tmp_path, monkeypatch):
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path))
    calls = []

    def make():
        calls.append(1)
        t = pd.DataFrame([{"model": "AR", "vapi_seed": None, "held-out λ_p": 0.3412345678901}])
        t["vapi_seed"] = t["vapi_seed"].astype("Int64")
        return t

    first = cached_table({"k": 1}, make, "cpu")
    again = cached_table({"k": 1}, make, "cpu")
    assert calls == [1] and again["held-out λ_p"].iloc[0] == first["held-out λ_p"].iloc[0]
    assert again["vapi_seed"].isna().all() and list(again.columns) == list(first.columns)


def test_a_packed_study_completes_on_another_machine_without_weights(smoke_parts, tmp_path, monkeypatch):
    """Pack the records of a unit on one artifact root, unpack them into an empty one: the unit is read whole,
    with its grid, and nothing is trained."""
    from rearlib.experiments.studies_transfer import pack, unpack

    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path / "gpu_box"))
    tok, clf, model = smoke_parts
    study = _study(tok, clf, model)
    made = study.unit((METHOD, 0))
    archive = tmp_path / "records.tar.gz"
    pack("smoke", archive, log=lambda *a: None)
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path / "cpu_box"))
    unpack(archive, log=lambda *a: None)
    with monkeypatch.context() as m:
        m.setattr(VAPIStudy, "post_train", lambda *a: pytest.fail("post-trained although every record exists"))
        there = study.unit((METHOD, 0))
    assert there.work == "records" and _fids(there) == _fids(made) and torch.equal(there.grid, made.grid)
    pd.testing.assert_frame_equal(there.result["history_df"], made.result["history_df"])


def test_unpack_refuses_a_grid_that_is_not_uint8_images(tmp_path, monkeypatch):
    import io
    import tarfile

    from rearlib.experiments.studies_transfer import unpack

    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path / "root"))
    for bad in (torch.zeros(2, 3, 4, 4), {"x": torch.zeros(1, dtype=torch.uint8)}):
        buf = io.BytesIO()
        torch.save(bad, buf)
        data = buf.getvalue()
        archive = tmp_path / "bad.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            ti = tarfile.TarInfo("vapi_grids/0123456789ab/grid.pt")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        with pytest.raises(ValueError, match="grid"):
            unpack(archive, log=lambda *a: None)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*.pt"))
