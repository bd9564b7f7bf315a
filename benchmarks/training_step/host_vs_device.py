"""Is the reAR-B training step bound by the host or by the GPU? Parts (first argument, comma list; default all):

* cpu: CPU time to enqueue one step (and the part spent in the block stack's forward and backward) against its
  wall time with a synchronisation after it, and the pipelined time per step, for reAR and AR;
* sync: one AR step with CUDA's sync-debug mode set to "error" (raises at any host synchronisation);
* trace: a full profiler trace of 3 reAR steps, its kernel time, span and the gaps over 20 us with the CPU ops
  that launched the next kernel (the profiler slows the CPU about 2x, so gaps in it overstate idle time).

Run from the repository root on a CUDA machine: python benchmarks/training_step/host_vs_device.py [cpu,sync,trace]
Writes $OUT/train_step_host_vs_device.json and $OUT/trace_rear.json.gz (default OUT: artifacts/bench)."""
import json, os, sys, tempfile, time, traceback, gzip
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from benchmarks.common import out_path
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
parts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["cpu", "sync", "trace"]


def save():
    json.dump(res, open(out_path("train_step_host_vs_device.json"), "w"), indent=1, default=str)


from rearlib.experiments.bench import _release, training_stepper
import rearlib.kernels.fused_blocks as fb

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train() runs the fast path


def make(variant, batch=128, preset="rear_b"):
    st = training_stepper(preset, variant, batch, dev)
    for s in range(5):
        st.step(s)
    torch.cuda.synchronize()
    return st


# ---- CPU enqueue time vs GPU time per step; CPU time inside the stack's forward/backward
_acc = {"fwd": 0.0, "bwd": 0.0}
_of, _ob = fb._stack_forward, fb._stack_backward


def _tf(*a, **k):
    t = time.perf_counter(); r = _of(*a, **k); _acc["fwd"] += time.perf_counter() - t; return r


def _tb(*a, **k):
    t = time.perf_counter(); r = _ob(*a, **k); _acc["bwd"] += time.perf_counter() - t; return r


if "cpu" in parts:
    fb._stack_forward, fb._stack_backward = _tf, _tb
    out = {}
    for variant in ("rear", "ar"):
        st = make(variant)
        rows = []
        for s in range(5, 13):
            _acc["fwd"] = _acc["bwd"] = 0.0
            torch.cuda.synchronize(); t0 = time.perf_counter(); st.step(s); t1 = time.perf_counter()
            torch.cuda.synchronize(); t2 = time.perf_counter()
            rows.append({"cpu_ms": 1e3 * (t1 - t0), "wall_ms": 1e3 * (t2 - t0), "stack_fwd_cpu_ms": 1e3 * _acc["fwd"],
                         "stack_bwd_cpu_ms": 1e3 * _acc["bwd"]})
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for s in range(13, 33):
            st.step(s)
        torch.cuda.synchronize()
        out[variant] = {"synced_steps": rows, "pipelined_ms_per_step": 1e3 * (time.perf_counter() - t0) / 20}
        print(variant, json.dumps(out[variant]), flush=True)
        del st; _release(dev)
    res["cpu_vs_gpu"] = out
    fb._stack_forward, fb._stack_backward = _of, _ob
    save()

if "sync" in parts:
    st = make("ar")
    torch.cuda.set_sync_debug_mode("error")
    try:
        st.step(6)
        res["sync_tb"] = "no error"
    except Exception:
        res["sync_tb"] = traceback.format_exc()[-6000:]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(res["sync_tb"][-3000:], flush=True)
    del st; _release(dev); save()

if "trace" in parts:
    from torch.profiler import ProfilerActivity, profile
    for variant in ("rear",):
        st = make(variant)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(6, 9):
                st.step(s)
            torch.cuda.synchronize()
        path = os.path.join(tempfile.gettempdir(), f"trace_{variant}.json")
        prof.export_chrome_trace(path)
        ev = json.load(open(path))["traceEvents"]
        kern = sorted([e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e],
                      key=lambda e: e["ts"])
        launch = {e["args"].get("correlation"): e for e in ev if e.get("cat") == "cuda_runtime" and "args" in e}
        cpuops = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
        gaps = []
        for a, b in zip(kern, kern[1:]):
            g = b["ts"] - (a["ts"] + a["dur"])
            if g > 20:
                L = launch.get(b["args"].get("correlation"))
                lt = L["ts"] if L else None
                enc = sorted([c for c in cpuops if lt is not None and c["ts"] <= lt <= c["ts"] + c["dur"]],
                             key=lambda c: c["dur"])
                gaps.append({"gap_us": g, "prev": a["name"][:70], "next": b["name"][:70],
                             "launch_before_prev_end_us": (a["ts"] + a["dur"] - lt) if lt else None,
                             "cpu_ops_at_launch": [c["name"][:60] for c in enc[:4]]})
        total_gap = sum(max(0, b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(kern, kern[1:]))
        span = kern[-1]["ts"] + kern[-1]["dur"] - kern[0]["ts"]
        busy = sum(e["dur"] for e in kern)
        gaps.sort(key=lambda r: -r["gap_us"])
        res[f"trace_{variant}"] = {"steps": 3, "span_ms": span / 1e3, "kernel_ms": busy / 1e3,
                                   "gap_ms_total": total_gap / 1e3, "n_gaps_over_20us": len(gaps),
                                   "gap_ms_over_20us": sum(g["gap_us"] for g in gaps) / 1e3, "top": gaps[:40]}
        print(json.dumps({k: v for k, v in res[f"trace_{variant}"].items() if k != "top"}), flush=True)
        for g in gaps[:25]:
            print(g, flush=True)
        with open(path, "rb") as f, gzip.open(out_path(f"trace_{variant}.json.gz"), "wb") as z:
            z.write(f.read())
        del st, prof; _release(dev); save()

print("done", flush=True)
