# gradsvc: the REST gradient service in a container.
#
#   docker build -t gradsvc .
#   docker run --rm -p 8000:8000 -e GRADSVC_API_KEYS=change-me -v gradsvc-data:/data gradsvc
#
# CPU torch by default (a few hundred MB instead of several GB of CUDA libraries). Two ways to a GPU
# image, both chosen at build time; run either with `docker run --gpus all ...` on a host with
# the NVIDIA driver and the NVIDIA Container Toolkit:
#
#   1. Keep the slim base and take torch from a CUDA index. The CUDA wheels carry their own CUDA
#      runtime (the nvidia-* packages, which come from PyPI), so no CUDA base image is needed:
#        docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t gradsvc:cuda .
#      Pick a cuXYZ index that publishes the pinned torch (constraints.txt): the set changes
#      between releases (cu124, for one, stopped after torch 2.6), and the host driver must be
#      new enough for it. TORCH_INDEX=https://pypi.org/simple gives PyPI's default CUDA build.
#
#   2. A CUDA base image as well. Both stages use BASE_IMAGE (the venv links to the base's
#      interpreter), so it must already provide Python 3.11 as `python`, with `venv`, and
#      useradd/groupadd. nvidia/cuda:12.4.1-runtime-ubuntu22.04 has none of the Python part:
#      build a thin image FROM it that installs python3.11 and python3.11-venv first, then
#        docker build --build-arg BASE_IMAGE=my/cuda-python:3.11 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t gradsvc:cuda .
#      Torch still brings its own CUDA libraries, so this only pays off where the base image is
#      needed for something else (a site policy, other CUDA tools).
#
# Security: the service listens on 0.0.0.0 inside the container, and so it refuses to start
# without API keys: give GRADSVC_API_KEYS (comma-separated keys) or GRADSVC_API_KEYS_FILE (a
# mounted file of SHA-256 digests, e.g. a secret), or GRADSVC_INSECURE=1 on a trusted network:
#   docker run --rm -p 8000:8000 -e GRADSVC_API_KEYS=change-me -v gradsvc-data:/data gradsvc

# checkov:skip=CKV_DOCKER_7: FROM names ${BASE_IMAGE}, which checkov cannot resolve; its default
# is pinned by tag just below (python:3.11-slim-bookworm), and a build argument pins any other.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and the package, copied whole into the runtime ----
FROM ${BASE_IMAGE} AS build

# Torch's own wheel index; /whl/cpu names the pinned version 2.13.0+cpu, which satisfies
# constraints.txt's torch==2.13.0 (a local version label matches a pin without one).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv

COPY constraints.txt ./
# Torch alone from TORCH_INDEX, with --no-deps: only the torch wheel comes from that index, and
# every other package (torch's own dependencies included, in the next step) from PyPI under the
# same pins. An --extra-index-url for everything would let the second index answer for any name
# (the dependency-confusion hazard). Its own layer, so a code change does not download it again.
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX}" -c constraints.txt torch

COPY pyproject.toml README.md ./
COPY service ./service
COPY client ./client
# Torch is already installed and satisfies the pins, so pip keeps it and resolves its
# dependencies (the client from ./client); `pip check` fails if anything is missing.
RUN pip install --no-cache-dir -c constraints.txt ./client . \
    && pip check

# ---- runtime: the venv, a non-root user, nothing else ----
FROM ${BASE_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRADSVC_STORE=sqlite:////data/gradsvc.db

# A fixed numeric uid, so volume ownership and `runAsNonRoot` checks are predictable. /data is
# created and chowned before VOLUME, so a new named volume starts out owned by that user.
RUN groupadd --system --gid 10001 gradsvc \
    && useradd --system --uid 10001 --gid gradsvc --create-home --home-dir /home/gradsvc \
        --shell /usr/sbin/nologin gradsvc \
    && mkdir -p /data \
    && chown gradsvc:gradsvc /data

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/gradsvc
VOLUME ["/data"]
EXPOSE 8000

# Liveness only (/healthz); the image has no curl, and python is already here. urlopen raises on
# a refused connection and on any non-2xx answer, so the exit status is the verdict.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# On SIGTERM gradsvc stops taking requests, finishes those in flight (up to 30 s) and exits 0:
# give `docker stop` more than its default 10 s (`docker stop -t 40`, compose's
# stop_grace_period). Exec form, no shell in between, so the signal reaches gradsvc itself.
STOPSIGNAL SIGTERM
CMD ["gradsvc", "serve", "--host", "0.0.0.0", "--port", "8000"]
