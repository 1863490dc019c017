"""The Kubernetes manifests in deploy/kubernetes hang together and agree with the worker's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.settings import Settings
from models.plans import load_plans
from models.rules import load_catalogue

K8S = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
SECRET_SETTINGS = {"RISKWATCH_KAFKA_SASL_PASSWORD", "RISKWATCH_PSEUDONYMISE_KEY", "RISKWATCH_SESSION_SECRET"}


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _objects() -> list[dict[str, Any]]:
    out = []
    for name in _kustomization()["resources"]:
        out += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return out


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in _objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _env() -> dict[str, str]:
    gen = next(g for g in _kustomization()["configMapGenerator"] if g["name"] == "riskwatch-env")
    env: dict[str, str] = {}
    for name in gen["envs"]:
        for line in (K8S / name).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    return env


def test_every_referenced_file_exists_and_parses() -> None:
    k = _kustomization()
    for name in k["resources"]:
        assert (K8S / name).is_file(), name
    for gen in k["configMapGenerator"]:
        for entry in gen.get("files", []):
            assert (K8S / entry.split("=", 1)[1]).is_file(), entry
        for name in gen.get("envs", []):
            assert (K8S / name).is_file(), name
    assert {o["kind"] for o in _objects()} >= {"StatefulSet", "Service", "Namespace", "NetworkPolicy",
                                                "PodDisruptionBudget"}


def test_the_env_configmap_is_valid_settings_without_secrets() -> None:
    env = _env()
    fields = {f"RISKWATCH_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"unknown settings: {sorted(set(env) - fields)}"
    assert not set(env) & SECRET_SETTINGS, "secrets belong in the Secret, not the ConfigMap"
    s = Settings(**{k.removeprefix("RISKWATCH_").lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    assert s.web_host == "0.0.0.0", "Prometheus must reach the pod IP (the NetworkPolicy limits who may)"
    assert s.kafka_security_protocol == "SASL_SSL" and s.topic_replication >= 3


def test_statefulset_mounts_what_the_settings_point_at() -> None:
    env, sts = _env(), _one("StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["replicas"] <= int(env["RISKWATCH_TOPIC_PARTITIONS"]), "workers beyond the partition count idle"
    (c,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["data"] == env["RISKWATCH_DATA_DIR"]
    assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    generated = {g["name"]: g for g in _kustomization()["configMapGenerator"]}
    for volume, setting in (("rules", "RISKWATCH_RULES_FILE"), ("plans", "RISKWATCH_PLANS_FILE")):
        path = Path(env[setting])
        assert str(path.parent) == mounts[volume]
        cm = volumes[volume]["configMap"]["name"]
        keys = {f.split("=", 1)[0] for f in generated[cm]["files"]}
        assert path.name in keys, f"{setting} names {path.name}, the ConfigMap holds {keys}"
    assert str(Path(env["RISKWATCH_KAFKA_SSL_CAFILE"]).parent) == mounts["kafka-ca"]
    refs = [e.get("secretRef", {}).get("name") for e in c["envFrom"]]
    assert "riskwatch-secrets" in refs
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": int(env["RISKWATCH_METRICS_PORT"]), "web": int(env["RISKWATCH_WEB_PORT"])}
    assert c["readinessProbe"]["httpGet"]["port"] == "metrics"
    bound = Settings.model_fields["shutdown_timeout"].default
    assert pod["terminationGracePeriodSeconds"] > bound, "the worker's own shutdown bound comes first"
    static = {e["name"]: e for e in c.get("env", [])}["RISKWATCH_INSTANCE_ID"]
    assert static["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "a stable, unique id per pod"
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]


def test_services_select_the_workers() -> None:
    labels = _one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    headless = _one("Service", "riskwatch-workers")
    assert headless["spec"]["clusterIP"] == "None"
    assert _one("StatefulSet")["spec"]["serviceName"] == "riskwatch-workers"
    for svc in (headless, _one("Service", "riskwatch-metrics")):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"metrics"}


def test_the_catalogues_in_the_configmaps_load() -> None:
    generated = {g["name"]: g for g in _kustomization()["configMapGenerator"]}
    rules = K8S / generated["riskwatch-rules"]["files"][0].split("=", 1)[1]
    plans = K8S / generated["riskwatch-plans"]["files"][0].split("=", 1)[1]
    assert load_catalogue(rules).rules
    assert load_plans(plans)
