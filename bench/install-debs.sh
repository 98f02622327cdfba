#!/usr/bin/env bash
# The Debian packages only `make bench` needs, beyond scripts/install-debs.sh: Cyrus SASL's tools
# and sasldb plugin, so the Postfix the benchmark runs requires AUTH on 465/587 as mailward does.
set -euo pipefail
packages=(sasl2-bin libsasl2-modules libsasl2-modules-db)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "make bench needs these Debian packages: ${missing[*]}; run 'sudo apt-get install ${missing[*]}' or run make bench as root." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
