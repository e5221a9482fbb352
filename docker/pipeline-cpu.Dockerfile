# rvc-pipeline-cpu: every RVC step on CPU (the fallback the tests use). torch CPU build,
# ffmpeg, libsndfile; no CUDA, no compilers, no pip caches, no torch C++ headers/tests.
#
# Build with docker/build.sh (wheelhouse mode: no package index needed inside the build).
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates ffmpeg libsndfile1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

FROM python AS deps
ARG PIP_MODE=wheelhouse
# Online mode only: where the CPU build of torch comes from.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements.txt requirements-nodeps.txt /build/
COPY wheels/ /build/wheels/
RUN python3 -m venv /opt/venv \
 && if [ "$PIP_MODE" = wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/build/wheels; \
    else export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && /opt/venv/bin/pip install -r /build/requirements.txt \
 && { [ ! -s /build/requirements-nodeps.txt ] || /opt/venv/bin/pip install --no-deps -r /build/requirements-nodeps.txt; } \
 && sp=/opt/venv/lib/python3.11/site-packages \
 && rm -rf "$sp/torch/test" "$sp/torch/include" \
 && find "$sp/torch/bin" -type f ! -name torch_shm_manager -delete \
 && find "$sp/numpy" "$sp/scipy" "$sp/sklearn" -type d -name tests -prune -exec rm -rf {} +
# (byte-code caches are kept: step pods start faster when torch's modules need no compiling)

FROM deps AS project
COPY src/ /build/src/
RUN if [ "$PIP_MODE" = wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/build/wheels; fi \
 && /opt/venv/bin/pip wheel --no-deps --no-build-isolation -w /build/dist /build/src

FROM python
LABEL org.opencontainers.image.title="rvc-pipeline-cpu" \
      org.opencontainers.image.description="RVC training steps, CPU build"
COPY --from=deps /opt/venv /opt/venv
COPY --from=project /build/dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin rvc) \
 && mkdir -p /work && chown 1000:1000 /work
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["rvc-pipeline"]
