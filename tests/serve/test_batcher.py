"""The batcher with a fake embed function: coalescing, per-request batches, the bounded queue, the drain."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pue.runtime import Query
from pue.serve.batcher import Batcher, Draining, QueueFull


class FakeEmbed:
    """Row i of a batch → [value, batch number]; records batch sizes; sleeps to let the queue fill."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.batches: list[list[str]] = []
        self.seconds = seconds
        self.thread_names: set[str] = set()

    def __call__(self, queries: list[Query]) -> np.ndarray:
        self.thread_names.add(threading.current_thread().name)
        time.sleep(self.seconds)
        self.batches.append([q.text for q in queries])
        return np.asarray([[float(q.text), len(self.batches)] for q in queries], np.float32)


def run(coroutine):
    return asyncio.run(coroutine)


def rows(*values: int) -> list[Query]:
    return [Query(text=str(v)) for v in values]


def test_rows_of_concurrent_requests_share_batches_of_at_most_max_batch():
    embed = FakeEmbed()

    async def main():
        batcher = Batcher(embed, max_batch=4, max_wait_s=0.05, max_queue=100, per_request=False)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(10 * i, 10 * i + 1)) for i in range(6)))
        await batcher.drain()
        return results

    results = run(main())
    for i, vectors in enumerate(results):  # every request gets its own rows back, in order
        assert vectors[:, 0].tolist() == [10 * i, 10 * i + 1]
    assert all(len(batch) <= 4 for batch in embed.batches) and max(len(b) for b in embed.batches) == 4
    assert embed.thread_names == {"pue-serve-inference_0"}  # off the event loop, one inference thread


def test_per_request_batches_never_mix_requests():
    embed = FakeEmbed()

    async def main():
        batcher = Batcher(embed, max_batch=8, max_wait_s=0.05, max_queue=100, per_request=True)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(rows(10 * i, 10 * i + 1)) for i in range(5)))
        await batcher.drain()

    run(main())
    assert sorted(embed.batches) == sorted([[str(10 * i), str(10 * i + 1)] for i in range(5)])


def test_a_full_queue_refuses_and_a_draining_batcher_finishes_what_it_holds():
    embed = FakeEmbed(seconds=0.1)

    async def main():
        batcher = Batcher(embed, max_batch=2, max_wait_s=0.0, max_queue=4, per_request=False)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1, 2)))
        await asyncio.sleep(0.02)  # taken: running
        queued = [asyncio.ensure_future(batcher.submit(rows(3, 4))), asyncio.ensure_future(batcher.submit(rows(5, 6)))]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(rows(7))
        await batcher.drain()
        with pytest.raises(Draining):
            await batcher.submit(rows(8))
        return await first, [await q for q in queued]

    first, queued = run(main())
    assert first[:, 0].tolist() == [1, 2] and [q[:, 0].tolist() for q in queued] == [[3, 4], [5, 6]]


def test_an_empty_queue_admits_one_request_larger_than_it():
    embed = FakeEmbed(seconds=0)

    async def main():
        batcher = Batcher(embed, max_batch=2, max_wait_s=0, max_queue=3, per_request=False)
        await batcher.start()
        vectors = await batcher.submit(rows(1, 2, 3, 4, 5))
        await batcher.drain()
        return vectors

    assert run(main())[:, 0].tolist() == [1, 2, 3, 4, 5]
