"""Tests of rearlib.metrics.classifier: the in-project classifier, its checkpoints and CLI, its torch-fidelity
registration, and class consistency. The smoke classifier is trained once (seconds on CPU) and cached under
artifacts/ like any other smoke artifact."""

import json

import pytest
import torch

from rearlib import scales
import rearlib.metrics.classifier as Fe
from rearlib.data import NUM_CLASSES, render_batch
from rearlib.runtime import UnreadableFileError


@pytest.fixture(scope="module")
def smoke_classifier():
    return Fe.get_classifier("smoke", "cpu")


@pytest.fixture(scope="module")
def val_batch():
    return render_batch(torch.arange(300), 32, seed=0, split="val")


def test_classifier_shapes_and_input_checks():
    torch.manual_seed(0)
    m = Fe.Classifier((8, 16, 32), num_classes=NUM_CLASSES, resolution=32, stem_stride=2).eval()
    x = torch.rand(5, 3, 32, 32)
    feats = m.layer_features(x)
    assert len(feats) == 1 + 3
    assert [f.shape[1] for f in feats] == [8, 8, 16, 32]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    pool, logits = m.pool_and_logits(x)
    assert pool.shape == (5, 32) and logits.shape == (5, NUM_CLASSES)
    # any input size is resized to the classifier's resolution (exact for constant images)
    flat = torch.rand(5, 3, 1, 1)
    assert torch.allclose(m(flat.expand(5, 3, 64, 64)), m(flat.expand(5, 3, 32, 32)), atol=1e-5)
    assert torch.allclose(m(flat.expand(5, 3, 20, 20)), m(flat.expand(5, 3, 32, 32)), atol=1e-5)
    with pytest.raises(ValueError, match="float"):
        m((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(x[:, :2])


def test_checkpoint_roundtrip_and_strict_loading(tmp_path):
    torch.manual_seed(1)
    m = Fe.Classifier((8, 16), 10, 32, 2).eval()
    path = Fe.save_classifier(m, tmp_path / "c.pt", {"val_accuracy": 0.5})
    loaded = Fe.load_classifier(path)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded(x), m(x))
    assert loaded.identity == m.identity and len(loaded.identity) == 12
    assert loaded.metrics["val_accuracy"] == 0.5 and loaded.checkpoint_path == path
    # the identity follows the weights
    with torch.no_grad():
        m.head.bias += 1
    Fe.save_classifier(m, tmp_path / "c2.pt")
    assert Fe.load_classifier(tmp_path / "c2.pt").identity != loaded.identity
    # shape mismatch and foreign files are refused with a message
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.weight"] = torch.zeros(3, 16)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="head.weight"):
        Fe.load_classifier(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a rearlib classifier"):
        Fe.load_classifier(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        Fe.load_classifier(tmp_path / "missing.pt")


def test_damaged_classifier_checkpoints_are_named_with_what_to_do(tmp_path):
    torch.manual_seed(1)
    path = Fe.save_classifier(Fe.Classifier((8, 16), 10, 32, 2).eval(), tmp_path / "c.pt")
    data = path.read_bytes()
    g = torch.Generator().manual_seed(0)
    for name, content in (("empty.pt", b""), ("truncated.pt", data[:len(data) // 2]),
                          ("random.pt", bytes(torch.randint(0, 256, (4096,), generator=g).tolist()))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UnreadableFileError, match=rf"{name}[\s\S]*classifier train"):
            Fe.load_classifier(tmp_path / name)


def test_smoke_classifier_learns_and_is_cached(smoke_classifier, val_batch):
    x, y = val_batch
    acc = (smoke_classifier(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.1
    assert smoke_classifier.metrics["val_accuracy"] > 0.6
    assert smoke_classifier.checkpoint_path.stat().st_size < 16 * 2**20
    again = Fe.get_classifier("smoke", "cpu")
    assert again.identity == smoke_classifier.identity  # loaded from the artifact cache, not retrained


def test_class_consistency(smoke_classifier, val_batch):
    x, y = val_batch
    right = Fe.class_consistency(x, y, smoke_classifier)
    wrong = Fe.class_consistency(x, (y + 1) % NUM_CLASSES, smoke_classifier)
    assert right["n"] == 300 and right["classifier"].endswith(smoke_classifier.identity)
    assert right["class_consistency"] > 0.6 > 0.3 > wrong["class_consistency"]
    assert set(right["per_class"]) == set(range(NUM_CLASSES))
    with pytest.raises(ValueError, match="labels must lie"):
        Fe.class_consistency(x[:2], torch.tensor([0, NUM_CLASSES]), smoke_classifier)
    with pytest.raises(ValueError, match="must match"):
        Fe.class_consistency(x[:3], y[:2], smoke_classifier)


def test_torch_fidelity_registration(smoke_classifier, val_batch):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    assert Fe.register_with_torch_fidelity() == "rearlib-classifier"
    assert Fe.register_with_torch_fidelity() == "rearlib-classifier"  # idempotent
    cls = FEATURE_EXTRACTORS_REGISTRY["rearlib-classifier"]
    assert cls.get_default_feature_layer_for_metric("fid") == "pool"
    assert cls.get_default_feature_layer_for_metric("isc") == "logits"
    fe = create_feature_extractor("rearlib-classifier", ["logits", "pool"], cuda=False, verbose=False,
                                  feature_extractor_weights_path=str(smoke_classifier.checkpoint_path))
    x = val_batch[0][:7]
    u8 = (x * 255).round().to(torch.uint8)
    logits, pool = fe(u8)  # in the requested order
    with torch.no_grad():
        want_pool, want_logits = smoke_classifier.pool_and_logits(u8.float() / 255)
    assert torch.allclose(pool, want_pool) and torch.allclose(logits, want_logits)
    with pytest.raises(ValueError, match="uint8"):
        fe(x)
    with pytest.raises(ValueError, match="feature_extractor_weights_path"):
        create_feature_extractor("rearlib-classifier", ["pool"], cuda=False, verbose=False)


def test_small_config_code_path_on_cpu():
    """The small-scale recipe (64 px, four stages), here with a second render resolution mixed in to cover that
    code path, runs end to end at tiny sizes."""
    cfg = Fe.scale_config("small")
    cfg.update(train_size=64, val_size=32, epochs=1, batch_size=32, train_resolutions=[32, 64])
    model, info = Fe.train_classifier("small", "cpu", progress=False, cfg=cfg)
    assert model.resolution == 64 and len(model.stages) == 4
    assert set(info["val_accuracy_by_resolution"]) == {"32", "64"}
    assert info["steps"] == 2 and info["gpu"] is None and 0 <= info["val_accuracy"] <= 1


def test_cli_train_writes_checkpoint_and_report(tmp_path, monkeypatch, capsys):
    tiny = dict(scales.CLASSIFIER["smoke"], train_size=128, val_size=64, epochs=1, batch_size=64)
    monkeypatch.setitem(scales.CLASSIFIER, "smoke", tiny)
    out = tmp_path / "classifier_smoke.pt"
    assert Fe.main(["train", "--scale", "smoke", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "val accuracy" in printed and "wall time" in printed and "gpu None" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps"] == 2 and report["config"]["train_size"] == 128
    assert report["identity"] == Fe.load_classifier(out).identity
    assert report["size_mib"] < 16


def test_paper_scale_and_missing_small_checkpoint_are_explained(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="inception"):
        Fe.scale_config("paper")
    with pytest.raises(ValueError, match="unknown scale"):
        Fe.scale_config("huge")
    monkeypatch.setattr(Fe, "REPO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m rearlib classifier train --scale small"):
        Fe.get_classifier("small")
