"""Feedback: the store (round trip, idempotency, concurrent writers), its export, and POST /v1/feedback."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy.exc
from fastapi.testclient import TestClient

from newstagger.cli import main
from newstagger.documents import Document, Span
from serving.app import create_app
from serving.settings import ServeSettings
from training.data import read_internal
from training.feedback import Correction, CorrectionConflict, FeedbackStore

CLIENTS = 8
WAIT_S = 60  # generous upper bound for the tiny model to load
TEXT = "张三在青澜市环保局工作。"
CORRECTION = {"id": "story-1", "text": TEXT, "topics": ["ecology"], "sender": "editor-li",
              "entities": [{"start": 0, "end": 2, "type": "name"}, {"start": 3, "end": 8, "type": "government"}]}


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'feedback.db'}"


def document(doc_id: str, text: str = TEXT, **labels) -> Document:
    return Document(id=doc_id, text=text, **labels)


def test_export_round_trips_the_latest_revision_of_each_document(url, tmp_path, capsys):
    store = FeedbackStore(url)
    assert store.add(Correction(document("b", topics=["economy"]), sender="li"))
    assert store.add(Correction(document("a", topics=[], entities=[Span(3, 8, "government"), Span(0, 2, "name")]),
                                sender="wang", model_version="1.0.0"))
    assert store.add(Correction(document("b", topics=["ecology"], entities=[]), sender="li", revision=2))

    assert main(["feedback", "export", "--store", url, "--output", str(tmp_path / "out.jsonl")]) == 0
    exported = read_internal(tmp_path / "out.jsonl")
    assert [doc.to_dict() for doc in exported] == [
        # [] (labelled, no topic) and absent (not labelled) survive the trip; spans come out sorted
        {"id": "a", "text": TEXT, "topics": [], "entities": [{"start": 0, "end": 2, "type": "name"},
                                                             {"start": 3, "end": 8, "type": "government"}]},
        {"id": "b", "text": TEXT, "topics": ["ecology"], "entities": []},
    ]
    assert store.count() == 3

    capsys.readouterr()
    assert main(["feedback", "export", "--store", url, "--output", "-"]) == 0
    printed = capsys.readouterr()
    assert printed.out == (tmp_path / "out.jsonl").read_text(encoding="utf-8") and "wrote 2 documents" in printed.err


def test_a_revision_that_corrects_one_task_keeps_the_other_tasks_earlier_correction(url):
    store = FeedbackStore(url)
    names = [Span(0, 2, "name")]
    store.add(Correction(document("a", entities=names), sender="li"))
    store.add(Correction(document("a", topics=["ecology"]), sender="wang", revision=2))
    store.add(Correction(document("b", entities=names), sender="li"))
    store.add(Correction(document("b", text="李四到任。", topics=["economy"]), sender="li", revision=2))
    a, b = store.latest_documents()
    assert (a.topics, a.entities) == (["ecology"], names)
    assert (b.text, b.topics, b.entities) == ("李四到任。", ["economy"], None)  # an edited story: only its own labels


def test_a_resent_correction_is_stored_once_and_a_changed_one_is_a_conflict(url):
    store = FeedbackStore(url)
    correction = Correction(document("a", topics=["ecology"]), sender="li")
    assert store.add(correction) is True
    assert store.add(correction) is False
    both = Correction(document("b", topics=["ecology", "economy"]), sender="li")
    assert store.add(both) is True
    assert store.add(Correction(document("b", topics=["economy", "ecology"]), sender="li")) is False  # same labels
    with pytest.raises(CorrectionConflict, match="higher revision"):
        store.add(Correction(document("a", topics=["economy"]), sender="li"))
    assert store.count() == 2


def test_concurrent_writers_store_every_correction_exactly_once(url):
    """Each client has its own connection pool, as separate server workers would; half of what
    each sends is also sent by every other client."""
    FeedbackStore(url)

    def client(k: int) -> list[bool]:
        store = FeedbackStore(url)
        return [store.add(Correction(document(f"shared-{i}" if i % 2 else f"client{k}-{i}", topics=[]),
                                     sender=f"client{k}")) for i in range(20)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        stored = [flag for flags in pool.map(client, range(CLIENTS)) for flag in flags]
    expected = CLIENTS * 10 + 10
    assert sum(stored) == expected
    assert FeedbackStore(url).count() == expected


def test_the_database_is_in_wal_mode(url):
    with FeedbackStore(url).engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


NO_PYMYSQL = pytest.mark.skipif(importlib.util.find_spec("pymysql") is not None,
                                reason="checks a driver that is not installed, and pymysql is")


@pytest.mark.parametrize("store, message", [
    ("sqlite:///{tmp}/nope.db", "no feedback database"),
    ("sqlite:///{tmp}/broken.db", "cannot open sqlite:///"),
    ("postgresql+nosuchdriver://localhost/x", "Can't load plugin"),
    pytest.param("mysql+pymysql://localhost/x",
                 "the database driver for mysql+pymysql is not installed (no module 'pymysql')", marks=NO_PYMYSQL),
    ("not a url", "Could not parse SQLAlchemy URL"),
    ("sqlite:///{tmp}/other.db", "its 'corrections' table has no created, doc_id"),
    ("sqlite:///{tmp}/empty.db", "no 'corrections' table: not a newstagger feedback store"),
])
def test_export_from_an_unusable_store_is_a_usage_error(tmp_path, capsys, store, message):
    (tmp_path / "broken.db").write_text("not a database")
    with sqlite3.connect(tmp_path / "other.db") as other:  # another tool's database
        other.execute("CREATE TABLE corrections (id INTEGER, note TEXT)")
    sqlite3.connect(tmp_path / "empty.db").close()
    code = main(["feedback", "export", "--store", store.format(tmp=tmp_path), "-o", str(tmp_path / "x")])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("newstagger feedback: error: --store: ") and message in line


def test_export_over_its_own_database_is_refused(url, tmp_path, capsys):
    FeedbackStore(url).add(Correction(Document("a", "滨江市", topics=["economy"]), sender="t"))
    assert main(["feedback", "export", "--store", url, "-o", url.removeprefix("sqlite:///")]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert FeedbackStore(url).count() == 1


@pytest.mark.parametrize("url", ["postgresql+nosuchdriver://localhost/x",
                                 pytest.param("mysql+pymysql://localhost/x", marks=NO_PYMYSQL), "not a url"])
def test_the_server_refuses_a_store_url_it_could_never_open(url):
    with pytest.raises(ValueError, match="feedback_url"):
        ServeSettings(feedback_url=url)


# --- POST /v1/feedback ------------------------------------------------------------------------------


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + WAIT_S
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the model never loaded"
        time.sleep(0.01)


@pytest.fixture
def client(tiny_model_dir, url):
    with TestClient(create_app(ServeSettings(model=tiny_model_dir, feedback_url=url, max_text_chars=100))) as client:
        wait_ready(client)  # labels are checked against the serving model
        yield client


def test_a_correction_is_201_then_200_when_resent(client, url):
    first = client.post("/v1/feedback", json=CORRECTION | {"model_version": "1.0.0"})
    assert first.status_code == 201
    assert first.json() == {"id": "story-1", "revision": 1, "stored": True, "model_version": "1.0.0"}
    again = client.post("/v1/feedback", json=CORRECTION | {"sender": "wang", "model_version": "2.0.0"})
    # what is stored, from the first sender: the answer describes that, not this request
    assert again.status_code == 200 and again.json() == {**first.json(), "stored": False}
    [stored] = FeedbackStore(url).latest_documents()
    assert stored.to_dict() == {k: v for k, v in CORRECTION.items() if k != "sender"}


@pytest.mark.parametrize("host, token, warned", [("0.0.0.0", None, True), ("127.0.0.1", None, False),
                                                 ("0.0.0.0", "editors", False)])
def test_a_server_open_beyond_this_machine_without_a_feedback_token_says_so(tiny_model_dir, url, caplog, host,
                                                                           token, warned):
    with TestClient(create_app(ServeSettings(model=tiny_model_dir, feedback_url=url, host=host,
                                             feedback_token=token))):
        pass
    assert ("set NEWSTAGGER_FEEDBACK_TOKEN" in caplog.text) == warned


def test_with_a_feedback_token_only_its_holders_can_send_corrections(tiny_model_dir, url):
    settings = ServeSettings(model=tiny_model_dir, feedback_url=url, feedback_token="editors")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = client.post("/v1/feedback", json=CORRECTION, headers=headers)
            assert refused.status_code == 401 and refused.json()["errors"][0]["loc"] == ["header", "Authorization"]
        assert FeedbackStore(url).count() == 0
        accepted = client.post("/v1/feedback", json=CORRECTION, headers={"Authorization": "Bearer editors"})
        assert accepted.status_code == 201


def test_the_model_version_defaults_to_the_one_serving(client):
    response = client.post("/v1/feedback", json=CORRECTION)
    assert response.json()["model_version"] == "0.0.1"


def test_a_label_the_model_does_not_know_is_422_unless_marked_new(client):
    """A typo caught now, not when it stops every later retraining."""
    typos = client.post("/v1/feedback", json=CORRECTION | {"topics": ["ecolgy"],
                                                           "entities": [{"start": 0, "end": 2, "type": "nmae"}]})
    assert typos.status_code == 422
    assert [error["loc"] for error in typos.json()["errors"]] == [["body", "topics", 0], ["body", "entities", 0, "type"]]
    assert "set new_labels" in typos.json()["errors"][0]["msg"]
    coarse = CORRECTION | {"id": "story-2", "entities": [{"start": 0, "end": 2, "type": "PER"}]}
    assert client.post("/v1/feedback", json=coarse).status_code == 201  # trains `name` as a partial label
    assert client.post("/v1/feedback", json=CORRECTION | {"id": "story-3", "topics": ["culture"],
                                                          "new_labels": True}).status_code == 201


def test_many_unknown_labels_are_one_bounded_422(client):
    """Each unknown label is an error, and the answer lists 20 of them (uncapped, 40,000 unknown topics held
    the event loop for 30 s in a list scan per label; now 1,000 is the most a correction may name)."""
    topics = [f"topic-{i}" for i in range(1000)]
    response = client.post("/v1/feedback", json=CORRECTION | {"topics": topics})
    assert response.status_code == 422
    assert len(response.json()["errors"]) == 20 and "(1000 errors in all)" in response.json()["detail"]


def test_the_same_revision_with_other_labels_is_409(client):
    assert client.post("/v1/feedback", json=CORRECTION).status_code == 201
    response = client.post("/v1/feedback", json=CORRECTION | {"topics": ["economy"]})
    assert response.status_code == 409
    assert response.json()["errors"][0]["loc"] == ["body", "revision"]
    assert client.post("/v1/feedback", json=CORRECTION | {"topics": ["economy"], "revision": 2}).status_code == 201


@pytest.mark.parametrize("change, loc", [
    ({"entities": [{"start": 5, "end": 50, "type": "name"}]}, ["body", "entities"]),
    ({"entities": [{"start": 0, "end": 3, "type": "name"}, {"start": 2, "end": 4, "type": "name"}]},
     ["body", "entities"]),
    ({"entities": [{"start": 0, "end": 2}]}, ["body", "entities", 0, "type"]),
    ({"topics": ["ecology", "ecology"]}, ["body", "topics"]),
    ({"topics": "ecology"}, ["body", "topics"]),
    ({"topics": [""]}, ["body", "topics", 0]),
    ({"topics": None, "entities": None}, ["body"]),
    ({"sender": ""}, ["body", "sender"]),
    ({"revision": 0}, ["body", "revision"]),
    ({"revision": 2**63}, ["body", "revision"]),  # past the store's integer column: was a 500
    ({"id": None}, ["body", "id"]),
    ({"colour": "red"}, ["body", "colour"]),
    # Names, not texts: each is stored, so each is bounded.
    ({"topics": [f"t{i}" for i in range(1001)], "new_labels": True}, ["body", "topics"]),
    ({"topics": ["t" * 201], "new_labels": True}, ["body", "topics", 0]),
    ({"entities": [{"start": i, "end": i + 1, "type": f"t{i}"} for i in range(1001)], "new_labels": True},
     ["body", "entities"]),
    ({"entities": ["not even a span"] * 5001}, ["body", "entities"]),  # counted before its items are read
    ({"sender": "s" * 201}, ["body", "sender"]),
    ({"model_version": "v" * 201}, ["body", "model_version"]),
    ({"id": "i" * 201}, ["body", "id"]),
    ({"id": 10**201}, ["body", "id"]),
    ({"id": "a1 "}, ["body", "id"]),  # would be a second story beside "a1"
    ({"id": "   "}, ["body", "id"]),
    # offsets counted in UTF-16 (two units for 𠀀), caught by the entity's text
    ({"text": "𠀀张三在上海工作", "entities": [{"start": 2, "end": 4, "type": "name", "text": "张三"}]},
     ["body", "entities"]),
    ({"text": "张三  在上海", "entities": [{"start": 2, "end": 4, "type": "name"}]}, ["body", "entities", 0]),
    ({"text": "张三 在上海", "entities": [{"start": 0, "end": 3, "type": "name"}]}, ["body", "entities", 0]),
])
def test_bad_corrections_are_422_naming_the_field(client, change, loc):
    response = client.post("/v1/feedback", json=CORRECTION | change)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == loc


def test_an_entity_as_tag_returned_it_can_be_sent_back(client):
    tagged = [{"start": 0, "end": 2, "type": "name", "text": "张三", "score": 0.97},
              {"start": 3, "end": 8, "type": "government", "text": "青澜市环保局", "score": 0.88}]
    assert client.post("/v1/feedback", json=CORRECTION | {"entities": tagged}).status_code == 422  # 青澜市环保局 is [3, 9)
    tagged[1] |= {"end": 9}
    assert client.post("/v1/feedback", json=CORRECTION | {"entities": tagged}).status_code == 201


def test_a_missing_sender_is_422(client):
    response = client.post("/v1/feedback", json={k: v for k, v in CORRECTION.items() if k != "sender"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "sender"]


def test_a_text_over_the_limit_is_413(client):
    response = client.post("/v1/feedback", json=CORRECTION | {"text": "字" * 101, "entities": []})
    assert response.status_code == 413
    assert response.json()["errors"][0]["loc"] == ["body", "text"]


def test_an_unusable_store_is_503_and_the_server_keeps_serving_and_logs_no_story(tiny_model_dir, tmp_path, caplog):
    (tmp_path / "broken.db").write_text("not a database")
    settings = ServeSettings(model=tiny_model_dir, feedback_url=f"sqlite:///{tmp_path / 'broken.db'}")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        response = client.post("/v1/feedback", json=CORRECTION)
        assert response.status_code == 503
        detail = response.json()["detail"]
        assert "feedback store is unavailable" in detail and "\n" not in detail and "[SQL" not in detail
        assert client.get("/healthz").status_code == 200
    assert "feedback store error: DatabaseError: file is not a database" in caplog.text
    assert CORRECTION["text"] not in caplog.text and "[SQL" not in caplog.text


def test_the_server_refuses_a_sqlite_store_it_could_never_write(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"(?s)feedback_url.*a-file/feedback.db cannot be written in .*a-file"):
        ServeSettings(feedback_url=f"sqlite:///{tmp_path / 'a-file' / 'feedback.db'}")
    (tmp_path / "read-only.db").write_text("")
    (tmp_path / "read-only.db").chmod(0o444)
    if not os.access(tmp_path / "read-only.db", os.W_OK):  # root may write it anyway
        with pytest.raises(ValueError, match="read-only.db is not a file this server can write"):
            ServeSettings(feedback_url=f"sqlite:///{tmp_path / 'read-only.db'}")


def test_the_default_store_where_it_cannot_be_written_is_a_warning_not_a_refusal(tmp_path, monkeypatch, caplog):
    """The default is relative to where the server starts, which may be a folder it cannot write;
    a server only tagging must still start."""
    (tmp_path / "a-file").write_text("")
    unwritable = f"sqlite:///{tmp_path / 'a-file' / 'feedback.db'}"
    monkeypatch.setattr("serving.settings.DEFAULT_FEEDBACK_URL", unwritable)
    ServeSettings(feedback_url=unwritable)
    assert "cannot be written in" in caplog.text and "set NEWSTAGGER_FEEDBACK_URL" in caplog.text


def test_a_value_the_database_cannot_hold_is_422_not_a_503_to_retry(client, monkeypatch):
    def refuse(self, correction):  # PostgreSQL on a NUL character
        raise sqlalchemy.exc.DataError("INSERT INTO corrections ...", {"text": "..."},
                                       ValueError("PostgreSQL text fields cannot contain NUL (0x00) bytes"))

    monkeypatch.setattr(FeedbackStore, "add", refuse)
    response = client.post("/v1/feedback", json=CORRECTION | {"text": TEXT.replace("。", "\x00")})
    assert response.status_code == 422 and "Retry-After" not in response.headers
    assert response.json()["detail"] == ("body: the feedback store cannot hold this correction: PostgreSQL text fields "
                                         "cannot contain NUL (0x00) bytes")


def test_the_store_is_closed_when_the_server_stops(tiny_model_dir, url):
    with TestClient(create_app(ServeSettings(model=tiny_model_dir, feedback_url=url))) as client:
        wait_ready(client)
        assert client.post("/v1/feedback", json=CORRECTION).status_code == 201
        store = client.app.state.feedback_store
        assert store.engine.pool.checkedin() == 1
    assert store.engine.pool.checkedin() == 0


def test_eight_concurrent_clients_have_every_correction_stored_exactly_once(client, url):
    def send(k: int) -> list[int]:
        statuses = []
        for i in range(6):
            doc_id = f"shared-{i}" if i % 2 else f"client{k}-{i}"
            body = CORRECTION | {"id": doc_id, "sender": f"client{k}"}
            statuses.append(client.post("/v1/feedback", json=body).status_code)
        return statuses

    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = [status for result in pool.map(send, range(CLIENTS)) for status in result]
    assert set(statuses) <= {200, 201}
    assert statuses.count(201) == CLIENTS * 3 + 3
    assert FeedbackStore(url).count() == CLIENTS * 3 + 3


def test_without_a_serving_model_only_a_correction_marked_new_labels_is_stored(tmp_path, url):
    """No model to check labels against: 503, so a typo cannot slip in while the model loads."""
    with TestClient(create_app(ServeSettings(model=tmp_path / "missing", feedback_url=url))) as client:
        deadline = time.monotonic() + WAIT_S
        while "failed to load" not in client.get("/readyz").text:
            assert time.monotonic() < deadline, "the model load never failed"
            time.sleep(0.01)
        assert client.post("/v1/feedback", json=CORRECTION).status_code == 503
        assert client.post("/v1/feedback", json=CORRECTION | {"new_labels": True}).status_code == 201

