"""rearlib.model computes the authors' function and uses their parameter layout.

Reference assets (see shared/reference/README.md): ``official_rear_tiny_seed0.pt`` holds random weights and the
outputs of the authors' own forward passes (QY-H00/reAR @ 61cc871, eval, float32, CPU); the JSON files hold the
parameter names and shapes of the released reAR-S/B/L generators. They are looked up in $REARLIB_REFERENCE,
$REARLIB_REFERENCE_DIR, tests/reference/, data/reference/, ../shared/reference/, then /work/shared/reference/.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from rearlib.model import (PRESETS, StateDictMismatchError, build_generator, check_state_dict, count_parameters,
                           infer_config_from_state_dict, load_official_state_dict)
from rearlib.runtime import UnreadableFileError

REPO = Path(__file__).resolve().parent.parent
_CANDIDATES = [os.environ.get("REARLIB_REFERENCE"), os.environ.get("REARLIB_REFERENCE_DIR"), REPO / "tests" / "reference",
               REPO / "data" / "reference", REPO.parent / "shared" / "reference", "/work/shared/reference"]


def _reference_dir() -> Path | None:
    for c in _CANDIDATES:
        if c and (Path(c) / "fixtures" / "official_rear_tiny_seed0.pt").exists():
            return Path(c)
    return None


REF = _reference_dir()
pytestmark = [pytest.mark.skipif(REF is None, reason=f"reference assets not found in {_CANDIDATES}"),
              pytest.mark.usefixtures("one_torch_thread")]
RTOL = 1e-5


def _close(ours, ref, rtol=RTOL):
    """Max abs error relative to the reference's max magnitude (float32 round-off is ~1e-7 here)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err < rtol, f"relative error {err:.3g} >= {rtol}"


@pytest.fixture(scope="module")
def fx():
    return torch.load(REF / "fixtures" / "official_rear_tiny_seed0.pt", weights_only=True)




@pytest.fixture(scope="module")
def model(fx):
    with pytest.warns(UserWarning, match="preset 'tiny'"):  # the decode block is not in the weights
        return load_official_state_dict(fx["state_dict"])


def test_inferred_config_is_the_fixture_architecture(fx, model):
    with pytest.warns(UserWarning, match=r"decode_align_layer=2 from the preset 'tiny'"):
        cfg = infer_config_from_state_dict(fx["state_dict"])
    assert cfg.decode_align_layer_source == model.config.decode_align_layer_source == "preset 'tiny'"
    want = fx["config"]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.seq_len, cfg.codebook_size, cfg.num_classes) == (
        want["hidden"], want["layers"], want["heads"], want["image_seq_len"], want["codebook_size"],
        want["num_classes"])
    assert (cfg.encode_align_layer, cfg.decode_align_layer) == (want["encode_align_layer_idx"],
                                                                want["decode_align_layer_idx"])
    assert (cfg.projector_dim, cfg.z_dim, cfg.mlp_ratio) == (want["projection_dim"], want["z_dim"], want["mlp_ratio"])
    assert cfg == PRESETS["tiny"]  # the "tiny" preset is exactly this architecture
    assert not model.training


def test_condition_ids(fx, model):
    assert torch.equal(model.class_token_ids(fx["classes"]), fx["token_ids_of_condition"])
    assert model.class_token_ids(torch.tensor(model.null_class)).item() == int(fx["token_id_of_null_condition"])


@torch.no_grad()
def test_teacher_forced_logits(fx, model):
    tokens, classes = fx["tokens"], fx["classes"]
    _close(model.full_logits(tokens, classes), fx["logits"])  # all N + 1 output positions
    out = model(tokens, classes)
    _close(out.logits, fx["logits"][:, :-1])  # the training contract: N positions predicting x_1..x_N
    assert out.encode_z is None and out.decode_z is None


@torch.no_grad()
def test_null_condition_logits(fx, model):
    null = torch.full_like(fx["classes"], model.null_class)
    _close(model.full_logits(fx["tokens"], null), fx["logits_null_condition"])


@torch.no_grad()
def test_alignment_heads(fx, model):
    out = model(fx["tokens"], fx["classes"], align=True)
    _close(out.encode_z, fx["encode_z"])
    _close(out.decode_z, fx["decode_z"])


@torch.no_grad()
def test_next_token_logits_by_recomputation(fx, model):
    tokens, classes = fx["tokens"], fx["classes"]
    got = torch.stack([model.next_token_logits(tokens[:, :L], classes) for L in range(tokens.shape[1])], 1)
    _close(got, fx["next_token_logits_per_prefix"])


@pytest.mark.parametrize("kv_buckets", [None, 5])
@torch.no_grad()
def test_next_token_logits_with_kv_cache(fx, model, kv_buckets):
    """Prefill [CLS, class], then one token per step; each step's logits equal the authors' recomputation."""
    tokens, classes = fx["tokens"], fx["classes"]
    B, N = tokens.shape
    cache = model.new_kv_cache(B)
    steps = [model.prefill(tokens[:, :0], classes, cache)]
    for t in range(1, N):
        pos = torch.tensor([t + 1])
        kv_len = None if kv_buckets is None else min(cache.max_len, ((t + 2 + kv_buckets - 1) // kv_buckets) * kv_buckets)
        steps.append(model.decode_step(tokens[:, t - 1], pos, classes, cache, kv_len=kv_len))
    _close(torch.stack(steps, 1), fx["next_token_logits_per_prefix"])


@torch.no_grad()
def test_prefill_with_a_prefix_then_decode(fx, model):
    tokens, classes = fx["tokens"], fx["classes"]
    cache = model.new_kv_cache(tokens.shape[0])
    ref = fx["next_token_logits_per_prefix"]
    _close(model.prefill(tokens[:, :5], classes, cache), ref[:, 5])
    _close(model.decode_step(tokens[:, 5], torch.tensor([7]), classes, cache), ref[:, 6])


def test_strict_loading_reports_every_mismatch(fx):
    sd = dict(fx["state_dict"])
    sd.pop("lm_head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(StateDictMismatchError) as e:
        load_official_state_dict(sd, "tiny")
    msg = str(e.value)
    assert "missing keys (1):\n    lm_head.bias" in msg
    assert "unexpected keys (1):\n    extra.weight" in msg
    assert "blocks.1.attn.qkv.weight: expected (192, 64), got (3, 3)" in msg
    assert (e.value.missing, e.value.unexpected, e.value.mis_shaped) == (
        ["lm_head.bias"], ["extra.weight"], ["blocks.1.attn.qkv.weight"])


def test_loading_into_the_wrong_preset_fails(fx):
    with pytest.raises(StateDictMismatchError, match="mis-shaped"):
        load_official_state_dict(fx["state_dict"], "tiny", hidden=32, heads=4)
    with pytest.raises(StateDictMismatchError, match="unexpected keys"):  # heads present but disabled
        load_official_state_dict(fx["state_dict"], "tiny", encode_align_layer=None)


def test_loading_from_a_file(fx, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(fx["state_dict"], path)
    m = load_official_state_dict(path, "tiny")
    with torch.no_grad():
        _close(m.full_logits(fx["tokens"], fx["classes"]), fx["logits"])
    with pytest.raises(FileNotFoundError):
        load_official_state_dict(tmp_path / "missing.pt", "tiny")
    # a damaged copy of the authors' file is named, with what to do
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UnreadableFileError, match=r"sd\.pt[\s\S]*truncated"):
        load_official_state_dict(path, "tiny")


def _layout(name):
    return json.loads((REF / f"official_rear_{name}_state_dict.json").read_text())


@pytest.mark.parametrize("name,preset,params_no_heads", [("s", "rear_s", 218.40), ("b", "rear_b", 260.92),
                                                          ("l", "rear_l", 461.67)])
def test_official_layouts(name, preset, params_no_heads):
    """Our preset has exactly the official names, shapes and order; parameter counts as listed in docs/paper.md,
    reAR §5 item 1."""
    ref = _layout(name)
    model = build_generator(preset, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(ref["state_dict"])  # same names, same order
    assert ours == ref["state_dict"]
    cfg = model.config
    rc = ref["config"]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.codebook_size, cfg.num_classes, cfg.seq_len) == (
        rc["hidden"], rc["layers"], rc["heads"], rc["codebook_size"], rc["num_classes"], rc["image_seq_len"])
    assert (cfg.encode_align_layer, cfg.decode_align_layer) == (rc["encode_align_layer_idx"], rc["decode_align_layer_idx"])
    assert count_parameters(model, include_heads=True) == ref["num_params"]
    assert round(count_parameters(model) / 1e6, 2) == params_no_heads


def test_meta_state_dict_round_trip_of_a_layout():
    """A state dict with the JSON's shapes loads into the preset (strict) and one with a wrong shape does not."""
    ref = _layout("s")["state_dict"]
    sd = {k: torch.empty(v, device="meta") for k, v in ref.items()}
    model = build_generator("rear_s", device="meta")
    check_state_dict(model, sd)
    sd["pos_embed"] = torch.empty(1, 1024, 768, device="meta")
    with pytest.raises(StateDictMismatchError, match="pos_embed"):
        check_state_dict(model, sd)
