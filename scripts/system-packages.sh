#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real: headless Chromium and its driver
# (console browser tests), PgBouncer (transaction-mode pooler test), Prometheus and promtool
# (metrics, dashboard and alert-rule tests). As root it installs what is missing; otherwise it
# stops at once with the one command to run.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
{ command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; } || missing+=(pgbouncer)
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "make test needs Debian packages: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
echo "installing Debian packages: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the packaged services; the tests run their own instances.
for service in pgbouncer prometheus; do
    (systemctl stop "$service" || service "$service" stop) >/dev/null 2>&1 || true
done
