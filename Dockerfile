# quantgate service image: `quantgate serve` with CUDA workers.
#
#   docker build -t quantgate .
#   docker run --gpus all -p 8000:8000 \
#     -e QUANTGATE_API_TOKENS="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" \
#     -e HF_TOKEN -e QUANTGATE_ALLOWED_ROOTS=/models \
#     -v quantgate-data:/data -v /srv/models:/models quantgate
#
# The server listens on 0.0.0.0 inside the container, so it refuses to start without API tokens.
# torch is installed first from the CUDA wheel index, pinned, so pip never resolves another build;
# the wheels carry their own CUDA libraries and only need the host driver (`--gpus`).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
# Optional extras, e.g. `--build-arg QUANTGATE_EXTRAS=ray` for a Ray worker/head image (docs/RAY.md).
ARG QUANTGATE_EXTRAS=
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/quantgate
COPY pyproject.toml README.md ./
COPY validators ./validators
COPY exporter ./exporter
COPY service ./service
RUN pip install ".${QUANTGATE_EXTRAS:+[$QUANTGATE_EXTRAS]}" && python -c "import service.app, exporter.pipeline, validators.report"

RUN useradd --create-home --uid 10001 --user-group quantgate \
 && mkdir -p /data \
 && chown quantgate:quantgate /data

USER quantgate
ENV QUANTGATE_DATA_DIR=/data \
    QUANTGATE_HOST=0.0.0.0 \
    QUANTGATE_PORT=8000 \
    HF_HOME=/data/hf-cache
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('QUANTGATE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["quantgate", "serve"]
CMD ["--host", "0.0.0.0"]
