"""Per-scale asset loading shared by the diagnosis notebooks."""

import pytest
import torch

import rearlib.experiments.assets as assets


def test_paper_assets_check_names_every_missing_input(tmp_path, monkeypatch):
    monkeypatch.delenv("REARLIB_DATA", raising=False)
    monkeypatch.delenv("REARLIB_MASKGIT_VQGAN", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        assets.check_paper_assets({"ar_checkpoint": None, "rear_checkpoint": str(tmp_path / "x.bin")},
                                  maskgit_path=str(tmp_path / "none.bin"), data_root=str(tmp_path),
                                  splits=("train", "val"))
    msg = str(err.value)
    assert "ar_checkpoint=None" in msg and "rear_checkpoint=" in msg
    assert "train/<wnid>" in msg and "val/<wnid>" in msg


def test_imagenet_root_falls_back_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REARLIB_DATA", str(tmp_path))
    assert assets.imagenet_root() == tmp_path / "imagenet"
    assert str(assets.imagenet_root("/data/in1k")) == "/data/in1k"


def test_smoke_images_match_the_embedded_dataset():
    class Tok:  # only the resolution is read on this path
        resolution = 32

    x, y, desc = assets.load_images("smoke", Tok(), "val", 4, "cpu")
    from rearlib.data import render_batch

    ref, ref_y = render_batch(torch.arange(4), 32, seed=0, split="val")
    assert torch.equal(x, ref) and torch.equal(y, ref_y) and "ShapeScenes-10 val" in desc


def test_train_tokens_refuse_more_images_than_the_generators_saw():
    class Tok:
        resolution = 32

    with pytest.raises(ValueError, match="exceeds"):
        assets.load_tokens("smoke", Tok(), "train", 10**6, "cpu")


def test_analysis_assets_check_the_paper_inputs_before_loading_anything(tmp_path, monkeypatch):
    import rearlib.tokenizers

    monkeypatch.delenv("REARLIB_DATA", raising=False)
    monkeypatch.delenv("REARLIB_MASKGIT_VQGAN", raising=False)

    def no_load(*a, **k):
        raise AssertionError("the tokenizer was loaded before the inputs were checked")

    monkeypatch.setattr(rearlib.tokenizers, "get_tokenizer", no_load)
    with pytest.raises(FileNotFoundError) as err:
        assets.AnalysisAssets("paper", "cpu", variants=("ar",), checkpoints={"ar": None, "rear": None},
                              maskgit_path=str(tmp_path / "none.bin"), data_root=str(tmp_path))
    msg = str(err.value)
    assert "ar_checkpoint=None" in msg and "rear_checkpoint" not in msg  # only the variants the notebook runs
    assert "val/<wnid>" in msg


def test_analysis_assets_load_what_the_functions_load(monkeypatch):
    import rearlib.tokenizers

    class Tok:
        resolution = 32

    monkeypatch.setattr(rearlib.tokenizers, "get_tokenizer", lambda *a, **k: Tok())
    a = assets.AnalysisAssets("smoke", "cpu")
    x, y, desc = a.images("val", 3)
    ref_x, ref_y, ref_desc = assets.load_images("smoke", Tok(), "val", 3, "cpu")
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y) and desc == ref_desc
    with pytest.raises(ValueError, match="exceeds"):
        a.tokens("train", 10**6)
