#!/usr/bin/env bash
# Performance figures quoted in the docs: packet handling (criterion) and grant cost
# (netlink versus spawning nft/ipset, in a private network namespace; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p spa-shared --bench packet -- --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "^(open|seal)|time:"
cargo bench -p spa-shared --bench fwknop -- --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "^fwknop|time:"
cargo bench -p spad --bench grant
cargo build -q --release -p spa-e2e --bin latency && target/release/latency nftables && target/release/latency iptables
