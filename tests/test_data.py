"""The embedded dataset is deterministic and well-formed; real-data loaders read their on-disk formats."""

import hashlib
import pickle

import numpy as np
import pytest
import torch

from rearlib import data
from rearlib.data import (CLASS_NAMES, NUM_CLASSES, DatasetUnavailable, EmbeddedDataset, load_dataset,
                          render_batch)


def _digest(images: torch.Tensor) -> str:
    return hashlib.sha256((images * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()


# Digests recorded once on CPU (torch 2.13). A change here means every cached tokenizer, token file and result
# built from the dataset is stale: bump the dataset version deliberately rather than updating these silently.
GOLDEN = {
    (32, 0, "train"): "b723ee260c6f509007a731df3b2c3b7c40746aca29b118d458983071a146e1bf",
    (64, 0, "train"): "52b40810897503dac9fb5ffaab5478b1e1977789388687e56e28adcccc34a7f4",
    (32, 7, "val"): "18f998ea42c370fc5223847881a7ce561007544f9183ecba30afe813e7e1dcc6",
}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_same_seed_same_bytes(key):
    res, seed, split = key
    images, _ = render_batch(torch.arange(8), res, seed=seed, split=split)
    assert _digest(images) == GOLDEN[key]


def test_shapes_ranges_and_labels():
    images, labels = render_batch(torch.arange(40), 32, seed=3)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(NUM_CLASSES))
    # every block of ten consecutive indices holds each class once
    for b in range(4):
        assert sorted(labels[b * 10:(b + 1) * 10].tolist()) == list(range(NUM_CLASSES))
    assert len(CLASS_NAMES) == NUM_CLASSES


def test_batch_composition_does_not_change_an_image():
    idx = torch.tensor([5, 17, 123, 4096])
    together, _ = render_batch(idx, 32)
    alone = torch.cat([render_batch(idx[i:i + 1], 32)[0] for i in range(4)])
    assert torch.equal(together, alone)
    shuffled, _ = render_batch(idx.flip(0), 32)
    assert torch.equal(shuffled.flip(0), together)


def test_seeds_and_splits_differ():
    a, _ = render_batch(torch.arange(4), 32, seed=0)
    b, _ = render_batch(torch.arange(4), 32, seed=1)
    c, _ = render_batch(torch.arange(4), 32, seed=0, split="val")
    assert (a - b).abs().mean() > 0.05 and (a - c).abs().mean() > 0.05


def test_structure_spans_many_tokens():
    """The object covers a large part of the image, so it spans many 4x4 token cells."""
    images, labels = render_batch(torch.arange(50), 64)
    # the object's coverage: pixels whose colour is saturated like the object's (backgrounds are desaturated)
    sat = images.max(dim=1).values - images.min(dim=1).values
    coverage = (sat > 0.35).float().mean(dim=(1, 2))
    assert coverage.median() > 0.08, coverage.median()
    cells = (sat > 0.35).float().unfold(1, 4, 4).unfold(2, 4, 4).amax(dim=(-1, -2)).sum(dim=(1, 2))
    assert cells.median() >= 20  # at least 20 of the 256 cells of a 16x16 token grid touch the object


def test_classes_are_distinguishable_by_shape():
    """A nearest-centroid classifier on object masks beats chance by far: the class lives in the shape."""
    images, labels = render_batch(torch.arange(400), 32)
    sat = images.max(dim=1).values - images.min(dim=1).values
    feats = (sat > 0.35).float().flatten(1)
    hue_free = torch.stack([feats[labels == c][:30].mean(0) for c in range(NUM_CLASSES)])
    test = feats[300:]
    pred = torch.cdist(test, hue_free).argmin(1)
    assert (pred == labels[300:]).float().mean() > 0.2  # chance is 0.1; placement and rotation make masks vary


def test_dataset_interface_and_errors():
    ds = EmbeddedDataset("val", size=20, resolution=32, seed=2)
    img, label = ds[3]
    assert img.shape == (3, 32, 32) and isinstance(label, int) and len(ds) == 20
    assert torch.equal(ds.batch(0, 4)[0][3], img)
    with pytest.raises(IndexError):
        ds[20]
    with pytest.raises(ValueError, match="allowed: train, val, test"):
        EmbeddedDataset("dev")
    with pytest.raises(ValueError, match="resolution"):
        render_batch(torch.arange(2), 4)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_render_matches_cpu():
    idx = torch.arange(32)
    cpu, lc = render_batch(idx, 64)
    gpu, lg = render_batch(idx, 64, device="cuda")
    assert torch.equal(lc, lg.cpu())
    assert (cpu - gpu.cpu()).abs().max() < 1e-3


# -- real data, in their real on-disk formats, made small and fake here -------------------------------------
def _write_fake_cifar(root, n=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return batch


def test_cifar10_reads_format_and_detects_corruption(tmp_path):
    last = _write_fake_cifar(tmp_path)
    # The fake files cannot match CIFAR-10's md5 sums: verification must say so and explain how to get it.
    with pytest.raises(DatasetUnavailable, match="md5"):
        load_dataset("cifar10", root=tmp_path)
    ds = data.load_cifar10(tmp_path, split="test", resolution=32, verify=False)
    img, label = ds[2]
    expected = torch.from_numpy(last["data"][2].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(img, expected) and label == 2


def test_missing_datasets_say_how_to_get_them(tmp_path):
    with pytest.raises(DatasetUnavailable, match="download=True"):
        load_dataset("cifar10", root=tmp_path / "nowhere")
    with pytest.raises(DatasetUnavailable, match="image-net.org"):
        load_dataset("imagenet", root=tmp_path)
    with pytest.raises(DatasetUnavailable, match="root/<class_name>"):
        load_dataset("imagefolder", root=tmp_path / "none")


def test_imagefolder_and_imagenet_adm_crop(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            d = tmp_path / split / wnid
            d.mkdir(parents=True)
            for k in range(2):
                arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{k}.JPEG", format="JPEG")
    with pytest.warns(UserWarning, match="not ImageNet-1k"):
        ds = load_dataset("imagenet", split="val", resolution=64, root=tmp_path)
    img, label = ds[3]
    assert img.shape == (3, 64, 64) and label == 1 and 0 <= img.min() and img.max() <= 1
    # ADM crop: a 300x400 image is halved once (300 >= 2*64 -> 150x200 ... -> 75x100), resized so the
    # short side is 64, then centre-cropped to 64x64.
    out = data.adm_center_crop(Image.new("RGB", (400, 300)), 64)
    assert out.size == (64, 64)
    folder = load_dataset("imagefolder", resolution=32, root=tmp_path / "train")
    assert len(folder) == 4 and folder.num_classes == 2


def test_bad_sizes_splits_and_resolutions_are_refused_with_the_parameter_named(tmp_path):
    from rearlib.data import load_dataset, load_imagefolder, load_imagenet

    with pytest.raises(ValueError, match="size must be a positive integer"):
        load_dataset("embedded", size=0)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        load_dataset("embedded", size=-1)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        load_dataset("embedded", resolution=0)
    assert len(load_dataset("embedded")) == 10_000
    (tmp_path / "val" / "n01").mkdir(parents=True)
    with pytest.raises(ValueError, match="unknown ImageNet split 'trian'"):
        load_imagenet(tmp_path, split="trian")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        load_imagefolder(tmp_path / "val", size=-1)


def test_an_unreadable_image_is_named_or_skipped(tmp_path):
    import warnings

    from PIL import Image

    from rearlib.data import UnreadableImage, load_imagefolder

    folder = tmp_path / "cls"
    folder.mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated
    Image.new("RGB", (40, 40), (0, 0, 255)).save(folder / "c.png")
    strict = load_imagefolder(tmp_path, resolution=16)
    assert strict[0][0].shape == (3, 16, 16)
    with pytest.raises(UnreadableImage, match=r"b\.png"):
        strict[1]
    lenient = load_imagefolder(tmp_path, resolution=16, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img, _ = lenient[1]
    assert any("b.png" in str(w.message) for w in caught)
    assert img[2].mean() > 0.9 and img[0].mean() < 0.1  # the blue image that follows took its place
