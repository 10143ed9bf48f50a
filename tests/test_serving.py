"""The HTTP service: contract, every error case, batching, reload, operations, and `serve`.

Tests that need the model busy block its worker thread on an Event inside `tag`, so what is
queued, batched or refused is decided by the test, never by timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import os
import sys
import threading
import time
from types import SimpleNamespace
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny_model_folder
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import newstagger
from newstagger import cli
from newstagger import model as model_module
from newstagger.errors import UsageError
from newstagger.model import load_model_folder, save_model_folder
from newstagger.tagger import Tagger
from serving import app as app_module
from serving import command
from serving.app import create_app
from serving.batching import Abandoned, Overloaded, ShuttingDown
from serving.observability import TextLogFormatter, log_value
from serving.settings import ServeSettings
from serving.schemas import MAX_ERRORS, TagResponse

STORIES = ["杭州市西湖区今天开展垃圾分类宣传活动。", "市政府召开新闻发布会，介绍今年的民生工程。", "张三在上海工作。"]
WAIT_S = 60  # generous upper bound for conditions that hold within milliseconds


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No NEWSTAGGER_* variable leaks into these tests, nor out of them (`serve` sets some)."""
    for name in [n for n in os.environ if n.startswith("NEWSTAGGER_")]:
        monkeypatch.delenv(name)
    yield
    for name in [n for n in os.environ if n.startswith("NEWSTAGGER_")]:
        del os.environ[name]


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def started(app) -> TestClient:
    client = TestClient(app).__enter__()
    wait_for(lambda: client.get("/readyz").status_code == 200, "the model to load")
    return client


@pytest.fixture
def make_client(tiny_model_dir):
    """Ready clients on apps with these settings overrides; stopped after the test."""
    clients = []

    def make(**overrides) -> TestClient:
        clients.append(started(create_app(ServeSettings(**{"model": tiny_model_dir, **overrides}))))
        return clients[-1]

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    client = started(create_app(ServeSettings(model=tiny_model_dir)))
    yield client
    client.__exit__(None, None, None)


def documents(*texts: str) -> dict:
    return {"documents": [{"id": i, "text": text} for i, text in enumerate(texts)]}


class Gate:
    """Wraps the serving tagger's `tag` so a batch can be held in the model until released."""

    def __init__(self, client: TestClient, fail_on: str | None = None):
        self.tagger = client.app.state.service.batcher.tagger
        self.original = self.tagger.tag
        self.fail_on = fail_on
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        self.tagger.tag = self._tag

    def _tag(self, texts, **options):
        self.calls.append(list(texts))
        self.entered.set()
        assert self.release.wait(WAIT_S), "the test never released the gate"
        if self.fail_on and any(self.fail_on in text for text in texts):
            raise RuntimeError("the model broke")
        return self.original(texts, **options)


def queue_depth(client: TestClient) -> int:
    return client.app.state.service.batcher._waiting


# --- contract -------------------------------------------------------------------------------------

def test_results_are_the_tag_command_output_in_request_order(client, tiny_model_dir, tmp_path):
    lines = [{"id": "a", "text": STORIES[0]}, {"id": 7, "text": STORIES[1]}, {"id": "c", "text": STORIES[2] * 20}]
    source, sink = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    assert cli.main(["tag", "--model", str(tiny_model_dir), "--input", str(source), "--output", str(sink)]) == 0
    expected = [json.loads(line) for line in sink.read_text(encoding="utf-8").splitlines()]

    response = client.post("/v1/tag", json={"documents": lines})

    assert response.status_code == 200
    assert response.json() == {"model": {"name": "tiny", "version": "0.0.1"}, "results": expected}


def test_thresholds_and_entity_types_apply_per_request(client, tiny_model_dir):
    thresholds = {"ecology": 0.0, "economy": 1.0}
    response = client.post("/v1/tag", json={**documents(*STORIES), "thresholds": thresholds,
                                             "entity_types": ["name", "address"], "entity_threshold": 0.2})

    assert response.status_code == 200
    results = [{k: v for k, v in r.items() if k != "id"} for r in response.json()["results"]]
    assert results == Tagger.load(tiny_model_dir).tag(STORIES, thresholds=thresholds, entity_types=["name", "address"],
                                                      entity_threshold=0.2)
    assert all("ecology" in r["labels"] and "economy" not in r["labels"] for r in results)
    assert all(e["score"] >= 0.2 for r in results for e in r["entities"])


def test_no_entity_types_means_no_entities(client):
    response = client.post("/v1/tag", json={**documents(*STORIES), "entity_types": []})
    assert [r["entities"] for r in response.json()["results"]] == [[], [], []]


@pytest.mark.parametrize("text", ["", "   \n\t ", "\x00\x01\x1f\x7f", "\u200b\ufeff"])
def test_texts_without_tokens_give_empty_entity_lists(client, text):
    response = client.post("/v1/tag", json=documents(text))
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert result["entities"] == [] and set(result["topics"]) == {"city_management", "ecology", "economy", "livelihood"}


@pytest.mark.parametrize("text", ["😀🎉", "🇨🇳 杭州 👍🏽", "a\u0301e\u0301", "\U0010ffff"])
def test_emoji_and_odd_unicode_are_tagged_without_error(client, text):
    response = client.post("/v1/tag", json=documents(text))
    assert response.status_code == 200
    for entity in response.json()["results"][0]["entities"]:
        assert 0 <= entity["start"] < entity["end"] <= len(text) and entity["text"] == text[entity["start"]:entity["end"]]


def test_info_describes_model_labels_thresholds_and_limits(make_client):
    info = make_client(max_documents=5).get("/v1/info").json()
    assert info["model"] | {"created": None} == {"name": "tiny", "version": "0.0.1", "base_model": "tiny-in-test",
                                                   "created": None, "max_length": 32, "stride": 8}
    assert info["labels"]["topics"] == ["city_management", "ecology", "economy", "livelihood"]
    assert "name" in info["labels"]["entity_types"] and info["labels"]["coarse"]["name"] == "PER"
    assert info["thresholds"] == dict.fromkeys(info["labels"]["topics"], 0.5)
    assert info["entity_threshold"] == 0.0
    assert info["limits"]["max_documents"] == 5
    assert info["limits"]["body_timeout_s"] == 30.0 and info["limits"]["max_connections"] is None
    assert info["server"]["version"] == newstagger.__version__ and info["server"]["backend"].startswith("torch ")


def test_openapi_documents_the_contract_and_its_errors(client):
    spec = client.get("/openapi.json").json()
    tag = spec["paths"]["/v1/tag"]["post"]
    assert set(tag["responses"]) >= {"200", "413", "415", "422", "429", "500", "503"}
    assert tag["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    request = spec["components"]["schemas"]["TagRequest"]
    assert set(request["properties"]) == {"documents", "thresholds", "entity_types", "entity_threshold"}
    assert all(field.get("description") for field in request["properties"].values())


# --- bad input: 4xx with a JSON body naming the field, never 5xx ----------------------------------

BAD_BODIES = [
    (b'{"documents": [', ["body"], "json_invalid"),
    (b"[]", ["body"], "model_attributes_type"),
    (b"", ["body"], "missing"),
    (b"{}", ["body", "documents"], "missing"),
    (b'{"documents": "text"}', ["body", "documents"], "list_type"),
    (b'{"documents": []}', ["body", "documents"], "too_short"),
    (b'{"documents": [{"text": "x"}]}', ["body", "documents", 0, "id"], "missing"),
    (b'{"documents": [{"id": true, "text": "x"}]}', ["body", "documents", 0, "id"], "id_type"),
    (b'{"documents": [{"id": 1.5, "text": "x"}]}', ["body", "documents", 0, "id"], "id_type"),
    (b'{"documents": [{"id": 1}]}', ["body", "documents", 0, "text"], "missing"),
    (b'{"documents": [{"id": 1, "text": 5}]}', ["body", "documents", 0, "text"], "string_type"),
    (b'{"documents": [{"id": 1, "text": null}]}', ["body", "documents", 0, "text"], "string_type"),
    (b'{"documents": [{"id": 1, "text": "\\ud800x"}]}', ["body", "documents", 0, "text"], "unpaired_surrogate"),
    (b'{"documents": [{"id": "\\udfff", "text": ""}]}', ["body", "documents", 0, "id"], "unpaired_surrogate"),
    (b'{"documents": [{"id": 1, "text": ""}], "threshold": 0.3}', ["body", "threshold"], "extra_forbidden"),
    (b'{"documents": [{"id": 1, "text": ""}], "thresholds": {"ecology": 1.5}}', ["body", "thresholds", "ecology"],
     "less_than_equal"),
    (b'{"documents": [{"id": 1, "text": ""}], "thresholds": {"ecology": "high"}}', ["body", "thresholds", "ecology"],
     "float_type"),
    (b'{"documents": [{"id": 1, "text": ""}], "thresholds": {"sport": 0.2}}', ["body", "thresholds", "sport"],
     "unknown_topic"),
    (b'{"documents": [{"id": 1, "text": ""}], "thresholds": {"\\ud800": 0.2}}',
     ["body", "thresholds"], "unpaired_surrogate"),  # pydantic makes the bad key itself printable
    (b'{"documents": [{"id": 1, "text": ""}], "entity_types": ["name", "weapon"]}', ["body", "entity_types", 1],
     "unknown_entity_type"),
    (b'{"documents": [{"id": 1, "text": ""}], "entity_types": "name"}', ["body", "entity_types"], "list_type"),
    (b'{"documents": [{"id": 1, "text": ""}], "entity_threshold": -0.1}', ["body", "entity_threshold"],
     "greater_than_equal"),
    (b'{"documents": [{"id": 1, "text": ""}], "entity_threshold": "0.5"}', ["body", "entity_threshold"], "float_type"),
]


@pytest.mark.parametrize("body, loc, kind", BAD_BODIES, ids=[case[0].decode()[:40] or "empty" for case in BAD_BODIES])
def test_bad_input_is_422_naming_the_field(client, body, loc, kind):
    response = client.post("/v1/tag", content=body, headers={"content-type": "application/json"})

    assert response.status_code == 422
    error = response.json()
    assert error["errors"][0]["loc"][: len(loc)] == loc and error["errors"][0]["type"] == kind
    assert error["detail"].startswith(".".join(map(str, loc)))


@pytest.mark.parametrize("body", [b'{"documents": [{"id": 1, "text": "\xff"}]}', b"[" * 100_000 + b"]" * 100_000])
def test_undecodable_json_is_422(client, body):
    response = client.post("/v1/tag", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body"] and response.json()["detail"].startswith("body: not valid JSON")


def test_a_body_that_is_not_json_is_422_naming_the_content_type(client):
    response = client.post("/v1/tag", content=b"documents=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["header", "Content-Type"]
    assert "send the body as JSON with Content-Type: application/json" in response.json()["detail"]


def test_the_server_answers_normally_after_every_bad_input(client):
    statuses = {client.post("/v1/tag", content=body, headers={"content-type": "application/json"}).status_code
                for body, _, _ in BAD_BODIES}
    assert statuses == {422}
    assert client.post("/v1/tag", json=documents(STORIES[0])).status_code == 200


def test_unknown_paths_and_methods_get_json_errors(client):
    assert client.get("/nowhere").json()["detail"] == "Not Found"
    slashed = client.post("/v1/tag/", json=documents("a"), follow_redirects=False)
    assert slashed.status_code == 404 and slashed.json()["detail"] == "Not Found"
    response = client.get("/v1/tag")
    assert response.status_code == 405 and "POST" in response.headers["allow"]


# --- limits ---------------------------------------------------------------------------------------

def test_too_many_documents_is_413(make_client):
    client = make_client(max_documents=2)
    response = client.post("/v1/tag", json=documents("a", "b", "c"))
    assert response.status_code == 413
    assert response.json()["errors"][0]["loc"] == ["body", "documents"]
    assert "at most 2" in response.json()["detail"]
    assert client.post("/v1/tag", json=documents("a", "b")).status_code == 200  # the limit itself is allowed
    with_bad_items = client.post("/v1/tag", json={"documents": [{"id": 1, "text": "a"}, {"id": 2}, 3]})
    assert with_bad_items.status_code == 413  # however many of them are also wrong
    elsewhere = client.post("/v1/feedback", json={"id": "a", "text": "a", "documents": [0] * 3})
    assert elsewhere.status_code == 422  # other routes take no documents: not a limit to name


def test_an_oversized_list_fails_at_once_with_a_bounded_answer(client):
    # Each bad item of a list is an error of its own: these must not be validated one by one.
    too_many = client.post("/v1/tag", json={"documents": [0] * 200_000})
    assert too_many.status_code == 413 and too_many.json()["errors"][0]["loc"] == ["body", "documents"]
    assert "200000 documents; at most 64" in too_many.json()["detail"]
    labels = client.post("/v1/tag", json={**documents("a"), "entity_types": ["x"] * 5_000})
    assert labels.status_code == 422 and labels.json()["errors"][0]["loc"] == ["body", "entity_types"]
    assert len(labels.content) < 1_000


def test_an_error_body_lists_the_first_errors_and_counts_the_rest(client):
    response = client.post("/v1/tag", json={"documents": [{"id": i} for i in range(60)]})
    assert response.status_code == 422
    assert len(response.json()["errors"]) == MAX_ERRORS
    assert response.json()["detail"].endswith("(60 errors in all)")


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit():
    chunks_read, sent = 0, []

    async def receive():
        nonlocal chunks_read
        chunks_read += 1
        return {"type": "http.request", "body": b"x" * 6, "more_body": True}  # a client that never stops

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("an oversized body reached the app")

    scope = {"type": "http", "method": "POST", "path": "/v1/tag", "headers": []}
    asyncio.run(app_module.BodySizeLimit(app, max_bytes=10)(scope, receive, send))
    assert chunks_read == 2 and sent[0]["status"] == 413


def answer_of_body_limit(receive, **limits) -> list[dict]:
    """What BodySizeLimit sends for a body that `receive` delivers, the app behind it never reached."""
    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("an unfinished body reached the app")

    scope = {"type": "http", "method": "POST", "path": "/v1/tag", "headers": []}
    asyncio.run(app_module.BodySizeLimit(app, **limits)(scope, receive, send))
    return sent


def test_a_body_that_stops_coming_is_408():
    async def receive():
        await asyncio.sleep(60)  # a client that opened the request and went quiet
        return {"type": "http.disconnect"}

    assert answer_of_body_limit(receive, max_bytes=10, timeout_s=0.05)[0]["status"] == 408


def test_a_body_that_trickles_in_is_408_when_the_whole_of_it_is_late():
    """A byte now and then, each within the timeout, must not hold the connection for ever."""
    pieces = 0

    async def receive():
        nonlocal pieces
        pieces += 1
        await asyncio.sleep(0.02)
        return {"type": "http.request", "body": b"{", "more_body": True}

    assert answer_of_body_limit(receive, max_bytes=10_000, timeout_s=0.2)[0]["status"] == 408 and pieces < 20


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_a_compressed_body_is_415_naming_the_header(client, encoding):
    body = json.dumps(documents("a")).encode()
    response = client.post("/v1/tag", content=body,
                           headers={"content-type": "application/json", "content-encoding": encoding})
    assert response.status_code == 415 and response.json()["errors"][0]["loc"] == ["header", "Content-Encoding"]


def test_a_text_over_the_limit_is_413_naming_it(make_client):
    client = make_client(max_text_chars=10)
    assert client.post("/v1/tag", json=documents("x" * 10)).status_code == 200  # at the limit is fine
    response = client.post("/v1/tag", json=documents("short", "x" * 11))
    assert response.status_code == 413
    assert response.json()["errors"][0]["loc"] == ["body", "documents", 1, "text"]


def test_a_body_over_the_limit_is_413_before_parsing(make_client):
    client = make_client(max_body_bytes=100)
    oversized = json.dumps(documents("x" * 200)).encode()

    declared = client.post("/v1/tag", content=oversized, headers={"content-type": "application/json"})
    streamed = client.post("/v1/tag", content=iter([oversized[:60], oversized[60:]]),
                           headers={"content-type": "application/json"})  # chunked: no Content-Length
    garbage = client.post("/v1/tag", content=b"{" * 101, headers={"content-type": "application/json"})

    for response in (declared, streamed, garbage):
        assert response.status_code == 413
        assert response.json()["errors"][0] == {"loc": ["body"], "msg": "the request body is larger than 100 bytes",
                                                "type": "body_too_large"}
    assert client.post("/v1/tag", json=documents("ok")).status_code == 200
    exactly = json.dumps(documents("x" * 10)).encode()
    exactly = exactly.replace(b'"x', b'"' + b"x" * (100 - len(exactly)) + b"x")  # a body of exactly 100 bytes
    assert len(exactly) == 100
    for body in (exactly, iter([exactly[:60], exactly[60:]])):
        assert client.post("/v1/tag", content=body, headers={"content-type": "application/json"}).status_code == 200
    # counted under the route, though answered before routing
    assert 'newstagger_http_requests_total{method="POST",route="/v1/tag",status="413"} 3.0' in client.get("/metrics").text


@pytest.mark.parametrize("limit, waiting_text, why", [
    ({"queue_max": 1}, "second", "1 requests are already waiting"),
    # Over the bound alone, yet taken: the queue was empty, and it would otherwise never run.
    ({"queue_max_chars": 5}, "八个字的一篇稿件", "8 characters are already waiting"),
])
def test_a_full_queue_is_429_with_retry_after(make_client, limit, waiting_text, why):
    client = make_client(**limit)
    gate = Gate(client)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/v1/tag", json=documents("first"))
        assert gate.entered.wait(WAIT_S)
        waiting = pool.submit(client.post, "/v1/tag", json=documents(waiting_text))
        wait_for(lambda: queue_depth(client) == 1, "the second request to queue")

        refused = client.post("/v1/tag", json=documents("third"))

        gate.release.set()
        assert running.result().status_code == waiting.result().status_code == 200
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["detail"]
    assert why in refused.json()["detail"]
    assert client.post("/v1/tag", json=documents("third")).status_code == 200


# --- batching ---------------------------------------------------------------------------------------

def test_concurrent_requests_share_one_forward_pass(make_client):
    client = make_client(batch_max_chars=10_000)
    gate = Gate(client)
    forward_passes = []
    backend = gate.tagger.backend
    gate.tagger.backend = lambda *arrays: forward_passes.append(len(arrays[0])) or backend(*arrays)
    senders = 8
    with ThreadPoolExecutor(senders + 1) as pool:
        opening = pool.submit(client.post, "/v1/tag", json=documents("开场"))
        assert gate.entered.wait(WAIT_S)
        concurrent = [pool.submit(client.post, "/v1/tag", json={"documents": [{"id": f"c{i}", "text": STORIES[i % 3]}]})
                      for i in range(senders)]
        wait_for(lambda: queue_depth(client) == senders, "every concurrent request to queue")
        gate.release.set()
        responses = [future.result() for future in concurrent]
        assert opening.result().status_code == 200

    assert [r.json()["results"][0]["id"] for r in responses] == [f"c{i}" for i in range(senders)]
    assert len(gate.calls) == 2 and len(gate.calls[1]) == senders  # one batch for all eight
    assert forward_passes == [1, senders]  # ... and one forward pass for it
    assert 'newstagger_batch_requests_bucket{le="8.0"} 2.0' in client.get("/metrics").text


def test_requests_batched_together_keep_their_own_options(make_client, tiny_model_dir):
    client = make_client()
    gate = Gate(client)
    asked = [{"thresholds": {"ecology": 0.0}, "entity_types": ["name"]}, {"thresholds": {"ecology": 1.0}}]
    with ThreadPoolExecutor(3) as pool:
        opening = pool.submit(client.post, "/v1/tag", json=documents("开场"))
        assert gate.entered.wait(WAIT_S)
        answers = [pool.submit(client.post, "/v1/tag", json={**documents(STORIES[0]), **options}) for options in asked]
        wait_for(lambda: queue_depth(client) == 2, "both requests to queue")
        gate.release.set()
        assert opening.result().status_code == 200
        answers = [future.result().json()["results"][0] for future in answers]

    assert [len(call) for call in gate.calls] == [1, 2]
    tagger = Tagger.load(tiny_model_dir)
    for answer, options in zip(answers, asked):
        assert {k: v for k, v in answer.items() if k != "id"} == tagger.tag([STORIES[0]], **options)[0]


def test_a_request_over_the_batch_budget_runs_in_parts(make_client, tiny_model_dir):
    client = make_client(batch_max_chars=len(STORIES[0]) + len(STORIES[1]))
    gate = Gate(client)
    gate.release.set()
    response = client.post("/v1/tag", json=documents(*STORIES))

    assert gate.calls == [STORIES[:2], STORIES[2:]]
    results = [{k: v for k, v in r.items() if k != "id"} for r in response.json()["results"]]
    assert results == Tagger.load(tiny_model_dir).tag(STORIES)


def large_request_in_the_model(make_client) -> tuple:
    """(client, gate, batcher, future) of a request in three parts, one story each, with its first
    part held in the model until the gate is released."""
    client = make_client(batch_max_chars=len(STORIES[1]))
    gate = Gate(client)
    batcher = client.app.state.service.batcher
    large = batcher.submit(list(STORIES))
    assert gate.entered.wait(WAIT_S)
    return client, gate, batcher, large


def test_a_request_in_parts_stops_between_parts_once_its_client_left(make_client):
    client, gate, batcher, running = large_request_in_the_model(make_client)
    batcher.abandon(running)  # what the route does when its client disconnects
    gate.release.set()
    with pytest.raises(Abandoned):
        running.result(WAIT_S)
    assert gate.calls == [STORIES[:1]]  # the part in the model finished; the other two never ran
    assert client.post("/v1/tag", json=documents(STORIES[1])).status_code == 200


def test_requests_behind_one_in_parts_wait_for_one_part_not_all(make_client, tiny_model_dir):
    client, gate, batcher, large = large_request_in_the_model(make_client)
    small = batcher.submit(["小"])
    wait_for(lambda: queue_depth(client) == 1, "the small request to queue")
    gate.release.set()

    assert [r for r in large.result(WAIT_S).results] == Tagger.load(tiny_model_dir).tag(STORIES)
    assert small.result(WAIT_S).results == Tagger.load(tiny_model_dir).tag(["小"])
    # the small request ran after the large one's first part; the rest went on without another in between
    assert gate.calls == [STORIES[:1], ["小"], STORIES[1:2], STORIES[2:]]


def test_large_requests_run_one_at_a_time_in_order_and_small_ones_pass_them(make_client):
    client, gate, batcher, first = large_request_in_the_model(make_client)
    second = batcher.submit(["乙" + story for story in STORIES])
    small = batcher.submit(["小"])
    wait_for(lambda: queue_depth(client) == 2, "both to queue")
    gate.release.set()
    for future in (first, second, small):
        future.result(WAIT_S)
    # taking turns part by part would finish both large requests late; the small one waits for one part
    assert gate.calls == [STORIES[:1], ["小"], STORIES[1:2], STORIES[2:],
                          *[["乙" + story] for story in STORIES]]


def test_a_large_request_passed_over_is_dropped_unrun_when_its_client_leaves(make_client):
    client, gate, batcher, first = large_request_in_the_model(make_client)
    futures = {}
    # its client leaves while the small one runs: it has just been passed over, and is waiting
    _tag_then(client, {"小": lambda: batcher.abandon(futures["second"])})
    futures["second"] = batcher.submit(["乙" + story for story in STORIES])
    small = batcher.submit(["小"])
    wait_for(lambda: queue_depth(client) == 2, "both to queue")
    gate.release.set()
    assert len(first.result(WAIT_S).results) == 3 and small.result(WAIT_S).results
    assert futures["second"].cancelled() and queue_depth(client) == 0
    assert gate.calls == [STORIES[:1], ["小"], STORIES[1:2], STORIES[2:]]  # it never ran


def test_a_failure_between_the_parts_of_a_request_fails_only_its_own_request(make_client):
    client = make_client(batch_max_chars=len(STORIES[1]))
    gate = Gate(client, fail_on="BOOM")
    batcher = client.app.state.service.batcher
    large = batcher.submit(list(STORIES))
    assert gate.entered.wait(WAIT_S)
    bad = batcher.submit(["BOOM"])
    wait_for(lambda: queue_depth(client) == 1, "the bad request to queue")
    gate.release.set()
    assert len(large.result(WAIT_S).results) == 3
    with pytest.raises(RuntimeError, match="the model broke"):
        bad.result(WAIT_S)
    assert gate.calls == [STORIES[:1], ["BOOM"], STORIES[1:2], STORIES[2:]]


def test_stopping_finishes_the_large_requests_still_waiting(make_client):
    client, gate, batcher, first = large_request_in_the_model(make_client)
    second = batcher.submit(["乙" + story for story in STORIES])
    stopping = threading.Thread(target=batcher.stop)
    stopping.start()
    wait_for(lambda: batcher._stopping, "stop to be called")
    with pytest.raises(ShuttingDown):
        batcher.submit(["迟到"])
    gate.release.set()
    stopping.join(WAIT_S)
    assert len(first.result(0).results) == len(second.result(0).results) == 3


def _tag_then(client: TestClient, actions: dict) -> list[list[str]]:
    """Make the serving tagger run actions[text] when it is given `text`; returns the calls it sees."""
    tagger = client.app.state.service.batcher.tagger
    original, calls = tagger.tag, []

    def tag(texts, **options):
        calls.append(list(texts))
        for text, action in actions.items():
            if text in texts:
                action()
        return original(texts, **options)

    tagger.tag = tag
    return calls


def _large_then_small(client: TestClient, when_small) -> tuple:
    """A request in three parts and a small one queued behind it (an opening request holds the
    model until both are in); `when_small` runs as the small one is tagged, after the large one's
    first part. Returns the two futures and the tagger's calls, the opening one first."""
    batcher = client.app.state.service.batcher
    hold, futures = threading.Event(), {}
    calls = _tag_then(client, {"开场": lambda: hold.wait(WAIT_S), "小": lambda: when_small(futures["large"])})
    opening = batcher.submit(["开场"])
    wait_for(lambda: calls, "the opening request to start")
    futures["large"] = batcher.submit(list(STORIES))
    small = batcher.submit(["小"])
    hold.set()
    opening.result(WAIT_S)
    return futures["large"], small, calls


def test_a_request_in_parts_whose_client_left_while_others_ran_between_its_parts_is_dropped(make_client):
    client = make_client(batch_max_chars=len(STORIES[1]))
    batcher = client.app.state.service.batcher
    large, small, calls = _large_then_small(client, batcher.abandon)
    with pytest.raises(Abandoned):
        large.result(WAIT_S)
    assert small.result(WAIT_S).results
    assert calls[1:] == [STORIES[:1], ["小"]]


def test_a_request_in_parts_finishes_on_the_model_it_started_with(make_client, second_model_dir):
    client = make_client(batch_max_chars=len(STORIES[1]))
    batcher = client.app.state.service.batcher
    newer = Tagger.load(second_model_dir)
    large, small, calls = _large_then_small(client, lambda _: batcher.swap(newer))
    assert large.result(WAIT_S).model.version == "0.0.1"
    assert calls[1:] == [STORIES[:1], ["小"], STORIES[1:2], STORIES[2:]]
    assert client.post("/v1/tag", json=documents(STORIES[0])).json()["model"]["version"] == "0.0.2"


def test_a_model_failure_fails_only_its_own_request(make_client):
    client = make_client()
    gate = Gate(client, fail_on="BOOM")
    with ThreadPoolExecutor(3) as pool:
        opening = pool.submit(client.post, "/v1/tag", json=documents("开场"))
        assert gate.entered.wait(WAIT_S)
        bad = pool.submit(client.post, "/v1/tag", json=documents("BOOM"))
        good = pool.submit(client.post, "/v1/tag", json=documents(STORIES[0]))
        wait_for(lambda: queue_depth(client) == 2, "both requests to queue")
        gate.release.set()
        assert opening.result().status_code == 200
        bad, good = bad.result(), good.result()

    assert bad.status_code == 500 and bad.json()["detail"] == "the model failed on this request"
    assert good.status_code == 200
    assert [len(call) for call in gate.calls] == [1, 2, 1, 1]  # the shared batch failed, then each ran alone
    assert client.post("/v1/tag", json=documents(STORIES[1])).status_code == 200
    assert "newstagger_model_failures_total 1.0" in client.get("/metrics").text


# --- operations ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers, threads", [(1, 8), (2, 4), (16, 1)])
def test_worker_processes_share_the_cores_out(tiny_model_dir, monkeypatch, workers, threads):
    monkeypatch.setattr(app_module, "available_cores", lambda: 9)
    loaded = []
    probed = SimpleNamespace(meta=SimpleNamespace(max_length=32), tag=lambda texts: None)
    monkeypatch.setattr(app_module.Tagger, "load", lambda folder, **options: loaded.append(options["threads"]) or probed)
    app_module.TaggingService(ServeSettings(model=tiny_model_dir, workers=workers))._load_tagger(tiny_model_dir)
    assert loaded == [threads]


def test_readyz_is_503_until_the_model_has_loaded(tiny_model_dir, monkeypatch):
    may_load = threading.Event()
    load = Tagger.load

    def slow_load(folder, **options):
        assert may_load.wait(WAIT_S)
        return load(folder, **options)

    monkeypatch.setattr(app_module.Tagger, "load", slow_load)
    with TestClient(create_app(ServeSettings(model=tiny_model_dir))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 503
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
        assert loading.json()["detail"] == "the model is still loading"
        assert client.post("/v1/tag", json=documents("x")).status_code == 503
        may_load.set()
        wait_for(lambda: client.get("/readyz").status_code == 200, "the model to load")
        assert client.get("/readyz").json() == {"status": "ready", "model": {"name": "tiny", "version": "0.0.1"}}


def test_readyz_reports_a_model_that_failed_to_load_and_a_reload_recovers(tmp_path, tiny_model_dir):
    settings = ServeSettings(model=tmp_path / "missing", admin_token="secret")
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.app.state.service.load_error, "the load to fail")
        response = client.get("/readyz")
        assert response.status_code == 503 and "failed to load" in response.json()["detail"]
        assert str(tmp_path) not in response.text  # the server's paths are for its log, not for any client
        assert "retry-after" not in response.headers  # retrying cannot help now
        reload = client.post("/v1/admin/reload", json={"model": str(tiny_model_dir)},
                             headers={"Authorization": "Bearer secret"})
        assert reload.status_code == 200
        assert reload.json() == {"model": {"name": "tiny", "version": "0.0.1"}, "previous": None}
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/tag", json=documents("青澜市")).status_code == 200


def test_an_unexpected_error_is_a_500_with_the_request_id_and_the_server_keeps_serving(client):
    @client.app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    response = client.get("/boom", headers={"X-Request-ID": "abc"})
    assert response.status_code == 500 and response.json()["detail"] == "internal error; the server keeps serving"
    assert response.headers["x-request-id"] == "abc" and "app;dur=" in response.headers["server-timing"]
    assert client.get("/healthz").status_code == 200


def test_metrics_cover_requests_latency_batches_documents_and_queue(client):
    client.post("/v1/tag", json=documents("四个汉字", "五个汉字呀"))
    text = client.get("/metrics").text
    for line in ['newstagger_http_requests_total{method="POST",route="/v1/tag",status="200"}',
                 'newstagger_http_request_seconds_bucket{le="0.005",route="/v1/tag"}',
                 "newstagger_batch_documents_count", "newstagger_batch_requests_count",
                 "newstagger_documents_tagged_total", "newstagger_characters_tagged_total",
                 "newstagger_queue_depth 0.0", 'newstagger_model_info{name="tiny",version="0.0.1"} 1.0']:
        assert line in text, line


def test_every_response_carries_timing_and_request_id_and_is_logged(client, caplog):
    caplog.set_level("INFO", logger="newstagger.access")
    response = client.post("/v1/tag", json=documents(STORIES[0]), headers={"X-Request-ID": "trace-42"})

    assert response.headers["x-request-id"] == "trace-42"
    assert [part.split(";")[0] for part in response.headers["server-timing"].split(", ")] == ["queue", "model", "app"]
    assert client.get("/healthz").headers["x-request-id"] != "trace-42"
    logged = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "trace-42"]
    assert logged and logged[0] | {"duration_ms": 0} == {
        "request_id": "trace-42", "method": "POST", "path": "/v1/tag", "route": "/v1/tag", "status": 200,
        "duration_ms": 0, "client": "testclient", "documents": 1, "model_version": "0.0.1"}


def test_fastapis_own_pages_have_their_own_metric_labels(make_client):
    client = make_client()  # its own metrics: other tests read /openapi.json too
    assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200
    text = client.get("/metrics").text
    for route in ("/docs", "/openapi.json"):
        assert f'newstagger_http_requests_total{{method="GET",route="{route}",status="200"}} 1.0' in text
    assert 'route="unmatched"' not in text


def test_invented_methods_share_one_metric_label(client):
    for i in range(3):
        client.request(f"INVENTED{i}", "/healthz")
    series = [line for line in client.get("/metrics").text.splitlines()
              if line.startswith("newstagger_http_requests_total{") and "healthz" in line]
    assert any('method="other"' in line for line in series)
    assert not any("INVENTED" in line for line in series)


def test_a_request_id_with_spaces_is_replaced(client):
    response = client.get("/healthz", headers={"X-Request-ID": "abc status=500"})
    assert response.headers["x-request-id"] != "abc status=500"


def test_text_logs_quote_what_a_client_chose():
    record = logging.LogRecord("newstagger.access", logging.INFO, __file__, 1, "GET %s",
                               (log_value("/x\nforged"),), None)
    record.fields = {"path": "/x\n2026 INFO forged", "route": "unmatched", "status": 404}
    line = TextLogFormatter().format(record)
    assert "\n" not in line and 'path="/x\\n2026 INFO forged" route=unmatched status=404' in line
    assert log_value("/v1/tag") == "/v1/tag" and log_value("/新闻") == "/新闻"
    # a quote would open a value swallowing the keys after it, = would read as a key, a backslash as an escape
    assert [log_value(value) for value in ('"', "a=b", "a\\b")] == ['"\\""', '"a=b"', '"a\\\\b"']


# --- reload -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-v2"), version="0.0.2")


def version_served(client: TestClient) -> str:
    return client.post("/v1/tag", json=documents(STORIES[0])).json()["model"]["version"]


def test_reload_is_refused_without_a_configured_token(client, second_model_dir):
    response = client.post("/v1/admin/reload", json={"model": str(second_model_dir)},
                           headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403 and "NEWSTAGGER_ADMIN_TOKEN" in response.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2VjcmV0"}])
def test_reload_needs_the_bearer_token(make_client, second_model_dir, headers):
    response = make_client(admin_token="secret").post("/v1/admin/reload", json={"model": str(second_model_dir)},
                                                      headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_reload_swaps_the_model(make_client, second_model_dir):
    client = make_client(admin_token="secret")
    response = client.post("/v1/admin/reload", json={"model": str(second_model_dir)},
                           headers={"Authorization": "Bearer secret"})

    assert response.status_code == 200
    assert response.json() == {"model": {"name": "tiny", "version": "0.0.2"},
                               "previous": {"name": "tiny", "version": "0.0.1"}}
    assert version_served(client) == "0.0.2" and client.get("/v1/info").json()["model"]["version"] == "0.0.2"
    assert 'newstagger_model_info{name="tiny",version="0.0.2"} 1.0' in client.get("/metrics").text


def test_a_server_of_several_workers_refuses_a_reload_that_would_reach_one(make_client, second_model_dir):
    client = make_client(admin_token="secret", workers=2)
    response = client.post("/v1/admin/reload", json={"model": str(second_model_dir)},
                           headers={"Authorization": "Bearer secret"})
    assert response.status_code == 409 and "restart the server" in response.json()["detail"]
    assert version_served(client) == "0.0.1"


def test_a_model_loaded_through_a_link_comes_from_one_folder_while_the_link_moves(tiny_model_dir, second_model_dir,
                                                                                 tmp_path, monkeypatch):
    current = tmp_path / "current"
    current.symlink_to(tiny_model_dir)
    read_meta = model_module.read_meta

    def promoted_meanwhile(folder):  # as `models promote` may, between the label file and the weights
        meta = read_meta(folder)
        current.unlink()
        current.symlink_to(second_model_dir)
        return meta

    monkeypatch.setattr(model_module, "read_meta", promoted_meanwhile)
    tagger = Tagger.load(current)
    expected = load_file(tiny_model_dir / "model.safetensors")
    assert tagger.meta.version == "0.0.1"
    assert all(torch.equal(tensor, expected[name]) for name, tensor in tagger.model.state_dict().items()
               if name in expected)


def test_an_empty_folder_name_is_422_not_a_reload_of_the_default(make_client):
    client = make_client(admin_token="secret")
    response = client.post("/v1/admin/reload", json={"model": ""}, headers={"Authorization": "Bearer secret"})
    assert response.status_code == 422 and response.json()["errors"][0]["loc"] == ["body", "model"]


def test_a_folder_that_fails_to_load_leaves_the_old_model_serving(make_client, tmp_path):
    client = make_client(admin_token="secret")
    response = client.post("/v1/admin/reload", json={"model": str(tmp_path)}, headers={"Authorization": "Bearer secret"})

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "model"]
    assert "still serving tiny 0.0.1" in response.json()["detail"]
    assert version_served(client) == "0.0.1"


def test_a_folder_that_loads_but_cannot_tag_a_batch_leaves_the_old_model_serving(make_client, second_model_dir, monkeypatch):
    client = make_client(admin_token="secret")

    tag = Tagger.tag

    def tags_one_short_row_only(self, texts, **options):  # as a graph whose batch size was fixed at 1
        if len(texts) > 1 or any(len(text) > self.meta.max_length for text in texts):
            raise RuntimeError("a graph fixed to one short row")
        return tag(self, texts, **options)

    monkeypatch.setattr(Tagger, "tag", tags_one_short_row_only)
    response = client.post("/v1/admin/reload", json={"model": str(second_model_dir)},
                           headers={"Authorization": "Bearer secret"})
    monkeypatch.undo()
    assert response.status_code == 422
    assert "a graph fixed to one short row; still serving tiny 0.0.1" in response.json()["detail"]
    assert version_served(client) == "0.0.1"


def test_a_request_in_flight_during_reload_finishes_on_the_old_model(make_client, second_model_dir):
    client = make_client(admin_token="secret")
    gate = Gate(client)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.post, "/v1/tag", json=documents(STORIES[0]))
        assert gate.entered.wait(WAIT_S)
        reloaded = client.post("/v1/admin/reload", json={"model": str(second_model_dir)},
                               headers={"Authorization": "Bearer secret"})
        gate.release.set()
        assert in_flight.result().json()["model"]["version"] == "0.0.1"
    assert reloaded.status_code == 200 and version_served(client) == "0.0.2"


def test_options_checked_against_a_model_replaced_while_the_request_waited_are_checked_again(
        tiny_model_dir, tmp_path, make_client):
    model, tokenizer, meta = load_model_folder(tiny_model_dir)
    grown = replace(meta.schema, topics=[*meta.schema.topics, "culture"])
    model.grow_labels(grown)
    save_model_folder(tmp_path / "grown", model, tokenizer, replace(meta, schema=grown, version="0.0.9"))
    client = make_client(model=tmp_path / "grown", admin_token="secret")
    gate = Gate(client)
    with ThreadPoolExecutor(2) as pool:
        opening = pool.submit(client.post, "/v1/tag", json=documents("开场"))
        assert gate.entered.wait(WAIT_S)
        waiting = pool.submit(client.post, "/v1/tag", json={**documents(STORIES[0]), "thresholds": {"culture": 0.0}})
        wait_for(lambda: queue_depth(client) == 1, "the request to queue")
        reloaded = client.post("/v1/admin/reload", json={"model": str(tiny_model_dir)},  # knows no culture
                               headers={"Authorization": "Bearer secret"})
        gate.release.set()
        assert opening.result().status_code == reloaded.status_code == 200
        answer = waiting.result()
    assert answer.status_code == 422, answer.text  # as it would be sent now, not a 200 ignoring the option
    assert answer.json()["errors"][0]["loc"] == ["body", "thresholds", "culture"]


def test_a_request_whose_client_left_frees_its_place_in_the_queue_at_once(make_client):
    client = make_client(queue_max=1)
    gate = Gate(client)
    batcher = client.app.state.service.batcher
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(client.post, "/v1/tag", json=documents("开场"))
        assert gate.entered.wait(WAIT_S)
        abandoned = batcher.submit(["没人等的稿件"])
        with pytest.raises(Overloaded):
            batcher.submit(["排不上"])
        abandoned.cancel()  # what the route does when its client disconnects
        assert queue_depth(client) == 0
        kept = batcher.submit(["接上的稿件"])
        gate.release.set()
        assert opening.result().status_code == 200
        assert len(kept.result(WAIT_S).results) == 1 and abandoned.cancelled()
    assert "newstagger_queue_depth 0.0" in client.get("/metrics").text


def test_a_request_cut_off_by_the_shutdown_deadline_abandons_its_job():
    """uvicorn cancels the requests still running when `timeout_graceful_shutdown` passes; their
    batch must then stop between parts, or the shutdown waits for work nobody will receive, and the
    client gets the 503 of a server shutting down."""
    abandoned, future = [], Future()
    batcher = SimpleNamespace(abandon=abandoned.append)

    async def never_disconnects():
        await asyncio.Event().wait()

    async def cut_off():
        waiting = asyncio.ensure_future(app_module.outcome_unless_client_leaves(
            SimpleNamespace(receive=never_disconnects), future, batcher))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(ShuttingDown, match="the server shut down before the answer"):
            await waiting

    asyncio.run(cut_off())
    assert abandoned == [future]


def test_the_answer_written_result_by_result_is_the_whole_responses_json():
    """Written one result at a time, so that the event loop is not held for the whole of a large
    answer; byte for byte what validating the whole TagResponse writes."""
    meta = SimpleNamespace(name="newstagger-zh", version="1.0.0")
    documents = [SimpleNamespace(id=2**70), SimpleNamespace(id="稿-7")]
    results = [{"topics": {"economy": 0.25, "ecology": 1}, "labels": ["economy"],
                "entities": [{"start": 0, "end": 3, "type": "address", "text": "青澜市", "score": 0.9123}]},
               {"topics": {"economy": 0.0, "ecology": 0.0}, "labels": [], "entities": []}]
    whole = TagResponse.model_validate({"model": {"name": meta.name, "version": meta.version},
                                        "results": [{"id": d.id, **r} for d, r in zip(documents, results)]})
    assert app_module._tag_response_json(meta, documents, results) == whole.model_dump_json().encode()


def test_a_request_cut_off_while_its_answer_is_written_gets_a_503(client, monkeypatch):
    async def cut_off(*args):
        raise asyncio.CancelledError  # what uvicorn's shutdown deadline does to the awaiting request

    monkeypatch.setattr(app_module.asyncio, "to_thread", cut_off)
    response = client.post("/v1/tag", json=documents(STORIES[0]))
    assert response.status_code == 503 and response.json()["detail"] == "the server shut down before the answer"


def test_reload_during_traffic_loses_no_request(make_client, second_model_dir):
    client = make_client(admin_token="secret")
    answered = []

    def send_stories(sender: int) -> None:
        for n in range(12):
            answered.append(client.post("/v1/tag", json={"documents": [{"id": f"{sender}-{n}", "text": STORIES[n % 3]}]}))

    with ThreadPoolExecutor(4) as pool:
        traffic = [pool.submit(send_stories, sender) for sender in range(4)]
        wait_for(lambda: len(answered) >= 8, "traffic to start")
        reloaded = client.post("/v1/admin/reload", json={"model": str(second_model_dir)},
                               headers={"Authorization": "Bearer secret"})
        for future in traffic:
            future.result()

    assert reloaded.status_code == 200
    assert [r.status_code for r in answered] == [200] * 48
    assert {r.json()["model"]["version"] for r in answered} <= {"0.0.1", "0.0.2"}
    assert version_served(client) == "0.0.2"


# --- settings and the serve command -------------------------------------------------------------------

def test_settings_come_from_newstagger_environment_variables(monkeypatch):
    monkeypatch.setenv("NEWSTAGGER_MAX_DOCUMENTS", "3")
    monkeypatch.setenv("NEWSTAGGER_ADMIN_TOKEN", "s3cret")
    settings = ServeSettings()
    assert settings.max_documents == 3 and settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert all(field.description for field in ServeSettings.model_fields.values())


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("NEWSTAGGER_MODEL", "")
    monkeypatch.setenv("NEWSTAGGER_ADMIN_TOKEN", "")
    settings = ServeSettings()
    assert settings.model is None and settings.admin_token is None  # the shipped model; admin off


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    return parser


def test_serve_passes_flags_to_uvicorn_and_its_workers(tiny_model_dir, monkeypatch):
    ran = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: ran.update(app=app, **kwargs))
    monkeypatch.setattr(command, "check_can_listen", lambda host, port: None)  # port 9123 may be taken here
    args = serve_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--port", "9123", "--workers", "2"])

    assert args.handler(args) == 0
    assert ran["app"] == "serving.app:app_from_environment" and ran["factory"] is True
    assert (ran["host"], ran["port"], ran["workers"]) == ("127.0.0.1", 9123, 2)
    assert ran["timeout_graceful_shutdown"] == 25.0
    assert ServeSettings().model == tiny_model_dir.resolve()  # what each worker process will read


def test_serve_with_several_workers_pins_a_linked_model_and_loads_no_torch_itself(tiny_model_dir, tmp_path):
    """Workers load the model themselves, and uvicorn restarts one that dies: through a link the
    registry moves, a restarted worker would serve another model than the rest."""
    link = tmp_path / "current"
    link.symlink_to(tiny_model_dir)
    probe = ("import sys, uvicorn; from newstagger.cli import main; "
             "uvicorn.run = lambda app, **kwargs: None; "
             "from serving import command; command.check_can_listen = lambda host, port: None; "
             f"main(['serve', '--model', {str(link)!r}, '--workers', '2']); "
             "import os; print(os.environ['NEWSTAGGER_MODEL'], sorted({'torch', 'transformers'} & set(sys.modules)))")
    printed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert printed == f"{tiny_model_dir.resolve()} []\n"


def test_serve_refuses_a_port_in_use_in_one_line(tiny_model_dir, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: pytest.fail("uvicorn was started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = serve_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--port", str(port)])
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            args.handler(args)


def test_serve_refuses_a_host_name_it_cannot_look_up_in_one_line(tiny_model_dir, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: pytest.fail("uvicorn was started"))
    args = serve_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--host", "a" * 64])
    with pytest.raises(UsageError, match="cannot listen on a{64}:8000"):  # IDNA's 63-character label limit
        args.handler(args)


def test_the_console_script_imports_without_torch():
    """Each `serve --workers N` process re-imports the console script before it can answer uvicorn's
    5-second health check; with torch in that import, workers were killed and restarted forever."""
    probe = "import sys, newstagger.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path):
    args = serve_parser().parse_args(["serve", "--model", str(tmp_path)])
    with pytest.raises(UsageError, match="not a model folder"):
        args.handler(args)


def test_serve_reports_a_bad_setting_by_its_variable(monkeypatch):
    monkeypatch.setenv("NEWSTAGGER_MAX_DOCUMENTS", "many")
    args = serve_parser().parse_args(["serve"])
    with pytest.raises(UsageError, match="NEWSTAGGER_MAX_DOCUMENTS"):
        args.handler(args)


def call_directly(app, messages: list[dict], headers: list[tuple[bytes, bytes]]) -> list[dict]:
    """Run one POST /v1/tag through the ASGI app with these client messages (a disconnect where a
    real client goes away); returns what the app sent, which a real server would drop."""
    sent = []

    async def call():
        pending = list(messages)

        async def receive():
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/tag", "raw_path": b"/v1/tag", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1),
                 "server": ("testserver", 80)}
        await app(scope, receive, send)

    asyncio.run(call())
    return sent


def test_a_client_that_leaves_mid_upload_is_counted_as_499_not_500(make_client):
    client = make_client()
    call_directly(client.app, [{"type": "http.request", "body": b'{"documents": [', "more_body": True},
                               {"type": "http.disconnect"}], [(b"content-length", b"1000")])
    metrics = client.get("/metrics").text
    assert 'newstagger_http_requests_total{method="POST",route="/v1/tag",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics


def test_a_client_that_leaves_while_queued_is_dropped_unrun(make_client):
    """A client that times out must not leave its stories to be tagged for nobody."""
    client = make_client(batch_wait_ms=2000)  # the job waits in the batcher long enough for the client to go
    body = json.dumps(documents("市民政局", "滨江区")).encode()
    sent = call_directly(client.app, [{"type": "http.request", "body": body, "more_body": False}], [])
    assert sent[0]["status"] == 499
    time.sleep(2.5)  # past the batch window, where the cancelled job is dropped
    metrics = client.get("/metrics").text
    assert 'newstagger_http_requests_total{method="POST",route="/v1/tag",status="499"} 1.0' in metrics
    assert "newstagger_documents_tagged_total 0.0" in metrics
    assert client.post("/v1/tag", json=documents("好的")).status_code == 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scraped_total(text: str, metric: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(metric + " ")]
    return float(line.split()[1])


@pytest.mark.slow
def test_every_worker_of_a_server_reports_the_metrics_of_all(tiny_model_dir, tmp_path):
    """With --workers 2 a scrape reaches either worker, and each one must report what both tagged."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where serve makes the workers' metrics folder
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen([sys.executable, "-m", "newstagger.cli", "serve", "--model", str(tiny_model_dir),
                               "--port", str(port), "--workers", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def both_ready() -> bool:  # each fresh connection may reach either worker
            assert server.poll() is None, server.stderr.read().decode(errors="replace")
            try:
                return all(httpx.get(f"{url}/readyz", timeout=5).status_code == 200 for _ in range(12))
            except httpx.HTTPError:
                return False

        wait_for(both_ready, "both workers to load the model")
        (folder,) = tmp_path.glob("newstagger-metrics-*")
        for n in range(12):
            assert httpx.post(f"{url}/v1/tag", json=documents(*["市民政局"] * (n + 1))).status_code == 200
        writers = {path.stem.rsplit("_", 1)[-1] for path in folder.glob("*.db")}
        assert len(writers) == 2, writers  # both workers tagged and wrote their counts there
        for _ in range(12):
            scrape = httpx.get(f"{url}/metrics").text
            assert scraped_total(scrape, "newstagger_documents_tagged_total") == sum(range(1, 13))
            assert scrape.count("newstagger_model_info{") == 1
    finally:
        server.terminate()
        server.wait(timeout=WAIT_S)
    assert not list(tmp_path.glob("newstagger-metrics-*"))  # removed once the workers stopped


def test_shared_metrics_report_only_the_model_served_now(tmp_path):
    """Shared by workers, a series removed in this process would stay in its file: a reload marks the
    old model's 0, and a worker that stopped, or crashed, leaves the live sums."""
    crashed = "from serving.observability import ServingMetrics; ServingMetrics().queue_depth.set(40)"
    subprocess.run([sys.executable, "-c", crashed], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                   check=True)
    probe = ("from types import SimpleNamespace as S; from serving.observability import ServingMetrics; "
             "m = ServingMetrics(); m.serving_model(S(name='tagger', version='1.0.0')); "
             "m.serving_model(S(name='tagger', version='2.0.0')); m.queue_depth.set(3); "
             "print(m.exposition().decode()); m.close(); print('-' * 8); print(ServingMetrics().exposition().decode())")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    running, stopped = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                      check=True).stdout.split("-" * 8 + "\n")
    assert 'newstagger_model_info{name="tagger",version="1.0.0"} 0.0' in running
    assert 'newstagger_model_info{name="tagger",version="2.0.0"} 1.0' in running
    assert "newstagger_queue_depth 3.0" in running
    assert "newstagger_model_info{" not in stopped and "newstagger_queue_depth " not in stopped


def test_a_crashed_workers_gauges_taken_out_by_another_scrape_first_are_no_error(tmp_path, monkeypatch):
    from serving import observability

    (tmp_path / "gauge_livesum_4000000.db").write_bytes(b"")  # a pid no process has here

    def taken_out_first(pid, path):
        raise FileNotFoundError(f"{path}/gauge_livesum_{pid}.db")

    monkeypatch.setattr(observability.multiprocess, "mark_process_dead", taken_out_first)
    observability._forget_crashed_workers(str(tmp_path))
