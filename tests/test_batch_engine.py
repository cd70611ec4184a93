"""The batch engine's dynamic batching against its specification, with a toy model whose answer
says which batch each item went in."""

import threading
import time

import numpy as np
import pytest
import torch

from pyserve.engine.batch import BatchEngine, BatchPolicy, TensorRequest
from pyserve.errors import EngineUnavailable, InvalidParameter, TooLarge
from pyserve.tasks import TensorModel, TensorSpec


class Doubler(TensorModel):
    """y = 2x per item; `batch` tells each item the size of the batch it ran in."""

    inputs = [TensorSpec("x", "float32", (3,))]
    outputs = [TensorSpec("y", "float32", (3,)), TensorSpec("batch", "int64", ())]
    max_batch_size = 8

    def __init__(self):
        self.batches: list[int] = []

    def run(self, batch, operation="infer"):
        n = batch["x"].shape[0]
        self.batches.append(n)
        return {"y": batch["x"] * 2, "batch": torch.full((n,), n, dtype=torch.int64)}


def items(n, start=0.0):
    return np.arange(start, start + 3 * n, dtype=np.float32).reshape(n, 3)


def drain(engine, limit_s=5.0):
    outs, deadline = {}, time.monotonic() + limit_s
    while engine.has_unfinished() and time.monotonic() < deadline:
        for out in engine.step():
            outs[out.request_id] = out
    return outs


def test_concurrent_requests_share_a_batch_and_get_their_own_slices():
    model = Doubler()
    engine = BatchEngine(model, BatchPolicy(max_batch_size=8, max_queue_delay_s=10.0))
    for r in range(4):
        engine.add(f"r{r}", TensorRequest({"x": items(2, 100 * r)}))
    outs = drain(engine)
    assert model.batches == [8]  # full at once: no waiting for the delay
    for r in range(4):
        np.testing.assert_array_equal(outs[f"r{r}"].outputs["y"], items(2, 100 * r) * 2)
        assert outs[f"r{r}"].outputs["batch"].tolist() == [8, 8]


def test_a_partial_batch_goes_when_the_oldest_request_has_waited_the_delay():
    model = Doubler()
    engine = BatchEngine(model, BatchPolicy(max_batch_size=8, max_queue_delay_s=0.05))
    engine.add("a", TensorRequest({"x": items(1)}))
    start = time.monotonic()
    time.sleep(0.03)
    engine.add("b", TensorRequest({"x": items(2)}))  # joins; the delay counts from a's arrival
    outs = drain(engine)
    waited = time.monotonic() - start
    assert model.batches == [3] and 0.05 <= waited < 0.5
    assert outs["b"].outputs["batch"].tolist() == [3, 3]


def test_preferred_sizes_and_splitting_a_large_request():
    model = Doubler()
    engine = BatchEngine(model, BatchPolicy(max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_s=0.05))
    engine.add("big", TensorRequest({"x": items(7)}))
    outs = drain(engine)
    assert model.batches == [4, 3]  # the largest preferred size at once; after the delay, what is left
    np.testing.assert_array_equal(outs["big"].outputs["y"], items(7) * 2)  # parts back in order


def test_queue_limit_timeout_priority_and_cancel():
    model = Doubler()
    engine = BatchEngine(model, BatchPolicy(max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=5))
    engine.add("low", TensorRequest({"x": items(2)}, priority=0))
    engine.add("high", TensorRequest({"x": items(2, 50)}, priority=5))
    with pytest.raises(EngineUnavailable, match="queue is full"):  # a 503: it fits once the queue drains
        engine.add("over", TensorRequest({"x": items(2)}))
    with pytest.raises(TooLarge, match="6 items exceed the queue's 5") as never:  # never fits: a 413
        engine.add("never", TensorRequest({"x": items(6)}))
    assert never.value.status == 413 and never.value.field == "x"
    first = engine.step()
    assert [o.request_id for o in first] == ["high"]  # ahead of the earlier, lower-priority one
    engine.add("late", TensorRequest({"x": items(1)}, timeout_s=0.01))
    engine.add("gone", TensorRequest({"x": items(1)}))
    engine.abort("gone")
    time.sleep(0.02)
    outs = drain(engine)
    assert outs["late"].error.startswith("timed out") and outs["late"].status == 504
    assert "gone" not in outs and outs["low"].error is None
    assert engine.stats().waiting == 0


@pytest.mark.parametrize("inputs,field", [
    ({"x": np.zeros((2, 4), np.float32)}, "x"), ({"x": np.zeros((2, 3), np.float64)}, "x"),
    ({}, "x"), ({"x": np.zeros((2, 3), np.float32), "z": np.zeros(2)}, "z"), ({"x": np.zeros((0, 3), np.float32)}, "x"),
])
def test_bad_inputs_name_the_input(inputs, field):
    with pytest.raises(InvalidParameter, match=field):
        BatchEngine(Doubler()).add("r", TensorRequest(inputs))


def test_under_the_driver_concurrent_clients_are_batched():
    import asyncio
    from pyserve.engine import EngineDriver
    model = Doubler()
    driver = EngineDriver(BatchEngine(model, BatchPolicy(max_batch_size=16, max_queue_delay_s=0.02)))

    async def client(i):
        out = None
        async for out in driver.submit(None, TensorRequest({"x": items(1, i)})):
            pass
        return out

    async def main():
        return await asyncio.gather(*(client(i) for i in range(32)))
    try:
        outs = asyncio.run(main())
    finally:
        driver.shutdown()
    assert all(np.array_equal(o.outputs["y"], items(1, i) * 2) for i, o in enumerate(outs))
    assert max(model.batches) > 1 and sum(model.batches) == 32
    assert threading.active_count() >= 1


class Summer(TensorModel):
    """Any-length rows: y = the sum of each row."""

    inputs = [TensorSpec("x", "float32", (-1,))]
    outputs = [TensorSpec("y", "float32", ())]

    def __init__(self):
        self.batches = []

    def run(self, batch, operation="infer"):
        self.batches.append(tuple(batch["x"].shape))
        return {"y": batch["x"].sum(dim=1)}


def test_items_of_different_lengths_go_in_separate_batches():
    model = Summer()
    engine = BatchEngine(model, BatchPolicy(max_batch_size=8, max_queue_delay_s=0.0))
    engine.add("a", TensorRequest({"x": np.ones((2, 3), np.float32)}))
    engine.add("b", TensorRequest({"x": np.ones((1, 5), np.float32)}))
    engine.add("c", TensorRequest({"x": np.ones((1, 3), np.float32)}))
    outs = drain(engine)
    assert sorted(model.batches) == [(1, 5), (3, 3)]
    assert outs["a"].outputs["y"].tolist() == [3, 3] and outs["b"].outputs["y"].tolist() == [5]
