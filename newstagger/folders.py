"""Where model folders are and what marks one: without torch, so `serve` can check its model
before it starts worker processes that load it."""

from __future__ import annotations

import os
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
