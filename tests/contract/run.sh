#!/usr/bin/env bash
# The contract suite: clients nobody here wrote, against a running `ultra all`.
#
# Creates (or reuses) a virtualenv with the pinned packages of requirements.txt, then
# runs contract.py with it. ULTRA_BIN names the binary (default: the debug build).
#
#   ULTRA_BIN=target/debug/ultra bash tests/contract/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

source tests/support/venv.sh
venv="${ULTRA_CONTRACT_VENV:-${CARGO_TARGET_DIR:-target}/contract-venv}"
pinned_venv "$venv" tests/contract/requirements.txt tests/contract/constraints.txt
export ULTRA_BIN="${ULTRA_BIN:-${CARGO_TARGET_DIR:-target}/debug/ultra}"
exec "$venv/bin/python" tests/contract/contract.py
