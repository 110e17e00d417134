#!/usr/bin/env bash
# System packages the test suite uses: Debian's Prometheus server (the dashboard's queries are
# evaluated against a real one). Idempotent and quick when already installed.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "sparsevlm: prometheus not installed (needs root + apt-get); its test will be skipped outside CI" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package starts a system service on :9090 where an init system runs; tests use their own.
(service prometheus stop || systemctl stop prometheus) >/dev/null 2>&1 || true
