"""rearlib.experiments.evaluation: sample sets (padded fixed batches), labeled scores, recipe-keyed cached records,
the floors of FID and teacher-forced token metrics (CPU, smoke)."""

from __future__ import annotations

import json

import pytest
import torch

import rearlib.experiments.evaluation as E
from rearlib.data import render_batch
from rearlib.experiments.evaluation import (Evaluator, canonical_cfg, load_record, record_path, run_model_key,
                                            setting_label)
from rearlib.metrics.inception import KNOWN_SHA256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def records_root(tmp_path, monkeypatch):
    """Records (and torch-fidelity's reference cache) in a temporary artifact root."""
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path))
    return tmp_path


def test_cfg_labels_and_canonical_keys():
    assert canonical_cfg(None, 2.0) == (None, None) == canonical_cfg(1.0, 0.0)
    assert canonical_cfg(3, 2) == (3.0, 2.0)
    assert setting_label(None) == "no CFG" and setting_label(3.0, 2.0) == "CFG g=3.0 p=2.0"
    with pytest.raises(ValueError, match="cfg_power"):
        canonical_cfg(2.0, None)
    with pytest.raises(ValueError, match="cfg_power"):
        canonical_cfg(2.0, -1.0)
    assert run_model_key("abc", 30) == {"kind": "run", "run": "abc", "step": 30}
    with pytest.raises(ValueError):
        run_model_key("", 3)


def test_sample_set_classes_seeds_and_padding(smoke_parts):
    tok, clf, model = smoke_parts
    big = Evaluator("smoke", tok, clf, "cpu", batch=30, progress=False)   # 30 = one full batch
    small = Evaluator("smoke", tok, clf, "cpu", batch=7, progress=False)  # 30 = 4 x 7 + 2: the last batch padded
    a, la = big.sample_set(model, 3, None, None, sample_seed=5)
    b, lb = small.sample_set(model, 3, None, None, sample_seed=5)
    assert a.dtype == torch.uint8 and a.shape == (30, 3, tok.resolution, tok.resolution)
    assert torch.equal(la, torch.arange(30) // 3) and torch.equal(la, lb)
    # An image's tokens depend on its own seed only, not on its batch or the padding; the tokenizer's decoder
    # differs by float round-off between batch sizes, which may move a pixel by one uint8 step.
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999
    c, _ = big.sample_set(model, 3, None, None, sample_seed=6)
    assert (a.int() - c.int()).abs().max() > 1
    g, _ = big.sample_set(model, 3, 3.0, 2.0, sample_seed=5)
    assert (a.int() - g.int()).abs().max() > 1  # guidance changes the samples


def test_evaluate_caches_by_recipe_and_never_loads_on_a_hit(smoke_parts, records_root):
    tok, clf, model = smoke_parts
    ev = Evaluator("smoke", tok, clf, "cpu", n_ref=64, batch=20, progress=False, extractor="rearlib-classifier")
    calls = []

    def loader():
        calls.append(1)
        return model

    key = run_model_key("recipe0", 30)
    settings = dict(n_per_class=2, cfg_scale=None, cfg_power=0.0, sample_seed=0)
    assert not ev.has(key, **settings)
    first = ev.evaluate_record(key, loader, **settings)
    assert calls == [1] and first["cached"] is False
    row = first["row"]
    assert {"FID[rearlib-classifier]", "IS[rearlib-classifier]", "KID[rearlib-classifier]",
            "Precision[rearlib-classifier]", "Recall[rearlib-classifier]", "class consistency"} <= set(row)
    assert not any(k in row for k in ("FID", "fid", "IS"))  # never an unlabeled FID-like number
    assert row["n generated"] == 20 and row["n reference"] == 64
    assert first["provenance"]["device"] == "cpu" and first["provenance"]["generation s"] > 0

    second = ev.evaluate_record(key, loader, **settings)
    assert calls == [1] and second["cached"] is True and second["row"] == row
    assert ev.evaluate(key, loader, **settings) == row
    # g = 1 is no guidance: the same record
    assert ev.evaluate(key, loader, **{**settings, "cfg_scale": 1.0}) == row and calls == [1]
    # the record lives under eval_records/<hash of the key>/ with the key beside it
    path = record_path(ev.key(key, **settings))
    assert path.is_file() and path.parent.parent.name == E.RECORD_KIND
    assert json.loads((path.parent / "config.json").read_text())["model"] == key
    # another sampling seed or another recipe is another record (the loader runs again)
    ev.evaluate(key, loader, **{**settings, "sample_seed": 1})
    ev.evaluate(run_model_key("recipe1", 30), loader, **settings)
    assert calls == [1, 1, 1]
    assert len(list(E.iter_records(scale="smoke"))) == 3 and not list(E.iter_records(scale="small"))


def test_records_do_not_depend_on_the_loading_model_or_device_key(smoke_parts, records_root):
    tok, clf, model = smoke_parts
    ev = Evaluator("smoke", tok, clf, "cpu", n_ref=64, batch=20, progress=False, extractor="rearlib-classifier")
    key = ev.key(run_model_key("r", 1), n_per_class=2)
    assert "device" not in json.dumps(key) and key["sampler"] == "default" and key["scale"] == "smoke"
    assert key["tokenizer"] == tok.identity() and key["classifier"] == clf.identity
    assert load_record(key) is None


def test_fixed_image_sets_are_cached(smoke_parts, records_root):
    tok, clf, _ = smoke_parts
    ev = Evaluator("smoke", tok, clf, "cpu", n_ref=64, batch=20, progress=False, extractor="rearlib-classifier")
    calls = []

    def make():
        calls.append(1)
        return render_batch(torch.arange(20), tok.resolution, seed=0, split="train")

    a = ev.evaluate_images({"kind": "real", "split": "train"}, make, 20)
    b = ev.evaluate_images({"kind": "real", "split": "train"}, make, 20)
    assert a == b and calls == [1] and a["n generated"] == 20
    with pytest.raises(ValueError, match="expected 19"):
        ev.evaluate_images({"kind": "real", "split": "train", "other": 1}, make, 19)


def test_default_extractor_is_the_inception_fid_network(smoke_parts, records_root):
    """Without an extractor named, FID / KID / precision / recall come from the Inception-v3 FID network, carry
    their plain names, and the extractor's identity is in the key; IS, which the network cannot give (no logits),
    is the classifier's, labeled, and equals what the classifier's evaluator reports on the same images."""
    tok, clf, model = smoke_parts
    ev = Evaluator("smoke", tok, clf, "cpu", n_ref=16, batch=20, progress=False)
    classifier_ev = Evaluator("smoke", tok, clf, "cpu", n_ref=16, batch=20, progress=False,
                              extractor="rearlib-classifier")
    key = ev.key(run_model_key("r", 1), n_per_class=2)
    assert key["extractor"] == {"name": "inception-v3-fid", "id": f"sha256-{KNOWN_SHA256[:12]}"}
    assert "extractor" not in classifier_ev.key(run_model_key("r", 1), n_per_class=2)
    row = ev.evaluate(run_model_key("r", 1), model, n_per_class=2)
    assert {"FID", "KID", "Precision", "Recall", "class consistency"} <= set(row)
    assert [k for k in row if "rearlib-classifier" in k or k.startswith("IS")] == ["IS[rearlib-classifier]"]
    assert row["FID"] > 0 and row["n generated"] == 20 and row["n reference"] == 16
    by_classifier = classifier_ev.evaluate(run_model_key("r", 1), model, n_per_class=2)
    assert row["IS[rearlib-classifier]"] == pytest.approx(by_classifier["IS[rearlib-classifier]"], rel=1e-6)


def test_a_secondary_extractor_adds_its_labeled_metrics(smoke_parts, records_root):
    """With the classifier as secondary extractor, an Inception-scored row also holds the classifier's FID / IS /
    KID / precision / recall, equal to the classifier evaluator's on the same images; the key says so, and records
    made without a secondary keep their key."""
    tok, clf, model = smoke_parts
    ev = Evaluator("smoke", tok, clf, "cpu", n_ref=16, batch=20, progress=False,
                   secondary_extractor="rearlib-classifier")
    plain = Evaluator("smoke", tok, clf, "cpu", n_ref=16, batch=20, progress=False)
    by_classifier = Evaluator("smoke", tok, clf, "cpu", n_ref=16, batch=20, progress=False,
                              extractor="rearlib-classifier")
    mk = run_model_key("r", 1)
    assert ev.key(mk, n_per_class=2)["secondary_extractor"] == "rearlib-classifier"
    assert "secondary_extractor" not in plain.key(mk, n_per_class=2)
    row = ev.evaluate(mk, model, n_per_class=2)
    ref = by_classifier.evaluate(mk, model, n_per_class=2)
    assert row["FID"] == pytest.approx(plain.evaluate(mk, model, n_per_class=2)["FID"], rel=1e-6)
    for col in ("FID", "IS", "KID", "Precision", "Recall"):
        assert row[f"{col}[rearlib-classifier]"] == pytest.approx(ref[f"{col}[rearlib-classifier]"], rel=1e-6), col
    with pytest.raises(ValueError, match="secondary_extractor"):
        Evaluator("smoke", tok, clf, "cpu", extractor="rearlib-classifier", secondary_extractor="rearlib-classifier")


def test_bad_inputs(smoke_parts):
    tok, clf, model = smoke_parts
    with pytest.raises(ValueError, match="smoke, small"):
        Evaluator("paper", tok, clf, "cpu")
    ev = Evaluator("smoke", tok, clf, "cpu", progress=False)
    with pytest.raises(ValueError, match="model_key"):
        ev.key({}, n_per_class=2)
    with pytest.raises(ValueError, match="n_per_class"):
        ev.sample_set(model, 0, None, None, 0)
    with pytest.raises(ValueError, match="subject"):
        ev.floor_key({}, 10)
    with pytest.raises(ValueError, match="n_ref"):
        Evaluator("smoke", tok, clf, "cpu", n_ref=1)


def test_training_image_floors_are_cached_under_the_subject_the_studies_use(smoke_parts, records_root):
    tok, clf, _ = smoke_parts
    ev = Evaluator("smoke", tok, clf, "cpu", n_ref=64, batch=20, progress=False, extractor="rearlib-classifier")
    subject = ev.training_images_subject()
    assert subject == {"kind": "real", "dataset": "ShapeScenes-10", "split": "train", "seed": 0,
                       "resolution": tok.resolution}
    real = ev.evaluate_training_images(20)
    assert load_record(ev.floor_key(subject, 20))["row"] == real and real["n generated"] == 20
    recon = ev.evaluate_training_images(20, "tokenizer reconstruction")
    assert load_record(ev.floor_key(ev.training_images_subject("tokenizer reconstruction"), 20))["row"] == recon
    assert recon["FID[rearlib-classifier]"] != real["FID[rearlib-classifier]"]
    with pytest.raises(ValueError, match="kind"):
        ev.training_images_subject("fake")
    tokens, labels = ev.training_tokens(6)
    assert tokens.shape == (6, tok.num_tokens) and tokens.device.type == "cpu" and labels.tolist() == [
        int(x) for x in ev.training_images(6)[1]]


def test_teacher_forced_metrics_match_a_direct_computation(smoke_parts):
    tok, _, model = smoke_parts
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, tok.codebook_size, (7, tok.num_tokens), generator=g)
    labels = torch.arange(7) % 10
    out = E.teacher_forced_metrics(model, tokens, labels, batch=3)  # 3 + 3 + 1: batches do not matter
    with torch.no_grad():
        logits = model(tokens, labels).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    assert out["n sequences"] == 7 and out["ce_by_position"].shape == (tok.num_tokens,)
    assert out["CE (nats/token)"] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert out["perplexity"] == pytest.approx(float(torch.exp(ce.mean())), rel=1e-5)
    assert out["CTR"] == pytest.approx(float((logits.argmax(-1) == tokens).float().mean()))


def test_samples_per_class_shrink_to_fit_the_budget():
    assert E.samples_per_class_within(30.0, 8, 4, 1.0) == 8          # 8 s of 30: the target
    assert E.samples_per_class_within(30.0, 100, 4, 1.0) == 30       # as many as fit, a multiple of 10
    assert E.samples_per_class_within(30.0, 100, 4, 0.7) == 40       # 42.8 -> 40
    assert E.samples_per_class_within(30.0, 100, 50, 1.0) == 50      # never below the minimum


def test_a_damaged_record_counts_as_missing_and_is_evaluated_again(records_root, tmp_path):
    key = {"scale": "smoke", "subject": "damaged-record-test"}
    E.save_record(key, {"fid": 1.0}, {"where": "here"}, root=records_root)
    path = record_path(key, records_root)
    path.write_text(path.read_text()[:20])
    with pytest.warns(UserWarning, match=r"record\.json .*not valid JSON.*evaluating again"):
        assert load_record(key, records_root) is None
    E.save_record(key, {"fid": 2.0}, {"where": "here"}, root=records_root)
    assert load_record(key, records_root)["row"] == {"fid": 2.0}
