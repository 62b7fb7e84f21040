# loraswap: one uvicorn worker serving NLI LoRA adapters and the fraud scorer.
# torch from PyPI on linux/x86_64 is a CUDA build: it uses the host's GPU through the NVIDIA
# container toolkit and falls back to the CPU when none is visible.
#
# Build arguments (all optional; `docker build .` gives the official base and PyPI):
#   BASE_IMAGE          any Debian-based image with python3 (>= 3.11) and its venv module
#   PIP_INDEX_URL       pip's index instead of PyPI
#   PIP_EXTRA_INDEX_URL another index pip may use as well
#   PIP_FIND_LINKS      a URL (or path) of extra wheels, e.g. a CPU-only torch wheel
# `make docker-e2e` (scripts/docker_e2e.sh) uses them to build where Docker Hub cannot be reached.
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
# Optional extras of the project, e.g. `--build-arg EXTRAS=ray` for the image the KubeRay RayService runs.
ARG EXTRAS=""

LABEL org.opencontainers.image.title="loraswap"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    PATH=/opt/venv/bin:$PATH

WORKDIR /srv/loraswap

# Dependencies first, in their own cached layers: source changes do not reinstall them. A virtual
# environment works the same on the official image and on a distribution's Python.
RUN python3 -m venv /opt/venv \
    && pip install torch==2.13.0
# Only what resolves the dependencies: an edit to the README or the source does not reinstall them.
COPY pyproject.toml constraints.txt ./
RUN mkdir -p app training \
    && touch README.md app/__init__.py training/__init__.py \
    && pip install -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
    && pip uninstall -y loraswap \
    && rm -rf README.md app training build ./*.egg-info

COPY app ./app
COPY training ./training
COPY adapters ./adapters
COPY models ./models

# Every baked-in file readable (and no directory writable) by the server's user, whatever modes
# the files had in the build context (training writes some 0600).
RUN chmod -R a+rX,go-w /srv/loraswap \
    && useradd --system --uid 10001 --no-create-home --home-dir /srv/loraswap loraswap \
    && mkdir -p /cache/huggingface \
    && chown -R loraswap /cache

USER 10001

ENV LORASWAP_HOST=0.0.0.0 \
    LORASWAP_PORT=8000 \
    LORASWAP_ADAPTERS_DIR=/srv/loraswap/adapters \
    LORASWAP_FRAUD_MODEL_DIR=/srv/loraswap/models/fraud

EXPOSE 8000
VOLUME ["/srv/loraswap/adapters", "/srv/loraswap/models", "/cache/huggingface"]

HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]

# One worker on purpose: batching happens inside it; more workers would load the model again each.
CMD ["python", "-m", "app.cli"]
