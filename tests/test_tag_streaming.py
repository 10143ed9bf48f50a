"""Throughput plumbing that must not change answers: bucketing, overlapped tokenizing, streaming."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_model_folder

from newstagger.bench import RecordingBackend, synthetic_stories, write_corpus
from newstagger.tag_command import _with_encodings, tag_stream
from newstagger.tagger import Tagger


@pytest.fixture(scope="module")
def tagger(tiny_model_dir) -> Tagger:
    return Tagger.load(tiny_model_dir, threads=1)


def spans(result: dict) -> list[tuple]:
    return [(e["start"], e["end"], e["type"]) for e in result["entities"]]


def jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))


def test_bucketing_keeps_output_order(tiny_model_dir):
    """Windows run sorted by length in many small batches; results still come back per text, in order."""
    tagger = Tagger.load(tiny_model_dir, threads=1, max_batch_tokens=128)
    texts = synthetic_stories(25, seed=3, min_chars=1, max_chars=300) + ["", "短。"]
    recorder = tagger.backend = RecordingBackend(tagger.backend)
    together = tagger.tag(texts)
    assert len(recorder.batches) > 5
    for text, result in zip(texts, together):
        alone = tagger.tag([text])[0]
        assert spans(result) == spans(alone)
        assert result["topics"] == pytest.approx(alone["topics"], abs=1e-3)


def test_stream_output_is_in_input_order_across_chunks(tagger):
    texts = synthetic_stories(30, seed=4, min_chars=1, max_chars=200)
    sink = io.StringIO()
    tag_stream(tagger, io.StringIO(jsonl(texts)), sink, chunk_size=7, progress_bar=False)
    results = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [r["id"] for r in results] == list(range(30))
    assert [spans(r) for r in results] == [spans(r) for r in tagger.tag(texts)]


def test_overlapped_tokenizing_gives_the_same_chunks(tagger):
    """The GPU path tokenizes the next chunk in a worker thread; it must hand over the same work."""
    chunks = [[(i, text, None) for i, text in enumerate(synthetic_stories(5, seed=s, max_chars=300))] for s in range(4)]
    chunks[2].append((99, "", "line 9: not valid JSON"))
    plain = list(_with_encodings(tagger, iter(chunks), overlap=False))
    overlapped = list(_with_encodings(tagger, iter(chunks), overlap=True))
    assert [chunk for chunk, _ in overlapped] == chunks
    for (_, expected), (_, got) in zip(plain, overlapped):
        assert [e.ids for e in expected] == [g.ids for g in got]


class CountingSource(io.StringIO):
    """A JSONL source that counts the lines taken from it."""

    lines_read = 0

    def __iter__(self):
        while line := self.readline():
            self.lines_read += 1
            yield line


class WatchingSink(io.StringIO):
    """Remembers, at each written line, how far ahead reading had got."""

    def __init__(self, source: CountingSource):
        super().__init__()
        self.source = source
        self.lines_written = 0
        self.most_ahead = 0

    def write(self, text: str) -> int:
        self.lines_written += text.count("\n")
        self.most_ahead = max(self.most_ahead, self.source.lines_read - self.lines_written)
        return super().write(text)


def test_stream_reads_no_more_than_a_chunk_ahead_of_what_it_wrote(tagger):
    source = CountingSource(jsonl(synthetic_stories(200, seed=5, min_chars=5, max_chars=60)))
    sink = WatchingSink(source)
    tag_stream(tagger, source, sink, chunk_size=16, progress_bar=False)
    assert sink.lines_written == 200
    assert sink.most_ahead <= 16


PEAK_RSS_OF_TAG = (
    "import resource, sys\n"
    "from newstagger.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def peak_rss_mb_of_tag(model_dir, corpus, tmp_path) -> float:
    command = [sys.executable, "-c", PEAK_RSS_OF_TAG, "tag", "--model", str(model_dir), "-i", str(corpus),
               "-o", str(tmp_path / "out.jsonl"), "--chunk", "64", "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def test_tag_on_a_large_generated_file_stays_in_bounded_memory(tmp_path, capsys):
    """Ten times the stories, the same peak memory.

    This seeded random tiny model tags most characters as entities, so the large file's results
    (~36 MB as JSON, several times that as Python objects) would show if they were held;
    streaming holds one 64-story chunk at a time. (Unseeded, some draws wrote only ~12 MB.)
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model_dir = build_tiny_model_folder(tmp_path / "model")
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_corpus(small, 300, max_chars=300)
    write_corpus(large, 3000, max_chars=300)
    capsys.readouterr()
    small_peak = peak_rss_mb_of_tag(model_dir, small, tmp_path)
    large_peak = peak_rss_mb_of_tag(model_dir, large, tmp_path)
    assert (tmp_path / "out.jsonl").stat().st_size > 15e6
    assert large_peak - small_peak < 40, (small_peak, large_peak)
