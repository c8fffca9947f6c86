"""The acquire/produce pattern of CMSSW's ExternalWork, in-process.

Many event threads share one model. In ``acquire`` an event sends its inputs and gets a future
back at once; the thread then does other work for the event (here: a stand-in reconstruction
step) while the coprocessor runs; in ``produce`` it collects the result. With batching, the
requests of all threads are merged into device batches.

    python examples/acquire_produce.py [--device cpu] [--threads 16] [--events 400]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time

import numpy as np

import offload
from offload import zoo


class JetTagger:
    """One event-processing module: acquire() sends the event's jets, produce() collects."""

    def __init__(self, model: offload.Model):
        self.model = model

    def acquire(self, jets: np.ndarray) -> concurrent.futures.Future:
        return self.model.submit(jets)

    def produce(self, pending: concurrent.futures.Future) -> np.ndarray:
        return pending.result()


def other_work(jets: np.ndarray) -> float:
    """What the event thread does meanwhile (tracking, clustering...): a little NumPy work."""
    return float(np.linalg.norm(np.cumsum(jets, axis=0)))


def process_event(tagger: JetTagger, event: int) -> tuple[int, int]:
    rng = np.random.default_rng(event)
    jets = rng.standard_normal((int(rng.integers(1, 9)), 16)).astype(np.float32)
    pending = tagger.acquire(jets)           # returns at once
    other_work(jets)                         # the event goes on while the model runs
    scores = tagger.produce(pending)         # blocks only if the result is not there yet
    return event, int(scores.argmax(axis=1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--events", type=int, default=400)
    args = parser.parse_args()

    model = offload.load(zoo.path("jet_mlp"), device=args.device,
                         batching=offload.Batching(max_batch=64, max_delay_us=300))
    tagger = JetTagger(model)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.threads) as events:
        results = list(events.map(lambda e: process_event(tagger, e), range(args.events)))
    elapsed = time.perf_counter() - start
    stats = model.stats
    model.close()
    print(f"{len(results)} events on {args.threads} threads in {elapsed:.2f} s; "
          f"{stats['calls']} requests in {stats['device_runs']} device runs; "
          f"latency p50 {stats['latency_p50_s'] * 1e3:.2f} ms, "
          f"p99 {stats['latency_p99_s'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
