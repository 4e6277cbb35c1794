#!/usr/bin/env bash
# The self-contained demo: a gateway and two clients in throwaway network namespaces. A hidden
# SSH port opens for one client after one SPA packet and closes again on expiry. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -q --workspace --bins --locked
exec target/debug/demo "$@"
