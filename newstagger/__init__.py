"""newstagger: topics and named entities for Chinese local-news stories."""

from .documents import DataError, Document, Span
from .model import ModelMeta, NewsTaggerModel, load_model_folder, save_model_folder
from .schema import LabelSchema
from .tagger import Tagger

__all__ = [
    "DataError", "Document", "LabelSchema", "ModelMeta", "NewsTaggerModel", "Span", "Tagger",
    "load_model_folder", "save_model_folder",
]
__version__ = "0.1.0"
