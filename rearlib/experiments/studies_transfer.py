"""Moving a scale's records between machines: evaluation records and training results, never weights.

:func:`pack` writes every evaluation record of a scale, each study run's ``result.json``, the ``result.json`` of
every VA-π run those records evaluate and the VA-π study's sample grids into one tar.gz; :func:`unpack` extracts
such an archive into the artifact root on another machine, refusing anything that is not a record, config or
result JSON file or a grid of uint8 images, and never overwriting a file that exists.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import torch

from rearlib.experiments.evaluation import RECORD_KIND, iter_records
from rearlib.experiments.studies_plan import STUDIES, settings, study_specs
from rearlib.experiments.studies_workspace import Workspace
from rearlib.runtime import artifacts_root, atomic_write_bytes
from rearlib.vapi_units import GRID_KIND

#: The only members an archive may hold: records, their keys, training results and sample grids, by hash folder.
MEMBER = re.compile(r"^(eval_records|generators|vapi|vapi_grids)/[0-9a-f]{12}/(record|config|result)\.json$")
GRID_MEMBER = re.compile(r"^vapi_grids/[0-9a-f]{12}/grid\.pt$")
MAX_MEMBER_BYTES = 8 * 2**20


def pack(scale: str, out: str | Path, *, ws: Workspace | None = None, log=print) -> dict:
    """Write every evaluation record of ``scale`` and each study run's ``result.json`` (no weights) to a tar.gz.

    Paths inside are relative to the artifact root (``eval_records/<hash>/record.json``,
    ``generators/<hash>/result.json`` with their ``config.json``). Written atomically.
    """
    ws = ws or Workspace(scale, "cpu", progress=False)
    root = artifacts_root()
    files: list[Path] = []
    vapi_runs = set()
    for path, record in iter_records(scale=scale):
        files += [path, path.with_name("config.json")]
        model = record.get("key", {}).get("model") or {}
        if isinstance(model, dict) and model.get("kind") == "vapi":
            vapi_runs.add(model["run"])
    for h in sorted(vapi_runs):  # the VA-π runs these records evaluate: their histories and times
        files += [root / "vapi" / h / "result.json", root / "vapi" / h / "config.json"]
    for cfg in sorted((root / GRID_KIND).glob("*/config.json")):
        if json.loads(cfg.read_text()).get("scale") == scale:
            files += [cfg, cfg.with_name("grid.pt")]
    runs = set()
    for plan in settings(scale)["plans"]:  # the training results of every plan's runs
        for name in STUDIES:
            for spec in study_specs(scale, name, plan):
                runs.add(ws.resolve(spec).run_hash)
    for h in sorted(runs):
        folder = root / "generators" / h
        if (folder / "result.json").is_file():
            files += [folder / "result.json", folder / "config.json"]
    buf = io.BytesIO()
    n_records = n_results = 0
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            if not f.is_file():
                continue
            rel = f.relative_to(root).as_posix()
            tar.add(f, arcname=rel, recursive=False)
            n_records += rel.startswith(RECORD_KIND) and rel.endswith("record.json")
            n_results += rel.endswith("result.json")
    atomic_write_bytes(out, buf.getvalue())
    log(f"wrote {out}: {n_records} evaluation records, {n_results} training results "
        f"({len(buf.getvalue()) / 1024:.0f} KiB)")
    return {"records": n_records, "results": n_results, "path": str(out)}


def unpack(archive: str | Path, *, log=print) -> dict:
    """Extract a :func:`pack` archive into the artifact root; existing files are kept (never overwritten).

    Only regular files named ``eval_records|generators|vapi|vapi_grids/<12 hex>/(record|config|result).json``
    holding JSON, and ``vapi_grids/<12 hex>/grid.pt`` holding a uint8 image tensor (loaded without code), are
    accepted; anything else raises ValueError before a file is written.
    """
    root = artifacts_root()
    members = []
    with tarfile.open(archive, mode="r:gz") as tar:
        for m in tar.getmembers():
            if m.isdir():
                continue
            grid = bool(GRID_MEMBER.match(m.name))
            if not m.isfile() or not (grid or MEMBER.match(m.name)) or m.size > MAX_MEMBER_BYTES:
                raise ValueError(f"{archive}: unexpected member {m.name!r} (type {m.type!r}, {m.size} bytes); "
                                 f"not a rearlib.experiments.studies pack")
            data = tar.extractfile(m).read()
            if grid:
                _check_grid(archive, m.name, data)
            else:
                try:
                    json.loads(data)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{archive}: {m.name} is not JSON ({err})") from err
            members.append((m.name, data))
    written = kept = 0
    for name, data in members:
        target = root / name
        if target.exists():
            kept += 1
            continue
        atomic_write_bytes(target, data)
        written += 1
    log(f"unpacked {archive}: {written} file(s) written, {kept} already present (kept)")
    return {"written": written, "kept": kept}


def _check_grid(archive, name: str, data: bytes) -> None:
    """A grid member must load without code (``weights_only``) as uint8 images [n, 3, H, W]."""
    try:
        grid = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means: not ours
        raise ValueError(f"{archive}: {name} is not a tensor file ({type(err).__name__}: {err})") from err
    if not (isinstance(grid, torch.Tensor) and grid.dtype == torch.uint8 and grid.dim() == 4 and grid.shape[1] == 3):
        raise ValueError(f"{archive}: {name} is not a grid of uint8 images [n, 3, H, W]")
