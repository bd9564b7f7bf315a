"""The zoo's command line: several variants in one call, each exported where --export says, clear refusals."""

import pytest
import torch

from rearlib.experiments import zoo
from rearlib.tokenizers import get_tokenizer


def test_zoo_train_exports_each_variant_of_one_call(tmp_path, capsys):
    args = ["train", "--scale", "smoke", "--device", "cpu", "--no-progress"]
    assert zoo.main(args + ["--variant", "ar,rear", "--export", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"variant": "ar"' in out and '"variant": "rear"' in out
    tok = get_tokenizer("smoke", "cpu", progress=False)
    for variant in ("ar", "rear"):
        shipped = zoo.load_shipped(tmp_path / f"generator_smoke_{variant}_seed0.pt")
        trained = zoo.get_generator("smoke", variant, tokenizer=tok, progress=False)
        assert shipped.config == trained.config and shipped.state_dict().keys() == trained.state_dict().keys()
        for (name, a), (_, b) in zip(shipped.state_dict().items(), trained.state_dict().items()):
            assert torch.allclose(a, b.float(), atol=2e-3, rtol=1e-2), name  # fp16 shards of the same run
    # a time limit already spent starts nothing, says which variant waits and fails the command
    assert zoo.main(args + ["--variant", "ar", "--time-limit", "1e-9"]) == 3
    out, err = capsys.readouterr()
    assert "ar: not started" in out and "not finished: ar" in err


def test_zoo_train_refuses_bad_variants_and_a_single_file_for_two():
    args = ["train", "--scale", "smoke", "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit, match="--variant 'ar,nope'.*nope"):
        zoo.main(args + ["--variant", "ar,nope"])
    with pytest.raises(SystemExit, match="--variant ',': name at least one preset"):
        zoo.main(args + ["--variant", ","])
    with pytest.raises(SystemExit, match="--export .*one file cannot hold 2 variants"):
        zoo.main(args + ["--variant", "ar,rear", "--export", "pair.pt"])
