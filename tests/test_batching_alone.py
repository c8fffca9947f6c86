"""A caller alone with a batched model stops waiting max_delay_us for company that never comes
(offload.batching: LONELY_AFTER, LONELY_PROBE), and requests that come together still merge."""

import threading

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
        assert b._lonely >= batching.LONELY_AFTER

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
