"""Dynamic micro-batching over a bounded queue (plain asyncio, no HTTP: tested on its own).

Requests wait in one queue; a single worker task takes as many whole requests as fit in
``max_batch_size`` images, waiting at most ``max_delay_s`` after the oldest one arrived, runs the
engine once on their concatenation in a worker thread (the event loop keeps answering meanwhile)
and hands each request its own rows back. While the engine computes, new requests queue up, so
under load batches form without waiting.

Admission (``has_room``), two rules; a request that fails either is refused at once
(``ServerBusy``: 503 + ``Retry-After``):

- **Queue limit.** The images admitted and not yet answered (queued or being computed) may not pass
  ``max_queue``. A load that fits (e.g. 32 clients x 8 images with ``max_queue`` 256) is never
  refused.
- **Wait budget, while shedding.** Once a request has been refused, and until none has been for one
  drain time (``max_queue`` / throughput), a request is admitted only if the engine would answer it
  within ``max_queue / throughput`` even at the slowest speed of its last ``window`` batches:
  ``computing + queued + max_batch_size`` images (the running batch, those ahead, its own batch)
  may not pass ``max_queue x slowest / mean`` (the slowest and the mean images/s of those
  batches). A request with nothing queued
  ahead of it is always admitted (it waits for the running batch and its own). As shedding
  starts, the queued requests this rule would not admit (FIFO: the latest arrivals) are refused
  too, a moment after they came: an overload that begins on an idle server would otherwise answer
  its first ``max_queue`` images late.

The guarantee: under overload an admitted request is answered within ``max_queue / throughput``
(throughput: the mean of the last batches), unless the engine runs slower than it did in any of
them. Throughput under overload is kept: the queue still holds work whenever a batch ends. The
queue limit alone would not give this bound: it admits requests with ``max_queue`` images of work
ahead of and with them, so any slowdown of the engine (on a CPU it shares with the HTTP side, the
overload's own requests slow it) lands on their latency.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInput, ServerBusy

__all__ = ["BatchResult", "MicroBatcher", "Reservation"]


@dataclass
class BatchResult:
    """One request's rows of a batch, and what it cost."""

    outputs: dict[str, np.ndarray]
    queue_s: float  # from submit to the start of its batch's engine call
    compute_s: float  # the engine call of its batch
    batch_size: int  # images in that batch (this request's and others')


@dataclass
class Reservation:
    """Room for a request's ``count`` images, held from before its images are decoded until it queues."""

    count: int
    held: bool = True


@dataclass
class _Pending:
    pixel_values: np.ndarray
    future: asyncio.Future[BatchResult]
    enqueued: float


class MicroBatcher:
    """Batch concurrent ``submit`` calls into engine calls of at most ``max_batch_size`` images.

    Args:
        run: the engine: ``pixel_values (B, C, H, W)`` -> outputs by name.
        batch_axes: the batch axis of each output (``member_probs`` is ``(M, B, K)``: axis 1).
        max_batch_size: most images per engine call, and per request.
        max_delay_s: longest wait for companions after the oldest queued request arrived.
        max_queue: most images admitted and not yet answered (waiting or in the running engine call);
            at least ``max_batch_size``.
        on_batch: called after each engine call with ``(images, compute seconds)`` (metrics).
        window: the recent engine calls whose speed the wait budget reads.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], dict[str, np.ndarray]],
        *,
        batch_axes: Mapping[str, int],
        max_batch_size: int = 32,
        max_delay_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        window: int = 16,
    ) -> None:
        if not 1 <= max_batch_size <= max_queue or max_delay_s < 0:
            raise ValueError(
                f"need 1 <= max_batch_size <= max_queue and max_delay_s >= 0, got "
                f"{max_batch_size}, {max_queue}, {max_delay_s}"
            )
        self._run = run
        self._batch_axes = dict(batch_axes)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._pending: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._reserved = 0  # images of admitted requests still being decoded (see reserve)
        self._computing = 0  # images in the engine call now running
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)  # (images, seconds)
        self._shedding_until = -math.inf  # perf_counter time; a refusal starts (or extends) shedding
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # one engine call at a time; the engine parallelises inside (ORT / torch intra-op threads)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch (not counting the batch being computed)."""
        return self._queued_images

    @property
    def admitted_images(self) -> int:
        """Images being decoded, queued or being computed: what ``max_queue`` bounds."""
        return self._reserved + self._queued_images + self._computing

    @property
    def throughput(self) -> float:
        """Images/s of the engine over its recent calls (0 before the first)."""
        seconds = sum(s for _, s in self._recent)
        return sum(n for n, _ in self._recent) / seconds if seconds > 0 else 0.0

    @property
    def shedding(self) -> bool:
        """Whether a request was refused within the last drain time (the wait budget applies)."""
        return time.perf_counter() < self._shedding_until

    def wait_budget_images(self) -> float:
        """Most images to compute before an admitted request is answered, while shedding.

        ``max_queue`` x (slowest recent images/s) / (mean recent images/s): at the slowest recent
        speed they take ``max_queue / throughput``.
        """
        if not self._recent or self.throughput <= 0:
            return float(self.max_queue)
        slowest = min(n / s if s > 0 else math.inf for n, s in self._recent)
        return self.max_queue * min(1.0, slowest / self.throughput)

    def observe(self, images: int, seconds: float) -> None:
        """Record an engine call's speed (the worker does, after each batch)."""
        self._recent.append((images, seconds))

    def has_room(self, count: int = 1) -> bool:
        """Whether a request of ``count`` images is admitted now (the two rules of the module docstring)."""
        if self._closing or self.admitted_images + count > self.max_queue:
            return False
        if self._queued_images + self._reserved == 0 or not self.shedding:
            return True
        return self.admitted_images + self.max_batch_size <= self.wait_budget_images()

    @property
    def idle(self) -> bool:
        return not self._pending and not self._computing

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def close(self) -> None:
        """Finish every queued request, then stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def reserve(self, count: int) -> Reservation:
        """Admit a request of ``count`` images before its images are decoded, so decoding is shed like model work.

        Pass the reservation to :meth:`submit` (its room becomes the queued images'), and
        :meth:`release` it in a ``finally`` (a no-op once submitted): a request that fails to decode
        gives its room back.

        Raises:
            ServerBusy: the batcher is closing, or there is no room (as in :meth:`submit`).
        """
        if self._closing:
            raise ServerBusy("the server is shutting down")
        if not self.has_room(count):
            raise self.refuse(count)
        self._reserved += count
        return Reservation(count)

    def release(self, reservation: Reservation) -> None:
        """Give back the room of a reservation not submitted (idempotent)."""
        if reservation.held:
            self._reserved -= reservation.count
            reservation.held = False

    async def submit(self, pixel_values: np.ndarray, reservation: Reservation | None = None) -> BatchResult:
        """Queue ``pixel_values`` ``(B, C, H, W)`` and wait for its rows of the outputs.

        With the ``reservation`` :meth:`reserve` gave, the request was admitted already: its room is used.

        Raises:
            InvalidInput: more than ``max_batch_size`` images, or none.
            ServerBusy: the queue is full, or the batcher is closing.
        """
        count = len(pixel_values)
        if not 1 <= count <= self.max_batch_size:
            raise InvalidInput(f"a request must hold 1 to {self.max_batch_size} images (--max-batch-size), got {count}")
        if self._closing:
            raise ServerBusy("the server is shutting down")
        if reservation is not None and reservation.held:
            self.release(reservation)  # admitted at reserve(): the same room now holds the queued images
        elif not self.has_room(count):
            raise self.refuse(count)
        loop = asyncio.get_running_loop()
        item = _Pending(pixel_values, loop.create_future(), time.perf_counter())
        self._pending.append(item)
        self._queued_images += count
        self._arrived.set()
        return await item.future

    def refuse(self, count: int = 1) -> ServerBusy:
        """The refusal of a request of ``count`` images that has no room, with ``Retry-After``.

        ``Retry-After``: the seconds (at least 1) the admitted images likely take to drain. The
        refusal starts (or extends) shedding for one drain time, ``max_queue / throughput``.
        """
        throughput, admitted = self.throughput, self.admitted_images
        if not self.shedding:
            self._trim()
        self._shedding_until = time.perf_counter() + (self.max_queue / throughput if throughput > 0 else 1.0)
        if admitted + count > self.max_queue:
            why = f"the queue is full ({admitted} of {self.max_queue} images admitted)"
        else:
            why = (
                f"the queue is full for the engine's speed now ({admitted} of {self.max_queue} images admitted; "
                f"a newcomer would wait past {self.max_queue} / throughput)"
            )
        drain_s = self.admitted_images / throughput if throughput > 0 else 1.0
        return ServerBusy(f"{why}; retry later", retry_after_s=max(1, math.ceil(drain_s)))

    def refuse_queued(self, error: ServerBusy) -> int:
        """Answer every queued request with ``error`` now (shutdown's drain bound passed); the images refused."""
        refused = 0
        while self._pending:
            item = self._pending.popleft()
            refused += len(item.pixel_values)
            if not item.future.done():
                item.future.set_exception(error)
        self._queued_images = 0
        self._arrived.set()  # the worker may be waiting for companions of a request no longer queued
        return refused

    def _trim(self) -> None:
        """As shedding starts, refuse the queue's tail that the wait budget would not have admitted.

        FIFO: the tail is the latest arrivals, refused a moment after they came. Without this, an
        overload that starts on an idle server would answer its first ``max_queue`` images late.
        """
        budget, throughput = self.wait_budget_images(), self.throughput
        while len(self._pending) > 1:
            last = self._pending[-1]
            ahead = self._computing + self._queued_images - len(last.pixel_values)
            if ahead + self.max_batch_size <= budget:
                return
            self._pending.pop()
            self._queued_images -= len(last.pixel_values)
            if not last.future.done():
                drain_s = ahead / throughput if throughput > 0 else 1.0
                last.future.set_exception(
                    ServerBusy(
                        "the server is overloaded and sheds its queue to its wait budget; retry later",
                        retry_after_s=max(1, math.ceil(drain_s)),
                    )
                )

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # wait for companions until the batch is full or the oldest request has waited max_delay_s
            deadline = self._pending[0].enqueued + self.max_delay_s
            while self._queued_images < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            if not self._pending:  # refused while it waited (refuse_queued)
                continue
            batch = [self._pending.popleft()]
            size = len(batch[0].pixel_values)
            while self._pending and size + len(self._pending[0].pixel_values) <= self.max_batch_size:
                size += len(self._pending[0].pixel_values)
                batch.append(self._pending.popleft())
            self._queued_images -= size
            self._computing = size
            pixels = batch[0].pixel_values if len(batch) == 1 else np.concatenate([b.pixel_values for b in batch])
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, pixels)
            except Exception as err:  # the engine's failure belongs to the requests of this batch
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            finally:
                self._computing = 0
            compute_s = time.perf_counter() - started
            self.observe(size, compute_s)
            if self._on_batch is not None:
                self._on_batch(size, compute_s)
            self._hand_out(batch, outputs, started, compute_s, size)

    def _hand_out(
        self, batch: list[_Pending], outputs: dict[str, np.ndarray], started: float, compute_s: float, size: int
    ) -> None:
        start = 0
        for item in batch:
            stop = start + len(item.pixel_values)
            rows = {
                name: value[(slice(None),) * self._batch_axes.get(name, 0) + (slice(start, stop),)]
                for name, value in outputs.items()
            }
            start = stop
            if not item.future.done():  # its client may have gone away
                item.future.set_result(BatchResult(rows, started - item.enqueued, compute_s, size))
