"""DDP: two gloo processes on CPU run rearlib.train.train as torchrun would launch it."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported here, before the fork, so that the children inherit them instead of each importing them again (the
# optimizer and DDP pull in torch._dynamo, which is slow to import without a bytecode cache).
import torch._dynamo  # noqa: E402,F401
from torch.nn.parallel import DistributedDataParallel  # noqa: E402,F401

from rearlib.rear import get_rear_config
from rearlib.train import TrainConfig, train

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (64,), generator=g)
    tokens = (labels[:, None] * 3 + torch.arange(16)[None]) % 32
    return tokens, labels, torch.randn(32, 16, generator=g)


def _cfg() -> TrainConfig:
    return TrainConfig(model="tiny", rear=get_rear_config("rear"), steps=16, batch_size=8, grad_accum=2,
                       warmup_steps=2, lr=2e-3, log_every=4, ckpt_every=8, seed=0)


def _worker(rank: int, out: str, port: int, stop_at) -> None:
    torch.set_num_threads(1)
    # What torchrun sets for each process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    tokens, labels, cb = _data()
    res = train(_cfg(), tokens, labels, cb, os.path.join(out, "run"), device="cpu", progress=False, stop_at=stop_at)
    torch.save(res["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({k: res[k] for k in ("history", "status", "step", "world_size", "global_batch")}, fh)
    assert not dist.is_initialized()  # train() tears down the group it created


def _launch(out, stop_at=None) -> None:
    # fork: the children reuse the already imported torch (a spawn would re-import it in every process).
    mp.start_processes(_worker, args=(str(out), _free_port(), stop_at), nprocs=WORLD, start_method="fork",
                       join=True)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_ranks_stay_identical_and_learn(tmp_path):
    _launch(tmp_path / "a")
    sd0 = torch.load(tmp_path / "a" / "rank0.pt", weights_only=True)
    sd1 = torch.load(tmp_path / "a" / "rank1.pt", weights_only=True)
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    r0 = json.loads((tmp_path / "a" / "rank0.json").read_text())
    assert r0["world_size"] == WORLD and r0["global_batch"] == 8 * 2 * WORLD
    hist = r0["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.3
    # rank 0 wrote the files; the checkpoint carries one RNG state per rank
    ck = torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == WORLD and len(ck["rng"]) == WORLD
    assert not torch.equal(ck["rng"][0]["noise"], ck["rng"][1]["noise"])  # per-rank noise streams

    # Stop at step 8 and resume with two processes again: the same weights as the uninterrupted run.
    _launch(tmp_path / "b", stop_at=8)
    assert json.loads((tmp_path / "b" / "rank0.json").read_text())["status"] == "stopped"
    _launch(tmp_path / "b")
    sdb = torch.load(tmp_path / "b" / "rank0.pt", weights_only=True)
    assert all(torch.equal(sd0[k], sdb[k]) for k in sd0)
