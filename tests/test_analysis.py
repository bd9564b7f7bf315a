"""Protocol invariants of rearlib.analysis (the paper's diagnosis experiments A-D) on tiny random models.

Models: PRESETS["tiny"] (16 tokens, K = 32) with random weights; tokenizer: a tiny random VQTokenizer (16 px,
4x4 grid, K = 32). Numbers are meaningless; only the protocols' definitions are checked.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import rearlib.analysis as A
import rearlib.analysis.replacement as replacement
import rearlib.metrics as M
from rearlib.analysis.forced_decoding import _pick
from rearlib.model import build_generator
from rearlib.tokenizers.vqgan import VQConfig, VQTokenizer

N, K = 16, 32


def _randomize(model, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return VQTokenizer(VQConfig(resolution=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                                codebook_size=K, code_dim=16, norm_groups=4)).eval()


@pytest.fixture(scope="module")
def model():
    return _randomize(build_generator("tiny"))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, K, (4, N), generator=g)
    labels = torch.tensor([0, 3, 7, 9])
    return tokens, labels


@pytest.fixture(scope="module")
def clf():
    from rearlib.metrics.classifier import Classifier

    torch.manual_seed(0)
    return Classifier(widths=(8, 16), resolution=16).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAST = dict(metrics=(), progress=False)  # protocol checks that need no image metrics


# ---------------------------------------------------------------------------------------------------------------
# Experiment A
# ---------------------------------------------------------------------------------------------------------------
def test_perfect_and_imperfect_keep_exactly_the_forced_positions(model, tok, data):
    tokens, labels = data
    ratios = (0.25, 0.5, 0.75)
    df, out = A.exposure_bias(model, tok, tokens, labels, ratios=ratios, generator=3, return_outputs=True,
                              batch_size=5, **FAST)
    assert len(df) == 2 * len(ratios) * len(tokens)
    gt = tokens[df["image_id"].tolist()]
    xh, forced = out["tokens"], out["forced"]
    for row, rec in df.iterrows():
        k = math.floor(rec["ratio"] * N)
        assert rec["n_forced"] == k and int(forced[row].sum()) == k
        assert torch.equal(xh[row][forced[row]], gt[row][forced[row]])
        if rec["protocol"] == "perfect":
            assert forced[row, :k].all() and not forced[row, k:].any()
            assert rec["first_error"] >= k
        assert rec["ctr"] == pytest.approx(float((xh[row] == gt[row]).double().mean()))
    # The imperfect subsets are random, not front-loaded (P(all 12 rows are a prefix) is negligible).
    imp = (df["protocol"] == "imperfect").to_numpy()
    prefix = [bool(forced[i, :int(forced[i].sum())].all()) for i in np.nonzero(imp)[0]]
    assert not all(prefix)


def test_free_positions_are_model_draws_given_the_mixed_prefix(model, tok, data):
    """With argmax decoding every non-forced token is the argmax of the model given x̂_<t (teacher forcing on x̂)."""
    tokens, labels = data
    df, out = A.exposure_bias(model, tok, tokens, labels, ratios=(0.5,), protocols=("imperfect",),
                              sampling="argmax", generator=0, return_outputs=True, **FAST)
    xh, forced = out["tokens"], out["forced"]
    with torch.no_grad():
        logits = model(xh, labels).logits
    free = ~forced
    assert torch.equal(logits.argmax(-1)[free], xh[free])
    # Perplexities are those of x̂ and of x under the evaluated prefix (docs/paper.md, reAR §6 item 5), as
    # metrics defines them.
    pp = M.context_perplexities(logits, xh, tokens)
    np.testing.assert_allclose(df["ppl"], pp["evaluated"].numpy(), rtol=1e-4)
    np.testing.assert_allclose(df["ppl_gt"], pp["ground_truth"].numpy(), rtol=1e-4)


def test_ratio_one_is_the_ground_truth_and_zero_error(model, tok, data, clf):
    tokens, labels = data
    imgs = tok.decode(tokens)  # "real" images = reconstructions, so the real-image metrics are exact too
    df = A.exposure_bias(model, tok, tokens, labels, images=imgs, ratios=(1.0,), perceptual="dfd", classifier=clf,
                         generator=0, progress=False)
    assert (df["ctr"] == 1.0).all() and (df["first_error"] == N).all() and df["ctr_free"].isna().all()
    for ref in ("", "_recon"):
        assert np.isinf(df["psnr" + ref]).all()
        np.testing.assert_allclose(df["ssim" + ref], 1.0)
        np.testing.assert_allclose(df["perceptual" + ref], 0.0, atol=1e-9)
    assert (df["perceptual_metric"] == M.DFD_NAME).all()
    np.testing.assert_allclose(df["ppl"], df["ppl_gt"])


def test_cached_and_recomputed_decoding_agree_and_cfg_runs(model, tok, data):
    tokens, labels = data
    for cfg in (None, 2.5):
        a = A.exposure_bias(model, tok, tokens, labels, ratios=(0.3,), generator=5, cfg_scale=cfg, **FAST)
        b = A.exposure_bias(model, tok, tokens, labels, ratios=(0.3,), generator=5, cfg_scale=cfg, use_cache=False,
                            **FAST)
        pd.testing.assert_series_equal(a["ctr"], b["ctr"])
        np.testing.assert_allclose(a["ppl"], b["ppl"], rtol=1e-4)


def test_greedy_unforced_decoding_matches_the_sampler(model, data):
    """Cross-check with rearlib.sample: no forced positions + argmax = greedy sampling (with and without CFG)."""
    from rearlib.sample import generate

    tokens, labels = data
    none = torch.zeros(len(tokens), N, dtype=torch.bool)
    for cfg in (None, 3.0):
        xh, _, _ = A.forced_decode(model, tokens, none, labels, sampling="argmax", cfg_scale=cfg, cfg_power=0.0)
        ref = generate(model, labels, cfg_scale=cfg, temperature=0.0, fast=False)
        assert torch.equal(xh, ref)


def test_multinomial_draws_follow_the_model_distribution(model):
    """The inverse-CDF draw is an exact multinomial: empirical frequencies match softmax(logits / T)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, K, generator=g) * 2
    R = 20000
    u = 1.0 - torch.rand(R, generator=g, dtype=torch.float64)
    ids = _pick(logits.expand(R, K), u, "multinomial", 1.0)
    freq = torch.bincount(ids, minlength=K).double() / R
    p = torch.softmax(logits[0].double(), -1)
    assert float((freq - p).abs().max()) < 4 * math.sqrt(float(p.max()) / R)


def test_determinism_and_batch_independence(model, tok, data):
    tokens, labels = data
    kw = dict(ratios=(0.2, 0.6), **FAST)
    a = A.exposure_bias(model, tok, tokens, labels, generator=torch.Generator().manual_seed(11), batch_size=64, **kw)
    b = A.exposure_bias(model, tok, tokens, labels, generator=torch.Generator().manual_seed(11), batch_size=3, **kw)
    c = A.exposure_bias(model, tok, tokens, labels, generator=torch.Generator().manual_seed(12), **kw)
    pd.testing.assert_frame_equal(a.drop(columns="ppl"), b.drop(columns="ppl"))
    np.testing.assert_allclose(a["ppl"], b["ppl"], rtol=1e-5)
    assert not a["ppl"].equals(c["ppl"])
    # Common random numbers: at r = 0 both protocols are the same free-running draw.
    z = A.exposure_bias(model, tok, tokens, labels, ratios=(0.0,), generator=4, **FAST)
    pd.testing.assert_series_equal(z[z.protocol == "perfect"]["ctr"].reset_index(drop=True),
                                   z[z.protocol == "imperfect"]["ctr"].reset_index(drop=True))


# ---------------------------------------------------------------------------------------------------------------
# Experiment B
# ---------------------------------------------------------------------------------------------------------------
def test_codebook_neighbours_match_brute_force_and_tokenizer(tok):
    nb = A.codebook_neighbours(tok)
    z = torch.nn.functional.normalize(tok.codebook.double(), dim=1)
    sim = z @ z.T
    for k in range(K):
        others = [j for j in range(K) if j != k]
        s = sim[k, others]
        assert others[int(s.argmax())] == int(nb["nearest"][k])
        assert others[int(s.argmin())] == int(nb["farthest"][k])
    assert torch.equal(nb["nearest"], tok.nearest_codes(1)[:, 0])
    assert (nb["nearest"] != torch.arange(K)).all() and (nb["farthest"] != torch.arange(K)).all()


def test_replacement_keeps_ctr_and_uses_true_token_neighbours(model, tok, data, clf):
    tokens, labels = data
    df, out = A.embedding_replacement(model, tok, tokens, labels, r_primes=(0.0, 0.5, 1.0), generator=2,
                                      perceptual="dfd", classifier=clf, metrics=("psnr", "perceptual"),
                                      return_outputs=True, batch_size=10, progress=False)
    assert len(df) == 3 * 3 * len(tokens)
    pred = A.teacher_forced_predictions(model, tokens, labels)
    ctr_tf = (pred == tokens).double().mean(1)
    nb = A.codebook_neighbours(tok)
    for row, rec in df.iterrows():
        i = rec["image_id"]
        seq, gt, p = out["tokens"][row], tokens[i], pred[i]
        assert rec["ctr"] == pytest.approx(float(ctr_tf[i]))
        wrong = p != gt
        changed = seq != p
        assert not (changed & ~wrong).any()                      # only wrong positions are touched
        assert (seq[changed] != gt[changed]).all()
        if rec["mode"] in ("nearest", "farthest"):
            table = nb[rec["mode"]]
            assert torch.equal(seq[changed], table[gt[changed]])
            if rec["r_prime"] == 1.0:                            # every wrong position replaced
                assert torch.equal(seq[wrong], table[gt[wrong]])
        if rec["r_prime"] == 1.0:
            assert rec["n_replaced"] == rec["n_wrong"] == int(wrong.sum())
        if rec["r_prime"] == 0.0:
            assert torch.equal(seq, p) and rec["ppl_delta"] == 0.0 and rec["n_replaced"] == 0
        assert rec["n_changed"] == int(changed.sum())
    # Nested selections: the same positions for every mode at a given r'.
    for r in (0.5, 1.0):
        n = df[df.r_prime == r].pivot(index="image_id", columns="mode", values="n_replaced")
        assert (n.nunique(axis=1) == 1).all()
    assert (df["perceptual_metric"] == M.DFD_NAME).all() and "psnr" not in df  # no real images given
    assert df["psnr_recon"].notna().all() and df["ssim_recon"].isna().all()
    # Farthest codes are less similar to the truth than nearest ones (at equal positions and CTR).
    full = df[df.r_prime == 1.0].groupby("mode")["emb_sim_wrong"].mean()
    assert full["farthest"] < full["random"] < full["nearest"]
    assert (df[df.r_prime == 1.0].set_index(["image_id", "mode"])["emb_sim_all"].unstack()
            .pipe(lambda t: (t["farthest"] <= t["nearest"]).all()))


def test_replacement_raises_if_ctr_would_change(model, tok, data, monkeypatch):
    tokens, labels = data
    ident = torch.arange(K)
    monkeypatch.setattr(replacement, "codebook_neighbours", lambda cb: {"nearest": ident, "farthest": ident})
    with pytest.raises(RuntimeError, match="changed the CTR"):
        A.embedding_replacement(model, tok, tokens, labels, r_primes=(1.0,), modes=("nearest",), **FAST)


def test_replacement_is_deterministic(model, tok, data):
    tokens, labels = data
    kw = dict(r_primes=(0.4,), modes=("random", "nearest"), **FAST)
    a = A.embedding_replacement(model, tok, tokens, labels, generator=7, **kw)
    b = A.embedding_replacement(model, tok, tokens, labels, generator=7, batch_size=2, **kw)
    pd.testing.assert_frame_equal(a.drop(columns=[c for c in a if c.startswith("ppl")]),
                                  b.drop(columns=[c for c in b if c.startswith("ppl")]))
    assert list(a["r_prime"].unique()) == [0.4]  # r' = 0 computed as the baseline but not returned


# ---------------------------------------------------------------------------------------------------------------
# Experiment C
# ---------------------------------------------------------------------------------------------------------------
def test_perturb_context_noise_rate():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, K, (50, N), generator=g)
    noisy, rep = A.perturb_context(t, 0.2, K, [torch.Generator().manual_seed(i) for i in range(50)])
    n = round(0.2 * (N - 1))
    assert (rep.sum(1) == n).all() and not rep[:, -1].any()
    assert torch.equal(noisy != t, rep)                           # every chosen token really changed
    assert torch.equal(noisy[~rep], t[~rep])


def test_robustness_rows(model, data):
    tokens, labels = data
    df = A.robustness(model, tokens, labels, noise_fraction=0.2, repeats=2, generator=1, progress=False)
    assert len(df) == len(tokens) * 3
    clean = df[df.condition == "clean"].sort_values("image_id")
    pred = A.teacher_forced_predictions(model, tokens, labels)
    np.testing.assert_allclose(clean["ctr"], (pred == tokens).double().mean(1).numpy())
    noisy = df[df.condition == "noisy"]
    assert (noisy["n_replaced"] == round(0.2 * (N - 1))).all()
    np.testing.assert_allclose(noisy["noise_rate"], round(0.2 * (N - 1)) / (N - 1))
    assert (clean["n_replaced"] == 0).all() and clean["ctr_after_noisy"].isna().all()
    again = A.robustness(model, tokens, labels, noise_fraction=0.2, repeats=2, generator=1, progress=False)
    pd.testing.assert_frame_equal(df, again)


# ---------------------------------------------------------------------------------------------------------------
# Experiment D
# ---------------------------------------------------------------------------------------------------------------
def test_streaming_cka_equals_metrics():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g) + 5.0
    Y = X[:, :6] @ torch.randn(6, 9, generator=g) + 0.5 * torch.randn(300, 9, generator=g)
    acc = A.StreamingLinearCKA()
    for s in range(0, 300, 37):
        acc.update(X[s:s + 37], Y[s:s + 37])
    assert acc.value() == pytest.approx(M.linear_cka(X, Y), rel=1e-9)
    assert acc.value() == pytest.approx(M.linear_cka_gram(X, Y), rel=1e-9)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert A.StreamingLinearCKA().update(X, 3 * X.double() @ Q + 1).value() == pytest.approx(1.0, abs=1e-12)


def test_cka_is_one_for_an_isometric_copy_of_the_codebook(tok, data):
    """Tied-codebook model whose (identity, adaLN-Zero) blocks carry s * Q z(x_t): encoded CKA = 1 at every layer."""
    tokens, labels = data
    m = build_generator("tiny", tied_codebook=True).eval()
    m.set_codebook(tok.codebook)
    with torch.no_grad():
        m.pos_embed.zero_()
        m.target_aware_pos_embed.zero_()
        Q, _ = torch.linalg.qr(torch.randn(m.config.hidden, m.config.z_dim, generator=torch.Generator().manual_seed(0)))
        m.codebook_in.weight.copy_(2.0 * Q)
    df = A.cka_layers(m, tok, tokens, labels, progress=False)
    enc = df[df.target == "encoded"]
    np.testing.assert_allclose(enc["cka"], 1.0, atol=1e-9)
    assert (enc["n_rows"] == len(tokens) * N).all()
    dec = df[df.target == "decoded"]
    assert (dec["cka"] < 0.99).all() and (dec["n_rows"] == len(tokens) * (N - 1)).all()
    assert df.groupby("target")["is_peak"].sum().eq(1).all()


def test_cka_rows_match_direct_computation(model, tok, data):
    tokens, labels = data
    df = A.cka_layers(model, tok, tokens, labels, layers=[1, 3], batch_size=3, include_class_position=True,
                      progress=False)
    with torch.no_grad():
        feats = model.forward_features(tokens, labels, [1, 3])
    z = tok.codebook.detach()[tokens]
    for l in (1, 3):
        h = feats[l]
        enc = M.linear_cka(h[:, 2:].reshape(-1, h.shape[-1]), z.reshape(-1, z.shape[-1]))
        Xd = torch.cat([h[:, 2:N + 1].reshape(-1, h.shape[-1]), h[:, 1]])
        Yd = torch.cat([z[:, 1:].reshape(-1, z.shape[-1]), z[:, 0]])
        got = df.set_index(["target", "layer"])["cka"]
        assert got[("encoded", l)] == pytest.approx(enc, rel=1e-6)
        assert got[("decoded", l)] == pytest.approx(M.linear_cka(Xd, Yd), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Helpers and input checks
# ---------------------------------------------------------------------------------------------------------------
def test_mean_ci():
    df = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 2, "v": [1.0, 2.0, 3.0, np.inf, 5.0, 7.0]})
    out = A.mean_ci(df, ["g"], ["v"]).set_index("g")
    from scipy import stats

    assert out.loc["a", "n"] == 3 and out.loc["a", "n_nonfinite"] == 1 and out.loc["a", "mean"] == 2.0
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert out.loc["a", "ci_high"] == pytest.approx(2.0 + half)
    assert out.loc["b", "ci_low"] == pytest.approx(6.0 - stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2))


def test_paper_reference():
    a = A.paper_reference("exposure_bias")
    assert len(a) == 18 and set(a.protocol) == {"perfect", "imperfect"}
    # The paper's claim: at matched CTR the imperfect context is perceptually worse at every point.
    p = a.pivot(index="ratio", columns="protocol", values="perceptual")
    assert (p["imperfect"] > p["perfect"]).all()
    b = A.paper_reference("B")
    assert list(b.r_prime) == list(A.R_PRIMES) and b.perceptual.is_monotonic_decreasing
    c = A.paper_reference("C")
    assert len(c) == 8 and c.ctr.between(0, 1).all()
    d = A.paper_reference("cka")
    assert d[(d.model == "reAR") & (d.target == "decoded")].set_index("layer").cka.idxmax() == 15
    with pytest.raises(ValueError, match="unknown experiment"):
        A.paper_reference("E")


def test_bad_inputs(model, tok, data):
    tokens, labels = data
    with pytest.raises(ValueError, match="ratios"):
        A.exposure_bias(model, tok, tokens, labels, ratios=(1.5,), **FAST)
    with pytest.raises(ValueError, match="labels"):
        A.exposure_bias(model, tok, tokens, labels + 20, **FAST)
    with pytest.raises(ValueError, match="ids must be image codes"):
        A.robustness(model, tokens + K, labels, progress=False)
    with pytest.raises(ValueError, match="protocols"):
        A.exposure_bias(model, tok, tokens, labels, protocols=("front",), **FAST)
    other = VQTokenizer(VQConfig(resolution=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                                 codebook_size=64, code_dim=16, norm_groups=4))
    with pytest.raises(ValueError, match="codebook_size"):
        A.embedding_replacement(model, other, tokens, labels, **FAST)
    with pytest.raises(TypeError, match="generator"):
        A.robustness(model, tokens, labels, generator="seed", progress=False)


@pytest.mark.parametrize("kind", ["images", "tokens"])
def test_an_empty_image_set_is_refused_by_every_analysis(model, tok, kind):
    """0 images (e.g. a notebook's n_images = 0) fail with a message about the image count, not inside torch."""
    data = torch.rand(0, 3, 16, 16) if kind == "images" else torch.zeros(0, N, dtype=torch.long)
    labels = torch.zeros(0, dtype=torch.long)
    runs = {"exposure_bias": lambda: A.exposure_bias(model, tok, data, labels, **FAST),
            "embedding_replacement": lambda: A.embedding_replacement(model, tok, data, labels, **FAST),
            "robustness": lambda: A.robustness(model, data, labels, tokenizer=tok, progress=False),
            "cka_layers": lambda: A.cka_layers(model, tok, data, labels, progress=False)}
    if kind == "images":
        runs["encode_images"] = lambda: A.encode_images(tok, data)
    else:
        runs["teacher_forced_predictions"] = lambda: A.teacher_forced_predictions(model, data, labels)
    for name, run in runs.items():
        with pytest.raises(ValueError, match="at least one image") as e:
            run()
        assert "0 images" in str(e.value), name


def test_image_data_are_encoded(model, tok, data):
    tokens, labels = data
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    df = A.robustness(model, imgs, labels[:2], tokenizer=tok, progress=False)
    direct = A.robustness(model, tok.encode(imgs), labels[:2], progress=False)
    pd.testing.assert_frame_equal(df, direct)
    with pytest.raises(ValueError, match="tokenizer"):
        A.robustness(model, imgs, labels[:2], progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Statistics helpers and the paper's numbers
# ---------------------------------------------------------------------------------------------------------------
def test_welch_diff_matches_scipy_welch_test():
    from scipy import stats

    a = np.array([1.0, 2.0, 3.0, 4.5, 2.2])
    b = np.array([0.0, 1.0, 1.5])
    e = A.welch_diff(a, b)
    t = stats.ttest_ind(a, b, equal_var=False)
    d = a.mean() - b.mean()
    half = stats.t.ppf(0.975, t.df) * d / t.statistic      # se = d / t
    assert e["mean"] == pytest.approx(d) and e["n"] == 8
    assert e["lo"] == pytest.approx(d - half) and e["hi"] == pytest.approx(d + half)
    same = A.welch_diff([2.0, 2.0], [1.0, 1.0])            # no spread: a zero-width interval
    assert same["lo"] == same["hi"] == 1.0


def test_format_ci():
    e = {"mean": 0.1234, "lo": -0.0100, "hi": 0.25, "n": 3}
    assert A.format_ci(e) == "+0.123 [95% CI -0.010, +0.250]"
    assert A.format_ci(e, 2, " pp") == "+0.12 pp [95% CI -0.01, +0.25]"
    assert A.format_ci(e, 1, words=True) == "+0.1 (95% CI -0.0 to +0.2)"


def test_paper_numbers_agree_with_the_paper_setting_in_the_code():
    from rearlib.analysis import paper_numbers as PN
    from rearlib.model import PRESETS
    from rearlib.tokenizers.maskgit_vqgan import MaskGITVQGANConfig

    cfg = MaskGITVQGANConfig()
    assert (PN.TOKENIZER["resolution"], PN.TOKENIZER["codebook_size"], PN.TOKENIZER["code_dim"]) == (
        cfg.resolution, cfg.codebook_size, cfg.z_channels)
    assert PN.TOKENIZER["downsampling"] == 2 ** (cfg.num_resolutions - 1)
    rear_s = PRESETS["rear_s"]
    assert (PN.ANALYSIS_DEPTH, PN.ANALYSIS_HIDDEN) == (rear_s.depth, rear_s.hidden)
    assert (PN.ENCODE_LAYER, PN.DECODE_LAYER) == (rear_s.encode_align_layer, rear_s.decode_align_layer)
    assert PN.CKA_LAYERS[-1] == PN.ANALYSIS_DEPTH - 1


def test_paper_number_views():
    from rearlib.analysis import paper_numbers as PN

    gap = PN.exposure_bias_gap()
    assert list(gap.index) == sorted(PN.EXPOSURE_BIAS)
    assert gap.loc[0.1, "perceptual"] == pytest.approx(0.06) and gap.loc[0.1, "psnr"] == pytest.approx(-1.0)
    assert gap["perceptual"].mean() == pytest.approx(0.61 / 9)
    ctr = PN.robustness_percent()
    assert ctr[("reAR", "unseen", "noisy")] == 9.0 and len(ctr) == 8
    cka = PN.cka_values()
    assert cka[("reAR", "decoded", PN.DECODE_LAYER)] == 0.130 and cka.index.is_monotonic_increasing
    c = A.paper_reference("C")
    assert set(c.loc[c.condition == "noisy", "noise_fraction"]) == {PN.NOISE_FRACTION}


def test_cost_cli_documents_every_option(capsys):
    from rearlib.analysis.cost import main

    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m rearlib analysis benchmark")
    for option, text in (("--preset PRESET", "generator architecture"), ("--images IMAGES", "images timed"),
                         ("--batch-size BATCH_SIZE", "rows per model call"), ("--device DEVICE", "torch device"),
                         ("--out OUT", "write the result JSON")):
        assert f"{option} {text}" in out


# ---------------------------------------------------------------------------------------------------------------
# From rows to the notebooks' verdicts (synthetic rows with known effects)
# ---------------------------------------------------------------------------------------------------------------
def test_run_per_model_stacks_and_names_the_models(capsys):
    def analysis(model, x, *, scale):
        return pd.DataFrame({"value": [model * x, model * x + scale]})

    df = A.run_per_model(analysis, {"ar": 1, "rear": 10}, 2, scale=0.5)
    assert list(df.columns) == ["model", "value"] and list(df["model"]) == ["AR", "AR", "reAR", "reAR"]
    assert list(df["value"]) == [2, 2.5, 20, 20.5] and list(df.index) == [0, 1, 2, 3]
    assert "reAR: 2 rows" in capsys.readouterr().out


def _exposure_rows(gap=0.1, models=("AR", "reAR")):
    """Rows of exposure_bias: imperfect is worse by `gap` perceptual and 0.5 dB, and at r = 0.5 its perplexity is
    lower by 3 (plus per-image noise)."""
    g = np.random.default_rng(0)
    rows = []
    for m in models:
        for i in range(8):
            for r in (0.1, 0.5):
                for p in ("perfect", "imperfect"):
                    worse = p == "imperfect"
                    rows.append({"model": m, "image_id": i, "repeat": 0, "protocol": p, "ratio": r,
                                 "perceptual": 0.5 - r / 2 + gap * worse + 0.01 * g.standard_normal(),
                                 "psnr": 15 + 5 * r - 0.5 * worse + 0.05 * g.standard_normal(),
                                 "ppl": 40 - (3 if worse and r == 0.5 else 0) + 0.1 * g.standard_normal(),
                                 "ctr": r + 0.01 * worse})
    return pd.DataFrame(rows)


def test_paired_diff_is_imperfect_minus_perfect_per_image():
    rows = _exposure_rows()
    d = A.paired_diff(rows[rows.model == "AR"], "psnr")
    assert d.shape == (8, 2) and list(d.columns) == [0.1, 0.5]
    one = rows[(rows.model == "AR") & (rows.image_id == 3) & (rows.ratio == 0.5)].set_index("protocol")["psnr"]
    assert d.loc[(3, 0), 0.5] == pytest.approx(one["imperfect"] - one["perfect"])


def test_exposure_bias_findings():
    rows = _exposure_rows()
    f = A.exposure_bias_findings(rows, [0.1, 0.5], "ST-LPIPS(alex)", "small", 64)
    e = f.effects[("AR", "perceptual")]
    assert e["mean"] == pytest.approx(A.paired_diff(rows[rows.model == "AR"], "perceptual").mean(axis=1).mean())
    assert 0.08 < e["lo"] < 0.1 < e["hi"] < 0.12 and e["n"] == 8
    table = f.tables["05_exposure_bias_paired_differences"]
    assert len(table) == 2 * 4 * 2 and (table["perceptual_metric"] == "ST-LPIPS(alex)").all()
    lp, ps, ppl = f.claims
    assert lp["verdict"] == ps["verdict"] == "direction reproduced"   # not comparable at small scale
    assert lp["paper"].startswith("LPIPS imperfect - perfect = +0.068 on average over r = 0.1..0.9")
    assert "CI > 0 at 2/2 ratios" in lp["ours"] and lp["note"] == "magnitude not comparable: ST-LPIPS(alex) at 64 px"
    assert ps["paper"].startswith("PSNR imperfect - perfect = -0.42 dB")
    # Lower perplexity (CI < 0) at r = 0.5 only, where imperfect is still worse: the claim holds.
    assert ppl["verdict"] == "direction reproduced" and "lower (CI < 0) at r = [0.5]" in ppl["ours"]
    assert "perplexity ~1450-1950" in ppl["paper"]
    assert len(f.notes) == 1 and f.notes[0].startswith("reAR vs AR (not a paper claim): exposure-bias gap")
    smoke = A.exposure_bias_findings(rows, [0.1, 0.5], "ST-LPIPS(alex)", "smoke", 32)
    assert all(c["verdict"] == "not tested" for c in smoke.claims)
    assert smoke.claims[0]["note"].endswith("(the rule would give 'direction reproduced')")
    assert smoke.rule["perceptual"] == "direction reproduced"
    # No effect (and only AR): not reproduced; perplexity never lower, so that claim is not tested.
    flat = _exposure_rows(gap=0.0, models=("AR",))
    flat["ppl"] = 40.0 + np.arange(len(flat)) % 3
    f0 = A.exposure_bias_findings(flat, [0.1, 0.5], "ST-LPIPS(alex)", "small", 64)
    assert f0.claims[0]["verdict"] == "not reproduced" and f0.claims[2]["verdict"] == "not tested" and not f0.notes


def _replacement_rows():
    """AR rows of embedding_replacement at r' = 0 and 0.8: nearest improves, random less, farthest worsens."""
    g = np.random.default_rng(1)
    effect = {"nearest": -0.05, "random": 0.0, "farthest": 0.05}
    rows = []
    for m in ("AR", "reAR"):
        for i in range(6):
            for mode, d in effect.items():
                for r in (0.0, 0.8):
                    k = r / 0.8
                    noise = 0.002 * g.standard_normal()
                    rows.append({"model": m, "image_id": i, "repeat": 0, "mode": mode, "r_prime": r,
                                 "perceptual": 0.6 + k * d + noise, "perceptual_delta": k * d + noise,
                                 "psnr_delta": -k * d * 10 + noise, "emb_sim_wrong": 0.5 + 0.1 * (m == "reAR"),
                                 "emb_sim_wrong_delta": -k * d + noise, "ppl_delta": 20 * k + noise,
                                 "n_changed": 4 * k, "n_wrong": 5})
    return pd.DataFrame(rows)


def test_replacement_findings():
    rows = _replacement_rows()
    f = A.replacement_findings(rows, 0.8, "ST-LPIPS(alex)", "small")
    assert [c["verdict"] for c in f.claims] == ["direction reproduced"] * 5
    assert f.effects["perceptual_delta"]["mean"] == pytest.approx(
        A.replacement_values(rows, "AR", "nearest", 0.8, "perceptual_delta").mean())
    assert f.effects["random-nearest"]["mean"] == pytest.approx(0.05, abs=0.01)
    assert f.claims[0]["paper"] == "-0.048 (perceptual; Fig. 3b/8e-g, LPIPS)"
    assert f.claims[3]["paper"] == "+390 (ppl_delta; Fig. 3b/8e-g)"
    assert f.claims[0]["claim"].endswith("(r′ = 0 → 0.8)") and " ST-LPIPS(alex), n = 6 images" in f.claims[0]["ours"]
    table = f.tables["06_embedding_replacement_effects"]
    assert list(table["effect"]) == ["perceptual_delta", "psnr_delta", "emb_sim_wrong_delta", "ppl_delta",
                                     "random-nearest", "farthest-random"]
    assert (table["r_prime"] == 0.8).all()
    assert f.values["rear_minus_ar_similarity"]["mean"] == pytest.approx(0.1)
    assert f.notes[0].startswith("reAR vs AR (not a paper claim): cosine")
    # Without the paper's r' the paper column reads n/a.
    assert A.replacement_findings(rows.replace({"r_prime": {0.8: 0.7}}), 0.7, "x", "small").claims[0][
        "paper"].startswith("n/a")


def _robustness_rows():
    """CTR (%) per image: reAR +1 pp on unseen data; noise costs AR 3 pp and reAR 2 pp; AR overfits by 1 pp."""
    g = np.random.default_rng(2)
    rows = []
    for m in ("AR", "reAR"):
        for data in ("trained", "unseen"):
            for i in range(10):
                base = 12 + 0.5 * g.standard_normal()
                for cond in ("clean", "noisy"):
                    v = base + (m == "reAR") * (1 if data == "unseen" else 0) + (m == "AR") * (data == "trained")
                    v -= (3 if m == "AR" else 2) * (cond == "noisy")
                    rows.append({"model": m, "data": data, "condition": cond, "image_id": i + 100 * (data == "unseen"),
                                 "ctr_percent": v + 0.05 * g.standard_normal()})
    return pd.DataFrame(rows)


def test_robustness_findings():
    rows = _robustness_rows()
    f = A.robustness_findings(rows, 0.1, "small", {"trained": 10, "unseen": 10}, "a short schedule")
    assert len(f.claims) == 8
    e = f.effects["reAR - AR, unseen, clean"]
    diff = A.robustness_per_image(rows, "reAR", "unseen", "clean") - A.robustness_per_image(rows, "AR", "unseen",
                                                                                          "clean")
    assert e["mean"] == pytest.approx(diff.mean()) and e["n"] == 10
    assert f.effects["gap(AR) - gap(reAR), clean"]["n"] == 20      # Welch over two independent samples
    assert f.effects["drop(AR) - drop(reAR), unseen"]["mean"] == pytest.approx(1.0, abs=0.1)
    verdicts = {c["claim"]: c["verdict"] for c in f.claims}
    assert set(verdicts.values()) == {"direction reproduced"}
    assert f.claims[0]["paper"] == "12.3% vs 11.8% (+0.5 pp; Fig. 9a)"
    assert f.claims[2]["note"] == "our training: a short schedule" and "n = 10 + 10 images" in f.claims[2]["ours"]
    assert f.claims[4]["claim"].startswith("reAR is more robust to 10% random context noise")
    assert f.values["paper_diff"]["reAR - AR, unseen, clean"] == pytest.approx(0.5)
    assert list(f.tables["07_robustness_effects"]["effect"]) == list(f.effects)


def _cka_rows(depth=4, folds=3):
    """Per-fold CKA: encoded decays from the input, decoded peaks at layer 2 of 0..3; reAR above AR."""
    g = np.random.default_rng(3)
    rows = []
    for m, lift in (("AR", 0.0), ("reAR", 0.05)):
        for f in range(folds):
            for target in A.CKA_TARGETS:
                for layer in range(depth):
                    v = 0.5 - 0.1 * layer if target == "encoded" else 0.1 + 0.05 * min(layer, 2) - 0.08 * (layer == 3)
                    rows.append({"model": m, "fold": str(f), "target": target, "layer": layer, "n_images": 2,
                                 "cka": v + lift + 0.001 * g.standard_normal()})
    return pd.DataFrame(rows)


def test_cka_findings():
    from rearlib.plots import wide_ci

    fold_rows = _cka_rows()
    wide = wide_ci(A.mean_ci(fold_rows, by=["model", "target", "layer"], values=["cka"]), ["model", "target", "layer"])
    f = A.cka_findings(fold_rows, wide, 4, 0, 2, 6, "small")
    assert f.values["peaks"] == {("AR", "encoded"): 0, ("AR", "decoded"): 2, ("reAR", "encoded"): 0,
                                 ("reAR", "decoded"): 2}
    assert f.values["target_layer"] == pytest.approx(15 / 19 * 3) and f.values["near"]
    assert [c["verdict"] for c in f.claims] == ["reproduced", "reproduced", "reproduced", "direction reproduced",
                                                "direction reproduced"]
    assert "3 folds, 6 images" in f.claims[0]["ours"] and "(layer 0 → 19 of 20)" in f.claims[0]["paper"]
    assert f.claims[2]["paper"] == "peak at layer 15 of 20 (relative 0.79), lower at 19, for AR and reAR"
    assert f.claims[4]["paper"] == "layer 15: AR 0.099 → reAR 0.130 (+0.031, digitised ±0.005)"
    assert f.effects["reAR - AR, decoded"]["mean"] == pytest.approx(0.05, abs=0.003)
    assert f.effects["reAR - AR, decoded"]["n"] == 3
    m = A.cka_fold_matrix(fold_rows, "AR", "encoded")
    assert m.shape == (3, 4) and list(m.index) == ["0", "1", "2"]
    smoke = A.cka_findings(fold_rows, wide, 4, 0, 2, 6, "smoke")
    assert {c["verdict"] for c in smoke.claims} == {"not tested"}
    # A decoded curve that rises to the last block: the peak is the last block, the claim fails.
    rising = fold_rows.copy()
    dec = rising.target == "decoded"
    rising.loc[dec, "cka"] = 0.1 + 0.05 * rising.loc[dec, "layer"]
    w2 = wide_ci(A.mean_ci(rising, by=["model", "target", "layer"], values=["cka"]), ["model", "target", "layer"])
    f2 = A.cka_findings(rising, w2, 4, 0, 2, 6, "small")
    assert f2.claims[2]["verdict"] == "not reproduced" and "peak is the last block" in f2.claims[2]["ours"]


def test_cka_peaks_break_ties_towards_the_lower_layer():
    wide = pd.DataFrame({"model": ["AR"] * 3, "target": ["decoded"] * 3, "layer": [2, 0, 1], "cka": [0.3, 0.1, 0.3]})
    assert A.cka_peaks(wide) == {("AR", "decoded"): 1}
