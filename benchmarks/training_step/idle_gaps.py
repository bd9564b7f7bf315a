"""Where the reAR-B training step idles: a CUDA-only profiler (low CPU overhead) over 3 steps gives the histogram
of gaps between kernels and the largest gaps with their neighbouring kernels; the caching allocator's device
malloc/free counts over 20 steady-state steps; wall time and median CPU enqueue time per step.
Run from the repository root on a CUDA machine: python benchmarks/training_step/idle_gaps.py [rear|ar]
Writes $OUT/train_step_gaps_<variant>.json (default OUT: artifacts/bench)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from benchmarks.common import out_path
from rearlib.experiments.bench import training_stepper, _sync
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
res = {"gpu": torch.cuda.get_device_name(0)}
variant = sys.argv[1] if len(sys.argv) > 1 else "rear"
st = training_stepper("rear_b", variant, 128, dev)
for s in range(6):
    st.step(s)
_sync(dev)
m0 = torch.cuda.memory_stats()
t0 = time.perf_counter()
cpu = []
for s in range(6, 26):
    a = time.perf_counter(); st.step(s); cpu.append(time.perf_counter() - a)
_sync(dev)
res["wall_ms"] = (time.perf_counter() - t0) / 20 * 1e3
res["cpu_enqueue_ms"] = sorted(cpu)[10] * 1e3
m1 = torch.cuda.memory_stats()
res["alloc_deltas_20_steps"] = {k: m1.get(k, 0) - m0.get(k, 0) for k in
                                ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}
print(res, flush=True)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for s in range(26, 29):
        st.step(s)
    _sync(dev)
evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
evs.sort(key=lambda e: e.time_range.start)
span = (evs[-1].time_range.end - evs[0].time_range.start) / 3 / 1e3
busy = sum(e.time_range.elapsed_us() for e in evs) / 3 / 1e3
gaps = [(b.time_range.start - a.time_range.end, a.name[:70], b.name[:70]) for a, b in zip(evs, evs[1:])]
hist = {}
for lo, hi in [(0, 2), (2, 5), (5, 10), (10, 20), (20, 50), (50, 200), (200, 1e9)]:
    sel = [g for g, _, _ in gaps if lo <= g < hi]
    hist[f"{lo}-{hi}us"] = [len(sel) / 3, sum(sel) / 3 / 1e3]
res.update({"span_ms_per_step": span, "busy_ms_per_step": busy, "gap_hist_[count,ms]_per_step": hist,
            "largest_gaps": sorted(gaps, reverse=True)[:30]})
print(json.dumps({k: v for k, v in res.items()}, indent=0, default=str)[:6000], flush=True)
json.dump(res, open(out_path(f"train_step_gaps_{variant}.json"), "w"), indent=1, default=str)
