#!/usr/bin/env python
"""GPU benchmark: offload ``cuda:0`` beside PyTorch eager on the same weights, same card, one run.

    python benchmarks/bench_gpu.py                      # writes under $OUT or benchmarks/results
    python benchmarks/bench_gpu.py --cases jet_mlp:1,resnet50:256:float16 --budget-s 60

PyTorch runs the zoo ONNX file itself: ``OnnxTorch`` below executes the file's nodes with
``torch.nn.functional`` ops (Conv, BatchNormalization, Relu, MaxPool, Add, GlobalAveragePool,
Flatten, Gemm, MatMul, Softmax) on its initializers moved to the GPU, i.e. the model as PyTorch
eager would run it (BatchNorm unfused, cuDNN convs), with exactly offload's weights (no
torchvision download), in the point's precision on both sides: float32 (cuDNN TF32 turned off),
float16 (torch weights and input in half; offload ``precision="float16"``). torch.compile is
tried (offline inductor) on COMPILE_CASES while the budget allows; its failure is recorded.

Per point: latency from CUDA events (device only: input already on the GPU; for offload the
plan's steps, i.e. its CUDA graph, launched on the device's stream) and host end to end (NumPy in,
NumPy out; and offload through ``Model.bind`` on an ``offload.empty`` input), median over repeats; throughput = batch / end-to-end median; max |offload - torch|.
Plus a host-to-device bandwidth probe, pageable vs page-locked. Every point fails soft: its error
is recorded and the run goes on. Writes gpu-<UTC stamp>.json and .md under the output folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
# (model, batch, precision): the issue's points; float16 on both sides for the fp16 rows
# (model, batch, precision), most informative first (a short slot may end after any point):
# "blas:" points time the two cuBLAS paths against each other (defect 1 of issue 14)
CASES = [("blas:jet_mlp", 1, "float32"), ("jet_mlp", 1, "float32"),
         ("resnet50", 32, "float16"), ("resnet50", 1, "float32"), ("blas:resnet50", 8, "float32"),
         ("jet_mlp", 16000, "float32"), ("hcal_mlp", 16000, "float32"),
         ("resnet50", 256, "float16"), ("resnet50", 32, "float32"), ("resnet50", 256, "float32"),
         ("resnet50", 1, "float16")]
# torch.compile (inductor, offline) is tried on these points when the budget allows
COMPILE_CASES = {("jet_mlp", 1, "float32"), ("resnet50", 32, "float16")}
TORCH_DTYPES = {"float32": "float32", "tf32": "float32", "float16": "float16",
                "bfloat16": "bfloat16"}


# ------------------------------------------------------------------------- PyTorch side

def onnx_torch(path, device, dtype=None):
    """A callable running the ONNX file at ``path`` with torch ops on ``device`` (float weights
    in ``dtype`` when given, e.g. torch.float16)."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    def tensor(array):
        t = torch.from_numpy(array.copy()).to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    weights = {t.name: tensor(numpy_helper.to_array(t)) for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant":
            weights[node.output[0]] = tensor(numpy_helper.to_array(node.attribute[0].t))
    nodes = [n for n in g.node if n.op_type != "Constant"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    in_name, out_name = g.input[0].name, g.output[0].name

    def pads2(a):
        p = list(a.get("pads", [0, 0, 0, 0]))
        if p[0] != p[2] or p[1] != p[3]:
            raise NotImplementedError(f"asymmetric pads {p}")
        return (p[0], p[1])

    def run(x):
        env = dict(weights)
        env[in_name] = x
        for n, a in zip(nodes, attrs):
            i = [env[name] if name else None for name in n.input]
            op = n.op_type
            if op == "Conv":
                y = F.conv2d(i[0], i[1], i[2] if len(i) > 2 else None,
                             tuple(a.get("strides", (1, 1))), pads2(a),
                             tuple(a.get("dilations", (1, 1))), a.get("group", 1))
            elif op == "BatchNormalization":
                y = F.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0,
                                 a.get("epsilon", 1e-5))
            elif op == "Relu":
                y = F.relu(i[0])
            elif op == "MaxPool":
                y = F.max_pool2d(i[0], tuple(a["kernel_shape"]), tuple(a.get("strides", (1, 1))),
                                 pads2(a))
            elif op == "AveragePool":
                y = F.avg_pool2d(i[0], tuple(a["kernel_shape"]), tuple(a.get("strides", (1, 1))),
                                 pads2(a), count_include_pad=bool(a.get("count_include_pad", 0)))
            elif op == "GlobalAveragePool":
                y = i[0].mean(dim=(2, 3), keepdim=True)
            elif op == "Flatten":
                y = torch.flatten(i[0], a.get("axis", 1))
            elif op == "Gemm":
                b = i[1].t() if a.get("transB", 0) else i[1]
                aa = i[0].t() if a.get("transA", 0) else i[0]
                y = torch.addmm(i[2], aa, b, beta=a.get("beta", 1.0), alpha=a.get("alpha", 1.0)) \
                    if len(i) > 2 else a.get("alpha", 1.0) * (aa @ b)
            elif op == "MatMul":
                y = i[0] @ i[1]
            elif op == "Add":
                y = i[0] + i[1]
            elif op == "Softmax":
                y = torch.softmax(i[0], dim=a.get("axis", -1))
            else:
                raise NotImplementedError(f"OnnxTorch: op {op}")
            env[n.output[0]] = y
        return env[out_name]
    return run


# ------------------------------------------------------------------------------- timing

def _median_ms(fn, sync, min_time_s, max_iters=1000, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time_s and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def _cupy(spec):
    """The device's CuPy (the real one on cuda:N, the emulation on cuda-emu:0)."""
    import offload
    return offload.device(spec)._cp


def _event_ms(run, stream_record, min_time_s, max_iters=1000, cp=None):
    """Median of CUDA-event-timed ``run`` (``stream_record(event)`` records on the right stream)."""
    cp = cp or _cupy("cuda:0")
    for _ in range(3):
        run()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time_s and len(times) < max_iters):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        stream_record(a)
        run()
        stream_record(b)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def bench_case(name, batch, precision, min_time_s, log, try_compile=False, spec="cuda:0"):
    import offload
    from offload import zoo

    cp = _cupy(spec)
    path = zoo.path(name)
    x = zoo.sample_input(name, batch)
    row = {"model": name, "batch": batch, "precision": precision, "device": spec,
           "blas": os.environ.get("OFFLOAD_CUDA_BLAS", "direct")}

    # offload: NumPy in, NumPy out; and through fixed offload.empty buffers (Model.bind)
    model = offload.load(path, device=spec, precision=precision)
    y_off = model(x)
    plan = model.plan(x.shape)
    dev = plan.device  # the model's own stream (CUDADevice.session)
    row["offload_graph"] = bool(getattr(plan._run_steps[0], "graph", None)) if plan._run_steps \
        else False
    row["offload_e2e_ms"], row["offload_calls"] = _median_ms(lambda: model(x), lambda: None,
                                                             min_time_s)
    xe = offload.empty(x.shape)
    xe[...] = x
    bound = model.bind(xe)
    row["offload_bound_e2e_ms"], _ = _median_ms(bound, lambda: None, min_time_s)

    def off_run():
        for r in plan._run_steps:
            r()
    row["offload_gpu_ms"] = _event_ms(off_run, lambda e: e.record(dev.stream), min_time_s,
                                      cp=cp)
    log(f"  offload: e2e {row['offload_e2e_ms']:.3f} ms (bound {row['offload_bound_e2e_ms']:.3f})"
        f", gpu {row['offload_gpu_ms']:.3f} ms, graph={row['offload_graph']}")
    row["offload_samples_per_s"] = batch / (row["offload_e2e_ms"] / 1e3)
    try:
        import torch
        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    if not has_torch:
        row["torch"] = "skipped: no PyTorch with CUDA here"
        log("  torch: skipped (no PyTorch with CUDA)")
        return row
    import cupy as cp  # torch's side needs the real CuPy
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"

    # torch eager on the same weights, in the same precision
    dtype = getattr(torch, TORCH_DTYPES[precision])
    fwd = onnx_torch(path, "cuda", dtype)
    with torch.inference_mode():
        xg = torch.from_numpy(x).cuda().to(dtype)
        y_t = fwd(xg).float().cpu().numpy()
        row["max_abs_diff"] = float(np.max(np.abs(y_t.reshape(y_off.shape) - y_off)))
        row["torch_e2e_ms"], row["torch_calls"] = _median_ms(
            lambda: fwd(torch.from_numpy(x).cuda().to(dtype)).float().cpu().numpy(),
            lambda: None, min_time_s)
        ts = torch.cuda.current_stream()
        ext = cp.cuda.ExternalStream(ts.cuda_stream)
        row["torch_gpu_ms"] = _event_ms(lambda: fwd(xg), lambda e: e.record(ext), min_time_s)
        log(f"  torch:   e2e {row['torch_e2e_ms']:.3f} ms, gpu {row['torch_gpu_ms']:.3f} ms, "
            f"max|diff| {row['max_abs_diff']:.2e}")
        if try_compile:
            try:
                t0 = time.perf_counter()
                compiled = torch.compile(fwd)
                compiled(xg)
                torch.cuda.synchronize()
                row["torch_compile_s"] = time.perf_counter() - t0
                row["torch_compiled_gpu_ms"] = _event_ms(lambda: compiled(xg),
                                                         lambda e: e.record(ext), min_time_s)
                log(f"  torch.compile: gpu {row['torch_compiled_gpu_ms']:.3f} ms "
                    f"(compiled in {row['torch_compile_s']:.1f} s)")
            except Exception as e:  # noqa: BLE001 - offline inductor may lack a compiler
                row["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"  torch.compile failed: {row['torch_compile_error']}")
    row["torch_samples_per_s"] = batch / (row["torch_e2e_ms"] / 1e3)
    row["e2e_ratio_offload_over_torch"] = row["offload_e2e_ms"] / row["torch_e2e_ms"]
    row["gpu_ratio_offload_over_torch"] = row["offload_gpu_ms"] / row["torch_gpu_ms"]
    model = plan = bound = None  # free the device memory before the next point
    torch.cuda.empty_cache()
    return row


def bench_blas_paths(name, batch, precision, min_time_s, log, spec="cuda:0", blocks=5):
    """The two cuBLAS paths (cuda.BLAS_PATHS: direct libcublas in one CUDA graph, CuPy's
    wrappers as plain launches) on one model, alternated block by block in this run: medians
    of each path's per-call times (NumPy in, NumPy out) and their ratio."""
    import offload
    from offload import zoo
    x = zoo.sample_input(name, batch)
    models, graphs = {}, {}
    for blas in ("direct", "cupy"):
        os.environ["OFFLOAD_CUDA_BLAS"] = blas
        models[blas] = offload.load(zoo.path(name), device=spec, precision=precision)
        models[blas](x)
        plan = models[blas].plan(x.shape)
        graphs[blas] = bool(plan._run_steps and getattr(plan._run_steps[0], "graph", None))
    os.environ.pop("OFFLOAD_CUDA_BLAS", None)
    times = {"direct": [], "cupy": []}
    for _ in range(blocks):
        for blas, model in models.items():
            ms, _ = _median_ms(lambda: model(x), lambda: None, min_time_s / (2 * blocks),
                               warmup=1)
            times[blas].append(ms)
    row = {"case": "blas_paths", "model": name, "batch": batch, "precision": precision,
           "device": spec, "blocks": blocks,
           "direct_ms": statistics.median(times["direct"]),
           "cupy_ms": statistics.median(times["cupy"]),
           "direct_graph": graphs["direct"], "cupy_graph": graphs["cupy"],
           "block_medians_ms": times}
    row["direct_over_cupy"] = row["direct_ms"] / row["cupy_ms"]
    log(f"  blas paths: direct {row['direct_ms']:.3f} ms (graph={graphs['direct']}), cupy "
        f"{row['cupy_ms']:.3f} ms (graph={graphs['cupy']}), ratio {row['direct_over_cupy']:.2f}")
    return row


def bandwidth_probe(nbytes=256 << 20, spec="cuda:0"):
    """Host-to-device GB/s: pageable NumPy source vs page-locked staging (cupy)."""
    cp = _cupy(spec)
    host = np.ones(nbytes // 4, np.float32)
    dev = cp.empty(host.shape, np.float32)
    pinned_mem = cp.cuda.alloc_pinned_memory(nbytes)
    pinned = np.frombuffer(pinned_mem, np.float32, host.size)
    pinned[:] = host
    stream = cp.cuda.Stream(non_blocking=True)
    out = {}
    for label, src in (("pageable", host), ("page_locked", pinned)):
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            dev.data.copy_from_host_async(src.ctypes.data, nbytes, stream)
            stream.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"h2d_{label}_GBps"] = nbytes / statistics.median(times[1:]) / 1e9
    out["bytes"] = nbytes
    return out


def _md(result):
    lines = [f"# offload cuda vs PyTorch eager — {result['date']}", "",
             f"Device: {result.get('device', '?')}; torch {result.get('torch', '?')}; "
             f"cupy {result.get('cupy', '?')}; command `{result['command']}`", "",
             "| model | batch | precision | offload e2e ms | bound e2e ms | offload GPU ms | "
             "torch e2e ms | torch GPU ms | torch.compile GPU ms | offload samples/s | "
             "torch samples/s | offload/torch e2e | offload/torch GPU | max abs diff | graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    blas = [r for r in result["cases"] if r.get("case") == "blas_paths"]
    for r in result["cases"]:
        if r.get("case") == "blas_paths":
            continue
        if "error" not in r and "torch_e2e_ms" not in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | "
                         f"{r['offload_e2e_ms']:.3f} | {r['offload_bound_e2e_ms']:.3f} | "
                         f"{r['offload_gpu_ms']:.3f} | {r.get('torch', '')} |||| "
                         f"{r['offload_samples_per_s']:,.0f} ||||| {r['offload_graph']} |")
            continue
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r.get('precision', '')} | error: "
                         f"{r['error'].splitlines()[-1][:120]} ||||||||||||")
            continue
        compiled = r.get("torch_compiled_gpu_ms")
        compiled = f"{compiled:.3f}" if compiled is not None else \
            ("failed" if "torch_compile_error" in r else "")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['offload_e2e_ms']:.3f} | "
            f"{r['offload_bound_e2e_ms']:.3f} | {r['offload_gpu_ms']:.3f} | "
            f"{r['torch_e2e_ms']:.3f} | {r['torch_gpu_ms']:.3f} | {compiled} | "
            f"{r['offload_samples_per_s']:,.0f} | {r['torch_samples_per_s']:,.0f} | "
            f"{r['e2e_ratio_offload_over_torch']:.2f} | {r['gpu_ratio_offload_over_torch']:.2f} | "
            f"{r['max_abs_diff']:.1e} | {r['offload_graph']} |")
    if blas:
        lines += ["", "cuBLAS paths (alternated blocks, median ms per call, NumPy in and out):",
                  "", "| model | batch | precision | direct (graph) ms | cupy (plain launches) ms "
                  "| direct/cupy |", "|---|---|---|---|---|---|"]
        for r in blas:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | error |||")
                continue
            lines.append(f"| {r['model']} | {r['batch']} | {r['precision']} | "
                         f"{r['direct_ms']:.3f} ({r['direct_graph']}) | {r['cupy_ms']:.3f} "
                         f"({r['cupy_graph']}) | {r['direct_over_cupy']:.2f} |")
    bw = result.get("bandwidth", {})
    if bw:
        lines += ["", f"Host to device ({bw.get('bytes', 0) >> 20} MiB): pageable "
                  f"{bw.get('h2d_pageable_GBps', float('nan')):.1f} GB/s, page-locked "
                  f"{bw.get('h2d_page_locked_GBps', float('nan')):.1f} GB/s"]
    if result.get("errors"):
        lines += ["", "Errors:"] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def _write(out, stamp, result):
    """The JSON and Markdown so far (rewritten after every point: a run cut short keeps them)."""
    tmp = out / f".gpu-{stamp}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out / f"gpu-{stamp}.json")
    (out / f"gpu-{stamp}.md").write_text(_md(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--device", default="cuda:0", help="cuda:0, or cuda-emu:0 for a dry run")
    ap.add_argument("--cases", default="", help="e.g. jet_mlp:1,resnet50:32,blas:jet_mlp:1")
    ap.add_argument("--min-time-s", type=float, default=0.5)
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="skip the remaining points once this much time has passed")
    ap.add_argument("--compile-budget-s", type=float, default=120.0,
                    help="try torch.compile on COMPILE_CASES only while this much budget is left")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    logf = open(out / f"gpu-{stamp}.log", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    def parse(c):
        parts = c.split(":")
        if parts[0] == "blas":
            return "blas:" + parts[1], int(parts[2]), (parts + ["float32"])[3]
        return parts[0], int(parts[1]), (parts + ["float32"])[2]
    cases = CASES if not args.cases else [parse(c) for c in args.cases.split(",")]
    spec = args.device
    result = {"date": stamp, "command": " ".join([sys.executable, *sys.argv]),
              "python": platform.python_version(), "machine": platform.node(),
              "device_spec": spec, "cases": [], "errors": []}
    t_start = time.perf_counter()
    try:
        import offload
        result["device"] = str(next(i for i in offload.devices() if i.spec == spec))
        result["cupy"] = offload.device(spec)._cp.__version__
        try:
            import torch
            result["torch"] = torch.__version__
        except ImportError:
            result["torch"] = "absent"
        log(f"device: {result['device']}")
    except Exception:  # noqa: BLE001 - recorded, the rest still runs where it can
        result["errors"].append("setup: " + traceback.format_exc().splitlines()[-1])
        log(traceback.format_exc())
    _write(out, stamp, result)
    try:
        result["bandwidth"] = bandwidth_probe(spec=spec)
        log(f"bandwidth: {result['bandwidth']}")
    except Exception:  # noqa: BLE001
        result["errors"].append("bandwidth: " + traceback.format_exc().splitlines()[-1])
        log(traceback.format_exc())
    for name, batch, precision in cases:
        spent = time.perf_counter() - t_start
        if spent > args.budget_s:
            result["cases"].append({"model": name, "batch": batch, "precision": precision,
                                    "error": "skipped: time budget spent"})
            continue
        log(f"{name} b{batch} {precision}")
        try_compile = (name, batch, precision) in COMPILE_CASES and \
            args.budget_s - spent > args.compile_budget_s
        try:
            if name.startswith("blas:"):
                row = bench_blas_paths(name[5:], batch, precision, args.min_time_s, log, spec)
            else:
                row = bench_case(name, batch, precision, args.min_time_s, log, try_compile,
                                 spec)
            result["cases"].append(row)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            log(tb)
            result["cases"].append({"model": name, "batch": batch, "precision": precision,
                                    "error": tb})
        result["seconds"] = time.perf_counter() - t_start
        _write(out, stamp, result)
    try:
        import offload
        result["graph_fallbacks"] = list(getattr(offload.device(spec), "graph_fallbacks", []))
    except Exception:  # noqa: BLE001
        pass
    result["seconds"] = time.perf_counter() - t_start
    _write(out, stamp, result)
    log(_md(result))
    return 0 if result["cases"] and all("error" not in r for r in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
