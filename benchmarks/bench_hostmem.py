#!/usr/bin/env python
"""Host-memory building blocks of the zero-copy path, each beside its NumPy equivalent.

    python benchmarks/bench_hostmem.py [--out benchmarks/results]

offload.empty alloc+free (small and 256 KiB, touched) vs np.empty; _core.copy (GIL released)
vs np.copyto at 1 MiB and 64 MiB; the batcher's native gather (one memcpy per request into a
pooled aligned block, tail zeroed) vs the NumPy path (np.empty + concatenate + zero). Contenders
alternate within one run (offload.bench.measure); medians. Writes hostmem-<stamp>.md/.json.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import shlex
import sys

import numpy as np

import offload
from offload import _core, bench
from offload.batching import _ARENA

HERE = pathlib.Path(__file__).resolve().parent


def numpy_gather(parts, size):
    block = np.empty((size,) + parts[0].shape[1:], np.float32)
    np.concatenate(parts, out=block[:len(parts)])
    block[len(parts):] = 0
    return block


def native_gather(parts, size):
    block = _ARENA.take((size,) + parts[0].shape[1:])
    _core.gather(block, parts)
    return block


def cases():
    def touched(make, n):
        def run(_):
            a = make(n)
            a[::1024] = 0
        return run
    yield "alloc+free (1, 16) float32", [
        bench.Contender("offload.empty", lambda _: offload.empty((1, 16)), "offload"),
        bench.Contender("np.empty", lambda _: np.empty((1, 16), np.float32), "numpy")]
    yield "alloc+touch+free 256 KiB", [
        bench.Contender("offload.empty", touched(lambda n: offload.empty(n), 65536), "offload"),
        bench.Contender("np.empty", touched(lambda n: np.empty(n, np.float32), 65536), "numpy")]
    for mib in (1, 64):
        n = mib << 18
        src, dst = np.ones(n, np.float32), offload.empty(n)
        yield f"copy {mib} MiB", [
            bench.Contender("_core.copy", lambda _, d=dst, s=src: _core.copy(d, s), "offload"),
            bench.Contender("np.copyto", lambda _, d=dst, s=src: np.copyto(d, s), "numpy")]
    for count, width in ((8, 16), (64, 16), (64, 1024)):
        parts = [np.random.rand(1, width).astype(np.float32) for _ in range(count)]
        size = count
        yield f"gather {count} x {width} floats", [
            bench.Contender("native gather", lambda _, p=parts, s=size: native_gather(p, s),
                            "offload"),
            bench.Contender("NumPy gather", lambda _, p=parts, s=size: numpy_gather(p, s),
                            "numpy")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=1.0)
    args = p.parse_args(argv)
    rows = []
    for what, contenders in cases():
        m = bench.measure(contenders, None, repeats=args.repeats, min_time_s=args.min_time,
                          pause_s=0.0)
        a, b = (m[c.name].median_s * 1e6 for c in contenders)
        rows.append({"what": what, "offload": contenders[0].name, "offload_us": a,
                     "reference": contenders[1].name, "reference_us": b, "ratio": a / b})
        print(f"{what:32s} {contenders[0].name} {a:9.2f} us   {contenders[1].name} {b:9.2f} us")
    doc = {"command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine_info(), "rows": rows}
    mach = doc["machine"]
    lines = ["# Host memory: offload's native pieces vs NumPy", "", f"- date: {doc['date']}",
             f"- command: `{doc['command']}`",
             f"- machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, NumPy "
             f"{mach.get('numpy', '?')}", "- alternated in one run, medians", "",
             "| what | offload | us | reference | us | offload/reference |",
             "| --- | --- | ---: | --- | ---: | ---: |"]
    lines += [f"| {r['what']} | {r['offload']} | {r['offload_us']:.2f} | {r['reference']} | "
              f"{r['reference_us']:.2f} | {r['ratio']:.2f} |" for r in rows]
    bench.write_results(args.out, "hostmem", doc, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
