"""Rehearse the ``paper`` path end to end on stand-in assets, and record what it costs.

``python -m rearlib rehearse --out DIR`` writes stand-in assets (:mod:`rearlib.experiments.standins`), then runs the
runner at ``paper`` scale one notebook at a time (each in its own process, so its peak memory is its own) with the
assets' variables set and reduced counts (:data:`REDUCED`). It records per notebook: the runner's status (ok /
skipped / failed), wall time, peak GPU memory (``nvidia-smi``, whole device, sampled every 0.2 s) and peak host
memory of the notebook's kernel, and projects the time of the full counts. The record (``rehearsal.json`` and
``README.md``) is marked as a stand-in run: its metric values mean nothing, its times and memory are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from rearlib import scales
from rearlib.experiments.notebook import notebook_scripts
from rearlib.experiments.standins import PAPER_PRESETS, standin_environment, write_standins
from rearlib.runtime import REPO_ROOT, UnreadableFileError, atomic_write_text, hardware_info, read_json

#: Notebook parameters of a rehearsal, per stand-in size: small counts, and ST-LPIPS where LPIPS-VGG's ImageNet
#: trunk cannot be had offline. "tiny" also infers the generator's shape from the file (it matches no preset).
REDUCED = {
    "paper": {
        "02_tokenizer": dict(n_val=200, n_rfid=1000),
        "03_metrics": dict(n_images=200, n_ref=500),
        "05_exposure_bias": dict(n_images=8, require_lpips=False),
        "06_embedding_replacement": dict(n_images=8, require_lpips=False),
        "07_robustness": dict(n_images=8),
        "08_cka": dict(n_images=20),
        "14_teaching": dict(n_images=4, require_lpips=False),
        "15_table1": dict(num_per_class=1),
    },
    "tiny": {
        "02_tokenizer": dict(n_val=8, n_rfid=16),
        "03_metrics": dict(n_images=8, n_ref=16),
        "05_exposure_bias": dict(n_images=1, n_examples=1, compare_rear=False, require_lpips=False,
                                 generator_preset=None),
        "06_embedding_replacement": dict(n_images=1, n_examples=1, compare_rear=False, require_lpips=False,
                                         generator_preset=None),
        "07_robustness": dict(n_images=2, generator_preset=None),
        "08_cka": dict(n_images=5, generator_preset=None),
        "14_teaching": dict(n_images=2, require_lpips=False, generator_preset=None),
        "15_table1": dict(num_per_class=1, n_classes=4, models="rear_s", generator_preset=None),
    },
}
#: The count parameter of each notebook and its value in a full run (for the projection).
FULL_COUNTS = {
    "02_tokenizer": ("n_rfid", 50_000),
    "03_metrics": ("n_images", 2000),
    "05_exposure_bias": ("n_images", scales.ANALYSIS["paper"]["images"]),
    "06_embedding_replacement": ("n_images", scales.ANALYSIS["paper"]["images"]),
    "07_robustness": ("n_images", scales.ANALYSIS["paper"]["images"]),
    "08_cka": ("n_images", scales.ANALYSIS["paper"].get("cka_images", scales.ANALYSIS["paper"]["images"])),
    "14_teaching": ("n_images", scales.TEACHING["paper"]["images"]),
}


class GpuMemoryMonitor:
    """Peak used memory of GPU 0 (MiB) while the ``with`` block runs, from ``nvidia-smi``; None without one."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_mib = interval_s, None
        self._stop = threading.Event()
        self._thread = None

    def _read(self) -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                                  "0"], capture_output=True, text=True, timeout=10)
            return int(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _loop(self):
        while not self._stop.is_set():
            used = self._read()
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0, used)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def run_one(notebooks: list[str], params: dict, out: Path, env: dict, device: str) -> list[dict]:
    """Run ``notebooks`` at paper scale through the runner in one child process; per notebook its status, time
    and memory (the memory peaks are the whole call's)."""
    cmd = [sys.executable, "-m", "rearlib.experiments.rehearsal", "_child", "--scale", "paper", "--only",
           ",".join(notebooks), "--device", device, "--reports-dir", str(out / "reports"), "--figures-dir",
           str(out / "figures"), "--force", "--no-cell-progress"]
    for key, value in params.items():
        cmd += ["--param", f"{key}={value!r}" if not isinstance(value, (int, float)) else f"{key}={value}"]
    t0 = time.perf_counter()
    with GpuMemoryMonitor() as gpu:
        done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - t0
    child = {}
    for line in done.stdout.splitlines():
        if line.startswith("REHEARSAL "):
            child = json.loads(line.removeprefix("REHEARSAL "))
    prov_path = out / "reports" / "paper" / "provenance.json"
    runs = json.loads(prov_path.read_text()).get("notebooks", {}) if prov_path.is_file() else {}
    rows = []
    for name in notebooks:
        record = runs.get(name, {})
        status = (f"skipped ({'/'.join(scales.notebook_scales(name))} only)" if "paper" not in scales.notebook_scales(name)
                  else record.get("status") or "failed")
        row = {"notebook": name, "status": status, "exit": done.returncode, "params": params,
               "wall_time_s": round(wall, 1) if len(notebooks) == 1 else None,
               "notebook_time_s": record.get("wall_time_s"),
               "peak_gpu_memory_gib": None if gpu.peak_mib is None else round(gpu.peak_mib / 1024, 2),
               "peak_host_memory_gib": child.get("peak_host_memory_gib")}
        if status == "failed":
            row["error"] = (done.stderr or done.stdout)[-2000:]
        if status.startswith("skipped"):
            row["peak_gpu_memory_gib"] = row["peak_host_memory_gib"] = None
        rows.append(row)
    return rows


def project(row: dict) -> float | None:
    """Seconds of the notebook at its full count: the rehearsal's time scaled linearly in the count (an upper
    bound, since model loading and set-up do not grow with it)."""
    if row["status"] != "ok" or row["notebook"] not in FULL_COUNTS:
        return None
    key, full = FULL_COUNTS[row["notebook"]]
    n = row["params"].get(key)
    t = row.get("notebook_time_s") or row["wall_time_s"]
    return None if not n else t * full / n


def table1_projection(out: Path) -> list[dict]:
    """Per model of the Table 1 rehearsal: images/s and the projected time of 50,000 samples on this GPU."""
    csv = out / "reports" / "paper" / "15_table1.csv"
    if not csv.is_file():
        return []
    import pandas as pd

    rows = []
    for r in pd.read_csv(csv).to_dict("records"):
        ips = r.get("images/s")
        rows.append({"model": r["model"], "samples": int(r["samples"]), "images_per_s": ips,
                     "sampling_s": r.get("sampling s"), "scoring_s": r.get("scoring s"),
                     "peak_sampling_gpu_memory_gib": r.get("peak GPU memory (GiB)"),
                     "projected_50k_sampling_min": (50_000 / ips / 60) if ips and ips == ips else None})
    return rows


def write_record(out: Path, rows: list[dict], manifest: dict, device: str, hardware: dict | None = None) -> Path:
    """Write ``rehearsal.json`` and ``README.md`` in ``out`` (``hardware``: default this machine's)."""
    record = {"meaning": "STAND-IN ASSETS: random weights and rendered images. The metric values in these reports "
                         "have no scientific meaning; the run shows that the paper path works and what it costs.",
              "standins": {k: manifest[k] for k in ("size", "presets", "images_per_class", "reference_images")},
              "hardware": hardware or hardware_info(), "device": device, "notebooks": rows,
              "table1": table1_projection(out)}
    for r in rows:  # projections only where the shapes are the released ones
        r["projected_full_s"] = project(r) if manifest["size"] == "paper" else None
    if manifest["size"] != "paper":
        for t in record["table1"]:
            t["projected_50k_sampling_min"] = None
    atomic_write_text(out / "rehearsal.json", json.dumps(record, indent=2, default=str))
    gpu = record["hardware"].get("gpu") or record["hardware"].get("gpus") or "no GPU"
    shapes = ("the released layouts" if manifest["size"] == "paper" else
              "the released layouts' names at small widths (`--size tiny`: times and memory say nothing about the "
              "real models, and nothing is projected)")
    lines = ["# Paper-path rehearsal on stand-in assets", "",
             f"**Stand-in assets: every metric value in these reports is noise.** Random weights in {shapes}, "
             "rendered scenes in an ImageNet-shaped folder, a reference batch made from them "
             "(`python -m rearlib standins`). What the run shows: every paper-capable notebook runs to the end "
             "through the runner, and what it costs.", "",
             f"Hardware: {gpu}; device `{device}`; stand-in size `{manifest['size']}`.",
             "", "| notebook | status | parameters | wall time (s) | peak GPU memory (GiB) | peak host memory (GiB) "
             "| projected full run (min) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        proj = f"{r['projected_full_s'] / 60:.0f}" if r.get("projected_full_s") else "-"
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "samples_dir") or "-"
        lines.append(f"| {r['notebook']} | {r['status']} | {params} | {r['wall_time_s'] or '-'} | "
                     f"{r['peak_gpu_memory_gib'] if r['peak_gpu_memory_gib'] is not None else '-'} | "
                     f"{r['peak_host_memory_gib'] if r['peak_host_memory_gib'] is not None else '-'} | {proj} |")
    lines += ["", "Projected full run: the notebook's time scaled linearly from the rehearsal's image count to the "
              "paper-scale count (`rearlib.scales.ANALYSIS['paper']`); an upper bound, since loading does not grow "
              "with the count. Peak GPU memory: `nvidia-smi`'s used memory of the whole device, sampled every "
              "0.2 s; it includes PyTorch's cache, so it bounds what a notebook needs from above.", ""]
    if record["table1"]:
        lines += ["## Table 1 sampling", "", "| model | samples | images/s | projected 50,000 samples (min) |",
                  "|---|---|---|---|"]
        for t in record["table1"]:
            proj = f"{t['projected_50k_sampling_min']:.1f}" if t["projected_50k_sampling_min"] else "-"
            lines.append(f"| {t['model']} | {t['samples']} | {t['images_per_s']:.2f} | {proj} |")
        lines.append("")
    atomic_write_text(out / "README.md", "\n".join(lines))
    return out / "rehearsal.json"


def earlier_rows(out: Path, manifest: dict, device: str) -> list[dict]:
    """The notebook rows of an earlier rehearsal in ``out`` on the same hardware, stand-in size and device (so a
    rehearsal can run in several calls, ``--only`` a few notebooks each); none otherwise."""
    path = out / "rehearsal.json"
    if not path.is_file():
        return []
    try:
        old = read_json(path)
    except UnreadableFileError:
        return []
    same = (old.get("hardware", {}).get("gpu") == hardware_info().get("gpu") and old.get("device") == device
            and old.get("standins", {}).get("size") == manifest["size"])
    return old.get("notebooks", []) if same else []


def rehearse(out, *, size: str = "paper", device: str = "auto", assets=None, notebooks=None,
             progress: bool = True) -> dict:
    """Write (or reuse) stand-in assets in ``assets`` (default ``out/assets``), run every notebook at paper scale
    with :data:`REDUCED` counts (``notebooks``: a subset), and write the record under ``out``. Rows of notebooks
    not run this time are kept from an earlier record in ``out`` made on the same hardware."""
    out = Path(out).resolve()
    assets = Path(assets).resolve() if assets else out / "assets"
    manifest = write_standins(assets, size=size, progress=progress,
                              reference_images=1000 if size == "paper" else 20)
    env = standin_environment(assets, PAPER_PRESETS)
    every = [p.stem for p in notebook_scripts()]
    names = [n for n in every if any(n.startswith(k) for k in notebooks)] if notebooks else every
    # Table 1 first: its sampling rate gives the projection that matters most if a time limit cuts the run short.
    capable = sorted((n for n in names if "paper" in scales.notebook_scales(n)), key=lambda n: n != "15_table1")
    if size == "tiny":  # a CPU rehearsal runs the notebooks it has counts for; the GPU rehearsal runs them all
        capable = [n for n in capable if n in REDUCED[size]]
    others = [n for n in every if "paper" not in scales.notebook_scales(n)]  # always: the runner's skips
    earlier = earlier_rows(out, manifest, device)
    rows = [r for r in earlier if r["notebook"] not in capable and r["notebook"] not in others]
    samples = out / "table1_samples"
    if "15_table1" in capable:
        shutil.rmtree(samples, ignore_errors=True)  # fresh samples: resumed ones would carry no sampling time
    for name in capable:
        params = dict(REDUCED[size].get(name, {}))
        if name == "15_table1":
            params["samples_dir"] = str(samples)
        row = run_one([name], params, out, env, device)[0]
        rows.append(row)
        write_record(out, rows, manifest, device)  # kept current, so an interrupted rehearsal still has a record
        if progress:
            print(f"  {name}: {row['status']} in {row['wall_time_s']} s", flush=True)
    if others:  # one runner call: it reports each as skipped, with the reason
        rows += run_one(others, {}, out, env, device)
    write_record(out, rows, manifest, device)
    return {"notebooks": rows, "record": str(out / "rehearsal.json")}


def _child(argv) -> int:
    """Run the runner, then report the peak resident memory of its kernels (the children it waited for)."""
    import resource

    from rearlib.experiments import reproduce

    code = reproduce.main(argv)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("REHEARSAL " + json.dumps({"peak_host_memory_gib": round(peak_kib / 2**20, 2)}), flush=True)
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return _child(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m rearlib rehearse", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the record, reports and figures of the rehearsal")
    ap.add_argument("--size", choices=("paper", "tiny"), default="paper",
                    help="paper: stand-ins of the released shapes (a GPU); tiny: small widths (a CPU, minutes)")
    ap.add_argument("--assets", default=None, help="stand-in asset folder to write or reuse (default OUT/assets)")
    ap.add_argument("--device", default="auto", help="torch device of the notebooks (default auto)")
    ap.add_argument("--only", default=None, help="comma list of notebook numbers or names (default all)")
    a = ap.parse_args(argv)
    res = rehearse(a.out, size=a.size, device=a.device, assets=a.assets,
                   notebooks=[s for s in a.only.split(",") if s] if a.only else None)
    failed = [r["notebook"] for r in res["notebooks"] if r["status"] == "failed"]
    print(f"record: {res['record']}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
