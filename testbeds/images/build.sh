#!/usr/bin/env bash
# Builds the testbed's container images from Debian's packages (no registry is needed):
#   ms2m/debian:bookworm   base, from debootstrap --variant=minbase, imported with `docker import`
#   ms2m/rabbitmq:3.10     the broker, Debian's rabbitmq-server on the base
#   ms2m/service:dev       the reference service binary on the base
#   ms2m/python:dev        Debian's python3 and the ms2m package, for services on the Python SDK
# Idempotent: an image that exists is kept (set MS2M_REBUILD=1 to rebuild the base and broker).
# The service image is rebuilt every time, from the binary given as $1
# (default: target/release/ms2m-service), and the Python one from the wheel given as $2
# (default: the newest target/wheels/ms2m-*.whl; none: not built).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
service_bin="${1:-target/release/ms2m-service}"
base="${MS2M_BASE_IMAGE:-ms2m/debian:bookworm}"
broker="${MS2M_BROKER_IMAGE:-ms2m/rabbitmq:3.10}"
service="${MS2M_SERVICE_IMAGE:-ms2m/service:dev}"
python_image="${MS2M_PYTHON_IMAGE:-ms2m/python:dev}"
wheel="${2:-$(ls -t target/wheels/ms2m-*.whl 2>/dev/null | head -1)}"
mirror="${MS2M_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export DOCKER_BUILDKIT=0 # the legacy builder ships with every engine; BuildKit may be absent

have() { [ -z "${MS2M_REBUILD:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$base"; then
  echo "building $base with debootstrap (about 2 min)"
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
  # Trim what a container never needs; keep apt working for the images built on top.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$base" >/dev/null
fi

if ! have "$broker"; then
  echo "building $broker"
  docker build -q --build-arg BASE="$base" -t "$broker" "$here/broker" >/dev/null
fi

echo "building $service from $service_bin"
ctx="$(mktemp -d)"
cp "$here/service/Dockerfile" "$ctx/"
cp "$service_bin" "$ctx/ms2m-service"
docker build -q --build-arg BASE="$base" -t "$service" "$ctx" >/dev/null
rm -rf "$ctx"

if [ -n "$wheel" ]; then
  echo "building $python_image from $wheel"
  ctx="$(mktemp -d)"
  cp "$here/python/Dockerfile" "$ctx/"
  cp "$wheel" "$ctx/ms2m.whl"
  docker build -q --build-arg BASE="$base" -t "$python_image" "$ctx" >/dev/null
  rm -rf "$ctx"
else
  echo "no ms2m wheel in target/wheels: $python_image not built (make setup builds one)"
  python_image=""
fi
echo "images ready: $base $broker $service $python_image"
