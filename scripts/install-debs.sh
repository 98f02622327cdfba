#!/usr/bin/env bash
# Installs the Debian packages the test suite drives as real peers, only those missing.
# Postfix is preseeded to "No configuration": tests run their own instances with `postfix -c DIR`.
# nsd, unbound and ldnsutils (ldns-keygen, ldns-signzone) make the DNSSEC test zones; the tests run
# their own instances on loopback ports, whatever the system's services do.
set -euo pipefail
packages=(swaks libnet-ssleay-perl postfix testssl.sh openssl nsd unbound ldnsutils)
# dovecot-core and dovecot-lmtpd: the LMTP server local delivery is tested against, run by the
# tests from their own config in a temporary directory.
packages+=(dovecot-core dovecot-lmtpd)
# postgresql: the shared queue's tests start their own server (initdb in a temporary directory).
packages+=(postgresql)
# Extra packages a target needs beyond the tests' (make bench: Cyrus SASL for Postfix's AUTH).
packages+=("$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "mailward needs these Debian packages: ${missing[*]}; run 'sudo apt-get install ${missing[*]}' or run make as root." >&2
  exit 1
fi
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
