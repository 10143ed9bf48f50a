"""Server settings: defaults here, overridden by NEWSTAGGER_* environment variables, then by
`newstagger serve` flags (which the command passes on as environment variables, so every
uvicorn worker process reads the same settings)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from newstagger.checks import MAX_THREADS
from training.feedback import DEFAULT_URL as DEFAULT_FEEDBACK_URL
from training.feedback import check_sqlite_writable, check_store_url

from .schemas import MAX_DOCUMENTS_CEILING

logger = logging.getLogger(__name__)


class ServeSettings(BaseSettings):
    # A variable set to "" counts as unset, as `newstagger tag` reads NEWSTAGGER_MODEL: not the folder "."
    # and not an empty admin token.
    model_config = SettingsConfigDict(env_prefix="NEWSTAGGER_", extra="ignore", env_ignore_empty=True)

    model: Path | None = Field(
        None, description="Model folder to serve; unset means the shipped model (models/default)."
    )
    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 for every interface.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(
        1, ge=1, description="Server processes; each loads its own copy of the model and batches on its own."
    )
    max_documents: int = Field(64, ge=1, le=MAX_DOCUMENTS_CEILING,
                               description="Most documents one request may carry (more: 413).")
    max_text_chars: int = Field(20_000, ge=1, description="Longest text accepted, in characters (longer: 413).")
    max_body_bytes: int = Field(
        8_000_000, ge=1, description="Largest request body accepted, in bytes, checked before parsing (larger: 413). "
        "The default admits max_documents texts of max_text_chars Chinese characters each as JSON's \\uXXXX "
        "escapes (6 bytes a character), the way most clients send them."
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, le=10_000, allow_inf_nan=False,
        description="How long the batcher waits for more requests after the first one arrives.",
    )
    batch_max_chars: int = Field(
        16_384, ge=1,
        description="Most characters the model is given at once (about one token each in Chinese): requests "
                    "are gathered up to this, a larger request runs alone in parts of this size. Bounds memory.",
    )
    queue_max: int = Field(
        256, ge=1, description="Requests allowed to wait for the model; beyond this the server answers 429."
    )
    queue_max_chars: int = Field(
        4_000_000, ge=1,
        description="Characters the waiting requests may hold between them; beyond this the server answers 429 "
                    "(a request arriving at an empty queue is always taken). Bounds their memory: a full queue of "
                    "the largest requests would otherwise hold gigabytes.")
    torch_threads: int | None = Field(
        None, ge=1, le=MAX_THREADS,
        description="Threads torch may use per worker process; unset: one fewer than the cores the process "
                    "may use, shared out among the workers (at least one each), so HTTP work never preempts the "
                    "encoder's threads mid-step and workers do not oversubscribe the cores.",
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /v1/admin/*; unset disables the admin endpoints."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, allow_inf_nan=False,
        description="Longest time a request body may take to arrive, from its first byte to its last (longer: 408), "
                    "so clients that open a request and send its body slowly cannot hold connections and memory.")
    shutdown_timeout_s: float = Field(
        25.0, gt=0, le=3600, allow_inf_nan=False,
        description="On SIGTERM, how long requests in flight and waiting may take to be answered before the server "
                    "exits anyway; keep it under the orchestrator's grace period (Kubernetes: 30 s, docker stop: "
                    "10 s unless -t), which kills the process without a word.")
    max_connections: int | None = Field(
        None, ge=1, description="Most connections a worker serves at once (more: 503 from uvicorn); unset, no limit.")
    feedback_token: SecretStr | None = Field(
        None, description="Bearer token POST /v1/feedback requires; unset, any client that reaches the server may "
                          "send corrections, which become training data."
    )
    log_format: Literal["json", "text"] = Field("json", description="Access and server log lines: json or text.")
    feedback_url: str = Field(
        DEFAULT_FEEDBACK_URL, description="SQLAlchemy URL of the store POST /v1/feedback writes to: a SQLite file "
                                          "by default, or e.g. postgresql+psycopg://user@host/newstagger."
    )

    @field_validator("feedback_url")
    @classmethod
    def _usable_store_url(cls, url: str) -> str:
        parsed = check_store_url(url)
        try:
            check_sqlite_writable(parsed)
        except ValueError as err:
            if url != DEFAULT_FEEDBACK_URL:  # chosen: refused; the default, beside a server that may never use it: said
                raise
            logger.warning("%s: POST /v1/feedback will answer 503; set NEWSTAGGER_FEEDBACK_URL", err)
        return url
