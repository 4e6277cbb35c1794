#!/usr/bin/env bash
# Runs every test: unit and property tests, then the end-to-end tests in network namespaces
# (real nftables/iptables, real spad/spa/knock/nc/nmap). Needs root for the namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --bins --locked
# The end-to-end tests mostly wait on timers, so they run wider than the core count.
cargo test --workspace --locked -- --test-threads=6 "$@"
