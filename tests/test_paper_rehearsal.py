"""The paper path on stand-in assets: the released layouts, the Table 1 pieces, and a tiny end-to-end rehearsal
through the runner (the CPU twin of the GPU rehearsal in reports/paper_rehearsal/)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import rearlib.experiments.standins as SI
import rearlib.experiments.table1 as T1
from rearlib.experiments.rehearsal import project, rehearse
from rearlib.model import load_official_state_dict
from rearlib.tokenizers.maskgit_vqgan import load_maskgit_vqgan

REFERENCE = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "reference",
                              Path("/work/shared/reference")) if p.is_dir()), None)


@pytest.mark.skipif(REFERENCE is None, reason="the authors' layout files (shared/reference) are not here")
@pytest.mark.parametrize("preset", SI.PAPER_PRESETS)
def test_standin_generators_have_the_released_layout(preset):
    layout = json.loads((REFERENCE / f"official_{preset}_state_dict.json").read_text())["state_dict"]
    shapes = {k: list(v) for k, v in SI._generator_shapes(preset, "paper").items()}
    assert shapes == {k: list(v) for k, v in layout.items()}


@pytest.mark.skipif(REFERENCE is None, reason="the authors' layout files (shared/reference) are not here")
def test_standin_maskgit_has_the_released_layout():
    layout = json.loads((REFERENCE / "official_maskgit_vqgan_state_dict.json").read_text())["state_dict"]
    assert {k: list(v) for k, v in SI._maskgit_shapes("paper").items()} == {k: list(v) for k, v in layout.items()}


def test_tiny_standins_load_strictly_through_the_paper_loaders(tmp_path):
    gen = SI.write_generator(tmp_path / "g.bin", "rear_s", "tiny", seed=3)
    sd = torch.load(gen, weights_only=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no alignment heads: nothing to guess, so no warning
        model = load_official_state_dict(gen, None)
    assert (model.config.hidden, model.config.depth, model.config.seq_len, model.config.codebook_size,
            model.config.num_classes) == (64, 4, 256, 1024, 1000)
    tok = load_maskgit_vqgan(SI.write_maskgit(tmp_path / "m.bin", "tiny"), {"resolution": 256})
    codes = tok.encode(torch.rand(2, 3, 256, 256)).reshape(2, -1)
    assert codes.shape == (2, 256) and int(codes.max()) < 1024
    assert len(set(codes.flatten().tolist())) > 4  # the random codebook is actually used


def test_table1_guidance_verdicts_and_torchrun_command():
    assert T1.guidance("rear_b") == (15.0, 2.5) and T1.guidance("rear_b", "paper") == (14.5, 2.25)
    with pytest.raises(ValueError, match="cfg_settings"):
        T1.guidance("rear_b", "appendix")
    assert T1.fid_verdict(1.95, 1.91, 50_000)[0] == "reproduced"
    assert T1.fid_verdict(2.30, 1.91, 50_000)[0] == "not reproduced"
    verdict, note = T1.fid_verdict(1.91, 1.91, 10_000)
    assert verdict == "not tested" and "50,000" in note
    cmd = T1.torchrun_command(Path("ck.bin"), "rear_l", Path("out"), gpus=4, scale="paper", num_per_class=50,
                              seed=1, batch_size=125, cfg_scale=15.0, cfg_power=2.5)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=4" in cmd
    assert cmd[cmd.index("--preset") + 1] == "rear_l" and cmd[cmd.index("--cfg-power") + 1] == "2.5"
    with pytest.raises(ValueError, match="gpus"):
        T1.sample_model(None, None, "x", num_per_class=1, seed=0, batch_size=1, cfg_scale=1.0, cfg_power=0.0,
                        gpus=0)


def test_projection_scales_the_count_to_the_full_run():
    row = {"notebook": "05_exposure_bias", "status": "ok", "params": {"n_images": 8}, "notebook_time_s": 40.0,
           "wall_time_s": 50.0}
    assert project(row) == pytest.approx(40.0 * 1000 / 8)
    assert project({**row, "status": "failed"}) is None and project({**row, "notebook": "15_table1"}) is None


def test_tiny_rehearsal_runs_the_paper_notebooks_through_the_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path / "artifacts"))
    res = rehearse(tmp_path / "reh", size="tiny", device="cpu", notebooks=["05", "15", "10"], progress=False)
    rows = {r["notebook"]: r for r in res["notebooks"]}
    assert rows["05_exposure_bias"]["status"] == "ok", rows["05_exposure_bias"].get("error")
    assert rows["15_table1"]["status"] == "ok", rows["15_table1"].get("error")
    assert rows["10_main_comparison"]["status"] == "skipped (smoke/small only)"
    record = json.loads(Path(res["record"]).read_text())
    assert "STAND-IN" in record["meaning"] and "no scientific meaning" in record["meaning"]
    assert rows["05_exposure_bias"]["peak_host_memory_gib"] > 0
    assert rows["05_exposure_bias"]["projected_full_s"] is None  # tiny shapes: nothing to project
    (t1,) = record["table1"]
    assert t1["model"] == "rear_s" and t1["samples"] == 4 and t1["images_per_s"] > 0  # sampled afresh
    assert t1["projected_50k_sampling_min"] is None
    table = pd.read_csv(tmp_path / "reh" / "reports" / "paper" / "15_table1.csv")
    assert np.isfinite(table["FID"]).all() and table["FID reference"].str.contains("mu/sigma").all()
    with np.load(tmp_path / "reh" / "table1_samples" / "rear_s" / "samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (4, 256, 256, 3)  # ADM layout
        assert z["arr_1"].tolist() == [0, 1, 2, 3]
    claims = json.loads((tmp_path / "reh" / "reports" / "paper" / "claims" / "15_table1.json").read_text())
    assert [c["verdict"] for c in claims["claims"]] == ["not tested"]  # 4 samples are never compared
    assert "Stand-in assets" in (tmp_path / "reh" / "README.md").read_text()
    # a rehearsal in several calls: a later call with --only keeps the rows it did not run
    again = rehearse(tmp_path / "reh", size="tiny", device="cpu", notebooks=["10"], progress=False)
    kept = {r["notebook"]: r for r in again["notebooks"]}
    assert kept["05_exposure_bias"] == rows["05_exposure_bias"] and kept["15_table1"]["status"] == "ok"
    assert json.loads(Path(again["record"]).read_text())["table1"][0]["samples"] == 4
    # ...but not those of another device
    other = rehearse(tmp_path / "reh", size="tiny", device="cpu:0", notebooks=["10"], progress=False)
    assert {r["notebook"] for r in other["notebooks"]}.isdisjoint({"05_exposure_bias", "15_table1"})
    assert {r["status"] for r in other["notebooks"]} == {"skipped (smoke/small only)"}  # the runner's skips, always
