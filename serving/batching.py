"""Dynamic micro-batching: concurrent requests share forward passes.

Requests wait in a queue of at most `queue_max` live requests holding at most `queue_max_chars`
characters between them (a full queue is the overload signal, answered with 429; the characters bound
the memory that waiting requests hold, whatever their size; a request whose client left stops
counting at once, though it is only dropped when the worker reaches it). One
worker thread takes the oldest request, keeps gathering others for up to `max_wait_s` or until
the character budget is spent, and runs the model once over every document gathered. Inside that
call the tagger sorts windows by length and packs them under its token budget, so short and
long stories do not pad each other. Each request then gets its own slice of the results,
relabelled under its own thresholds and entity types.

A single request over the budget runs alone, in parts of the budget, which bounds memory.
Between its parts, the waiting requests that fit in one part run, oldest first: they wait for one
part of a large request, not for all of it. Large requests still run one at a time, in order of
arrival, and count as waiting until they start, so under overload each finishes as soon as it can
(rather than all of them late) and the queue limit still bounds the work accepted.

The model is read once per batch, so a reload swaps it between batches and a running batch
(every part of a large request included) finishes on the model it started with. Inference runs
on the worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from newstagger.model import ModelMeta
from newstagger.tagger import Tagger
from newstagger.windowing import character_parts

from .observability import ServingMetrics

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full; the request was not accepted."""


class ShuttingDown(Exception):
    """The batcher stopped before it could run the request."""


class Abandoned(Exception):
    """Every client of a running batch left, so it stopped early."""


@dataclass
class Job:
    texts: list[str]
    thresholds: dict[str, float] | None = None
    entity_types: list[str] | None = None
    entity_threshold: float | None = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    waiting: bool = True  # counted against the queue limit: queued, not yet taken or cancelled
    abandoned: bool = False  # its client left after it started: its batch stops between parts if all did

    @property
    def chars(self) -> int:
        return sum(len(text) for text in self.texts)


@dataclass(frozen=True)
class Outcome:
    results: list[dict]  # one `tag` result per text, in order
    model: ModelMeta  # the model that produced them
    queued_s: float  # from submit until its batch started, plus other requests' time between its parts
    batch_s: float  # model time of the whole batch it ran in


_STOP = object()


class MicroBatcher:
    def __init__(self, tagger: Tagger, metrics: ServingMetrics, *, max_wait_s: float, max_chars: int,
                 queue_max: int, queue_max_chars: int):
        self.tagger = tagger  # replaced whole by swap(); read once per batch
        self.metrics = metrics
        self.max_wait_s = max_wait_s
        self.max_chars = max_chars
        self.queue_max = queue_max
        self.queue_max_chars = queue_max_chars
        self._queue: queue.Queue = queue.Queue()  # bounded by the live count below, not by its length
        self._waiting = self._waiting_chars = 0
        self._waiting_lock = threading.Lock()
        # Taken from the queue but left for later, in order of arrival, and still waiting: what did not
        # fit in a batch, and the large requests passed over between the parts of another.
        self._held: deque[Job | object] = deque()
        # Started and unfinished, by id of their futures: a large request in parts, and the batch
        # served between two of its parts.
        self._started: dict[int, Job] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="newstagger-batcher", daemon=True)
        metrics.queue_depth.set_function(lambda: self._waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every request already queued, then end the worker thread."""
        with self._waiting_lock:  # no request is queued after the stop signal
            self._stopping = True
            self._queue.put(_STOP)
        self._thread.join()

    def submit(self, texts: list[str], thresholds: dict[str, float] | None = None,
               entity_types: list[str] | None = None, entity_threshold: float | None = None) -> Future:
        """A future of the request's Outcome; raises Overloaded when the queue is full, ShuttingDown
        once `stop` was called."""
        job = Job(texts, thresholds, entity_types, entity_threshold)
        job.future.add_done_callback(lambda _: self._stop_waiting(job))  # a cancel frees its place at once
        job.future.add_done_callback(lambda _: self._started.pop(id(job.future), None))
        with self._waiting_lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.queue_max:
                raise Overloaded(f"{self.queue_max} requests are already waiting for the model")
            # An empty queue takes any request: one larger than the bound would otherwise never run.
            if self._waiting and self._waiting_chars + job.chars > self.queue_max_chars:
                raise Overloaded(f"{self._waiting_chars} characters are already waiting for the model; "
                                 f"{job.chars} more would pass {self.queue_max_chars}")
            self._waiting += 1
            self._waiting_chars += job.chars
            self._queue.put(job)
        return job.future

    def _stop_waiting(self, job: Job) -> None:
        with self._waiting_lock:
            if job.waiting:
                job.waiting = False
                self._waiting -= 1
                self._waiting_chars -= job.chars
                if job.future.cancelled():
                    job.texts = []  # a cancelled job lingers in the queue until reached; its stories need not

    def abandon(self, future: Future) -> None:
        """The client of `future` left: drop its request unrun, or once running, let its batch stop
        between parts when every client of the batch has left."""
        if not future.cancel():
            job = self._started.get(id(future))
            if job is not None:
                job.abandoned = True

    def swap(self, tagger: Tagger) -> Tagger:
        """Serve `tagger` from the next batch on; returns the one it replaces."""
        previous, self.tagger = self.tagger, tagger
        return previous

    def _run(self) -> None:
        while (batch := self._gather()) is not None:
            self._start_and_serve(batch)
        self._fail_leftovers()

    def _start_and_serve(self, batch: list[Job]) -> None:
        # Requests whose callers gave up (cancelled futures) are dropped here, unrun.
        # Known as started before they start: an abandon() in between finds them, or cancels them unrun.
        self._started.update({id(job.future): job for job in batch})
        running = []
        for job in batch:
            if job.future.set_running_or_notify_cancel():
                running.append(job)
            else:
                self._started.pop(id(job.future), None)
        if running:
            self._serve(self.tagger, running)

    def _gather(self) -> list[Job] | None:
        first = self._next(timeout=None)
        if first is _STOP:
            return None
        self._stop_waiting(first)
        batch, chars = [first], first.chars
        deadline = time.perf_counter() + self.max_wait_s
        while chars < self.max_chars:
            job = self._next(timeout=max(0.0, deadline - time.perf_counter()))
            if job is None:
                break
            if job is _STOP or chars + job.chars > self.max_chars:
                self._held.appendleft(job)
                break
            self._stop_waiting(job)
            batch.append(job)
            chars += job.chars
        return batch

    def _next(self, timeout: float | None) -> Job | object | None:
        """The oldest request (or the stop signal) not taken yet; None when none came within `timeout`."""
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _serve_small_waiting(self) -> float:
        """Between two parts of a large request: serve the waiting requests that fit in one part, oldest
        first, without waiting for more (large ones keep their turn, in order); the seconds it took."""
        started = time.perf_counter()
        batch, passed_over, chars = [], [], 0
        while chars < self.max_chars and (job := self._next(timeout=0)) is not None:
            if job is not _STOP and chars + job.chars <= self.max_chars:
                self._stop_waiting(job)
                batch.append(job)
                chars += job.chars
            else:
                passed_over.append(job)
                if job is _STOP:  # nothing after it is served
                    break
        self._held.extendleft(reversed(passed_over))  # back in front of the rest, in their order
        if batch:
            self._start_and_serve(batch)
        return time.perf_counter() - started

    def _serve(self, tagger: Tagger, batch: list[Job]) -> None:
        started = time.perf_counter()
        texts = [text for job in batch for text in job.texts]
        results: list[dict] = []
        others_s = 0.0  # spent serving other requests between parts
        try:
            for part in (texts[span] for span in character_parts(texts, self.max_chars)):
                if results:  # only a single request over the budget has a second part
                    others_s += self._serve_small_waiting()
                if all(job.abandoned for job in batch):  # every client left: the rest would run for nobody
                    for job in batch:
                        job.future.set_exception(Abandoned("every client of the batch left"))
                    return
                # Every entity found: each request's own entity threshold is applied when it is finished.
                results += tagger.tag(part, entity_threshold=0.0)
        except Exception as err:
            if len(batch) == 1:
                logger.exception("the model failed on a request of %d documents", len(batch[0].texts))
                self.metrics.model_failures.inc()
                batch[0].future.set_exception(err)
                return
            # One bad request must not fail the others gathered with it.
            logger.warning("a batch of %d requests failed (%r); running them one by one", len(batch), err)
            for job in batch:
                self._serve(tagger, [job])
            return
        elapsed = time.perf_counter() - started - others_s
        self._observe(batch, len(results), elapsed)
        offset = 0
        for job in batch:
            mine = results[offset : offset + len(job.texts)]
            offset += len(job.texts)
            try:
                finished = [tagger.with_options(r, job.thresholds, job.entity_types, job.entity_threshold)
                            for r in mine]
            except Exception as err:  # fail this request, never the worker thread
                logger.exception("finishing the results of a request failed")
                self.metrics.model_failures.inc()
                job.future.set_exception(err)
                continue
            # Time spent on other requests between its parts is time it waited.
            job.future.set_result(Outcome(finished, tagger.meta, started - job.enqueued_at + others_s, elapsed))

    def _observe(self, batch: list[Job], documents: int, seconds: float) -> None:
        self.metrics.batch_requests.observe(len(batch))
        self.metrics.batch_documents.observe(documents)
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.documents.inc(documents)
        self.metrics.characters.inc(sum(job.chars for job in batch))

    def _fail_leftovers(self) -> None:
        while (job := self._next(timeout=0)) is not None:
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server shut down before running this request"))

