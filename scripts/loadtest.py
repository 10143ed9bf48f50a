"""Load test for `newstagger serve`, on loopback only, bounded in requests and in time.

Prints throughput (documents/s), p50/p95/p99 latency and the error count per mode:

  batch     one request carrying all the stories (split only where the server's max_documents
            demands), sent `--rounds` times: the throughput of one big batch
  clients   `--clients` concurrent clients, each sending one story per request, until every
            story has been sent `--rounds` times
  compare   both on the same stories, rounds alternating between them, and the ratio
            clients/batch (the default)

Either starts its own server on a free loopback port (`--model DIR`, any model folder) or
uses a running one (`--url http://127.0.0.1:8000`). Stories are built from a fixed pool of news
sentences (deterministic), or read from a JSONL file of {"text"} with `--stories-file`.

  python scripts/loadtest.py --model models/default
  python scripts/loadtest.py --url http://127.0.0.1:8000 --mode clients --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from newstagger.cli import positive_int, positive_seconds
from newstagger.tagger import Tagger

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SENTENCES = [
    "杭州市西湖区今天上午召开垃圾分类工作推进会，区城管局负责人介绍了下一阶段的工作安排。",
    "据市生态环境局通报，上半年全市空气质量优良天数比例达到百分之八十七，同比提高三个百分点。",
    "为缓解早晚高峰交通压力，市交通运输局将在地铁二号线沿线新增三条接驳公交线路。",
    "宁波舟山港一季度集装箱吞吐量突破九百万标准箱，外贸航线数量继续保持增长。",
    "社区工作人员张丽华说，老旧小区加装电梯项目已惠及一千二百多户居民。",
    "省人民医院专家团队近日走进基层卫生院，为村民提供义诊和健康咨询服务。",
    "今年以来，市场监管部门共查处食品安全违法案件二百余起，罚没款四百多万元。",
    "受强降雨影响，钱塘江上游水位持续上涨，防汛部门已启动四级应急响应。",
    "市教育局表示，今年秋季将新增公办幼儿园学位六千个，进一步缓解入园难问题。",
    "阿里巴巴集团与当地政府签署合作协议，将在数字乡村建设领域开展深度合作。",
    "西溪湿地国家公园迎来观鸟季，吸引了大批摄影爱好者和市民游客前来观赏。",
    "区人力社保局举办春季招聘会，一百余家企业提供就业岗位三千多个。",
]


@dataclass
class Run:
    mode: str
    latencies: list[float] = field(default_factory=list)
    documents: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the request latencies, in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def make_stories(count: int, chars: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    stories = []
    for _ in range(count):
        story = ""
        while len(story) < chars:
            story += rng.choice(SENTENCES)
        stories.append(story[:chars])
    return stories


def read_stories(path: Path, count: int) -> list[str]:
    """`count` texts from a JSONL file of {"text"} (repeated as needed); ValueError names a line without one."""
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{number}: not a JSON object with a string 'text'")
                texts.append(text)
    return (texts * (count // max(len(texts), 1) + 1))[:count]


async def post(client: httpx.AsyncClient, run: Run, texts: list[str], first_id: int) -> None:
    body = {"documents": [{"id": first_id + i, "text": text} for i, text in enumerate(texts)]}
    started = time.perf_counter()
    try:
        response = await client.post("/v1/tag", json=body)
        ok = response.status_code == 200 and len(response.json()["results"]) == len(texts)
    except httpx.HTTPError:
        ok = False
    run.latencies.append(time.perf_counter() - started)
    if ok:
        run.documents += len(texts)
    else:
        run.errors += 1


async def send_in_one_request(client: httpx.AsyncClient, run: Run, stories: list[str], max_documents: int,
                              deadline: float) -> None:
    """All the stories in one request (or as few as the server's max_documents allows)."""
    started = time.perf_counter()
    for start in range(0, len(stories), max_documents):
        if time.perf_counter() > deadline:
            break
        await post(client, run, stories[start : start + max_documents], start)
    run.seconds += time.perf_counter() - started


async def send_one_per_request(client: httpx.AsyncClient, run: Run, stories: list[str], clients: int,
                               deadline: float) -> None:
    """Each story in a request of its own, from `clients` concurrent clients."""
    work = iter(enumerate(stories))  # shared: each story is taken by exactly one client

    async def one_client() -> None:
        for n, story in work:
            if time.perf_counter() > deadline:
                return
            await post(client, run, [story], n)

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    run.seconds += time.perf_counter() - started


async def measure(url: str, args, stories: list[str]) -> list[Run]:
    """Rounds alternate between the modes, so a neighbour's load on the machine hits both alike."""
    deadline = time.perf_counter() + args.max_seconds
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.max_seconds) as client:
        answer = await client.get("/v1/info")
        if answer.status_code != 200 or "json" not in answer.headers.get("content-type", ""):
            sys.exit(f"{url}/v1/info answered {answer.status_code}: not a ready newstagger server")
        info = answer.json()
        print(f"model {info['model']['name']} {info['model']['version']} at {url}; {len(stories)} stories of "
              f"{sum(map(len, stories)) // len(stories)} chars; {args.rounds} rounds")
        max_documents = info["limits"]["max_documents"]
        await send_one_per_request(client, Run("warm-up"), stories[: args.clients], args.clients, deadline)
        batch, clients = Run("one request, all stories"), Run(f"{args.clients} clients x 1 story")
        for _ in range(args.rounds):
            if args.mode in ("batch", "compare"):
                await send_in_one_request(client, batch, stories, max_documents, deadline)
            if args.mode in ("clients", "compare"):
                await send_one_per_request(client, clients, stories, args.clients, deadline)
    return [run for run in (batch, clients) if run.latencies]


def report(runs: list[Run]) -> None:
    print(f"{'mode':<26}{'requests':>9}{'docs':>7}{'seconds':>9}{'docs/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'p99 ms':>9}{'errors':>8}")
    for run in runs:
        print(f"{run.mode:<26}{len(run.latencies):>9}{run.documents:>7}{run.seconds:>9.2f}{run.throughput:>9.1f}"
              f"{run.percentile(50):>9.1f}{run.percentile(95):>9.1f}{run.percentile(99):>9.1f}{run.errors:>8}")
    if len(runs) == 2 and runs[0].throughput:
        print(f"throughput ratio, clients / one request: {runs[1].throughput / runs[0].throughput:.2f}")


def server_memory(server: subprocess.Popen) -> str:
    """Resident memory of the started server, now and at its peak (Linux /proc; n/a elsewhere)."""
    status = Path(f"/proc/{server.pid}/status")
    if not status.exists():
        return "server memory: n/a"
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
    now, peak = (int(fields[name].split()[0]) // 1024 for name in ("VmRSS", "VmHWM"))
    return f"server RSS {now} MiB, peak {peak} MiB"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, port: int, env_overrides: list[tuple[str, str]]) -> subprocess.Popen:
    """What `newstagger serve` runs (the same uvicorn app factory), bound to loopback."""
    env = {**os.environ, "NEWSTAGGER_MODEL": str(model.resolve()), "NEWSTAGGER_LOG_FORMAT": "json",
           **dict(env_overrides)}
    command = [sys.executable, "-m", "uvicorn", "serving.app:app_from_environment", "--factory",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode}")
        try:
            readiness = httpx.get(f"{url}/readyz", timeout=1)
        except httpx.HTTPError:
            readiness = None
        if readiness is not None and readiness.status_code == 200:
            return
        if readiness is not None and "retry-after" not in readiness.headers:  # failed, not still loading
            sys.exit(f"the server is not ready and will not be: {readiness.json().get('detail')}")
        time.sleep(0.2)
    sys.exit(f"the server was not ready within {seconds:.0f} s")


def setting(text: str) -> tuple[str, str]:
    """argparse type of --server-env: NAME=VALUE."""
    name, equals, value = text.partition("=")
    if not (name and equals):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="start a server on loopback for this model folder")
    target.add_argument("--url", help="a running server, on loopback")
    parser.add_argument("--mode", choices=("compare", "batch", "clients"), default="compare")
    parser.add_argument("--clients", type=positive_int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--stories", type=positive_int, default=64, help="distinct stories (default: 64)")
    parser.add_argument("--story-chars", type=positive_int, default=600, help="characters per story (default: 600)")
    parser.add_argument("--stories-file", type=Path, help="JSONL of {\"text\"} to use instead")
    parser.add_argument("--rounds", type=positive_int, default=3, help="times each mode sends every story (default: 3)")
    parser.add_argument("--max-seconds", type=positive_seconds, default=300, help="stop sending after this long (default: 300)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE", type=setting,
                        help="setting for the started server, e.g. NEWSTAGGER_BATCH_WAIT_MS=2 (repeatable)")
    args = parser.parse_args()

    try:
        stories = (read_stories(args.stories_file, args.stories) if args.stories_file
                   else make_stories(args.stories, args.story_chars))
    except (OSError, ValueError) as err:
        parser.error(f"--stories-file: {err}")
    if not stories:
        parser.error(f"--stories-file: no stories in {args.stories_file}")
    server = None
    if args.model:
        try:  # the server would say only "failed to load" in /readyz, and why in a log this script drops
            Tagger.load_exact(args.model)
        except (OSError, ValueError) as err:  # DataError is a ValueError
            parser.error(f"--model: {err}")
        port = free_loopback_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args.model, port, args.server_env)
    else:
        url = args.url.rstrip("/")
        if urlsplit(url).hostname not in LOOPBACK:
            parser.error(f"--url: refusing {url}: this load test only targets loopback ({', '.join(sorted(LOOPBACK))})")
    try:
        if server:
            wait_ready(url, server, args.max_seconds)
        try:
            report(asyncio.run(measure(url, args, stories)))
        except httpx.HTTPError as err:
            sys.exit(f"no answer from {url}: {err!r}")
        if server:
            print(server_memory(server))
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
