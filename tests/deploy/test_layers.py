"""The import layers in pyproject.toml ([tool.importlinter]) hold, and an upward import breaks them.

lint-imports (import-linter) builds the import graph of app, agents, models and deploy, indirect
imports included, and checks two contracts: the layers only import downwards, and nothing in
models/ (the wire contract and scoring) imports Kafka, Faust or the runtime. The second test plants
the imports the layering removed (models importing app) in a copy of the tree and expects both
contracts to break, so the first cannot pass by checking nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH: lint-imports finds the packages to graph on the path, here the tree in `cwd`.
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_the_tree_keeps_its_import_layers() -> None:
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken." in out.stdout


def test_scoring_that_imports_the_runtime_breaks_the_layers(tmp_path: Path) -> None:
    for package in ("app", "agents", "models", "deploy"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    rules = tmp_path / "models" / "rules" / "__init__.py"
    # What models/ did before the contract moved into it: import the schemas and settings from app/.
    rules.write_text(rules.read_text() + "\nfrom app.settings import Settings  # noqa: E402\n")
    out = _lint(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Contracts: 0 kept, 2 broken." in out.stdout
    assert "models.rules -> app.settings" in out.stdout
