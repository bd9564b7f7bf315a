"""Several `small` trainings sharing one GPU: the aggregate training throughput of K concurrent processes against one.

The question behind ``python -m rearlib studies run --procs-per-gpu K``: the small generator (8 x 256) keeps a large
GPU busy only in part, so do K runs side by side train more samples per second in all than one run alone? For each
K the script starts K worker processes at once, each training the zoo's small recipe (batch 256, bf16,
torch.compile, fused AdamW) on synthetic tokens of the small shape (256 tokens, K = 1024, 10 classes) for a fixed
number of steps. The headline is the workers' samples/s together over the interval where every one of them is past
its first logging window (which holds compilation) and still training; each worker's own steady-state samples/s
and the group's wall time (compilation included) are kept beside it. All counts are measured in this one invocation, so the ratios compare rows
of one machine.

Run from the repository root on a CUDA machine:
    python benchmarks/training_step/shared_gpu.py [--ks 1,2,3] [--steps 600] [--batch 256] [--variant rear]
Writes $OUT/shared_gpu.json (default OUT: artifacts/bench).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402

from benchmarks.common import out_path  # noqa: E402


def worker(variant: str, steps: int, batch: int, seed: int, device: str) -> dict:
    from rearlib.rear import PRESETS
    from rearlib.train import train
    from rearlib.train_config import TrainConfig

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1024, (20_000, 256), generator=g)
    labels = torch.randint(0, 10, (20_000,), generator=g)
    codebook = torch.randn(1024, 32, generator=g)
    cfg = TrainConfig(model="small", model_overrides=dict(codebook_size=1024, z_dim=32, seq_len=256, num_classes=10),
                      rear=PRESETS[variant], steps=steps, batch_size=batch, warmup_steps=steps // 4, lr=4e-4,
                      log_every=max(steps // 10, 1), ckpt_every=10 * steps, seed=seed,
                      compile=device != "cpu", bf16=device != "cpu", fused_adamw=device != "cpu")
    with tempfile.TemporaryDirectory() as out:
        r = train(cfg, tokens, labels, codebook, out, device=device, resume=False, progress=False)
        t_end = time.time()
    # Each logging window's wall-clock span, reconstructed backwards from train()'s return, so the parent can find the
    # interval where every worker is past its first window (compilation) and still training. The anchor includes
    # the final checkpoint's write, so a worker's spans may sit late by that much (well under a second at this
    # size): the interval's edges, not the rates inside it, carry that error.
    spans, end, prev_steps = [], t_end, [0] + [h["step"] for h in r["history"][:-1]]
    for h, before in zip(reversed(r["history"]), reversed(prev_steps)):
        samples = (h["step"] - before) * batch
        spans.append((end - samples / h["samples_per_s"], end, samples))
        end = spans[-1][0]
    return {**{k: r[k] for k in ("status", "step", "samples_per_s", "wall_time_s", "train_time_s")},
            "windows": spans[::-1]}


def concurrent_samples_per_s(workers: list[dict]) -> tuple[float | None, float]:
    """Samples/s of all workers together over the interval where each one is in steady state (past its first
    window, not yet finished), with the interval's length; (None, 0) when the intervals do not overlap."""
    if any(len(w["windows"]) < 2 for w in workers):  # only the compilation window: no steady state to overlap
        return None, 0.0
    lo = max(w["windows"][1][0] for w in workers)
    hi = min(w["windows"][-1][1] for w in workers)
    if hi <= lo:
        return None, 0.0
    total = 0.0
    for w in workers:
        for a, b, n in w["windows"][1:]:
            total += n / (b - a) * max(0.0, min(b, hi) - max(a, lo))
    return total / (hi - lo), hi - lo


def group(k: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", args.variant, "--steps",
           str(args.steps), "--batch", str(args.batch), "--device", args.device]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + ["--seed", str(i)], stdout=subprocess.PIPE, text=True) for i in range(k)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker of the K={k} group failed (exit codes {[p.returncode for p in procs]})")
    workers = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    together, overlap_s = concurrent_samples_per_s(workers)
    return {"k": k, "group_wall_s": wall, "workers": workers,
            "sum_samples_per_s": sum(w["samples_per_s"] for w in workers),
            "concurrent_samples_per_s": together, "concurrent_interval_s": overlap_s,
            "samples_per_s_by_wall": k * args.steps * args.batch / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", default="1,2,3", help="comma-separated numbers of concurrent processes")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per worker (batch 256)")
    p.add_argument("--batch", type=int, default=256, help="batch per worker (256: the zoo's small recipe)")
    p.add_argument("--variant", default="rear", help="reAR preset of every worker (ar, rear, ...)")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark's purpose) or cpu (a quick check)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.variant, args.steps, args.batch, args.seed, args.device)), flush=True)
        return
    gpu = torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu"
    res = {"gpu": gpu, "torch": torch.__version__, "variant": args.variant, "steps": args.steps, "batch": args.batch,
           "rows": []}
    for k in (int(x) for x in args.ks.split(",")):
        row = group(k, args)
        base = res["rows"][0]["concurrent_samples_per_s"] if res["rows"] else row["concurrent_samples_per_s"]
        ok = base is not None and row["concurrent_samples_per_s"] is not None
        row["gain_vs_first"] = row["concurrent_samples_per_s"] / base if ok else None
        res["rows"].append(row)
        print(json.dumps({x: row[x] for x in ("k", "concurrent_samples_per_s", "concurrent_interval_s",
                                              "sum_samples_per_s", "samples_per_s_by_wall", "group_wall_s",
                                              "gain_vs_first")}), flush=True)
        with open(out_path("shared_gpu.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
