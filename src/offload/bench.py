"""Timing engine shared by ``offload bench``, ``offload demo`` and ``benchmarks/bench_cpu.py``.

Machines are noisy, so contenders are never timed one after the other: :func:`measure`
alternates them round-robin within one run (A one block, B one block, A, B, ...), each block
timing a loop of calls, and reports medians over the repeats.

    from offload import bench
    a = bench.offload_contender("jet.onnx", "cpu")
    b = bench.onnxruntime_contender("jet.onnx")          # None if onnxruntime is missing
    results = bench.measure([a, b], x, repeats=5, min_time_s=1.0)
    print(results["offload cpu:0"].median_s)
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Case", "Contender", "Measurement", "contention", "cpu_counters", "format_profile",
    "format_suite", "format_table", "machine_info", "make_input", "measure", "model_path",
    "offload_contender", "onnxruntime_contender", "onnxruntime_missing_reason", "profile",
    "results_base", "run_suite", "write_results",
]


# -- contenders ----------------------------------------------------------------------------------
@dataclass
class Contender:
    """A name plus ``fn(x)`` running one inference on a prepared input.

    ``x`` is one array, or a tuple of arrays for a model of several inputs. ``target`` is the
    object behind ``fn`` (an ``offload.Model`` or an ``onnxruntime.InferenceSession``).
    """

    name: str
    fn: Callable[[Any], Any]
    kind: str = ""        # "offload" or "onnxruntime"
    device: str = ""      # device spec, or "cpu (N threads)" for onnxruntime
    target: Any = field(default=None, repr=False)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def offload_contender(model_path, device_spec: str = "cpu", name: str | None = None,
                      precision=None) -> Contender:
    """``offload.load(model_path, device=device_spec, precision=precision)`` as a contender
    (raises OffloadError)."""
    import offload
    model = offload.load(model_path, device=device_spec, precision=precision)
    spec = model.device.spec

    def fn(x, _model=model):
        return _model(*_as_tuple(x))

    return Contender(name or f"offload {spec}", fn, "offload", spec, model)


_ORT_REASON: str | None = None


def _import_onnxruntime():
    global _ORT_REASON
    try:
        import onnxruntime
    except Exception as e:  # ImportError, or a broken install
        _ORT_REASON = f"onnxruntime is not importable ({type(e).__name__}: {e}); " \
                      "pip install 'offload[bench]'"
        return None
    _ORT_REASON = None
    return onnxruntime


def onnxruntime_missing_reason() -> str | None:
    """Why onnxruntime cannot be used here, or None when it can."""
    _import_onnxruntime()
    return _ORT_REASON


def onnxruntime_contender(model_path, threads: int | None = None,
                          name: str = "onnxruntime") -> Contender | None:
    """An onnxruntime CPUExecutionProvider session as a contender, or None if onnxruntime is
    missing (:func:`onnxruntime_missing_reason` says why).

    ``intra_op_num_threads`` is ``threads`` or ``os.cpu_count()``; the session's other options
    are onnxruntime's defaults (full graph optimization, spinning thread pool).
    """
    ort = _import_onnxruntime()
    if ort is None:
        return None
    threads = threads or os.cpu_count() or 1
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def fn(x, _run=session.run, _names=names):
        return _run(None, dict(zip(_names, _as_tuple(x))))

    return Contender(name, fn, "onnxruntime", f"cpu ({threads} threads)", session)


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Measurement:
    """Per-call latency of one contender: median and p90 over the timing blocks (one block per
    repeat, each block's latency = block time / calls in it), plus the per-call distribution."""

    name: str
    batch: int
    median_s: float
    p90_s: float
    throughput: float          # samples/s = batch / median_s
    blocks_s: list             # per-block latency per call, in the order timed
    calls_per_block: int
    call_median_s: float       # over every individual call of every block
    call_p90_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _batch_of(x) -> int:
    first = _as_tuple(x)[0]
    return int(first.shape[0]) if getattr(first, "ndim", 0) else 1


def measure(contenders: Sequence[Contender], x, repeats: int = 5, min_time_s: float = 1.0,
            warmup: int = 2, pause_s: float = 0.1) -> dict[str, Measurement]:
    """Time ``contenders`` on input ``x``, alternating them round-robin within one run.

    Each contender first runs ``warmup`` calls (they compile plans and fill caches; 0 when the
    caller has already called each contender on ``x``), then a short calibration that sizes its blocks to about ``min_time_s / repeats``
    (at least one call). Then, ``repeats`` times, every contender in turn runs one block. A block
    times each call back to back (one clock read per call) with the garbage collector off.

    ``pause_s`` (sleep before each block and each calibration) lets the previous contender's
    thread pools go idle first: onnxruntime's and OpenBLAS's worker threads busy-wait for a
    while after their last job and, on a machine with few cores, would otherwise steal the
    CPU from the next contender (measured on 2 cores: a 2 ms pause made both contenders up to
    ~2x slower than timed alone; 50 ms or more removed the effect). Returns {contender name:
    Measurement}.
    """
    if not contenders:
        return {}
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    repeats = max(1, int(repeats))
    block_budget = max(float(min_time_s), 0.0) / repeats
    batch = _batch_of(x)
    clock = time.perf_counter

    sizes = []
    for c in contenders:
        if pause_s:
            time.sleep(pause_s)
        for _ in range(max(0, int(warmup))):
            c.fn(x)
        # Calibrate: time calls until ~a tenth of a block (or 10 ms) has passed, 1 call minimum;
        # the median call sizes the blocks (a call slowed down by a neighbour must not shrink
        # every block of this contender).
        goal = min(max(block_budget / 10, 1e-3), 0.01)
        stamps = [clock()]
        while True:
            c.fn(x)
            stamps.append(clock())
            if stamps[-1] - stamps[0] >= goal or len(stamps) > 10_000:
                break
        per_call = float(np.median(np.diff(stamps)))
        sizes.append(max(1, min(1_000_000, round(block_budget / per_call))) if per_call > 0
                     else 1)

    blocks = [[] for _ in contenders]
    calls = [[] for _ in contenders]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    try:
        for _ in range(repeats):
            for k, c in enumerate(contenders):
                if pause_s:
                    time.sleep(pause_s)
                fn, n = c.fn, sizes[k]
                stamps = [0.0] * (n + 1)
                gc.disable()
                stamps[0] = clock()
                for i in range(1, n + 1):
                    fn(x)
                    stamps[i] = clock()
                if gc_was_enabled:
                    gc.enable()
                blocks[k].append((stamps[n] - stamps[0]) / n)
                calls[k].extend(np.diff(stamps).tolist())
    finally:
        if gc_was_enabled:
            gc.enable()

    out = {}
    for k, c in enumerate(contenders):
        med = statistics.median(blocks[k])
        out[c.name] = Measurement(
            name=c.name, batch=batch, median_s=med,
            p90_s=float(np.percentile(blocks[k], 90)),
            throughput=batch / med if med > 0 else math.inf,
            blocks_s=blocks[k], calls_per_block=sizes[k],
            call_median_s=float(np.median(calls[k])),
            call_p90_s=float(np.percentile(calls[k], 90)))
    return out


# -- profiling -----------------------------------------------------------------------------------
def results_base(out, name: str, when=None):
    """``out/<name>-<YYYYmmdd-HHMM>`` (UTC) for a benchmark's .md/.json, with -2, -3, ... added
    where a run of the same minute already wrote one (never overwritten)."""
    import datetime
    import pathlib
    when = when or datetime.datetime.now(datetime.timezone.utc)
    out = pathlib.Path(out)
    base = out / f"{name}-{when:%Y%m%d-%H%M}"
    k = 2
    while base.with_suffix(".json").exists() or base.with_suffix(".md").exists():
        base = out / f"{name}-{when:%Y%m%d-%H%M}-{k}"
        k += 1
    return base


def write_results(out, name: str, doc: dict, markdown: str, when=None, indent: int = 2):
    """A benchmark's record: ``doc`` as JSON and ``markdown`` under ``out`` (made if missing) at
    ``results_base(out, name, when)``, which is returned; says where on stdout."""
    import json
    import pathlib
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = results_base(out, name, when)
    base.with_suffix(".json").write_text(json.dumps(doc, indent=indent) + "\n")
    base.with_suffix(".md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    print(f"wrote {base}.md and .json")
    return base


def profile(model, x, runs: int = 20) -> dict:
    """Per-op time of ``model`` on ``x`` from ``model.run(x, profile=list)``, over ``runs`` runs.

    Returns {"runs", "wall_ms" (per run, whole call), "steps_ms" (per run, sum of the steps),
    "by_op": rows, "by_node": rows}; rows are dicts sorted by time: by_op has op, nodes (per
    run), total_ms (per run), share (% of steps_ms); by_node has node, op, total_ms, share.
    The wall time includes copies and per-step bookkeeping that the steps do not.
    """
    args = _as_tuple(x)
    model.run(*args)  # compile the plan for this shape outside the profile
    runs = max(1, int(runs))
    records: list = []
    t0 = time.perf_counter()
    for _ in range(runs):
        model.run(*args, profile=records)
    wall = (time.perf_counter() - t0) / runs
    by_node: dict[str, list] = {}
    by_op: dict[str, list] = {}
    for node, op, seconds in records:
        entry = by_node.setdefault(node, [op, 0.0])
        entry[1] += seconds
        agg = by_op.setdefault(op, [0, 0.0])
        agg[0] += 1
        agg[1] += seconds
    steps = sum(s for _, _, s in records) / runs
    share = (lambda s: 100.0 * s / runs / steps) if steps > 0 else (lambda s: 0.0)
    op_rows = [dict(op=op, nodes=count // runs, total_ms=1e3 * s / runs, share=share(s))
               for op, (count, s) in by_op.items()]
    node_rows = [dict(node=node, op=op, total_ms=1e3 * s / runs, share=share(s))
                 for node, (op, s) in by_node.items()]
    op_rows.sort(key=lambda r: -r["total_ms"])
    node_rows.sort(key=lambda r: -r["total_ms"])
    return dict(runs=runs, wall_ms=1e3 * wall, steps_ms=1e3 * steps, by_op=op_rows,
                by_node=node_rows)


def format_profile(prof: dict, top_nodes: int = 12) -> str:
    """The two tables of :func:`profile` (by op type, then the ``top_nodes`` slowest nodes)."""
    head = (f"{prof['runs']} runs: {prof['wall_ms']:.3f} ms per call, of which steps "
            f"{prof['steps_ms']:.3f} ms (the rest: copies in/out and per-step overhead)")
    ops = format_table(prof["by_op"], [("op", "op"), ("nodes", "nodes"),
                                       ("total_ms", "ms/call", ".3f"), ("share", "share %", ".1f")])
    nodes = prof["by_node"][:top_nodes]
    more = len(prof["by_node"]) - len(nodes)
    node_table = format_table(nodes, [("node", "node"), ("op", "op"),
                                      ("total_ms", "ms/call", ".3f"), ("share", "share %", ".1f")])
    tail = f"\n({more} more nodes)" if more > 0 else ""
    return f"{head}\n\nBy op type:\n\n{ops}\n\nSlowest nodes:\n\n{node_table}{tail}"


# -- tables --------------------------------------------------------------------------------------
def _cell(value, fmt) -> str:
    if value is None:
        return "-"
    if callable(fmt):
        return fmt(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if fmt:
            return format(value, fmt)
        return _auto(value)
    if fmt and isinstance(value, int) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _auto(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def rate(value: float) -> str:
    """A throughput for a table: '1,234,567', '912', '5.83', '0.0421' (never a bare '0')."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    if math.isinf(value) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_table(rows: Sequence[dict], columns: Sequence) -> str:
    """Markdown table of ``rows`` (dicts). Each column is a key, ``(key, header)`` or
    ``(key, header, format)``, the format a format spec or a function of the value; missing
    values show as '-'. Numbers are right-aligned."""
    cols = []
    for col in columns:
        if isinstance(col, str):
            col = (col, col)
        key, header, fmt = (tuple(col) + (None,))[:3]
        cols.append((key, header, fmt))
    cells = [[_cell(row.get(key), fmt) for key, _, fmt in cols] for row in rows]
    numeric = [bool(rows) and all(isinstance(row.get(key), (int, float)) or row.get(key) is None
                                  for row in rows) for key, _, _ in cols]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (_, h, _) in enumerate(cols)]
    widths = [max(w, 3) for w in widths]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line([h for _, h, _ in cols]), rule] + [line(r) for r in cells])


# -- machine -------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for text in f:
                key, _, value = text.partition(":")
                if key.strip() in ("model name", "Model", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_info() -> dict:
    info: dict = {}
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})
        blas = deps.get("blas", {})
        info = {k: blas[k] for k in ("name", "version", "openblas configuration") if k in blas}
    except Exception:  # older NumPy: no mode="dicts"
        pass
    try:
        import threadpoolctl  # optional: the runtime view (threads, core type)
        pools = threadpoolctl.threadpool_info()
        info["threadpools"] = [{k: p.get(k) for k in ("internal_api", "version",
                                                      "num_threads", "architecture")}
                               for p in pools]
    except Exception:
        pass
    return info


def machine_info() -> dict:
    """Where a benchmark ran, without the host name: platform, CPU, cores, NumPy and its BLAS,
    onnxruntime, the environment variables that steer threads, UTC date, Python."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    mem_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for text in f:
                if text.startswith("MemTotal:"):
                    mem_gib = round(int(text.split()[1]) / 2**20, 1)
                    break
    except (OSError, ValueError, IndexError):
        pass
    ort = None
    if "onnxruntime" in sys.modules or onnxruntime_missing_reason() is None:
        ort = getattr(sys.modules.get("onnxruntime"), "__version__", None)
    try:
        import offload
        offload_version = offload.__version__
    except Exception:
        offload_version = None
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS",
                                          "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas_info(),
        "onnxruntime": ort,
        "offload": offload_version,
        "env": env,
    }


# -- contention ----------------------------------------------------------------------------------
def cpu_counters() -> dict | None:
    """A snapshot for :func:`contention`: the machine's busy and stolen CPU seconds (Linux
    /proc/stat), this process's CPU seconds and the wall clock; None where unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        hz = os.sysconf("SC_CLK_TCK")
        v = [int(x) for x in fields[1:9]]
    except (OSError, ValueError, AttributeError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return dict(busy=(user + nice + system + irq + softirq) / hz, steal=steal / hz,
                own=time.process_time(), wall=time.perf_counter())


def contention(before: dict | None, after: dict | None) -> dict | None:
    """Between two :func:`cpu_counters` snapshots, the average number of cores busy with other
    processes (``others``) and stolen by the hypervisor (``steal``). On a quiet machine both stay
    near 0; well above 0, the timings of that interval are suspect."""
    if not before or not after or after["wall"] <= before["wall"]:
        return None
    wall = after["wall"] - before["wall"]
    others = (after["busy"] - before["busy"]) - (after["own"] - before["own"])
    return dict(others=max(0.0, others / wall), steal=(after["steal"] - before["steal"]) / wall)


# -- suites --------------------------------------------------------------------------------------
@dataclass
class Case:
    """One benchmark point: a model (zoo name or .onnx path) at one batch size."""

    model: str
    batch: int


def _is_zoo(model: str) -> bool:
    from . import zoo
    return model in zoo.NAMES and not os.path.exists(model)


def model_path(model: str):
    """The .onnx path of a zoo name (built once) or of a file."""
    if _is_zoo(model):
        from . import zoo
        return zoo.path(model)
    return model


def model_label(model: str) -> str:
    return model if _is_zoo(model) else os.path.basename(str(model))


def make_input(model: str, batch: int, inputs=None, seed: int = 0):
    """Input for ``model`` at ``batch``: ``zoo.sample_input`` for zoo names; for files, seeded
    standard normal float32 of each input's shape (``inputs``: the model's TensorInfo list),
    whose axes other than the first must be static. Returns an array, or a tuple for several
    inputs."""
    if _is_zoo(model):
        from . import zoo
        return zoo.sample_input(model, batch, seed=seed)
    from .errors import ShapeError
    rng = np.random.default_rng(seed)
    arrays = []
    for t in inputs:
        shape = list(t.shape)
        if not shape:
            raise ShapeError(f"{model}: input {t.name!r} is a scalar; cannot batch it")
        free = [d for d in shape[1:] if not isinstance(d, int)]
        if free:
            raise ShapeError(f"{model}: input {t.name!r} has shape {t.describe()}; benchmarking "
                             "needs every axis but the first (batch) to be static")
        if isinstance(shape[0], int) and shape[0] != batch:
            raise ShapeError(f"{model}: input {t.name!r} has a fixed batch of {shape[0]} "
                             f"({t.describe()}); cannot run batch {batch}")
        arrays.append(rng.standard_normal([batch] + shape[1:]).astype(np.float32))
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def _max_abs_diff(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for u, v in zip(a, b):
        u, v = np.asarray(u), np.asarray(v)
        if u.shape != v.shape:
            return math.inf
        if u.size:
            worst = max(worst, float(np.max(np.abs(u.astype(np.float64) - v))))
    return worst


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def run_suite(cases: Sequence[Case], devices: Sequence[str] = ("cpu",), *, repeats: int = 5,
              min_time_s: float = 1.0, warmup: int = 2, onnxruntime: bool = True,
              threads: int | None = None, check: bool = True, profile_runs: int = 0,
              progress: Callable[[str], None] | None = None, precision=None,
              pause_s: float = 0.1) -> list[dict]:
    """Measure every case on every device beside onnxruntime, alternating them in one run.

    Per case, the offload contenders (one per device) and onnxruntime are measured together by
    :func:`measure`. Returns one row per (case, device) with: model, batch, device, median_ms,
    p90_ms, samples_per_s, ort_median_ms, ort_p90_ms, ort_samples_per_s, ratio (offload median /
    onnxruntime median), max_abs_diff (offload vs onnxruntime output), calls_per_block, error,
    measurement (Measurement dicts), other_cores and steal_cores (CPU taken by other processes
    and by the hypervisor while timing, in cores; see :func:`contention`) and, with
    ``profile_runs``, profile (see :func:`profile`).
    A device that cannot load or run a model gives a row with ``error`` set; the others go on.
    ``precision`` is passed to ``offload.load``, ``pause_s`` to :func:`measure`. ``progress``
    gets one line per step ('[2/9] jet_mlp b64: loading on opencl:0', ': first call ...',
    ': timing ...', ': done in 1.2 s').
    """
    say = progress or (lambda text: None)
    models: dict[tuple, Any] = {}     # (model, device) -> Contender or error text
    sessions: dict[str, Any] = {}     # model -> Contender, None (missing) or error text
    rows: list[dict] = []
    for i, case in enumerate(cases, 1):
        label = model_label(case.model)
        path = model_path(case.model)
        pairs: list[tuple[Contender, dict]] = []  # offload contender, its row
        case_rows: list[dict] = []
        head = f"[{i}/{len(cases)}] {label} b{case.batch}"
        for spec in devices:
            key = (case.model, spec)
            if key not in models:
                say(f"{head}: loading on {spec}")
                try:
                    models[key] = offload_contender(path, spec, precision=precision)
                except Exception as e:
                    models[key] = _one_line(e)
            got = models[key]
            row = dict(model=label, batch=case.batch, device=getattr(got, "device", spec),
                       error=None)
            case_rows.append(row)
            if isinstance(got, str):
                row["error"] = got
            else:
                pairs.append((got, row))
        ort = None
        if onnxruntime:
            if case.model not in sessions:
                say(f"{head}: loading onnxruntime")
                try:
                    sessions[case.model] = onnxruntime_contender(path, threads)
                except Exception as e:
                    sessions[case.model] = _one_line(e)
            ort = sessions[case.model]
            if isinstance(ort, str):
                for row in case_rows:
                    row["ort_error"] = ort
                ort = None
        if not pairs:
            say(f"{head}: nothing to run")
            rows.extend(case_rows)
            continue
        try:
            x = make_input(case.model, case.batch, pairs[0][0].target.inputs)
        except Exception as e:
            for row in case_rows:
                row["error"] = row["error"] or _one_line(e)
            rows.extend(case_rows)
            continue
        # One checked call per contender: outputs compared, and failures dropped before timing.
        say(f"{head}: first call on each (checks outputs; builds plans and kernels)")
        expected = None
        if ort is not None:
            try:
                expected = ort.fn(x)
            except Exception as e:
                for row in case_rows:
                    row["ort_error"] = _one_line(e)
                ort = None
        runnable = []
        for c, row in pairs:
            try:
                got = c.fn(x)
            except Exception as e:
                row["error"] = _one_line(e)
                continue
            if check and expected is not None:
                row["max_abs_diff"] = _max_abs_diff(got, expected)
            runnable.append((c, row))
        timed = [c for c, _ in runnable] + ([ort] if ort is not None else [])
        t0 = time.perf_counter()
        if runnable:
            say(f"{head}: timing {', '.join(c.name for c in timed)}")
        counters = cpu_counters()
        # the checked call above was each contender's first warmup call
        results = measure(timed, x, repeats=repeats, min_time_s=min_time_s,
                          warmup=max(0, warmup - 1), pause_s=pause_s) if runnable else {}
        load = contention(counters, cpu_counters()) if runnable else None
        ref = results.get(ort.name) if ort is not None else None
        for c, row in runnable:
            m = results[c.name]
            row.update(median_ms=1e3 * m.median_s, p90_ms=1e3 * m.p90_s,
                       samples_per_s=m.throughput, calls_per_block=m.calls_per_block)
            row["measurement"] = m.to_dict()
            if load:
                row["other_cores"], row["steal_cores"] = load["others"], load["steal"]
            if ref is not None:
                row.update(ort_median_ms=1e3 * ref.median_s, ort_p90_ms=1e3 * ref.p90_s,
                           ort_samples_per_s=ref.throughput,
                           ratio=m.median_s / ref.median_s if ref.median_s > 0 else None)
                row["ort_measurement"] = ref.to_dict()
            if profile_runs:
                row["profile"] = profile(c.target, x, runs=profile_runs)
        if runnable:
            say(f"{head}: done in {time.perf_counter() - t0:.1f} s")
        rows.extend(case_rows)
    return rows


SUITE_COLUMNS = [
    ("model", "model"), ("batch", "batch"), ("device", "device"),
    ("median_ms", "offload ms", ".3f"), ("p90_ms", "p90 ms", ".3f"),
    ("samples_per_s", "samples/s", rate), ("ort_median_ms", "onnxruntime ms", ".3f"),
    ("ratio", "offload/ort", ".2f"), ("max_abs_diff", "max abs diff", ".1e"),
]


def format_suite(rows: Sequence[dict], columns=SUITE_COLUMNS) -> str:
    """The table of :func:`run_suite` rows, then one line per error."""
    text = format_table(rows, columns)
    notes = []
    for row in rows:
        where = f"{row['model']} b{row['batch']} {row['device']}"
        if row.get("error"):
            notes.append(f"- {where}: {row['error']}")
        if row.get("ort_error"):
            notes.append(f"- {where}: onnxruntime: {row['ort_error']}")
    notes = list(dict.fromkeys(notes))
    return text + ("\n\n" + "\n".join(notes) if notes else "")


# -- concurrent clients --------------------------------------------------------------------------

CLIENT_COLUMNS = [
    ("clients", "clients"), ("mode", "mode"),
    ("samples_per_s", "samples/s", rate), ("vs_best", "of 1 caller, big batches", ".0%"),
    ("p50_ms", "p50 ms", ".3f"), ("p99_ms", "p99 ms", ".3f"),
    ("device_runs", "device runs"), ("requests", "requests"),
]


def clients_sweep(model: str, device: str = "cpu", clients: Sequence[int] = (1, 2, 4, 8),
                  rows: int = 1, duration_s: float = 1.0, max_batch: int = 64,
                  max_delay_us: float = 500.0, progress=None) -> dict:
    """Throughput and per-request latency against the number of concurrent callers.

    Each of ``clients`` threads sends requests of ``rows`` rows back to back for ``duration_s``,
    once through a model without batching and once with ``Batching(max_batch, max_delay_us)``
    (alternating the two modes at every client count). The reference is one caller sending
    ``max_batch``-row batches: what the device gives when it is fed well. Returns
    {"reference_samples_per_s", "rows": [...]}.
    """
    import threading

    import offload
    path = model_path(model)
    inputs = None if _is_zoo(model) else offload.import_onnx(path).inputs
    x = make_input(model, rows, inputs)
    big = make_input(model, max_batch, inputs)
    plain = offload.load(path, device=device)
    batched = offload.load(path, device=device,
                           batching=offload.Batching(max_batch=max_batch,
                                                     max_delay_us=max_delay_us))
    say = progress or (lambda text: None)

    def call(m, data):
        return m(*data) if isinstance(data, tuple) else m(data)

    say(f"reference: 1 caller, batches of {max_batch} ...")
    call(plain, big)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration_s:
        call(plain, big)
        count += 1
    reference = count * max_batch / (time.perf_counter() - start)

    out = []
    for c in clients:
        for mode, m in (("unbatched", plain), ("batched", batched)):
            say(f"{c} clients, {mode} ...")
            call(m, x)
            m.reset_stats()
            latencies = [[] for _ in range(c)]
            go = threading.Barrier(c + 1)

            def client(k):
                try:
                    go.wait()
                except threading.BrokenBarrierError:  # not every client could start
                    return
                # the window starts at the release (thread start-up on a loaded machine can
                # take longer than a short window), and each client sends at least one request
                mine, stop = latencies[k], time.perf_counter() + duration_s
                while True:
                    t0 = time.perf_counter()
                    call(m, x)
                    mine.append(time.perf_counter() - t0)
                    if t0 >= stop:
                        return
            threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
            started = []
            try:
                for t in threads:
                    t.start()
                    started.append(t)
            except RuntimeError as e:  # "can't start new thread": release those waiting
                go.abort()
                for t in started:
                    t.join()
                plain.close()
                batched.close()
                raise offload.OffloadError(f"could not start {c} client threads (started "
                                   f"{len(started)}): {e}") from None
            go.wait()
            began = time.perf_counter()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - began
            every = np.array([v for mine in latencies for v in mine])
            stats = m.stats
            out.append(dict(clients=c, mode=mode, requests=len(every),
                            samples_per_s=len(every) * rows / elapsed,
                            vs_best=len(every) * rows / elapsed / reference,
                            p50_ms=float(np.percentile(every, 50)) * 1e3 if len(every) else None,
                            p99_ms=float(np.percentile(every, 99)) * 1e3 if len(every) else None,
                            device_runs=stats["device_runs"]))
    plain.close()
    batched.close()
    return {"reference_samples_per_s": reference, "rows": out, "model": model_label(model),
            "device": device, "rows_per_request": rows, "duration_s": duration_s,
            "max_batch": max_batch, "max_delay_us": max_delay_us}


def plot_clients(result: dict, path) -> str | None:
    """Throughput and p99 latency against clients, as a PNG; returns a reason if it cannot
    (matplotlib is an optional extra: pip install "offload[bench]")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'offload[bench]')"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("unbatched", "batched"):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        xs = [r["clients"] for r in rows]
        left.plot(xs, [r["samples_per_s"] for r in rows], "o-", label=mode)
        right.plot(xs, [r["p99_ms"] for r in rows], "o-", label=mode)
    left.axhline(result["reference_samples_per_s"], ls="--", c="gray",
                 label=f"1 caller, batches of {result['max_batch']}")
    left.axhline(0.8 * result["reference_samples_per_s"], ls=":", c="gray", label="80 %")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="samples/s",
             title=f"{result['model']} on {result['device']}: throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)",
              title="per-request latency p99")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
