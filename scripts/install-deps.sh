#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian/Ubuntu machine (as root).
# Idempotent: packages already present are left alone.
set -euo pipefail
packages=(nftables iptables ipset iproute2 tcpdump nmap netcat-openbsd knockd fwknop-client oathtool procps prometheus systemd faketime)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}; run as root (sudo $0)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # knockd and prometheus (only its promtool is used) start services on install; policy-rc.d keeps them from starting here.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
# The static client is built for musl (no C toolchain needed beyond the Rust target).
if command -v rustup >/dev/null && ! rustup target list --installed | grep -q x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl >/dev/null
fi
