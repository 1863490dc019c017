"""The built wheel, installed into a new virtualenv without the `report` extra, runs from an empty folder.

Builds the wheel (pip, build isolation: setuptools comes from the package index or pip's cache), installs
it with its dependencies into a fresh venv, and runs the commands from a folder holding nothing of the
repo: rules and plans checks find the shipped catalogues, replay writes its files without matplotlib,
pyarrow or scikit-learn, and `riskwatch kafka start` finds the shipped pom and log4j config (jars come
from the cache `app.kafka_local.ensure_jars` keeps outside the repo), then a worker serves the page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app import kafka_local
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Installed:
    """A wheel installed into its own venv, and an empty folder to run it from."""

    wheel: Path
    bin: Path
    cwd: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run one of the venv's programs in the empty folder; fail with its output when it fails."""
        done = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.cwd, env=self.env, text=True,
                              capture_output=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what goes into the wheel: setuptools' build/ folder in the checkout would keep
    # files since deleted from the source and ship them, and a concurrent build would share it.
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("app", "agents", "models", "deploy"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(base / "dist")],
                   check=True, timeout=300, capture_output=True)
    wheel = next((base / "dist").glob("riskwatch-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=120)
    subprocess.run([str(base / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600,
                   capture_output=True)
    # Nothing of the test's environment may lead the installed code back to the checkout or its settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWATCH_") and k != "PYTHONPATH"}
    empty = base / "empty"
    empty.mkdir()
    return Installed(wheel, base / "venv" / "bin", empty, env)


def test_wheel_ships_every_runtime_file_and_keeps_analysis_libraries_in_an_extra(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        meta = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for shipped in ("deploy/rules.yaml", "deploy/plans.yaml", "deploy/kafka/pom.xml", "deploy/kafka/log4j2.properties",
                    "app/static/warnings.html", "deploy/prometheus/riskwatch-rules.yml"):
        assert shipped in names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    for heavy in ("matplotlib", "pyarrow", "scikit-learn"):
        assert all("extra ==" in line for line in requires if heavy in line), f"{heavy} outside an extra"
        assert any(heavy in line and 'extra == "report"' in line for line in requires)


def test_rules_and_plans_check_use_the_shipped_catalogues(installed: Installed) -> None:
    rules = installed.run("riskwatch", "rules", "check").stdout
    assert "site-packages/deploy/rules.yaml: version" in rules and rules.rstrip().endswith("OK")
    plans = installed.run("riskwatch", "plans", "check").stdout
    assert "site-packages/deploy/plans.yaml: version" in plans
    assert list(installed.cwd.iterdir()) == []


def test_replay_without_the_report_extra_writes_its_files_and_names_the_extra(installed: Installed) -> None:
    missing = installed.run("python", "-c", "import importlib.util as u; "
                            "print([m for m in ('matplotlib', 'pyarrow', 'sklearn') if u.find_spec(m)])")
    assert missing.stdout.strip() == "[]"
    installed.run("python", "-c", "from models.synth import generate, write_jsonl; "
                  "write_jsonl(generate(seed=3, accounts=60, days=1.0), 'events.jsonl')")
    out = installed.run("riskwatch", "replay", "events.jsonl", "--alerts", "alerts.jsonl", "--scores",
                        "scores.jsonl", "--report", "report").stdout
    assert out.count("pip install 'riskwatch[report]'") == 1
    report = json.loads((installed.cwd / "report" / "report.json").read_text())
    assert report["warnings"]["total"] > 0 and report["evaluation"]["transactions"]["roc_auc"] > 0.5
    assert (installed.cwd / "alerts.jsonl").stat().st_size > 0 and (installed.cwd / "scores.jsonl").stat().st_size > 0
    assert "<img" not in (installed.cwd / "report" / "report.html").read_text()
    (installed.cwd / "events.parquet").write_bytes(b"PAR1")
    parquet = subprocess.run([str(installed.bin / "riskwatch"), "replay", "events.parquet"], cwd=installed.cwd,
                             env=installed.env, text=True, capture_output=True, timeout=60, check=False)
    assert parquet.returncode != 0 and "needs pyarrow: pip install 'riskwatch[report]'" in parquet.stderr


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


@pytest.fixture
def broker(installed: Installed) -> Iterator[int]:
    port = free_port()
    yield port
    subprocess.run([str(installed.bin / "riskwatch"), "kafka", "stop", "--port", str(port)], env=installed.env,
                   cwd=installed.cwd, timeout=120, check=False)
    kafka_local.wipe(port)  # the broker's data went to the shared cache, keyed by this one-off port


def test_kafka_and_worker_run_from_the_wheel(installed: Installed, broker: int, tmp_path: Path) -> None:
    installed.run("riskwatch", "kafka", "start", "--port", str(broker), "--fresh", "--timeout", "120", timeout=600)
    assert installed.run("riskwatch", "kafka", "status", "--port", str(broker)).stdout.startswith("running at")
    metrics, web = free_port(), free_port()
    env = {**installed.env, "RISKWATCH_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker}", "RISKWATCH_METRICS_PORT": str(metrics),
           "RISKWATCH_WEB_PORT": str(web), "RISKWATCH_DATA_DIR": str(tmp_path / "data"),
           "RISKWATCH_APP_ID": "packaging-test"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([str(installed.bin / "riskwatch"), "worker"], cwd=installed.cwd, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, page = time.monotonic() + 180, None
        while page is None and time.monotonic() < deadline and worker.poll() is None:
            page = _get(f"http://127.0.0.1:{web}/")
            time.sleep(0.5)
        assert page is not None and "<html" in page.lower(), log.read_text(errors="replace")[-3000:]
        assert _get(f"http://127.0.0.1:{metrics}/metrics") is not None
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    installed.run("riskwatch", "kafka", "stop", "--port", str(broker), timeout=120)
