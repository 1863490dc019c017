#!/usr/bin/env bash
# docker-compose.yml's stack under Debian's podman, on a machine that reaches Debian's and PyPI's
# mirrors but no container registry (this project's machines): a Debian base made by debootstrap,
# the worker image built from the Dockerfile on it, and local stand-ins for the images the compose
# file pulls (Kafka from the same Maven jars as `riskwatch kafka start`, Prometheus and Alertmanager
# from Debian's packages; Grafana has no Debian package and is left out). Then the stack up, the demo
# stream fed for SECONDS, and the checks: Prometheus scrapes the worker, the worker publishes
# warnings, Alertmanager receives pages. Containers, volumes and network are removed at the end; the
# images stay, so a second run skips the builds. As root, after `make .venv/.installed`. Measured
# here: 3 min 37 s the first time, 1 min 51 s with the images there.
#   deploy/podman/run-stack.sh [SECONDS]   the stack; host ports: the compose file's plus PORT_OFFSET (30000)
#   deploy/podman/run-stack.sh image       only the base and the worker image, which then checks the
#                                          shipped catalogues (about 1.5 min from nothing; .ci/run runs it)
set -euo pipefail
cd "$(dirname "$0")/../.."
here=$PWD/deploy/podman
python=${PYTHON:-.venv/bin/python}
mode=stack
[ "${1:-}" = image ] && mode=image && shift
seconds=${1:-60}
offset=${PORT_OFFSET:-30000}
base=localhost/riskwatch-base:bookworm
project=riskwatch-podman
export CONTAINERS_CONF=$here/containers.conf
work=$(mktemp -d)
compose=(podman-compose -p "$project" -f "$work/compose.yml")
started=$SECONDS

step() { echo "== $* ($((SECONDS - started)) s)" >&2; }
cleanup() {
  podman ps -aq --filter name=demo-producer | xargs -r podman rm -f >/dev/null
  if [ -f "$work/compose.yml" ]; then "${compose[@]}" down -v >/dev/null 2>&1; fi
  rm -rf "$work"
}
trap cleanup EXIT

deploy/setup-debian.sh podman

if ! podman image exists $base; then
  step "base image $base from debootstrap"
  debootstrap --variant=minbase --include=python3,python3-venv,passwd bookworm "$work/rootfs" >/dev/null
  # The host's CA bundle: pip and apt in the builds trust what the host trusts (a TLS proxy's CA too).
  cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/"
  tar -C "$work/rootfs" -c . | podman import -q --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - $base >/dev/null
  rm -rf "$work/rootfs"
fi

# The host's network for the builds: pip and apt reach their mirrors as the host does.
step "worker image from the Dockerfile"
podman build -q --network host --build-arg BASE=$base -t localhost/riskwatch:dev . >/dev/null
if [ $mode = image ]; then
  # The installed package, not the checkout: the catalogues must ship inside it.
  podman run --rm --network none localhost/riskwatch:dev sh -c 'riskwatch rules check && riskwatch plans check' >/dev/null
  step "the image runs riskwatch and its shipped catalogues load"
  exit 0
fi
step "stand-ins: Kafka from the Maven jars, Prometheus and Alertmanager from Debian"
cp -r "$here/kafka" "$work/kafka"
cp -r "$("$python" -c 'from app.kafka_local import ensure_jars; print(ensure_jars())')" "$work/kafka/libs"
podman build -q --network host --build-arg BASE=$base -t localhost/riskwatch-kafka:4.1.1 "$work/kafka" >/dev/null
podman build -q --network host --build-arg BASE=$base -t localhost/riskwatch-prometheus:debian "$here/prometheus" >/dev/null

"$python" - "$work/compose.yml" "$offset" <<'EOF'
"""docker-compose.yml with the local images, absolute bind paths, no Grafana, host ports shifted."""
import sys
from pathlib import Path

import yaml

out, offset = Path(sys.argv[1]), int(sys.argv[2])
compose = yaml.safe_load(Path("docker-compose.yml").read_text())
services = compose["services"]
del services["grafana"]
services["kafka"]["image"] = "localhost/riskwatch-kafka:4.1.1"
env = services["kafka"]["environment"]
env["KAFKA_ADVERTISED_LISTENERS"] = env["KAFKA_ADVERTISED_LISTENERS"].replace(":29092", f":{29092 + offset}")
for name, binary in (("prometheus", "prometheus"), ("alertmanager", "prometheus-alertmanager")):
    services[name].update(image="localhost/riskwatch-prometheus:debian", entrypoint=[f"/usr/bin/{binary}"])
for name in ("worker", "demo-producer"):
    del services[name]["build"]
    services[name]["image"] = "localhost/riskwatch:dev"
for service in services.values():
    ports = (p.split(":") for p in service.get("ports", []))
    service["ports"] = [f"{int(host) + offset}:{inside}" for host, inside in ports]
    service["volumes"] = [str(Path.cwd() / v[2:]) if v.startswith("./") else v for v in service.get("volumes", [])]
out.write_text(yaml.safe_dump(compose, sort_keys=False))
EOF

step "stack up"
"${compose[@]}" up -d kafka worker prometheus alertmanager >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; exit 1; }
metrics=http://127.0.0.1:$((9108 + offset))/metrics
for _ in $(seq 120); do curl -sf "$metrics" >/dev/null && break; sleep 1; done
step "demo stream for $seconds s"
"${compose[@]}" run -d demo-producer >/dev/null 2>&1
sleep "$seconds"

step "checks"
"$python" - "$offset" <<'EOF'
"""Prometheus scrapes the worker, the worker published warnings, Alertmanager received pages."""
import json
import sys
import urllib.request

offset = int(sys.argv[1])


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port + offset}{path}", timeout=10) as response:
        return response.read().decode()


up = json.loads(get(9090, '/api/v1/query?query=up{job="riskwatch"}'))["data"]["result"]
warnings = sum(float(line.rsplit(" ", 1)[1]) for line in get(9108, "/metrics").splitlines()
               if line.startswith("riskwatch_warnings_total{"))
pages = json.loads(get(9093, "/api/v2/alerts"))
print(f"Prometheus scrapes the worker: {[r['value'][1] for r in up]}; warnings published: {warnings:.0f};"
      f" alerts in Alertmanager: {len(pages)}")
sys.exit(0 if [r["value"][1] for r in up] == ["1"] and warnings > 0 and pages else 1)
EOF
step "done"
