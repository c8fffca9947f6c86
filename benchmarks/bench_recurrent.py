#!/usr/bin/env python
"""A DeepJet-sized recurrent tagger (tests/recurrent_models.py, seeded) on offload's devices
beside onnxruntime, in one alternating run.

    python benchmarks/bench_recurrent.py [--devices cpu,opencl:0] [--batches 1,1024]
                                         [--ort-threads 2] [--out DIR]

The network: 25 charged candidates x 16 features, 25 neutral x 6, 4 vertices x 12; per branch
1x1 Conv1d 64-32-32-8 with ReLU, then an LSTM of 150 / 50 / 50 units (its last hidden state);
dense 200 + ReLU, dense 8, softmax. Exported with torch's legacy exporter (needs torch); for
every batch the contenders (offload on each device, onnxruntime CPUExecutionProvider with
``--ort-threads`` threads) alternate within one run (offload.bench.measure): medians per call
and offload/onnxruntime ratios. Outputs are checked against onnxruntime first. Writes
recurrent-<stamp>.md/.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import shlex
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import recurrent_models as RM  # noqa: E402

from offload import bench  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu,opencl:0")
    p.add_argument("--batches", default="1,1024")
    p.add_argument("--ort-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    devices = [d for d in args.devices.split(",") if d]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "deepjet_like.onnx"
        RM.deepjet(path)
        ort = bench.onnxruntime_contender(path, args.ort_threads)
        if ort is None:
            print(bench.onnxruntime_missing_reason(), file=sys.stderr)
            return 2
        contenders = [bench.offload_contender(path, d) for d in devices] + [ort]
        for batch in (int(b) for b in args.batches.split(",")):
            feeds = RM.make_inputs(batch, np.random.default_rng(batch))
            x = tuple(feeds[k] for k in RM.INPUTS)
            want = ort.fn(x)[0]
            for c in contenders[:-1]:
                np.testing.assert_allclose(c.fn(x), want, rtol=1e-4, atol=1e-4,
                                           err_msg=f"{c.name} batch {batch}")
            m = bench.measure(contenders, x, repeats=args.repeats, min_time_s=args.min_time)
            ref = m[ort.name].median_s
            for c in contenders:
                r = m[c.name]
                rows.append({"model": "deepjet_like", "batch": batch, "contender": c.name,
                             "device": c.device, "median_ms": r.median_s * 1e3,
                             "p90_ms": r.p90_s * 1e3, "events_per_s": r.throughput,
                             "vs_onnxruntime": r.median_s / ref})
                print(f"deepjet_like batch {batch:5d} {c.name:20s} {r.median_s * 1e3:9.3f} ms"
                      f"  {r.median_s / ref:5.2f}x onnxruntime", flush=True)
    doc = {"command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine_info(), "rows": rows,
           "load_average_end": os.getloadavg()[0],
           "env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                              "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                   if k in os.environ}}
    mach = doc["machine"]
    lines = ["# Recurrent tagger: DeepJet-sized (1-D convs + LSTMs 150/50/50), beside "
             "onnxruntime", "",
             f"- date: {doc['date']}", f"- command: `{doc['command']}`",
             f"- machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores (shared, "
             f"noisy); load average {doc['load_average_end']:.1f} at the end; environment "
             f"{doc['env'] or 'default'}",
             f"- onnxruntime: CPUExecutionProvider, {args.ort_threads} intra-op threads",
             "- contenders alternated in one run (offload.bench.measure), medians per call; "
             "outputs checked against onnxruntime (rtol = atol = 1e-4) first", "",
             "| batch | contender | median ms | p90 ms | events/s | vs onnxruntime |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['contender']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
              f"{r['events_per_s']:.0f} | {r['vs_onnxruntime']:.2f}x |" for r in rows]
    bench.write_results(args.out, "recurrent", doc, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
