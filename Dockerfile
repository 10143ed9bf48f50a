# newstagger's HTTP service: CPU-only torch, the default model inside, runs as a non-root user.
#   docker build -t newstagger .
#   docker run --rm --stop-timeout 30 -p 8000:8000 -v newstagger-data:/app/data newstagger
# Settings are NEWSTAGGER_* environment variables (serving/settings.py), e.g. -e NEWSTAGGER_ADMIN_TOKEN=...;
# set the host and port that way too, not by `serve` flags: the health check reads them.

FROM python:3.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch alone first, from the CPU index: a cached layer of its own, and the project's install
# below then finds it satisfied instead of pulling the CUDA build from PyPI.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# The dependencies next, read from pyproject.toml alone: a layer which changes to the code or the README
# leave cached, where one `pip install .` reinstalled about 1 GB of them after each.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install -r requirements.txt
COPY README.md ./
COPY newstagger newstagger
COPY training training
COPY serving serving
RUN pip install --no-deps .

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    NEWSTAGGER_MODEL=/app/models/default \
    NEWSTAGGER_HOST=0.0.0.0 \
    NEWSTAGGER_PORT=8000 \
    NEWSTAGGER_FEEDBACK_URL=sqlite:////app/data/feedback.db
# /app/data is where the service keeps data (the feedback store; HF_HOME is a throwaway cache):
# mount a volume there (a bind mount must be writable by uid 10001). Run with --stop-timeout 30 (or stop
# with -t 30): the server gives requests in flight 25 s, and Docker's default is 10.
RUN groupadd --system --gid 10001 newstagger \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin newstagger \
    && mkdir -p /app/data && chown 10001:10001 /app/data
COPY --from=builder /opt/venv /opt/venv
# Owned by root: the service reads its model and never writes it.
COPY models/default /app/models/default
WORKDIR /app
# by number: Kubernetes' runAsNonRoot cannot check a user name
USER 10001:10001
EXPOSE 8000
# /readyz is 503 until the model has loaded, so "healthy" means "can tag". Asked on the interface the
# server listens on (loopback where that is every interface), past any proxy the environment names.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; host = os.environ.get('NEWSTAGGER_HOST') or '0.0.0.0'; host = {'0.0.0.0': '127.0.0.1', '::': '[::1]'}.get(host, f'[{host}]' if ':' in host else host); urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f'http://{host}:%s/readyz' % os.environ.get('NEWSTAGGER_PORT', '8000'), timeout=4)"]
CMD ["newstagger", "serve"]
