#!/usr/bin/env bash
# Installs the Debian tools the tests use (dbus-daemon, sgdisk, cgpt, zstd, systemd-analyze) when one is missing.
# Needs root for apt-get; otherwise it says what to install and goes on.
set -euo pipefail
missing=()
command -v dbus-daemon >/dev/null || missing+=(dbus)
command -v sgdisk >/dev/null || missing+=(gdisk)
command -v cgpt >/dev/null || missing+=(cgpt)
command -v zstd >/dev/null || missing+=(zstd)
# systemd-analyze and systemd-tmpfiles check the shipped units (tests/test_install_guide.py).
command -v systemd-analyze >/dev/null || missing+=(systemd)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "warning: missing system tools (Debian packages: ${missing[*]}); tests that need them will fail" >&2
fi
