"""Dynamic micro-batching over a bounded queue (plain asyncio, no HTTP: tested on its own).

Requests wait in one queue; a single worker task takes as many whole requests as fit in
``max_batch_size`` images, waiting at most ``max_delay_s`` after the oldest one arrived, runs the
engine once on their concatenation in a worker thread (the event loop keeps answering meanwhile)
and hands each request its own rows back. While the engine computes, new requests queue up, so
under load batches form without waiting. A request that would take the images admitted and not
yet answered (queued or being computed) past ``max_queue`` is refused at once (``ServerBusy``: 503
+ ``Retry-After``). An admitted request then has at most ``max_queue`` images ahead of it or with
it, and its batch at most ``max_batch_size`` more after it: it waits at most about
``(max_queue + max_batch_size) / throughput``, however heavy the overload.
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

__all__ = ["BatchResult", "MicroBatcher"]


@dataclass
class BatchResult:
    """One request's rows of a batch, and what it cost."""

    outputs: dict[str, np.ndarray]
    queue_s: float  # from submit to the start of its batch's engine call
    compute_s: float  # the engine call of its batch
    batch_size: int  # images in that batch (this request's and others')


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
        self._computing = 0  # images in the engine call now running
        self._throughput = 0.0  # images/s of the last batch, for Retry-After
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
        """Images queued or being computed: what ``max_queue`` bounds."""
        return self._queued_images + self._computing

    def has_room(self, count: int = 1) -> bool:
        """Whether a request of ``count`` images is admitted now."""
        return not self._closing and self.admitted_images + count <= self.max_queue

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

    async def submit(self, pixel_values: np.ndarray) -> BatchResult:
        """Queue ``pixel_values`` ``(B, C, H, W)`` and wait for its rows of the outputs.

        Raises:
            InvalidInput: more than ``max_batch_size`` images, or none.
            ServerBusy: the queue is full, or the batcher is closing.
        """
        count = len(pixel_values)
        if not 1 <= count <= self.max_batch_size:
            raise InvalidInput(f"a request must hold 1 to {self.max_batch_size} images (--max-batch-size), got {count}")
        if self._closing:
            raise ServerBusy("the server is shutting down")
        if not self.has_room(count):
            raise self.busy()
        loop = asyncio.get_running_loop()
        item = _Pending(pixel_values, loop.create_future(), time.perf_counter())
        self._pending.append(item)
        self._queued_images += count
        self._arrived.set()
        return await item.future

    def busy(self) -> ServerBusy:
        """The refusal of a full queue, with ``Retry-After``: the seconds (at least 1) it likely takes to drain."""
        drain_s = self.admitted_images / self._throughput if self._throughput > 0 else 1.0
        return ServerBusy(
            f"the queue is full ({self.admitted_images} of {self.max_queue} images admitted); retry later",
            retry_after_s=max(1, math.ceil(drain_s)),
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
            self._throughput = size / compute_s if compute_s > 0 else 0.0
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
