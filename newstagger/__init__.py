"""newstagger: topics and named entities for Chinese local-news stories."""

import importlib

# Imported on first use, so that `import newstagger` does not load torch: each `serve --workers N`
# process re-imports the console script, and uvicorn kills a worker that has not answered its
# health check within 5 s.
_EXPORTS = {
    "DataError": "documents", "Document": "documents", "Span": "documents",
    "ModelMeta": "model", "NewsTaggerModel": "model", "load_model_folder": "model", "save_model_folder": "model",
    "LabelSchema": "schema", "Tagger": "tagger",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __dir__() -> list[str]:
    return [*__all__, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
