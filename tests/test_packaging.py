"""pyproject.toml and environment.yml describe the same environment; the CPU torch pair is consistent."""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
CONDA_TO_PYPI = {"pytorch": "torch"}  # conda-forge names that differ from PyPI's
NOT_PACKAGES = {"python", "pip"}


def _pyproject_requirements() -> dict[str, SpecifierSet]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    return {Requirement(r).name.lower(): Requirement(r).specifier for r in reqs}


def _conda_requirements() -> dict[str, SpecifierSet]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-e"):
                continue
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", item)
            name, spec = m.group(1).lower(), m.group(2).replace(" ", "")
            if name in NOT_PACKAGES:
                continue
            out[CONDA_TO_PYPI.get(name, name)] = SpecifierSet(spec)
    return out


def test_same_packages_and_versions():
    py, conda = _pyproject_requirements(), _conda_requirements()
    assert set(py) == set(conda), f"only in pyproject: {set(py) - set(conda)}; only in environment.yml: {set(conda) - set(py)}"
    for name in py:
        assert py[name] == conda[name], f"{name}: pyproject {py[name]} vs environment.yml {conda[name]}"


def test_environment_yml_is_a_valid_conda_spec():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "rearlib" and "conda-forge" in env["channels"]
    assert any(isinstance(d, dict) and "pip" in d for d in env["dependencies"])
    assert all(isinstance(d, (str, dict)) for d in env["dependencies"])


def test_pinned_cpu_pair_satisfies_the_declared_ranges_and_is_installed():
    from importlib.metadata import version

    py = _pyproject_requirements()
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name] = next(iter(req.specifier)).version
    assert set(pins) == {"torch", "torchvision"}
    for name, ver in pins.items():
        assert py[name].contains(ver), f"pinned {name}=={ver} is outside pyproject's {py[name]}"
    # the installed pair is the pinned pair, and torchvision's compiled ops load with this torch
    import torch
    import torchvision

    assert version("torch").split("+")[0] == pins["torch"]
    assert version("torchvision").split("+")[0] == pins["torchvision"]
    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
