#!/usr/bin/env bash
# The packages the GPU acceptance run needs beside vLLM's offline bundle (.gpu-bundle/): the test
# runner and this project's own dependencies that neither the GPU image nor the bundle carries.
# Run here (PyPI access), from the project root:  scripts/make-gpu-extras.sh [OUT_DIR]  (default .gpu-bundle)
# It writes OUT_DIR/extras.tar (wheels for Python 3.12, x86-64); on the GPU machine:
#   mkdir -p /tmp/extras && tar -C /tmp/extras -xf extras.tar && python3 -m pip install -q --no-deps --no-index --target /tmp/site /tmp/extras/*.whl
set -euo pipefail
out=${1:-.gpu-bundle}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pkgs=(pytest pluggy iniconfig pytest-asyncio "pydantic-settings>=2.4" python-dotenv "xgrammar>=0.2.1,<1"
      "accelerate>=1.0" "jsonschema>=4.23" attrs referencing jsonschema-specifications rpds-py)
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps -d "$work/wheels" --python-version 3.12 --implementation cp \
    --only-binary=:all: "${plat[@]}" "$p" || python3 -m pip download -q --no-deps -d "$work/wheels" "$p"
done
tar -C "$work/wheels" -cf "$out/extras.tar" .
ls -la "$out/extras.tar"
