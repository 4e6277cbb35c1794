#!/usr/bin/env bash
# Performance figures quoted in the docs: packet handling (criterion), grant cost (netlink
# versus spawning nft/ipset, in a private network namespace) and the load benchmark
# (loadbench: rate ladder and floods in namespaces). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p spa-shared --bench packet -- --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "^(open|seal)|time:"
# The daemon's opens: its per-packet X25519 is aws-lc's (spad's default feature).
echo "with --features aws-lc (the daemon's build):"
cargo bench -p spa-shared --features aws-lc --bench packet -- --warm-up-time 1 --measurement-time 3 open/ 2>&1 | grep -E "^open|time:"
cargo bench -p spa-shared --bench fwknop -- --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "^fwknop|time:"
cargo bench -p spad --bench grant
cargo bench -p spad --bench pipeline -- --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "^(pipeline|reference)|time:"
cargo build -q --release -p spa-e2e --bin latency && target/release/latency nftables && target/release/latency iptables
# Load: 10,000 clients, spoofed sources, an offered-rate ladder and two floods (needs root).
cargo build -q --release -p spad --bin spad -p spa-e2e --bin loadbench
# With fwknopd and fwknop on PATH it then runs the same ladder against fwknopd (UDP-server mode)
# and prints both and the ratios. BENCH_INSTALL_FWKNOP=1 installs Debian's fwknop-server and
# fwknop-client first; nothing else needs them.
if [ "${BENCH_INSTALL_FWKNOP:-0}" = 1 ] && ! command -v fwknopd >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y fwknop-server fwknop-client >/dev/null
fi
target/release/loadbench --rates "${BENCH_RATES:-1000,2000,5000,10000,15000,20000}" --seconds "${BENCH_SECONDS:-2}"
