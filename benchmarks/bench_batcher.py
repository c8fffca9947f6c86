#!/usr/bin/env python
"""Per-request cost of the batcher (offload.Batching) against the same model unbatched.

    python benchmarks/bench_batcher.py [--model jet_mlp] [--device cpu] [--requests 20000]
                                       [--threads 8] [--repeats 7] [--max-batch 64]
                                       [--max-delay-us 500]

One-row requests (the model's sample input at batch 1), three ways, each run on an unbatched
model and on a batched one, the two alternated within every repeat (medians over the repeats):

  submit+await  one thread submits --requests with model.submit(x), then awaits them all
  threads       --threads threads call model(x) synchronously, --requests in all
  alone         one thread calls model(x) synchronously (the lone caller), --requests / 10

For each: the process CPU time per request (time.process_time over the run / requests: the
batcher's and the executor's threads included, and other jobs on the machine not), the wall
requests per second, and for `alone` the median latency of a call. The CPU time is the figure
to compare on a shared machine; the wall figures move with what else runs. Outputs are checked
against the unbatched model first. Writes <out>/batcher-<YYYYmmdd-HHMM>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import pathlib
import shlex
import statistics
import sys
import threading
import time

import numpy as np

import offload
from offload import bench, zoo

HERE = pathlib.Path(__file__).resolve().parent
WAYS = ("submit+await", "threads", "alone")


def submit_await(model, x, n, threads):
    futures = [model.submit(x) for _ in range(n)]
    for f in futures:
        f.result()
    return None


def threaded(model, x, n, threads):
    per = n // threads
    start = threading.Barrier(threads + 1)

    def client():
        start.wait()
        for _ in range(per):
            model(x)
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for t in workers:
        t.start()
    start.wait()  # starting the threads is timed too (well under a millisecond)
    for t in workers:
        t.join()
    return None


def alone(model, x, n, threads):
    clock = time.perf_counter
    laps = []
    for _ in range(max(1, n // 10)):
        t0 = clock()
        model(x)
        laps.append(clock() - t0)
    return statistics.median(laps)


RUNS = {"submit+await": submit_await, "threads": threaded, "alone": alone}


def run_one(way, model, x, n, threads):
    """(process CPU seconds per request, wall requests/s, median latency or None)."""
    count = max(1, n // 10) if way == "alone" else (n // threads) * threads \
        if way == "threads" else n
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    latency = RUNS[way](model, x, n, threads)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return (cpu1 - cpu0) / count, count / (wall1 - wall0), latency


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="jet_mlp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-delay-us", type=float, default=500.0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.requests < args.threads or args.threads < 1 or args.repeats < 1:
        p.error("--requests must be at least --threads, and both and --repeats at least 1")
    config = offload.Batching(max_batch=args.max_batch, max_delay_us=args.max_delay_us)
    path = zoo.path(args.model)
    models = {"unbatched": offload.load(path, device=args.device),
              "batched": offload.load(path, device=args.device, batching=config)}
    x = zoo.sample_input(args.model, 1)
    want = models["unbatched"](x)
    for name, model in models.items():  # plans built, answers checked
        np.testing.assert_allclose(model(x), want, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(model.submit(x).result(timeout=60), want, rtol=1e-6,
                                   atol=1e-7, err_msg=name)
    raw = {way: {name: [] for name in models} for way in WAYS}
    for r in range(args.repeats):
        for way in WAYS:
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                raw[way][name].append(run_one(way, models[name], x, args.requests,
                                              args.threads))
    for model in models.values():
        model.close()

    rows = []
    for way in WAYS:
        for name in models:
            runs = raw[way][name]
            lat = [v[2] for v in runs if v[2] is not None]
            row = {"way": way, "model": name,
                   "cpu_us_per_request": statistics.median(v[0] for v in runs) * 1e6,
                   "cpu_us_per_request_min": min(v[0] for v in runs) * 1e6,
                   "requests_per_s": statistics.median(v[1] for v in runs),
                   "latency_median_us": statistics.median(lat) * 1e6 if lat else None,
                   "runs": [[v[0] * 1e6, v[1]] for v in runs]}
            rows.append(row)
            print(f"{way:13s} {name:9s} {row['cpu_us_per_request']:7.2f} us CPU/request "
                  f"(min {row['cpu_us_per_request_min']:.2f})  {row['requests_per_s']:9.0f} "
                  "requests/s" + (f"  latency {row['latency_median_us']:.1f} us" if lat else ""),
                  flush=True)
    doc = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine_info(), "model": args.model, "device": args.device,
           "requests": args.requests, "threads": args.threads, "repeats": args.repeats,
           "batching": {"max_batch": config.max_batch, "max_delay_us": config.max_delay_us},
           "load_average_end": os.getloadavg()[0], "rows": rows}
    bench.write_results(args.out, "batcher", doc, markdown(doc))
    return 0


def markdown(doc) -> str:
    mach = doc["machine"]
    b = doc["batching"]
    lines = [f"# Batcher: per-request cost, {doc['model']} batch-1 requests on {doc['device']}",
             "", f"- date: {doc['date']}", f"- command: `{doc['command']}`",
             f"- machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores; load "
             f"average {doc['load_average_end']:.1f} at the end",
             f"- batched: Batching(max_batch={b['max_batch']}, max_delay_us={b['max_delay_us']:g})",
             f"- submit+await: 1 thread submits {doc['requests']} then awaits them; threads: "
             f"{doc['threads']} threads call model(x), {doc['requests']} in all; alone: 1 thread "
             f"calls model(x) {max(1, doc['requests'] // 10)} times",
             f"- unbatched and batched alternated in each of {doc['repeats']} repeats; medians; "
             "CPU = process CPU time (all its threads) per request", "",
             "| way | model | CPU us/request (median) | min | requests/s (wall) | "
             "call latency (median) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        lat = "" if r["latency_median_us"] is None else f"{r['latency_median_us']:.1f} us"
        lines.append(f"| {r['way']} | {r['model']} | {r['cpu_us_per_request']:.2f} | "
                     f"{r['cpu_us_per_request_min']:.2f} | {r['requests_per_s']:.0f} | {lat} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
