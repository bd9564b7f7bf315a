"""Run the numbered notebooks in order with papermill and assemble reports/<scale>/.

    python -m rearlib reproduce --scale smoke                 # everything, on CPU, minutes
    python -m rearlib reproduce --scale small --only 02,04    # some notebooks, by number or name
    python -m rearlib reproduce --scale small --only 05,06,07,08 --jobs 4   # side by side on one GPU
    python -m rearlib reproduce --scale paper --only 05 --param ar_checkpoint=/ckpt/ar.bin   # notebook parameters

Writes, per scale: executed notebooks in ``reports/<scale>/notebooks/``, the notebooks' CSVs in
``reports/<scale>/``, figures in ``figures/<scale>/``, ``reports/<scale>/provenance.json`` (commit, hardware,
versions, seeds, wall time and status per notebook) and ``reports/<scale>/SUMMARY.md`` (the paper's claims
next to ours, with verdicts). A notebook whose source, parameters and library code are unchanged since its
last successful run is skipped (``--force`` re-runs it); inside notebooks, expensive work is cached by config
hash under ``artifacts/``. A failing notebook is reported with its cell and its whole error message (a paper-scale
notebook's pre-flight check lists every missing asset); the others still run; exit status 1. A notebook not defined
at the scale (:data:`rearlib.scales.NOTEBOOK_SCALES`) is reported "skipped" and does not fail the run. A notebook
is recorded "running" before it starts and "ok" only once it finished, so an interrupted run is re-run next time.
``--jobs N`` runs up to N notebooks side by side, each in a runner process of its own on the same device (the
`small` diagnosis notebooks use a fraction of a large GPU each); notebooks that time work on the device
(:data:`rearlib.scales.TIMED_NOTEBOOKS`) then run alone, one after the other. Ctrl-C stops them all, each recorded
"interrupted".
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import nbformat
import papermill as pm
from jupyter_client.manager import AsyncKernelManager
from tqdm.auto import tqdm
from traitlets import CaselessStrEnum

from rearlib import cli_types
from rearlib.experiments.notebook import NOTEBOOK_DIR, notebook_scripts, script_to_notebook
from rearlib.runtime import REPO_ROOT as REPO
from rearlib.runtime import atomic_write_text, file_lock, hardware_info
from rearlib.scales import SCALE_NAMES, TIMED_NOTEBOOKS, notebook_scales


def _git_commit() -> str | None:
    """HEAD (with -dirty), or $REARLIB_COMMIT where the tree has no .git (e.g. a copy sent to a GPU box)."""
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


class LocalKernelManager(AsyncKernelManager):
    """Notebook kernels talk to the runner over local IPC sockets: no network port is opened, and the kernel's
    warning about unencrypted TCP (printed once per notebook otherwise) does not apply."""

    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    def _ip_default(self) -> str:
        # jupyter_client's default puts the sockets ("kernel-ipc-N") in the working folder, i.e. the repository.
        # The sockets are "<ip>-<n>" files, removed when the kernel shuts down.
        return os.path.join(tempfile.gettempdir(), f"rearlib-kernel-{os.getpid()}")


def run_notebook(script: Path, params: dict, out_path: Path, cwd: Path, progress: bool = True) -> None:
    """Execute ``script`` with papermill into ``out_path``; ``progress`` shows a bar of the notebook's cells."""
    nb = script_to_notebook(script)
    tmp_in = out_path.with_name(f".{script.stem}.input.ipynb")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, tmp_in)
    bar = {"desc": f"  {script.stem}", "unit": "cell", "leave": False, "position": 1} if progress else False
    try:
        pm.execute_notebook(str(tmp_in), str(out_path), parameters=params, kernel_name="python3", cwd=str(cwd),
                            progress_bar=bar, log_output=False, kernel_manager_class=LocalKernelManager)
    finally:
        tmp_in.unlink(missing_ok=True)


def parse_params(items: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: value}``; a value is read as a Python literal (``3``, ``0.5``, ``None``,
    ``'text'``, ``(1, 2)``) and otherwise kept as text (paths)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SystemExit(f"--param {item!r}: expected key=value with a notebook parameter name as key")
        if key in RUNNER_PARAMS:
            raise SystemExit(f"--param {key}=...: {key} is set by the runner's own option --{key.replace('_', '-')}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


#: Parameters every notebook takes from the runner's own options.
RUNNER_PARAMS = ("scale", "seed", "device", "reports_dir", "figures_dir")


def notebook_parameters(script: Path) -> set[str]:
    """The names a notebook's ``parameters`` cell defines (what papermill can set)."""
    return set(pm.inspect_notebook(str(_notebook_file(script))))


def _notebook_file(script: Path) -> Path:
    paired = script.with_suffix(".ipynb")
    if paired.exists():
        return paired
    tmp = Path(tempfile.mkdtemp()) / f"{script.stem}.ipynb"
    nbformat.write(script_to_notebook(script), tmp)
    return tmp


class Provenance:
    """``reports/<scale>/provenance.json``, updated one notebook record at a time under a file lock, so that two
    runners writing into the same reports never lose each other's records."""

    def __init__(self, reports: Path, header: dict):
        self.path, self.lock, self.header = reports / "provenance.json", reports / ".provenance.lock", header

    def read(self) -> dict:
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        return {**self.header, "notebooks": dict(old.get("notebooks", {}))}

    def update(self, name: str, record: dict) -> dict:
        with file_lock(self.lock):
            prov = self.read()
            prov["notebooks"][name] = record
            atomic_write_text(self.path, json.dumps(prov, indent=2))
        return prov


def _failure_line(name: str, cell, msg) -> str:
    """How the runner lists a failed notebook at the end (the same whether it ran here or in a child runner)."""
    return f"{name}: failed in cell {cell}: {msg}"


def split_for_jobs(scripts: list[Path], jobs: int) -> tuple[list[Path], list[Path]]:
    """(the notebooks ``--jobs`` runs side by side, those it runs alone and in order afterwards): with ``jobs`` > 1
    every notebook but the timed ones (:data:`rearlib.scales.TIMED_NOTEBOOKS`) goes side by side, when there are at
    least two of them."""
    side = [s for s in scripts if s.stem not in TIMED_NOTEBOOKS] if jobs > 1 else []
    side = side if len(side) > 1 else []
    return side, [s for s in scripts if s not in side]


def _child_command(args, name: str, declared: set[str]) -> list[str]:
    """The runner's own command line for one notebook (``--jobs`` runs each notebook in such a child), with the
    ``--param`` items whose names the notebook ``declared``."""
    folders = [str(Path(f).resolve()) for f in (args.reports_dir, args.figures_dir, args.notebooks_dir)]
    cmd = [sys.executable, "-m", "rearlib", "reproduce", "--scale", args.scale, "--only", name, "--seed", str(args.seed),
           "--device", args.device, "--reports-dir", folders[0], "--figures-dir", folders[1],
           "--notebooks-dir", folders[2], "--no-cell-progress"]
    cmd += [f"--param={p}" for p in args.param if p.partition("=")[0].strip() in declared]
    return cmd + (["--force"] if args.force else [])


def _run_side_by_side(scripts: list[Path], args, provenance: "Provenance", declared: dict[str, set[str]]) -> list[str]:
    """Run ``scripts`` up to ``args.jobs`` at a time, one child runner each; their failures, as the runner words them.

    Ctrl-C (or SIGINT to this process) is passed on to the running children, which record their notebooks
    "interrupted"; notebooks not yet started are not started."""
    running: dict[str, subprocess.Popen] = {}
    lock, stop = threading.Lock(), threading.Event()

    def child(script: Path) -> tuple[str, int | None]:
        with lock:
            if stop.is_set():
                return script.stem, None
            # Its own session: a Ctrl-C at the terminal reaches this runner alone, which passes on exactly one.
            proc = subprocess.Popen(_child_command(args, script.stem, declared.get(script.stem, set())), cwd=REPO,
                                    start_new_session=True)
            running[script.stem] = proc
        code = proc.wait()
        with lock:
            running.pop(script.stem, None)
        return script.stem, code

    print(f"running {len(scripts)} notebooks, {args.jobs} at a time: {', '.join(s.stem for s in scripts)}")
    pool = ThreadPoolExecutor(max_workers=args.jobs, thread_name_prefix="notebook")
    futures = [pool.submit(child, s) for s in scripts]
    try:
        codes = [f.result() for f in futures]
    except BaseException:
        with lock:
            stop.set()
            for proc in running.values():
                proc.send_signal(signal.SIGINT)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    failures = []
    records = provenance.read()["notebooks"]
    for name, code in codes:
        if code:
            rec = records.get(name, {})
            failures.append(_failure_line(name, rec.get("failed_cell"), rec.get("error")) if
                            rec.get("status") == "failed" else f"{name}: its runner exited with status {code}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rearlib reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="smoke", choices=SCALE_NAMES,
                        help="smoke: CPU minutes, numbers not meaningful; small: one GPU; paper: ImageNet + the authors' checkpoints")
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers or names, e.g. 01,03")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="set a notebook parameter (repeatable), e.g. --param ar_checkpoint=/ckpt/ar.bin; applied "
                             "to every selected notebook whose parameters cell defines KEY")
    parser.add_argument("--seed", type=int, default=0, help="seed passed to every notebook")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--reports-dir", default=str(REPO / "reports"),
                        help="CSVs, claims, executed notebooks and SUMMARY.md go to <this>/<scale>/")
    parser.add_argument("--figures-dir", default=str(REPO / "figures"), help="figures go to <this>/<scale>/")
    parser.add_argument("--notebooks-dir", default=str(NOTEBOOK_DIR), help="folder of the NN_name.py notebook scripts")
    parser.add_argument("--force", action="store_true", help="re-run notebooks even if nothing changed")
    parser.add_argument("--jobs", type=cli_types.count, default=1,
                        help="run up to N notebooks side by side on the same --device, each in a runner process of its "
                             "own (default 1: in order); notebooks that time work on the device run alone afterwards")
    parser.add_argument("--no-cell-progress", action="store_true", help="no progress bar of the running notebook's cells")
    args = parser.parse_args(argv)

    if args.only is not None and not args.only.strip(", "):
        raise SystemExit("--only is empty: name notebooks (e.g. --only 01,03) or leave the option out to run all")
    scripts = select(notebook_scripts(Path(args.notebooks_dir)), args.only)
    if not scripts:
        print(f"no notebooks found in {args.notebooks_dir}", file=sys.stderr)
        return 1
    extra = parse_params(args.param)
    declared = {s.stem: notebook_parameters(s) for s in scripts} if extra else {}
    unused = [k for k in extra if not any(k in names for names in declared.values())]
    if unused:
        raise SystemExit(f"--param {', '.join(unused)}: no selected notebook has such a parameter")
    reports = Path(args.reports_dir).resolve() / args.scale
    reports.mkdir(parents=True, exist_ok=True)
    provenance = Provenance(reports, {"scale": args.scale, "commit": _git_commit(), "hardware": hardware_info(),
                                      "versions": _library_versions(), "seed": args.seed, "device": args.device})
    lib = _library_digest()
    base = {"scale": args.scale, "seed": args.seed, "device": args.device,
            "reports_dir": str(Path(args.reports_dir).resolve()), "figures_dir": str(Path(args.figures_dir).resolve())}
    failures, skipped = [], []

    def run_one(script: Path) -> None:
        name = script.stem
        if args.scale not in notebook_scales(name):
            reason = f"skipped ({'/'.join(notebook_scales(name))} only)"
            tqdm.write(f"[skipped] {name}: runs at {' / '.join(notebook_scales(name))} only")
            provenance.update(name, {"status": reason, "wall_time_s": 0.0, "commit": provenance.header["commit"],
                                     "hardware": _hardware_label(provenance.header["hardware"])})
            skipped.append(name)
            return
        params = {**base, **{k: v for k, v in extra.items() if k in declared.get(name, ())}}
        key = hashlib.sha256(script.read_bytes() + json.dumps(params, sort_keys=True, default=str).encode()
                             + lib.encode()).hexdigest()[:16]
        prev = provenance.read()["notebooks"].get(name, {})
        executed = reports / "notebooks" / f"{name}.ipynb"
        if not args.force and prev.get("status") == "ok" and prev.get("key") == key and executed.exists():
            tqdm.write(f"[cached] {name} (unchanged since its last successful run; --force re-runs it)")
            return
        t0 = time.time()
        record = {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seed": args.seed,
                  "params": {k: v for k, v in params.items() if k not in RUNNER_PARAMS},
                  "commit": provenance.header["commit"], "hardware": _hardware_label(provenance.header["hardware"])}
        # Recorded before the run: a run killed midway leaves "running", never a stale "ok", so it is re-run.
        provenance.update(name, {**record, "status": "running"})
        try:
            run_notebook(script, params, executed, cwd=REPO, progress=not args.no_cell_progress)
            record["status"] = "ok"
            tqdm.write(f"[ok] {name} in {time.time() - t0:.1f}s")
        except KeyboardInterrupt:
            provenance.update(name, {**record, "status": "interrupted", "wall_time_s": round(time.time() - t0, 2)})
            raise
        except Exception as err:  # papermill raises PapermillExecutionError with the failing cell
            cell = getattr(err, "cell_index", None)  # 0-based index in the notebook
            msg = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
            record.update(status="failed", failed_cell=cell, error=msg)
            failures.append(_failure_line(name, cell, msg))
            tqdm.write(f"[FAILED] {name} in cell {cell}:\n{msg}\n         executed notebook: {executed}")
        record["wall_time_s"] = round(time.time() - t0, 2)
        provenance.update(name, record)

    side_by_side, alone = split_for_jobs(scripts, args.jobs)
    if side_by_side:
        failures += _run_side_by_side(side_by_side, args, provenance, declared)
    bar = tqdm(alone, desc=f"notebooks ({args.scale})", unit="nb")
    for script in bar:
        bar.set_postfix_str(script.stem)
        run_one(script)
    with file_lock(provenance.lock):
        summary = build_summary(reports, args.scale, provenance.read())
        atomic_write_text(reports / "SUMMARY.md", summary)
    print(f"wrote {reports / 'SUMMARY.md'} and {provenance.path}")
    if skipped:
        print(f"skipped at {args.scale} scale (not defined there): {', '.join(skipped)}")
    if failures:
        print("\n".join(["FAILED notebooks:"] + failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
