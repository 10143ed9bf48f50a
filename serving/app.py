"""The HTTP service: `create_app(settings)` builds it; `newstagger serve` runs it under uvicorn.

The model loads in the background once the app starts (lifespan), so /healthz answers at once
and /readyz says 503 until the model is in. Routers are grouped by audience; a new one (like
/v1/feedback) is its own module with an APIRouter, included by one line in `create_app`, that
reaches the service as `request.app.state.service` and answers errors by raising ApiError.

Every error is a JSON ErrorBody naming what was wrong and where; bad input never gets a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newstagger import __version__
from newstagger.backends import available_cores
from newstagger.model import ModelMeta
from newstagger.folders import default_model_dir
from newstagger.tagger import Tagger

from . import feedback
from .batching import MicroBatcher, Overloaded, ShuttingDown
from .observability import CLIENT_CLOSED_REQUEST, ObservedRequests, ServingMetrics, configure_logging
from .schemas import (
    MAX_ERRORS, RETRY_AFTER_S, ApiError, ErrorBody, Info, Labels, Limits, ModelInfo, ModelRef, Readiness, ReloadRequest,
    ReloadResponse, Runtime, Status, TagRequest, TagResponse, TagResult, check_bearer, check_text_length,
    error_responses, unknown_label,
)
from .settings import ServeSettings

logger = logging.getLogger(__name__)
PROBE_STORY = "青澜市人民政府今天发布通知，地铁5号线年底开通。"  # tagged by every model before it serves
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
SHUT_DOWN_BEFORE_THE_ANSWER = "the server shut down before the answer"  # uvicorn's deadline cut the request off


class TaggingService:
    """The model being served (through its batcher), the settings, and the metrics."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.metrics = ServingMetrics()
        self.batcher: MicroBatcher | None = None  # exists once the first model has loaded
        self.load_error: str | None = None
        self._reload_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        if self.settings.feedback_token is None and self.settings.host not in LOOPBACK_HOSTS:
            logger.warning("POST /v1/feedback stores corrections, which become training data, from any client "
                           "that reaches %s: set NEWSTAGGER_FEEDBACK_TOKEN", self.settings.host)
        loading = asyncio.create_task(self._load_first_model())
        yield
        loading.cancel()
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)
        if getattr(app.state, "feedback_store", None) is not None:
            app.state.feedback_store.close()
        self.metrics.close()

    async def _load_first_model(self) -> None:
        try:
            tagger = await asyncio.to_thread(self._load_tagger, self.settings.model)
        except Exception:
            # Why goes to the log only: it names the server's files, and any client may read /readyz.
            self.load_error = "the model failed to load (the server log says why); fix it and restart" + (
                "" if self.settings.workers > 1 else ", or load one with POST /v1/admin/reload")
            logger.exception("could not load the model from %s", self.settings.model or "the default folder")
            return
        self._start_serving(tagger)

    def _start_serving(self, tagger: Tagger) -> None:
        batcher = MicroBatcher(tagger, self.metrics, max_wait_s=self.settings.batch_wait_ms / 1000,
                               max_chars=self.settings.batch_max_chars, queue_max=self.settings.queue_max,
                               queue_max_chars=self.settings.queue_max_chars)
        batcher.start()
        self.metrics.serving_model(tagger.meta)
        self.batcher, self.load_error = batcher, None
        logger.info("serving model %s %s", tagger.meta.name, tagger.meta.version)

    def _load_tagger(self, folder: str | Path | None) -> Tagger:
        # One core is left to the event loop: on 2 shared cores, 16 clients reached 0.64-0.83 of one
        # big request's throughput with 2 torch threads, 0.91-1.0 with one (scripts/loadtest.py; README).
        # Each worker process loads its own model: they share the cores rather than each taking all of them.
        shared = max(1, (available_cores() - 1) // self.settings.workers)
        tagger = Tagger.load(folder, threads=self.settings.torch_threads or shared)
        # A folder that loads but cannot tag (a damaged graph) never serves. Two rows, one of them
        # over several windows: a graph may break on a batch or a stitch and not on one short story.
        tagger.tag([PROBE_STORY, PROBE_STORY * math.ceil(2 * tagger.meta.max_length / len(PROBE_STORY))])
        return tagger

    def ready_batcher(self) -> MicroBatcher:
        if self.batcher is None:
            # Retrying helps while the model loads, not once loading has failed.
            raise ApiError(503, self.load_error or "the model is still loading", kind="not_ready",
                           headers=None if self.load_error else {"Retry-After": str(RETRY_AFTER_S)})
        return self.batcher

    async def reload(self, folder: str | Path | None) -> tuple[ModelMeta | None, ModelMeta]:
        """Load `folder` beside the serving model, then swap; on failure the old one keeps serving.
        Where the first model failed to load, the loaded one starts serving (no previous model)."""
        if self.settings.workers > 1:
            raise ApiError(409, f"this server runs {self.settings.workers} worker processes, each with its own model, "
                           "and a reload would reach only the one that answers: restart the server to serve "
                           "another model", kind="reload_needs_restart")
        if self.load_error is None:
            self.ready_batcher()  # 503 while the first model is still loading
        folder = folder or self.settings.model or default_model_dir()
        async with self._reload_lock:
            serving = self.batcher.tagger.meta if self.batcher is not None else None
            try:
                tagger = await asyncio.to_thread(self._load_tagger, folder)
            except Exception as err:
                logger.warning("reload from %s failed: %s", folder, err)
                still = f"still serving {serving.name} {serving.version}" if serving else "still serving no model"
                raise ApiError(422, f"could not load a model from {folder}: {err}; {still}", ("body", "model"),
                               "model_load_failed")
            if self.batcher is None:
                self._start_serving(tagger)
                return None, tagger.meta
            previous = self.batcher.swap(tagger)
            self.metrics.serving_model(tagger.meta)
            logger.info("reloaded: now serving %s %s (was %s)", tagger.meta.name, tagger.meta.version,
                        previous.meta.version)
            return previous.meta, tagger.meta


def get_service(request: Request) -> TaggingService:
    return request.app.state.service


def _model_ref(meta: ModelMeta) -> ModelRef:
    return ModelRef(name=meta.name, version=meta.version)


operations = APIRouter(tags=["operations"])
tagging = APIRouter(prefix="/v1", tags=["tagging"])
admin = APIRouter(prefix="/v1/admin", tags=["admin"])


@operations.get("/healthz", response_model=Status, summary="The process is alive")
async def healthz() -> Status:
    return Status(status="ok")


@operations.get("/readyz", response_model=Readiness, responses=error_responses(503), summary="The model is loaded")
async def readyz(service: TaggingService = Depends(get_service)) -> Readiness:
    return Readiness(status="ready", model=_model_ref(service.ready_batcher().tagger.meta))


# Load balancers and uptime checkers probe with HEAD: the same answers (the server drops the body).
operations.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
operations.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@operations.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(service: TaggingService = Depends(get_service)) -> Response:
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@tagging.post("/tag", response_model=TagResponse, responses=error_responses(413, 415, 422, 429, 500, 503),
              summary="Tag stories with topics and entities")
async def tag(body: TagRequest, request: Request, service: TaggingService = Depends(get_service)) -> Response:
    _check_sizes(body, service.settings)
    batcher = service.ready_batcher()
    checked_against = batcher.tagger.meta
    _check_options(body, checked_against)
    try:
        future = batcher.submit([doc.text for doc in body.documents], body.thresholds, body.entity_types,
                                body.entity_threshold)
        outcome = await outcome_unless_client_leaves(request, future, batcher)
    except ClientLeft:
        raise ApiError(CLIENT_CLOSED_REQUEST, "the client closed the connection before the answer",
                       kind="client_closed_request") from None
    except Overloaded as err:
        raise ApiError(429, f"the server is busy: {err}", kind="overloaded",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDown as err:
        raise ApiError(503, str(err), kind="shutting_down") from None
    except Exception:
        # Logged by the batcher with its traceback; this request fails, the server keeps serving.
        raise ApiError(500, "the model failed on this request", kind="model_error") from None
    if outcome.model is not checked_against:  # reloaded while it waited: its options must fit that model too
        _check_options(body, outcome.model)
    request.state.access_log = {"documents": len(body.documents), "model_version": outcome.model.version}
    try:
        content = await asyncio.to_thread(_tag_response_json, outcome.model, body.documents, outcome.results)
    except asyncio.CancelledError:  # uvicorn's shutdown deadline, as in outcome_unless_client_leaves
        raise ApiError(503, SHUT_DOWN_BEFORE_THE_ANSWER, kind="shutting_down") from None
    timing = f"queue;dur={outcome.queued_s * 1000:.1f}, model;dur={outcome.batch_s * 1000:.1f}"
    return Response(content, media_type="application/json", headers={"Server-Timing": timing})


def _tag_response_json(model: ModelMeta, documents: list, results: list[dict]) -> bytes:
    """The TagResponse of these results, validated (plain dicts in, so each result keeps `tag`'s exact
    output shape) and written one result at a time, for a worker thread. pydantic holds the interpreter
    lock through each call: the answer to a full request (64 long stories, some 80,000 entities) built
    in one call, even in a thread, held the event loop (every other client and probe) for 0.45 s;
    result by result, for 0.015 s."""
    written = [TagResult.model_validate({"id": doc.id, **result}).model_dump_json()
               for doc, result in zip(documents, results)]
    return f'{{"model":{_model_ref(model).model_dump_json()},"results":[{",".join(written)}]}}'.encode()


class ClientLeft(Exception):
    """The client disconnected while its request waited for the model."""


async def outcome_unless_client_leaves(request: Request, future: Future, batcher: MicroBatcher):
    """The batcher's outcome for `future`; if the client disconnects first, the job is abandoned
    (dropped unrun when it has not started; a running batch stops between parts once all its clients
    have left) and ClientLeft raised. Clients that time out and retry would otherwise queue work
    nobody receives, and an overload would feed itself."""
    outcome = asyncio.wrap_future(future)
    left = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({outcome, left}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # uvicorn's shutdown deadline passed (nothing else cancels a request): the batch stops between
        # parts, and the client is told so by a 503, not a bare 500 from the server
        batcher.abandon(future)
        raise ShuttingDown(SHUT_DOWN_BEFORE_THE_ANSWER) from None
    finally:
        left.cancel()
    if outcome not in done:
        batcher.abandon(future)
        outcome.cancel()
        raise ClientLeft
    return outcome.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects: the body is read, so the server's next message is that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_sizes(body: TagRequest, settings: ServeSettings) -> None:
    _check_document_count(len(body.documents), settings)
    for i, doc in enumerate(body.documents):
        check_text_length(doc.text, settings.max_text_chars, ("body", "documents", i, "text"))


def _check_document_count(count: int, settings: ServeSettings) -> None:
    if count > settings.max_documents:
        raise ApiError(413, f"{count} documents; at most {settings.max_documents} per request",
                       ("body", "documents"), "too_many_documents")


def _check_options(body: TagRequest, meta: ModelMeta) -> None:
    """Options must name labels the serving model knows: a typo would otherwise change nothing."""
    errors = [unknown_label(("body", "thresholds", topic), "topic", meta.schema.topics)
              for topic in body.thresholds or {} if topic not in meta.schema.topics]
    errors += [unknown_label(("body", "entity_types", i), "entity_type", meta.schema.entity_types)
               for i, entity_type in enumerate(body.entity_types or []) if entity_type not in meta.schema.entity_types]
    if errors:
        raise RequestValidationError(errors)


@tagging.get("/info", response_model=Info, responses=error_responses(503), summary="The model and the limits")
async def info(service: TaggingService = Depends(get_service)) -> Info:
    tagger = service.ready_batcher().tagger
    meta, settings = tagger.meta, service.settings
    return Info(
        server=Runtime(version=__version__, backend=str(tagger.backend)),
        model=ModelInfo(name=meta.name, version=meta.version, base_model=meta.base_model, created=meta.created,
                        max_length=meta.max_length, stride=meta.stride),
        labels=Labels(topics=meta.schema.topics, entity_types=meta.schema.entity_types, coarse=meta.schema.coarse),
        thresholds={topic: meta.threshold(topic) for topic in meta.schema.topics},
        entity_threshold=meta.entity_threshold,
        limits=Limits(max_documents=settings.max_documents, max_text_chars=settings.max_text_chars,
                      max_body_bytes=settings.max_body_bytes, queue_max=settings.queue_max,
                      queue_max_chars=settings.queue_max_chars,
                      batch_wait_ms=settings.batch_wait_ms, batch_max_chars=settings.batch_max_chars,
                      body_timeout_s=settings.body_timeout_s, max_connections=settings.max_connections),
    )


bearer = HTTPBearer(auto_error=False, description="The server's NEWSTAGGER_ADMIN_TOKEN")


def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                  service: TaggingService = Depends(get_service)) -> None:
    token = service.settings.admin_token
    if token is None:
        raise ApiError(403, "admin endpoints are disabled: the server has no NEWSTAGGER_ADMIN_TOKEN",
                       ("header", "Authorization"), "admin_disabled")
    check_bearer(credentials, token, "admin token")


@admin.post("/reload", response_model=ReloadResponse, responses=error_responses(401, 403, 409, 422, 503),
            dependencies=[Depends(require_admin)], summary="Swap in a model folder without downtime")
async def reload(body: ReloadRequest | None = None, service: TaggingService = Depends(get_service)) -> ReloadResponse:
    previous, current = await service.reload(body.model if body else None)
    return ReloadResponse(model=_model_ref(current), previous=previous and _model_ref(previous))


class AsciiJSONResponse(JSONResponse):
    """Error bodies can quote client input (a dict key in `loc`), which may hold lone surrogates:
    escaping everything keeps such a body encodable."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, errors: list[dict], headers: dict | None = None,
                   detail: str | None = None) -> JSONResponse:
    """The ErrorBody of `errors`, listing the first MAX_ERRORS of them."""
    if detail is None:
        first = errors[0]
        where = ".".join(str(part) for part in first["loc"])
        detail = f"{where}: {first['msg']}" if where else first["msg"]
        detail += f" ({len(errors)} errors in all)" if len(errors) > 1 else ""
    body = ErrorBody(detail=detail, errors=errors[:MAX_ERRORS])
    return AsciiJSONResponse(body.model_dump(), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, [{"loc": list(err.loc), "msg": err.msg, "type": err.kind}], err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        is_tag_request = getattr(request.scope.get("route"), "endpoint", None) is tag
        documents = err.body.get("documents") if is_tag_request and isinstance(err.body, dict) else None
        if isinstance(documents, list):  # too many is a 413 whatever else is wrong (past the ceiling too)
            try:
                _check_document_count(len(documents), request.app.state.service.settings)
            except ApiError as too_large:
                return await api_error(request, too_large)
        items = [_validation_item(e) for e in err.errors()]
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type and any(item["loc"] == ["body"] for item in items):
            # FastAPI reads only a JSON body as JSON (curl -d sends a form): say so, not "not an object"
            items = [{"loc": ["header", "Content-Type"], "type": "content_type",
                      "msg": f"send the body as JSON with Content-Type: application/json, not {content_type or 'none'}"}]
        return error_response(422, items)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 400 and err.__cause__ is not None:
            # FastAPI's "error parsing the body" (bytes that are not UTF-8, nesting too deep):
            # malformed JSON like any other, so the same 422.
            return error_response(422, [{"loc": ["body"], "msg": f"not valid JSON: {err.__cause__}",
                                         "type": "json_invalid"}])
        return error_response(err.status_code, [], err.headers, detail=str(err.detail))


def _validation_item(error: dict) -> dict:
    if error["type"] == "json_invalid":  # FastAPI puts the character offset where a field name would be
        return {"loc": ["body"], "msg": f"not valid JSON: {error['ctx']['error']} at character {error['loc'][-1]}",
                "type": "json_invalid"}
    return {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}


class UnexpectedErrors:
    """The 500 for an error nothing else handled. Answered here, inside ObservedRequests, so that it
    carries X-Request-ID and Server-Timing like every other answer: Starlette's own handler for
    Exception runs outside all middleware."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        answered = False

        async def noting_send(message: Message) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception:
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if answered:  # too late for a 500: the server drops the connection
                raise
            await error_response(500, [], detail="internal error; the server keeps serving")(scope, receive, send)


class BodySizeLimit:
    """413 for a body over the limit, before anything parses it; 415 for a compressed one (it would
    be parsed as the compressed bytes, and its limit would not bound what it expands to); 408 when
    the whole body takes longer than `timeout_s` to come.

    The body is read up front (it is bounded by the limit) and replayed to the app, so the limit
    holds whether or not the client sent Content-Length and however it chunked the body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("identity", ""):
            return await error_response(415, [{"loc": ["header", "Content-Encoding"], "type": "content_encoding",
                                               "msg": f"send the body uncompressed, not as {encoding!r}"}]
                                        )(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        # For the whole body: a byte at a time is slow too.
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                return await error_response(408, [{"loc": ["body"], "type": "body_timeout",
                                                   "msg": f"the body did not arrive within {self.timeout_s:g} s"}]
                                            )(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, [{"loc": ["body"], "msg": f"the request body is larger than "
                                         f"{self.max_bytes} bytes", "type": "body_too_large"}])
        await response(scope, receive, send)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    service = TaggingService(settings)
    # No redirects to a path with(out) the trailing slash: a 307 built from the Host header is
    # wrong behind a TLS proxy, and a client should use the documented path.
    app = FastAPI(title="newstagger", version=__version__, lifespan=service.lifespan, redirect_slashes=False,
                  description="Topics and named entities for Chinese local-news stories.")
    app.state.service = service
    app.include_router(operations)
    app.include_router(tagging)
    app.include_router(admin)
    app.include_router(feedback.router)
    _install_error_handlers(app)
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(ObservedRequests, metrics=service.metrics)  # added last: outermost, sees every answer
    return app


def app_from_environment() -> FastAPI:
    """uvicorn's app factory for `newstagger serve`: settings from NEWSTAGGER_*, logging set up
    in each worker process."""
    settings = ServeSettings()
    configure_logging(settings.log_format)
    return create_app(settings)
