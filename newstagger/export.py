"""`newstagger export`: write the model's ONNX graph (and optionally an int8 copy) into its folder.

Files, under `<model folder>/onnx/`: `model.onnx` (fp32, attention fused by ONNX Runtime's BERT
optimizer), `model.int8.onnx` with `--quantize int8` (dynamic quantization: int8 weights, int8
activations quantized per call), and `export.json` saying what was exported from what. `tag` and
`bench` run them with `--backend onnx`; `newstagger check` measures how far they agree with
PyTorch fp32, and `--backend auto` (always used by `serve`) takes the int8 graph only once it has
passed, ahead of PyTorch fp32 wherever PyTorch bf16 (AMX CPUs) is not taken first (the fp32 graph is
no faster than PyTorch fp32, so auto ranks it last).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .agreement import drop_agreement
from .backends import OnnxBackend, ScoringModule, TorchBackend, onnx_path
from .cli import add_model_argument
from .model import EXPORT_RECORD, ONNX_DIR, load_model_folder, weights_sha256

logger = logging.getLogger(__name__)

OPSET = 17
# An exported fp32 graph matches PyTorch to ~1e-6; anything near this means a broken export
# (for instance a data-dependent branch frozen by the tracer), not rounding.
EXPORT_TOLERANCE = 1e-3


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write an ONNX graph (optionally int8) into a model folder",
                                   description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--quantize", choices=("int8",), help="also write a dynamically quantized int8 graph")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from .folders import default_model_dir

    try:
        record = export_onnx(Path(args.model or default_model_dir()), quantize=args.quantize)
    except ExportError as err:
        print(f"newstagger export: error: {err}", file=sys.stderr)
        return 1
    for precision, entry in record["files"].items():
        print(f"{precision}: {entry['path']} ({entry['bytes'] / 1e6:.1f} MB)")
    print(f"next: `newstagger check --model {args.model or default_model_dir()}` records how far they agree with fp32")
    return 0


class ExportError(RuntimeError):
    """The exported graph cannot be used; the folder keeps what it had."""


def export_onnx(folder: Path, quantize: str | None = None) -> dict:
    """Export, optimize, verify and optionally quantize; returns (and writes) the export record.

    Everything is written into a staging folder that replaces `onnx/` only once the graphs passed
    verification, so a failed or interrupted export never leaves graphs for `--backend onnx` to use.
    """
    exported_weights = weights_sha256(folder)  # before reading them: weights copied in meanwhile are not these
    model = load_model_folder(folder)[0]
    # ORT's BERT optimizer recognises (and fuses) attention only in the eager formulation.
    model.set_attn_implementation("eager")
    out, staging = folder / ONNX_DIR, folder / f"{ONNX_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        precisions = ["fp32", "int8"] if quantize == "int8" else ["fp32"]
        files = {p: staging / onnx_path(folder, p).name for p in precisions}
        raw_path = staging / "model.unoptimized.onnx"
        inputs = _trace(model, raw_path)
        fused = _optimize(raw_path, files["fp32"], model.config)
        raw_path.unlink()
        max_difference = _verify(model, files["fp32"])
        if quantize == "int8":
            _quantize(files["fp32"], files["int8"])
        written = {p: {"path": str(onnx_path(folder, p).relative_to(folder)), "bytes": f.stat().st_size}
                   for p, f in files.items()}
        record = _export_record(written, inputs, fused, max_difference) | {"weights_sha256": exported_weights}
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        # Checks recorded for the graphs just replaced say nothing about these (a failed export keeps both).
        drop_agreement(folder, [f"onnx-{p}" for p in ("fp32", "int8")])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s", ", ".join(str(onnx_path(folder, p)) for p in precisions))
    return record


def _export_record(files: dict[str, dict], inputs: list[str], fused: dict[str, int], max_difference: float) -> dict:
    return {
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format": "onnx",
        "opset": OPSET,
        "inputs": inputs,
        "outputs": ["topic_logits float32 [batch, topics]", "tag_log_probs float32 [batch, sequence, tags]"],
        "fused_operators": fused,
        "fp32_max_abs_difference_vs_torch": max_difference,
        "files": files,
        "torch": torch.__version__,
        "onnxruntime": _ort_version(),
    }


def _example_inputs(model) -> tuple[torch.Tensor, ...]:
    """Two rows of different lengths: with an all-ones mask the tracer would freeze the
    'no padding' branch of the attention mask into the graph."""
    input_ids = torch.tensor([[2, 5, 6, 7, 8, 3], [2, 5, 3, 0, 0, 0]], dtype=torch.long)
    inputs = input_ids, (input_ids != 0).long()
    return inputs if model.lexicon is None else (*inputs, model.lexicon(input_ids))


def _trace(model, path: Path) -> list[str]:
    """Write the graph; returns its inputs, described."""
    sequence_axes = {0: "batch", 1: "sequence"}
    inputs = {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, sequence]"}
    if model.lexicon is not None:
        inputs["lexicon_features"] = (f"float32 [batch, sequence, {model.lexicon.num_features}] (the model's "
                                      "lexicon applied to input_ids; OnnxBackend computes them)")
    names = list(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes: checked by _verify
        torch.onnx.export(
            ScoringModule(model).eval(),
            _example_inputs(model),
            str(path),
            dynamo=False,  # the TorchScript exporter handles this model reliably
            input_names=names,
            output_names=["topic_logits", "tag_log_probs"],
            dynamic_axes={**{name: sequence_axes for name in names},
                          "topic_logits": {0: "batch"}, "tag_log_probs": sequence_axes},
            opset_version=OPSET,
        )
    return [f"{name} {description}" for name, description in inputs.items()]


def _optimize(source: Path, target: Path, config) -> dict[str, int]:
    """Fuse attention, GELU and layer norms (ORT's transformer optimizer); returns fused op counts."""
    from onnxruntime.transformers import optimizer

    # opt_level 0: only the portable fusions, so the file runs on any ORT build and machine.
    with _quiet_logging():
        optimized = optimizer.optimize_model(str(source), model_type="bert", num_heads=config.num_attention_heads,
                                             hidden_size=config.hidden_size, opt_level=0)
        optimized.save_model_to_file(str(target))
        return {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}


def _verify(model, path: Path) -> float:
    """Largest |ORT - torch| over both outputs on a padded batch of another shape than the trace's."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, model.config.vocab_size, (3, 37), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 20:] = 0
    arrays = input_ids.numpy(), attention_mask.numpy()
    expected = TorchBackend(model)(*arrays)
    got = OnnxBackend(path, "fp32", threads=1, lexicon=model.lexicon)(*arrays)
    # initial=0: a model of one task has an empty output for the other
    difference = max(float(np.abs(e - g).max(initial=0.0)) for e, g in zip(expected, got))
    if difference > EXPORT_TOLERANCE:
        raise ExportError(f"the exported graph disagrees with PyTorch by {difference:.2e}; not using it "
                          f"(the folder keeps what it had)")
    return difference


def _quantize(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The heads stay fp32: they cost next to nothing and their outputs are the decisions. (The
    # quantizer first rewrites a Gemm into MatMul + Add, the MatMul named "<gemm>_MatMul".)
    heads = [node.name for node in onnx.load(str(source), load_external_data=False).graph.node if "_head/" in node.name]
    heads += [f"{name}_MatMul" for name in heads if name.endswith("Gemm")]
    # The fused ops come from ORT's own domain, which ONNX shape inference cannot type; the
    # default type tells the quantizer their outputs are fp32.
    with _quiet_logging():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=heads, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


@contextlib.contextmanager
def _quiet_logging():
    """ORT's optimizer and quantizer log every fused node and tensor at INFO/WARNING, some of it
    on the root logger."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
