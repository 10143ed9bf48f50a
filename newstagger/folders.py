"""Model folders without torch: where they are, what marks one, and how their description files
are replaced whole; so `serve` can check its model before it starts worker processes that load
it, and the registry's commands answer without loading a model library."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UsageError

META_FILE = "newstagger.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"


def default_model_dir() -> Path:
    """The folder NEWSTAGGER_MODEL names, else the shipped model; UsageError where neither is."""
    if os.environ.get("NEWSTAGGER_MODEL"):
        return Path(os.environ["NEWSTAGGER_MODEL"])
    if not DEFAULT_MODEL_DIR.is_dir():  # installed from a wheel: the code came, models/ did not
        raise UsageError(f"no --model given, and the shipped model is not at {DEFAULT_MODEL_DIR} (an install that "
                         "is not editable leaves it in the checkout): give --model DIR or set NEWSTAGGER_MODEL")
    return DEFAULT_MODEL_DIR


def replace_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a mix."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 would hide it from a server run as another user
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
