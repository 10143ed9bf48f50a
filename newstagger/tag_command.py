"""`newstagger tag`: JSONL stories in, one JSONL result per story out, in order, streaming.

Input lines are `{"id", "text"}`; output lines `{"id", "topics", "labels", "entities"}`. The file
is read and written in chunks, so memory stays flat however large the input is. A bad line stops
the run with its line number (exit 2) after every earlier line has been written, or, with
`--on-error record`, is answered in place by `{"id", "error"}` so output stays line-aligned.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import IO

from tqdm import tqdm

from .documents import DataError


def register(subparsers) -> None:
    parser = subparsers.add_parser("tag", help="tag a JSONL file of stories", description=__doc__,
                                   formatter_class=lambda prog: _formatter(prog))
    parser.add_argument("--model", help="model folder (default: the shipped model, or $NEWSTAGGER_MODEL)")
    parser.add_argument("--input", "-i", required=True, help="JSONL file of {id, text}, or - for stdin")
    parser.add_argument("--output", "-o", required=True, help="JSONL file to write, or - for stdout")
    parser.add_argument("--chunk", type=int, default=512, help="stories tagged together (memory bound)")
    parser.add_argument("--on-error", choices=("stop", "record"), default="stop",
                        help="on a bad line: stop with exit 2, or write {id, error} for it and go on")
    parser.add_argument("--types", help="comma-separated entity types to return (default: all)")
    parser.set_defaults(handler=run)


def _formatter(prog):
    import argparse

    return argparse.RawDescriptionHelpFormatter(prog)


def run(args) -> int:
    from .tagger import Tagger

    tagger = Tagger.load(args.model)
    entity_types = args.types.split(",") if args.types else None
    with _open(args.input, "r") as source, _open(args.output, "w") as sink:
        progress = tqdm(unit="doc", desc="tagging", disable=None, file=sys.stderr)
        for chunk in _chunks(_read_requests(source, stop_at_error=args.on_error == "stop"), args.chunk):
            texts = [text for _, text, error in chunk if error is None]
            results = iter(tagger.tag(texts, entity_types=entity_types))
            for doc_id, _, error in chunk:
                if error and args.on_error == "stop":
                    sink.flush()
                    raise DataError(error)
                record = {"id": doc_id, "error": error} if error else {"id": doc_id, **next(results)}
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            progress.update(len(chunk))
        progress.close()
    return 0


def parse_request(line: str, where: str) -> tuple[object, str]:
    """(id, text) of one input line, or DataError naming the line and the field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'id' and 'text'")
    if "id" not in obj:
        raise DataError(f"{where}: field 'id' is missing")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise DataError(f"{where}: field 'id' must be a string or an integer")
    if not isinstance(obj.get("text"), str):
        raise DataError(f"{where}: field 'text' must be a string")
    return obj["id"], obj["text"]


def _read_requests(source: IO[str], stop_at_error: bool) -> Iterator[tuple[object, str, str | None]]:
    """(id, text, None) per good line, (id, "", reason) per bad one; the first bad one ends the
    stream when stopping, so every line before it is still tagged and written."""
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            doc_id, text = parse_request(line, f"line {number}")
        except DataError as err:
            yield _best_effort_id(line, number), "", str(err)
            if stop_at_error:
                return
            continue
        yield doc_id, text, None


def _best_effort_id(line: str, number: int):
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(line).get("id", f"line-{number}")
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


@contextlib.contextmanager
def _open(path: str, mode: str):
    if path == "-":
        yield sys.stdin if mode == "r" else sys.stdout
    else:
        with open(path, mode, encoding="utf-8") as handle:
            yield handle
