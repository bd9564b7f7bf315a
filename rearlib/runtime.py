"""Scales, config hashing, the artifact cache, atomic writes and provenance helpers.

Every expensive piece of work (a tokenizer, a classifier, a generator run, a set of samples) is stored under
``artifacts/<kind>/<hash>/`` where ``hash`` is a short digest of the config that produced it. A notebook that
is interrupted, or run in several chunks on a GPU box, therefore resumes instead of starting over, and two
notebooks that need the same thing share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import random
import tempfile
import warnings
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

# torch and numpy are imported inside the functions that use them: the reproduce driver, ``python -m rearlib
# notebook`` and rearlib.vapi_config import this module without needing either, and torch takes seconds to import.

#: The repository checkout this package runs from (reports/, figures/, data/ and artifacts/ live here).
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Root of the artifact cache; overridable so tests and CI can keep it in a temporary folder.
ARTIFACTS_ENV = "REARLIB_ARTIFACTS"


def resolve_device(device: str = "auto"):
    """Map ``"auto"`` to CUDA when available, else CPU; validate explicit names early with a clear message."""
    import torch  # deferred: see the note at the imports

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
    return dev


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and cuDNN convolutions switched to ``enabled`` inside; both flags restored after."""
    import torch  # deferred: see the note at the imports

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not stable JSON
        return "nan"
    return obj


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable short SHA-256 of a config (dicts, dataclasses, lists, scalars), independent of key order."""
    text = json.dumps(_jsonable(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def artifacts_root(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env)
    # The repository root when running from a checkout, else the working directory.
    base = REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()
    return base / "artifacts"


def artifact_dir(kind: str, cfg: Any, root: str | os.PathLike | None = None) -> Path:
    """``artifacts/<kind>/<hash>/``, created, with the config written beside the work as ``config.json``."""
    path = artifacts_root(root) / kind / config_hash(cfg)
    path.mkdir(parents=True, exist_ok=True)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        atomic_write_text(cfg_file, json.dumps(_jsonable(cfg), indent=2, sort_keys=True, default=str))
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file.

    The file gets the usual permissions (0666 less the umask), not the 0600 of a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` block: processes that
    update the same shared file (e.g. two runners writing one provenance.json) take turns instead of losing writes."""
    import fcntl  # POSIX only; the runners that need it run on Linux and macOS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch  # deferred: see the note at the imports

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


class UnreadableFileError(ValueError):
    """A file that should hold tensors (a checkpoint, a cache) is missing, empty, truncated or not a torch file."""


def load_torch_file(path: str | os.PathLike, what: str = "file", fix: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with an error that names the file and says what to do
    (``fix``) when it is missing, empty, truncated or holds something else."""
    import torch  # deferred: see the note at the imports

    path = Path(path)
    hint = f" {fix}" if fix else ""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found.{hint}")
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{what} {path} is empty (0 bytes): an interrupted copy or download?{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        raise UnreadableFileError(f"{what} {path} ({path.stat().st_size:,} bytes) cannot be read: it is truncated, "
                                  f"corrupt or not a torch file ({type(err).__name__}: {str(err)[:200]}).{hint}") from err


def read_json(path: str | os.PathLike, what: str = "record") -> dict:
    """A JSON object from ``path``; :class:`UnreadableFileError` naming the file if it is empty, truncated or not a
    JSON object (callers that own the file as a cache rebuild it, others pass the error on)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UnreadableFileError(f"{what} {path} ({path.stat().st_size:,} bytes) is not valid JSON: truncated or "
                                  f"overwritten ({err})") from err
    if not isinstance(value, dict):
        raise UnreadableFileError(f"{what} {path} holds a JSON {type(value).__name__}, not an object")
    return value


def completed_record(path: str | os.PathLike, what: str, *, stacklevel: int = 3) -> dict | None:
    """The JSON record at ``path`` if it says ``"status": "completed"``; None if it is absent, unfinished or damaged
    (damaged: a warning names the file, and the run it records counts as unfinished, to be resumed or redone)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = read_json(path, what)
    except UnreadableFileError as err:
        warnings.warn(f"{err}; the run counts as unfinished", stacklevel=stacklevel)
        return None
    return record if record.get("status") == "completed" else None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Code that needs exact streams passes torch.Generator objects."""
    import numpy as np  # deferred: see the note at the imports
    import torch  # deferred: see the note at the imports

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def hardware_info() -> dict:
    """CPU, GPU and library versions, for provenance records and benchmark tables."""
    import torch  # deferred: see the note at the imports

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = str(torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def save_sharded(state: dict, path: str | os.PathLike, max_bytes: int = 15 * 2**20) -> list[Path]:
    """Save a flat dict of tensors (plus non-tensor metadata) as ``path`` and ``path.stem.partN.pt`` shards.

    Shipped checkpoints must stay under 16 MiB per file (repository and transfer limits); ``path`` holds the
    metadata and the names of the shards, each of which holds a subset of the tensors. Every file is atomic.
    """
    import torch  # deferred: see the note at the imports

    path = Path(path)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    if current:
        shards.append(current)
    names = [f"{path.stem}.part{i}.pt" for i in range(len(shards))]
    written = [atomic_torch_save(s, path.parent / n) for s, n in zip(shards, names)]
    written.append(atomic_torch_save({"format": "rearlib.sharded/1", "meta": meta, "shards": names}, path))
    return written


def load_sharded(path: str | os.PathLike) -> dict:
    """Inverse of :func:`save_sharded`: the metadata dict with every shard's tensors merged in."""
    import torch  # deferred: see the note at the imports

    path = Path(path)
    index = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(index, dict) or index.get("format") != "rearlib.sharded/1":
        raise ValueError(f"{path} is not a sharded rearlib checkpoint")
    out = dict(index["meta"])
    for name in index["shards"]:
        shard_path = path.parent / name
        if not shard_path.is_file():
            raise FileNotFoundError(f"{path} names the shard {name}, which is missing next to it")
        out.update(torch.load(shard_path, map_location="cpu", weights_only=True))
    return out


def config_from_dict(cls, d: dict, noun: str = "fields"):
    """``cls(**d)`` for a config dataclass, refusing unknown keys with a message that lists the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} {noun} {unknown}; known: {sorted(known)}")
    return cls(**d)
