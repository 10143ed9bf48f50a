"""Metrics, access logs and timing headers.

Each app owns its own Prometheus registry, so several apps (tests, reloads of the module) never
collide over metric names. With several uvicorn workers, `serve` gives them one folder to write
their metrics into (prometheus_client's multiprocess mode, see `metrics_shared_by_workers`), and
a scrape that reaches any worker reads the sum over all of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:  # `serve` imports this module before its workers start; torch is theirs to load
    from newstagger.model import ModelMeta

# nginx's status for a request whose client went away before the answer: logged and counted, never sent.
CLIENT_CLOSED_REQUEST = 499

access_logger = logging.getLogger("newstagger.access")

# A label value per method a client may invent would grow Prometheus without bound: others are "other".
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


# prometheus_client reads it once, at import: a process started with it set writes every value to
# files there, which any process can then add up.
SHARED_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def metrics_shared_by_workers(workers: int) -> Iterator[None]:
    """Around starting `workers` server processes: with more than one, a fresh folder in
    PROMETHEUS_MULTIPROC_DIR for their metrics (their environment is inherited), removed when they
    have stopped. Fresh, since an earlier run's counts would add up with this one's; a folder the
    operator set is theirs to empty between runs, and is used as it is."""
    if workers <= 1 or os.environ.get(SHARED_METRICS_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="newstagger-metrics-")
    os.environ[SHARED_METRICS_ENV] = folder
    try:
        yield
    finally:
        del os.environ[SHARED_METRICS_ENV]
        shutil.rmtree(folder, ignore_errors=True)


def _forget_crashed_workers(folder: str) -> None:
    """Take the live gauges of workers that are gone out of the sums: one that crashed never said so
    (`close`), and uvicorn restarts it under another pid."""
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # another worker's scrape took it out first
                multiprocess.mark_process_dead(pid, folder)
        except PermissionError:  # it exists, as another user's
            pass


class ServingMetrics:
    def __init__(self) -> None:
        # Read the way `metrics_shared_by_workers` sets it: a folder named. (prometheus_client turns to files
        # when the variable is there at all, but an empty one names no folder to add up, so a scrape then
        # reports this process's values, as it did before workers shared them.)
        self.shared = bool(os.environ.get(SHARED_METRICS_ENV))
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("newstagger_http_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("newstagger_http_request_seconds",
                                 "Time from request to the last byte of the response (or to the client leaving)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_documents = Histogram("newstagger_batch_documents", "Documents run through the model together",
                                         buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("newstagger_batch_requests", "Requests gathered into one batch",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("newstagger_batch_seconds", "Model time per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.documents = Counter("newstagger_documents_tagged", "Documents tagged", registry=r)
        self.characters = Counter("newstagger_characters_tagged", "Characters of text tagged", registry=r)
        self.model_failures = Counter("newstagger_model_failures", "Requests the model failed on", registry=r)
        # Shared by workers: the requests waiting in every live worker, and each model some live worker serves
        self.queue_depth = Gauge("newstagger_queue_depth", "Requests waiting for the model", registry=r,
                                 multiprocess_mode="livesum")
        self.model_info = Gauge("newstagger_model_info", "The model being served (value is always 1)",
                                ["name", "version"], registry=r, multiprocess_mode="livemax")
        self.served: tuple[str, str] | None = None  # the model_info labels set now

    def serving_model(self, meta: ModelMeta) -> None:
        if self.served is not None:  # shared, a removed series would stay in this process's file
            self.model_info.labels(*self.served).set(0)
        self.model_info.clear()
        self.served = (meta.name, meta.version)
        self.model_info.labels(*self.served).set(1)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or, shared, every worker's added up."""
        if not self.shared:
            return generate_latest(self.registry)
        _forget_crashed_workers(os.environ[SHARED_METRICS_ENV])
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker)
        return generate_latest(every_worker)

    def close(self) -> None:
        """At a worker's shutdown: its gauges leave the shared sums (its counts stay, as counts should)."""
        if self.shared:
            multiprocess.mark_process_dead(os.getpid())


class ObservedRequests:
    """Counts and times every request, logs one structured line for it, and adds X-Request-ID
    and a Server-Timing `app` entry to the response (a route may add its own entries first)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = _request_id(scope)
        status = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server-timing"]
                timings = [v.decode("latin-1") for k, v in message.get("headers", []) if k.lower() == b"server-timing"]
                timings.append(f"app;dur={elapsed_ms:.1f}")
                headers += [(b"server-timing", ", ".join(timings).encode("latin-1")),
                            (b"x-request-id", request_id.encode("latin-1"))]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            status = status or 500  # what the client gets if the app raises before answering
            raise
        finally:
            # An app that ends without answering saw the client leave first.
            self._record(scope, status or CLIENT_CLOSED_REQUEST, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        route = _route_label(scope)
        method = scope["method"] if scope["method"] in METHOD_LABELS else "other"
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        fields = {"request_id": request_id, "method": scope["method"], "path": scope["path"], "route": route,
                  "status": status, "duration_ms": round(seconds * 1000, 1),
                  "client": scope["client"][0] if scope.get("client") else None,
                  **scope.get("state", {}).get("access_log", {})}
        access_logger.info("%s %s %d %.1f ms", scope["method"], log_value(scope["path"]), status, seconds * 1000,
                           extra={"fields": fields})


def _request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is a sane token (visible ASCII, no spaces), so logs join up
    across services."""
    for key, value in scope["headers"]:
        if key == b"x-request-id" and 0 < len(value) <= 128 and all(33 <= byte <= 126 for byte in value):
            return value.decode()
    return uuid.uuid4().hex


def _route_label(scope: Scope) -> str:
    """The route's path template (bounded label values, whatever paths clients invent)."""
    route = scope.get("route")
    if route is not None:
        return route.path
    # Answered before routing (a body over the size limit), or by FastAPI's own pages (/docs,
    # /openapi.json), whose plain routes do not say either. FastAPI's included routers do not say
    # which route of theirs matches, so the path is looked up among the API's own (none has
    # parameters, so a path is its template).
    app = scope.get("app")
    if not hasattr(app, "openapi"):
        return "unmatched"
    pages = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    return scope["path"] if scope["path"] in pages | set(app.openapi()["paths"]) else "unmatched"


def log_value(value: object) -> str:
    """`value` for a text log line: quoted with escapes where it holds a space, a quote, `=`, a
    backslash or a character that is not printable, so a client's path or request id cannot start a
    line, a key=value or a quoted value of its own."""
    text = str(value)
    plain = text.isprintable() and not any(char in text for char in ' "=\\')
    return text if plain else json.dumps(text, ensure_ascii=False)


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextLogFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        extra = "".join(f" {k}={log_value(v)}" for k, v in fields.items()) if fields else ""
        return super().format(record) + extra


def configure_logging(log_format: str) -> None:
    """One handler on the root logger; uvicorn's loggers propagate into it (it is started with
    log_config=None and access_log=False, ObservedRequests writes the access log)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
