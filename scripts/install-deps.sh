#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian/Ubuntu machine (as root).
# Idempotent: packages already present are left alone.
set -euo pipefail
# qemu-user-static runs the aarch64 client; dnsmasq-base is the lab's DNS server (no service);
# prometheus brings promtool; faketime makes stale fwknop packets; linux-libc-dev has the system-call
# numbers (asm/unistd_64.h) the test of the unit's SystemCallFilter= maps names to.
packages=(nftables iptables ipset iproute2 tcpdump nmap netcat-openbsd knockd fwknop-client oathtool procps
  prometheus systemd faketime qemu-user-static dnsmasq-base linux-libc-dev)
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
# The static client is built for musl (no C toolchain needed beyond the Rust target); the
# aarch64 one links with rust-lld (.cargo/config.toml).
if command -v rustup >/dev/null; then
  for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    rustup target list --installed | grep -qx "$target" || rustup target add "$target" >/dev/null
  done
fi
