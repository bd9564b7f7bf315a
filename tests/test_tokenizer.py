"""Our VQ tokenizer: interface contract, input validation, checkpoints, identity, training, get_tokenizer."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rearlib import scales
import rearlib.tokenizers as T
import rearlib.tokenizers.vqgan as vqgan
import rearlib.tokenizers.vqgan_training as vqgan_training
from rearlib.data import render_batch
from rearlib.tokenizers import StateDictMismatchError, TokenizerMismatchError, load_tokenizer, save_tokenizer
from rearlib.tokenizers.vqgan import VQTrainConfig as TrainConfig, VQConfig, VQTokenizer, code_usage, psnr_ssim, train_vq

MICRO = dict(resolution=16, base_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, codebook_size=16,
             code_dim=8, norm_groups=4)


def micro(seed=0) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(VQConfig(**MICRO)).eval()


@pytest.fixture(scope="module")
def tok():
    return micro()


@pytest.fixture(scope="module")
def images():
    return render_batch(torch.arange(6), 16, seed=0, split="val")[0]


# ---- interface ----------------------------------------------------------------------------------------------
def test_properties(tok):
    assert (tok.resolution, tok.grid_size, tok.codebook_size, tok.code_dim) == (16, (4, 4), 16, 8)
    cb = tok.codebook
    assert cb.shape == (16, 8)
    assert torch.allclose(cb.norm(dim=1), torch.ones(16), atol=1e-5)  # l2-normalised codes


def test_round_trip_shapes_and_ranges(tok, images):
    t = tok.encode(images)
    assert t.shape == (6, 4, 4) and t.dtype == torch.long
    assert 0 <= int(t.min()) and int(t.max()) < 16
    x = tok.decode(t)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # flat raster input is the same as the grid
    assert torch.equal(tok.decode(t.reshape(6, 16)), x)
    assert torch.equal(tok.reconstruct(images), x)


def test_decode_is_the_clamped_decoder_output(tok, images):
    t = tok.encode(images)
    raw = tok.decode_codes(tok.lookup(t))
    assert torch.equal(tok.decode(t), raw.clamp(0, 1))


def test_encode_picks_the_highest_cosine_code(tok, images):
    z = tok.encode_features(images)                      # [B, D, h, w], unit norm
    sims = torch.einsum("bdhw,kd->bkhw", z, tok.codebook)
    assert torch.equal(tok.encode(images), sims.argmax(1))


def test_batch_size_independence(tok):
    x = render_batch(torch.arange(9), 16, seed=1)[0]
    together = tok.encode(x)
    one_by_one = torch.cat([tok.encode(x[i:i + 1]) for i in range(9)])
    assert torch.equal(together, one_by_one)
    dec = tok.decode(together)
    assert torch.allclose(dec, torch.cat([tok.decode(together[i:i + 1]) for i in range(9)]), atol=1e-5)


def test_cpu_device_placement(tok, images):
    assert tok.device.type == "cpu"
    assert tok.encode(images).device.type == "cpu" and tok.decode(tok.encode(images)).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_placement_and_agreement(images):
    cpu = micro()
    gpu = micro().cuda()
    t = gpu.encode(images)  # CPU input is moved to the tokenizer's device
    assert t.device.type == "cuda" and gpu.decode(t).device.type == "cuda"
    assert (t.cpu() == cpu.encode(images)).float().mean() > 0.95  # TF32 may flip rare near-ties
    assert gpu.identity() == cpu.identity()


def test_nearest_codes(tok):
    ids, sims = tok.nearest_codes(3, return_similarity=True)
    assert ids.shape == (16, 3) and not (ids == torch.arange(16)[:, None]).any()
    n = F.normalize(tok.codebook, dim=1)
    brute = n @ n.T
    brute.fill_diagonal_(-2)
    assert torch.equal(ids[:, 0], brute.argmax(1))
    assert torch.all(sims[:, :-1] >= sims[:, 1:])  # most similar first
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 15\]"):
        tok.nearest_codes(16)


# ---- input validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, err, match", [
    (torch.rand(2, 1, 16, 16), ValueError, "3 channels"),
    (torch.rand(2, 4, 16, 16), ValueError, "3 channels"),
    (torch.rand(2, 16, 16, 3), ValueError, "channels-last"),
    (torch.rand(2, 3, 32, 32), ValueError, "expects 16x16"),
    (torch.rand(3, 16, 16), ValueError, r"images\[None\]"),
    ((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), TypeError, "float"),
    (torch.rand(2, 3, 16, 16) * 2 - 1, ValueError, r"in \[0,1\]"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_images_are_refused(tok, bad, err, match):
    with pytest.raises(err, match=match):
        tok.encode(bad)


@pytest.mark.parametrize("bad, err, match", [
    (torch.full((1, 4, 4), 16), ValueError, r"in \[0, 16\)"),
    (torch.full((1, 16), -1), ValueError, r"in \[0, 16\)"),
    (torch.zeros(1, 4, 4, dtype=torch.float32), TypeError, "integer"),
    (torch.zeros(1, 5, 5, dtype=torch.long), ValueError, r"\[B,4,4\] or \[B,16\]"),
    (torch.zeros(16, dtype=torch.long), ValueError, r"\[B,4,4\]"),
])
def test_bad_tokens_are_refused(tok, bad, err, match):
    with pytest.raises(err, match=match):
        tok.decode(bad)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        VQConfig(**{**MICRO, "resolution": 18})
    with pytest.raises(ValueError, match="unknown VQConfig keys"):
        VQConfig.from_dict({**MICRO, "codebook": 3})


# ---- checkpoints and identity -------------------------------------------------------------------------------
def test_identity_is_a_function_of_weights_and_config(tok):
    assert micro(0).identity() == tok.identity()
    assert micro(1).identity() != tok.identity()
    other = micro(0)
    with torch.no_grad():
        other.decoder.conv_out.bias[0] += 1e-3
    assert other.identity() != tok.identity()


def test_checkpoint_roundtrip_fp32_and_fp16(tok, images, tmp_path):
    ident = save_tokenizer(tok, tmp_path / "a.pt")
    back = load_tokenizer(tmp_path / "a.pt")
    assert ident == tok.identity() == back.identity() and isinstance(back, VQTokenizer)
    assert torch.equal(back.encode(images), tok.encode(images))
    # fp16 storage: the identity describes the rounded weights, equal to a model rounded the same way.
    rounded = T.round_weights_(micro(0), torch.float16)
    ident16 = save_tokenizer(tok, tmp_path / "b.pt", dtype=torch.float16)
    assert ident16 == rounded.identity() == load_tokenizer(tmp_path / "b.pt").identity()
    assert (tmp_path / "b.pt").stat().st_size < (tmp_path / "a.pt").stat().st_size


def test_corrupted_or_mismatched_checkpoints_are_refused(tok, tmp_path):
    ck = T.tokenizer_checkpoint(tok)
    ck["state_dict"]["decoder.conv_out.bias"] = ck["state_dict"]["decoder.conv_out.bias"] + 1
    with pytest.raises(TokenizerMismatchError, match="corrupt"):
        load_tokenizer(ck)
    ck = T.tokenizer_checkpoint(tok)
    del ck["state_dict"]["quantizer.embedding.weight"]
    with pytest.raises(StateDictMismatchError, match="quantizer.embedding.weight"):
        load_tokenizer(ck)
    with pytest.raises(ValueError, match="not a rearlib tokenizer checkpoint"):
        load_tokenizer({"foo": torch.zeros(1)})


# ---- training -----------------------------------------------------------------------------------------------
def test_straight_through_gradients_reach_encoder_and_codebook(images):
    m = micro().train()
    rec, ids, vq_loss, z = m(images)
    ((rec - images) ** 2).mean().add(vq_loss).backward()
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0          # through the straight-through estimator
    assert m.quantizer.embedding.weight.grad.abs().sum() > 0      # through the codebook loss


def test_dead_code_restart_uses_encoder_outputs():
    q = vqgan.VectorQuantizer(8, 4)
    opt = torch.optim.Adam(q.parameters())
    q.embedding.weight.grad = torch.ones_like(q.embedding.weight)
    opt.step()
    pool = F.normalize(torch.randn(2, 4, 3, 3), dim=1)
    dead = torch.tensor([1, 5])
    keep = q.embedding.weight.detach().clone()
    vqgan_training._restart_codes(q, opt, dead, pool, torch.Generator().manual_seed(0))
    w = q.embedding.weight.detach()
    flat = pool.permute(0, 2, 3, 1).reshape(-1, 4)
    for k in dead:
        assert (F.normalize(w[k], dim=0) @ flat.T).max() > 0.99  # a (slightly jittered) encoder output
    others = torch.tensor([i for i in range(8) if i not in dead.tolist()])
    assert torch.equal(w[others], keep[others])
    assert opt.state[q.embedding.weight]["exp_avg"][dead].abs().sum() == 0


def test_tiny_training_run_lowers_reconstruction_loss():
    torch.manual_seed(0)
    val = render_batch(torch.arange(16), 16, seed=0, split="val")[0]
    before = vqgan.evaluate(micro(), val)
    tc = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, restart_every=10, log_every=5,
                     val_size=16, grad_weight=0.5)
    model, metrics = train_vq(VQConfig(**MICRO), tc, device="cpu", progress=False)
    hist = metrics["history"]
    assert hist[-1]["rec_loss"] < 0.8 * hist[0]["rec_loss"]
    assert metrics["val"]["mse"] < 0.8 * before["mse"]
    assert metrics["steps_done"] == 40 and not metrics["stopped_by_time_budget"]
    assert 0 < metrics["val"]["usage"] <= 1 and 1 <= metrics["val"]["perplexity"] <= 16
    assert metrics["weights_rounded_to"] == "float16"


def test_time_budget_stops_training():
    tc = TrainConfig(steps=10_000, batch_size=2, time_budget_s=0.5, log_every=1000, val_size=4)
    _, metrics = train_vq(VQConfig(**MICRO), tc, device="cpu", progress=False)
    assert metrics["stopped_by_time_budget"] and metrics["steps_done"] < 10_000


def test_metrics_definitions():
    u = code_usage(torch.tensor([0, 1, 2, 3] * 5), 8)
    assert u["usage"] == 0.5 and math.isclose(u["perplexity"], 4.0)
    assert math.isclose(code_usage(torch.zeros(10, dtype=torch.long), 8)["perplexity"], 1.0)
    ref = torch.full((1, 3, 8, 8), 100 / 255)
    rec = torch.full((1, 3, 8, 8), 110 / 255)
    psnr, ssim = psnr_ssim(ref, rec)
    assert math.isclose(psnr[0], 10 * math.log10(255**2 / 10**2), rel_tol=1e-6)
    assert 0 < ssim[0] <= 1


# ---- get_tokenizer / CLI ------------------------------------------------------------------------------------
def test_get_tokenizer_smoke_trains_once_then_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path))
    monkeypatch.setitem(scales.VQ_TOKENIZER, "smoke", {"model": MICRO, "train": dict(steps=4, batch_size=2, val_size=4,
                                                                                  log_every=2)})
    first = T.get_tokenizer("smoke", "cpu", progress=False)
    files = list(tmp_path.glob("tokenizer/*/tokenizer.pt"))
    assert len(files) == 1 and first.grid_size == (4, 4)

    def boom(*a, **k):
        raise AssertionError("must not retrain")

    monkeypatch.setattr(vqgan_training, "train_vq", boom)
    second = T.get_tokenizer("smoke", "cpu", progress=False)
    assert second.identity() == first.identity()
    assert second.checkpoint_meta["metrics"]["steps_done"] == 4


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown scale"):
        T.get_tokenizer("huge", "cpu")
    with pytest.raises(FileNotFoundError, match="python -m rearlib vqgan train --scale small"):
        T.get_tokenizer("small", "cpu", path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="MaskGIT-VQGAN"):
        vqgan.scale_configs("paper")


def test_shipped_small_checkpoint_if_present():
    path = T.REPO_ROOT / scales.TOKENIZER["small"]["checkpoint"]
    if not path.is_file():
        pytest.skip("data/checkpoints/tokenizer_small.pt not built yet (GPU job)")
    assert path.stat().st_size <= 16 * 2**20
    tok = T.get_tokenizer("small", "cpu")
    assert tok.resolution == 64 and tok.grid_size == (16, 16)
    x = render_batch(torch.arange(4), 64, split="val")[0]
    assert tok.decode(tok.encode(x)).shape == x.shape


def test_cli_train_writes_checkpoint_and_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(scales.VQ_TOKENIZER, "smoke", {"model": MICRO, "train": dict(steps=3, batch_size=2, val_size=4,
                                                                                  log_every=1)})
    out = tmp_path / "tok.pt"
    assert vqgan.main(["train", "--scale", "smoke", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "codebook usage" in printed and "perplexity" in printed
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["steps_done"] == 3 and {"psnr", "ssim", "usage", "perplexity"} <= set(summary["val"])
    assert load_tokenizer(out).identity() == summary["identity"]


def test_running_mean_centering_is_a_buffer_updated_only_by_training_passes(images):
    torch.manual_seed(0)
    m = VQTokenizer(VQConfig(**MICRO, center=True)).train()
    z0 = m.z_mean.clone()
    m.encode(images)                      # inference: never updates, even in train mode
    assert torch.equal(m.z_mean, z0) and int(m.z_mean_count) == 0
    m(images)                             # a training pass: first update is the batch mean itself
    raw = m.encoder(images * 2 - 1).mean(dim=(0, 2, 3))
    assert torch.allclose(m.z_mean, raw, atol=1e-5) and int(m.z_mean_count) == 1
    assert "z_mean" in m.state_dict()     # part of the weights, so part of identity() and of checkpoints
    assert m.config_dict()["center"] and "center" not in micro().config_dict()  # off: config as before


def test_a_damaged_cached_smoke_tokenizer_is_trained_again(tmp_path, monkeypatch):
    mc, _ = vqgan_training.scale_configs("smoke")
    calls = []

    def quick_train(model_cfg, train_cfg, **kw):  # the training itself is tested above; here only the cache
        calls.append(1)
        torch.manual_seed(len(calls))
        model = VQTokenizer(model_cfg)
        vqgan_training.round_weights_(model, torch.float16)  # as the real trainer hands back what it caches
        return model, {"history": []}

    monkeypatch.setattr(vqgan_training, "train_vq", quick_train)
    first = vqgan_training.get_or_train("smoke", device="cpu", progress=False, root=tmp_path)
    path = next(tmp_path.glob("tokenizer/*/tokenizer.pt"))
    assert vqgan_training.get_or_train("smoke", device="cpu", root=tmp_path).identity() == first.identity()
    assert len(calls) == 1  # cached
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match=r"tokenizer\.pt.*training the smoke tokenizer again"):
        rebuilt = vqgan_training.get_or_train("smoke", device="cpu", progress=False, root=tmp_path)
    assert len(calls) == 2 and rebuilt.identity() != first.identity()
    assert vqgan_training.get_or_train("smoke", device="cpu", root=tmp_path).identity() == rebuilt.identity()
