"""scripts/loadtest.py: the latency percentiles it publishes."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("loadtest", REPO / "scripts" / "loadtest.py")
loadtest = importlib.util.module_from_spec(spec)
sys.modules["loadtest"] = loadtest  # its dataclasses look their module up there
spec.loader.exec_module(loadtest)


@pytest.mark.parametrize(("count", "q", "expected_ms"), [(5, 50, 3), (64, 99, 64), (192, 99, 191), (192, 95, 183),
                                                         (1, 50, 1)])
def test_percentiles_are_nearest_rank(count, q, expected_ms):
    run = loadtest.Run("x", latencies=[i / 1000 for i in range(1, count + 1)])
    assert run.percentile(q) == pytest.approx(expected_ms)
