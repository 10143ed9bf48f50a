"""`newstagger bench`: end-to-end tagging speed per backend and precision, against the bare encoder.

For each backend-precision pair, in a fresh process (so peak RSS is that pair's own and no two
runtimes share a process), it tags a generated corpus of stories 100 to 3,000 characters long
through the same streaming path as `newstagger tag` (JSONL in, JSONL out) and prints characters/s,
documents/s and peak RSS. It also records every batch the tagger sent to the encoder and replays
exactly those batches through the backend alone: the ratio of the two speeds is the share of
time spent in the encoder, i.e. 1 - the overhead of everything around it (tokenizing, windowing,
padding, decoding, JSON).

Two helpers for the streaming claim: `--write-corpus FILE` writes a generated JSONL corpus (make
it 1 GB with --documents 400000), and `--watch-tag FILE` runs `newstagger tag` on it, printing its
RSS and how far it has read as it goes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .cli import add_model_argument, names_from, positive_int, positive_seconds
from .errors import UsageError
from .tag_command import add_runtime_arguments

CONFIGURATIONS = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure tagging speed per backend and precision",
                                   description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--configs", type=names_from(CONFIGURATIONS), default=",".join(CONFIGURATIONS),
                        help="comma-separated backend-precision pairs (default: %(default)s; those the machine "
                             "or folder cannot run are reported and skipped)")
    parser.add_argument("--documents", type=positive_int, default=200, help="generated stories per run")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed runs per pair; the fastest counts")
    add_runtime_arguments(parser)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--write-corpus", metavar="FILE", help="write a generated JSONL corpus of --documents stories and exit")
    parser.add_argument("--watch-tag", metavar="FILE", help="run `newstagger tag` on FILE and print its RSS as it goes")
    parser.add_argument("--seconds", type=positive_seconds, default=120, help="how long --watch-tag watches")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from .folders import default_model_dir

    if args.write_corpus:
        return write_corpus(Path(args.write_corpus), args.documents)
    folder = Path(args.model or default_model_dir())
    if args.watch_tag:
        return watch_tag(folder, Path(args.watch_tag), args.seconds, args.threads)
    print(machine_summary(args.threads))
    print(f"model {folder}; {args.documents} generated stories, best of {args.repeats}\n")
    print(f"{'backend':<12}{'chars/s':>10}{'docs/s':>9}{'forward chars/s':>17}{'e2e/forward':>13}"
          f"{'peak RSS MiB':>13}{'load avg':>14}")
    results = {}
    spawn = multiprocessing.get_context("spawn")
    for name in args.configs:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
            result = child.submit(measure, folder, name, args.documents, args.repeats, args.threads, args.device).result()
        results[name] = result
        if "skipped" in result:
            print(f"{name:<12}skipped: {result['skipped']}")
            continue
        print(f"{name:<12}{result['chars_per_s']:>10,.0f}{result['docs_per_s']:>9.1f}"
              f"{result['forward_chars_per_s']:>17,.0f}{result['end_to_end_over_forward']:>13.2f}"
              f"{result['peak_rss_mib']:>13.0f}{result['load_average']:>14}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_summary(args.threads), "results": results},
                                              indent=2) + "\n", encoding="utf-8")
    return 0


def measure(folder: Path, name: str, documents: int, repeats: int, threads: int | None, device: str) -> dict:
    """One backend-precision pair, end to end and forward only (runs in its own process)."""
    from .tag_command import tag_stream
    from .tagger import Tagger

    backend, _, precision = name.partition("-")
    try:
        tagger = Tagger.load(folder, backend=backend, precision=precision, device=device, threads=threads)
    except UsageError as err:
        return {"skipped": str(err)}
    texts = synthetic_stories(documents)
    corpus = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    recorder = tagger.backend = RecordingBackend(tagger.backend)
    load_before = os.getloadavg()[0]

    def end_to_end() -> float:
        recorder.batches.clear()
        with open(os.devnull, "w", encoding="utf-8") as sink:
            started = time.perf_counter()
            tag_stream(tagger, io.StringIO(corpus), sink, progress_bar=False)
            return time.perf_counter() - started

    def forward_only() -> float:
        started = time.perf_counter()
        for input_ids, attention_mask in recorder.batches:
            recorder.backend(input_ids, attention_mask)
        return time.perf_counter() - started

    end_to_end()  # warm-up: first calls at each shape build kernels and caches
    timings = [(end_to_end(), forward_only()) for _ in range(repeats)]
    e2e_seconds = min(t for t, _ in timings)
    forward_seconds = min(f for _, f in timings)
    characters = sum(map(len, texts))
    positions = sum(ids.size for ids, _ in recorder.batches)
    return {
        "backend": str(recorder.backend),
        "documents": documents,
        "characters": characters,
        "encoder_positions": positions,
        "chars_per_s": characters / e2e_seconds,
        "docs_per_s": documents / e2e_seconds,
        "forward_chars_per_s": characters / forward_seconds,
        "forward_positions_per_s": positions / forward_seconds,
        "end_to_end_over_forward": forward_seconds / e2e_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "load_average": f"{load_before:.1f}->{os.getloadavg()[0]:.1f}",
    }


class RecordingBackend:
    """Passes batches through to a backend and keeps them, to replay through the backend alone."""

    def __init__(self, backend):
        self.backend = backend
        self.batches: list = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def __call__(self, input_ids, attention_mask):
        self.batches.append((input_ids, attention_mask))
        return self.backend(input_ids, attention_mask)


def write_corpus(path: Path, documents: int, **story_options) -> int:
    """A JSONL file of generated stories (`synthetic_stories` options), written 10,000 at a time."""
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, documents, 10_000):
            count = min(10_000, documents - start)
            for i, text in enumerate(synthetic_stories(count, seed=start, **story_options), start):
                out.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    print(f"{path}: {documents} stories, {path.stat().st_size / 1e6:,.0f} MB")
    return 0


def watch_tag(folder: Path, corpus: Path, seconds: float, threads: int | None) -> int:
    """Run `newstagger tag` on `corpus` for `seconds`, printing its RSS and read position."""
    import psutil

    command = [sys.executable, "-m", "newstagger.cli", "tag", "--model", str(folder), "-i", str(corpus),
               "-o", os.devnull, *(["--threads", str(threads)] if threads else [])]
    size = corpus.stat().st_size  # a missing corpus fails here, before there is a child to leave running
    errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child can never block on it
    child = subprocess.Popen(command, stderr=errors)
    process = psutil.Process(child.pid)
    started = time.monotonic()
    print(f"`newstagger tag` on {corpus} ({size / 1e6:,.0f} MB)")
    print(f"{'seconds':>8}{'read MB':>10}{'RSS MiB':>9}{'peak RSS MiB':>13}")
    try:
        while child.poll() is None and time.monotonic() - started < seconds:
            time.sleep(min(10, seconds / 12))
            with contextlib.suppress(psutil.NoSuchProcess):  # it may end between the checks
                read = next((f.position for f in process.open_files() if f.path == str(corpus.resolve())), 0)
                peak = _peak_rss_kb(child.pid) / 1024
                print(f"{time.monotonic() - started:>8.0f}{read / 1e6:>10.1f}"
                      f"{process.memory_info().rss / 2**20:>9.0f}{peak:>13.0f}", flush=True)
    finally:
        ended_by_itself = child.poll() is not None
        child.terminate()
        child.wait()
    if ended_by_itself and child.returncode:
        errors.seek(0)
        last = errors.read().decode(errors="replace").strip().splitlines()[-1:]
        print(f"`newstagger tag` failed (exit {child.returncode}): {' '.join(last)}", file=sys.stderr)
        return child.returncode
    return 0


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def machine_summary(threads: int | None) -> str:
    import onnxruntime
    import torch

    from .backends import available_cores, cpu_bf16_units

    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor())
    return (f"{model_name}, {available_cores()} cores, {threads or available_cores()} threads, "
            f"bf16 instructions: {cpu_bf16_units() or 'none'}, CUDA: {torch.cuda.is_available()}; "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


# Generated stories: news-style sentence templates filled with places, organisations, people,
# numbers and dates, so the text has what matters for speed and agreement: about one token per
# character, digit and Latin runs, punctuation and entity-like names.
PLACES = ["杭州市", "西湖区", "浙江省", "宁波市", "鄞州区", "成都市", "武侯区", "青岛市", "黄岛区", "苏州工业园区",
          "长沙市", "岳麓区", "南京市", "鼓楼区", "东湖街道", "新华社区", "滨江新城", "三江口", "高新区", "临江镇"]
ORGANISATIONS = ["市人民政府", "区住房和城乡建设局", "市交通运输局", "市生态环境局", "区教育局", "市第一人民医院",
                 "市公安局交警支队", "区市场监督管理局", "市气象台", "区人民法院", "市文化广电旅游局", "街道办事处",
                 "国家电网", "阿里巴巴", "华为技术有限公司", "市图书馆", "区消防救援大队", "市自来水公司"]
PEOPLE = ["张伟", "王芳", "李娜", "刘洋", "陈静", "杨帆", "赵磊", "黄敏", "周杰", "吴婷", "徐强", "孙丽"]
POSITIONS = ["市长", "副区长", "局长", "主任", "院长", "党委书记", "负责人", "工程师", "社区书记", "记者"]
SUBJECTS = ["老旧小区改造", "垃圾分类", "地铁三号线建设", "河道综合治理", "义务教育招生", "医保报销政策", "夜间经济",
            "农村公路养护", "防汛抗旱", "食品安全检查", "新能源汽车充电桩", "5G基站建设", "GDP增长", "空气质量"]
TEMPLATES = [
    "{date}，{place}{org}召开{subject}工作推进会，{person}{position}出席会议并讲话。",
    "据{org}消息，{place}今年以来累计完成{subject}项目{number}个，总投资约{amount}亿元。",
    "记者从{org}获悉，{subject}将于{date}起正式实施，涉及{place}等{number}个片区。",
    "“我们会持续推进{subject}，让群众真正受益。”{org}{position}{person}表示。",
    "截至{date}，{place}{subject}完成率达到{percent}%，同比提高{small}个百分点。",
    "{place}居民{person}告诉记者，{subject}开展以来，出行和生活都方便了不少。",
    "{org}提醒市民，{date}前后{place}部分路段将实行交通管制，请提前规划路线。",
    "下一步，{place}将围绕{subject}，进一步完善工作机制，加强监督考核。",
    "据统计，{place}全年接待游客{number}万人次，实现旅游收入{amount}亿元。",
    "{person}是{place}的一名{position}，从事{subject}相关工作已有{small}年。",
]


def synthetic_stories(count: int, seed: int = 0, min_chars: int = 100, max_chars: int = 3000) -> list[str]:
    """`count` stories, lengths log-uniform over [min_chars, max_chars] (median ~550, mean ~850);
    the same seed gives the same stories."""
    rng = random.Random(seed)
    return [_story(rng, round(math.exp(rng.uniform(math.log(min_chars), math.log(max_chars)))))
            for _ in range(count)]


def _story(rng: random.Random, length: int) -> str:
    sentences: list[str] = []
    size = 0
    while size < length:
        sentence = rng.choice(TEMPLATES).format(
            date=f"{rng.randint(1, 12)}月{rng.randint(1, 28)}日", place=rng.choice(PLACES),
            org=rng.choice(ORGANISATIONS), person=rng.choice(PEOPLE), position=rng.choice(POSITIONS),
            subject=rng.choice(SUBJECTS), number=rng.randint(2, 980), amount=round(rng.uniform(0.5, 90), 1),
            percent=round(rng.uniform(40, 99.9), 1), small=rng.randint(1, 15),
        )
        sentences.append(sentence)
        size += len(sentence)
    return "".join(sentences)[:length]
