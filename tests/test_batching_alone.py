"""A caller alone with a batched model stops waiting max_delay_us for company that never comes
(offload.batching: LONELY_AFTER, LONELY_PROBE), and requests that come together still merge."""

import threading
import time

import numpy as np
import pytest

import offload
from offload import batching, zoo


def _batched_jet_mlp(delay_s):
    """jet_mlp batched with max_delay_us = delay_s, a one-row input and its unbatched answer."""
    model = offload.load(zoo.path("jet_mlp"), device="cpu",
                         batching=offload.Batching(max_batch=64, max_delay_us=delay_s * 1e6))
    x = zoo.sample_input("jet_mlp", 1)
    return model, x, offload.load(zoo.path("jet_mlp"), device="cpu")(x)


def test_a_lone_caller_stops_waiting_and_company_is_still_merged():
    delay_s = 0.25
    model, x, want = _batched_jet_mlp(delay_s)
    b = model._batcher
    try:
        waits = []
        for _ in range(batching.LONELY_PROBE):
            np.testing.assert_array_equal(model.submit(x).result(), want)
            waits.append(model.stats["queue_wait_s"])
        per_request = np.diff([0.0] + waits)
        # the first LONELY_AFTER waited for company; after them only the probes wait
        assert (per_request[:batching.LONELY_AFTER] >= 0.8 * delay_s).all()
        assert (per_request[batching.LONELY_AFTER:] < 0.5 * delay_s).all()
        assert b._expect == 1

        # requests submitted together are one batch again (and reset the count)
        before = b.batches
        futures = [model.submit(x) for _ in range(8)]
        for f in futures:
            np.testing.assert_array_equal(f.result(), want)
        assert b.batches - before < 8

        # many threads at once: every answer exact
        errors = []

        def client():
            for _ in range(20):
                if not np.array_equal(model.submit(x).result(), want):
                    errors.append("mismatch")
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    finally:
        model.close()


def test_synchronous_callers_are_expected_and_not_waited_for():
    """4 threads calling synchronously: once the batcher has seen that 4 requests is all that
    comes, a batch goes as soon as the 4 are in (not after max_delay_us); with 2 callers left
    it learns 2 within LONELY_AFTER batches."""
    delay_s = 0.1
    model, x, want = _batched_jet_mlp(delay_s)
    b = model._batcher
    calls = 40
    errors = []

    def client(n):
        for _ in range(n):
            if not np.array_equal(model(x), want):
                errors.append("mismatch")
    try:
        for callers, expect in ((4, 4), (2, 2)):
            threads = [threading.Thread(target=client, args=(calls,)) for _ in range(callers)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
            assert not errors
            assert b._expect == expect
            # waiting at every batch would take calls * delay_s (4 s); the learning batches
            # and one probe in LONELY_PROBE wait
            assert elapsed < 0.5 * calls * delay_s, (callers, elapsed)
    finally:
        model.close()


def test_a_lone_synchronous_caller_runs_in_its_own_thread():
    """model(x) by a caller alone runs in the caller's thread (no hand-off to the worker and
    back), counted in stats, errors typed; the probe still goes through the worker; a request
    from another thread meanwhile is answered; close() waits for a run in a caller's thread."""
    ran_in = []
    gate = threading.Event()
    gate.set()

    def execute(arrays, wait):
        ran_in.append(threading.current_thread().name)
        assert gate.wait(30)
        if (arrays[0] < 0).any():
            raise ValueError("negative input")
        return [a + 1 for a in arrays]
    b = batching.Batcher(execute, offload.Batching(max_batch=8, max_delay_us=20000))
    x = np.zeros((1, 3), np.float32)
    try:
        for _ in range(batching.LONELY_AFTER + 3):
            np.testing.assert_array_equal(b.call([x]), x + 1)
        assert b._expect == 1
        assert all(n.startswith("offload-batcher") for n in ran_in[:batching.LONELY_AFTER])
        assert ran_in[batching.LONELY_AFTER:] == ["MainThread"] * 3
        assert b.batches == b.requests == batching.LONELY_AFTER + 3
        with pytest.raises(offload.OffloadError, match="ValueError: negative input"):
            b.call([-np.ones((1, 3), np.float32)])
        with pytest.raises(offload.OffloadError, match="must share the batch axis"):
            b.call([x, np.zeros((2, 3), np.float32)])
        # the probe: one call in LONELY_PROBE goes through the worker (and waits there)
        del ran_in[:]
        for _ in range(batching.LONELY_PROBE):
            b.call([x])
        assert sum(not n.startswith("offload-batcher") for n in ran_in) == \
            batching.LONELY_PROBE - 1
        # a caller running in its thread while another thread submits: both answered
        del ran_in[:]
        gate.clear()
        done = []
        inline = threading.Thread(target=lambda: done.append(b.call([x])), name="inline")
        inline.start()
        while not ran_in:
            time.sleep(0.001)
        assert ran_in == ["inline"] and b._inline == 1
        other = b.submit([x + 5])
        gate.set()
        np.testing.assert_array_equal(other.result(timeout=30), x + 6)
        inline.join(30)
        np.testing.assert_array_equal(done[0], x + 1)
        # close() waits for a run in a caller's thread
        del ran_in[:]
        gate.clear()
        inline = threading.Thread(target=lambda: done.append(b.call([x])), name="inline")
        inline.start()
        while not ran_in:
            time.sleep(0.001)
        assert ran_in == ["inline"]
        closer = threading.Thread(target=b.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive()
        gate.set()
        closer.join(30)
        inline.join(30)
        assert not closer.is_alive() and b._inline == 0
        np.testing.assert_array_equal(done[1], x + 1)
    finally:
        gate.set()
        b.close()
