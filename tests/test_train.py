"""Tests of rearlib.train: schedule, optimizer groups, data checks, the loop, checkpoints and exact resume (CPU)."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch

import rearlib.train as T
from rearlib import train_step
from rearlib.experiments import bench
from rearlib.model import StateDictMismatchError, build_generator
from rearlib.rear import get_rear_config
from rearlib.runtime import UnreadableFileError
from rearlib.tokenizers.pretokenize import TokenDataset
from rearlib.train import (
    DeviceBatches,
    TrainConfig,
    generator_overrides,
    load_generator,
    lr_at,
    no_decay_names,
    train,
)

M, N, K, Z = 48, 16, 32, 16  # the "tiny" preset: 16 tokens, codebook 32, z_dim 16, 10 classes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_data(seed: int = 0):
    """A learnable toy set: each class has its own deterministic token pattern, plus a random codebook."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (M,), generator=g)
    tokens = (labels[:, None] * 3 + torch.arange(N)[None]) % K
    codebook = torch.randn(K, Z, generator=g)
    return tokens, labels, codebook


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(model="tiny", rear=get_rear_config("rear"), steps=8, batch_size=8, warmup_steps=2, lr=1e-3,
                log_every=2, ckpt_every=4, ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ pieces

def test_lr_schedule_warmup_then_cosine_to_end():
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=4e-4, end_lr=1e-5)
    assert lr_at(cfg, 0) == 0.0
    assert lr_at(cfg, 50) == pytest.approx(2e-4)
    assert lr_at(cfg, 100) == pytest.approx(4e-4)
    assert lr_at(cfg, 550) == pytest.approx((4e-4 + 1e-5) / 2)  # cosine midpoint
    assert lr_at(cfg, 1000) == pytest.approx(1e-5)
    decay = [lr_at(cfg, s) for s in range(100, 1001, 50)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # the authors' reAR-B recipe: 250k steps, 62.5k warm-up, 128 per GPU x accumulation 2 (x 8 GPUs = 2048)
    paper = T.config_for_scale("paper", "rear")
    assert (paper.steps, paper.warmup_steps, paper.batch_size * paper.grad_accum * 8) == (250_000, 62_500, 2048)
    assert (paper.lr, paper.end_lr, paper.betas, paper.weight_decay, paper.grad_clip, paper.class_dropout) == (
        4e-4, 1e-5, (0.9, 0.96), 0.03, 1.0, 0.1)
    with pytest.raises(ValueError, match="unknown scale"):
        T.config_for_scale("huge")


def test_no_decay_groups_follow_the_authors_rule():
    model = build_generator("tiny")
    nd = set(no_decay_names(model))
    # names containing ln / embed / norm / bias, and ndim < 2
    assert {"pos_embed", "target_aware_pos_embed", "timesteps_embeddings", "embeddings.weight"} <= nd
    assert any(n.startswith("adaln_before_head.") and n.endswith("weight") for n in nd)  # "ln" in "adaln"
    assert "blocks.0.attn.q_norm.weight" in nd and "lm_head.bias" in nd
    decayed = {n for n, _ in model.named_parameters()} - nd
    # block adaLN weights ("adaLN" does not contain lower-case "ln"), cls_token (3-D), heads and lm_head decay
    assert {"cls_token", "blocks.0.adaLN_modulation.1.weight", "lm_head.weight",
            "encode_align_mlp.0.weight", "blocks.0.attn.qkv.weight"} <= decayed
    groups = T.param_groups(model, 0.03)
    assert groups[0]["weight_decay"] == 0.03 and groups[1]["weight_decay"] == 0.0
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_generator_overrides_follow_the_rear_switches():
    assert generator_overrides(tiny_cfg(rear=get_rear_config("ar"))) == {
        "tied_codebook": False, "encode_align_layer": None, "decode_align_layer": None}
    ov = generator_overrides(tiny_cfg(rear=get_rear_config("de_only", decode_layer=1)))
    assert ov["encode_align_layer"] is None and ov["decode_align_layer"] == 1
    assert generator_overrides(tiny_cfg(rear=get_rear_config("tied")))["tied_codebook"] is True
    with pytest.raises(ValueError, match="contradicts"):
        generator_overrides(tiny_cfg(rear=get_rear_config("ar"), model_overrides={"encode_align_layer": 0}))


def test_device_batches_are_disjoint_per_rank_and_deterministic():
    tokens = torch.arange(40)[:, None].repeat(1, 4)
    labels = torch.arange(40)
    a = [DeviceBatches(tokens, labels, 4, seed=3, rank=r, world=2) for r in (0, 1)]
    seen = []
    for _ in range(5):  # one epoch = 40 // 8 = 5 steps
        b0, b1 = a[0].next()[1], a[1].next()[1]
        assert not set(b0.tolist()) & set(b1.tolist())
        seen += b0.tolist() + b1.tolist()
    assert sorted(seen) == list(range(40))
    again = DeviceBatches(tokens, labels, 4, seed=3, rank=1, world=2)
    other = DeviceBatches(tokens, labels, 4, seed=4, rank=1, world=2)
    first = again.next()[1]
    assert torch.equal(first, DeviceBatches(tokens, labels, 4, seed=3, rank=1, world=2).next()[1])
    assert not torch.equal(first, other.next()[1])
    state = again.state_dict()
    nxt = again.next()[1]
    again.load_state_dict(state)
    assert torch.equal(again.next()[1], nxt)


def test_bad_inputs_fail_early(tmp_path):
    tokens, labels, cb = toy_data()
    cfg = tiny_cfg(steps=2)
    with pytest.raises(ValueError, match="codebook size is 32"):
        train(cfg, tokens + K, labels, cb, tmp_path / "a", device="cpu", progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        train(cfg, tokens[:, :8], labels, cb, tmp_path / "b", device="cpu", progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        train(cfg, tokens, labels + 10, cb, tmp_path / "c", device="cpu", progress=False)
    with pytest.raises(ValueError, match="needs the tokenizer codebook"):
        train(cfg, tokens, labels, None, tmp_path / "d", device="cpu", progress=False)
    with pytest.raises(ValueError, match="z_dim"):
        train(cfg, tokens, labels, torch.randn(K, Z + 1), tmp_path / "e", device="cpu", progress=False)
    with pytest.raises(TypeError, match="integer"):
        train(cfg, tokens.float(), labels, cb, tmp_path / "f", device="cpu", progress=False)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="torch.compile mode"):
        TrainConfig(compile="fastest")
    assert TrainConfig(compile="max-autotune-no-cudagraphs").compile == "max-autotune-no-cudagraphs"


# ------------------------------------------------------------------------------------------------ the loop

def test_resume_is_bit_identical_on_cpu(tmp_path):
    tokens, labels, cb = toy_data()
    cfg = tiny_cfg()
    full = train(cfg, tokens, labels, cb, tmp_path / "full", device="cpu", progress=False)
    part = train(cfg, tokens, labels, cb, tmp_path / "split", device="cpu", progress=False, stop_at=3)
    assert part["status"] == "stopped" and part["step"] == 3
    assert not (tmp_path / "split" / "model.pt").exists()  # only a finished run writes model.pt
    rest = train(cfg, tokens, labels, cb, tmp_path / "split", device="cpu", progress=False)
    assert rest["status"] == "completed" and rest["resumed_from"] == 3
    assert states_equal(full["model"].state_dict(), rest["model"].state_dict())
    assert states_equal(full["ema_state_dict"], rest["ema_state_dict"])
    ck_a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    ck_b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    opt_a, opt_b = ck_a["optimizer"]["state"], ck_b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    # logged statistics of the windows after the split agree exactly
    la = {h["step"]: h["loss"] for h in full["history"]}
    lb = {h["step"]: h["loss"] for h in rest["history"]}
    assert la[8] == lb[8] and la[6] == lb[6]
    # sanity: a different seed gives different weights (the comparison above can fail)
    other = train(tiny_cfg(seed=1, steps=2), tokens, labels, cb, tmp_path / "seed1", device="cpu", progress=False)
    assert not torch.equal(other["model"].lm_head.weight, full["model"].lm_head.weight)


def test_training_learns_and_writes_its_files(tmp_path):
    tokens, labels, cb = toy_data()
    cfg = tiny_cfg(steps=24, batch_size=16, log_every=4, ckpt_every=12, ema_decay=None)
    res = train(cfg, tokens, labels, cb, tmp_path / "run", device="cpu", progress=False)
    hist = res["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5
    assert hist[-1]["acc"] > hist[0]["acc"]
    assert hist[0]["eps"] > 0.3 and hist[-1]["eps"] == 0.0  # anneal: noise gone after t = 0.75
    assert hist[-1]["enc"] < 0 and hist[-1]["dec"] < 0      # -cos terms are being optimised
    assert hist[-1]["lr"] == pytest.approx(cfg.end_lr)
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    for key in ("wall_time_s", "samples_per_s", "final", "gpu", "params", "global_batch", "history"):
        assert key in on_disk
    assert on_disk["final"]["loss"] == pytest.approx(hist[-1]["loss"])
    # model.pt reloads (strictly) into the same function
    model = load_generator(tmp_path / "run" / "model.pt")
    x, c = tokens[:4], labels[:4]
    with torch.no_grad():
        assert torch.allclose(model(x, c).logits, res["model"].eval()(x, c).logits)
    with pytest.raises(ValueError, match="no EMA"):
        load_generator(tmp_path / "run" / "model.pt", ema=True)
    # a model file whose weights do not fit its config is refused with every bad entry and the file named
    bad = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    bad["model"]["lm_head.weight"] = bad["model"]["lm_head.weight"][:-1]
    del bad["model"]["cls_token"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(StateDictMismatchError, match=r"bad\.pt[\s\S]*missing keys \(1\):\s+cls_token[\s\S]*"
                                                     r"mis-shaped keys \(1\):\s+lm_head\.weight"):
        load_generator(tmp_path / "bad.pt")
    # a finished run is not retrained; a different config is refused
    again = train(cfg, tokens, labels, cb, tmp_path / "run", device="cpu", progress=False)
    assert again["history"] == on_disk["history"]
    with pytest.raises(ValueError, match="different config"):
        train(tiny_cfg(steps=24, batch_size=16, lr=2e-3), tokens, labels, cb, tmp_path / "run", device="cpu",
              progress=False)


@pytest.mark.parametrize("preset", ["ar", "de_only", "tied"])
def test_every_variant_runs_one_loop(tmp_path, preset):
    tokens, labels, cb = toy_data()
    cfg = tiny_cfg(rear=get_rear_config(preset), steps=2, log_every=1, ema_decay=None)
    res = train(cfg, tokens, labels, cb if preset != "ar" else None, tmp_path / preset, device="cpu",
                progress=False)
    m = res["model"]
    assert math.isfinite(res["final"]["loss"])
    if preset == "ar":
        assert m.encode_align_mlp is None and m.decode_align_mlp is None and res["final"]["enc"] == 0
    if preset == "de_only":
        assert m.encode_align_mlp is None and m.decode_align_mlp is not None
        assert res["final"]["enc"] == 0 and res["final"]["dec"] != 0
    if preset == "tied":
        assert m.config.tied_codebook and torch.count_nonzero(m.codebook) > 0


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    tokens, labels, cb = toy_data()
    calls = {"n": 0}
    real = train_step.rear_loss

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 5:  # from optimizer step 6 on
            loss = loss * float("nan")
            stats = {**stats, "loss": loss.detach()}
        return loss, stats

    monkeypatch.setattr(train_step, "rear_loss", poisoned)  # the loss the Stepper calls
    cfg = tiny_cfg(steps=12, log_every=1, ckpt_every=4)
    with pytest.raises(FloatingPointError, match="last good checkpoint") as err:
        train(cfg, tokens, labels, cb, tmp_path / "nan", device="cpu", progress=False)
    assert "step 6" in str(err.value)
    ck = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_cli_trains_from_a_pretokenized_file(tmp_path):
    tokens, labels, cb = toy_data()
    f = tmp_path / "tok.pt"
    torch.save({"tokens": tokens.view(M, 4, 4).to(torch.int16), "labels": labels, "codebook": cb,
                "num_classes": 10}, f)
    rc = T.main(["--preset", "tiny", "--rear", "rear", "--rear-set", "align_weight=0.5", "--tokens", str(f),
                 "--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "cli"), "--log-every", "1",
                 "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "cli" / "result.json").read_text())
    assert res["status"] == "completed" and res["train_config"]["rear"]["align_weight"] == 0.5
    assert res["model_config"]["seq_len"] == N and res["model_config"]["z_dim"] == Z
    with pytest.raises(FileNotFoundError, match="pretokenized"):
        T.main(["--tokens", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")])


def test_pretokenize_format_views_become_samples(tmp_path):
    tokens, labels, _ = toy_data()
    views = torch.stack([tokens, (tokens + 1) % K], dim=1).to(torch.uint8)  # [M, 2 views, 16]
    ds = TokenDataset(views, labels, grid_size=(4, 4), codebook_size=K, view_names=("center", "center_flip"),
                      tokenizer_identity="toy-0123")
    ds.save(tmp_path / "tokens.pt")
    d = T.load_pretokenized(tmp_path / "tokens.pt")
    assert d["tokens"].shape == (2 * M, N) and d["tokens"].dtype == torch.uint8
    assert torch.equal(d["tokens"][1].long(), (tokens[0] + 1) % K) and d["labels"][1] == labels[0]
    assert d["codebook_size"] == K


def test_bench_smoke_on_cpu(tmp_path):
    res = bench.run("tiny", 4, steps=1, warmup=1, sample_steps=2, sample_repeats=1, device="cpu", progress=False)
    train_rows = [r for r in res["rows"] if r["kind"] == "train"]
    assert {r["variant"] for r in train_rows} == {"ar", "rear"}
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["loss"]) for r in train_rows)
    # the reAR model carries the two heads, so it has more parameters and more FLOPs per sample
    by = {r["variant"]: r for r in train_rows}
    assert by["rear"]["params"] > by["ar"]["params"]
    assert by["rear"]["flops_per_sample"] > by["ar"]["flops_per_sample"]
    assert "overhead rear vs ar | cpu eager fp32" in res["summary"]
    assert any(r["kind"] == "sample" and r["images_per_s"] > 0 for r in res["rows"])
    j, c = bench.write_outputs(res, tmp_path / "bench.json")
    assert json.loads(j.read_text())["rows"] and c.read_text().startswith("kind,")
    assert "samples_per_s" in bench.format_table(res["rows"])
    assert bench.peak_flops(torch.device("cpu"), 100.0)[0] == 1e14


def test_kernel_categories_sort_profiled_names():
    """The profile's kernel names (from an H200 run, reports/small/bench/) fall into the right kinds; cuDNN's
    attention kernels contain "sm90" and must not count as GEMMs; totals rows are skipped."""
    rows = [
        {"kernel": "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "us_per_step": 100.0},
        {"kernel": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "us_per_step": 40.0},
        {"kernel": "triton_poi_fused__to_copy_cat_mul_native_layer_norm_view_24", "us_per_step": 30.0},
        {"kernel": "void cudnn::fusion::compute_dot_do_o<true>(void const*, void const*, void*)", "us_per_step": 1.0},
        {"kernel": "_keep_mask_kernel", "us_per_step": 5.0},
        {"kernel": "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizer>",
         "us_per_step": 3.0},
        {"kernel": "void at::native::reduce_kernel<128, 4>", "us_per_step": 2.0},
        {"kernel": "(all device kernels)", "us_per_step": 180.0},
    ]
    cats = bench.kernel_categories(rows)
    assert cats == {"GEMM": 100.0, "attention": 41.0, "Inductor-fused elementwise / reductions": 30.0,
                    "dropout masks (rearlib.kernels.ops)": 5.0, "optimizer": 3.0, "other": 2.0}
    assert list(cats) == sorted(cats, key=lambda c: -cats[c])


def test_host_sync_count_only_counts_sync_debug_reports():
    msgs = ["Synchronization debug mode is a prototype feature and does not detect every synchronization",
            "called a synchronizing CUDA operation", "some other warning",
            "Tensor.item(): called a synchronizing CUDA operation"]
    assert bench.count_sync_reports(msgs) == 2 and bench.count_sync_reports([]) == 0


def test_profile_training_runs_on_cpu_and_leaves_tf32_as_it_was():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    r = bench.profile_training("tiny", "rear", 4, torch.device("cpu"), steps=1, warmup=1)
    assert r["variant"] == "rear" and r["wall_ms_per_step_profiled"] > 0
    assert r["kernels"][-1]["kernel"] == "(all device kernels)"  # no CUDA kernels on the CPU, only the total row
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# ------------------------------------------------------------------------------------------------ failure modes

def _truncated_and_garbage_files(tmp_path, good):
    """An empty file, the first half of ``good`` and random bytes: the damaged files a loader must explain."""
    data = good.read_bytes()
    files = {"empty.pt": b"", "truncated.pt": data[:len(data) // 2],
             "random.pt": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / name for name in files]


def test_non_finite_hyper_parameters_are_refused_by_name():
    inf, nan = float("inf"), float("nan")
    for field, value in (("lr", inf), ("end_lr", nan), ("weight_decay", inf), ("grad_clip", nan),
                         ("class_dropout", nan), ("ema_decay", nan)):
        with pytest.raises(ValueError, match=rf"TrainConfig\.{field} .*finite"):
            tiny_cfg(**{field: value})
    with pytest.raises(ValueError, match=r"TrainConfig\.betas .*finite"):
        tiny_cfg(betas=(0.9, inf))
    with pytest.raises(SystemExit):  # the command line reports it before any data is made
        T.main(["--preset", "tiny", "--synthetic", "16", "--lr", "inf", "--out", "unused", "--device", "cpu"])


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_a_state_that_turns_non_finite_after_its_update_is_never_checkpointed(tmp_path, monkeypatch, where):
    """The loss is computed before the update: NaN weights (or an overflowed AdamW moment, which leaves the
    weights finite) after a step with a finite loss must not become the 'last good checkpoint'."""
    tokens, labels, cb = toy_data()
    real_step = train_step.Stepper.step

    def step(self, i):
        out = real_step(self, i)
        if i == 2:  # after the update of optimizer step 3, whose loss was finite
            with torch.no_grad():
                w = self.raw.lm_head.weight
                if where == "weights":
                    w[0, 0] = float("nan")
                else:
                    self.optimizer.state[w]["exp_avg_sq"][0, 0] = float("inf")
        return out

    monkeypatch.setattr(train_step.Stepper, "step", step)
    cfg = tiny_cfg(steps=8, log_every=1, ckpt_every=1, ema_decay=None)
    named = r"lm_head\.weight'\]\['exp_avg_sq" if where == "optimizer" else r"lm_head\.weight"
    with pytest.raises(FloatingPointError, match=rf"{named}[\s\S]*last good checkpoint") as err:
        train(cfg, tokens, labels, cb, tmp_path / "run", device="cpu", progress=False)
    assert str(tmp_path / "run" / "checkpoint.pt") in str(err.value)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(t).all() for s in ck["optimizer"]["state"].values() for t in s.values())


def test_a_huge_learning_rate_leaves_no_diverged_checkpoint(tmp_path):
    """lr=1e30 is finite, but the weights after one step are ~1e30 and the next loss is not finite: the
    checkpoint holding them is not a 'good' one and is not kept."""
    tokens, labels, cb = toy_data()
    cfg = tiny_cfg(steps=20, lr=1e30, end_lr=0.0, warmup_steps=0, log_every=1, ckpt_every=1, ema_decay=None)
    with pytest.raises(FloatingPointError, match="non-finite loss") as err:
        train(cfg, tokens, labels, cb, tmp_path / "run", device="cpu", progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert "last good checkpoint" not in str(err.value) and not ckpt.exists()
    assert not list((tmp_path / "run").glob("checkpoint*"))


def test_a_diverging_run_falls_back_to_the_checkpoint_before_the_bad_one(tmp_path, monkeypatch):
    """The checkpoint whose (finite) weights gave the first non-finite loss is replaced by the one before it."""
    tokens, labels, cb = toy_data()
    real_step, real_loss = train_step.Stepper.step, train_step.rear_loss

    def step(self, i):
        out = real_step(self, i)
        if i == 3:  # the weights after step 4: finite, but marked to give a non-finite loss at step 5
            with torch.no_grad():
                self.raw.lm_head.bias[0] = 1e4
        return out

    def loss(out, *args, **kwargs):
        value, stats = real_loss(out, *args, **kwargs)
        if out.logits[..., 0].max() > 5e3:
            value = value * float("nan")
            stats = {**stats, "loss": value.detach()}
        return value, stats

    monkeypatch.setattr(train_step.Stepper, "step", step)
    monkeypatch.setattr(train_step, "rear_loss", loss)
    cfg = tiny_cfg(steps=8, log_every=2, ckpt_every=2, ema_decay=None)
    with pytest.raises(FloatingPointError, match="last good checkpoint") as err:
        train(cfg, tokens, labels, cb, tmp_path / "run", device="cpu", progress=False)
    assert "step 5" in str(err.value) and "step 2" in str(err.value)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["model"]["lm_head.bias"].abs().max() < 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]


def test_loaders_refuse_non_finite_weights_naming_the_file(tmp_path):
    tokens, labels, cb = toy_data()
    res = train(tiny_cfg(steps=2, log_every=1, ema_decay=None), tokens, labels, cb, tmp_path / "run", device="cpu",
                progress=False)
    assert res["status"] == "completed"
    for name in ("model.pt", "checkpoint.pt"):
        d = torch.load(tmp_path / "run" / name, weights_only=True)
        d["model"]["blocks.1.mlp.fc2.weight"][3, 4] = float("inf")
        torch.save(d, tmp_path / f"bad_{name}")
        with pytest.raises(ValueError, match=rf"bad_{name}[\s\S]*non-finite[\s\S]*blocks\.1\.mlp\.fc2\.weight"):
            load_generator(tmp_path / f"bad_{name}")
        with pytest.raises(ValueError, match=rf"bad_{name}[\s\S]*non-finite"):
            T.load_checkpoint(tmp_path / f"bad_{name}")


def test_damaged_checkpoint_files_are_named_with_what_to_do(tmp_path):
    tokens, labels, cb = toy_data()
    cfg = tiny_cfg(steps=4, log_every=2, ckpt_every=2, ema_decay=None)
    train(cfg, tokens, labels, cb, tmp_path / "run", device="cpu", progress=False, stop_at=2)
    for bad in _truncated_and_garbage_files(tmp_path, tmp_path / "run" / "checkpoint.pt"):
        with pytest.raises(UnreadableFileError, match=rf"{bad.name}[\s\S]*(train|copy)"):
            load_generator(bad)
        out = tmp_path / f"resume_{bad.stem}"
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(bad.read_bytes())
        with pytest.raises(UnreadableFileError, match=r"checkpoint\.pt[\s\S]*(--fresh|resume=False)"):
            train(cfg, tokens, labels, cb, out, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_generator(tmp_path / "missing.pt")


def test_fresh_keeps_the_finished_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch, capsys):
    tokens, labels, cb = toy_data()
    out = tmp_path / "run"
    done = train(tiny_cfg(steps=4, log_every=2, ckpt_every=2, snapshot_every=2, ema_decay=None), tokens, labels, cb,
                 out, device="cpu", progress=False)
    assert done["status"] == "completed"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"checkpoint.pt", "model.pt", "result.json", "model_step2.pt", "model_step4.pt"} <= set(before)

    real_step = train_step.Stepper.step

    def killed_at_step_2(self, i):
        if i == 1:
            raise KeyboardInterrupt  # a kill before the new run's first checkpoint
        return real_step(self, i)

    new_cfg = tiny_cfg(steps=4, lr=2e-3, log_every=2, ckpt_every=2, ema_decay=None)
    monkeypatch.setattr(train_step.Stepper, "step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(new_cfg, tokens, labels, cb, out, device="cpu", progress=False, resume=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the finished run is untouched
    assert "kept until" in capsys.readouterr().err

    monkeypatch.setattr(train_step.Stepper, "step", real_step)
    new = train(new_cfg, tokens, labels, cb, out, device="cpu", progress=False, resume=False)
    assert new["status"] == "completed"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "model.pt", "result.json"]
    assert json.loads((out / "result.json").read_text())["train_config"]["lr"] == 2e-3
    assert "replaced" in capsys.readouterr().err


def test_an_unwritable_output_folder_is_reported_before_training(tmp_path, monkeypatch):
    tokens, labels, cb = toy_data()
    out = tmp_path / "ro"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):  # what a read-only folder does (root ignores permission bits)
        if dir is not None and Path(dir) == out:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    steps = {"n": 0}
    real_step = train_step.Stepper.step

    def counting(self, i):
        steps["n"] += 1
        return real_step(self, i)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(train_step.Stepper, "step", counting)
    with pytest.raises(PermissionError, match=rf"{re.escape(str(out))}[\s\S]*not writable"):
        train(tiny_cfg(steps=4, ckpt_every=4, ema_decay=None), tokens, labels, cb, out, device="cpu", progress=False)
    assert steps["n"] == 0


def test_orphaned_temporary_files_are_removed_at_the_next_start(tmp_path, capsys):
    tokens, labels, cb = toy_data()
    out = tmp_path / "run"
    out.mkdir()
    orphans = [out / ".checkpoint.pt.k2j3h4.tmp", out / ".model.pt.abc.tmp", out / ".result.json.x1.tmp",
               out / ".model_step4.pt.zz.tmp"]
    for p in orphans:
        p.write_bytes(b"half a file")
    keep = out / "notes.tmp"
    keep.write_text("not ours")
    train(tiny_cfg(steps=2, log_every=1, ema_decay=None), tokens, labels, cb, out, device="cpu", progress=False)
    assert not any(p.exists() for p in orphans) and keep.exists()
    err = capsys.readouterr().err
    assert "removed 4" in err and ".checkpoint.pt.k2j3h4.tmp" in err


def test_cli_refuses_an_empty_synthetic_set(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--preset", "tiny", "--synthetic", "0", "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert "--synthetic" in capsys.readouterr().err


def test_a_damaged_result_file_of_a_finished_run_is_written_again(tmp_path):
    tokens, labels, cb = toy_data()
    out = tmp_path / "run"
    done = train(tiny_cfg(steps=4, ema_decay=None), tokens, labels, cb, out, device="cpu", progress=False)
    model_bytes = (out / "model.pt").read_bytes()
    (out / "result.json").write_text('{"status": "compl')  # a write cut short (disk full, copy interrupted)
    with pytest.warns(UserWarning, match=r"result\.json .*not valid JSON.*writing it again"):
        again = train(tiny_cfg(steps=4, ema_decay=None), tokens, labels, cb, out, device="cpu", progress=False)
    assert again["status"] == "completed" and again["step"] == done["step"] == 4
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "completed" and record["history"] == json.loads(json.dumps(done["history"]))
    assert (out / "model.pt").read_bytes() == model_bytes  # the same weights, not a retrained model
