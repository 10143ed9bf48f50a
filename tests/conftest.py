"""Shared fixtures: a tiny tagger built in-test, so the suite needs neither a hub nor ../shared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import (AlbertConfig, AlbertForMaskedLM, AutoTokenizer, BertConfig, BertTokenizer, RobertaConfig,
                          RobertaForMaskedLM)

from newstagger.model import ModelMeta, model_from_config, save_model_folder
from newstagger.schema import DEFAULT_COARSE, LabelSchema

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = REPO / "data" / "sample" / "news.jsonl"
TOPICS = ["city_management", "ecology", "economy", "livelihood"]
CLUENER_TYPES = ("address", "book", "company", "game", "government", "movie", "name", "organization", "position", "scene")

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (training data and base model) is not on this machine")


def tiny_vocab() -> dict[str, int]:
    """Specials, ASCII, common punctuation and every CJK unified ideograph: covers test texts."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list("0123456789abcdefghijklmnopqrstuvwxyz")
    tokens += list("，。！？、：；“”‘’（）《》【】—…·%-.,!?:;()")
    tokens += [chr(c) for c in range(0x4E00, 0x9FA6)]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def tiny_tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab=tiny_vocab())


def tiny_config(vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)


def tiny_schema() -> LabelSchema:
    return LabelSchema(topics=list(TOPICS), entity_types=list(CLUENER_TYPES),
                       coarse={t: DEFAULT_COARSE[t] for t in CLUENER_TYPES if t in DEFAULT_COARSE})


def build_tiny_model_folder(folder: Path, *, max_length: int = 32, stride: int = 8, version: str = "0.0.1",
                            schema: LabelSchema | None = None) -> Path:
    """A randomly initialised tagger saved as a complete model folder (windows of 32 force long-text paths)."""
    tokenizer = tiny_tokenizer()
    schema = schema or tiny_schema()
    model = model_from_config(tiny_config(len(tokenizer)), schema)
    meta = ModelMeta(schema=schema, max_length=max_length, stride=stride, name="tiny", version=version,
                     base_model="tiny-in-test")
    return save_model_folder(folder, model, tokenizer, meta, metrics={})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-model"))


def damaged_copy(base: Path, folder: Path, damage: str) -> Path:
    """A copy of a tiny base checkpoint that cannot be a base, in one of the ways users meet."""
    shutil.copytree(base, folder)
    weights = folder / "model.safetensors"
    if damage == "no tokenizer":
        for name in ("tokenizer.json", "vocab.txt"):
            (folder / name).unlink(missing_ok=True)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:2000])
    elif damage == "config of another size":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    elif damage == "pickled weights":  # only the name matters: it must not be opened
        weights.rename(folder / "pytorch_model.bin")
    elif damage == "weights under other names":  # a training framework's export: every key one level down
        save_file({f"model.{key}": value for key, value in load_file(weights).items()}, weights)
    elif damage == "another architecture":
        config = tiny_config(len(tiny_vocab())).to_dict()
        RobertaForMaskedLM(RobertaConfig(**{**config, "max_position_embeddings": 130})).save_pretrained(folder)
    elif damage == "an ALBERT":  # its config lacks what BertModel reads: a crash, not a refusal, before
        AlbertForMaskedLM(AlbertConfig(vocab_size=len(tiny_vocab()), embedding_size=16, hidden_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)).save_pretrained(folder)
    elif damage in ("a decoder", "relative positions"):  # both used to train, quietly worse
        config = json.loads((folder / "config.json").read_text())
        config |= {"is_decoder": True} if damage == "a decoder" else {"position_embedding_type": "relative_key_query"}
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "encoder tensors BERT does not use":  # a relative-position BERT's, under an absolute config
        tensors = load_file(weights)
        prefix = "bert." if "bert.embeddings.position_embeddings.weight" in tensors else ""  # BertModel's: none
        tensors[f"{prefix}encoder.layer.0.attention.self.distance_embedding.weight"] = tensors[
            f"{prefix}embeddings.position_embeddings.weight"].clone()
        save_file(tensors, weights, metadata={"format": "pt"})
    elif damage == "tokenizer past the embeddings":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_tokens(["[NEWSROOM]"])
        tokenizer.save_pretrained(folder)
    elif damage == "no pad token":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    elif damage == "unknown token not in the vocabulary":  # transformers adds "[UNK]" as a new, untrained token
        vocab = sorted(AutoTokenizer.from_pretrained(folder).get_vocab().items(), key=lambda item: item[1])
        (folder / "tokenizer.json").unlink(missing_ok=True)  # rebuilt from vocab.txt
        (folder / "vocab.txt").write_text("".join(("<unk>" if t == "[UNK]" else t) + "\n" for t, _ in vocab),
                                          encoding="utf-8")
    return folder
