#!/usr/bin/env bash
# The web console in a real browser: Playwright (pinned, in a virtualenv) driving
# Debian's chromium, against an `ultra all` of its own. Installs the chromium package
# if it is missing (never a browser Playwright would download).
#
#   ULTRA_BIN=target/debug/ultra bash tests/console/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v chromium >/dev/null; then
  echo "[console] installing Debian's chromium" >&2
  sudo_or_not=""
  [ "$(id -u)" -eq 0 ] || sudo_or_not="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo_or_not apt-get install -y -q chromium >/dev/null
fi

source tests/support/venv.sh
venv="${ULTRA_CONSOLE_VENV:-${CARGO_TARGET_DIR:-target}/console-venv}"
pinned_venv "$venv" tests/console/requirements.txt tests/console/constraints.txt
export ULTRA_BIN="${ULTRA_BIN:-${CARGO_TARGET_DIR:-target}/debug/ultra}"
export ULTRA_CHROMIUM="${ULTRA_CHROMIUM:-$(command -v chromium)}"
exec "$venv/bin/python" tests/console/console_suite.py
