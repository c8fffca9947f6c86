#!/usr/bin/env python
"""ParticleNet-like and ParT-like taggers (tests/tagger_models.py, seeded, P = 50) on offload's
devices beside onnxruntime, in one alternating run.

    python benchmarks/bench_taggers.py [--devices cpu,opencl:0] [--batches 1,160] [--out DIR]

Each model is exported with torch's legacy exporter (needs torch), then for every batch the
contenders (offload on each device, onnxruntime CPUExecutionProvider with all cores) alternate
within one run (offload.bench.measure): medians per call and offload/onnxruntime ratios. The
outputs are checked against onnxruntime first. Writes taggers-<stamp>.md/.json.
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

import tagger_models as TM  # noqa: E402

from offload import bench  # noqa: E402

PARTICLES = 50


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu,opencl:0")
    p.add_argument("--batches", default="1,160")
    p.add_argument("--models", default=",".join(TM.MODELS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--ort-one-thread", action="store_true",
                   help="also time onnxruntime on one thread (offload's cpu device runs on one "
                        "core with OPENBLAS_NUM_THREADS=1): a like-for-like column")
    args = p.parse_args(argv)
    devices = [d for d in args.devices.split(",") if d]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = TM.export(name, pathlib.Path(tmp) / f"{name}.onnx", "legacy")
            ort = bench.onnxruntime_contender(path)
            contenders = [bench.offload_contender(path, d) for d in devices]
            if args.ort_one_thread:
                contenders.append(bench.onnxruntime_contender(path, 1, "onnxruntime 1 thread"))
            contenders.append(ort)
            for batch in (int(b) for b in args.batches.split(",")):
                feeds = TM.make_inputs(batch, PARTICLES, np.random.default_rng(batch))
                x = tuple(feeds[k] for k in TM.INPUTS)
                want = ort.fn(x)[0]
                for c in contenders[:-1]:
                    got = c.fn(x)
                    got = got[0] if isinstance(got, list) else got  # (onnxruntime: a list)
                    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4,
                                               err_msg=f"{name} {c.name} batch {batch}")
                m = bench.measure(contenders, x, repeats=args.repeats, min_time_s=args.min_time)
                ref = m[ort.name].median_s
                for c in contenders:
                    r = m[c.name]
                    rows.append({"model": name, "batch": batch, "particles": PARTICLES,
                                 "contender": c.name, "median_ms": r.median_s * 1e3,
                                 "p90_ms": r.p90_s * 1e3, "events_per_s": r.throughput,
                                 "vs_onnxruntime": r.median_s / ref})
                    print(f"{name:12s} batch {batch:4d} {c.name:20s} {r.median_s * 1e3:9.3f} ms"
                          f"  {r.median_s / ref:5.2f}x onnxruntime")
    doc = {"command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine_info(), "rows": rows,
           "env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
                   if k in os.environ}}
    mach = doc["machine"]
    lines = ["# Taggers: ParticleNet-like and ParT-like, P = 50, beside onnxruntime", "",
             f"- date: {doc['date']}", f"- command: `{doc['command']}`",
             f"- machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores; load average "
             f"{os.getloadavg()[0]:.1f} at the end; environment {doc['env'] or 'default'}",
             "- contenders alternated in one run (offload.bench.measure), medians per call; "
             "outputs checked against onnxruntime (rtol = atol = 1e-4) first", "",
             "| model | batch | contender | median ms | p90 ms | events/s | vs onnxruntime |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['batch']} | {r['contender']} | {r['median_ms']:.3f} | "
              f"{r['p90_ms']:.3f} | {r['events_per_s']:.0f} | {r['vs_onnxruntime']:.2f}x |"
              for r in rows]
    bench.write_results(args.out, "taggers", doc, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
