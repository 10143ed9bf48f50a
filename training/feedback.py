"""Editors' corrections: stored as they arrive (`POST /v1/feedback`), exported as training data.

One row per (document id, revision), with who sent it, when, and which model version made the
prediction being corrected. Storing is insert-or-ignore on that pair, so a client may retry a
request safely; the same pair with a different document is a conflict, never an overwrite.

SQLite by default (one file in WAL mode, so readers never block the writer, with a busy timeout
so concurrent writers wait their turn instead of failing); any SQLAlchemy URL works, e.g.
`postgresql+psycopg://user@host/newstagger`.

`newstagger feedback export` writes the latest correction of each document as internal JSONL, ready
for `newstagger retrain` (a task the latest revision leaves null comes from the latest revision that
corrected it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON, BigInteger, Column, DateTime, Integer, MetaData, String, Table, Text, UniqueConstraint, create_engine, event,
    func, inspect, select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError
from sqlalchemy.schema import CreateTable

from newstagger.documents import Document, Span, write_jsonl
from newstagger.errors import UsageError

DEFAULT_URL = "sqlite:///feedback.db"
URL_VARIABLE = "NEWSTAGGER_FEEDBACK_URL"
SQLITE_BUSY_TIMEOUT_MS = 30_000

metadata = MetaData()
corrections = Table(
    "corrections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("doc_id", String, nullable=False),
    Column("revision", BigInteger, nullable=False),  # revisions go up to 2**63 - 1
    Column("text", Text, nullable=False),
    Column("topics", JSON, nullable=True),  # NULL: not labelled for topics, unlike [] (labelled, none)
    Column("entities", JSON, nullable=True),
    Column("model_version", String, nullable=True),
    Column("sender", String, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    UniqueConstraint("doc_id", "revision", name="uq_corrections_doc_revision"),
)


class CorrectionConflict(ValueError):
    """This document id and revision are already stored with a different document."""


@dataclass(frozen=True)
class Correction:
    document: Document
    sender: str
    revision: int = 1
    model_version: str | None = None


def default_url() -> str:
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL


def check_store_url(url: str) -> URL:
    """`url` parsed, or ValueError saying why it cannot name a store: not an SQLAlchemy URL, or its
    database driver is not installed (found at start-up rather than at the first correction)."""
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except ArgumentError as err:
        raise ValueError(str(err)) from None
    except ImportError as err:
        raise ValueError(f"the database driver for {parsed.drivername} is not installed "
                         f"(no module {err.name!r})") from None
    return parsed


def check_sqlite_writable(url: URL) -> None:
    """ValueError where a SQLite store could never be written (a read-only mount, a folder of another
    user, a path under /proc): found at start-up rather than at every correction for as long as the
    server runs. Other databases are checked when first used: one may be down for a while."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database).absolute()
    if path.exists() and not (path.is_file() and os.access(path, os.W_OK)):
        raise ValueError(f"{path} is not a file this server can write")
    # where SQLite makes its -wal and -shm files beside the database, or the first folder to make
    made_in = next(folder for folder in path.parents if folder.exists())
    try:
        tempfile.TemporaryFile(dir=made_in).close()
    except OSError as err:
        raise ValueError(f"{path} cannot be written in {made_in}: {err.strerror}") from None


class FeedbackStore:
    def __init__(self, url: str = DEFAULT_URL, *, create: bool = True):
        """Open the store, creating its table where there is none; with `create=False` (reading
        someone's database) a missing or different `corrections` table is a ValueError instead."""
        self.engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database
            if create and database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if not create:
            self._check_table()
            return
        with self.engine.begin() as connection:
            # IF NOT EXISTS: several server workers may open the same new database at once.
            connection.execute(CreateTable(corrections, if_not_exists=True))

    def _check_table(self) -> None:
        inspector = inspect(self.engine)
        if not inspector.has_table(corrections.name):
            raise ValueError(f"no '{corrections.name}' table: not a newstagger feedback store")
        missing = set(corrections.columns.keys()) - {c["name"] for c in inspector.get_columns(corrections.name)}
        if missing:
            raise ValueError(f"its '{corrections.name}' table has no {', '.join(sorted(missing))}: not a newstagger "
                             f"feedback store")

    def add(self, correction: Correction) -> bool:
        """Store a correction: True if stored now, False if this exact one was stored before.

        Raises CorrectionConflict when its id and revision are stored with another document.
        """
        row = _row(correction.document)
        try:
            with self.engine.begin() as connection:
                connection.execute(corrections.insert().values(
                    **row, revision=correction.revision, sender=correction.sender,
                    model_version=correction.model_version, created=datetime.now(timezone.utc)))
            return True
        except IntegrityError:
            pass  # the unique (doc_id, revision) pair: stored before, by this client or another
        with self.engine.connect() as connection:
            stored = dict(connection.execute(
                select(corrections.c.text, corrections.c.topics, corrections.c.entities).where(
                    corrections.c.doc_id == row["doc_id"], corrections.c.revision == correction.revision)
            ).one()._mapping)
        if stored != {k: row[k] for k in ("text", "topics", "entities")}:
            raise CorrectionConflict(
                f"document {row['doc_id']!r} revision {correction.revision} is already stored with other "
                f"content; send the new content as a higher revision")
        return False

    def recorded_model_version(self, doc_id: str, revision: int) -> str | None:
        """The model version stored with a correction (the one whose prediction it corrected)."""
        with self.engine.connect() as connection:
            return connection.execute(select(corrections.c.model_version).where(
                corrections.c.doc_id == doc_id, corrections.c.revision == revision)).scalar_one()

    def close(self) -> None:
        """Close the pooled connections (a server shutting down)."""
        self.engine.dispose()

    def count(self) -> int:
        """Stored corrections, every revision counted."""
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(corrections)).scalar_one()

    def latest_documents(self) -> list[Document]:
        """The latest correction of every document, ordered by document id: its latest revision, with a
        task that revision left uncorrected (null) taken from the latest earlier revision of the same
        text that corrected it, so correcting the topics later never erases an entity correction."""
        query = (select(corrections.c.doc_id, corrections.c.text, corrections.c.topics, corrections.c.entities)
                 .order_by(corrections.c.doc_id, corrections.c.revision.desc()))
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        latest: dict[str, dict] = {}
        for row in rows:  # newest revision of each document first
            merged = latest.setdefault(row.doc_id, {"text": row.text, "topics": None, "entities": None})
            if row.text == merged["text"]:
                for task in ("topics", "entities"):
                    if merged[task] is None:
                        merged[task] = getattr(row, task)
        return [Document(id=doc_id, text=doc["text"], topics=doc["topics"],
                         entities=None if doc["entities"] is None else [Span(**e) for e in doc["entities"]])
                for doc_id, doc in latest.items()]

def _row(document: Document) -> dict:
    """The stored form: labels in a fixed order, so a resent correction matches whatever order it lists them in."""
    topics = None if document.topics is None else sorted(document.topics)
    entities = None if document.entities is None else [span.to_dict() for span in sorted(document.entities)]
    return {"doc_id": document.id, "text": document.text, "topics": topics, "entities": entities}


def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


# --------------------------------------------------------------------------- command line


def register(subparsers) -> None:
    parser = subparsers.add_parser("feedback", help="corrections sent to POST /v1/feedback")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write the latest revision of each corrected story as training JSONL")
    export.add_argument("--store", default=None,
                        help=f"database URL (default: ${URL_VARIABLE}, else {DEFAULT_URL})")
    export.add_argument("--output", "-o", required=True, help="JSONL file to write (internal format), or - for stdout")
    export.set_defaults(handler=run_export)


def run_export(args) -> int:
    from newstagger.cli import refuse_overwriting

    url = args.store or default_url()
    try:
        parsed = check_store_url(url)
    except ValueError as err:
        raise UsageError(f"--store: {err}") from None
    if parsed.get_backend_name() == "sqlite":
        if not Path(parsed.database or "").is_file():
            raise UsageError(f"--store: no feedback database at {parsed.database or 'an in-memory URL'}")
        refuse_overwriting(args.output, [parsed.database])
    try:
        store = FeedbackStore(url, create=False)
    except DatabaseError as err:  # unreachable server, a file that is not a database, ...
        raise UsageError(f"--store: cannot open {parsed.render_as_string()}: {err.orig}") from None
    except ValueError as err:
        raise UsageError(f"--store: {parsed.render_as_string()}: {err}") from None
    written = write_jsonl(store.latest_documents(), args.output)
    print(f"wrote {written} documents ({store.count()} corrections stored) to {args.output}",
          file=sys.stderr if args.output == "-" else sys.stdout)
    return 0
