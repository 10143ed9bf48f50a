"""Runtimes that score padded token batches, and the choice of the fastest correct one.

A backend is a callable `(input_ids int64 [B, L], attention_mask int64 [B, L]) ->
(topic_logits float32 [B, K], tag_log_probs float32 [B, L, T])`, so the tagger neither knows nor
cares what runs the encoder:

- `TorchBackend`: PyTorch in fp32, or bf16 where the hardware has bf16 matrix instructions (CUDA,
  or a CPU with AMX; with AVX512-BF16 alone only when asked for: slower than fp32 there);
- `OnnxBackend`: ONNX Runtime on the graph `newstagger export` wrote into the model folder, fp32
  (PyTorch fp32's results to ~1e-6) or int8 (dynamically quantized).

`auto` takes the fastest candidate for this machine that is also *correct*: fp32 always is; bf16
and int8 only once `newstagger check` has recorded in the folder's metrics.json that they agree
with fp32 on this model, so an approximation is never switched on silently.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UsageError
from .lexicon import TokenLexicon
from .model import EXPORT_RECORD, ONNX_DIR, NewsTaggerModel, read_metrics, weights_sha256

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
DEVICES = ("auto", "cpu", "cuda")

ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}

# Padded tokens per encoder call. On CPU, 16 windows of 256 ran as fast as 32 or 64 of them
# (bigger batches spill out of cache); a GPU needs far larger batches to stay busy.
CPU_BATCH_TOKENS = 4096
CUDA_BATCH_TOKENS = 65536


class ScoringModule(nn.Module):
    """What every backend runs: the joint model plus the tag log-softmax, with fp32 outputs."""

    def __init__(self, model: NewsTaggerModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lexicon_features: torch.Tensor | None = None):
        topic_logits, tag_logits = self.model(input_ids, attention_mask, lexicon_features)
        return topic_logits.float(), torch.log_softmax(tag_logits.float(), dim=-1)


class TorchBackend:
    name = "torch"

    def __init__(self, model: NewsTaggerModel, precision: str = "fp32", device: str | torch.device = "cpu",
                 threads: int | None = None):
        if precision not in ("fp32", "bf16"):
            raise UsageError(f"the torch backend runs fp32 or bf16, not {precision}")
        self.precision = precision
        self.device = torch.device(device)
        if precision == "bf16":
            # Casting the whole model measured faster than autocast (no casts per call); a copy,
            # so the caller's fp32 model stays usable (the agreement check compares the two).
            model = copy.deepcopy(model).to(torch.bfloat16)
        self.scoring = ScoringModule(model).to(self.device).eval()
        self.batch_tokens = CUDA_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS
        # oneDNN keeps ~3.5 MB of kernels and primitives for every bf16 batch shape it meets, and
        # length-bucketed batches come in hundreds of shapes, so RSS crept up all through a long
        # `tag` run; rounding the row count keeps the shapes few.
        self.round_rows = self.device.type == "cpu" and precision == "bf16"
        self.threads = threads

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # set in the calling thread: torch's count reaches only the threads that had not run torch yet
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        rows = len(input_ids)
        padded_rows = _few_row_counts(rows) if self.round_rows else rows
        if padded_rows > rows:  # filler rows repeat the last one: no all-padding rows, results dropped
            input_ids, attention_mask = (np.concatenate([a, np.repeat(a[-1:], padded_rows - rows, axis=0)])
                                         for a in (input_ids, attention_mask))
        topic_logits, tag_log_probs = self.scoring(self._to_device(input_ids), self._to_device(attention_mask))
        return topic_logits[:rows].cpu().numpy(), tag_log_probs[:rows].cpu().numpy()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            # From page-locked memory the copy runs as DMA, without a staging copy.
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def __str__(self) -> str:
        return f"torch {self.precision} on {self.device}"


def _few_row_counts(rows: int) -> int:
    """`rows` rounded up to a power of two up to 16, and to a multiple of 16 beyond: few shapes, and
    at most 15 filler rows for a big batch."""
    return 1 << (rows - 1).bit_length() if rows <= 16 else -(-rows // 16) * 16


class OnnxBackend:
    name = "onnx"
    device = torch.device("cpu")
    batch_tokens = CPU_BATCH_TOKENS

    def __init__(self, path: str | Path, precision: str, threads: int, lexicon: TokenLexicon | None = None):
        """`lexicon`: the model's, for a graph exported with a `lexicon_features` input."""
        import onnxruntime as ort

        self.precision = precision
        # Its own copy on the CPU, where ONNX Runtime runs: `check --device cuda` moves the model that
        # lent it to the GPU, and look-ups on the GPU's keys fail for ids on the CPU.
        self.lexicon = copy.deepcopy(lexicon).cpu() if lexicon is not None else None
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning ORT threads keep their cores busy between calls and slow everything else in
        # the process (torch ran 3-5x slower right after an ORT call with spinning on).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.lexicon is not None:
            with torch.inference_mode():
                inputs["lexicon_features"] = self.lexicon(torch.from_numpy(input_ids)).numpy()
        topic_logits, tag_log_probs = self.session.run(None, inputs)
        return topic_logits, tag_log_probs

    def __str__(self) -> str:
        return f"onnx {self.precision} on cpu ({self.path.name})"


def make_backend(folder: str | Path, model: NewsTaggerModel, backend: str = "auto", precision: str = "auto",
                 device: str = "auto", threads: int | None = None):
    """The backend asked for, or under `auto` the fastest correct one this machine and folder offer.

    `threads` (default: every core this process may use) sets the intra-op threads of both
    runtimes: torch's default for the process, and its count in every thread the backend scores in.
    """
    folder = Path(folder)
    chosen_backend, chosen_precision, device = choose_backend(folder, backend, precision, device)
    threads = threads or available_cores()
    torch.set_num_threads(threads)
    if agreement_record(folder, chosen_backend, chosen_precision).get("passed") is False:  # asked for by name
        logger.warning("%s-%s failed `newstagger check` on %s: its answers differ from fp32's beyond the "
                       "tolerance", chosen_backend, chosen_precision, folder)
    if chosen_backend == "onnx":
        made = OnnxBackend(onnx_path(folder, chosen_precision), chosen_precision, threads, model.lexicon)
    else:
        made = TorchBackend(model, chosen_precision, device, threads)
    logger.info("scoring with %s, %d threads", made, threads)
    return made


def choose_backend(folder: Path, backend: str = "auto", precision: str = "auto",
                   device: str = "auto") -> tuple[str, str, torch.device]:
    """(backend, precision, device) that `make_backend` would build, or UsageError saying why none can
    run here; nothing is loaded."""
    if backend not in BACKENDS or precision not in PRECISIONS or device not in DEVICES:
        raise UsageError(f"unknown backend/precision/device {backend}/{precision}/{device}")
    device = resolve_device("cpu" if backend == "onnx" and device == "auto" else device)  # ONNX runs on the CPU
    choices = [(b, p) for b, p in ranked_candidates(folder, device)
               if backend in ("auto", b) and precision in ("auto", p)]
    if precision == "auto":
        # Only what the user names explicitly may run unchecked.
        choices = [(b, p) for b, p in choices if p == "fp32" or agreement_passed(folder, b, p)]
    if not choices:
        raise UsageError(_unavailable_reason(folder, backend, precision, device))
    return *choices[0], device


def ranked_candidates(folder: Path, device: torch.device) -> list[tuple[str, str]]:
    """(backend, precision) pairs this machine and folder can run, fastest first.

    CPU order as `newstagger bench` measured it on an AMX Xeon (README, Performance): torch bf16
    well ahead, then ONNX int8, then torch fp32, with ONNX fp32 last (its fused graph was no
    faster than eager PyTorch there). On an AVX2-only CPU the three fp32/int8 paths ran at the
    same speed, so the order costs nothing there; with AVX512-BF16 but no AMX, bf16 comes last.
    """
    if device.type == "cuda":
        return [("torch", "bf16"), ("torch", "fp32")] if torch.cuda.is_bf16_supported() else [("torch", "fp32")]
    bf16_units = cpu_bf16_units()
    ranked = [("torch", "bf16")] if bf16_units == "amx" else []
    exported = onnx_path(folder, "fp32").is_file()
    if exported and (stale := onnx_export_stale(folder)):
        logger.warning("%s; its graphs are not used: run `newstagger export --model %s` again", stale, folder)
        exported = False
    if exported and onnx_path(folder, "int8").is_file():
        ranked.append(("onnx", "int8"))
    ranked.append(("torch", "fp32"))
    if exported:
        ranked.append(("onnx", "fp32"))
    if bf16_units == "avx512_bf16":  # correct there, but slower than fp32: run only when asked for by name
        ranked.append(("torch", "bf16"))
    return ranked


def onnx_export_stale(folder: Path) -> str | None:
    """Why the folder's ONNX graphs may not stand for the weights it holds now, or None where they
    were exported from them: saving a model over the folder removes its graphs, but weights copied
    in by hand would leave graphs that answer for another model."""
    record_path = folder / ONNX_DIR / EXPORT_RECORD
    try:
        recorded = json.loads(record_path.read_text(encoding="utf-8")).get("weights_sha256")
    except (OSError, ValueError, AttributeError):  # no record, or one that is not a JSON object
        return f"{record_path} cannot be read"
    if recorded != weights_sha256(folder):
        return f"{folder}'s ONNX export was not made from the model.safetensors it holds now"
    return None


def agreement_passed(folder: Path, backend: str, precision: str) -> bool:
    """Whether `newstagger check` recorded that this backend agrees with fp32 on this model."""
    return bool(agreement_record(folder, backend, precision).get("passed"))


def agreement_record(folder: Path, backend: str, precision: str) -> dict:
    """What `newstagger check` recorded for this backend on the weights the folder holds ({} where it
    never ran on them: a record of weights copied over by hand says nothing of these)."""
    record = read_metrics(folder).get("agreement", {}).get(f"{backend}-{precision}", {})
    if record and record.get("weights_sha256") != weights_sha256(folder):
        logger.warning("%s: the `newstagger check` verdict on %s-%s was made on other weights and is not used; "
                       "run `newstagger check --model %s` again", folder, backend, precision, folder)
        return {}
    return record


def _unavailable_reason(folder: Path, backend: str, precision: str, device: torch.device) -> str:
    if (backend, precision) in (("torch", "int8"), ("onnx", "bf16")):
        return "the torch backend runs fp32 or bf16, the onnx backend fp32 or int8"
    if backend == "onnx" and device.type == "cuda":
        return "the onnx backend runs on the CPU only; use --device cpu or --backend torch"
    if precision == "bf16":
        return "this CPU has no bf16 matrix instructions (AMX or AVX512-BF16); use fp32, or int8 with onnx"
    export = f"newstagger export --model {folder}" + (" --quantize int8" if precision == "int8" else "")
    if not onnx_path(folder, "fp32").is_file():
        return f"{folder} has no ONNX export; run `{export}` first"
    if stale := onnx_export_stale(folder):
        return f"{stale}; run `{export}` again"
    return f"{folder} has no int8 graph; run `{export}`"


def onnx_path(folder: Path, precision: str) -> Path:
    return folder / ONNX_DIR / ONNX_FILES[precision]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    return torch.device(device)


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix instructions: "amx", the tiles with which bf16 beats fp32; "avx512_bf16",
    dot products alone, correct but slower than fp32; None, where bf16 is emulated and far slower.
    Measured with the 6-layer model on 2 cores (README, Performance): bf16 tagged at 3.6x fp32's speed
    on a Xeon with AMX, and at 0.89x on a Xeon whose AMX a hypervisor hides, leaving AVX512-BF16."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so stay with fp32
        return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (`docker
    run --cpus`, a Kubernetes limit), which affinity does not show and past which threads are only
    throttled."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(cores, int(quota))) if quota else cores


def cgroup_cpu_quota(cgroup: Path) -> float | None:
    """The CPUs a cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`) limit allows
    the container whose cgroup folder this is, or None where there is none."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        return quota / int((cgroup / "cpu" / "cpu.cfs_period_us").read_text()) if quota > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None
