"""`newstagger` entry point: one command, a subcommand per job.

Each subcommand lives in its own module, which exposes `register(subparsers)`; the module adds
its parser and sets `handler` to a function taking the parsed arguments and returning an exit
code. Bad input raises UsageError or DataError and ends as exit code 2 with a one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import logging
import math
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from .checks import MAX_THREADS
from .documents import DataError
from .errors import UsageError

# Each command by the module that registers it, in the order `--help` lists them.
COMMAND_MODULES = {
    "tag": "newstagger.tag_command",
    "export": "newstagger.export",
    "check": "newstagger.agreement",
    "bench": "newstagger.bench",
    "pretrain": "training.pretrain",
    "train": "training.train",
    "evaluate": "training.evaluate",
    "serve": "serving.command",
    "feedback": "training.feedback",
    "models": "training.registry",
    "retrain": "training.retrain",
}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: $NEWSTAGGER_MODEL, else the shipped model)")


def at_least(minimum: int):
    """argparse type of a count: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value
    return parse


positive_int = at_least(1)  # stories, threads, repeats


def positive_seconds(text: str) -> float:
    """argparse type of durations (--seconds, --max-seconds): a finite number over 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be over 0 and finite, not {text}")
    return value


def thread_count(text: str) -> int:
    """argparse type of --threads: a whole number from 1 to MAX_THREADS."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, not {value}")
    return value


def names_from(known: tuple[str, ...]):
    """argparse type of a comma-separated choice (`--configs torch-fp32,onnx-int8`): a misspelt name is
    an error, not a silently skipped entry."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = [name for name in names if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
        return names

    return parse


def refuse_overwriting(output: str | None, inputs: Iterable[str | Path]) -> None:
    """UsageError when `output` is an existing file that is also an input (`-`: whatever stdin reads,
    `< out.jsonl`): opening it for writing would empty what is still to be read, or replace labelled
    data with results."""
    if not output or output == "-" or not os.path.exists(output):
        return
    for source in inputs:
        if _same_file(output, str(source)):
            raise UsageError(f"--output {output} is also an input ({source}); writing it would destroy that input")


def _same_file(output: str, source: str) -> bool:
    if source != "-":
        return os.path.exists(source) and os.path.samefile(output, source)
    try:
        return os.path.samestat(os.fstat(sys.stdin.fileno()), os.stat(output))
    except (OSError, ValueError, AttributeError):  # stdin closed, or no file behind it (a test's StringIO)
        return False


def check_output_path(option: str, path: str) -> None:
    """UsageError for an output that is a folder or has no folder to go in (`-`: stdout), said before
    the work whose result it would hold."""
    if path == "-":
        return
    if Path(path).is_dir():
        raise UsageError(f"{option} {path}: a folder; name a file to write")
    if not Path(path).absolute().parent.is_dir():
        raise UsageError(f"{option} {path}: no folder {Path(path).absolute().parent} to write it in")


def check_fraction(option: str, value: float | None) -> float | None:
    """`value` when it is None or between 0 and 1; otherwise a UsageError naming the option."""
    if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
        raise UsageError(f"{option} must be between 0 and 1, not {value}")
    return value


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the command `argv` names, or of every command where it names none it knows.

    Only that command's module is imported: the others pull in torch and transformers (seconds),
    which `serve --workers N` would otherwise hold in its supervisor process for nothing.
    """
    parser = argparse.ArgumentParser(
        prog="newstagger",
        description="Topics and named entities for Chinese local-news stories.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    leading = list(itertools.takewhile(lambda arg: arg.startswith("-"), argv))
    asked = argv[len(leading)] if len(leading) < len(argv) else None
    # `newstagger -h serve` is the help of all commands, which lists every one
    every = asked not in COMMAND_MODULES or any(arg == "--help" or (arg[1:2] != "-" and "h" in arg) for arg in leading)
    for command, module in COMMAND_MODULES.items():
        if every or command == asked:
            importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_chatter()  # before a command's module imports transformers
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(args, "log_level", logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # JSONL and JSON out are UTF-8 whatever the locale says (a Chinese-locale Windows pipe is GBK,
    # which cannot encode every character a story may hold).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    try:
        return args.handler(args)
    except (UsageError, DataError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        print(f"newstagger {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`newstagger tag ... -o - | head`): stop quietly, as `cat` does
        _drop_stdout()
        return 128 + signal.SIGPIPE
    except OSError as err:  # the disk is full, a device failed: the environment's error, in one line
        _drop_stdout()
        print(f"newstagger {args.command}: error: {err}", file=sys.stderr)
        return 1


def _drop_stdout() -> None:
    """Point stdout at the null device, so the exit's flush of what could not be written cannot fail again."""
    with contextlib.suppress(OSError, ValueError):  # a stdout with no descriptor (a test's) has nothing to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def quiet_library_chatter() -> None:
    """transformers draws a progress bar for every weight load; ours are the ones that matter. Said
    through the environment, which transformers reads when imported: the processes a command starts
    (`serve`'s workers, `bench`'s measurements) inherit it, and `serve` need not import transformers."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # imported before (main() called in-process): told directly, unless the user chose otherwise
    if "transformers" in sys.modules and os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


if __name__ == "__main__":
    # `python -m newstagger.cli` runs this file as __main__, a second copy of the module: the commands raise
    # newstagger.cli's UsageError, which only the package module's main() catches.
    from newstagger.cli import main as package_main

    sys.exit(package_main())
