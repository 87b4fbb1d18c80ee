#!/usr/bin/env bash
# Install everything into ./.venv (CPU-only torch, vLLM for CPUs) and run the whole test suite.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  # The Redis state backend is tested against a real server (Debian package).
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null
  fi
fi

scripts/install.sh test
. .venv/bin/activate
python -m pytest "$@"
