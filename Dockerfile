# syntax=docker/dockerfile:1.7
#
# Two images from one build context:
#
#   docker build --target trainer  -t ghcr.io/finetune-dev/finetune-trainer:0.1.0 .
#   docker build --target operator -t ghcr.io/finetune-dev/finetune-operator:0.1.0 .
#
# Each installs this repository's package with one extra, the way hack/setup.sh
# installs the dev environment (`pip install ".[dev]"`): the trainer `.[train]`,
# the operator `.[operator]`. The `dev` extra contains both, so the tests run
# what the images run (tests/chart/test_dockerfile.py checks it).
#
# Base images are pinned by version. For reproducible production builds, pin
# them by digest as well (`python:3.11.13-slim-bookworm@sha256:...`).
#
# Dependencies are installed in layers of their own, before the project's code
# is copied, so a code change rebuilds only the last layers.
#
# Without Docker or a registry, hack/localcluster/images.py builds both targets
# with buildah on a Debian base of its own (PYTHON_IMAGE) and the CPU torch wheel
# (TORCH_WHEEL) for the local cluster's node.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------
# base: Python, a non-root user, caches under /tmp (the root filesystem may be
# read-only; /tmp is an emptyDir in the pods).
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    MPLCONFIGDIR=/tmp/.cache/matplotlib
# uid/gid 65532 is the conventional "nonroot" id (distroless); pods set
# runAsNonRoot, which needs a numeric USER.
RUN groupadd --gid 65532 finetune \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune
WORKDIR /src

# ---------------------------------------------------------------------------
# trainer: CUDA PyTorch + the project.
# torch is installed first and pinned to the same version hack/setup.sh pins
# for the CPU dev environment, so the image runs what the tests ran. PyPI's
# manylinux torch wheel is the CUDA build (it pulls the CUDA runtime as nvidia-*
# wheels), so no CUDA base image is needed: the node only needs the NVIDIA
# driver and device plugin. torch 2.13.0 from PyPI is built for CUDA 13: nodes
# need NVIDIA driver >= 580 (docs/deploy.md). For older drivers pick another
# CUDA build of the same version, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   # CUDA 12.8, drivers >= 525
# Builds for machines without a GPU put a wheel of the same version (the CPU
# build) into docker/wheels/ (git-ignored) and pass --build-arg TORCH_WHEEL=<its
# file name>; docker/wheels/ is only mounted for that step, so the wheel file
# itself stays out of the image.
# ---------------------------------------------------------------------------
FROM base AS trainer
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG TORCH_WHEEL=""
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    if [ -n "$TORCH_WHEEL" ]; then pip install "/tmp/wheels/$TORCH_WHEEL"; \
    else pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"; fi \
 && python -c "import sys, torch; torch.__version__.split('+')[0] == sys.argv[1] \
                or sys.exit(f'torch {torch.__version__} installed, TORCH_VERSION is {sys.argv[1]}')" "$TORCH_VERSION"
# The project's dependencies, read from pyproject.toml (the pinned torch above
# already satisfies the train extra's range, so pip keeps it).
COPY pyproject.toml docker/project-requirements.py ./
RUN python project-requirements.py train > requirements.txt && pip install -r requirements.txt
COPY README.md ./
COPY trainer ./trainer
COPY operator ./operator
COPY console ./console
COPY hack/localcluster ./hack/localcluster
RUN pip install ".[train]" \
 && python -c "import torch, trainer.config; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
COPY docker/trainer-entrypoint.sh /usr/local/bin/trainer-entrypoint
WORKDIR /tmp
USER 65532:65532
# Trainer Prometheus endpoint (containerPort named "metrics" in trainer pods).
EXPOSE 9400
# In the cluster the operator sets the pod's command itself (`python -m trainer
# ...`, or `accelerate launch --num_processes N -m trainer ...` above one GPU;
# operator/ftoperator/builders.py), so python and accelerate must be on PATH (they are).
# The entry point serves `docker run IMAGE --stage sft --config FILE` with
# NUM_PROCESSES=<gpus> and mirrors that choice (see the script).
ENTRYPOINT ["/usr/local/bin/trainer-entrypoint"]
CMD ["--help"]

# ---------------------------------------------------------------------------
# operator: no torch. The operator imports only trainer.config (pydantic,
# yaml) from the trainer package; the training stack is in the `train` extra,
# which this image does not install. tests/chart/test_dockerfile.py proves the
# operator imports with those modules blocked.
# ---------------------------------------------------------------------------
FROM base AS operator
COPY pyproject.toml docker/project-requirements.py ./
RUN python project-requirements.py operator > requirements.txt && pip install -r requirements.txt
COPY README.md ./
COPY trainer ./trainer
COPY operator ./operator
COPY console ./console
COPY hack/localcluster ./hack/localcluster
RUN pip install ".[operator]" \
 && python -c "import ftoperator.__main__, ftconsole.__main__, trainer.config" \
 && ! python -c "import torch" 2>/dev/null
WORKDIR /tmp
USER 65532:65532
# metrics 8080, kopf liveness 8081 (/healthz), admission webhook 9443; the console
# (`python -m ftconsole serve`, same image, its own Deployment) listens on 8090.
EXPOSE 8080 8081 9443 8090
ENTRYPOINT ["python", "-m", "ftoperator"]
