# fake-openai-server: one image for both services.
#
#   SERVICE_TYPE=embeddings  -> OpenAI /v1/embeddings          (port 8081)
#   SERVICE_TYPE=reranker    -> Cohere/Jina /v1/rerank         (port 8082)
#   SERVICE_TYPE=all         -> both routes in one process     (port 8080)
#
# Build:   docker build -t fake-openai-server .
# Options: --build-arg BASE_IMAGE=...        base image (Debian bookworm family)
#          --build-arg PRELOAD_MODELS=all    bake models into the image (embeddings|reranker|all)
#          --build-arg MODEL_REVISIONS=...   the versions to bake and load (model=commit,...)
#          --build-arg APP_UID=$(id -u)      uid of the runtime user (owner of the /data volume)
#          --secret id=ca,src=corp-ca.pem    corporate CA for TLS-intercepting proxies; used
#                                            only while downloading, never stored in a layer
#
# Dependencies come from uv.lock only (uv sync --frozen). torch is the PyPI build,
# which bundles the CUDA libraries: the same image runs on CPU hosts and, with the
# NVIDIA container runtime (--gpus all), on GPU hosts. No CUDA base image needed.

ARG BASE_IMAGE=debian:bookworm-slim

# --------------------------------------------------------------------------- base
# The Python interpreter both stages share. The venv built below links to it, so
# the builder and the runtime image must have it at the same path.
FROM ${BASE_IMAGE} AS python-base
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    pkgs=""; \
    command -v python3.11 >/dev/null 2>&1 || pkgs="$pkgs python3"; \
    [ -e /etc/ssl/certs/ca-certificates.crt ] || pkgs="$pkgs ca-certificates"; \
    if [ -n "$pkgs" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends $pkgs; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3.11 --version

# ------------------------------------------------------------------------ builder
FROM python-base AS builder
ARG UV_VERSION=0.13.9
# pip only to fetch uv; it stays in this stage.
RUN set -eux; \
    if ! python3.11 -m pip --version >/dev/null 2>&1; then \
        export DEBIAN_FRONTEND=noninteractive; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3-pip; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/*; \
    fi
# Every step that downloads runs with the optional `ca` secret added to the system
# trust store for that step only (the bundle lives in /tmp and is removed in the
# same step, so no layer contains it).
RUN --mount=type=secret,id=ca,required=false,mode=0444 \
    set -eu; \
    if [ -s /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca-bundle.pem; \
        export PIP_CERT=/tmp/ca-bundle.pem SSL_CERT_FILE=/tmp/ca-bundle.pem; \
    fi; \
    python3.11 -m pip install --no-cache-dir --disable-pip-version-check \
        --root-user-action=ignore --target /opt/uv "uv==${UV_VERSION}"; \
    rm -f /tmp/ca-bundle.pem; \
    /opt/uv/bin/uv --version

ENV PATH=/opt/uv/bin:$PATH \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON_PREFERENCE=only-system \
    UV_PYTHON=python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_CACHE_DIR=/root/.cache/uv
WORKDIR /build

# Dependencies first (this layer is reused as long as uv.lock does not change) ...
COPY pyproject.toml uv.lock .python-version ./
RUN --mount=type=cache,target=/root/.cache/uv,sharing=locked \
    --mount=type=secret,id=ca,required=false,mode=0444 \
    set -eu; \
    if [ -s /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca-bundle.pem; \
        export SSL_CERT_FILE=/tmp/ca-bundle.pem UV_SYSTEM_CERTS=1; \
    fi; \
    uv sync --frozen --no-dev --no-install-project --no-editable; \
    rm -f /tmp/ca-bundle.pem

# ... then the project itself, installed as a regular (non-editable) package.
# Its installed files (per the wheel's RECORD) are gathered under /overlay so
# the runtime image adds them as a small layer on top of the dependencies: a
# change in src/ does not rewrite the multi-GB dependency layer.
FROM builder AS project
COPY README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/uv,sharing=locked \
    --mount=type=secret,id=ca,required=false,mode=0444 \
    set -eu; \
    if [ -s /run/secrets/ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca-bundle.pem; \
        export SSL_CERT_FILE=/tmp/ca-bundle.pem UV_SYSTEM_CERTS=1; \
    fi; \
    uv sync --frozen --no-dev --no-editable; \
    rm -f /tmp/ca-bundle.pem; \
    cd /opt/venv/lib/python3.11/site-packages; \
    mkdir -p /overlay; \
    cut -d, -f1 fake_openai_server-*.dist-info/RECORD \
        | awk -F/ '$1 == ".." { print; next } { print $1 }' | sort -u \
        | while read -r p; do \
            r="$(realpath -s -m --relative-to=/ "$p")"; (cd / && cp -a --parents "$r" /overlay/); \
          done; \
    find /overlay -type f | sort; \
    /opt/venv/bin/python -c "import fake_openai_server"; \
    test -x /overlay/opt/venv/bin/fake-openai-server

# ------------------------------------------------------------------------ runtime
FROM python-base AS runtime
ARG APP_UID=1000
ARG APP_GID=1000
# --non-unique: the host's ids may already be taken in the image (uid 0 when building
# as root, gid 20 on macOS or 100 for `users`), and groupadd/useradd refused them.
RUN set -eux; \
    groupadd --non-unique --gid "${APP_GID}" app; \
    useradd --non-unique --uid "${APP_UID}" --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app; \
    mkdir -p /data/hf; \
    chown -R app:app /data

# The venv only: no uv, pip or compilers in the runtime image. Owned by root,
# read-only for the service user. Dependencies first, then the project's files.
COPY --from=builder /opt/venv /opt/venv
COPY --from=project /overlay/ /

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf \
    SERVICE_TYPE=embeddings \
    HOST=0.0.0.0

USER app
WORKDIR /home/app

# Optional: bake model weights into the image (for hosts without internet at run
# time). Empty (default) = no preload; otherwise embeddings | reranker | all.
# The weights go to $HF_HOME=/data/hf inside the image: Docker copies them into a
# *named* volume on first use, but a bind mount (./volumes:/data) hides them, so
# use a named volume or no volume with a preloaded image.
ARG PRELOAD_MODELS=
# The versions to bake, and then to load, as the setting MODEL_REVISIONS (model=commit
# pairs; empty = the latest, main): a runtime MODEL_REVISIONS replaces it.
ARG MODEL_REVISIONS=
ENV MODEL_REVISIONS=${MODEL_REVISIONS}
RUN --mount=type=secret,id=ca,required=false,mode=0444 \
    set -eu; \
    if [ -n "${PRELOAD_MODELS}" ]; then \
        if [ -s /run/secrets/ca ]; then \
            cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca > /tmp/ca-bundle.pem; \
            export SSL_CERT_FILE=/tmp/ca-bundle.pem REQUESTS_CA_BUNDLE=/tmp/ca-bundle.pem; \
        fi; \
        SERVICE_TYPE="${PRELOAD_MODELS}" python -m fake_openai_server.preload; \
        rm -f /tmp/ca-bundle.pem; \
    fi

# Model cache (HF_HOME=/data/hf). Compose maps ./volumes here.
VOLUME ["/data"]

EXPOSE 8081 8082 8080

# Healthy = model loaded and warmed (/ready answers 200). The port is $PORT if
# set, else the default port of $SERVICE_TYPE. The first start may download the
# model, hence the long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; s = os.environ.get('SERVICE_TYPE', 'embeddings'); p = os.environ.get('PORT') or {'embeddings': '8081', 'reranker': '8082'}.get(s, '8080'); urllib.request.build_opener(urllib.request.ProxyHandler({})).open('http://127.0.0.1:%s/ready' % p, timeout=8)"]

# The same command as `uv run fake-openai-server`; every setting comes from the
# environment (SERVICE_TYPE, HOST, PORT, EMBEDDINGS_MODEL, RERANKER_MODEL, DEVICE,
# DTYPE, HF_HOME, HF_HUB_OFFLINE, ...), so override any of them with -e.
# One-shot commands replace it, e.g. `python -m fake_openai_server.preload`.
CMD ["fake-openai-server"]

# Last, so that editing them rebuilds nothing.
LABEL org.opencontainers.image.title="fake-openai-server" \
      org.opencontainers.image.description="OpenAI-compatible embeddings and Cohere/Jina-compatible rerank for Japanese (ruri) models" \
      org.opencontainers.image.licenses="MIT"
