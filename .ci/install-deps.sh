#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Idempotent; needs root
# (or passwordless sudo). Called by .ci/test.sh.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
for pkg in curl:curl; do
  bin=${pkg%%:*}; deb=${pkg##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$deb")
done

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
