#!/bin/sh
# Build the CPU image in the sandbox (no registry, no download.pytorch.org). Run from the repo root.
# podman 4.3.1 here needs: --runtime runc (crun 1.8.1 refuses the hybrid cgroup v1/v2 host) and
# --format docker keeps HEALTHCHECK (the OCI format drops it); --ulimit values at or below the host's hard limits (the podman defaults exceed them).
set -eu
PODMAN="podman --runtime runc"
exec $PODMAN build --format docker \
  --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
  -v /opt/pypi:/opt/pypi:ro -v /opt/pypi-more:/opt/pypi-more:ro -v /opt/wheels:/opt/wheels:ro \
  -v /etc/ssl/certs:/opt/host-certs:ro \
  --build-arg PYTHON_IMAGE=localhost/deltamem-base:bookworm \
  --build-arg TORCH_INDEX_URL=file:///opt/pypi/simple \
  --build-arg PIP_FIND_LINKS=/opt/wheels \
  --build-arg "PIP_EXTRA_INDEX_URL=file:///opt/pypi/simple file:///opt/pypi-more/simple" \
  --build-arg PIP_CERT=/opt/host-certs/ca-certificates.crt \
  -f bench/image/Dockerfile.local -t localhost/delta-mem-vllm:cpu .
