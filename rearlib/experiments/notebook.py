"""What every notebook does first, and the jupytext pairing of notebooks/*.py with notebooks/*.ipynb.

A notebook's cell after its ``parameters`` cell calls :func:`setup`, which validates the parameters (failing in
that first cell with the allowed values), seeds everything, picks the device and returns a :class:`Context`
that knows where the notebook's CSVs, figures and SUMMARY claims go.

``python -m rearlib notebook sync`` regenerates the paired ``.ipynb`` files (no outputs) from the ``.py``
scripts; ``python -m rearlib notebook check`` fails when a pair is out of sync.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import numbers
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rearlib.experiments.verdicts import VERDICTS
from rearlib.runtime import REPO_ROOT, atomic_write_bytes, atomic_write_text, resolve_device, seed_everything
from rearlib.scales import notebook_scales, validate_scale
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


@dataclass
class Context:
    notebook: str
    scale: str
    seed: int
    device: object
    reports: Path
    figures: Path
    claims: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    started: float = field(default_factory=time.time)

    # -- outputs ---------------------------------------------------------------------------------------------
    def save_csv(self, df, name: str, compress_over_bytes: int = 2 * 2**20) -> Path:
        """Write a tidy table to ``reports/<scale>/<name>.csv`` (atomically) and return the path.

        Tables larger than ``compress_over_bytes`` (per-image rows) are written as ``<name>.csv.gz`` instead,
        keeping the committed reports small; ``pandas.read_csv`` reads either form.
        """
        text = df.to_csv(index=False).encode()
        for stale in (self.reports / f"{name}.csv", self.reports / f"{name}.csv.gz"):
            stale.unlink(missing_ok=True)
        if len(text) > compress_over_bytes:
            return atomic_write_bytes(self.reports / f"{name}.csv.gz", gzip.compress(text, mtime=0))
        return atomic_write_bytes(self.reports / f"{name}.csv", text)

    def save_fig(self, fig, name: str, dpi: int = 130) -> Path:
        """Save a matplotlib figure to ``figures/<scale>/<name>.png``.

        At ``smoke`` scale the figure is stamped "smoke: not meaningful" across its middle (also in the notebook's
        own display), so that a smoke figure shown out of context cannot pass for a result.
        """
        if self.is_smoke and not getattr(fig, "_smoke_mark", False):
            fig.text(0.5, 0.5, "smoke scale: not meaningful", transform=fig.transFigure, ha="center", va="center",
                     rotation=18, fontsize=22, color="crimson", alpha=0.35, fontweight="bold", zorder=1000)
            fig._smoke_mark = True
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return atomic_write_bytes(self.figures / f"{name}.png", buf.getvalue())

    def claim(self, claim: str, paper: str, ours: str, verdict: str, note: str = "") -> None:
        """Record one row of SUMMARY.md: the paper's statement, our measurement and an honest verdict."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self.claims.append({"notebook": self.notebook, "scale": self.scale, "claim": claim, "paper": paper,
                            "ours": ours, "verdict": verdict, "note": note})
        self._flush()

    def note(self, text: str) -> None:
        """Print a remark and keep it in the notebook's record (e.g. 'LPIPS weights unavailable: using DFD')."""
        print(text)
        self.notes.append(text)
        self._flush()

    def _flush(self) -> None:
        record = {"notebook": self.notebook, "scale": self.scale, "seed": self.seed, "device": str(self.device),
                  "claims": self.claims, "notes": self.notes}
        atomic_write_text(self.reports / "claims" / f"{self.notebook}.json", json.dumps(record, indent=2))

    @property
    def is_smoke(self) -> bool:
        return self.scale == "smoke"


def _under_repo(folder) -> Path:
    folder = Path(folder).expanduser()
    return folder if folder.is_absolute() else REPO_ROOT / folder


def setup(notebook: str, scale: str = "smoke", seed: int = 0, device: str = "auto", reports_dir="reports",
          figures_dir="figures", quiet: bool = False) -> Context:
    """Validate the notebook parameters and prepare its output folders ``<reports_dir>/<scale>/`` etc.

    Relative folders are taken relative to the repository, not the working folder, so that a notebook opened in
    JupyterLab or Voila (whose working folder is ``notebooks/``) writes to the same ``reports/`` and ``figures/``
    as ``make reproduce``.
    """
    validate_scale(scale)
    if scale not in notebook_scales(notebook):
        raise ValueError(f"{notebook} runs at {' / '.join(notebook_scales(notebook))} only, not at scale={scale!r} "
                         f"(it trains or describes models of the embedded dataset; rearlib.scales.NOTEBOOK_SCALES)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    dev = resolve_device(device)
    seed_everything(seed)
    reports = _under_repo(reports_dir) / scale
    figures = _under_repo(figures_dir) / scale
    reports.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    ctx = Context(notebook=notebook, scale=scale, seed=seed, device=dev, reports=reports, figures=figures)
    ctx._flush()  # a re-run starts with an empty claim list for this notebook
    if not quiet:
        print(f"{notebook}: scale={scale} seed={seed} device={dev} -> {reports}/, {figures}/")
        if scale == "smoke":
            print("smoke scale: proves that every code path runs; its numbers are NOT meaningful.")
    return ctx


def check_int_param(name: str, value, *, minimum: int = 1, optional: bool = False):
    """A notebook's integer parameter, checked in its first cell: ``value`` as an int ``>= minimum`` (or None when
    ``optional``, for "use the scale's default"). A bad count otherwise fails minutes later deep inside torch
    (``n_images = -1`` as a ``torch.arange`` error), and ``2.5`` or ``True`` would be truncated or read as 1."""
    if value is None and optional:
        return None
    allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"parameter {name} must be {allowed}, got {value!r}")
    if value < minimum:
        raise ValueError(f"parameter {name} must be {allowed}, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Pairing notebooks/*.py (the source of truth, jupytext percent format) with notebooks/*.ipynb (no outputs)
# ----------------------------------------------------------------------------------------------------------
def notebook_scripts(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebook scripts ``NN_name.py`` in execution order."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.py"))


def _cells(nb) -> list[tuple[str, str, tuple]]:
    return [(c.cell_type, c.source.strip(), tuple(sorted(c.metadata.get("tags", [])))) for c in nb.cells]


def script_to_notebook(script: Path):
    import jupytext  # only the pairing commands need it; notebook kernels import this module for setup()

    nb = jupytext.read(script)
    for i, cell in enumerate(nb.cells):  # stable ids: a re-sync changes a notebook only where its cells changed
        cell["id"] = f"cell-{i:03d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    return nb


def sync(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """Write ``NN_name.ipynb`` (without outputs) from each ``NN_name.py``."""
    import jupytext

    written = []
    for script in notebook_scripts(folder):
        target = script.with_suffix(".ipynb")
        jupytext.write(script_to_notebook(script), target, fmt="ipynb")
        written.append(target)
    return written


def check(folder: Path = NOTEBOOK_DIR) -> list[str]:
    """Problems with the pairing: a missing or stale ``.ipynb``, committed outputs, or no parameters cell."""
    import jupytext

    problems = []
    for script in notebook_scripts(folder):
        pair = script.with_suffix(".ipynb")
        source = jupytext.read(script)
        if not any("parameters" in c.metadata.get("tags", []) for c in source.cells):
            problems.append(f"{script.name}: no cell tagged 'parameters'")
        if not pair.exists():
            problems.append(f"{pair.name}: missing (run `make sync-notebooks`)")
            continue
        paired = jupytext.read(pair)
        if _cells(paired) != _cells(source):
            problems.append(f"{pair.name}: out of sync with {script.name} (run `make sync-notebooks`)")
        if any(c.get("outputs") for c in paired.cells if c.cell_type == "code"):
            problems.append(f"{pair.name}: has outputs; commit notebooks without outputs")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rearlib notebook", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("sync", "check"),
                        help="sync: regenerate notebooks/*.ipynb from the .py scripts; check: fail if a pair differs")
    args = parser.parse_args(argv)
    if args.command == "sync":
        for path in sync():
            print(f"wrote {path}")
        return 0
    problems = check()
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
