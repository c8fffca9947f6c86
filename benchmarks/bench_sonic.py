#!/usr/bin/env python
"""SONIC mode: many client processes sharing one Triton server with one offload device.

    python benchmarks/bench_sonic.py [--models jet_cnn,resnet50] [--clients 1,2,4,8,16,32,50]
                                     [--device cpu] [--duration 6] [--overhead-repeats 7]

1. Throughput: for each model and each number N of client *processes*, N processes each send
   one-event requests back to back (``offload.load("grpc://...")``, synchronous calls) to one
   tritonserver serving the model on one device (one instance, dynamic batching), for
   ``--duration`` s after a common start; beside it, the same N processes each running the
   model in-process (``offload.load(name)`` on the same device). The two contenders alternate
   at each N. Reported: events/s, p50/p99 latency, and the saturation point (the smallest N
   reaching 95% of the best server throughput).
2. Per-request overhead over loopback, one client, jet_mlp batch 1: gRPC and HTTP, with and
   without system shared memory, beside the in-process call (offload.bench.measure: contenders
   alternated in blocks, medians of the repeats); Triton's own statistics split the server's
   part (queue, compute) from the rest.

Writes <out>/sonic-<YYYYMMDD-HHMM>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import pathlib
import shlex
import sys
import tempfile
import time

import numpy as np

import offload
from offload import bench, triton, zoo

HERE = pathlib.Path(__file__).resolve().parent
# Triton's published per-request figures (its optimization guide, perf_analyzer on a GPU
# server), quoted in issue 13
THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRITON_PUBLISHED = {"grpc_cuda_shm_server_overhead_us": 56, "grpc_cuda_shm_client_us": 5,
                    "grpc_no_shm_server_overhead_us": 128}


def _worker(conn):
    """One client process, kept for the whole run: ("prepare", kind, name, source) loads and
    warms a model (once), ("run", kind, name, start_at, duration) sends one-event requests back
    to back from the common start and returns the latencies."""
    models = {}
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        try:
            if msg[0] == "prepare":
                _, kind, name, source = msg
                if (kind, name) not in models:
                    models[kind, name] = offload.load(source) if kind == "server" else \
                        offload.load(name, device=source)
                    x = zoo.sample_input(name, 1)
                    for _ in range(2):
                        models[kind, name](x)
                conn.send(("ok", None))
            else:
                _, kind, name, start_at, duration = msg
                model, x = models[kind, name], zoo.sample_input(name, 1)
                while time.time() < start_at:
                    time.sleep(0.0005)
                end, latencies, clock = start_at + duration, [], time.perf_counter
                while time.time() < end:
                    t = clock()
                    model(x)
                    latencies.append(clock() - t)
                conn.send(("ok", (latencies, time.time())))
        except BaseException as e:  # reported by the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))
    for m in models.values():
        m.close()


class Pool:
    """``size`` client processes (spawned once: importing offload dominates their start)."""

    def __init__(self, size):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        saved = {k: os.environ.get(k) for k in THREADS}
        os.environ.update(THREADS)  # a job is one thread, as a CMSSW stream (spawn copies it)
        try:
            for _ in range(size):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child,), daemon=True)
                p.start()
                self.conns.append(parent)
                self.procs.append(p)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def ask(self, conns, msg, timeout):
        for c in conns:
            c.send(msg)
        out = []
        for c in conns:
            if not c.poll(timeout):
                raise RuntimeError(f"a client process did not answer {msg[0]!r} in {timeout} s")
            out.append(c.recv())
        errors = [r[1] for r in out if r[0] == "error"]
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(conns)} clients failed: {errors[0]}")
        return [r[1] for r in out]

    def close(self):
        for c in self.conns:
            c.send(("stop",))
        for p in self.procs:
            p.join(30)


def run_point(pool, kind, source, name, n, duration):
    conns = pool.conns[:n]
    pool.ask(conns, ("prepare", kind, name, source), 600)
    start_at = time.time() + 0.5
    results = pool.ask(conns, ("run", kind, name, start_at, duration), duration + 600)
    lat = np.concatenate([np.asarray(r[0]) for r in results])
    # the window ends with the last call that started in it (a slow call may outlast it)
    elapsed = max(r[1] for r in results) - start_at
    return {"clients": n, "events": int(lat.size), "events_per_s": lat.size / elapsed,
            "elapsed_s": elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3)}


def saturation(rows, fraction=0.95):
    best = max(r["events_per_s"] for r in rows)
    return min(r["clients"] for r in rows if r["events_per_s"] >= fraction * best)


def throughput(args, server, pool):
    out = {}
    for name in args.models:
        rows = {"server": [], "in-process": []}
        cap = args.in_process_max.get(name)
        for n in args.clients:
            kinds = [k for k in ("server", "in-process")
                     if not (k == "in-process" and cap is not None and n > cap)]
            tries = {k: [] for k in kinds}
            for _ in range(args.repeats):  # the contenders alternate
                for kind in kinds:
                    source = f"{server.grpc_url}/{name}" if kind == "server" else args.device
                    before = _server_stats(server, name) if kind == "server" else None
                    row = run_point(pool, kind, source, name, n,
                                    args.durations.get(name, args.duration))
                    if kind == "server":
                        after = _server_stats(server, name)
                        runs = after["executions"] - before["executions"]
                        row["rows_per_device_run"] = \
                            (after["inferences"] - before["inferences"]) / max(runs, 1)
                    tries[kind].append(row)
            for kind in kinds:  # the median repeat by throughput, the others kept beside it
                ordered = sorted(tries[kind], key=lambda r: r["events_per_s"])
                row = dict(ordered[(len(ordered) - 1) // 2])
                row["repeats_events_per_s"] = [r["events_per_s"] for r in tries[kind]]
                rows[kind].append(row)
                print(f"{name} {kind:10s} N={n:3d}: {row['events_per_s']:9.1f} ev/s  "
                      f"p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms"
                      + (f"  {row['rows_per_device_run']:.1f} rows/run"
                         if "rows_per_device_run" in row else ""), flush=True)
        out[name] = {"rows": rows, "saturation_clients": saturation(rows["server"])}
    return out


def _server_stats(server, name):
    import tritonclient.grpc as g
    c = g.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    m = c.get_inference_statistics(name, as_json=True)["model_stats"][0]
    c.close()
    inf = m["inference_stats"]
    ns = lambda k: int(inf.get(k, {}).get("ns", 0))  # noqa: E731
    return {"executions": int(m.get("execution_count", 0)),
            "inferences": int(m.get("inference_count", 0)),
            "requests": int(inf.get("success", {}).get("count", 0)),
            "success_ns": ns("success"), "queue_ns": ns("queue"),
            "compute_ns": ns("compute_input") + ns("compute_infer") + ns("compute_output")}


def overhead(args, server):
    name = "jet_mlp"
    x = zoo.sample_input(name, 1)
    local = offload.load(name, device=args.device)
    models = {"in-process": local}
    for proto, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        for shm in (False, True):
            models[f"{proto}{' + shm' if shm else ''}"] = offload.load(
                f"{url}/{name}", shared_memory=shm)
    want = local(x)
    for label, m in models.items():
        np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-6, err_msg=label)
    contenders = [bench.Contender(label, (lambda m: lambda v: m(v))(m), "offload", label)
                  for label, m in models.items()]
    before = _server_stats(server, name)
    measured = bench.measure(contenders, x, repeats=args.overhead_repeats,
                             min_time_s=args.overhead_time)
    after = _server_stats(server, name)
    requests = after["requests"] - before["requests"]
    server_us = (after["success_ns"] - before["success_ns"]) / max(requests, 1) / 1e3
    queue_us = (after["queue_ns"] - before["queue_ns"]) / max(requests, 1) / 1e3
    compute_us = (after["compute_ns"] - before["compute_ns"]) / max(requests, 1) / 1e3
    local_us = measured["in-process"].median_s * 1e6
    rows = []
    for label, m in measured.items():
        us = m.median_s * 1e6
        rows.append({"contender": label, "median_us": us, "p90_us": m.p90_s * 1e6,
                     "overhead_us": us - local_us if label != "in-process" else 0.0})
    for m in models.values():
        m.close()
    return {"model": name, "batch": 1, "rows": rows,
            "server_per_request_us": {"in_server": server_us, "queue": queue_us,
                                      "compute (input+infer+output)": compute_us,
                                      "requests": requests},
            "triton_published_us": TRITON_PUBLISHED}


def markdown(doc) -> str:
    mach = doc["machine"]
    lines = ["# SONIC: client processes sharing one Triton server", "",
             f"- date: {doc['date']}", f"- command: `{doc['command']}`",
             f"- machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores (shared with "
             "other work), Python " + str(mach.get('python', '?')),
             f"- server: tritonserver (nvidia-pytriton 0.7.0), one instance of each model on "
             f"offload device `{doc['device']}`, max_batch {doc['max_batch']}, "
             f"max_queue_delay {doc['delay_us']:g} us; clients: `offload.load(\"grpc://...\")`, "
             f"synchronous one-event requests for {doc['duration']:g} s per point (throughput: events "
             f"over the time to the last one; the median of {doc['repeats']} alternating runs);"
             " in-process: "
             "each process its own `offload.load(name)` on the same device; client processes "
             "run with one BLAS thread (as a CMSSW job's stream), the server with its default",
             ""]
    for name, d in doc["throughput"].items():
        lines += [f"## {name}{doc['notes'].get(name, '')}", "",
                  "| clients | server ev/s | p50 ms | p99 ms | rows/device run | "
                  "in-process ev/s | p50 ms | p99 ms |", "| ---: | ---: | ---: | ---: | ---: | "
                  "---: | ---: | ---: |"]
        local = {r["clients"]: r for r in d["rows"]["in-process"]}
        for s in d["rows"]["server"]:
            i = local.get(s["clients"])
            there = (f"{i['events_per_s']:.1f} | {i['p50_ms']:.2f} | {i['p99_ms']:.2f}"
                     if i else "not run (memory) | | ")
            lines.append(f"| {s['clients']} | {s['events_per_s']:.1f} | {s['p50_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} | {s['rows_per_device_run']:.1f} | {there} |")
        lines += ["", f"Saturation (95% of the best server throughput) at "
                  f"**{d['saturation_clients']} client processes**.", ""]
    o = doc["overhead"]
    if o:
        sp = o["server_per_request_us"]
        lines += [f"## Per-request overhead over loopback ({o['model']}, batch 1, one client)",
                  "", "| call | median us | p90 us | over in-process us |",
                  "| --- | ---: | ---: | ---: |"]
        for r in o["rows"]:
            lines.append(f"| {r['contender']} | {r['median_us']:.0f} | {r['p90_us']:.0f} | "
                         f"{r['overhead_us']:.0f} |")
        p = o["triton_published_us"]
        lines += ["", f"Triton's statistics over those requests: {sp['in_server']:.0f} us in "
                  f"the server per request (queue {sp['queue']:.0f} us, compute "
                  f"{sp['compute (input+infer+output)']:.0f} us, the Python backend and "
                  "offload's run included).", "",
                  f"Triton's published figures (GPU server, perf_analyzer): gRPC with CUDA "
                  f"shared memory ~{p['grpc_cuda_shm_server_overhead_us']} us server overhead "
                  f"and ~{p['grpc_cuda_shm_client_us']} us client marshalling; without shared "
                  f"memory ~{p['grpc_no_shm_server_overhead_us']} us server overhead.", ""]
    return "\n".join(lines)


def plot(doc, path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot ({e})"
    names = list(doc["throughput"])
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False)
    for k, name in enumerate(names):
        rows = doc["throughput"][name]["rows"]
        for kind, style in (("server", "o-"), ("in-process", "s--")):
            n = [r["clients"] for r in rows[kind]]
            axes[0][k].plot(n, [r["events_per_s"] for r in rows[kind]], style, label=kind)
            axes[1][k].plot(n, [r["p99_ms"] for r in rows[kind]], style, label=f"{kind} p99")
            axes[1][k].plot(n, [r["p50_ms"] for r in rows[kind]], style, alpha=0.4,
                            label=f"{kind} p50")
        axes[0][k].axvline(doc["throughput"][name]["saturation_clients"], color="gray", lw=0.8)
        axes[0][k].set_title(f"{name}: events/s")
        axes[1][k].set_yscale("log")
        axes[1][k].set_title(f"{name}: latency (ms)")
        for ax in (axes[0][k], axes[1][k]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("client processes")
            ax.legend(fontsize=8)
    fig.suptitle(f"one tritonserver, one offload device ({doc['device']}); {doc['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="jet_cnn,resnet50",
                   help="zoo models (default jet_cnn and resnet50, the largest zoo model: "
                        "offload cannot import a ParticleNet yet)")
    p.add_argument("--clients", default="1,2,4,8,16,32,50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    p.add_argument("--durations", default="resnet50=8",
                   help="per model: NAME=S,... (default resnet50=8)")
    p.add_argument("--in-process-max", default="resnet50=8",
                   help="per model: at most this many in-process clients, NAME=N,... (default "
                        "resnet50=8: each process holds its own ~0.65 GB ResNet-50)")
    p.add_argument("--repeats", type=int, default=2,
                   help="alternating runs of each point; the median is reported")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--delay-us", type=float, default=500.0)
    p.add_argument("--overhead-repeats", type=int, default=7)
    p.add_argument("--overhead-time", type=float, default=3.0, help="seconds per contender")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--overhead-only", action="store_true", help="skip the client sweep")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    args.models = [] if args.overhead_only else [m for m in args.models.split(",") if m]
    args.clients = [int(c) for c in args.clients.split(",") if c]
    pairs = lambda text, kind: {k: kind(v) for k, v in (  # noqa: E731
        item.split("=") for item in text.split(",") if item)}
    args.durations = pairs(args.durations, float)
    args.in_process_max = pairs(args.in_process_max, int)
    doc = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine_info(), "device": args.device, "max_batch": args.max_batch,
           "delay_us": args.delay_us, "duration": args.duration, "repeats": args.repeats,
           "durations": args.durations,
           "notes": {"resnet50": " (standing in for ParticleNet: offload cannot import a "
                                 "ParticleNet yet; ResNet-50 is the largest zoo model)"}}
    with tempfile.TemporaryDirectory(prefix="bench-sonic-") as tmp:
        if args.models:
            triton.write_repository(tmp, args.models, device=args.device,
                                    max_batch=args.max_batch, delay_us=args.delay_us,
                                    instances=1)
        if not args.no_overhead:  # no batching delay: one client's request goes at once
            triton.write_repository(tmp, ["jet_mlp"], device=args.device,
                                    max_batch=args.max_batch, delay_us=0, instances=1)
        pool = Pool(max(args.clients) if args.models else 0)
        try:
            with triton.Server(tmp, log=os.path.join(tmp, "server.log")).start(300) as server:
                doc["overhead"] = None if args.no_overhead else overhead(args, server)
                if doc["overhead"]:
                    for r in doc["overhead"]["rows"]:
                        print(f"overhead {r['contender']:12s} {r['median_us']:8.0f} us "
                              f"(+{r['overhead_us']:.0f})", flush=True)
                doc["throughput"] = throughput(args, server, pool)
        finally:
            pool.close()
    base = bench.write_results(args.out, "sonic-overhead" if args.overhead_only else "sonic",
                               doc, markdown(doc))
    why = plot(doc, base.with_suffix(".png")) if doc["throughput"] else "no sweep"
    print(f"wrote {base}.png" if not why else f"no plot: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
