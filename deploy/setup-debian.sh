#!/usr/bin/env bash
# The Debian packages `make test` and `make demo` need: installed when missing (as root, or through
# `sudo -n`), else one line naming the command to run, and a non-zero exit before anything else runs.
#   deploy/setup-debian.sh demo   Java 17+ and Maven (the local Kafka broker), python3-venv
#   deploy/setup-debian.sh test   the same, plus Prometheus (promtool), Alertmanager (amtool), Chromium,
#                                 and a kubectl of 1.24 or newer (checked, not installed: see below)
#   deploy/setup-debian.sh podman the demo's, plus what deploy/podman/run-stack.sh runs
# Called by the Makefile and, through it, by .ci/run: the one place that knows these packages.
set -euo pipefail

mode=${1:-test}
python=${PYTHON:-python3}
missing=()

java_major() {
  # `java -version` prints e.g. `openjdk version "17.0.15" 2025-04-15` (or "1.8.0_402": major 1).
  local out
  out=$(java -version 2>&1) || return 1
  [[ $out =~ version\ \"([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
}

kubectl_minor() {
  # `kubectl version --client -o json` says e.g. "minor": "32+" (vendor builds add the +).
  local out
  out=$(kubectl version --client -o json 2>/dev/null) || return 1
  [[ $out =~ \"minor\":\ *\"([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
}

major=$(command -v java >/dev/null && java_major || echo 0)
((major >= 17)) || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
# Debian's python3 lacks ensurepip until python3-venv is in, and `python3 -m venv` then fails.
"$python" -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
case $mode in
  demo) ;;
  test)
    command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
    command -v amtool >/dev/null && command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
    command -v chromium >/dev/null || missing+=(chromium)
    # `kubectl kustomize` renders deploy/kubernetes for the schema checks (tests/deploy/test_deploy_tools.py).
    # No Debian package will do: Debian 12's kubernetes-client is 1.20, whose kustomize rejects the
    # kustomization's `envs` and `labels`; so a missing or older kubectl stops here, with no install.
    minor=$(command -v kubectl >/dev/null && kubectl_minor || echo 0)
    if ((minor < 24)); then
      found=$( ((minor > 0)) && echo "1.$minor" || echo none)
      echo "make $mode needs kubectl 1.24 or newer (found: $found; Debian 12's kubernetes-client is 1.20): install kubectl from the Kubernetes project's packages" >&2
      exit 1
    fi
    ;;
  podman)
    # runc, not podman's default crun, which refuses the hybrid cgroup mounts of sandboxes like this
    # project's machines; catatonit is the init behind compose's `init: true`.
    for tool in podman podman-compose debootstrap runc catatonit; do
      command -v $tool >/dev/null || missing+=("$tool")
    done
    ;;
  *) echo "usage: $0 test|demo|podman" >&2; exit 2 ;;
esac
((${#missing[@]} == 0)) && exit 0

install="apt-get install -y ${missing[*]}"
if ! command -v apt-get >/dev/null; then
  echo "make $mode needs ${missing[*]} (Debian package names); install them with your package manager" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "make $mode needs Debian packages it cannot install without a password: run  sudo $install" >&2
  exit 1
fi
echo "== installing Debian packages: ${missing[*]}" >&2
# Through env: sudo resets the environment, and apt must not stop to ask questions.
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
