#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Idempotent; needs root
# (or passwordless sudo). Called by .ci/test.sh.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
# chromium: headless Chromium fetches a page over HTTP/3 in tests/h3_external.rs.
# faketime: libfaketime steps the gateway's wall clock in tests/decisions.rs.
# testssl.sh: scans the https listeners in tests/tls_external.rs.
# logrotate, systemd-analyze: run the shipped integrations/ files in tests/integrations.rs.
# haproxy: the TCP load balancer sending PROXY protocol headers in tests/proxy_protocol.rs.
# redis-server (with redis-cli): the store of shared rate limits in tests/shared_limits.rs.
# gdb: the test watchdog (tests/common) prints the threads of a test that hangs.
for pkg in curl:curl tmux:tmux chromium:chromium faketime:faketime python3:python3 testssl:testssl.sh \
  logrotate:logrotate systemd-analyze:systemd haproxy:haproxy redis-server:redis-server \
  redis-cli:redis-tools gdb:gdb; do
  bin=${pkg%%:*}; deb=${pkg##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$deb")
done

# Debian's crowdsec (LAPI, agent, cscli and its offline hub) for the decision-bridge tests.
# Its postinst registers with the Central API unless credentials already exist, which fails
# offline: pre-seed the file (README.Debian documents this). Nothing gets started (no
# systemd here); the tests run their own LAPI on a free loopback port.
if [ ! -x /usr/bin/crowdsec ] || [ ! -x /usr/bin/cscli ] || [ ! -d /usr/share/crowdsec/hub ]; then
  $SUDO mkdir -p /etc/crowdsec
  if [ ! -s /etc/crowdsec/online_api_credentials.yaml ]; then
    echo '# no thanks' | $SUDO tee /etc/crowdsec/online_api_credentials.yaml >/dev/null
  fi
  # The postinst registers the local machine, which needs a machine id.
  if [ ! -s /etc/machine-id ]; then
    tr -d '-' </proc/sys/kernel/random/uuid | $SUDO tee /etc/machine-id >/dev/null
  fi
  need+=(crowdsec)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# Python packages the tests use (tests/observability.rs validates /metrics with the reference
# OpenMetrics parser; tests/h3_external.rs runs aioquic's HTTP/3 client). Debian's python3
# refuses pip installs into the system (PEP 668, "externally-managed-environment"), and its
# own packages are too old or missing (python3-prometheus-client 0.16, no aioquic): they go
# into a virtual environment under target/, which .ci/test.sh puts first on PATH.
py_ok='import prometheus_client, aioquic'
venv=target/ci-python
if ! python3 -c "$py_ok" >/dev/null 2>&1 \
  && ! { [ -x "$venv/bin/python3" ] && "$venv/bin/python3" -c "$py_ok" >/dev/null 2>&1; }; then
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "installing: python3-venv"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
  fi
  rm -rf "$venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/python3" -m pip install -q -r .ci/requirements.txt
fi
