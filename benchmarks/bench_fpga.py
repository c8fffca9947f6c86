#!/usr/bin/env python
"""Fixed point against float32 on the zoo jet models, and the FPGA host call sequence.

    python benchmarks/bench_fpga.py [--events 10000] [--cnn-events 2000] [--precision ap_fixed<16,6>]

1. Accuracy (CPU device: offload.fpga.quant emulation, bit-exact with the HLS kernels) on seeded
   random events (offload.zoo.sample_input, seed 0): max |softmax(fixed) - softmax(float32)|,
   mean of that, and argmax agreement.
2. ``xrt-emu:0`` (the xrt driver on offload.fpga.pyxrt_emu, an EMULATION of pyxrt running the
   C-simulated kernels; no card): per batch, the bytes crossing "PCIe" (BO syncs each way), the
   syncs and kernel runs; outputs checked bit-exact against the CPU emulation; C-simulation time
   per event (g++ -O2 of the HLS C++ on this CPU: says nothing of the card's latency).

Writes benchmarks/results/fpga-<YYYYMMDD-HHMM>.md (machine, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import shlex
import sys
import time

import numpy as np

import offload
from offload import zoo

HERE = pathlib.Path(__file__).resolve().parent
EMU = "xrt-emu:0"


def accuracy(name: str, events: int, precision: str) -> dict:
    x = zoo.sample_input(name, events, seed=0)
    t0 = time.perf_counter()
    yq = offload.load(name, device="cpu", precision=precision)(x)
    t_fixed = time.perf_counter() - t0
    yf = offload.load(name, device="cpu")(x)
    diff = np.abs(yq.astype(np.float64) - yf)
    return {"events": events, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "argmax_agree": float(np.mean(yq.argmax(1) == yf.argmax(1))),
            "cpu_emulation_s": t_fixed}


def call_sequence(name: str, batch: int, precision: str, repeats: int = 5) -> dict:
    dev = offload.device(EMU)
    model = offload.load(name, device=EMU, precision=precision)
    x = zoo.sample_input(name, batch, seed=1)
    dev.reset_counters()
    y = model(x)  # first call: plan, weights quantised and uploaded once
    first = dict(dev.counters)
    exact = bool(np.array_equal(y, offload.load(name, device="cpu", precision=precision)(x)))
    dev.reset_counters()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    c = {k: v / repeats for k, v in dev.counters.items()}
    return {"batch": batch, "exact": exact, "first_call": first, "per_batch": c,
            "us_per_event": float(np.median(times)) / batch * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--cnn-events", type=int, default=2000)
    ap.add_argument("--precision", default="ap_fixed<16,6>")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    now = datetime.datetime.now()
    command = "python benchmarks/" + " ".join(
        [pathlib.Path(sys.argv[0]).name] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    lines = ["# FPGA: fixed point vs float32, and the xrt-emu call sequence",
             "", f"- date: {now:%Y-%m-%d %H:%M}", f"- command: `{command}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
             f"Python {platform.python_version()}, NumPy {np.__version__}",
             f"- precision: `{args.precision}` (accumulator ap_fixed<2W,2I>, "
             "offload.fpga.fixed_point defaults)",
             f"- `{EMU}` is the xrt driver on an EMULATION of pyxrt (HLS C-simulation by g++); "
             "no card, no Vitis: the times below are C-simulation on this CPU, not FPGA latency",
             "", "## Accuracy against float32 (CPU device, bit-exact emulation)", "",
             "| model | events | max abs diff (softmax) | mean abs diff | argmax agreement | "
             "emulation time |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, events in (("jet_mlp", args.events), ("jet_cnn", args.cnn_events)):
        a = accuracy(name, events, args.precision)
        print(name, a, flush=True)
        lines.append(f"| {name} | {events} | {a['max_abs']:.3g} | {a['mean_abs']:.3g} | "
                     f"{a['argmax_agree'] * 100:.2f} % | {a['cpu_emulation_s']:.2f} s |")
    lines += ["", f"## `{EMU}`: per batch (after the first call)", "",
              "| model | batch | bit-exact vs cpu | kernel runs | syncs to dev | syncs from dev "
              "| bytes to dev | bytes from dev | C-sim us/event | first call: syncs to dev, "
              "bytes |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, batches in (("jet_mlp", (1, 100, 10000)), ("jet_cnn", (1, 100))):
        for b in batches:
            r = call_sequence(name, b, args.precision)
            print(name, r, flush=True)
            c, f = r["per_batch"], r["first_call"]
            lines.append(f"| {name} | {b} | {r['exact']} | {c['runs']:g} | "
                         f"{c['syncs_to_device']:g} | {c['syncs_from_device']:g} | "
                         f"{c['bytes_to_device']:g} | {c['bytes_from_device']:g} | "
                         f"{r['us_per_event']:.2f} | {f['syncs_to_device']}, "
                         f"{f['bytes_to_device']} |")
    lines += ["", "One kernel run per layer per batch (the batch loop is inside the kernels), "
              "one sync each way per batch (input in, last layer's output back; the softmax "
              "runs on the host in float32); weights and biases cross once, at the first call. "
              "Bytes are int16 (`ap_fixed<16,6>` storage). C-sim us/event includes the host "
              "work (quantisation, softmax) and the Python driver; it is not a card latency.", ""]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fpga-{now:%Y%m%d-%H%M}.md"
    path.write_text("\n".join(lines))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
