"""The import rules of pyproject.toml's [tool.importlinter] contracts hold, cover every run-time module of common,
and actually bite: the same contracts fail on a copy of the tree where a worker module imports the API."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support import REPO

TOOLING = {"common.cli", "common.devstack"}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)})


def contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_contracts_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


def test_every_run_time_module_of_common_is_fenced_from_the_tooling():
    (fence,) = [c for c in contracts() if c["name"] == "run-time code never imports the tooling"]
    listed = set(fence["source_modules"])
    modules = {f"common.{p.stem}" for p in (REPO / "common").glob("*.py") if p.stem != "__init__"}
    modules |= {f"common.{p.name}" for p in (REPO / "common").iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    assert modules - TOOLING - listed == set(), "add new common modules to the contract's source_modules"
    assert {"api", "worker"} <= listed and not listed & TOOLING


def test_a_worker_module_importing_the_api_breaks_the_contracts(tmp_path):
    for name in ("api", "worker", "common"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    drain = tmp_path / "worker" / "drain.py"
    drain.write_text(drain.read_text() + "\nimport api.deps  # a deliberate violation\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "api and worker never import each other BROKEN" in proc.stdout, proc.stdout
