#!/bin/bash
# The whole test suite: dependencies, the minimal Linux test guest (cached),
# the workspace build, then every test. Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build-guest.sh
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2
