#!/usr/bin/env bash
# Makes this machine ready to run ms2m testbeds, installing what is missing (idempotent):
#   1. a running Docker engine (Debian's docker.io; dockerd started in the background), and
#      Debian's rabbitmq-server for the local runtime,
#   2. the Python package with its native module (maturin, `pip install .`),
#   3. the testbed images, built from Debian's packages (testbeds/images/build.sh).
# Needs root for apt-get and dockerd (as on the project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\n== %s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup: '$*' is missing and installing it needs root (apt-get install $*)" >&2
    exit 1
  fi
  [ -n "${MS2M_APT_UPDATED:-}" ] || { apt-get update -qq; MS2M_APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

log "Docker engine"
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || apt_install docker.io
  command -v docker >/dev/null || apt_install docker.io
  # Started detached so it outlives this script; its log says why if it does not come up.
  setsid nohup dockerd >/var/log/ms2m-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || {
    echo "setup: dockerd did not start within 60 s; see /var/log/ms2m-dockerd.log" >&2
    exit 1
  }
fi
docker version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}})' >&2
command -v debootstrap >/dev/null || apt_install debootstrap

log "RabbitMQ for the local runtime"
# The local runtime (no Docker) runs Debian's rabbitmq-server as a process; the tests use it.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  # Installed, not started: the testbeds start their own on free ports.
  policy=/usr/sbin/policy-rc.d
  [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT; }
  apt_install rabbitmq-server
fi

log "service binary (cargo build --release -p ms2m-service)"
cargo build --release --locked -q -p ms2m-service

log "Python package (pip install .)"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "maturin>=1.7,<2"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore ".[test]"
# The same build as a wheel file, for the image of Python services (cached: seconds).
rm -f target/wheels/ms2m-*.whl
maturin build --release -q -o target/wheels >/dev/null

log "testbed images"
bash testbeds/images/build.sh target/release/ms2m-service
python3 -c 'import ms2m; print("ms2m", ms2m.__version__, "ready; strategies:", ", ".join(ms2m.STRATEGIES))' >&2
