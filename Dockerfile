# quantgate service image: `quantgate serve` with CUDA workers.
#
#   docker build -t quantgate .
#   docker run --gpus all -p 8000:8000 \
#     -e QUANTGATE_API_TOKENS="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" \
#     -e HF_TOKEN -e QUANTGATE_ALLOWED_ROOTS=/models \
#     -v quantgate-data:/data -v /srv/models:/models quantgate
#
# The server listens on 0.0.0.0 inside the container, so it refuses to start without API tokens.
# torch is installed first, pinned, with TORCH_INDEX_URL as an extra index so its build (+cu128 by
# default, +cpu with https://download.pytorch.org/whl/cpu) wins over PyPI's; the CUDA wheels carry
# their own CUDA libraries and only need the host driver (`--gpus`).
#
# Build arguments:
#   CUDA_IMAGE       base image: any Debian/Ubuntu image with apt (python3 >= 3.10)
#   TORCH_INDEX_URL  where torch comes from (https://download.pytorch.org/whl/cpu for a CPU image)
#   QUANTGATE_EXTRAS extras to install (default serve; `serve,ray` for a Ray head/worker image)
#   EXTRA_CA_CERTS   PEM text of extra CA certificates (a TLS-intercepting proxy), trusted by apt,
#                    pip, the Hub client and the service: --build-arg EXTRA_CA_CERTS="$(cat ca.pem)"
# tests/container/container_test.sh builds and runs this image on a local Debian base (no registry needed).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG QUANTGATE_EXTRAS=serve
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG EXTRA_CA_CERTS=
# The import check of the installed package: the one place that names its modules.
ARG QUANTGATE_IMPORT_CHECK="import quantgate.service.app, quantgate.service.worker, quantgate.exporter.pipeline, quantgate.validators.report"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/quantgate-extra-ca.crt \
      && update-ca-certificates; \
    fi \
 && python3 -m venv "$VIRTUAL_ENV"

RUN pip install "torch==${TORCH_VERSION}" --extra-index-url "${TORCH_INDEX_URL}"

# The source is copied to a scratch directory, installed (not editable) and removed, so the check
# below imports the installed package, as the service will, from outside any source tree.
COPY pyproject.toml README.md /tmp/quantgate-src/
COPY validators /tmp/quantgate-src/validators
COPY exporter /tmp/quantgate-src/exporter
COPY service /tmp/quantgate-src/service
RUN pip install "/tmp/quantgate-src${QUANTGATE_EXTRAS:+[$QUANTGATE_EXTRAS]}" "torch==${TORCH_VERSION}" \
 && rm -rf /tmp/quantgate-src \
 && cd / && python -c "$QUANTGATE_IMPORT_CHECK" \
 && quantgate --version

RUN useradd --create-home --uid 10001 --user-group quantgate \
 && mkdir -p /data \
 && chown quantgate:quantgate /data

USER quantgate
WORKDIR /data
ENV QUANTGATE_DATA_DIR=/data \
    QUANTGATE_HOST=0.0.0.0 \
    QUANTGATE_PORT=8000 \
    HF_HOME=/data/hf-cache
VOLUME ["/data"]
EXPOSE 8000

# Probes the port the server was started with (`--port` on `docker run` included), not only QUANTGATE_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["quantgate-healthcheck"]

ENTRYPOINT ["quantgate", "serve"]
CMD ["--host", "0.0.0.0"]
