#!/usr/bin/env python
"""Per-call overhead of a small model: input from a plain NumPy array vs from ``offload.empty``.

    python benchmarks/bench_overhead.py [--devices cpu,opencl:0] [--model jet_mlp] [--batch 1]

On each device, in one run with the contenders alternated (offload.bench.measure: round-robin
blocks, medians over the repeats):

  plain            model(x)                      x: a NumPy array (copied in, output allocated)
  empty            model(xe)                     xe = offload.empty(...): read in place
  empty+out        model(xe, out=ye)             ye = offload.empty(...): written in place
  bind plain       model.bind(x)()               fixed buffers, checked once; x copied
  bind empty       model.bind(xe, out=ye)()      fixed buffers, checked once, nothing copied
  kernels          the plan's steps + synchronize, no host work around them (the floor)

host overhead = median - kernels median; cut = 1 - host(zero-copy) / host(plain). onnxruntime on
the same input is shown for scale. Writes <out>/overhead-<YYYYMMDD-HHMM>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import sys

import numpy as np

import offload
from offload import bench, zoo

HERE = pathlib.Path(__file__).resolve().parent
PAIRS = [("empty", "plain"), ("empty+out", "plain"), ("bind empty", "bind plain"),
         ("bind empty", "plain")]


def contenders_for(spec: str, model_name: str, batch: int):
    model = offload.load(zoo.path(model_name), device=spec)
    x = zoo.sample_input(model_name, batch)
    xe = offload.empty(x.shape)
    xe[...] = x
    want = model(x)
    ye = offload.empty(want.shape)
    bind_plain, bind_empty = model.bind(x), model.bind(xe, out=ye)
    plan = bind_empty.plan
    runs, _ = plan._in_place_runs([xe], [ye]) if plan._bindings is not None else \
        (plan._run_steps, None)
    device = plan.device

    def kernels(_):
        for step in runs:
            step()
        device.synchronize()

    fns = {"plain": lambda _: model(x), "empty": lambda _: model(xe),
           "empty+out": lambda _: model(xe, out=ye), "bind plain": lambda _: bind_plain(),
           "bind empty": lambda _: bind_empty(), "kernels": kernels}
    for name, fn in fns.items():  # every contender computes the same answer
        y = fn(None)
        if y is not None:
            np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7, err_msg=name)
    copies = {}
    for name in ("plain", "empty", "empty+out", "bind plain", "bind empty"):
        model.reset_stats()
        fns[name](None)
        copies[name] = (model.stats["copy_in_bytes"], model.stats["copy_out_bytes"])
    return [bench.Contender(name, fn, "offload", spec) for name, fn in fns.items()], copies, x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="",
                   help="comma-separated specs (default: cpu and every available opencl device)")
    p.add_argument("--model", default="jet_mlp")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per contender")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    specs = [s for s in args.devices.split(",") if s] or [
        i.spec for i in offload.devices() if i.available and i.spec.split(":")[0] in
        ("cpu", "opencl")]
    doc = {"command": " ".join([shlex.quote(a) for a in [sys.executable, *sys.argv]]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine_info(), "model": args.model, "batch": args.batch,
           "devices": {}}
    for spec in specs:
        contenders, copies, x = contenders_for(spec, args.model, args.batch)
        ort = bench.onnxruntime_contender(zoo.path(args.model), threads=1,
                                          name="onnxruntime (1 thread)") \
            if bench.onnxruntime_missing_reason() is None else None
        if ort is not None:
            contenders.append(ort)
        m = bench.measure(contenders, x, repeats=args.repeats, min_time_s=args.min_time)
        us = {name: r.median_s * 1e6 for name, r in m.items()}
        floor = us["kernels"]
        host = {name: us[name] - floor for name in copies}
        cuts = {f"{a} vs {b}": 1 - host[a] / host[b] for a, b in PAIRS if host[b] > 0}
        doc["devices"][spec] = {"median_us": us, "p90_us": {n: r.p90_s * 1e6 for n, r in m.items()},
                                "host_us": host, "copies": copies, "cuts": cuts,
                                "device": offload.device(spec).name}
        print(f"{spec}: " + ", ".join(f"{n} {v:.2f} us" for n, v in us.items()))
        print("   host overhead cut: " + ", ".join(f"{k} {v:.0%}" for k, v in cuts.items()))
    bench.write_results(args.out, "overhead", doc, markdown(doc))
    return 0


def markdown(doc) -> str:
    mach = doc["machine"]
    lines = [f"# Per-call overhead: {doc['model']} batch {doc['batch']}", "",
             f"- date: {doc['date']}", f"- command: `{doc['command']}`",
             f"- machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
             f"Python {mach.get('python', '?')}, NumPy {mach.get('numpy', '?')}",
             "- contenders alternated in one run; medians of the repeats; host overhead = "
             "median - kernels", ""]
    for spec, d in doc["devices"].items():
        lines += [f"## {spec} ({d['device']})", "",
                  "| call | median us | p90 us | host overhead us | bytes copied in / out |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, v in d["median_us"].items():
            host = d["host_us"].get(name)
            cp = d["copies"].get(name)
            lines.append(f"| {name} | {v:.2f} | {d['p90_us'][name]:.2f} | "
                         f"{'' if host is None else f'{host:.2f}'} | "
                         f"{'' if cp is None else f'{cp[0]} / {cp[1]}'} |")
        lines += ["", "Host overhead cut: " + "; ".join(
            f"{k}: **{v:.0%}**" for k, v in d["cuts"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
