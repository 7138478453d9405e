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

venv="${ULTRA_OPENAI_VENV:-${CARGO_TARGET_DIR:-target}/openai-venv}"
requirements=tests/openai/requirements.txt
constraints=tests/openai/constraints.txt
# A venv is rebuilt when the pins change, and reused otherwise (CI stays fast).
stamp="$venv/.pins"
if ! cat "$requirements" "$constraints" | cmp -s - "$stamp" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" -c "$constraints"
  cat "$requirements" "$constraints" >"$stamp"
fi
export ULTRA_BIN="${ULTRA_BIN:-${CARGO_TARGET_DIR:-target}/debug/ultra}"
exec "$venv/bin/python" tests/openai/sdk_suite.py
