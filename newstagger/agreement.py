"""`newstagger check`: do the fast backends give the answers PyTorch fp32 gives?

Each candidate (bf16 PyTorch, fp32 and int8 ONNX Runtime) tags the same fixed texts as the fp32
reference: 200 generated stories by default, or a JSONL file of real ones (`--texts`); the
generated ones pack entity names closer together than real news does, so they are the harsher
test. A candidate passes when

- at least 99% of entities are identical (same start, end and type), counted over the union of
  both outputs, so both a missed and an extra entity count against it, and
- every topic score is within 0.02 of the reference, and
- at least 100 entities were compared (for a model that tags no entities, 100 texts): texts that
  hold (almost) none test nothing, so such a check gives no verdict (`passed` is null) and is not
  recorded over an earlier one.

Results go into the model folder's metrics.json under "agreement" (and so into its model card),
each with the sha256 of the weights it was measured on; `--backend auto` picks bf16 or int8 only
once they are recorded there as passed for the weights the folder holds. The reference and
the PyTorch candidate run on `--device` (CUDA where present), ONNX Runtime on the CPU: a GPU
host whose CPU has no bf16 units checks bf16 where it will run it. A bf16 pass on either device
stands for both, as it says the model's answers survive bf16 rounding.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from .bench import synthetic_stories
from .cli import add_model_argument, names_from, positive_int
from .documents import DataError, check_encodable, json_object, text_field, utf8_only
from .errors import UsageError
from .model import read_meta, read_metrics, weights_sha256, write_description
from .tag_command import story_line

SPAN_AGREEMENT_MIN = 0.99
MIN_ENTITIES_COMPARED = 100
MIN_TEXTS_COMPARED = 100  # for a model without entity types, whose verdict rests on topic scores alone
CHECK_SEED = 20261
TOPIC_TOLERANCE = 0.02
CANDIDATES = ("torch-bf16", "onnx-fp32", "onnx-int8")


def register(subparsers) -> None:
    from .backends import DEVICES

    parser = subparsers.add_parser("check", help="check fast backends against PyTorch fp32 and record the result",
                                   description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--candidates", type=names_from(CANDIDATES), default=",".join(CANDIDATES),
                        help="comma-separated backend-precision pairs (default: %(default)s; those this "
                             "machine or folder cannot run are skipped)")
    parser.add_argument("--documents", type=positive_int, default=200, help="generated stories to compare on")
    parser.add_argument("--texts", metavar="FILE",
                        help="compare on these texts instead: JSONL with a 'text' field per line (tag input, "
                             "CLUENER, the internal format)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the reference and the torch candidate run (auto: CUDA when available)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave metrics.json and the card alone")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from .folders import default_model_dir

    folder = Path(args.model or default_model_dir())
    if args.texts:
        texts = _read_texts(args.texts)
        if not texts:  # agreement on nothing would be recorded as a pass
            raise DataError(f"--texts: no texts in {args.texts}")
        corpus = f"{Path(args.texts).name} ({len(texts)} texts)"
    else:
        texts = synthetic_stories(args.documents, seed=CHECK_SEED)
        corpus = f"generated stories (seed {CHECK_SEED})"
    results = check_agreement(folder, args.candidates, texts, corpus, device=args.device)
    for name, result in results.items():
        if "skipped" in result:
            print(f"{name}: skipped ({result['skipped']})")
        else:
            verdict = {True: "PASS", False: "FAIL", None: "NO VERDICT"}[result["passed"]]
            too_few = f" ({result['no_verdict']}; not recorded)" if result["passed"] is None else ""
            print(f"{name}: {verdict}  identical entities {result['span_agreement']:.2%} of {result['entities']}"
                  f"{too_few}, max topic score difference {result['max_topic_difference']:.4f}")
    checked = {name: result for name, result in results.items() if "skipped" not in result}
    if not args.no_record:
        record_agreement(folder, {name: result for name, result in checked.items() if result["passed"] is not None})
    if not checked:  # a gate that measured nothing has not passed
        print("nothing was checked: every candidate was skipped", file=sys.stderr)
        return 1
    return 0 if all(result["passed"] for result in checked.values()) else 1


def _read_texts(path: str) -> list[str]:
    """The 'text' of each line of a JSONL file, blank lines and byte-order marks read as `tag` reads
    them; DataError names the line of a bad one."""
    texts = []
    with open(path, encoding="utf-8") as lines, utf8_only(path):
        for number, line in enumerate(lines, start=1):
            line = story_line(line, number)
            if line is not None:
                text = text_field(json_object(line, f"{path}:{number}"), f"{path}:{number}")
                check_encodable(text, "text", f"{path}:{number}")
                texts.append(text)
    return texts


def check_agreement(folder: Path, candidates: Iterable[str], texts: Sequence[str], corpus: str,
                    device: str = "cpu") -> dict[str, dict]:
    """{"backend-precision": result} for each candidate, against PyTorch fp32 on the same texts
    (`corpus` names them in the record)."""
    from .backends import choose_backend, make_backend, resolve_device
    from .tagger import Tagger

    candidates = list(candidates)
    torch_device = resolve_device(device)
    results, runnable = {}, {}
    for name in candidates:  # before the reference runs: it takes minutes on a slow CPU, maybe for nothing
        backend, _, precision = name.partition("-")
        where = torch_device.type if backend == "torch" else "cpu"
        try:
            choose_backend(Path(folder), backend, precision, where)
            runnable[name] = backend, precision, where
        except UsageError as err:
            results[name] = {"skipped": str(err)}
    if not runnable:
        return results
    reference = Tagger.load_exact(folder, device=torch_device.type)
    expected = reference.tag(texts)
    weights = weights_sha256(Path(folder))  # a verdict holds for these weights only
    enough = ({"min_entities": MIN_ENTITIES_COMPARED} if reference.schema.entity_types
              else {"min_entities": 0, "min_documents": MIN_TEXTS_COMPARED})
    for name, (backend, precision, where) in runnable.items():
        fast = make_backend(folder, reference.model, backend, precision, device=where)
        candidate = Tagger(reference.model, reference.tokenizer, reference.meta, backend=fast,
                           topic_lexical=reference.topic_lexical)
        results[name] = {**compare(expected, candidate.tag(texts), **enough), "corpus": corpus, "device": where,
                         "weights_sha256": weights}
    return {name: results[name] for name in candidates}


def compare(expected: Sequence[dict], got: Sequence[dict], min_entities: int = MIN_ENTITIES_COMPARED,
            min_documents: int = 0) -> dict:
    """Agreement of two `Tagger.tag` outputs for the same texts (see the module docstring); with
    fewer than `min_entities` entities or `min_documents` texts compared, no verdict."""
    identical = union = 0
    for reference, candidate in zip(expected, got, strict=True):
        spans_reference = {(e["start"], e["end"], e["type"]) for e in reference["entities"]}
        spans_candidate = {(e["start"], e["end"], e["type"]) for e in candidate["entities"]}
        identical += len(spans_reference & spans_candidate)
        union += len(spans_reference | spans_candidate)
    topic_difference = max((abs(score - candidate["topics"][topic])
                            for reference, candidate in zip(expected, got)
                            for topic, score in reference["topics"].items()), default=0.0)
    span_agreement = identical / union if union else 1.0
    too_few = ([f"too few entities to judge: a verdict needs {min_entities}"] if union < min_entities else []) + \
        ([f"too few texts to judge: a verdict needs {min_documents}"] if len(expected) < min_documents else [])
    return {
        "documents": len(expected),
        "entities": union,
        "span_agreement": round(span_agreement, 4),
        "max_topic_difference": round(topic_difference, 4),
        "passed": None if too_few else span_agreement >= SPAN_AGREEMENT_MIN and topic_difference <= TOPIC_TOLERANCE,
        **({"no_verdict": "; ".join(too_few)} if too_few else {}),
        "checked": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record_agreement(folder: Path, results: dict[str, dict]) -> None:
    """Merge results into metrics.json["agreement"] and re-render the model card."""
    _update_agreement(folder, lambda record: {**record, **results})


def drop_agreement(folder: Path, names: Iterable[str]) -> None:
    """Forget results that no longer describe the folder (its ONNX graphs were re-exported)."""
    names = set(names)
    _update_agreement(folder, lambda record: {k: v for k, v in record.items() if k not in names})


def _update_agreement(folder: Path, change) -> None:
    metrics = read_metrics(folder)
    before = metrics.get("agreement", {})
    after = change(before)
    if after == before:
        return
    if after:
        metrics["agreement"] = after
    else:
        metrics.pop("agreement", None)
    write_description(folder, read_meta(folder), metrics)
