"""Label schema: which topics and entity types a model knows, and how its BIO tags are laid out.

The label sets come from the training data, never from code; the one default is the coarse
PER/LOC/ORG view of CLUENER's types (DEFAULT_COARSE), for data that does not say otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .checks import is_string_list
from .documents import Document, validate

# How the fine types roll up into the coarse view editors and MSRA-style data use.
DEFAULT_COARSE = {
    "name": "PER",
    "address": "LOC",
    "scene": "LOC",
    "organization": "ORG",
    "government": "ORG",
    "company": "ORG",
    "PER": "PER",
    "LOC": "LOC",
    "ORG": "ORG",
}


def the_model_knows(labels: list[str], kind: str) -> str:
    """How a message about an unknown label ends: the labels of this `kind` (plural: "topics") the
    model knows, or that it has none, where a list would read "[]"."""
    return f"the model knows {labels}" if labels else f"the model has no {kind}"


@dataclass
class LabelSchema:
    topics: list[str] = field(default_factory=list)
    entity_types: list[str] = field(default_factory=list)
    coarse: dict[str, str] = field(default_factory=dict)

    @property
    def tags(self) -> list[str]:
        """BIO tags: "O" first, then B-/I- per type, so tag ids follow from the type order."""
        tags = ["O"]
        for entity_type in self.entity_types:
            tags += [f"B-{entity_type}", f"I-{entity_type}"]
        return tags

    def extends(self, older: "LabelSchema") -> bool:
        """Whether this schema keeps the older one's labels, in order, and only appends: a model on
        it can be compared with (and grown from) one on the older schema, label ids unchanged."""
        return (self.topics[: len(older.topics)] == older.topics
                and self.entity_types[: len(older.entity_types)] == older.entity_types)

    @property
    def coarse_only_types(self) -> set[str]:
        """Coarse types (PER) that finer head types (name) roll up to: spans of these types are
        partial labels, meaning "one of the finer types", not types of their own."""
        return {c for t, c in self.coarse.items() if c != t} - set(self.entity_types)

    @property
    def scorable_entity_types(self) -> set[str]:
        """Entity types gold data may use against this schema: its own, and the coarse ones they roll up to."""
        return set(self.entity_types) | self.coarse_only_types

    def check_known(self, documents: Iterable[Document], where: str) -> None:
        """DataError at the first document using a label this schema does not know. In data a model is
        scored on (validation, gold), such a label is more often a typo than a test: it would count as
        a miss for every model alike, and as a class no training example taught."""
        for doc in documents:
            validate(doc, topic_labels=self.topics, entity_types=self.scorable_entity_types,
                     where=f"{where}: document {doc.id!r}")

    @classmethod
    def from_documents(cls, documents: Iterable[Document]) -> "LabelSchema":
        """The labels the documents use; where fine and coarse data are mixed (CLUENER + MSRA),
        the coarse types stay out of the head (see `coarse_only_types`)."""
        topics: set[str] = set()
        types: set[str] = set()
        for doc in documents:
            topics.update(doc.topics or ())
            types.update(span.type for span in doc.entities or ())
        types -= {DEFAULT_COARSE[t] for t in types if DEFAULT_COARSE.get(t, t) != t}
        return cls(
            topics=sorted(topics),
            entity_types=sorted(types),
            coarse={t: DEFAULT_COARSE[t] for t in sorted(types) if t in DEFAULT_COARSE},
        )

    def merged_with(self, other: "LabelSchema") -> "LabelSchema":
        """This schema with the other's new labels appended, so existing label ids stay put."""
        new_types = [t for t in other.entity_types if t not in self.entity_types and t not in self.coarse_only_types]
        return LabelSchema(
            topics=self.topics + [t for t in other.topics if t not in self.topics],
            entity_types=self.entity_types + new_types,
            coarse={**{t: c for t, c in other.coarse.items() if t not in self.coarse_only_types}, **self.coarse},
        )

    def new_labels(self, data: "LabelSchema") -> dict[str, list[str]]:
        """The topics and entity types training on `data` would add to a model on this schema (coarse
        PER/LOC/ORG data adds nothing to a model with finer types: it trains them as partial labels)."""
        grown = self.merged_with(data)
        return {"topics": grown.topics[len(self.topics):], "entity_types": grown.entity_types[len(self.entity_types):]}

    def to_dict(self) -> dict:
        return {"topics": self.topics, "entity_types": self.entity_types, "coarse": self.coarse}

    @classmethod
    def from_dict(cls, obj: dict) -> "LabelSchema":
        if not isinstance(obj, dict) or not is_string_list(obj.get("topics", [])) \
                or not is_string_list(obj.get("entity_types", [])) \
                or not isinstance(obj.get("coarse", {}), dict):
            raise ValueError("schema must be an object with lists of strings 'topics' and 'entity_types' "
                             "and an object 'coarse'")
        return cls(
            topics=list(obj.get("topics", [])),
            entity_types=list(obj.get("entity_types", [])),
            coarse=dict(obj.get("coarse", {})),
        )
