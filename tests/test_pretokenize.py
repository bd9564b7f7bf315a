"""Pretokenization: correct tokens and views, compact storage, cache reuse, refusal of foreign caches."""

import functools

import pytest
import torch

from rearlib.data import EmbeddedDataset, render_batch
from rearlib.tokenizers.pretokenize import (TEN_CROP_NAMES, TokenDataset, load_tokens, make_views, pretokenize,
                                 storage_dtype)
from rearlib.tokenizers import TokenizerMismatchError
from rearlib.tokenizers.vqgan import VQConfig, VQTokenizer

MICRO = dict(resolution=16, base_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, codebook_size=16,
             code_dim=8, norm_groups=4)


def micro(seed=0):
    torch.manual_seed(seed)
    return VQTokenizer(VQConfig(**MICRO)).eval()


@pytest.fixture(autouse=True)
def _artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("REARLIB_ARTIFACTS", str(tmp_path / "artifacts"))


class CountingRender:
    """A render function that counts how many images it produced (to prove a cache was reused)."""

    def __init__(self, resolution=16):
        self.calls, self.resolution = 0, resolution

    def __call__(self, indices, device=None):
        self.calls += len(indices)
        return render_batch(indices, self.resolution, seed=0, split="train", device=device)


def test_tokens_equal_direct_encoding_and_storage_is_compact(tmp_path):
    tok = micro()
    ds = pretokenize(tok, EmbeddedDataset("train", size=10, resolution=16), path=tmp_path / "t.pt",
                     batch_size=4, progress=False)
    x, y = render_batch(torch.arange(10), 16)
    assert ds.tokens.dtype == torch.uint8 and ds.tokens.shape == (10, 1, 16)
    assert torch.equal(ds.grids(), tok.encode(x))
    assert torch.equal(ds.labels, y)
    assert len(ds) == 10 and ds[3][0].dtype == torch.long and ds[3][1] == int(y[3])
    assert storage_dtype(256) == torch.uint8 and storage_dtype(1024) == torch.int16 and storage_dtype(70000) == torch.int32


def test_flip_views(tmp_path):
    tok = micro()
    ds = pretokenize(tok, CountingRender(), size=6, flip=True, path=tmp_path / "f.pt", progress=False)
    x, _ = render_batch(torch.arange(6), 16)
    assert ds.view_names == ("center", "center_flip") and ds.tokens.shape == (6, 2, 16)
    assert torch.equal(ds.grids(1), tok.encode(x.flip(-1)))
    flat, labels = ds.tensors()
    assert flat.shape == (12, 16) and labels.shape == (12,) and torch.equal(flat[1], ds[1][0])
    one, lab = ds.sample_views(torch.Generator().manual_seed(0))
    assert one.shape == (6, 16) and torch.equal(lab, ds.labels)
    assert all(torch.equal(one[i], ds.tokens[i, 0].long()) or torch.equal(one[i], ds.tokens[i, 1].long())
               for i in range(6))


def test_ten_crop_views_follow_torchvision_tencrop():
    x = torch.rand(2, 3, 17, 17)
    v = make_views(x, 16, ten_crop=True, crop_ratio=1.1)   # int(1.1 * 16) = 17: no resize
    assert v.shape == (2, 10, 3, 16, 16)
    assert torch.equal(v[:, 0], x[..., :16, :16]) and torch.equal(v[:, 3], x[..., 1:, 1:])
    assert torch.equal(v[:, 4], x[..., :16, :16])                        # int(round((17 - 16) / 2)) = 0
    y = torch.rand(1, 3, 20, 20)
    assert torch.equal(make_views(y, 16, ten_crop=True, crop_ratio=1.25)[:, 4], y[..., 2:18, 2:18])
    assert torch.equal(v[:, 5], x.flip(-1)[..., :16, :16])                # top-left of the mirrored image
    tok = micro()
    ds = pretokenize(tok, CountingRender(resolution=17), size=3, ten_crop=True, progress=False)
    assert ds.view_names == TEN_CROP_NAMES and ds.tokens.shape == (3, 10, 16)


def test_cache_is_reused_not_recomputed(tmp_path):
    tok = micro()
    render = CountingRender()
    a = pretokenize(tok, render, size=8, path=tmp_path / "c.pt", progress=False)
    assert render.calls == 8
    b = pretokenize(tok, render, size=8, path=tmp_path / "c.pt", progress=False)
    assert render.calls == 8 and torch.equal(a.tokens, b.tokens)
    # different options for the same file are refused unless overwrite=True
    with pytest.raises(ValueError, match="overwrite=True"):
        pretokenize(tok, render, size=8, flip=True, path=tmp_path / "c.pt", progress=False)
    c = pretokenize(tok, render, size=8, flip=True, path=tmp_path / "c.pt", overwrite=True, progress=False)
    assert c.num_views == 2 and load_tokens(tmp_path / "c.pt", tok).num_views == 2


def test_automatic_cache_path_from_a_describable_source(tmp_path):
    tok = micro()
    src = functools.partial(render_batch, resolution=16, split="train", seed=0)
    a = pretokenize(tok, src, size=5, progress=False)
    assert "path" in a.meta and "render_batch" in a.meta["source"]
    b = pretokenize(tok, src, size=5, progress=False)
    assert b.meta.get("path") is None  # came from the cache file (load_tokens), not recomputed
    assert torch.equal(a.tokens, b.tokens)


def test_foreign_tokenizer_cache_is_refused(tmp_path):
    mine, other = micro(0), micro(1)
    pretokenize(mine, CountingRender(), size=4, path=tmp_path / "x.pt", progress=False)
    with pytest.raises(TokenizerMismatchError, match="Re-run pretokenize"):
        load_tokens(tmp_path / "x.pt", other)
    with pytest.raises(TokenizerMismatchError):
        pretokenize(other, CountingRender(), size=4, path=tmp_path / "x.pt", progress=False)
    assert load_tokens(tmp_path / "x.pt", mine.identity()).num_images == 4


def test_bad_inputs(tmp_path):
    tok = micro()
    with pytest.raises(ValueError, match="size is required"):
        pretokenize(tok, CountingRender(), progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        pretokenize(tok, EmbeddedDataset("train", size=3, resolution=16), size=5, progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(Exception):
        load_tokens(tmp_path / "junk.pt", tok)
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a rearlib pretokenized file"):
        load_tokens(tmp_path / "other.pt", tok)
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "absent.pt", tok)
    with pytest.raises(ValueError, match="do not match"):
        TokenDataset(torch.zeros(2, 1, 5, dtype=torch.uint8), torch.zeros(2), grid_size=(4, 4), codebook_size=16,
                     view_names=("center",), tokenizer_identity="x")


def test_resizes_sources_of_another_resolution():
    tok = micro()
    ds = pretokenize(tok, EmbeddedDataset("val", size=4, resolution=32), progress=False)
    assert ds.tokens.shape == (4, 1, 16)


def test_cli_writes_a_token_file(tmp_path, monkeypatch, capsys):
    import rearlib.tokenizers.pretokenize as P
    import rearlib.tokenizers as T

    monkeypatch.setattr(T, "get_tokenizer", lambda scale, device: micro())
    out = tmp_path / "cli.pt"
    assert P.main(["--scale", "smoke", "--size", "6", "--flip", "--out", str(out), "--device", "cpu"]) == 0
    assert "6 images x 2 views" in capsys.readouterr().out
    assert load_tokens(out, micro()).tokens.shape == (6, 2, 16)


def test_a_damaged_cache_entry_is_rebuilt_and_a_damaged_named_file_is_named(tmp_path):
    from pathlib import Path

    from rearlib.runtime import UnreadableFileError

    tok = micro()
    render = CountingRender()
    a = pretokenize(tok, render, size=4, cache_key="counting", progress=False)
    cached = Path(a.meta["path"])
    cached.write_bytes(cached.read_bytes()[:100])  # truncated, as a kill during a copy leaves it
    with pytest.warns(UserWarning, match="cannot be read"):
        b = pretokenize(tok, render, size=4, cache_key="counting", progress=False)
    assert render.calls == 8 and torch.equal(a.tokens, b.tokens)
    named = tmp_path / "mine.pt"
    named.write_bytes(b"")
    with pytest.raises(UnreadableFileError, match=r"mine\.pt is empty"):
        pretokenize(tok, render, size=4, path=named, progress=False)


def test_damaged_tokenizer_checkpoints_name_the_file(tmp_path):
    from rearlib.runtime import UnreadableFileError
    from rearlib.tokenizers import load_tokenizer, save_tokenizer

    good = tmp_path / "tok.pt"
    save_tokenizer(micro(), good)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "short.pt").write_bytes(good.read_bytes()[:200])
    (tmp_path / "noise.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(UnreadableFileError, match=r"empty\.pt is empty"):
        load_tokenizer(tmp_path / "empty.pt")
    for name in ("short.pt", "noise.pt"):
        with pytest.raises(UnreadableFileError, match=rf"{name.replace('.', '[.]')} .*cannot be read"):
            load_tokenizer(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.pt not found"):
        load_tokenizer(tmp_path / "missing.pt")
    assert load_tokenizer(good).identity() == micro().identity()
