"""`newstagger tag`: JSONL stories in, one JSONL result per story out, in order, streaming.

Input lines are `{"id", "text"}`; output lines `{"id", "topics", "labels", "entities"}`. The file
is read and written in chunks, so memory stays flat however large the input is. A file output is
written as OUTPUT.partial and takes its name when the run ends well, so a stopped run never leaves
a file that looks complete (nor empties an earlier one). A bad line stops the run with its line
number (exit 2), every earlier line written to OUTPUT.partial, or, with `--on-error record`, is
answered in place by `{"id", "error"}` so output stays aligned with the non-blank input lines
(blank lines hold no story and are skipped). Like other filters it says nothing on stderr but
warnings and errors, so a bad line's error is the one line there; a terminal gets a progress bar
naming the backend, and -v logs the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from tqdm import tqdm

from .cli import (add_model_argument, check_fraction, check_output_path, positive_int, refuse_overwriting,
                  thread_count)
from .documents import DataError, check_encodable, id_and_text, json_object, utf8_only
from .errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("tag", help="tag a JSONL file of stories", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--input", "-i", required=True, help="JSONL file of {id, text}, or - for stdin")
    parser.add_argument("--output", "-o", required=True, help="JSONL file to write, or - for stdout")
    parser.add_argument("--chunk", type=positive_int, default=512, help="stories tagged together (memory bound)")
    parser.add_argument("--on-error", choices=("stop", "record"), default="stop",
                        help="on a bad line: stop with exit 2, or write {id, error} for it and go on")
    parser.add_argument("--types", help="comma-separated entity types to return (default: all)")
    parser.add_argument("--entity-threshold", type=float, metavar="SCORE",
                        help="lowest entity score to return (default: the model's, tuned on validation; 0: all)")
    add_backend_arguments(parser)
    parser.set_defaults(handler=run, log_level=logging.WARNING)


def add_backend_arguments(parser) -> None:
    """--backend and --precision, then add_runtime_arguments."""
    from .backends import BACKENDS, PRECISIONS

    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="runtime; auto: the fastest one that is exact or passed `newstagger check`")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="torch: fp32/bf16, onnx: fp32/int8 (int8 needs `newstagger export --quantize int8`)")
    add_runtime_arguments(parser)


def add_runtime_arguments(parser) -> None:
    """--device and --threads, shared by the commands that tag (tag, bench)."""
    from .backends import DEVICES

    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available")
    parser.add_argument("--threads", type=thread_count, help="intra-op threads (default: all cores this process may use)")


def run(args) -> int:
    from .tagger import Tagger

    refuse_overwriting(args.output, [args.input])
    refuse_overwriting(_partial_path(args.output), [args.input])  # where a file output is written first
    _check_paths(args.input, args.output)
    entity_threshold = check_fraction("--entity-threshold", args.entity_threshold)
    tagger = Tagger.load(args.model, backend=args.backend, precision=args.precision, device=args.device,
                         threads=args.threads)
    entity_types = args.types.split(",") if args.types is not None else None
    try:  # as the API does: a misspelt type would otherwise just return nothing
        tagger.check_options(entity_types=entity_types)
    except ValueError as err:
        raise UsageError(f"--types: {err}") from None
    with _input(args.input) as source, _output(args.output) as (sink, written_to):
        try:
            errors = tag_stream(tagger, source, sink, chunk_size=args.chunk, on_error=args.on_error,
                                entity_types=entity_types, entity_threshold=entity_threshold)
        except DataError as err:  # its line number, which file it is in, and where the lines before it are
            kept = f" (the lines before it are in {written_to})" if written_to != args.output else ""
            raise DataError(f"--input {args.input}: {err}{kept}") from None
    if errors:  # said, so a pipeline that watches stderr knows without reading every line
        print(f"newstagger tag: {errors} line(s) could not be tagged; their output lines hold the error",
              file=sys.stderr)
    return 0


def tag_stream(tagger, source: IO[str], sink: IO[str], *, chunk_size: int = 512, on_error: str = "stop",
               entity_types: list[str] | None = None, entity_threshold: float | None = None,
               progress_bar: bool = True) -> int:
    """Tag JSONL lines from `source` into `sink`, one chunk in memory at a time; the number of lines
    answered with an error (under `on_error="record"`).

    On a GPU the next chunk is tokenized in a worker thread while the current one runs; on a CPU
    the encoder's threads already use every core, so there it would only contend.
    """
    chunks = _chunks(_read_requests(source, stop_at_error=on_error == "stop"), chunk_size)
    overlap = tagger.backend.device.type == "cuda"
    characters = errors = 0
    # disable=None: a bar on a terminal only
    with tqdm(unit="doc", desc=f"tagging ({tagger.backend})", disable=None if progress_bar else True,
              file=sys.stderr) as progress:
        for chunk, encoded in _with_encodings(tagger, chunks, overlap):
            texts = [text for _, text, error in chunk if error is None]
            results = iter(tagger.tag(texts, entity_types=entity_types, entity_threshold=entity_threshold,
                                      encoded=encoded))
            for doc_id, _, error in chunk:
                if error and on_error == "stop":
                    sink.flush()
                    raise DataError(error)
                errors += error is not None
                record = {"id": doc_id, "error": error} if error else {"id": doc_id, **next(results)}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            characters += sum(map(len, texts))
            elapsed = max(progress.format_dict["elapsed"], 1e-9)
            progress.set_postfix_str(f"{characters / elapsed:,.0f} chars/s", refresh=False)
            progress.update(len(chunk))
    return errors


def _with_encodings(tagger, chunks, overlap: bool):
    """(chunk, its encodings), the next chunk's made in a worker thread when `overlap` is set."""
    def encode(chunk):
        return chunk, tagger.encode([text for _, text, error in chunk if error is None])

    if not overlap:
        yield from map(encode, chunks)
        return
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        for chunk in chunks:
            following = worker.submit(encode, chunk)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


def parse_request(line: str, where: str) -> tuple[object, str]:
    """(id, text) of one input line, or DataError naming the line and the field."""
    doc_id, text = id_and_text(json_object(line, where), where)
    check_encodable(doc_id, "id", where)
    check_encodable(text, "text", where)
    return doc_id, text


BLANK = " \t\r\n\ufeff\u3000"


def _read_requests(source: IO[str] | IO[bytes], stop_at_error: bool) -> Iterator[tuple[object, str, str | None]]:
    """(id, text, None) per good line, (id, "", reason) per bad one; the first bad one ends the
    stream when stopping, so every line before it is still tagged and written."""
    for number, line in enumerate(source, start=1):
        try:
            line = story_line(line, number)
            if line is None:
                continue
            doc_id, text = parse_request(line, f"line {number}")
        except DataError as err:
            yield _best_effort_id(line, number), "", str(err)
            if stop_at_error:
                return
            continue
        yield doc_id, text, None


def story_line(line: str | bytes, number: int) -> str | None:
    """The line as text, None where it is blank. Files are read as bytes so that a line that is not
    UTF-8 is an error of that line alone; a byte-order mark at its start is dropped (Windows tools
    begin each file they write with one, and files get concatenated). Blank is JSON's whitespace, a
    BOM or a full-width space: not str.strip()'s wider set, so a line of other control or separator
    characters is reported, never dropped."""
    if isinstance(line, bytes):
        with utf8_only(f"line {number}"):
            line = line.decode("utf-8")
    line = line.removeprefix("\ufeff")
    return line if line.strip(BLANK) else None


def _best_effort_id(line: str, number: int):
    """The bad line's own id where it is one an id may be (a string or an integer) and can be echoed
    (UnicodeEncodeError is a ValueError), else `line-N`."""
    with contextlib.suppress(ValueError, AttributeError, RecursionError):
        doc_id = json.loads(line).get("id")
        if isinstance(doc_id, str) or (isinstance(doc_id, int) and not isinstance(doc_id, bool)):
            json.dumps(doc_id, ensure_ascii=False).encode("utf-8")
            return doc_id
    return f"line-{number}"


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_paths(source: str, sink: str) -> None:
    """UsageError for an input that is missing or a folder, or an output with no folder to go in,
    before the model takes its seconds to load (a pipe, /dev/stdin, is an input too)."""
    if source != "-" and (Path(source).is_dir() or not Path(source).exists()):
        raise UsageError(f"--input {source}: {'a folder' if Path(source).is_dir() else 'no such file'}")
    check_output_path("--output", sink)


@contextlib.contextmanager
def _input(path: str):
    if path == "-":
        yield getattr(sys.stdin, "buffer", sys.stdin)
    else:
        with open(path, "rb") as handle:
            yield handle


@contextlib.contextmanager
def _output(path: str):
    """(the stream to write, the path it goes to): a new or regular file is written as PATH.partial,
    renamed to PATH once everything is in; stdout, a pipe or a device (/dev/null) is written as is."""
    if path == "-":
        yield sys.stdout, path
        return
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w", encoding="utf-8") as handle:
            yield handle, path
        return
    partial = _partial_path(path)
    try:  # not through a link planted at the partial name (in a folder others can write to, such as /tmp)
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(f"--output: {partial}, where the output is written first, is a symbolic link; "
                             "remove it") from None
        raise
    with open(descriptor, "w", encoding="utf-8") as handle:
        yield handle, partial
    os.replace(partial, os.path.realpath(path))  # through a link, not over it


def _partial_path(path: str) -> str:
    return f"{os.path.realpath(path)}.partial"
