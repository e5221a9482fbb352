# rvc-pipeline: every RVC step on NVIDIA GPUs (CUDA 12). NOT built on the development/CI
# machines (no registry there to pull the CUDA base image from); build it where one is
# reachable:
#
#   docker/build.sh --mode online pipeline          # pip resolves from PyPI inside the build
#   docker/build.sh --mode wheelhouse pipeline      # air-gapped: wheels fetched on the host
#                                                   # for this image's Python (3.12)
#
# The CUDA user-space libraries (cuBLAS, cuDNN, NCCL, ...) come with PyPI's CUDA build of
# torch (the nvidia-* wheels), so the base only needs the CUDA "base" flavour (driver
# compatibility files); the NVIDIA container runtime injects the driver at run time.
# Needs nodes with the NVIDIA device plugin; the operator requests nvidia.com/gpu.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates ffmpeg libsndfile1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

FROM python AS deps
ARG PIP_MODE=wheelhouse
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements.txt requirements-nodeps.txt /build/
COPY wheels/ /build/wheels/
RUN python3 -m venv /opt/venv \
 && if [ "$PIP_MODE" = wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/build/wheels; fi \
 && /opt/venv/bin/pip install -r /build/requirements.txt \
 && { [ ! -s /build/requirements-nodeps.txt ] || /opt/venv/bin/pip install --no-deps -r /build/requirements-nodeps.txt; } \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM deps AS project
COPY src/ /build/src/
RUN if [ "$PIP_MODE" = wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/build/wheels; fi \
 && /opt/venv/bin/pip wheel --no-deps --no-build-isolation -w /build/dist /build/src

FROM python
LABEL org.opencontainers.image.title="rvc-pipeline" \
      org.opencontainers.image.description="RVC training steps, CUDA build"
COPY --from=deps /opt/venv /opt/venv
COPY --from=project /build/dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin rvc) \
 && mkdir -p /work && chown 1000:1000 /work
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["rvc-pipeline"]
