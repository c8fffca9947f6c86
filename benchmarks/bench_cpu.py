#!/usr/bin/env python
"""CPU benchmark of record: offload's cpu device beside onnxruntime on the zoo models.

    python benchmarks/bench_cpu.py            # ~7 repeats, ~2 s per contender and point
    python benchmarks/bench_cpu.py --quick    # 5 repeats, ~0.3 s per contender and point
    python benchmarks/bench_cpu.py --models jet_mlp,hcal_mlp --out /tmp/results
    python benchmarks/bench_cpu.py --busy     # then again with one busy process beside it

Points: resnet50 b1 and b8, jet_mlp b1 and b16000, hcal_mlp b16000, jet_cnn b1, b256 and
b1024, conv1d_resnet b1 and b256 (tests/conv1d_models.py: a DeepBoostedJet-sized 1-D ResNet,
42 features x 100 particles, widths 32-64-64-128, written as 2-D convolutions with H = 1
because this branch imports 2-D Conv only). With --busy the whole suite runs a second time
with one busy process (`python -c 'while 1: pass'`) beside it, and each row gets its
busy/quiet slow-down for offload and for onnxruntime. At each point offload (cpu) and onnxruntime (CPUExecutionProvider, os.cpu_count() intra-op
threads) are timed alternately in one run (offload.bench.measure: round-robin blocks, medians
over the repeats). Prints the table and writes <out>/cpu-<YYYYMMDD-HHMM>.json and .md (UTC
time) with the machine, the date, the exact command line, the ratios offload/onnxruntime, and
per-op profiles of resnet50 b1 and jet_mlp b1.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time

import offload
from offload import bench, zoo

CONV1D = "conv1d_resnet"
CASES = [("resnet50", 1), ("resnet50", 8), ("jet_mlp", 1), ("jet_mlp", 16000),
         ("hcal_mlp", 16000), ("jet_cnn", 1), ("jet_cnn", 256), ("jet_cnn", 1024),
         (CONV1D, 1), (CONV1D, 256)]
PROFILED = [("resnet50", 1), ("jet_mlp", 1), ("jet_cnn", 256), (CONV1D, 256)]
MODELS = list(zoo.NAMES) + [CONV1D]
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import conv1d_models  # noqa: E402


def _conv1d_path() -> str:
    """tests/conv1d_models.py's model, written once next to the zoo's cached models."""
    folder = pathlib.Path(zoo.path("jet_mlp")).parent
    target = folder / f"{CONV1D}.onnx"
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(conv1d_models.build().SerializeToString())
        os.replace(tmp, target)
    return str(target)


def _label(name: str) -> str:
    return _conv1d_path() if name == CONV1D else name


def _busy_process():
    """One process that spins on a core until killed (the 'busy node' of the --busy run)."""
    return subprocess.Popen([sys.executable, "-c", "while 1: pass"])

COLUMNS = [
    ("model", "model"), ("batch", "batch"),
    ("median_ms", "offload ms", ".3f"), ("p90_ms", "p90", ".3f"),
    ("samples_per_s", "offload samples/s", ",.0f"),
    ("ort_median_ms", "onnxruntime ms", ".3f"), ("ort_p90_ms", "p90", ".3f"),
    ("ort_samples_per_s", "onnxruntime samples/s", ",.0f"),
    ("ratio", "offload/onnxruntime", ".2f"), ("max_abs_diff", "max abs diff", ".1e"),
    ("calls_per_block", "calls/block"), ("other_cores", "other load", ".2f"),
]
BUSY_COLUMNS = COLUMNS[:-1] + [
    ("busy_slowdown", "offload busy/quiet", ".2f"),
    ("ort_busy_slowdown", "onnxruntime busy/quiet", ".2f"),
    ("ratio_to_ort_busy", "offload busy / ort busy", ".2f"),
    ("other_cores", "other load", ".2f"),
]


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _geomean(values) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _markdown(doc: dict) -> str:
    m = doc["machine"]
    blas = m.get("blas") or {}
    lines = [
        f"# offload CPU benchmark, {m['date']}",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"- Machine: {m['platform']}; CPU {m['cpu']}, {m['cores']} cores "
        f"({m['usable_cores']} usable), {m['memory_gib']} GiB",
        f"- Python {m['python']}, NumPy {m['numpy']} (BLAS: {blas.get('name', '?')} "
        f"{blas.get('version', '')}), onnxruntime {m['onnxruntime']}, offload {m['offload']}",
        f"- Environment: " + ", ".join(f"{k}={v}" for k, v in m["env"].items()),
        f"- Load average (1, 5, 15 min) before: {doc['load_before']}, after: "
        f"{doc['load_after']}",
        f"- Git: {doc['git']['commit']}{' (dirty tree)' if doc['git']['dirty'] else ''}",
        f"- Method: {doc['repeats']} repeats, ~{doc['min_time_s']:g} s per contender and point; "
        "offload and onnxruntime alternate block by block in one run (0.1 s pause before each "
        "block so the other runtime's spinning threads go idle); latency = block time / calls "
        "in the block; median and p90 over the blocks; samples/s = batch / median. "
        f"onnxruntime: CPUExecutionProvider, intra_op_num_threads={doc['onnxruntime_threads']}; "
        f"offload: {doc.get('offload_threads')} threads (offload.get_num_threads()).",
        f"- Total time: {doc['wall_s']:.0f} s. CPU used by other processes during the whole "
        f"run: {doc['contention']['others']:.2f} cores on average, stolen by the hypervisor: "
        f"{doc['contention']['steal']:.2f} cores (column 'other load': the same, per point; "
        "well above 0 means that point's timings are suspect)" if doc.get("contention") else
        f"- Total time: {doc['wall_s']:.0f} s",
        "",
        "## Results",
        "",
        bench.format_suite(doc["rows"], COLUMNS),
        "",
    ]
    if doc.get("geomean_ratio"):
        lines += [f"Geometric mean of offload/onnxruntime: {doc['geomean_ratio']:.2f} "
                  "(> 1: offload slower).", ""]
    if doc.get("busy_rows"):
        lines += ["## With one busy process beside it", "",
                  f"Load average before the busy pass: {doc['busy_load_before']}, after: "
                  f"{doc['busy_load_after']}. 'busy/quiet': each runtime's median with the busy "
                  "process over its own quiet median above.", "",
                  bench.format_suite(doc["busy_rows"], BUSY_COLUMNS), ""]
    for prof in doc["profiles"]:
        lines += [f"## Profile: {prof['model']} b{prof['batch']} on cpu", ""]
        lines += [prof["error"] if prof.get("error") else bench.format_profile(prof["profile"],
                                                                                top_nodes=15), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats, ~0.3 s per point")
    parser.add_argument("--models", help=f"comma separated subset of {','.join(zoo.NAMES)}")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results",
                        help="folder for the .json and .md (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, help="override (at least 5)")
    parser.add_argument("--min-time", type=float, help="override, seconds per contender")
    parser.add_argument("--busy", action="store_true",
                        help="run the suite again with one busy process beside it")
    args = parser.parse_args(argv)

    models = list(MODELS)
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(models) - set(MODELS))
        if unknown:
            parser.error(f"unknown models {unknown}; choose from {MODELS}")
    repeats = max(5, args.repeats or (5 if args.quick else 7))
    min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 2.0)
    threads = os.cpu_count() or 1
    reason = bench.onnxruntime_missing_reason()
    if reason:
        print(f"warning: onnxruntime missing, offload only: {reason}", file=sys.stderr)

    def say(text):
        print(text, file=sys.stderr, flush=True)

    load_before = [round(v, 2) for v in os.getloadavg()]
    counters = bench.cpu_counters()
    t0 = time.perf_counter()
    for name in models:
        _label(name) if name == CONV1D else zoo.path(name)
    cases = [bench.Case(_label(n), b) for n, b in CASES if n in models]
    rows = bench.run_suite(cases, ["cpu"], repeats=repeats, min_time_s=min_time, warmup=2,
                           onnxruntime=reason is None, threads=threads, progress=say)
    for r in rows:
        r["model"] = r["model"].removesuffix(".onnx")
    busy_rows, busy_load = [], (None, None)
    if args.busy:
        say("busy pass: one process spinning beside the benchmark ...")
        spinner = _busy_process()
        try:
            time.sleep(1.0)
            before = [round(v, 2) for v in os.getloadavg()]
            busy_rows = bench.run_suite(cases, ["cpu"], repeats=repeats, min_time_s=min_time,
                                        warmup=2, onnxruntime=reason is None, threads=threads,
                                        progress=say)
            busy_load = (before, [round(v, 2) for v in os.getloadavg()])
        finally:
            spinner.kill()
            spinner.wait()
        for r, q in zip(busy_rows, rows):
            r["model"] = r["model"].removesuffix(".onnx")
            if r.get("median_ms") and q.get("median_ms"):
                r["busy_slowdown"] = r["median_ms"] / q["median_ms"]
            if r.get("ort_median_ms") and q.get("ort_median_ms"):
                r["ort_busy_slowdown"] = r["ort_median_ms"] / q["ort_median_ms"]
            if r.get("median_ms") and r.get("ort_median_ms"):
                r["ratio_to_ort_busy"] = r["median_ms"] / r["ort_median_ms"]

    profiles = []
    for name, b in PROFILED:
        if name not in models:
            continue
        say(f"profile {name} b{b} ...")
        try:
            if name == CONV1D:
                model, x = offload.load(_conv1d_path(), device="cpu"), conv1d_models.sample(b)
            else:
                model, x = offload.load(zoo.path(name), device="cpu"), zoo.sample_input(name, b)
            profiles.append(dict(model=name, batch=b, profile=bench.profile(
                model, x, runs=10 if args.quick else 30)))
        except offload.OffloadError as e:
            profiles.append(dict(model=name, batch=b, error=f"{type(e).__name__}: {e}"))
    wall = time.perf_counter() - t0

    now = datetime.datetime.now(datetime.timezone.utc)
    doc = dict(
        command=shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        machine=bench.machine_info(), git=_git(), repeats=repeats, min_time_s=min_time,
        onnxruntime_threads=threads, load_before=load_before,
        load_after=[round(v, 2) for v in os.getloadavg()], wall_s=wall,
        contention=bench.contention(counters, bench.cpu_counters()),
        ratios={f"{r['model']} b{r['batch']}": r.get("ratio") for r in rows},
        geomean_ratio=_geomean(r.get("ratio") for r in rows),
        rows=rows, profiles=profiles, offload_threads=offload.get_num_threads(),
        busy_rows=busy_rows, busy_load_before=busy_load[0], busy_load_after=busy_load[1],
        busy_ratios={f"{r['model']} b{r['batch']}": r.get("ratio_to_ort_busy")
                     for r in busy_rows})

    print(bench.format_suite(rows, COLUMNS))
    if busy_rows:
        print("\nwith one busy process beside it:")
        print(bench.format_suite(busy_rows, BUSY_COLUMNS))
    if doc["geomean_ratio"]:
        print(f"\ngeometric mean offload/onnxruntime: {doc['geomean_ratio']:.2f}")
    print()
    bench.write_results(args.out, "cpu", _jsonable(doc), _markdown(doc), now, indent=1)
    return 1 if any(r.get("error") for r in rows + busy_rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
