#!/bin/sh
# Installs what the test suite drives for real, from Debian's packages: the
# content scanners (rspamd and SpamAssassin's spamd), redis-server (the
# shared counter backend; redis-cli makes the test Redis Cluster), a
# headless browser for the support console (chromium and its chromedriver)
# and the SMTP client swaks (client compatibility tests).
# Idempotent: does nothing when all of them are already there.
#
# The tests start each daemon themselves, on loopback, with a private
# configuration in a temporary folder; nothing here configures or starts
# them. Package maintainer scripts would otherwise start system-wide
# instances, so service starts are denied for the length of the install
# (unless the image already denies them, as Docker images do).
set -eu

# spamd lives in /usr/sbin, which a non-root PATH may lack.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=""
have rspamd || missing="$missing rspamd"
have spamd || missing="$missing spamd spamassassin"
{ have redis-server && have redis-cli; } || missing="$missing redis-server redis-tools"
have chromium || missing="$missing chromium"
have chromedriver || missing="$missing chromium-driver"
have swaks || missing="$missing swaks"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "services.sh: installing$missing needs root" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
fi
cleanup() { if [ -n "$made_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # the list is meant to split into package names
apt-get install -y -qq --no-install-recommends $missing >/dev/null
have rspamd && have spamd && have redis-server && have redis-cli && have chromium \
    && have chromedriver && have swaks
