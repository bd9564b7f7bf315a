"""Where the reAR-B training step's time goes: kernel-by-kernel and GEMM-shape breakdown of the fast step
(torch.profiler over 3 steps after 6 warm-up), the unprofiled wall time of 20 steps, and the number and total of
the short (< 20 us) gaps between kernels (inflated by the profiler; see idle_gaps.py for a lighter measurement).
Run from the repository root on a CUDA machine: python benchmarks/training_step/profile_step.py rear [ar]
Writes $OUT/profile_rear_b_step.json (default OUT: artifacts/bench)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from benchmarks.common import out_path
from rearlib.experiments.bench import training_stepper, _release, _sync
dev = torch.device("cuda")
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
for variant in sys.argv[1:] or ["rear"]:
    st = training_stepper("rear_b", variant, 128, dev)
    for s in range(6):
        st.step(s)
    _sync(dev)
    t0 = time.perf_counter()
    for s in range(6, 26):
        st.step(s)
    _sync(dev)
    wall = (time.perf_counter() - t0) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for s in range(26, 29):
            st.step(s)
        _sync(dev)
    per = 3
    kern, ops = [], []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        t = e.self_device_time_total
        if t > 0:
            kern.append({"kernel": e.key[:120], "calls": e.count / per, "us": t / per})
    kern.sort(key=lambda r: -r["us"])
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
                     "aten::_scaled_dot_product_cudnn_attention", "aten::_foreach_copy_", "aten::sum"):
            t = e.self_device_time_total
            if t > 0:
                ops.append({"op": e.key, "shapes": str(e.input_shapes)[:200], "calls": e.count / per, "us": t / per})
    ops.sort(key=lambda r: -r["us"])
    # stream gaps from the trace (profiler-inflated, but count small gaps)
    evs = [e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0]
    evs.sort(key=lambda e: e.time_range.start)
    gaps = [max(0.0, b.time_range.start - a.time_range.end) for a, b in zip(evs, evs[1:])]
    small = [g for g in gaps if g < 20]
    total = sum(r["us"] for r in kern)
    r = {"wall_ms_unprofiled": wall, "kernel_ms_per_step": total / 1e3, "kernels_per_step": sum(r["calls"] for r in kern),
         "gaps_lt20us_ms_per_step": sum(small) / per / 1e3, "gaps_lt20us_count_per_step": len(small) / per,
         "kernels": kern[:80], "ops": ops[:60]}
    res["runs"][variant] = r
    print(variant, {k: v for k, v in r.items() if k not in ("kernels", "ops")}, flush=True)
    for k in kern[:45]:
        print(f'{k["us"]/1e3:7.3f} {k["calls"]:6.1f} {k["kernel"][:100]}')
    for o in ops[:40]:
        print(f'{o["us"]/1e3:7.3f} {o["calls"]:6.1f} {o["op"]} {o["shapes"]}')
    json.dump(res, open(out_path("profile_rear_b_step.json"), "w"), indent=1)
    del st, prof
    _release(dev)
