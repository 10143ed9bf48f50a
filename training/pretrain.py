"""`newstagger pretrain`: continue a BERT checkpoint's masked-language-model pretraining on your text.

Domain-adaptive pretraining (Gururangan et al., 2020, "Don't Stop Pretraining"): a newsroom has far
more unlabelled stories than labelled ones, and an encoder that has read them tags them better. The
texts (any format `train` reads; labels are ignored) are tokenized, joined with [SEP] and cut into
blocks of `max_length` tokens; 15% of the tokens are masked as BERT does (80% [MASK], 10% a random
token, 10% kept) by transformers' DataCollatorForLanguageModeling. The output is a plain Hugging Face
BERT folder (safetensors, with its MLM head, so it can be continued again): give it to `newstagger
train --base-model`. Held-out MLM loss and accuracy, measured before and after on the same masked
tokens, go into its `pretraining.json`, beside the base checkpoint's own record where it had one.
A run that stops (a crash, a GPU lease that ends) continues with `--resume` from the checkpoint it
saves every `--checkpoint-minutes` and at each epoch's end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling

from newstagger.checks import MAX_THREADS, MIN_WINDOW, check_rules
from newstagger.errors import UsageError
from newstagger.documents import DataError, Document
from newstagger.folders import META_FILE
from newstagger.model import check_encoder_loaded

from .data import not_held_out, parse_data_spec, read_documents, split_validation
from .train import (BERT_SPECIALS, CHECKPOINT, DEFAULT_BASE_MODEL, IGNORE, add_config_arguments,
                    attention_dropout_option, attention_dropout_rule, check_field_types, check_tokenizer_fits,
                    check_windows_fit, config_from_args, config_option, device_option, device_rule, loading_base,
                    optimizer_step, resume_checkpoint, resume_option, rng_state_to_json, run_identity,
                    save_checkpoint, seed_rule, set_attention_dropout, start_run, use_bf16, warmup_then_decay)

log = logging.getLogger("newstagger.pretrain")
RECORD_FILE = "pretraining.json"
TOKENIZE_CHUNK = 1000  # texts per tokenizer call: its Python lists of ids stay small


@dataclass
class PretrainConfig:
    """A continued-pretraining run; saved into the output folder's pretraining.json."""

    text: list[str] = config_option(list, "text to pretrain on, PATH[:FORMAT]: any format `train` reads (labels are "
                                          "ignored), e.g. a JSONL archive of stories {\"id\", \"text\"} as "
                                          "FILE:internal")
    base_model: str = config_option(DEFAULT_BASE_MODEL, "BERT checkpoint to continue: hub name or local folder "
                                                         "(ideally with its MLM head; a missing one starts from "
                                                         "random weights)")
    output: str = config_option("runs/pretrained", "folder to write the continued checkpoint to")
    max_length: int = config_option(128, "tokens per block, [CLS] and [SEP] included")
    epochs: int = config_option(1, "passes over the text")
    max_steps: int = config_option(0, "stop after this many optimizer steps (0 = no limit)")
    batch_size: int = config_option(64, "blocks per optimizer step")
    learning_rate: float = config_option(1e-4, "peak AdamW learning rate")
    weight_decay: float = config_option(0.01, "AdamW weight decay")
    warmup_ratio: float = config_option(0.06, "share of steps spent warming the learning rate up")
    mlm_probability: float = config_option(0.15, "share of tokens masked")
    validation_fraction: float = config_option(0.02, "share of the documents held out to measure MLM loss and accuracy")
    max_validation_blocks: int = config_option(512, "most held-out blocks measured, to keep evaluation quick")
    device: str = device_option()
    attention_dropout: float = attention_dropout_option()
    bf16: bool = config_option(False, "train under bfloat16 autocast where the hardware has it (CUDA, or a CPU "
                                      "with AMX); fp32 elsewhere, with a warning")
    seed: int = config_option(13, "random seed (also fixes the held-out masks)")
    overwrite_output: bool = config_option(False, "pretrain into an OUTPUT folder that is not empty, replacing the "
                                                   "checkpoint there")
    threads: int = config_option(0, "torch CPU threads (0 = torch's default)")
    resume: bool = resume_option()
    checkpoint_minutes: float = config_option(10.0, "minutes of training between checkpoints for --resume (one is "
                                                    "also saved at each epoch's end); 0: after every step")

    def __post_init__(self):
        check_field_types(self)
        check_rules(self, (
            ("max_length", self.max_length >= MIN_WINDOW, f"at least {MIN_WINDOW}"),
            ("epochs", self.epochs >= 1, "at least 1"),
            ("max_steps", self.max_steps >= 0, "0 or more"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("learning_rate", self.learning_rate > 0, "positive"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "from 0 to under 1"),
            ("mlm_probability", 0 < self.mlm_probability < 1, "between 0 and 1"),
            ("validation_fraction", 0 < self.validation_fraction < 1, "between 0 and 1"),
            ("max_validation_blocks", self.max_validation_blocks >= 1, "at least 1"),
            device_rule(self.device),
            attention_dropout_rule(self.attention_dropout),
            ("threads", 0 <= self.threads <= MAX_THREADS, f"0 to {MAX_THREADS}"),
            ("checkpoint_minutes", self.checkpoint_minutes >= 0, "0 or more"),
            seed_rule(self.seed),
        ))


# What decides a run's text, blocks, masks and optimizer: resuming under other values would continue
# the weights on other text or another schedule. epochs and max_steps may change, as for train.
RUN_SETTINGS = ("text", "base_model", "max_length", "batch_size", "learning_rate", "weight_decay", "warmup_ratio",
                "mlm_probability", "validation_fraction", "max_validation_blocks", "attention_dropout", "seed")


def text_blocks(texts: list[str], tokenizer, max_length: int) -> list[np.ndarray]:
    """The texts' tokens, each text followed by [SEP], cut into blocks of at most `max_length` tokens
    that start with [CLS] and end with [SEP]. Arrays, not lists: an archive of 50M tokens as Python
    ints would take ~2 GB."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    pieces = [np.empty(0, dtype=np.int32)]
    for first in range(0, len(texts), TOKENIZE_CHUNK):
        for ids in tokenizer(texts[first : first + TOKENIZE_CHUNK], add_special_tokens=False,
                             split_special_tokens=True)["input_ids"]:
            if ids:  # a text of characters the tokenizer drops (zero-width spaces) adds nothing
                pieces.append(np.array([*ids, sep], dtype=np.int32))
    stream = np.concatenate(pieces)
    size = max_length - 2
    blocks = []
    for first in range(0, len(stream), size):
        chunk = stream[first : first + size]
        chunk = chunk[1:] if chunk[0] == sep else chunk  # the end of a text that filled the block before
        if len(chunk):
            ends = [[cls], chunk] if chunk[-1] == sep else [[cls], chunk, [sep]]
            blocks.append(np.concatenate(ends).astype(np.int32))
    return blocks


def masked_lm_loss(model: BertForMaskedLM, batch: dict, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, number right) over the masked tokens of a collated batch. The vocabulary
    projection runs on those tokens only: over all of them it costs as much as the encoder."""
    with torch.autocast(device_type=batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        masked = batch["labels"] != IGNORE
        logits = model.cls(hidden[masked]).float()
    targets = batch["labels"][masked]
    return F.cross_entropy(logits, targets), (logits.argmax(-1) == targets).sum()


@torch.no_grad()
def evaluate_mlm(model: BertForMaskedLM, blocks: list[np.ndarray], tokenizer, config: PretrainConfig,
                 device: torch.device, bf16: bool) -> dict:
    """MLM loss and accuracy on held-out blocks, masked the same way at every call (seeded collator)."""
    if not blocks:
        return {}
    model.eval()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mlm_probability, seed=config.seed)
    loss_sum, right, masked = 0.0, 0, 0
    for first in range(0, len(blocks), config.batch_size):
        batch = _masked_batch(collator, blocks[first : first + config.batch_size], device)
        count = int((batch["labels"] != IGNORE).sum())
        if count:
            loss, correct = masked_lm_loss(model, batch, bf16)
            loss_sum, right, masked = loss_sum + loss.item() * count, right + int(correct), masked + count
    return {"mlm_loss": round(loss_sum / max(1, masked), 4), "mlm_accuracy": round(right / max(1, masked), 4),
            "masked_tokens": masked, "blocks": len(blocks)}


def pretrain(config: PretrainConfig) -> tuple[Path, dict]:
    """Run continued pretraining as configured; returns the output folder and its record."""
    started = time.time()
    if (Path(config.output) / META_FILE).is_file():
        raise UsageError(f"output {config.output} holds a newstagger model; name another folder for the checkpoint")
    output, device, saved = start_run(config, "checkpoint")
    bf16 = use_bf16(config.bf16, device)

    documents = [doc for spec in config.text for doc in read_documents(*parse_data_spec(spec)) if doc.text.strip()]
    if not documents:
        raise DataError("no text to pretrain on: give at least one --text PATH[:FORMAT] with non-blank texts in it")
    train_docs, held_out = split_validation(documents, config.validation_fraction, seed=config.seed)
    train_docs = not_held_out(train_docs, {doc.text for doc in held_out})
    if not train_docs:
        raise DataError("no text to pretrain on: every text is also held out (the same text over and over?)")
    model, tokenizer, base_record = _base_checkpoint(config.base_model)
    set_attention_dropout(model, config.attention_dropout)
    check_windows_fit(model.config, max_length=config.max_length)
    model.to(device)
    blocks = text_blocks([doc.text for doc in train_docs], tokenizer, config.max_length)
    valid_blocks = text_blocks([doc.text for doc in held_out], tokenizer, config.max_length)[
        : config.max_validation_blocks]
    if not blocks:
        raise DataError("no text to pretrain on: the texts hold no token the base's tokenizer knows")
    if not valid_blocks:
        log.warning("nothing held out (one document or one group): MLM loss and accuracy are not measured")
    log.info("pretraining text: %s in %d blocks of up to %d tokens; held out: %d blocks", _text_stats(train_docs),
             len(blocks), config.max_length, len(valid_blocks))

    steps_per_epoch = math.ceil(len(blocks) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = warmup_then_decay(optimizer, config.warmup_ratio, total_steps)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mlm_probability)
    rng = random.Random(config.seed)
    run = run_identity(config, RUN_SETTINGS, config.text)
    # epoch: epochs done; position: batches of the next one done; rng: the state its order is shuffled from
    state = {"epoch": 0, "step": 0, "position": 0, "rng": rng_state_to_json(rng.getstate()), "tokens": 0,
             "running_loss": None, "seconds": 0.0, "history": []}
    if saved:
        state, _ = resume_checkpoint(saved, run, model, optimizer, scheduler, rng)
    else:
        state["before"] = evaluate_mlm(model, valid_blocks, tokenizer, config, device, bf16)
        log.info("held out, before: %s", state["before"])
    state["run"] = run
    checkpoint = Checkpoint(output / CHECKPOINT, model, optimizer, scheduler, state, config.checkpoint_minutes, started)
    while state["epoch"] < config.epochs and state["step"] < total_steps:
        order = list(range(len(blocks)))
        rng.shuffle(order)
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        bar = tqdm(total=len(batches), initial=state["position"], desc=f"epoch {state['epoch'] + 1}/{config.epochs}",
                   unit="batch", file=sys.stderr)
        _mlm_epoch(model, blocks, batches, bar, collator, optimizer, scheduler, device, bf16, state, total_steps,
                   checkpoint)
        if state["position"] == len(batches):  # else max_steps ended it, and a resume with more continues it
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            state["rng"] = rng_state_to_json(rng.getstate())
        _measure(model, valid_blocks, tokenizer, config, device, bf16, state, steps_per_epoch)
        checkpoint.save()

    if not state["step"]:
        raise DataError("too little text: no batch had a token to mask, so nothing was trained")
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        # resumed with fewer epochs or steps than a checkpoint taken mid-epoch holds: its weights are saved
        _measure(model, valid_blocks, tokenizer, config, device, bf16, state, steps_per_epoch)
    before, after = state["before"], state["history"][-1]["held_out"]
    record = {
        "continued_from": config.base_model,
        "config": asdict(config),
        "text": {"train": _text_stats(train_docs), "held_out": _text_stats(held_out), "blocks": len(blocks)},
        "steps": state["step"],
        "tokens_seen": state["tokens"],
        "seconds": round(checkpoint.seconds(), 1),
        "device": device.type,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "torch": torch.__version__,
        "held_out": {"before": before, "after": after},
        "history": state["history"],
        **({"base_pretraining": base_record} if base_record else {}),
    }
    _save(output, model, tokenizer, record)
    log.info("saved %s: held-out MLM accuracy %s -> %s", output, before.get("mlm_accuracy", "-"),
             after.get("mlm_accuracy", "-"))
    return output, record


def _measure(model: BertForMaskedLM, valid_blocks: list[np.ndarray], tokenizer, config: PretrainConfig,
             device: torch.device, bf16: bool, state: dict, steps_per_epoch: int) -> None:
    """Held-out MLM figures of the weights as they stand, as a row of `state["history"]`, whose epoch
    is fractional where the weights stand inside one."""
    after = evaluate_mlm(model, valid_blocks, tokenizer, config, device, bf16)
    epochs_done = round(state["epoch"] + state["position"] / steps_per_epoch, 3) if state["position"] else state["epoch"]
    state["history"].append({"epoch": epochs_done, "step": state["step"],
                             "training_loss": round(state["running_loss"] or 0.0, 4), "held_out": after})
    log.info("epoch %s: %s", epochs_done, state["history"][-1])


class Checkpoint:
    """Saves a run's state for --resume into `folder` when asked, or after `minutes` of training since
    the last save: an epoch over a large archive can outlast a GPU lease. Also keeps the run's time,
    sessions before a resume included, in `state["seconds"]`."""

    def __init__(self, folder: Path, model, optimizer, scheduler, state: dict, minutes: float, started: float):
        self.folder, self.model, self.optimizer, self.scheduler, self.state = folder, model, optimizer, scheduler, state
        self.interval, self.last = minutes * 60, time.monotonic()
        self.earlier_seconds, self.started = state["seconds"], started

    def seconds(self) -> float:
        return self.earlier_seconds + time.time() - self.started

    def save_if_due(self) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.save()

    def save(self) -> None:
        if not self.state["step"]:  # nothing trained, nothing to resume (and no output folder yet)
            return
        self.state["seconds"] = self.seconds()
        save_checkpoint(self.folder, self.model, self.optimizer, self.scheduler, self.state)
        self.last = time.monotonic()


def _mlm_epoch(model: BertForMaskedLM, blocks: list[np.ndarray], batches: list[list[int]], bar: tqdm, collator,
               optimizer, scheduler, device: torch.device, bf16: bool, state: dict, total_steps: int,
               checkpoint: Checkpoint) -> None:
    """The rest of an epoch's batches (lists of block indices) from `state["position"]`, to the end or
    to `total_steps`, skipping any with nothing masked; counts steps, tokens, the smoothed loss and the
    position in `state`."""
    model.train()
    for position in range(state["position"], len(batches)):
        if state["step"] >= total_steps:
            break
        batch = _masked_batch(collator, [blocks[i] for i in batches[position]], device)
        state["position"] = position + 1
        bar.update()
        if not (batch["labels"] != IGNORE).any():  # a few short blocks can come out with nothing masked
            continue
        loss, _ = masked_lm_loss(model, batch, bf16)
        state["running_loss"] = optimizer_step(model, loss, optimizer, scheduler, bar, state["running_loss"])
        state["step"] += 1
        state["tokens"] += int(batch["attention_mask"].sum())
        checkpoint.save_if_due()
    bar.close()


def _base_checkpoint(name_or_path: str) -> tuple[BertForMaskedLM, object, dict | None]:
    """(masked-LM model, tokenizer, the checkpoint's own pretraining record or None)."""
    with loading_base(name_or_path):
        model, loading = BertForMaskedLM.from_pretrained(name_or_path, dtype=torch.float32, output_loading_info=True,
                                                        use_safetensors=True)
        check_encoder_loaded(model, loading)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    check_tokenizer_fits(name_or_path, tokenizer, model.config, special=(*BERT_SPECIALS, "mask"))
    if any(key.startswith("cls.") for key in loading["missing_keys"]):
        log.warning("%s has no masked-LM head; it starts from random weights, so early steps mostly train it",
                    name_or_path)
    record_path = Path(name_or_path) / RECORD_FILE
    try:
        base_record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else None
    except ValueError:
        log.warning("%s is not valid JSON; the base's pretraining record is not carried over", record_path)
        base_record = None
    return model, tokenizer, base_record


def _save(output: Path, model: BertForMaskedLM, tokenizer, record: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)  # safetensors
    (output / "model.safetensors").chmod(0o644)  # safetensors writes 0600 (see model.save_model_folder)
    tokenizer.save_pretrained(output)
    (output / RECORD_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")


def _text_stats(documents: list[Document]) -> dict:
    return {"documents": len(documents), "characters": sum(len(doc.text) for doc in documents)}


def _masked_batch(collator: DataCollatorForLanguageModeling, blocks: list[np.ndarray], device: torch.device) -> dict:
    """Blocks padded and masked by the collator, on the device."""
    batch = collator([{"input_ids": block.tolist()} for block in blocks])
    return {key: value.to(device) for key, value in batch.items()}


def register(subparsers) -> None:
    parser = subparsers.add_parser("pretrain", help="continue a BERT's masked-LM pretraining on your own text",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON or TOML file of settings; flags override it")
    add_config_arguments(parser, PretrainConfig)
    parser.set_defaults(handler=run)


def run(args) -> int:
    config = config_from_args(args, PretrainConfig)
    if not config.text:
        raise UsageError("no text: give --text PATH[:FORMAT] or 'text' in --config")
    folder, record = pretrain(config)
    print(json.dumps({"model": str(folder), "held_out": record["held_out"], "steps": record["steps"],
                      "tokens_seen": record["tokens_seen"], "seconds": record["seconds"]}, ensure_ascii=False,
                     indent=2))
    return 0
