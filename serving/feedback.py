"""`POST /v1/feedback`: an editor's corrected story, stored for retraining (see training/feedback.py).

The body is one document in the training format, checked like training data, plus who sends it,
its revision, and the model version whose prediction it corrects. Sending the same correction
again is harmless (200, stored once); the same id and revision with other content is a 409.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError
from sqlalchemy.exc import DataError as DBAPIDataError
from sqlalchemy.exc import SQLAlchemyError

from newstagger.documents import DataError, Document, Span, validate
from newstagger.schema import LabelSchema
from training.feedback import Correction, CorrectionConflict, FeedbackStore

from .schemas import (MAX_NAME_CHARS, RETRY_AFTER_S, ApiError, DocumentId, Name, Text, check_bearer,
                      check_text_length, error_responses, few_entities, few_labels, unknown_label)

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["feedback"])
MAX_REVISION = 2**63 - 1  # the store's integer column (SQLite INTEGER, PostgreSQL BIGINT)
_opening = threading.Lock()


class EntityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: StrictInt = Field(ge=0, description="Offset of the first character (Python str index).")
    end: StrictInt = Field(ge=0, description="Offset one past the last character.")
    type: Name = Field(description="Entity type; one the model does not know is a new label.")
    # An entity as /v1/tag returns it can be sent back as it is: its text is checked, its score ignored.
    text: Text | None = Field(None, description="The span's text, if given checked against text[start:end] (so "
                                                "offsets counted another way, e.g. in UTF-16, are caught).")
    score: float | None = Field(None, description="Ignored: the model's score, where the entity came from /v1/tag.")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "id": "a1", "text": "杭州市西湖区今天开展垃圾分类宣传活动。", "topics": ["city_management"],
            "entities": [{"start": 0, "end": 3, "type": "address"}, {"start": 3, "end": 6, "type": "address"}],
            "sender": "editor-li", "model_version": "1.0.0",
        }]},
    )

    id: DocumentId = Field(description="The story's identifier (string or integer).")
    text: Text = Field(min_length=1, description="The story, exactly as tagged.")
    topics: Annotated[list[Name], BeforeValidator(few_labels)] | None = Field(
        None, description="All topics that apply ([] for none); absent or null: topics not corrected.")
    entities: Annotated[list[EntityIn], BeforeValidator(few_entities)] | None = Field(
        None, description="All entity spans, non-overlapping ([] for none); absent or null: entities not corrected.")
    sender: Name = Field(description="Who made the correction.")
    revision: StrictInt = Field(1, ge=1, le=MAX_REVISION, description="Raise it to correct the same story again.")
    model_version: Name | None = Field(
        None, description="Version of the model whose output was corrected (the `model.version` of its "
                          "/v1/tag answer); default: the version serving now.")
    new_labels: StrictBool = Field(
        False, description="True when a topic or entity type the serving model does not know is meant as a new "
                           "label; otherwise one is a 422, so that a typo is caught now, not at retraining.")

    @field_validator("id")
    @classmethod
    def _usable_id(cls, value: str | int) -> str | int:
        if len(str(value)) > MAX_NAME_CHARS:  # stored as a string, and indexed
            raise PydanticCustomError("too_long", "is {actual} characters long; at most {most}",
                                      {"actual": len(str(value)), "most": MAX_NAME_CHARS})
        # The id keys a story's revisions: "a1 " would store a second story beside "a1"
        if isinstance(value, str) and (not value.strip() or value != value.strip()):
            raise PydanticCustomError("blank_edges", "must not be empty or begin or end with whitespace")
        return value

    @field_validator("entities")
    @classmethod
    def _few_entity_types(cls, entities: list[EntityIn] | None) -> list[EntityIn] | None:
        few_labels(list({entity.type for entity in entities or ()}))
        return entities


class FeedbackResponse(BaseModel):
    id: str
    revision: int
    stored: bool = Field(description="False when this exact correction had been stored before (a retry).")
    model_version: str | None


feedback_bearer = HTTPBearer(auto_error=False, scheme_name="FeedbackToken",
                             description="The server's NEWSTAGGER_FEEDBACK_TOKEN, where it has one")


def require_feedback_token(request: Request,
                           credentials: HTTPAuthorizationCredentials | None = Depends(feedback_bearer)) -> None:
    token = request.app.state.service.settings.feedback_token
    if token is not None:
        check_bearer(credentials, token, "feedback token")


@router.post("/feedback", response_model=FeedbackResponse, status_code=201,
             responses={200: {"model": FeedbackResponse, "description": "Stored before; nothing changed"},
                        **error_responses(401, 409, 413, 415, 422, 503)},
             dependencies=[Depends(require_feedback_token)], summary="Store a corrected story for retraining")
async def feedback(body: FeedbackRequest, request: Request, response: Response) -> FeedbackResponse:
    service = request.app.state.service
    check_text_length(body.text, service.settings.max_text_chars, ("body", "text"))
    document = _checked_document(body)
    if not body.new_labels:  # checked against the serving model: 503 while there is none
        _check_known_labels(body, document, service.ready_batcher().tagger.schema)
    serving = service.batcher.tagger.meta.version if service.batcher is not None else None
    correction = Correction(document, sender=body.sender, revision=body.revision,
                            model_version=body.model_version or serving)
    try:
        stored, model_version = await asyncio.to_thread(_save, request.app.state, correction)
    except CorrectionConflict as err:
        raise ApiError(409, str(err), ("body", "revision"), "revision_conflict") from None
    except DBAPIDataError as err:  # a value this database cannot hold (PostgreSQL: a NUL character): retrying won't help
        raise ApiError(422, f"the feedback store cannot hold this correction: {_first_line(err)}", ("body",),
                       "unstorable_value") from None
    # The URL was checked at start-up; the database may still be down or broken, or its folder not creatable.
    except (SQLAlchemyError, OSError) as err:
        # the driver's message in the log, not the statement's parameters (the story, the sender); the
        # client, who may hold no token, learns no path, host or SQL
        logger.warning("feedback store error: %s: %s", type(err).__name__, _first_line(err))
        raise ApiError(503, "the feedback store is unavailable; the server's log says why",
                       kind="feedback_store_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    if not stored:
        response.status_code = 200
    return FeedbackResponse(id=document.id, revision=body.revision, stored=stored, model_version=model_version)


def _first_line(err: Exception) -> str:
    """The driver's own message, without the statement and parameters SQLAlchemy appends."""
    lines = str(getattr(err, "orig", None) or err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _checked_document(body: FeedbackRequest) -> Document:
    """The body as a training document, validated one task at a time so an error names its field."""
    if body.topics is None and body.entities is None:
        raise RequestValidationError([{"loc": ("body",), "msg": "a correction needs topics, entities or both",
                                       "type": "nothing_to_store"}])
    entities = None if body.entities is None else [Span(e.start, e.end, e.type) for e in body.entities]
    mentions = {Span(e.start, e.end, e.type): e.text for e in body.entities or () if e.text is not None}
    document = Document(id=str(body.id), text=body.text, topics=body.topics, entities=entities)
    for field, labelled in (("topics", Document(document.id, document.text, topics=document.topics)),
                            ("entities", Document(document.id, document.text, entities=document.entities))):
        try:
            validate(labelled, mentions=mentions)  # the message names the document; `loc` names the field
        except DataError as err:
            error = {"loc": ("body", field), "msg": str(err), "type": "invalid_labels"}
            raise RequestValidationError([error]) from None
    for index, span in enumerate(entities or ()):
        mention = body.text[span.start : span.end]
        if mention != mention.strip():  # an editor's slip, which would teach the tagger to take spaces in
            error = {"loc": ("body", "entities", index), "type": "invalid_labels",
                     "msg": f"span [{span.start}, {span.end}) covers {mention!r}: it begins or ends with a space"}
            raise RequestValidationError([error])
    return document


def _check_known_labels(body: FeedbackRequest, document: Document, known: LabelSchema) -> None:
    """A 422 naming each topic and entity type the serving model does not know."""
    new = {kind: set(labels) for kind, labels in known.new_labels(LabelSchema.from_documents([document])).items()}
    hint = " (a new label: set new_labels)"
    errors = [unknown_label(("body", "topics", i), "topic", known.topics, hint)
              for i, topic in enumerate(body.topics or []) if topic in new["topics"]]
    errors += [unknown_label(("body", "entities", i, "type"), "entity_type", known.entity_types, hint)
               for i, entity in enumerate(body.entities or []) if entity.type in new["entity_types"]]
    if errors:
        raise RequestValidationError(errors)


def _save(state, correction: Correction) -> tuple[bool, str | None]:
    """Store a correction in the app's store, opened on first use; runs in a worker thread. Whether it
    was stored now (not before), and the model version stored with it then."""
    with _opening:
        if getattr(state, "feedback_store", None) is None:
            state.feedback_store = FeedbackStore(state.service.settings.feedback_url)
    if state.feedback_store.add(correction):
        return True, correction.model_version
    return False, state.feedback_store.recorded_model_version(correction.document.id, correction.revision)
