#!/bin/sh
# Installs what the decision-bridge tests need: Debian's crowdsec (LAPI, agent, cscli and
# its offline hub). Idempotent; run as root. Called from .ci/run.
#
# crowdsec's postinst registers with the Central API unless credentials already exist,
# which fails offline: pre-seed the file (README.Debian documents this). Nothing is started
# (no systemd here); the tests run their own LAPI on a free loopback port.
set -eu

if [ -x /usr/bin/crowdsec ] && [ -x /usr/bin/cscli ] && [ -d /usr/share/crowdsec/hub ]; then
    echo "install-deps: crowdsec already installed ($(/usr/bin/crowdsec -version 2>&1 | sed -n 's/.*version: //p' | head -n1))"
    exit 0
fi

mkdir -p /etc/crowdsec
if [ ! -s /etc/crowdsec/online_api_credentials.yaml ]; then
    echo '# no thanks' > /etc/crowdsec/online_api_credentials.yaml
fi
# The postinst needs a machine id to register the local machine.
if [ ! -s /etc/machine-id ]; then
    if command -v systemd-machine-id-setup >/dev/null 2>&1; then
        systemd-machine-id-setup >/dev/null 2>&1 || true
    fi
    [ -s /etc/machine-id ] || cat /proc/sys/kernel/random/uuid | tr -d '-' > /etc/machine-id
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq crowdsec >/dev/null
/usr/bin/crowdsec -version 2>&1 | head -n1
