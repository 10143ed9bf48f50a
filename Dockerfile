# newstagger's HTTP service: CPU-only torch, the default model inside, runs as a non-root user.
#   docker build -t newstagger .
#   docker run --rm -p 8000:8000 -v newstagger-data:/app/data newstagger
# Settings are NEWSTAGGER_* environment variables (serving/settings.py), e.g. -e NEWSTAGGER_ADMIN_TOKEN=...

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch alone first, from the CPU index: a cached layer of its own, and the project's install
# below then finds it satisfied instead of pulling the CUDA build from PyPI.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY newstagger newstagger
COPY training training
COPY serving serving
RUN pip install .

FROM python:3.11-slim
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
# mount a volume there. Stop with `docker stop -t 30`: the server gives requests in flight 25 s.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin newstagger \
    && mkdir -p /app/data && chown newstagger /app/data
COPY --from=builder /opt/venv /opt/venv
# Owned by root: the service reads its model and never writes it.
COPY models/default /app/models/default
WORKDIR /app
USER newstagger
EXPOSE 8000
# /readyz is 503 until the model has loaded, so "healthy" means "can tag". Asked on the interface the
# server listens on (loopback where that is every interface).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; host = os.environ.get('NEWSTAGGER_HOST') or '0.0.0.0'; host = {'0.0.0.0': '127.0.0.1', '::': '[::1]'}.get(host, f'[{host}]' if ':' in host else host); urllib.request.urlopen(f'http://{host}:%s/readyz' % os.environ.get('NEWSTAGGER_PORT', '8000'), timeout=4)"]
CMD ["newstagger", "serve"]
