#!/usr/bin/env bash
# Runs every test: unit and property tests, then the end-to-end tests in network namespaces
# (real nftables/iptables, real spad/spa/knock/nc/nmap). Needs root for the namespaces.
# Ends with one line totalling every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --bins --locked
# The static, size-optimised client the end-to-end tests also use.
cargo build --profile client -p spa-client --target x86_64-unknown-linux-musl --locked
# The same client for aarch64 (phones, routers), run under qemu-user by the tests.
cargo build --profile client -p spa-client --target aarch64-unknown-linux-musl --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The end-to-end tests mostly wait on timers, so they run wider than the core count.
status=0
# The workspace build gives the daemon's responder X25519 by aws-lc (spad's default feature).
# The pure-Rust one (x25519-dalek: the client, and a daemon built --no-default-features) is
# tested on its own, and that daemon must build.
cargo check -p spad --no-default-features --locked
cargo test -p spa-shared --locked --lib -- noise 2>&1 | tee "$log" || status=$?
SPA_E2E_REQUIRED=1 cargo test --workspace --locked --no-fail-fast -- --test-threads=6 "$@" 2>&1 | tee -a "$log" || status=$?
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "tests: $passed passed, $failed failed"
exit "$status"
