"""scripts/loadtest.py: the latency percentiles it publishes."""

from __future__ import annotations

import importlib.util
import shutil
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


@pytest.mark.parametrize(("content", "reason"), [("", "no stories in"), ('{"text": "好"}\n[1]\n', ":2: not a JSON object"),
                                                 ('{"text": null}\n', ":1: not a JSON object with a string 'text'")])
def test_a_stories_file_without_stories_is_an_argument_error(tmp_path, monkeypatch, capsys, content, reason):
    stories = tmp_path / "stories.jsonl"
    stories.write_text(content, encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["loadtest", "--url", "http://127.0.0.1:1", "--stories-file", str(stories)])
    with pytest.raises(SystemExit) as exit_:
        loadtest.main()
    assert exit_.value.code == 2 and reason in capsys.readouterr().err


def test_a_server_that_does_not_answer_is_one_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["loadtest", "--url", "http://127.0.0.1:1", "--stories", "2", "--rounds", "1"])
    with pytest.raises(SystemExit) as exit_:
        loadtest.main()
    assert str(exit_.value.code).startswith("no answer from http://127.0.0.1:1")



@pytest.mark.parametrize(("argv", "reason"), [(["--model", "/nonexistent"], "--model: /nonexistent is not a newstagger"),
                                              (["--url", "http://example.com:8000"], "only targets loopback"),
                                              (["--url", "http://127.0.0.1:1", "--max-seconds", "nan"], "finite")])
def test_arguments_that_cannot_work_exit_2_at_once(monkeypatch, capsys, argv, reason):
    monkeypatch.setattr(sys, "argv", ["loadtest", *argv])
    with pytest.raises(SystemExit) as exit_:
        loadtest.main()
    assert exit_.value.code == 2 and reason in capsys.readouterr().err


def test_a_model_folder_that_cannot_load_exits_2_before_a_server_starts(tiny_model_dir, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    monkeypatch.setattr(loadtest, "start_server", lambda *args: pytest.fail("a server was started"))
    monkeypatch.setattr(sys, "argv", ["loadtest", "--model", str(folder)])
    with pytest.raises(SystemExit) as exit_:
        loadtest.main()
    assert exit_.value.code == 2 and "is not a complete model folder" in capsys.readouterr().err
