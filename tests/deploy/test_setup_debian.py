"""deploy/setup-debian.sh installs the missing Debian packages when it may, or stops naming the command.

Runs the script with a PATH of stubs only: which tools exist, the user id, sudo and apt-get are the
test's to choose, and apt-get writes down what it was asked instead of installing anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "deploy" / "setup-debian.sh"
TOOLS = ("java", "mvn", "promtool", "prometheus", "amtool", "prometheus-alertmanager", "chromium", "kubectl")


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _run(tmp_path: Path, mode: str, *, have: tuple[str, ...] = TOOLS, uid: int = 0, sudo: bool | None = None,
         java: str = "17.0.15", kubectl: str = "32+") -> tuple[subprocess.CompletedProcess[str], list[str]]:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    says = {"java": f'echo \'openjdk version "{java}" 2025-04-15\' >&2',
            "kubectl": f"echo '{{\"clientVersion\": {{\"major\": \"1\", \"minor\": \"{kubectl}\"}}}}'"}
    for tool in have:
        _stub(stubs, tool, says.get(tool, "exit 0"))
    _stub(stubs, "id", f"echo {uid}")
    log = tmp_path / "apt.log"
    _stub(stubs, "apt-get", f'echo "$DEBIAN_FRONTEND $*" >> {log}')
    if sudo is not None:
        _stub(stubs, "sudo", f'[ "$1" = -n ] && shift; {"exec" if sudo else "exit 1; exec"} "$@"')
    for real in ("env", "true"):  # what sudo is asked to run
        (stubs / real).symlink_to(f"/usr/bin/{real}")
    done = subprocess.run(["/bin/bash", str(SCRIPT), mode], env={"PATH": str(stubs), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=30, check=False)
    return done, log.read_text().splitlines() if log.exists() else []


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    done, apt = _run(tmp_path, "test", uid=1000)
    assert (done.returncode, done.stderr, apt) == (0, "", [])


def test_root_installs_what_is_missing(tmp_path: Path) -> None:
    done, apt = _run(tmp_path, "test", have=tuple(t for t in TOOLS if t not in ("amtool", "chromium")))
    assert done.returncode == 0, done.stderr
    assert apt == ["noninteractive update -qq", "noninteractive install -y -qq prometheus-alertmanager chromium"]


def test_sudo_without_a_password_installs_too(tmp_path: Path) -> None:
    done, apt = _run(tmp_path, "test", have=tuple(t for t in TOOLS if t != "mvn"), uid=1000, sudo=True)
    assert done.returncode == 0, done.stderr
    assert apt[-1] == "noninteractive install -y -qq maven"


@pytest.mark.parametrize("sudo", [None, False], ids=["no sudo", "sudo wants a password"])
def test_otherwise_one_line_names_the_command_and_nothing_runs(tmp_path: Path, sudo: bool | None) -> None:
    done, apt = _run(tmp_path, "test", have=("java", "promtool", "prometheus", "amtool", "prometheus-alertmanager",
                                             "kubectl"), uid=1000, sudo=sudo)
    assert done.returncode == 1 and apt == []
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.rstrip().endswith("run  sudo apt-get install -y maven chromium")


def test_demo_needs_only_java_and_maven_and_java_must_be_17(tmp_path: Path) -> None:
    done, apt = _run(tmp_path, "demo", have=("java", "mvn"), java="11.0.2")
    assert done.returncode == 0, done.stderr
    assert apt[-1] == "noninteractive install -y -qq openjdk-17-jre-headless"


@pytest.mark.parametrize(("have", "kubectl", "found"), [
    (tuple(t for t in TOOLS if t != "kubectl"), "", "none"),
    (TOOLS, "20", "1.20"),
], ids=["no kubectl", "Debian's 1.20"])
def test_test_needs_a_kubectl_no_debian_package_provides(tmp_path: Path, have: tuple[str, ...], kubectl: str,
                                                        found: str) -> None:
    done, apt = _run(tmp_path, "test", have=have, kubectl=kubectl)
    assert done.returncode == 1 and apt == [], "nothing to install would help: stop before apt-get"
    assert len(done.stderr.splitlines()) == 1
    assert f"needs kubectl 1.24 or newer (found: {found};" in done.stderr


def test_podman_mode_installs_what_run_stack_needs(tmp_path: Path) -> None:
    done, apt = _run(tmp_path, "podman", have=("java", "mvn", "podman", "catatonit"))
    assert done.returncode == 0, done.stderr
    assert apt[-1] == "noninteractive install -y -qq podman-compose debootstrap runc"


def test_make_and_ci_go_through_the_script() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: debian-test \$\(STAMP\)$", makefile, re.M)
    assert re.search(r"^demo: debian-demo \$\(STAMP\)$", makefile, re.M)
    assert ".NOTPARALLEL:" in makefile  # so the check runs before the venv is made
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make -s debian-test" in ci and "apt-get" not in ci and ci.rstrip().endswith("make test")
