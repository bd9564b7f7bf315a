"""Tests of rearlib.metrics: hand-made token examples, agreement with scikit-image / lpips / torch-fidelity,
offline LPIPS detection, FID sanity, and CKA properties. Fast (CPU, no network, no trained models needed)."""

import math
import socket

import numpy as np
import pytest
import torch

import rearlib.metrics as M
from rearlib.metrics.classifier import Classifier, save_classifier


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or download a file fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache: no LPIPS backbone, no Inception weights."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


@pytest.fixture(scope="module")
def images():
    """Deterministic, structured float images in [0, 1] (smooth gradients plus blobs), 64 of 32x32."""
    g = torch.Generator().manual_seed(0)
    n, r = 64, 32
    yy, xx = torch.meshgrid(torch.linspace(0, 1, r), torch.linspace(0, 1, r), indexing="ij")
    base = torch.rand(n, 3, 1, 1, generator=g)
    slope = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    cx, cy = torch.rand(n, 1, 1, generator=g), torch.rand(n, 1, 1, generator=g)
    blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02).unsqueeze(1)
    img = base * 0.6 + slope * (xx + yy) * 0.5 + 0.4 * blob * torch.rand(n, 3, 1, 1, generator=g)
    return img.clamp(0, 1)


@pytest.fixture(scope="module")
def random_extractor(tmp_path_factory):
    """A fixed random-init classifier saved as a checkpoint: a fast, deterministic feature extractor."""
    torch.manual_seed(123)
    model = Classifier((16, 32, 64), num_classes=10, resolution=32, stem_stride=2).eval()
    path = tmp_path_factory.mktemp("extractor") / "random_classifier.pt"
    save_classifier(model, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# token metrics
# ----------------------------------------------------------------------------------------------------------
def test_ctr_hand_made():
    pred = torch.tensor([[1, 2, 3, 4], [5, 5, 5, 5], [0, 9, 0, 9]])
    true = torch.tensor([[1, 2, 0, 0], [5, 5, 5, 5], [9, 0, 9, 0]])
    assert M.correct_token_ratio(pred, true).tolist() == [0.5, 1.0, 0.0]
    assert M.correct_token_ratio(pred, true, reduction="mean").item() == pytest.approx(0.5)
    # a token grid [B, h, w] is flattened row-major; a single sequence [N] becomes [1, N]
    assert M.correct_token_ratio(pred.view(3, 2, 2), true.view(3, 2, 2)).tolist() == [0.5, 1.0, 0.0]
    assert M.correct_token_ratio(pred[0], true[0]).tolist() == [0.5]
    with pytest.raises(ValueError, match="same shape"):
        M.correct_token_ratio(pred, true[:, :3])
    with pytest.raises(TypeError):
        M.correct_token_ratio(pred.float(), true)


def _logits_with_probs(probs_of_token: torch.Tensor, tokens: torch.Tensor, K: int) -> torch.Tensor:
    """Logits [B, N, K] giving `tokens` exactly probability `probs_of_token`, the rest spread uniformly."""
    B, N = tokens.shape
    probs_of_token = probs_of_token.double()
    p = ((1 - probs_of_token) / (K - 1)).unsqueeze(-1).expand(B, N, K).clone()
    p.scatter_(-1, tokens.unsqueeze(-1), probs_of_token.unsqueeze(-1))
    return p.log()


def test_perplexity_hand_made():
    K = 8
    tokens = torch.tensor([[1, 3, 5, 7], [0, 0, 0, 0]])
    uniform = torch.zeros(2, 4, K)
    assert torch.allclose(M.sequence_perplexity(uniform, tokens), torch.full((2,), float(K), dtype=torch.float64))
    probs = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.25, 0.5, 0.25]])
    ppl = M.sequence_perplexity(_logits_with_probs(probs, tokens, K), tokens)
    assert ppl[0].item() == pytest.approx(2.0, rel=1e-9)
    assert ppl[1].item() == pytest.approx(2 ** 1.5, rel=1e-9)  # exp(-(2 ln .5 + 2 ln .25)/4)
    assert M.sequence_perplexity(_logits_with_probs(probs, tokens, K), tokens, "mean").item() == pytest.approx(
        (2 + 2 ** 1.5) / 2)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        M.sequence_perplexity(uniform, tokens + 4)
    with pytest.raises(ValueError, match="logits must be"):
        M.sequence_perplexity(uniform[:, :3], tokens)


def test_context_perplexities_distinguish_evaluated_and_ground_truth():
    K = 16
    evaluated = torch.tensor([[2, 4, 6, 8, 10]])
    truth = torch.tensor([[2, 5, 6, 9, 11]])
    # Under the evaluated context the model puts 0.5 on the evaluated token and 0.1 on the true one
    # (where they differ); where they agree the true token is the evaluated one.
    p = torch.full((1, 5, K), 0.4 / (K - 2))
    p[0, torch.arange(5), evaluated[0]] = 0.5
    differ = evaluated[0] != truth[0]
    p[0, torch.arange(5)[differ], truth[0][differ]] = 0.1
    p = p / p.sum(-1, keepdim=True)
    out = M.context_perplexities(p.log(), evaluated, truth)
    pe = p[0, torch.arange(5), evaluated[0]].double()
    pt = p[0, torch.arange(5), truth[0]].double()
    assert out["evaluated"].item() == pytest.approx(math.exp(-pe.log().mean().item()))
    assert out["ground_truth"].item() == pytest.approx(math.exp(-pt.log().mean().item()))
    assert out["ground_truth"].item() > out["evaluated"].item()


def test_embedding_similarity_hand_made():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-2.0, 0.0]])
    pred = torch.tensor([[0, 1, 2, 2], [3, 1, 2, 0]])
    true = torch.tensor([[0, 0, 0, 1], [3, 1, 2, 0]])  # second row: all correct
    r = 1 / math.sqrt(2)
    wrong = M.embedding_similarity(pred, true, codebook, over="wrong")
    assert wrong[0].item() == pytest.approx((0 + r + r) / 3)
    assert math.isnan(wrong[1].item())  # no wrong position: undefined
    allpos = M.embedding_similarity(pred, true, codebook, over="all")
    assert allpos.tolist() == pytest.approx([(1 + 0 + r + r) / 4, 1.0])
    # documented identity: all = CTR + (1 - CTR) * wrong
    ctr = M.correct_token_ratio(pred, true)
    assert allpos[0].item() == pytest.approx(ctr[0].item() + (1 - ctr[0].item()) * wrong[0].item())
    # mean skips the undefined sequence; opposite vectors give -1
    assert M.embedding_similarity(pred, true, codebook, reduction="mean").item() == pytest.approx((2 * r) / 3)
    assert M.embedding_similarity(torch.tensor([[3]]), torch.tensor([[0]]), codebook).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        M.embedding_similarity(pred + 1, true, codebook)
    with pytest.raises(ValueError, match="over"):
        M.embedding_similarity(pred, true, codebook, over="some")


# ----------------------------------------------------------------------------------------------------------
# PSNR / SSIM
# ----------------------------------------------------------------------------------------------------------
def test_psnr_ssim_equal_direct_scikit_image(images):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = images[:6]
    b = (a + 0.08 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ua = (a * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ub = (b * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    want_psnr = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(ua, ub)]
    want_ssim = [structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(ua, ub)]
    assert M.psnr(a, b).tolist() == want_psnr
    assert M.ssim(a, b).tolist() == want_ssim
    # an independent check of the PSNR formula on the quantised images
    mse = ((ua.astype(np.float64) - ub.astype(np.float64)) ** 2).reshape(6, -1).mean(1)
    assert np.allclose(M.psnr(a, b).numpy(), 10 * np.log10(255.0 ** 2 / mse))
    assert torch.isinf(M.psnr(a, a)).all() and torch.allclose(M.ssim(a, a), torch.ones(6, dtype=torch.float64))


def test_image_metric_input_checks(images):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.psnr(images * 2 - 1, images)
    with pytest.raises(TypeError, match="float"):
        M.ssim((images * 255).to(torch.uint8), images)
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(images[:2], images[:3])
    with pytest.raises(ValueError, match="7x7"):
        M.ssim(images[:1, :, :5, :5], images[:1, :, :5, :5])


# ----------------------------------------------------------------------------------------------------------
# Perceptual metrics: LPIPS when its trunk is cached, else ST-LPIPS (weights in the stlpips-pytorch wheel)
# ----------------------------------------------------------------------------------------------------------
def test_lpips_unavailable_offline_gives_st_lpips(images, empty_hub, no_network, random_extractor):
    st = M.lpips_status("vgg")
    assert not st["available"] and "vgg16" in st["reason"] and str(empty_hub) in st["backbone_file"]
    assert M.perceptual_metric_name("auto")[0] == "ST-LPIPS(alex)"
    assert M.perceptual_metric_name("lpips-vgg")[0] == "ST-LPIPS(alex)"
    values, metric = M.perceptual_distance(images[:4], images[4:8])  # "auto": no warning, it is the default
    assert metric == "ST-LPIPS(alex)" and values.shape == (4,) and (values > 0).all()
    M._warned.clear()
    with pytest.warns(UserWarning, match="not LPIPS"):
        _, metric = M.perceptual_distance(images[:4], images[4:8], prefer="lpips-vgg")
    assert metric == "ST-LPIPS(alex)"
    with pytest.raises(M.LPIPSUnavailable, match="vgg16"):
        M.perceptual_distance(images[:4], images[4:8], prefer="lpips-vgg", allow_substitute=False)
    with pytest.raises(M.LPIPSUnavailable):
        M.load_lpips("alex")
    with pytest.raises(ValueError, match="perceptual metric must be one of"):
        M.perceptual_distance(images[:1], images[:1], prefer="lpips-resnet")
    # the classifier distance only when asked for by name
    clf = Classifier((16, 32, 64), 10, 32, 2)
    clf.load_state_dict(torch.load(random_extractor, weights_only=True)["state_dict"])
    values, metric = M.perceptual_distance(images[:4], images[4:8], prefer="dfd", classifier=clf.eval())
    assert metric == M.DFD_NAME


@pytest.mark.parametrize("net", M.ST_LPIPS_NETS)
def test_st_lpips_is_a_distance_that_grows_with_damage(images, net, no_network):
    """ST-LPIPS from the packaged networks: zero on identical images, symmetric, and monotone in pixel noise and
    blur on structured images (the checks notebook 03 makes at scale)."""
    import torchvision.transforms.functional as TF

    a = images[:12]
    zero = M.st_lpips_distance(a, a, net)
    assert torch.allclose(zero, torch.zeros(12, dtype=torch.float64), atol=1e-7)
    b = images[12:24]
    assert torch.allclose(M.st_lpips_distance(a, b, net), M.st_lpips_distance(b, a, net), atol=1e-6)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
    by_noise = [M.st_lpips_distance(a, (a + s * noise).clamp(0, 1), net).mean().item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(x < y for x, y in zip(by_noise, by_noise[1:])), by_noise
    by_blur = [M.st_lpips_distance(a, TF.gaussian_blur(a, [7, 7], [s, s]), net).mean().item() for s in (0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(by_blur, by_blur[1:])), by_blur
    assert M.perceptual_distance(a, b, prefer=f"st-lpips-{net}").metric == f"ST-LPIPS({net})"


def test_st_lpips_loads_strictly_and_names_its_weights(tmp_path, monkeypatch, images):
    with pytest.raises(ValueError, match="at least 32x32"):
        M.st_lpips_distance(images[:2, :, :16, :16], images[2:4, :, :16, :16])
    with pytest.raises(ValueError, match="ST-LPIPS net"):
        M.st_lpips_weights_file("squeeze")
    real = M.st_lpips_weights_file("alex")
    state = torch.load(real, map_location="cpu", weights_only=True)
    del state["lin2.model.1.weight"]
    broken = tmp_path / "alex_shift_tolerant.pth"
    torch.save(state, broken)
    monkeypatch.setenv(M.ST_LPIPS_ENV["alex"], str(broken))
    M._st_lpips_models.clear()
    with pytest.raises(ValueError, match="lin2.model.1.weight"):
        M.load_st_lpips("alex")
    monkeypatch.setenv(M.ST_LPIPS_ENV["alex"], str(tmp_path / "missing.pth"))
    st = M.st_lpips_status("alex")
    assert not st["available"] and M.ST_LPIPS_ENV["alex"] in st["reason"]
    with pytest.raises(M.LPIPSUnavailable, match="missing.pth"):
        M.st_lpips_distance(images[:2], images[2:4])


def test_lpips_from_cached_backbone(tmp_path, monkeypatch, no_network):
    """With the torchvision file in the hub cache, LPIPS is built offline and its trunk holds those weights.
    SqueezeNet (5 MB) stands in for VGG/AlexNet, whose files are too large for a unit test; the loading code
    is the same for all three."""
    import lpips
    import torchvision

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    torch.manual_seed(0)
    trunk = torchvision.models.squeezenet1_1(weights=None)
    torch.save(trunk.state_dict(), M.lpips_backbone_file("squeeze"))
    assert M.lpips_status("squeeze")["available"]
    model = M.load_lpips("squeeze")
    assert isinstance(model, lpips.LPIPS)
    assert torch.equal(getattr(model.net.slice1, "0").weight, trunk.features[0].weight)
    assert torch.equal(getattr(model.net.slice7, "12").expand3x3.weight, trunk.features[12].expand3x3.weight)
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    values, metric = M.perceptual_distance(a, b, prefer="lpips-squeeze")
    assert metric == "LPIPS-SqueezeNet"
    with torch.no_grad():
        direct = model(a * 2 - 1, b * 2 - 1).flatten().double()
    assert torch.allclose(values, direct)
    assert torch.allclose(M.lpips_distance(a, a, "squeeze"), torch.zeros(3, dtype=torch.float64), atol=1e-7)


def test_dfd_properties(images, random_extractor):
    from rearlib.metrics.classifier import load_classifier

    clf = load_classifier(random_extractor)
    a = images[:16]
    assert torch.allclose(M.dfd_distance(a, a, clf), torch.zeros(16, dtype=torch.float64), atol=1e-10)
    b = images[16:32]
    assert torch.allclose(M.dfd_distance(a, b, clf), M.dfd_distance(b, a, clf))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(a.shape, generator=g)
    means = [M.dfd_distance(a, (a + s * noise).clamp(0, 1), clf).mean().item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(x < y for x, y in zip(means, means[1:])), means
    assert max(means) <= 2 * (1 + len(clf.stages))  # documented bound


# ----------------------------------------------------------------------------------------------------------
# Distribution metrics (torch-fidelity)
# ----------------------------------------------------------------------------------------------------------
def test_fid_self_zero_and_monotone_in_shift(images, random_extractor, tmp_path):
    kw = dict(extractor="rearlib-classifier", classifier=random_extractor, isc=False, kid=False, prc=False,
              cache_root=tmp_path)
    ref = images[32:]
    self_fid = M.distribution_metrics(ref, ref, **kw)["fid"]
    fids = [M.distribution_metrics((images[:32] + d).clamp(0, 1), ref, **kw)["fid"] for d in (0.0, 0.05, 0.1, 0.2)]
    assert abs(self_fid) < 1e-6 * fids[-1]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids


def test_wrapper_agrees_with_direct_torch_fidelity(images, random_extractor, tmp_path):
    import torch_fidelity

    gen, ref = images[:40], images[24:]
    ours = M.distribution_metrics(gen, ref, extractor="rearlib-classifier", classifier=random_extractor,
                                  kid_subset_size=16, kid_subsets=10, isc_splits=4, cache_root=tmp_path,
                                  cache_name="unit-ref")
    u8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    direct = torch_fidelity.calculate_metrics(
        input1=M.UInt8Images(u8(gen)), input2=M.UInt8Images(u8(ref)), cuda=False, fid=True, isc=True, kid=True,
        prc=True, feature_extractor="rearlib-classifier", feature_extractor_weights_path=str(random_extractor),
        kid_subset_size=16, kid_subsets=10, isc_splits=4, verbose=False, cache=False, save_cpu_ram=True)
    for ours_key, tf_key in [("fid", "frechet_inception_distance"), ("isc_mean", "inception_score_mean"),
                             ("kid_mean", "kernel_inception_distance_mean"), ("precision", "precision"),
                             ("recall", "recall")]:
        assert ours[ours_key] == pytest.approx(direct[tf_key], rel=1e-6, abs=1e-9), ours_key
    assert ours["extractor"] == "rearlib-classifier" and ours["labels"]["fid"] == "FID[rearlib-classifier]"
    assert ours["n_generated"] == 40 and ours["n_reference"] == 40 and ours["reference"] == "unit-ref"
    assert len(ours["extractor_id"]) == 12
    # the named reference was cached, keyed by extractor identity and content; a second call reuses it
    cached = list(tmp_path.glob("unit-ref__*"))
    assert cached and all(ours["extractor_id"] in p.name for p in cached)
    again = M.distribution_metrics(gen, ref, extractor="rearlib-classifier", classifier=random_extractor,
                                   kid_subset_size=16, kid_subsets=10, isc_splits=4, cache_root=tmp_path,
                                   cache_name="unit-ref")
    assert again["fid"] == pytest.approx(ours["fid"], rel=1e-9)


def test_npz_reference_statistics_path(images, random_extractor, tmp_path):
    """An ADM-style npz (arr_0 images + mu/sigma) gives the same FID via its statistics as via its images,
    when the statistics come from the same extractor; mismatched statistics are refused."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from rearlib.metrics.classifier import load_classifier

    gen, ref = images[:32], images[32:]
    u8 = (ref * 255).round().to(torch.uint8)
    clf = load_classifier(random_extractor)
    with torch.no_grad():
        pool, _ = clf.pool_and_logits(u8.float() / 255)
    stats = fid_features_to_statistics(pool)
    npz = tmp_path / "ref_batch.npz"
    np.savez(npz, arr_0=u8.permute(0, 2, 3, 1).numpy(), mu=stats["mu"], sigma=stats["sigma"])
    kw = dict(extractor="rearlib-classifier", classifier=random_extractor, isc=False, kid=True, prc=True,
              kid_subset_size=16, kid_subsets=5, cache_root=tmp_path)
    via_stats = M.distribution_metrics(gen, str(npz), **kw)
    via_images = M.distribution_metrics(gen, ref, **kw)
    assert "mu/sigma" in via_stats["fid_reference"] and via_stats["reference"] == "ref_batch"
    assert via_stats["fid"] == pytest.approx(via_images["fid"], rel=1e-4)
    assert via_stats["precision"] == pytest.approx(via_images["precision"])
    np.savez(npz, arr_0=u8.permute(0, 2, 3, 1).numpy(), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d"):
        M.distribution_metrics(gen, str(npz), **kw)


def test_torch_fidelity_download_is_never_attempted(images, empty_hub, no_network, random_extractor, tmp_path):
    assert not M.inception_available()
    with pytest.raises(FileNotFoundError, match="not on this machine"):
        M.distribution_metrics(images[:8], images[8:16], extractor="inception-v3-compat", cache_root=tmp_path)
    r = M.distribution_metrics(images[:8], images[8:16], extractor="rearlib-classifier", classifier=random_extractor,
                               isc=False, kid=False, prc=False, cache_root=tmp_path)
    assert r["extractor"] == "rearlib-classifier" and r["labels"]["fid"] == "FID[rearlib-classifier]"
    with pytest.raises(ValueError, match="extractor"):
        M.distribution_metrics(images[:8], images[8:16], extractor="clip")
    with pytest.raises(ValueError, match="extractor"):
        M.distribution_metrics(images[:8], images[8:16], extractor="auto")


# ----------------------------------------------------------------------------------------------------------
# CKA
# ----------------------------------------------------------------------------------------------------------
def _random_pair(n, p=12, q=6, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g) @ torch.randn(p, p, generator=g)
    Y = X @ torch.randn(p, q, generator=g) + noise * torch.randn(n, q, generator=g)
    return X, Y


def test_cka_feature_space_equals_gram_form_and_invariances():
    X, Y = (t.double() for t in _random_pair(300))
    cka = M.linear_cka(X, Y)
    assert cka == pytest.approx(M.linear_cka_gram(X, Y), rel=1e-10)
    assert 0 < cka < 1
    assert M.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    assert M.linear_cka(X @ Q, Y) == pytest.approx(cka, rel=1e-9)          # orthogonal transform
    assert M.linear_cka(3.7 * X, 0.01 * Y) == pytest.approx(cka, rel=1e-9)          # isotropic scaling
    assert M.linear_cka(X + 5.0, Y - 2.0) == pytest.approx(cka, rel=1e-9)           # translation (centring)
    aniso = torch.ones(12, dtype=torch.float64)
    aniso[0] = 30.0
    assert abs(M.linear_cka(X * aniso, Y) - cka) > 1e-3                             # not invariant to this
    assert M.linear_cka(X, Y, chunk=7) == pytest.approx(cka, rel=1e-10)              # chunked accumulation
    with pytest.raises(ValueError, match="rows"):
        M.linear_cka(X, Y[:-1])


def test_unbiased_hsic_is_unbiased_for_independent_data():
    g = torch.Generator().manual_seed(0)
    unbiased, biased = [], []
    for _ in range(300):
        X = torch.randn(12, 3, generator=g, dtype=torch.float64)
        Y = torch.randn(12, 3, generator=g, dtype=torch.float64)
        K, L = X @ X.T, Y @ Y.T
        unbiased.append(M.unbiased_hsic(K, L).item())
        H = torch.eye(12, dtype=torch.float64) - 1 / 12
        biased.append(((H @ K @ H) * (H @ L @ H)).sum().item() / 11 ** 2)
    assert abs(np.mean(unbiased)) < 0.1 * np.mean(biased)
    assert abs(np.mean(unbiased)) < 4 * np.std(unbiased) / math.sqrt(300)


def test_minibatch_cka_close_to_full_on_large_n():
    X, Y = _random_pair(12000, noise=3.0, seed=1)
    full = M.linear_cka(X, Y)
    mb = M.minibatch_cka(X, Y, batch_size=800, seed=0)
    assert mb == pytest.approx(full, abs=0.02)
    assert M.minibatch_cka(X[:4000], X[:4000], batch_size=500) == pytest.approx(1.0, abs=1e-9)
    # independent representations: near zero, where the plug-in estimator on a small batch is biased upward
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(6000, 16, generator=g), torch.randn(6000, 16, generator=g)
    assert abs(M.minibatch_cka(A, B, batch_size=200)) < 0.01
    assert M.linear_cka(A[:200], B[:200]) > 0.05


def test_cka_by_layer():
    X, Y = _random_pair(2000, noise=0.5)
    g = torch.Generator().manual_seed(9)
    hidden = {0: X, 5: X + 2.0 * torch.randn(X.shape, generator=g), 10: torch.randn(2000, 12, generator=g)}
    out = M.cka_by_layer(hidden, Y)
    assert list(out) == [0, 5, 10]
    assert out[0] > out[5] > out[10]
    assert out[0] == pytest.approx(M.linear_cka(X, Y))
    sub = M.cka_by_layer(hidden, Y, max_rows=500, seed=1)
    assert sub[0] == pytest.approx(out[0], abs=0.1) and sub[0] != out[0]
    mb = M.cka_by_layer(hidden, Y, method="minibatch", batch_size=400)
    assert mb[0] == pytest.approx(out[0], abs=0.05)
    with pytest.raises(ValueError, match="layer 3"):
        M.cka_by_layer({3: X[:10]}, Y)
    with pytest.raises(ValueError, match="method"):
        M.cka_by_layer(hidden, Y, method="rbf")
