"""Schema-driven fuzzing: schemathesis generates requests from the OpenAPI spec, valid and not,
and no answer may be a 5xx. Bounded in examples so it stays well under a minute."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from serving.app import create_app
from serving.settings import ServeSettings

ADMIN_TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir, tmp_path_factory):
    feedback_url = f"sqlite:///{tmp_path_factory.mktemp('feedback') / 'feedback.db'}"
    app = create_app(ServeSettings(model=tiny_model_dir, admin_token=ADMIN_TOKEN, max_documents=16,
                                   max_text_chars=4000, max_body_bytes=100_000, feedback_url=feedback_url))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # also starts the app (lifespan)
    deadline = time.monotonic() + 60
    while app.state.service.batcher is None:
        assert time.monotonic() < deadline and not app.state.service.load_error, "the model did not load"
        time.sleep(0.01)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    # With the token, reload's body is fuzzed too (bad folders must be a 4xx, not a 500).
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=[not_a_server_error])

