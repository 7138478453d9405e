#!/usr/bin/env bash
# The OpenAI-compatible surface through the official `openai` Python SDK, against an
# `ultra all` of its own (free ports, its own database, queues and Redis prefix).
#
# Creates (or reuses) a virtualenv with the pinned packages of requirements.txt, then
# runs sdk_suite.py with it. ULTRA_BIN names the binary (default: the debug build).
#
#   ULTRA_BIN=target/debug/ultra bash tests/openai/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

source tests/support/venv.sh
venv="${ULTRA_OPENAI_VENV:-${CARGO_TARGET_DIR:-target}/openai-venv}"
pinned_venv "$venv" tests/openai/requirements.txt tests/openai/constraints.txt
export ULTRA_BIN="${ULTRA_BIN:-${CARGO_TARGET_DIR:-target}/debug/ultra}"
exec "$venv/bin/python" tests/openai/sdk_suite.py
