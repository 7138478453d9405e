#!/usr/bin/env bash
# Webhooks verified by the spec's reference library (`standardwebhooks`, pinned in a
# virtualenv), against an `ultra all` of its own (free ports, its own database, queues
# and Redis prefix). The receivers are the README's example, run as written, and one
# of the suite's own that answers as each check needs.
#
#   ULTRA_BIN=target/debug/ultra bash tests/webhooks/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

source tests/support/venv.sh
venv="${ULTRA_WEBHOOKS_VENV:-${CARGO_TARGET_DIR:-target}/webhooks-venv}"
pinned_venv "$venv" tests/webhooks/requirements.txt tests/webhooks/constraints.txt
export ULTRA_BIN="${ULTRA_BIN:-${CARGO_TARGET_DIR:-target}/debug/ultra}"
exec "$venv/bin/python" tests/webhooks/suite.py
