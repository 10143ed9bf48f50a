"""The one internal document format, shared by training, evaluation, serving and feedback.

A document is `{"id", "text", "topics": [...], "entities": [{"start", "end", "type"}]}` with
`end` exclusive Python `str` indices. `topics` or `entities` may be absent (None): the document
is then labelled for the other task only, and training masks the missing task's loss.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .checks import is_integer, is_string_list


class DataError(ValueError):
    """A document or a file of documents that cannot be used; the message says where and why."""


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    type: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "type": self.type}


@dataclass
class Document:
    id: str
    text: str
    topics: list[str] | None = None
    entities: list[Span] | None = None
    group: str | None = None

    @property
    def labelled(self) -> bool:
        """Labelled for at least one task (topics or entities); an unlabelled one teaches nothing."""
        return self.topics is not None or self.entities is not None

    def to_dict(self) -> dict:
        out: dict = {"id": self.id, "text": self.text}
        if self.topics is not None:
            out["topics"] = list(self.topics)
        if self.entities is not None:
            out["entities"] = [span.to_dict() for span in self.entities]
        if self.group is not None:
            out["group"] = self.group
        return out

    @classmethod
    def from_dict(cls, obj: dict, where: str = "document") -> "Document":
        """Build a document from its JSON form, raising DataError that names the bad field."""
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        doc_id, text = id_and_text(obj, where)
        topics = obj.get("topics")
        if topics is not None and not is_string_list(topics):
            raise DataError(f"{where}: field 'topics' must be a list of strings")
        entities = obj.get("entities")
        spans = None
        if entities is not None:
            if not isinstance(entities, list):
                raise DataError(f"{where}: field 'entities' must be a list")
            spans = []
            for k, ent in enumerate(entities):
                if (
                    not isinstance(ent, dict)
                    or not is_integer(ent.get("start"))
                    or not is_integer(ent.get("end"))
                    or not isinstance(ent.get("type"), str)
                ):
                    raise DataError(
                        f"{where}: entities[{k}] must be {{'start': int, 'end': int, 'type': str}}"
                    )
                spans.append(Span(ent["start"], ent["end"], ent["type"]))
        group = obj.get("group")
        return cls(
            id=str(doc_id),
            text=text,
            topics=list(topics) if topics is not None else None,
            entities=spans,
            group=str(group) if group is not None else None,
        )


def id_and_text(obj: dict, where: str) -> tuple[str | int, str]:
    """A JSON document's `id` (a string or an integer, as given) and `text`, or DataError naming the field."""
    if "id" not in obj:
        raise DataError(f"{where}: field 'id' is missing")
    if not (isinstance(obj["id"], str) or is_integer(obj["id"])):
        raise DataError(f"{where}: field 'id' must be a string or an integer")
    return obj["id"], text_field(obj, where)


def text_field(obj: dict, where: str) -> str:
    """A JSON document's `text`, or DataError naming the field."""
    if not isinstance(obj.get("text"), str):
        raise DataError(f"{where}: field 'text' must be a string")
    return obj["text"]


def unpaired_surrogate(value: str) -> int | None:
    """Index of the first lone surrogate in `value`, or None. JSON may carry one (\\ud800), but
    neither the tokenizer nor UTF-8 output can take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


@contextlib.contextmanager
def utf8_only(where: str):
    """Reading inside this block: input that is not UTF-8 (newsroom files are often GBK) is a
    DataError naming `where` and the first bad byte."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 (byte 0x{err.object[err.start]:02x} cannot be decoded); convert it, "
                        f"e.g. iconv -f GBK -t UTF-8") from None


def check_encodable(value: object, field: str, where: str) -> None:
    """DataError naming `field` when the string `value` has a lone surrogate."""
    index = unpaired_surrogate(value) if isinstance(value, str) else None
    if index is not None:
        raise DataError(f"{where}: field {field!r} has an unpaired surrogate at index {index}")


def validate(
    doc: Document,
    *,
    topic_labels: Iterable[str] | None = None,
    entity_types: Iterable[str] | None = None,
    mentions: dict[Span, str] | None = None,
    where: str | None = None,
) -> Document:
    """Check a document's labels and return it, or raise DataError saying what is wrong.

    `topic_labels` / `entity_types`, when given, are the allowed label sets. `mentions` maps
    spans to the surface text the source claimed for them, so a span whose offsets do not pick
    out that text is caught.
    """
    where = where or f"document {doc.id!r}"
    check_encodable(doc.id, "id", where)
    check_encodable(doc.text, "text", where)
    labels = [("topics", topic) for topic in doc.topics or ()] + [("entities", span.type) for span in doc.entities or ()]
    for field, label in labels:
        if not label or label != label.strip():  # "" and " economy" would each become a label of their own
            raise DataError(f"{where}: label {label!r} is empty or has spaces around it")
        check_encodable(label, field, where)
    if doc.topics is not None:
        if len(set(doc.topics)) != len(doc.topics):
            raise DataError(f"{where}: duplicate topic in {doc.topics}")
        if topic_labels is not None:
            unknown = sorted(set(doc.topics) - set(topic_labels))
            if unknown:
                raise DataError(f"{where}: unknown topic {unknown[0]!r} (known: {sorted(topic_labels)})")
    if doc.entities is not None:
        allowed = set(entity_types) if entity_types is not None else None
        previous: Span | None = None
        for span in sorted(doc.entities):
            if not 0 <= span.start < span.end <= len(doc.text):
                raise DataError(
                    f"{where}: span [{span.start}, {span.end}) of type {span.type!r} is outside the "
                    f"text of length {len(doc.text)} or empty"
                )
            if allowed is not None and span.type not in allowed:
                raise DataError(f"{where}: unknown entity type {span.type!r} (known: {sorted(allowed)})")
            if mentions and span in mentions and doc.text[span.start : span.end] != mentions[span]:
                raise DataError(
                    f"{where}: span [{span.start}, {span.end}) covers "
                    f"{doc.text[span.start:span.end]!r} but the source says {mentions[span]!r}"
                )
            if previous is not None and span.start < previous.end:
                raise DataError(
                    f"{where}: spans [{previous.start}, {previous.end}) {previous.type!r} and "
                    f"[{span.start}, {span.end}) {span.type!r} overlap"
                )
            previous = span
    return doc


def json_object(line: str, where: str) -> dict:
    """One JSON line as an object, or DataError naming `where` and what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise DataError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_jsonl(documents: Iterable[Document], path: str | Path) -> int:
    """Write documents in the internal format to `path` ('-': standard output); returns how many."""
    count = 0
    with contextlib.nullcontext(sys.stdout) if str(path) == "-" else open(path, "w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps(doc.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count
