"""``MicroBatcher`` on plain asyncio, with a fake engine: batching, row routing, bounds and draining."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from freetickets_hub.serving import MicroBatcher
from freetickets_hub.serving.errors import InvalidInput, ServerBusy


class FakeEngine:
    """Outputs that identify their input rows: ``row_sum`` (B,), and ``member`` (2, B) like member_probs."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        self.batches.append(len(pixel_values))
        sums = pixel_values.reshape(len(pixel_values), -1).sum(-1)
        return {"row_sum": sums, "member": np.stack([sums, -sums])}


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def make(engine: FakeEngine, **options) -> MicroBatcher:
    return MicroBatcher(engine, batch_axes={"row_sum": 0, "member": 1}, **options)


def test_concurrent_requests_share_a_batch_and_get_their_own_rows() -> None:
    engine = FakeEngine(delay_s=0.1)
    sizes = [1, 3, 2, 2]

    async def main():
        batcher = make(engine, max_batch_size=8, max_delay_s=0.2)
        await batcher.start()
        inputs = [np.full((n, 1, 2, 2), float(i + 1), np.float32) for i, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
        return inputs, results

    inputs, results = run(main())
    assert engine.batches == [8]  # one engine call for all four
    for x, result in zip(inputs, results, strict=True):
        expected = x.reshape(len(x), -1).sum(-1)
        np.testing.assert_array_equal(result.outputs["row_sum"], expected)
        np.testing.assert_array_equal(result.outputs["member"], np.stack([expected, -expected]))
        assert result.batch_size == 8
        assert 0 <= result.queue_s < engine.delay_s  # the batch filled at once; the engine's time is not queue time
        assert result.compute_s >= engine.delay_s  # the engine call's own time, shared by the batch
    assert len({r.compute_s for r in results}) == 1


def test_a_full_batch_does_not_wait_and_a_lone_request_waits_at_most_max_delay() -> None:
    engine = FakeEngine()

    async def main():
        batcher = make(engine, max_batch_size=4, max_delay_s=0.15)
        await batcher.start()
        start = time.perf_counter()
        await batcher.submit(np.zeros((4, 1, 1, 1), np.float32))
        full = time.perf_counter() - start
        start = time.perf_counter()
        await batcher.submit(np.zeros((1, 1, 1, 1), np.float32))
        alone = time.perf_counter() - start
        await batcher.close()
        return full, alone

    full, alone = run(main())
    assert full < 0.1 and 0.14 <= alone < 1.0
    assert engine.batches == [4, 1]


def test_requests_are_never_split_and_batches_respect_the_limit() -> None:
    engine = FakeEngine(delay_s=0.05)  # while it computes, the rest queues up

    async def main():
        batcher = make(engine, max_batch_size=5, max_delay_s=0.01, max_queue=64)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(np.ones((n, 1, 1, 1), np.float32)) for n in [3, 3, 2, 4, 1, 5]))
        await batcher.close()

    run(main())
    assert sum(engine.batches) == 18 and max(engine.batches) <= 5


def test_full_queue_and_oversized_requests_are_refused_at_once() -> None:
    engine = FakeEngine()

    async def main():
        batcher = make(engine, max_batch_size=4, max_delay_s=5.0, max_queue=4)
        await batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(np.zeros((3, 1, 1, 1), np.float32)))
        await asyncio.sleep(0.01)
        assert batcher.queued_images == 3 and batcher.has_room(1) and not batcher.has_room(2)
        with pytest.raises(ServerBusy, match="queue is full") as busy:
            await batcher.submit(np.zeros((2, 1, 1, 1), np.float32))
        assert busy.value.headers["Retry-After"] == "1"
        with pytest.raises(InvalidInput, match="1 to 4 images"):
            await batcher.submit(np.zeros((5, 1, 1, 1), np.float32))
        await batcher.close()  # finishes the queued request instead of dropping it
        with pytest.raises(ServerBusy, match="shutting down"):
            await batcher.submit(np.zeros((1, 1, 1, 1), np.float32))
        return await waiting

    assert run(main()).batch_size == 3


def test_images_being_decoded_count_against_the_queue_limit() -> None:
    """``reserve`` admits a request before its decoding; its room passes to ``submit`` or is given back."""
    engine = FakeEngine()

    async def main():
        batcher = make(engine, max_batch_size=4, max_delay_s=0.0, max_queue=8)
        await batcher.start()
        decoding = batcher.reserve(3)  # e.g. three large PNGs being decoded
        assert batcher.admitted_images == 3 and batcher.queued_images == 0
        with pytest.raises(ServerBusy, match=r"queue is full \(3 of 8 images admitted\)"):
            batcher.reserve(6)  # shed before any of its decoding starts
        failed = batcher.reserve(1)
        batcher.release(failed)  # its image did not decode: the room comes back, once
        batcher.release(failed)
        assert batcher.admitted_images == 3
        result = await batcher.submit(np.ones((3, 1, 1, 1), np.float32), decoding)  # not counted twice
        batcher.release(decoding)  # the route's `finally`: a no-op once submitted
        assert batcher.admitted_images == 0
        await batcher.close()
        with pytest.raises(ServerBusy, match="shutting down"):
            batcher.reserve(1)
        return result

    assert run(main()).batch_size == 3


def test_an_engine_failure_reaches_the_requests_of_its_batch_only() -> None:
    calls = []

    def engine(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(pixel_values))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return {"row_sum": pixel_values.reshape(len(pixel_values), -1).sum(-1)}

    async def main():
        batcher = MicroBatcher(engine, batch_axes={}, max_batch_size=2, max_delay_s=0.0)
        await batcher.start()
        with pytest.raises(RuntimeError, match="device lost"):
            await batcher.submit(np.ones((1, 1, 1, 1), np.float32))
        ok = await batcher.submit(np.ones((2, 1, 1, 1), np.float32))
        await batcher.close()
        return ok

    np.testing.assert_array_equal(run(main()).outputs["row_sum"], [1.0, 1.0])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="need 1 <= max_batch_size <= max_queue"):
        MicroBatcher(FakeEngine(), batch_axes={}, max_batch_size=0)


class BlockingEngine:
    """An engine whose calls wait until the test lets them finish, one at a time."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        self.entered.release()
        self.release.acquire(timeout=30)
        return {"row_sum": pixel_values.reshape(len(pixel_values), -1).sum(-1)}


def images(count: int) -> np.ndarray:
    return np.ones((count, 1, 1, 1), np.float32)


def test_while_shedding_a_request_is_admitted_only_within_the_wait_budget() -> None:
    engine = BlockingEngine()
    # recent engine calls: three of 4 images at 4 images/s, one at 2 images/s (slowest); mean 3.2 images/s
    speeds = [(4, 1.0), (4, 1.0), (4, 1.0), (4, 2.0)]

    async def main():
        batcher = MicroBatcher(engine, batch_axes={}, max_batch_size=4, max_delay_s=0.0, max_queue=16, window=4)
        await batcher.start()
        for n, s in speeds:
            batcher.observe(n, s)
        assert batcher.throughput == pytest.approx(3.2)
        assert batcher.wait_budget_images() == pytest.approx(16 * 2 / 3.2)  # 10 images
        first = asyncio.ensure_future(batcher.submit(images(4)))
        await asyncio.to_thread(engine.entered.acquire)  # 4 images computing
        queued = [asyncio.ensure_future(batcher.submit(images(4))) for _ in range(3)]
        await asyncio.sleep(0)
        # not shedding: the queue limit alone; 16 admitted (4 computing, 12 queued): a load that fits is never refused
        assert batcher.admitted_images == 16 and not batcher.shedding
        with pytest.raises(ServerBusy, match=r"queue is full \(16 of 16"):
            await batcher.submit(images(1))
        # shedding starts (for one drain time, 16 / 3.2 = 5 s); the queue's tail past the budget is refused:
        # the third queued request had 4 + 8 images ahead, the second 4 + 4 (+ its batch of 4 > 10), the first 4
        assert batcher.shedding and batcher.admitted_images == 8
        for late, ahead in zip(queued[1:], [8, 12], strict=True):
            with pytest.raises(ServerBusy, match="sheds its queue") as shed:
                await late
            assert shed.value.headers["Retry-After"] == str(math.ceil(ahead / 3.2))
        # the queue limit has room (8 + 4 <= 16), the wait budget not: 4 computing + 4 queued + its batch 4 > 10
        assert not batcher.has_room(1)
        with pytest.raises(ServerBusy, match="for the engine's speed now") as busy:
            await batcher.submit(images(4))
        assert busy.value.headers["Retry-After"] == str(math.ceil(8 / 3.2))
        engine.release.release()  # the first batch ends; the next one computes
        await first
        await asyncio.to_thread(engine.entered.acquire)
        for n, s in speeds:  # the finished call's own (fake-fast) speed out of the window again
            batcher.observe(n, s)
        # nothing queued ahead: always admitted (it waits for the running batch and its own)
        assert batcher.queued_images == 0 and batcher.shedding and batcher.has_room(4)
        last = asyncio.ensure_future(batcher.submit(images(4)))
        await asyncio.sleep(0)
        assert not batcher.has_room(1)  # 4 + 4 + 4 > 10
        for _ in range(4):
            engine.release.release()
        await batcher.close()
        return await asyncio.gather(queued[0], last)

    assert [result.batch_size for result in run(main())] == [4, 4]


def test_without_a_refusal_the_wait_budget_does_not_apply() -> None:
    engine = BlockingEngine()

    async def main():
        batcher = MicroBatcher(engine, batch_axes={}, max_batch_size=4, max_delay_s=0.0, max_queue=16, window=8)
        await batcher.start()
        for _ in range(7):
            batcher.observe(4, 0.01)
        batcher.observe(4, 10.0)  # one very slow call: the wait budget would admit almost nothing
        assert batcher.wait_budget_images() < 4
        first = asyncio.ensure_future(batcher.submit(images(4)))
        await asyncio.to_thread(engine.entered.acquire)
        rest = [asyncio.ensure_future(batcher.submit(images(4))) for _ in range(3)]
        await asyncio.sleep(0)
        assert batcher.admitted_images == 16 and not batcher.shedding  # all admitted: the queue limit only
        for _ in range(4):
            engine.release.release()
        await batcher.close()
        return await asyncio.gather(first, *rest)

    assert len(run(main())) == 4


def test_refuse_queued_answers_waiting_requests_and_the_worker_keeps_serving() -> None:
    engine = FakeEngine()

    async def main():
        batcher = make(engine, max_batch_size=4, max_delay_s=20.0)  # a lone request waits 20 s for companions
        await batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(np.ones((1, 1, 2, 2), np.float32)))
        await asyncio.sleep(0.05)
        refused = batcher.refuse_queued(ServerBusy("shutting down"))
        with pytest.raises(ServerBusy, match="shutting down"):
            await waiting
        assert (refused, batcher.queued_images) == (1, 0)
        served = await batcher.submit(np.ones((4, 1, 2, 2), np.float32))  # a full batch: no wait
        await batcher.close()
        return served

    served = run(main())
    assert engine.batches == [4]  # the refused request never reached the engine
    np.testing.assert_array_equal(served.outputs["row_sum"], np.full(4, 4.0))
