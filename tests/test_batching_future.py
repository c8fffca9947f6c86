"""The batcher's futures (offload.batching.Future, lighter than the stdlib's) behave as
concurrent.futures.Future to every user of one: result/exception with timeouts, cancel, done
callbacks, concurrent.futures.wait/as_completed beside standard futures, asyncio.wrap_future;
one-row and multi-output batches hand each caller its own rows; statistics count each request
once."""

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest

import offload
from offload import zoo
from offload import graph as G
from offload.batching import Batcher, Batching
from offload.model import Model


@pytest.fixture(scope="module")
def reference():
    return offload.load(zoo.path("jet_mlp"), device="cpu")


def _held_batcher(max_batch=64, delay_us=0):
    """A batcher whose runs wait for ``gate`` (an Event) and echo their inputs doubled."""
    gate = threading.Event()

    def execute(arrays, wait):
        assert gate.wait(30)
        return [a * 2 for a in arrays]
    return Batcher(execute, Batching(max_batch=max_batch, max_delay_us=delay_us)), gate


def test_the_future_is_a_concurrent_future_with_timeouts_and_callbacks():
    b, gate = _held_batcher()
    try:
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        f = b.submit([x])
        assert isinstance(f, concurrent.futures.Future)
        assert not f.done() and not f.cancelled()
        with pytest.raises(concurrent.futures.TimeoutError):
            f.result(timeout=0.05)
        with pytest.raises(TimeoutError):
            f.exception(timeout=0)
        seen = []
        f.add_done_callback(lambda fut: seen.append(fut.result()))
        # several threads wait on the same future: every one of them wakes
        got = []
        waiters = [threading.Thread(target=lambda: got.append(f.result(timeout=30)))
                   for _ in range(3)]
        for t in waiters:
            t.start()
        gate.set()
        for t in waiters:
            t.join(30)
        np.testing.assert_array_equal(f.result(timeout=30), x * 2)
        assert f.done() and f.exception() is None and len(got) == 3
        np.testing.assert_array_equal(seen[0], x * 2)
        late = []
        f.add_done_callback(late.append)  # added after: called at once
        assert late == [f]
        assert "finished" in repr(f)
        with pytest.raises(concurrent.futures.InvalidStateError):
            f.set_result(1)
    finally:
        gate.set()
        b.close()


def test_wait_and_as_completed_mix_batched_and_standard_futures():
    b, gate = _held_batcher()
    try:
        xs = [np.full((1, 3), k, np.float32) for k in range(5)]
        futures = [b.submit([x]) for x in xs]
        plain = concurrent.futures.Future()
        done, pending = concurrent.futures.wait(futures + [plain], timeout=0.05)
        assert not done and len(pending) == 6
        gate.set()
        done, pending = concurrent.futures.wait(futures, timeout=30)
        assert len(done) == 5 and not pending
        plain.set_result("x")
        assert set(concurrent.futures.as_completed(futures + [plain], timeout=30)) == \
            set(futures + [plain])
        first, _ = concurrent.futures.wait(futures + [plain],
                                           return_when=concurrent.futures.FIRST_COMPLETED)
        assert first
        for x, f in zip(xs, futures):
            np.testing.assert_array_equal(f.result(), x * 2)
    finally:
        gate.set()
        b.close()


def test_wait_returns_for_requests_cancelled_while_queued():
    b, gate = _held_batcher(max_batch=1)
    try:
        running = b.submit([np.ones((1, 2), np.float32)])  # the worker holds this one
        queued = [b.submit([np.ones((1, 2), np.float32)]) for _ in range(3)]
        assert all(f.cancel() for f in queued)
        assert all(f.cancelled() and f.done() for f in queued)
        with pytest.raises(concurrent.futures.CancelledError):
            queued[0].result(timeout=1)
        with pytest.raises(concurrent.futures.CancelledError):
            queued[0].exception(timeout=1)
        waiter = concurrent.futures.ThreadPoolExecutor(1).submit(
            concurrent.futures.wait, queued, 30)
        gate.set()  # the worker passes the cancelled ones and tells wait()
        done, pending = waiter.result(timeout=30)
        assert len(done) == 3 and not pending
        np.testing.assert_array_equal(running.result(timeout=30), np.full((1, 2), 2))
        assert not running.cancel()  # running or done: too late
    finally:
        gate.set()
        b.close()


def test_close_cancel_tells_waiters():
    b, gate = _held_batcher(max_batch=1)
    running = b.submit([np.ones((1, 2), np.float32)])
    queued = [b.submit([np.ones((1, 2), np.float32)]) for _ in range(3)]
    waiter = concurrent.futures.ThreadPoolExecutor(1).submit(concurrent.futures.wait, queued, 30)
    closer = threading.Thread(target=b.close, kwargs={"cancel": True})
    closer.start()
    done, pending = waiter.result(timeout=30)  # before the running batch is let go
    assert len(done) == 3 and not pending and all(f.cancelled() for f in queued)
    gate.set()
    closer.join(30)
    assert not closer.is_alive()
    np.testing.assert_array_equal(running.result(timeout=30), np.full((1, 2), 2))


def test_errors_reach_exactly_their_futures():
    def execute(arrays, wait):
        if (arrays[0] < 0).any():
            raise offload.DeviceRuntimeError("negative input")
        return arrays
    b = Batcher(execute, Batching(max_batch=1, max_delay_us=0))
    try:
        good = b.submit([np.ones((1, 2), np.float32)])
        bad = b.submit([-np.ones((1, 2), np.float32)])
        np.testing.assert_array_equal(good.result(timeout=30), np.ones((1, 2)))
        assert isinstance(bad.exception(timeout=30), offload.DeviceRuntimeError)
        with pytest.raises(offload.DeviceRuntimeError, match="negative input"):
            bad.result()
    finally:
        b.close()


def test_asyncio_through_the_batcher(reference):
    model = offload.load(zoo.path("jet_mlp"), batching=Batching(max_batch=16, max_delay_us=1000))
    xs = [zoo.sample_input("jet_mlp", 1, seed=k) for k in range(20)]

    async def main():
        wrapped = await asyncio.wrap_future(model.submit(xs[0]))
        return [wrapped] + list(await asyncio.gather(*(model.infer_async(x) for x in xs[1:])))
    try:
        for x, y in zip(xs, asyncio.run(main())):
            np.testing.assert_allclose(y, reference(x), rtol=1e-6, atol=1e-7)
    finally:
        model.close()


def test_one_row_requests_get_their_own_rows_and_are_counted(reference):
    model = offload.load(zoo.path("jet_mlp"), batching=Batching(max_batch=64, max_delay_us=2e5))
    try:
        xs = [zoo.sample_input("jet_mlp", 1, seed=k) for k in range(50)]
        futures = [model.submit(x) for x in xs]
        ys = [f.result(timeout=30) for f in futures]
        for x, y in zip(xs, ys):
            assert y.shape == (1, 5)
            np.testing.assert_allclose(y, reference(x), rtol=1e-6, atol=1e-7)
        assert model._batcher.batches < 50
        # a split request counts once, its pieces do not
        model(zoo.sample_input("jet_mlp", 150))
        stats = model.stats
        assert stats["calls"] == 51 and stats["latency_p50_s"] > 0
        assert stats["queue_wait_s"] > 0
    finally:
        model.close()


def test_requests_of_zero_and_several_rows_beside_one_row_ones(reference):
    model = offload.load(zoo.path("jet_mlp"), batching=Batching(max_batch=64, max_delay_us=2e5))
    try:
        xs = [zoo.sample_input("jet_mlp", max(n, 1), seed=n)[:n] for n in (1, 3, 0, 1, 64, 2, 1)]
        futures = [model.submit(x) for x in xs]
        for x, f in zip(xs, futures):
            y = f.result(timeout=30)
            assert y.shape == (len(x), 5)
            np.testing.assert_allclose(y, reference(x), rtol=1e-6, atol=1e-7)
    finally:
        model.close()


def _two_outputs():
    rng = np.random.default_rng(0)
    nodes = [G.Node("dense", ["x", "w1"], ["y1"], {"activation": "relu"}, "d1"),
             G.Node("dense", ["x", "w2"], ["y2"], {}, "d2")]
    return G.Graph(nodes, [G.TensorInfo("x", ("N", 4))], ["y1", "y2"],
                   {"w1": rng.standard_normal((4, 3)).astype(np.float32),
                    "w2": rng.standard_normal((4, 2)).astype(np.float32)})


@pytest.mark.parametrize("rows", [1, 2])
def test_several_outputs_come_back_as_a_tuple_per_request(rows):
    graph = _two_outputs()
    plain = Model(graph, offload.device("cpu"))
    model = Model(graph, offload.device("cpu"), batching=Batching(max_batch=8, max_delay_us=2e5))
    try:
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal((rows, 4)).astype(np.float32) for _ in range(12)]
        futures = [model.submit(x) for x in xs]
        for x, f in zip(xs, futures):
            got, want = f.result(timeout=30), plain(x)
            assert isinstance(got, tuple) and len(got) == 2
            for g, w in zip(got, want):
                assert g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
        # and a request split into pieces
        x = rng.standard_normal((20, 4)).astype(np.float32)
        for g, w in zip(model(x), plain(x)):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    finally:
        model.close()


def test_bad_input_is_refused_at_submit_with_what_was_expected(reference):
    model = offload.load(zoo.path("jet_mlp"), batching=Batching())
    try:
        with pytest.raises(offload.ShapeError, match=r"expected shape \[N, 16\].*got \[1, 15\]"):
            model.submit(np.zeros((1, 15), np.float32))
        with pytest.raises(offload.ShapeError, match="expected dtype float32.*int32"):
            model.submit(np.zeros((1, 16), np.int32))
        with pytest.raises(offload.ShapeError, match="expected shape"):
            model.submit(np.zeros(16, np.float32))
        x = zoo.sample_input("jet_mlp", 1)  # float64 and non-native byte order: converted
        np.testing.assert_allclose(model.submit(x.astype(np.float64)).result(timeout=30),
                                   reference(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.submit(x.astype(">f4")).result(timeout=30),
                                   reference(x), rtol=1e-6, atol=1e-7)
    finally:
        model.close()


def test_futures_from_many_threads_while_results_are_read():
    """Submitters and readers of the same futures in several threads: no answer lost."""
    b = Batcher(lambda arrays, wait: [a + 1 for a in arrays], Batching(max_batch=8,
                                                                     max_delay_us=50))
    errors = []

    def client(k):
        xs = [np.full((1 + (i % 3), 2), k * 1000 + i, np.float32) for i in range(200)]
        fs = [b.submit([x]) for x in xs]
        for x, f in zip(xs, fs):
            if not np.array_equal(f.result(timeout=30), x + 1):
                errors.append(k)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    b.close()
    assert not errors
    assert b.requests == 6 * 200
