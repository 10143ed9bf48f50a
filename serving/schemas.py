"""Request and response bodies of the HTTP API; FastAPI builds the OpenAPI schema (/docs) from them.

Documents follow `newstagger tag`'s input rules (id: string or integer, text: string) and each
result is exactly one line of its output. An answer other than 200 is an ErrorBody, raised as ApiError.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi.security import HTTPAuthorizationCredentials
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, StrictFloat, StrictInt,
                      StrictStr)
from pydantic_core import PydanticCustomError

from newstagger.documents import unpaired_surrogate
from newstagger.schema import the_model_knows

RETRY_AFTER_S = 1  # what a 429 or 503 tells a client to wait before trying again
# Bounds that make an oversized list fail at once instead of being validated item by item (each bad
# item is an error of its own: a 2 MB body of them took a minute to answer, on the event loop).
MAX_DOCUMENTS_CEILING = 10_000  # the highest max_documents setting; a longer list is the same 413
MAX_LABELS = 1_000  # more topics or entity types than any model has
MAX_ENTITIES = 5_000  # spans in one corrected story: one every 4 characters of the longest default text
MAX_ERRORS = 20  # an error body lists at most this many; its detail counts the rest
MAX_NAME_CHARS = 200  # a label, sender, model version or stored id: a name, never a text (and indexable)


class ApiError(Exception):
    """An answer other than 200, with where the problem is (loc) and why (msg)."""

    def __init__(self, status: int, msg: str, loc: tuple = (), kind: str = "error", headers: dict | None = None):
        super().__init__(msg)
        self.status, self.msg, self.loc, self.kind, self.headers = status, msg, loc, kind, headers


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` for these error statuses, all answered with an ErrorBody."""
    return {status: {"model": ErrorBody} for status in statuses}


def check_text_length(text: str, most: int, loc: tuple) -> None:
    """ApiError 413 for a text over the server's limit, named by where it is in the request."""
    if len(text) > most:
        raise ApiError(413, f"text is {len(text)} characters; at most {most}", loc, "text_too_long")


def check_bearer(credentials: HTTPAuthorizationCredentials | None, token: SecretStr, what: str) -> None:
    """ApiError 401 unless the request carries `Authorization: Bearer <token>` (compared in constant time)."""
    expected = token.get_secret_value().encode()
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise ApiError(401, f"a valid 'Authorization: Bearer <{what}>' header is required",
                       ("header", "Authorization"), "unauthorized", headers={"WWW-Authenticate": "Bearer"})


def unknown_label(loc: tuple, kind: str, known: list[str], hint: str = "") -> dict:
    """The validation error of a label (kind: topic or entity_type) the serving model does not know."""
    label = kind.replace("_", " ")
    return {"loc": loc, "msg": f"unknown {label}; {the_model_knows(known, label + 's')}{hint}",
            "type": f"unknown_{kind}"}


def _utf8_encodable(value: str) -> str:
    index = unpaired_surrogate(value)
    if index is not None:
        raise PydanticCustomError("unpaired_surrogate", "has an unpaired surrogate at index {index}",
                                  {"index": index})
    return value


def _string_or_integer(value):
    """One error at the id itself, rather than one per member of the union."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PydanticCustomError("id_type", "must be a string or an integer")
    return _utf8_encodable(value) if isinstance(value, str) else value


def few_entities(value):
    if isinstance(value, list) and len(value) > MAX_ENTITIES:
        raise PydanticCustomError("too_long", "holds {actual} spans; at most {most}",
                                  {"actual": len(value), "most": MAX_ENTITIES})
    return value


def few_labels(value):
    if isinstance(value, (dict, list)) and len(value) > MAX_LABELS:
        raise PydanticCustomError("too_long", "names {actual} labels; at most {most}",
                                  {"actual": len(value), "most": MAX_LABELS})
    return value


Text = Annotated[StrictStr, AfterValidator(_utf8_encodable)]
Name = Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)]
DocumentId = Annotated[StrictStr | StrictInt, BeforeValidator(_string_or_integer)]
Threshold = Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class DocumentIn(BaseModel):
    id: DocumentId = Field(description="Your identifier, echoed in the result (string or integer).")
    text: Text = Field(description="The story. Any string is valid, the empty string included.")


class TagRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",  # a misspelt option must not be silently ignored
        json_schema_extra={"examples": [{"documents": [{"id": "a1", "text": "杭州市西湖区今天开展垃圾分类宣传活动。"}]}]},
    )

    documents: list[DocumentIn] = Field(
        min_length=1, max_length=MAX_DOCUMENTS_CEILING,
        description="Stories to tag; see /v1/info for the most one request may carry."
    )
    thresholds: Annotated[dict[Text, Threshold], BeforeValidator(few_labels)] | None = Field(
        None, description="Per-topic label thresholds for this request, overriding the model's own."
    )
    entity_types: Annotated[list[Text], BeforeValidator(few_labels)] | None = Field(
        None, description="Entity types to return (default: all the model knows)."
    )
    entity_threshold: Threshold | None = Field(
        None, description="Lowest entity score to return, overriding the model's own (0 returns every entity found)."
    )


class Entity(BaseModel):
    start: int = Field(description="Offset of the first character (Python str index).")
    end: int = Field(description="Offset one past the last character.")
    type: str
    text: str
    score: float


class TagResult(BaseModel):
    """One line of `newstagger tag` output."""

    id: StrictStr | StrictInt
    topics: dict[str, float] = Field(description="Probability of every topic the model knows.")
    labels: list[str] = Field(description="Topics whose probability reaches their threshold, highest first.")
    entities: list[Entity]


class ModelRef(BaseModel):
    name: str
    version: str


class TagResponse(BaseModel):
    model: ModelRef = Field(description="The model that tagged these documents.")
    results: list[TagResult] = Field(description="One result per document, in request order.")


class ErrorItem(BaseModel):
    loc: list[StrictStr | StrictInt] = Field(description="Where: e.g. ['body', 'documents', 3, 'text'].")
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="What was wrong and where, in one line.")
    errors: list[ErrorItem] = Field(default_factory=list, description="Each problem with its location.")


class Status(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model: ModelRef


class Labels(BaseModel):
    topics: list[str]
    entity_types: list[str]
    coarse: dict[str, str] = Field(description="Entity type -> coarse PER/LOC/ORG view.")


class Limits(BaseModel):
    max_documents: int
    max_text_chars: int
    max_body_bytes: int
    queue_max: int
    queue_max_chars: int
    batch_wait_ms: float
    batch_max_chars: int
    body_timeout_s: float
    max_connections: int | None = Field(description="Per worker; null: no limit.")


class ModelInfo(ModelRef):
    base_model: str
    created: str
    max_length: int = Field(description="Encoder window, in tokens; longer texts are windowed.")
    stride: int = Field(description="Overlap between windows, in tokens.")


class Runtime(BaseModel):
    version: str = Field(description="newstagger's version.")
    backend: str = Field(description="What scores the model in this process, e.g. 'torch bf16 on cpu'.")


class Info(BaseModel):
    server: Runtime
    model: ModelInfo
    labels: Labels
    thresholds: dict[str, float] = Field(description="The label threshold in force for every topic.")
    entity_threshold: float = Field(description="The lowest entity score returned.")
    limits: Limits


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(
        None, min_length=1, description="Model folder on the server; default: the folder the server was started with."
    )


class ReloadResponse(BaseModel):
    model: ModelRef = Field(description="Now serving.")
    previous: ModelRef | None = Field(description="Served until now; requests already running finish on it. "
                                                  "None where the first model had failed to load.")
