# rvc-operator: the kopf controller. Small: python3 + the operator's dependencies, no torch.
#
# Build with docker/build.sh (wheelhouse mode: no package index needed inside the build),
# or by hand from a context laid out as build.sh does (requirements.txt, wheels/, src/).
# BASE_IMAGE: any Debian bookworm image; build.sh passes one made with debootstrap.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

# Dependencies into a virtual environment (this stage's wheels never reach the final image).
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

# This project, as a wheel (built from the current checkout copied into src/).
FROM deps AS project
COPY src/ /build/src/
RUN if [ "$PIP_MODE" = wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/build/wheels; fi \
 && /opt/venv/bin/pip wheel --no-deps --no-build-isolation -w /build/dist /build/src

FROM python
LABEL org.opencontainers.image.title="rvc-operator" \
      org.opencontainers.image.description="Kubernetes operator for RVC voice-model training"
COPY --from=deps /opt/venv /opt/venv
COPY --from=project /build/dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin rvc)
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /tmp
CMD ["python3", "-m", "rvc_operator"]
