"""OpenCL device benchmark: GEMM GFLOP/s (naive vs tiled vs NumPy), kernel build time (cold and
warm from the disk cache), and zoo model timings opencl vs cpu vs onnxruntime, alternating in one
run. Writes benchmarks/results/opencl-<date>.json and .md.

    python benchmarks/bench_opencl.py [--device opencl:0] [--size 512] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import offload
from offload import zoo
from offload.drivers import opencl as ocl

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeat, sync=None):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def bench_gemm(dev, size, repeat):
    m = n = k = size
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    flops = 2.0 * m * n * k
    ab, bb = dev.upload(a), dev.upload(b)
    cb = dev.view(dev.alloc(m * n * 4), (m, n))
    rows = {}
    for label, naive in (("naive", True), ("tiled", False)):
        run = ocl.gemm(dev, ab, bb, cb, m, n, k, lda=k, ldb=n, ldc=n, naive=naive)
        run()
        dev.synchronize()
        got = np.empty((m, n), np.float32)
        dev.copy_out(got, cb)
        err = float(np.abs(got - a @ b).max())
        best, med = best_of(run, repeat if not naive else max(2, repeat // 2), dev.synchronize)
        rows[label] = dict(gflops=flops / best / 1e9, best_s=best, median_s=med, max_err=err)
    out = np.empty((m, n), np.float32)
    np.matmul(a, b, out=out)
    best, med = best_of(lambda: np.matmul(a, b, out=out), repeat * 4)
    rows["numpy"] = dict(gflops=flops / best / 1e9, best_s=best, median_s=med)
    rows["tiled_vs_numpy"] = rows["tiled"]["gflops"] / rows["numpy"]["gflops"]
    cfg = dev.gemm_config
    rows["tiled_config"] = dict(kernel="gemm_direct" if cfg.get("DIRECT") else "gemm_tiled",
                                **cfg)
    return rows


def _build_once(spec):
    """Build every program on a fresh device object; print the figures as JSON."""
    dev = offload.device(spec)
    d = ocl.OpenCLDevice(dev.index, dev.cl_device)
    t = time.perf_counter()
    for name in ocl.PROGRAMS:
        d.program(name, dev.gemm_config if name == "gemm.cl" else None)
    stats = {k: v for k, v in d.build_stats.items() if k != "seconds"}
    print(json.dumps(dict(seconds=time.perf_counter() - t, **stats)))


def bench_build(dev):
    """Build every program cold (empty offload and PoCL caches) then warm (binaries from
    offload's disk cache), each in a fresh process so no in-process table helps."""
    import subprocess
    import sys
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OFFLOAD_CACHE=tmp, POCL_CACHE_DIR=os.path.join(tmp, "pocl"))
        for label in ("cold", "warm"):
            done = subprocess.run([sys.executable, __file__, "--build-once", dev.spec], env=env,
                                  capture_output=True, text=True, check=True)
            out[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def bench_models(spec, names, batches, repeat):
    import onnxruntime as ort
    rows = []
    for name in names:
        path = zoo.path(name)
        runners = {}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for batch in batches[name]:
            x = zoo.sample_input(name, batch, seed=batch)
            runners = {
                spec: offload.load(path, device=spec),
                "cpu:0": offload.load(path, device="cpu"),
            }
            calls = {k: (lambda m=m: m(x)) for k, m in runners.items()}
            calls["onnxruntime"] = lambda: sess.run(None, {"input": x})
            for f in calls.values():  # warm-up: plans, first kernel launches
                f()
            times = {k: [] for k in calls}
            for _ in range(repeat):  # alternate so that machine noise hits all alike
                for k, f in calls.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            row = dict(model=name, batch=batch)
            for k, ts in times.items():
                row[k] = dict(best_ms=min(ts) * 1e3, median_ms=statistics.median(ts) * 1e3)
            rows.append(row)
            print(f"  {name:10s} batch {batch:3d}: " + "  ".join(
                f"{k} {row[k]['median_ms']:.2f} ms" for k in calls), flush=True)
    return rows


def markdown(result):
    g, b = result["gemm"], result["build"]
    lines = [f"# OpenCL benchmark {result['date']}", "",
             f"Device: {result['device']} ({result['spec']}); host {result['host']}", "",
             f"Command: `{result.get('command', '')}`; environment {result.get('environment')}",
             "",
             f"## GEMM {result['size']}^3 (float32)", "",
             "| kernel | GFLOP/s | best ms | max abs err |", "| --- | ---: | ---: | ---: |"]
    for k in ("naive", "tiled", "numpy"):
        lines.append(f"| {k} | {g[k]['gflops']:.1f} | {g[k]['best_s'] * 1e3:.2f} | "
                     f"{g[k].get('max_err', 0):.2g} |")
    cfg = g.get("tiled_config", {})
    lines += ["", f"tiled / numpy: {g['tiled_vs_numpy'] * 100:.1f} %", "",
              "tiled: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), "",
              "## Kernel build (all programs)", "", "| | seconds | compiled | from disk |",
              "| --- | ---: | ---: | ---: |"]
    for k in ("cold", "warm"):
        lines.append(f"| {k} | {b[k]['seconds']:.2f} | {b[k]['compiled']} | "
                     f"{b[k]['from_disk']} |")
    lines += ["", "## Zoo models (median ms, alternating runs)", "",
              f"| model | batch | {result['spec']} | cpu:0 | onnxruntime |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["models"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r[result['spec']]['median_ms']:.2f} | "
                     f"{r['cpu:0']['median_ms']:.2f} | {r['onnxruntime']['median_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="opencl:0")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small models and batches only")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--build-once", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_once:
        return _build_once(args.build_once)
    dev = offload.device(args.device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    result = dict(date=date, spec=dev.spec, device=dev.name, size=args.size,
                  command=" ".join(["python", "benchmarks/bench_opencl.py", *(argv or sys.argv[1:])]),
                  environment=env,
                  host=f"{platform.machine()} {os.cpu_count()} cpus, numpy {np.__version__}")
    print(f"device {dev.spec}: {dev.name}")
    result["build"] = bench_build(dev)
    print("build:", result["build"])
    result["gemm"] = bench_gemm(dev, args.size, args.repeat)
    print("gemm:", {k: (round(v["gflops"], 1) if "gflops" in v else v) if isinstance(v, dict)
                    else round(v, 3) for k, v in result["gemm"].items()})
    if args.quick:
        batches = {"jet_mlp": (1, 256), "hcal_mlp": (1, 256), "jet_cnn": (1, 64)}
    else:
        batches = {"jet_mlp": (1, 1024), "hcal_mlp": (1, 1024), "jet_cnn": (1, 256),
                   "resnet50": (1, 16)}
    result["models"] = bench_models(dev.spec, list(batches), batches, args.repeat)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"opencl-{date}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / f"opencl-{date}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
