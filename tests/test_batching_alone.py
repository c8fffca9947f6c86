"""A caller alone with a batched model stops waiting max_delay_us for company that never comes
(offload.batching: LONELY_AFTER, LONELY_PROBE), and requests that come together still merge."""

import threading
import time

import numpy as np

import offload
from offload import batching, zoo


def test_a_lone_caller_stops_waiting_and_company_is_still_merged():
    delay_s = 0.25
    model = offload.load(zoo.path("jet_mlp"), device="cpu",
                         batching=offload.Batching(max_batch=64, max_delay_us=delay_s * 1e6))
    x = zoo.sample_input("jet_mlp", 1)
    want = offload.load(zoo.path("jet_mlp"), device="cpu")(x)
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
    model = offload.load(zoo.path("jet_mlp"), device="cpu",
                         batching=offload.Batching(max_batch=64, max_delay_us=delay_s * 1e6))
    x = zoo.sample_input("jet_mlp", 1)
    want = offload.load(zoo.path("jet_mlp"), device="cpu")(x)
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
