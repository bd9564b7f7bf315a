"""Run the numbered notebooks in order with papermill and assemble reports/<scale>/.

    python -m rearlib reproduce --scale smoke                 # everything, on CPU, minutes
    python -m rearlib reproduce --scale small --only 02,04    # some notebooks, by number or name

Writes, per scale: executed notebooks in ``reports/<scale>/notebooks/``, the notebooks' CSVs in
``reports/<scale>/``, figures in ``figures/<scale>/``, ``reports/<scale>/provenance.json`` (commit, hardware,
versions, seeds, wall time and status per notebook) and ``reports/<scale>/SUMMARY.md`` (the paper's claims
next to ours, with verdicts). A notebook whose source, parameters and library code are unchanged since its
last successful run is skipped (``--force`` re-runs it); inside notebooks, expensive work is cached by config
hash under ``artifacts/``. A failing notebook is reported with its cell; the others still run; exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from rearlib.runtime import atomic_write_text, hardware_info

from rearlib.scales import SCALE_NAMES
from rearlib.experiments.notebook import NOTEBOOK_DIR, notebook_scripts, script_to_notebook

from rearlib.runtime import REPO_ROOT as REPO


def _git_commit() -> str | None:
    """HEAD (with -dirty), or $REARLIB_COMMIT where the tree has no .git (e.g. a copy sent to a GPU box)."""
    import os

    if os.environ.get("REARLIB_COMMIT"):
        return os.environ["REARLIB_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        # Outputs (reports/, figures/) being rewritten by this very run do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports",
                                ":!figures"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _library_versions() -> dict:
    from importlib import metadata

    names = ["torch", "torchvision", "numpy", "scikit-image", "lpips", "torch-fidelity", "pandas", "matplotlib",
             "papermill", "jupytext"]
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _library_digest() -> str:
    """Digest of rearlib's sources: a notebook is re-run when the code it calls changed."""
    h = hashlib.sha256()
    for path in sorted((REPO / "rearlib").rglob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def select(scripts: list[Path], only: str | None) -> list[Path]:
    """Filter notebook scripts by comma-separated numbers (``02``) or names (``02_tokenizer``)."""
    if not only:
        return scripts
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [s for s in scripts if any(s.stem == w or s.stem.split("_", 1)[0] == w.zfill(2) for w in wanted)]
    unknown = [w for w in wanted if not any(s.stem == w or s.stem.split("_", 1)[0] == w.zfill(2) for s in scripts)]
    if unknown:
        names = ", ".join(s.stem for s in scripts)
        raise SystemExit(f"unknown notebook(s) {', '.join(unknown)}; available: {names}")
    return chosen


def _hardware_label(hw: dict) -> str:
    return f"{hw.get('gpu') or 'CPU only'} ({hw.get('cpu_count')} CPU cores)"


def build_summary(reports: Path, scale: str, provenance: dict) -> str:
    """SUMMARY.md from every notebook's claims file, in notebook order."""
    lines = [f"# Results at `{scale}` scale", ""]
    if scale == "smoke":
        lines += ["> Smoke scale proves that every code path runs on a CPU. Its numbers are **not meaningful** and "
                  "no verdict below is evidence about the paper.", ""]
    hw = provenance.get("hardware", {})
    runs = provenance.get("notebooks", {})
    if len({(r.get("commit"), r.get("hardware")) for r in runs.values()}) > 1:
        lines += ["Notebooks were executed at different commits and on different machines: see the table at the end. "
                  "Where a notebook tabulates records computed elsewhere (e.g. on a GPU), its notes say where.", ""]
    else:
        lines += [f"Commit `{provenance.get('commit')}`, hardware: {_hardware_label(hw)}, torch {hw.get('torch')}.",
                  ""]
    lines += ["| notebook | claim | paper | ours | verdict | note |", "|---|---|---|---|---|---|"]
    rows = 0
    notes = []
    for path in sorted((reports / "claims").glob("*.json")):
        rec = json.loads(path.read_text())
        for c in rec.get("claims", []):
            cells = [c["notebook"], c["claim"], c["paper"], c["ours"], f"**{c['verdict']}**", c.get("note", "")]
            lines.append("| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in cells) + " |")
            rows += 1
        notes += [f"- `{rec['notebook']}`: {n}" for n in rec.get("notes", [])]
    if rows == 0:
        lines.append("| – | no claims recorded yet | | | | |")
    if notes:
        lines += ["", "## Notes from the notebooks", ""] + notes
    lines += ["", "## Notebook runs", "", "| notebook | status | wall time (s) | commit | executed on |",
              "|---|---|---|---|---|"]
    for name, run in sorted(runs.items()):
        lines.append(f"| {name} | {run.get('status')} | {run.get('wall_time_s', 0):.1f} | {run.get('commit', '-')} "
                     f"| {run.get('hardware', '-')} |")
    return "\n".join(lines) + "\n"


def run_notebook(script: Path, params: dict, out_path: Path, cwd: Path) -> None:
    import nbformat
    import papermill as pm

    nb = script_to_notebook(script)
    tmp_in = out_path.with_name(f".{script.stem}.input.ipynb")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, tmp_in)
    try:
        pm.execute_notebook(str(tmp_in), str(out_path), parameters=params, kernel_name="python3",
                            cwd=str(cwd), progress_bar=False, log_output=False)
    finally:
        tmp_in.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rearlib reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="smoke", choices=SCALE_NAMES)
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers or names, e.g. 01,03")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reports-dir", default=str(REPO / "reports"))
    parser.add_argument("--figures-dir", default=str(REPO / "figures"))
    parser.add_argument("--notebooks-dir", default=str(NOTEBOOK_DIR))
    parser.add_argument("--force", action="store_true", help="re-run notebooks even if nothing changed")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    scripts = select(notebook_scripts(Path(args.notebooks_dir)), args.only)
    if not scripts:
        print(f"no notebooks found in {args.notebooks_dir}", file=sys.stderr)
        return 1
    reports = Path(args.reports_dir) / args.scale
    reports.mkdir(parents=True, exist_ok=True)
    prov_path = reports / "provenance.json"
    old = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    provenance = {
        "scale": args.scale, "commit": _git_commit(), "hardware": hardware_info(), "versions": _library_versions(),
        "seed": args.seed, "device": args.device, "notebooks": dict(old.get("notebooks", {})),
    }
    lib = _library_digest()
    params = {"scale": args.scale, "seed": args.seed, "device": args.device,
              "reports_dir": str(Path(args.reports_dir).resolve()), "figures_dir": str(Path(args.figures_dir).resolve())}
    failures = []
    bar = tqdm(scripts, desc=f"notebooks ({args.scale})", unit="nb")
    for script in bar:
        name = script.stem
        bar.set_postfix_str(name)
        key = hashlib.sha256(script.read_bytes() + json.dumps(params, sort_keys=True).encode() + lib.encode()).hexdigest()[:16]
        prev = provenance["notebooks"].get(name, {})
        executed = reports / "notebooks" / f"{name}.ipynb"
        if not args.force and prev.get("status") == "ok" and prev.get("key") == key and executed.exists():
            tqdm.write(f"[cached] {name} (unchanged since its last successful run; --force re-runs it)")
            continue
        t0 = time.time()
        record = {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seed": args.seed,
                  "commit": provenance["commit"], "hardware": _hardware_label(provenance["hardware"])}
        try:
            run_notebook(script, params, executed, cwd=REPO)
            record["status"] = "ok"
            tqdm.write(f"[ok] {name} in {time.time() - t0:.1f}s")
        except Exception as err:  # papermill raises PapermillExecutionError with the failing cell
            cell = getattr(err, "cell_index", None)  # 0-based index in the notebook
            msg = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
            record.update(status="failed", failed_cell=cell, error=msg[:2000])
            failures.append(f"{name}: failed in cell {cell}: {msg[:500]}")
            tqdm.write(f"[FAILED] {name} in cell {cell}: {msg[:500]}\n         executed notebook: {executed}")
        record["wall_time_s"] = round(time.time() - t0, 2)
        provenance["notebooks"][name] = record
        atomic_write_text(prov_path, json.dumps(provenance, indent=2))
    atomic_write_text(prov_path, json.dumps(provenance, indent=2))
    atomic_write_text(reports / "SUMMARY.md", build_summary(reports, args.scale, provenance))
    print(f"wrote {reports / 'SUMMARY.md'} and {prov_path}")
    if failures:
        print("\n".join(["FAILED notebooks:"] + failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
