"""Model: a loaded graph bound to a device; NumPy in, NumPy out, any batch size."""

from __future__ import annotations

import asyncio
import math
import concurrent.futures
import numbers
import os
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Mapping

import numpy as np

from . import graph as G
from .batch_axis import batch_mixing_node
from .batching import Batcher, Batching
from .device import Device
from .errors import (ArgumentError, DeviceMemoryError, ModelFormatError, OffloadError,
                     ShapeError, UnsupportedOpError)
from .precision import FIXED, check as check_precision
from .plan import Plan

ACCEPTED_FLOATS = (np.float32, np.float64, np.float16)
FALLBACKS = ("error", "cpu")
HOST_DLPACK = (1, 3)  # kDLCPU, kDLCUDAHost (page-locked host memory)
DLPACK_NAMES = {2: "cuda", 4: "opencl", 7: "vulkan", 8: "metal", 10: "rocm", 13: "cuda-managed",
                14: "oneapi"}


def _dlpack_device(x):
    """``x.__dlpack_device__()`` as (type, id), or None for an object without one."""
    method = getattr(x, "__dlpack_device__", None)
    if method is None:
        return None
    try:
        kind, index = method()
        return int(kind), int(index)
    except Exception:
        return None

WINDOW = 2048  # requests kept for the latency percentiles


def _max_run_rows() -> int:
    """Rows of one device run at most (``OFFLOAD_MAX_RUN_ROWS``, default 65536): a larger call
    on a model that treats each sample on its own runs as several runs of a plan this size."""
    text = os.environ.get("OFFLOAD_MAX_RUN_ROWS", "")
    try:
        value = int(text) if text else 65536
    except ValueError:
        value = 0
    if value < 1:
        raise ArgumentError(f"OFFLOAD_MAX_RUN_ROWS: expected an int >= 1 (rows), got {text!r}")
    return value


class Stats:
    """Counters of one model. ``calls`` counts requests, ``device_runs`` runs on a device (with
    batching, one run serves many requests); copies and compute are summed over device runs;
    latency and queue-wait percentiles cover the last 2048 requests.

    ``per_device`` breaks the device runs down by device spec (a model on several devices, or
    with fallback="cpu"): runs, rows, copied bytes, copy and compute seconds, ``time_s``.

    Each plan adds its runs into its own list (``run_counters()``, laid out as RUN_FIELDS)
    without a lock, since a plan serves one call at a time; ``snapshot`` sums them."""

    FIELDS = ("calls", "device_runs", "copy_in_bytes", "copy_out_bytes", "copy_in_s",
              "compute_s", "copy_out_s", "queue_wait_s", "fallbacks")
    RUN_FIELDS = ("device_runs", "copy_in_bytes", "copy_out_bytes", "copy_in_s", "compute_s",
                  "copy_out_s", "calls")
    # per_device: {spec: these} (rows: the batch rows run there; time_s: copies + compute)
    DEVICE_FIELDS = ("device_runs", "rows", "copy_in_bytes", "copy_out_bytes", "copy_in_s",
                     "compute_s", "copy_out_s")

    def __init__(self):
        self._lock = threading.Lock()
        self._runs: list[list] = []
        self._owners: list[tuple] = []  # (device spec, rows per run) of each list in _runs
        self.reset()

    def reset(self):
        with self._lock:
            self._values = dict.fromkeys(self.FIELDS, 0)
            self.latency: deque = deque(maxlen=WINDOW)  # appended to by plans (thread-safe)
            self.wait: deque = deque(maxlen=WINDOW)
            self._fallback_reasons: dict[str, int] = {}
            for counters in self._runs:
                counters[:] = [0] * len(counters)

    def run_counters(self, device: str = "", rows: int = 0) -> list:
        """A new list of RUN_FIELDS counters for one plan (on ``device``, ``rows`` rows per run),
        included in every snapshot."""
        counters = [0] * len(self.RUN_FIELDS)
        with self._lock:
            self._runs.append(counters)
            self._owners.append((device, int(rows)))
        return counters

    def request(self, latency_s: float, wait_s: float = 0.0):
        """One request answered, ``latency_s`` after it arrived, ``wait_s`` of it queued."""
        with self._lock:
            self._values["calls"] += 1
            self._values["queue_wait_s"] += wait_s
            self.latency.append(latency_s)
            self.wait.append(wait_s)

    def requests(self, latencies_s: list, waits_s: list):
        """Requests answered together (a batch): their latencies and queue waits, one each."""
        with self._lock:
            self._values["calls"] += len(latencies_s)
            self._values["queue_wait_s"] += sum(waits_s)
            self.latency.extend(latencies_s)
            self.wait.extend(waits_s)

    def fallback(self, reason: str) -> bool:
        """Count a fallback; True the first time this reason is seen."""
        with self._lock:
            self._values["fallbacks"] += 1
            first = reason not in self._fallback_reasons
            self._fallback_reasons[reason] = self._fallback_reasons.get(reason, 0) + 1
            return first

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self._values)
            per_device: dict[str, dict] = {}
            for counters, (device, rows) in zip(self._runs, self._owners):
                counters = list(counters)
                for name, value in zip(self.RUN_FIELDS, counters):
                    out[name] += value
                mine = per_device.setdefault(device, dict.fromkeys(self.DEVICE_FIELDS, 0))
                for name, value in zip(self.RUN_FIELDS, counters):
                    if name in mine:
                        mine[name] += value
                mine["rows"] += counters[0] * rows
            for mine in per_device.values():
                mine["time_s"] = mine["copy_in_s"] + mine["compute_s"] + mine["copy_out_s"]
            out["per_device"] = per_device
            latency, wait = np.array(self.latency), np.array(self.wait)
            out["fallback_reasons"] = dict(self._fallback_reasons)
        for name, values in (("latency", latency), ("queue_wait", wait)):
            for q in (50, 99):
                out[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if len(values) else 0.0
        return out


class Binding:
    """A model's plan bound to fixed input and output arrays (see ``Model.bind``); call it to
    run. One call at a time: a call while another runs raises OffloadError."""

    def __init__(self, model: "Model", plan: Plan, inputs: list, outputs: list):
        self.model, self.plan = model, plan
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self._result = outputs[0] if len(outputs) == 1 else tuple(outputs)
        self._run = plan.bound(self.inputs, list(outputs))
        self._stats = model._stats
        self._busy = threading.Lock()

    def __call__(self):
        start = time.perf_counter()
        if self.model._closed:
            raise OffloadError(f"model {self.model.source or self.model.graph.name!r} is closed")
        if not self._busy.acquire(blocking=False):
            raise OffloadError("this binding is running in another thread; bind once per thread")
        try:
            self._run(self._stats, start)
        finally:
            self._busy.release()
        return self._result

    def __repr__(self) -> str:
        shapes = ", ".join(str(list(a.shape)) for a in self.inputs)
        return f"<offload.Binding {self.model.source or self.model.graph.name!r} ({shapes}) " \
               f"on {self.plan.device.spec}>"


PLAN_CACHE = 32  # input-shape sets that keep compiled plans, per device of a model
BUCKET_EXACT = 16  # batch sizes up to this get their own plan; larger ones share buckets


def bucket(rows: int) -> int:
    """The batch a call of ``rows`` samples runs at when its model computes each sample on its
    own: ``rows`` up to BUCKET_EXACT, else rounded up to 3 significant bits (18, 20, ..., 28,
    32, 36, ..., 1024): at most 12.5% padding, 8 plans per doubling of the batch."""
    if rows <= BUCKET_EXACT:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


class PlanCache:
    """The compiled plans of one device of a model, by input-shape set: at most ``size`` sets,
    the least recently used dropped first; each set keeps its idle plans (one per call that
    ran concurrently). Counts hits, misses, compiles and evictions (``Model.stats``)."""

    def __init__(self, size: int = PLAN_CACHE):
        self.size = size
        self._lock = threading.Lock()
        self._sets: OrderedDict[tuple, list[Plan]] = OrderedDict()
        self.hits = self.misses = self.compiles = self.evictions = 0

    def take(self, shapes: tuple) -> Plan | None:
        """An idle plan for ``shapes`` (taken out: give it back after the run), or None."""
        with self._lock:
            idle = self._sets.get(shapes)
            if idle:
                self._sets.move_to_end(shapes)
                self.hits += 1
                return idle.pop()
            self.misses += 1
            return None

    def give(self, plan: Plan) -> None:
        """Put ``plan`` back (or in, once compiled); evicts the least recently used sets."""
        key = plan.input_shapes
        with self._lock:
            idle = self._sets.get(key)
            if idle is None:
                self._sets[key] = [plan]
                while len(self._sets) > self.size:
                    self._sets.popitem(last=False)
                    self.evictions += 1
            else:
                idle.append(plan)
                self._sets.move_to_end(key)

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()

    def keys(self):
        with self._lock:
            return list(self._sets)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._sets)

    def __contains__(self, shapes) -> bool:
        return shapes in self._sets

    def __getitem__(self, shapes) -> list:
        return self._sets[shapes]

    def get(self, shapes, default=None):
        """The idle plans kept for ``shapes`` (a look, not a use: not counted)."""
        return self._sets.get(shapes, default)

    def values(self):
        with self._lock:
            return [list(v) for v in self._sets.values()]

    def counters(self) -> dict:
        return {"plan_cache_hits": self.hits, "plan_cache_misses": self.misses,
                "plan_compiles": self.compiles, "plan_cache_evictions": self.evictions,
                "plan_cache_sets": len(self._sets)}


class _DeviceContext:
    """One device of a model: its prepared weights, its pool of plans, its requests in flight."""

    def __init__(self, device: Device, precision: str = "float32", plan_cache: int = PLAN_CACHE):
        self.device = device
        self.precision = precision
        self.weights: dict = {}
        self.plans = PlanCache(plan_cache)
        self.in_flight = 0
        self.runs = 0  # device runs started here (not locked: a statistic, not a counter to trust)


class Model:
    """An ONNX model prepared for one device.

    ``model(x)`` runs it on NumPy arrays (several inputs in graph order, or a dict by name);
    several outputs come back as a tuple. Inputs must be floating point: float32 is used as is,
    float64 and float16 are converted to float32 (a counted copy). A plan is compiled per input
    shape on first use and reused; concurrent calls with the same shape each get their own plan
    (weights are shared).
    """

    def __init__(self, graph: G.Graph, device: Device | list[Device], source: str = "",
                 batching: Batching | None = None, fallback: str = "error",
                 precision: str = "float32", memory_limit: int | None = None,
                 plan_cache: int = PLAN_CACHE):
        if not isinstance(fallback, str) or fallback not in FALLBACKS:
            raise ArgumentError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if batching is not None and not isinstance(batching, Batching):
            raise ArgumentError(f"batching: expected offload.Batching(max_batch, max_delay_us) "
                                f"or None, got {type(batching).__name__} {batching!r}")
        self.graph = graph
        self.devices = list(device) if isinstance(device, (list, tuple)) else [device]
        if not self.devices:
            raise ArgumentError("device: a model needs at least one device, got an empty list")
        bad = [d for d in self.devices if not isinstance(d, Device)]
        if bad:
            raise ArgumentError(f"device: expected offload.Device objects, got {bad!r}")
        self.device = self.devices[0]
        self.source = source
        self.fallback = fallback
        if not isinstance(precision, str):
            raise ArgumentError(f"precision: expected a name such as 'float32' or "
                                f"'ap_fixed<16,6>', got {type(precision).__name__} {precision!r}")
        try:
            self.precision = check_precision(precision)
        except ValueError as e:
            raise ArgumentError(f"precision: {e}") from None
        self.max_run_rows = _max_run_rows()
        self._run_rows: dict[tuple, int] = {}  # sample shapes -> rows per run learned smaller
        for d in self.devices:
            if precision not in d.capabilities.precisions:
                raise UnsupportedOpError(
                    f"device {d.spec} does not run precision {precision!r} (it runs "
                    f"{sorted(d.capabilities.precisions)})", [(f"precision {precision}", "")])
        self.memory_limit = memory_limit  # checks.memory_limit(); None: the default
        self.plan_cache = plan_cache
        self._contexts = [_DeviceContext(d.session(), precision, plan_cache)
                          for d in self.devices]
        self._fallback_context: _DeviceContext | None = None
        self._dispatch_lock = threading.Lock()
        self._stats = Stats()
        self._closed = self._closing = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._mixing: dict[tuple, str | None] = {}
        self._bucketable: dict[tuple, bool] = {}  # sample shapes -> may run on a bucket's plan
        self.batching = batching
        self._batcher = None
        if batching is not None:
            samples = tuple(t.shape[1:] for t in graph.inputs)
            if all(isinstance(d, int) for s in samples for d in s):
                self._check_batchable(samples)
            self._batcher = Batcher(self._execute_batch, batching, self._stats.requests,
                                    name=f"offload-batcher-{graph.name}",
                                    workers=len(self.devices))
        # per input, for the fast check of each call: (dtype, rank, the shape after the first
        # axis where that is fixed and the first is not, else None, [(axis, size) fixed])
        self._input_checks = [
            (np.dtype(t.dtype), len(t.shape),
             tuple(t.shape[1:]) if len(t.shape) >= 1 and not isinstance(t.shape[0], int) and
             all(isinstance(d, int) for d in t.shape[1:]) else None,
             [(i, d) for i, d in enumerate(t.shape) if isinstance(d, int)])
            for t in graph.inputs]

    @property
    def _plans(self):
        return self._contexts[0].plans

    @property
    def _weights(self):
        return self._contexts[0].weights

    # -- introspection -------------------------------------------------------------------------
    @property
    def inputs(self) -> list[G.TensorInfo]:
        return list(self.graph.inputs)

    @property
    def outputs(self) -> list[str]:
        return list(self.graph.outputs)

    @property
    def stats(self) -> dict:
        """calls (requests), device_runs, copy_in_bytes, copy_out_bytes, copy_in_s, compute_s,
        copy_out_s, queue_wait_s, latency_p50_s, latency_p99_s, queue_wait_p50_s,
        queue_wait_p99_s, fallbacks, fallback_reasons; and the plan caches' plan_cache_hits,
        plan_cache_misses, plan_compiles, plan_cache_evictions, plan_cache_sets (summed over
        the model's devices)."""
        out = self._stats.snapshot()
        contexts = self._contexts + ([self._fallback_context] if self._fallback_context else [])
        for ctx in contexts:
            for k, v in ctx.plans.counters().items():
                out[k] = out.get(k, 0) + v
        return out

    def reset_stats(self) -> None:
        self._stats.reset()

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}: {t.describe()}" for t in self.graph.inputs)
        on = ", ".join(d.spec for d in self.devices)
        return f"<offload.Model {self.source or self.graph.name!r} on {on} ({ins})>"

    # -- running -------------------------------------------------------------------------------
    def __call__(self, *inputs, out=None, **named):
        if self._batcher is not None and out is None:
            arrays = self._prepare(inputs, named)
            if self._closing:
                raise OffloadError(f"model {self.source or self.graph.name!r} is closed")
            return self._batcher.call(arrays)
        return self._run(inputs, named, out=out)

    def run(self, *inputs, out=None, profile=None, **named):
        """As ``__call__`` (never batched); ``profile`` (a list) receives (node, op, seconds)
        per step."""
        return self._run(inputs, named, out=out, profile=profile)

    def submit(self, *inputs, **named) -> concurrent.futures.Future:
        """Start the inference and return at once with a concurrent.futures.Future of its result.
        Inputs are checked now (bad input raises here); the caller must not modify them until
        the future is done."""
        arrays = self._prepare(inputs, named)
        if self._closing:
            raise OffloadError(f"model {self.source or self.graph.name!r} is closed")
        if self._batcher is not None:
            return self._batcher.submit(arrays)
        if self._executor is None:
            with self._dispatch_lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=2 * len(self.devices), thread_name_prefix="offload-model")
        try:
            return self._executor.submit(self._run_timed, arrays, time.perf_counter())
        except RuntimeError as e:  # "can't start new thread", or shut down meanwhile
            raise OffloadError(f"model {self.source or self.graph.name!r}: could not submit "
                               f"the request: {e}") from None

    async def infer_async(self, *inputs, **named):
        """``await model.infer_async(x)``: the asyncio form of submit."""
        return await asyncio.wrap_future(self.submit(*inputs, **named))

    def predict(self, x: np.ndarray, batch_size: int = 1024):
        """Run a large single-input array in batches of ``batch_size``; returns the concatenation."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or \
                batch_size < 1:
            raise ArgumentError(f"predict(batch_size=...): expected an int >= 1 (rows per run), "
                                f"got {batch_size!r}")
        if len(self.graph.inputs) != 1:
            raise ArgumentError(f"predict() takes a model of one input; this one has "
                                f"{len(self.graph.inputs)}: call the model instead")
        batch_size = int(batch_size)
        try:
            x = np.asarray(x)
        except Exception as e:
            raise ShapeError(f"predict(): expected an array, got {type(x).__name__} ({e})") \
                from None
        if x.ndim < 1:
            raise ShapeError(f"predict(): expected an array with a batch axis, got a 0-d "
                             f"{x.dtype} array")
        parts = [self.run(x[i:i + batch_size]) for i in range(0, max(len(x), 1), batch_size)]
        if isinstance(parts[0], tuple):
            return tuple(np.concatenate(p) for p in zip(*parts))
        return np.concatenate(parts)

    def close(self, cancel: bool = False) -> None:
        """Stop taking requests, finish the pending ones (``cancel=True``: cancel them), stop
        this model's threads and release its plans and device buffers; later calls raise."""
        self._closing = True  # refuse new requests, let the pending ones finish
        if self._batcher is not None:
            self._batcher.close(cancel=cancel)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
        self._closed = True
        for ctx in self._contexts + ([self._fallback_context] if self._fallback_context else []):
            ctx.plans.clear()
            ctx.weights.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _run(self, inputs, named, out=None, profile=None):
        start = time.perf_counter()  # the request is counted with its device run (Stats.record)
        results = self._dispatch(self._prepare(inputs, named), out, profile, start)
        return results[0] if len(results) == 1 else tuple(results)

    def _run_timed(self, arrays, submitted):
        started = time.perf_counter()
        result = self._unwrap(self._dispatch(arrays, None, None))
        self._stats.request(time.perf_counter() - submitted, started - submitted)
        return result

    @staticmethod
    def _unwrap(results):
        return results[0] if len(results) == 1 else tuple(results)

    def _check_batchable(self, samples):
        if samples not in self._mixing:
            self._mixing[samples] = batch_mixing_node(self.graph, samples)
        node = self._mixing[samples]
        if node is not None:
            raise ModelFormatError(f"model {self.source or self.graph.name!r} cannot be batched: "
                                   f"{node} mixes samples across the batch axis, so merging "
                                   "requests would change their results")

    def _execute_batch(self, arrays, wait_s):
        """The batcher's device call on a merged (and padded, see Batcher.bucket) batch."""
        self._check_batchable(tuple(a.shape[1:] for a in arrays))
        # a merged batch lives in a block of the batcher's arena, a new one at almost every run:
        # copying it into the plan's staging costs less than binding each block in place
        return self._dispatch(arrays, None, None, in_place=False)

    def _prepare(self, inputs, named) -> list[np.ndarray]:
        if not named and len(inputs) == len(self._input_checks):
            # fast path: arrays of the declared dtype (the same dtype object: others take the
            # full check) and shape, checked without formatting anything
            for x, (dtype, rank, tail, fixed) in zip(inputs, self._input_checks):
                if type(x) is not np.ndarray or x.dtype is not dtype:
                    break
                shape = x.shape
                if len(shape) != rank:
                    break
                if tail is not None:  # every axis but the first fixed: one comparison
                    if shape[1:] != tail:
                        break
                elif any(shape[i] != d for i, d in fixed):
                    break
            else:
                return inputs
        specs = self.graph.inputs
        if named and inputs:
            raise ShapeError("pass inputs either by position or by name, not both")
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            named, inputs = dict(inputs[0]), ()
            if not named:
                raise ShapeError(f"model inputs are {[t.name for t in specs]}; got an empty "
                                 f"mapping (missing {[t.name for t in specs]})")
        if named:
            unknown = set(named) - {t.name for t in specs}
            missing = [t.name for t in specs if t.name not in named]
            if unknown or missing:
                raise ShapeError(f"model inputs are {[t.name for t in specs]}; got names "
                                 f"{sorted(named)} (missing {missing}, unknown {sorted(unknown)})")
            inputs = tuple(named[t.name] for t in specs)
        if len(inputs) != len(specs):
            raise ShapeError(f"model takes {len(specs)} input(s) "
                             f"{[t.name + ' ' + t.describe() for t in specs]}, got {len(inputs)}")
        return [self._check(spec, k, x) for k, (spec, x) in enumerate(zip(specs, inputs))]

    def _check(self, spec: G.TensorInfo, k: int, x) -> np.ndarray:
        what = f"input {spec.name!r} (#{k})"
        if not isinstance(x, np.ndarray):
            where = _dlpack_device(x)
            if where is not None and where[0] not in HOST_DLPACK:
                return self._check_device_array(spec, what, x, where)
            try:
                x = np.from_dlpack(x) if where is not None else np.asarray(x)
            except Exception as e:
                raise ShapeError(f"{what}: expected an array {spec.describe()}, "
                                 f"got {type(x).__name__} ({e})") from None
        want = np.dtype(spec.dtype)
        if want.kind != "f":
            if x.dtype != want and not (want.kind == "i" and x.dtype.kind in "iu" and
                                        np.can_cast(x.dtype, want)):
                raise ShapeError(f"{what}: expected dtype {want.name} (the graph declares it), "
                                 f"got {x.dtype} with shape {list(x.shape)}")
        elif x.dtype.kind != "f" or x.dtype.newbyteorder("=") not in ACCEPTED_FLOATS:
            raise ShapeError(f"{what}: expected dtype float32 (float64 and float16 are "
                             f"converted), got {x.dtype} with shape {list(x.shape)}")
        if x.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, x.shape)):
            raise ShapeError(f"{what}: expected shape {spec.describe()}, got "
                             f"{list(x.shape)} {x.dtype}")
        return x

    def _check_device_array(self, spec, what, x, where):
        """An input in a device's memory (DLPack): taken as is by a device that reads that
        memory (no host round trip), refused with both devices named otherwise."""
        name = DLPACK_NAMES.get(where[0], f"DLPack device type {where[0]}") + f":{where[1]}"
        if len(self.devices) > 1 or self._batcher is not None or \
                self.device.dlpack_device != tuple(where):
            on = ", ".join(d.spec for d in self.devices)
            why = " with batching" if self._batcher is not None else ""
            raise ShapeError(f"{what}: the array is in {name} memory ({type(x).__name__}); this "
                             f"model runs on {on}{why} and takes host arrays (NumPy) there")
        dtype = str(getattr(x, "dtype", "?")).replace("torch.", "")
        shape = tuple(getattr(x, "shape", ()))
        if dtype != "float32":
            raise ShapeError(f"{what}: expected dtype float32 for an array in {name} memory "
                             f"(not converted on the device), got {dtype} with shape "
                             f"{list(shape)}")
        if len(shape) != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, shape)):
            raise ShapeError(f"{what}: expected shape {spec.describe()}, got {list(shape)} "
                             f"{dtype} in {name} memory")
        return x

    def _acquire(self, ctx: _DeviceContext, shapes: tuple) -> Plan:
        plan = ctx.plans.take(shapes)
        if plan is not None:
            return plan
        return self._compile(ctx, shapes)

    def _compile(self, ctx: _DeviceContext, shapes: tuple) -> Plan:
        if self._closed:
            raise OffloadError(f"model {self.source or self.graph.name!r} is closed")
        ctx.plans.compiles += 1
        return Plan(self.graph, ctx.device, shapes, ctx.weights, ctx.precision,
                    memory_limit=self.memory_limit)

    def _release(self, ctx: _DeviceContext, plan: Plan) -> None:
        if not self._closed:
            ctx.plans.give(plan)

    def bind(self, *inputs, out=None, **named) -> "Binding":
        """Bind arrays to a plan once, for repeated calls on the same buffers (the event loop
        that refills one staging array per event): ``run = model.bind(x, out=y)``, then
        ``run()`` computes ``y`` from the current contents of ``x``. Inputs and outputs are
        checked here, not per call. With ``offload.empty`` arrays, a device that reads host
        memory uses them in place (0 bytes copied); other arrays are copied (counted). ``out``
        defaults to new ``offload.empty`` arrays (``run.outputs``). The binding holds one plan of
        the model's first device; it is not batched and does not fall back."""
        from .hostmem import empty
        arrays = list(self._prepare(inputs, named))
        for k, a in enumerate(arrays):
            if a.dtype != np.float32:
                raise ShapeError(f"bind(): input #{k} must be float32 (it is read at each call, "
                                 f"not converted once), got {a.dtype}")
        if self._closing:
            raise OffloadError(f"model {self.source or self.graph.name!r} is closed")
        ctx = self._contexts[0]
        plan = self._acquire(ctx, tuple(a.shape for a in arrays))
        try:
            outs = ([empty(s) for s in plan.output_shapes] if out is None else
                    self._check_out(out, plan.output_shapes))
        except BaseException:
            self._release(ctx, plan)
            raise
        return Binding(self, plan, arrays, outs)

    def plan(self, *shapes) -> Plan:
        """Compile (or fetch) the plan for these input shapes on the first device, e.g. to warm
        up before timing."""
        ctx = self._contexts[0]
        plan = self._acquire(ctx, self._check_shapes(shapes))
        self._release(ctx, plan)
        return plan

    def warmup(self, *shapes) -> dict:
        """Build the plan for these input shapes (default: batch 1 of each input) on every device
        of the model and run it once on zeros (not counted in ``stats``), so that kernels compile
        now rather than on the first event: a device's programs depend on the ops, layouts and
        precision, not on the batch size, and some OpenCL implementations (PoCL) finish
        compiling each kernel only at its first launch. OpenCL keeps both in disk caches for
        later processes. Returns {device spec: seconds}."""
        if not shapes:
            shapes = []
            for t in self.graph.inputs:
                rest = [d for d in t.shape[1:] if not isinstance(d, int)]
                if rest or not t.shape:
                    raise ShapeError(f"warmup: input {t.name!r} has shape {t.describe()}; give "
                                     "the shapes to build (model.warmup((1, 16), ...))")
                shapes.append((1,) + tuple(t.shape[1:]))
        key = tuple(tuple(int(d) for d in s) for s in shapes)
        took = {}
        for ctx in self._contexts:
            t0 = time.perf_counter()
            plan = self._acquire(ctx, key)
            try:
                plan.run([np.zeros(s, np.float32) for s in key])
            finally:
                self._release(ctx, plan)
            took[ctx.device.spec] = time.perf_counter() - t0
        return took

    def _check_shapes(self, shapes) -> tuple:
        """Input shapes given by hand (``plan``): one tuple of ints >= 0 per input, of the
        input's rank and fixed sizes; ShapeError naming the input otherwise."""
        specs = self.graph.inputs
        if len(shapes) != len(specs):
            raise ShapeError(f"plan(): the model takes {len(specs)} input(s) "
                             f"{[t.name + ' ' + t.describe() for t in specs]}, got "
                             f"{len(shapes)} shape(s)")
        out = []
        for k, (spec, shape) in enumerate(zip(specs, shapes)):
            what = f"plan(): the shape of input {spec.name!r} (#{k})"
            try:
                dims = tuple(shape)
            except TypeError:
                raise ShapeError(f"{what}: expected a tuple of ints, got {shape!r}") from None
            if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0
                       for d in dims):
                raise ShapeError(f"{what}: expected ints >= 0, got {dims!r}")
            dims = tuple(int(d) for d in dims)
            if len(dims) != len(spec.shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(spec.shape, dims)):
                raise ShapeError(f"{what}: expected {spec.describe()}, got {list(dims)}")
            out.append(dims)
        return tuple(out)

    def _pick(self) -> _DeviceContext:
        """The least-loaded device (requests in flight)."""
        with self._dispatch_lock:
            ctx = min(self._contexts, key=lambda c: c.in_flight)
            ctx.in_flight += 1
            return ctx

    def _dispatch(self, arrays, out, profile, since=None, in_place=True):
        """Run on the model's devices: in one run, or, for more rows than a run takes (on a
        model that treats each sample on its own), in several (see _dispatch_split)."""
        rows = arrays[0].shape[0] if len(arrays[0].shape) else 0
        if rows <= self.max_run_rows and not self._run_rows:
            try:
                return self._dispatch_one(arrays, out, profile, since, in_place)
            except DeviceMemoryError:
                if rows < 2 or self._split_reason(arrays, out) is not None:
                    raise
                self._run_rows[self._samples(arrays)] = max(1, rows // 2)
        limit = self._run_rows.get(self._samples(arrays), self.max_run_rows)
        if rows <= limit or self._split_reason(arrays, out) is not None:
            return self._dispatch_one(arrays, out, profile, since, in_place)
        return self._dispatch_split(arrays, out, profile, since, in_place, limit)

    @staticmethod
    def _samples(arrays) -> tuple:
        return tuple(tuple(a.shape[1:]) for a in arrays)

    def _split_reason(self, arrays, out) -> str | None:
        """Why a call cannot be run as several runs over its rows, or None when it can."""
        if isinstance(out, str):
            return 'out="device"'
        if any(not len(a.shape) or a.shape[0] != arrays[0].shape[0] for a in arrays):
            return "the inputs do not share a batch axis"
        if any(len(t.shape) and isinstance(t.shape[0], int) for t in self.graph.inputs):
            return "an input has a fixed first axis"
        samples = self._samples(arrays)
        if samples not in self._mixing:
            self._mixing[samples] = batch_mixing_node(self.graph, samples)
        return self._mixing[samples]

    def _dispatch_split(self, arrays, out, profile, since, in_place, limit):
        """Run ``arrays`` as runs of at most ``limit`` rows into one set of outputs; a run that
        finds no memory is halved and retried (down to one row), and the size remembered."""
        rows = arrays[0].shape[0]
        samples = self._samples(arrays)
        ctx = self._contexts[0]
        while True:
            try:
                plan = self._acquire(ctx, tuple((limit,) + s for s in samples))
                break
            except DeviceMemoryError:
                if limit < 2:
                    raise
                limit = self._run_rows[samples] = limit // 2
        shapes = plan.output_shapes
        self._release(ctx, plan)
        if any(not s or s[0] != limit for s in shapes):  # an output without the batch axis
            return self._dispatch_one(arrays, out, profile, since, in_place)
        full = [(rows,) + tuple(s[1:]) for s in shapes]
        if out is None:
            try:
                outs = [np.empty(s, np.float32) for s in full]
            except MemoryError:
                raise DeviceMemoryError(f"host memory: cannot allocate the outputs "
                                        f"{[list(s) for s in full]} of a {rows}-row call") \
                    from None
        else:
            outs = self._check_out(out, tuple(full))
        start = 0
        while start < rows:
            stop = min(rows, start + limit)
            try:
                self._dispatch_one([a[start:stop] for a in arrays],
                                   [o[start:stop] for o in outs], profile, None, in_place)
            except DeviceMemoryError:
                if stop - start < 2:
                    raise
                limit = max(1, (stop - start) // 2)
                self._run_rows[samples] = limit
                continue
            start = stop
        if since is not None:
            self._stats.request(time.perf_counter() - since)
        return outs

    def _dispatch_one(self, arrays, out, profile, since=None, in_place=True):
        """Run on one of the model's devices; ``since``: count the request (see Stats.record);
        ``in_place``: let the plan use aligned arrays in place (see Plan.run)."""
        if len(self._contexts) == 1:
            ctx = self._contexts[0]
            try:
                return self._run_on(ctx, arrays, out, profile, since, in_place)
            except OffloadError as e:
                return self._fall_back(ctx, e, arrays, out, profile, since)
        ctx = self._pick()
        try:
            return self._run_on(ctx, arrays, out, profile, since, in_place)
        except OffloadError as e:
            return self._fall_back(ctx, e, arrays, out, profile, since)
        finally:
            with self._dispatch_lock:
                ctx.in_flight -= 1

    def _fall_back(self, ctx, error, arrays, out, profile, since=None):
        """fallback="cpu": rerun a failed device run on the CPU device, counted and warned."""
        if (self.fallback != "cpu" or isinstance(error, (ShapeError, ModelFormatError))
                or ctx.device.kind == "cpu" or self._closed):
            raise error
        if self._fallback_context is None:
            from .device import device as open_device
            with self._dispatch_lock:
                if self._fallback_context is None:
                    self._fallback_context = _DeviceContext(open_device("cpu"),
                                                             plan_cache=self.plan_cache)
        reason = f"{ctx.device.spec}: {type(error).__name__}: {str(error).splitlines()[0]}"
        if self._stats.fallback(reason):
            warnings.warn(f"offload: falling back to cpu ({reason})", RuntimeWarning, stacklevel=4)
        return self._run_on(self._fallback_context, arrays, out, profile, since)

    def _run_on(self, ctx: _DeviceContext, arrays, out=None, profile=None, since=None,
                in_place=True):
        shapes = (arrays[0].shape,) if len(arrays) == 1 else tuple([a.shape for a in arrays])
        if self._closed:
            raise OffloadError(f"model {self.source or self.graph.name!r} is closed")
        rows = None
        if shapes[0] and shapes[0][0] > BUCKET_EXACT and out is None and profile is None:
            bucketed = self._bucketed(shapes)
            if bucketed is not None:
                shapes, rows = bucketed
        plan = ctx.plans.take(shapes)
        if plan is None:
            if all(s and s[0] == 0 for s in shapes):  # an empty batch (every input's axis 0)
                empty = self._empty_result(ctx, shapes)
                if empty is not None:
                    if since is not None:
                        self._stats.request(time.perf_counter() - since)
                    return empty
            try:
                plan = self._compile(ctx, shapes)
            except DeviceMemoryError as e:
                if rows is None:
                    raise
                raise DeviceMemoryError(f"a call of {rows} rows (run on the plan of its bucket, "
                                        f"{shapes[0][0]} rows): {e}") from None
        ctx.runs += 1
        try:
            if rows is not None:
                return plan.run_rows(arrays, rows, self._stats, since)
            outs = None if out is None else "device" if isinstance(out, str) and out == \
                "device" else self._check_out(out, plan.output_shapes)
            return plan.run(arrays, outs, self._stats, profile, since, in_place)
        except MemoryError:  # a host allocation while running (the outputs, a temporary)
            raise DeviceMemoryError(f"{ctx.device.spec}: out of host memory running the plan "
                                    f"for input shapes {[list(s) for s in shapes]}") from None
        finally:
            self._release(ctx, plan)

    def _bucketed(self, shapes):
        """(the bucket's input shapes, rows) when a call at ``shapes`` may run on the plan of
        a larger batch (every input has the same free batch axis and the model computes each
        sample on its own; not in fixed point), else None."""
        n = shapes[0][0]
        size = bucket(n)
        if self.precision == FIXED:  # FPGA runs: padding rows would cost PCIe bytes and time
            return None
        if size == n or any(not s or s[0] != n for s in shapes) or \
                any(isinstance(t.shape[0], int) for t in self.graph.inputs if t.shape):
            return None
        samples = tuple(tuple(s[1:]) for s in shapes)
        ok = self._bucketable.get(samples)
        if ok is None:
            try:
                ok = batch_mixing_node(self.graph, samples) is None
            except OffloadError:  # cannot even be resolved at the probe batch
                ok = False
            self._bucketable[samples] = ok
        if not ok:
            return None
        return tuple((size,) + s for s in samples), n

    @staticmethod
    def _check_out(out, shapes) -> list:
        if (type(out) is np.ndarray and len(shapes) == 1 and out.shape == shapes[0]
                and out.dtype == np.float32 and out.flags.writeable):
            return [out]
        if isinstance(out, np.ndarray):
            outs = [out]
        elif isinstance(out, (list, tuple)):
            outs = list(out)
        else:
            raise ShapeError(f"out=: expected a float32 array (or a list of them, one per "
                             f"output) of shape(s) {[list(s) for s in shapes]}, got "
                             f"{type(out).__name__} {out!r:.80}")
        if len(outs) != len(shapes):
            raise ShapeError(f"out=: the model has {len(shapes)} output(s), got {len(outs)} "
                             "array(s)")
        for k, (o, shape) in enumerate(zip(outs, shapes)):
            if not isinstance(o, np.ndarray) or o.shape != shape or o.dtype != np.float32 \
                    or not o.flags.writeable:
                got = (f"{list(o.shape)} {o.dtype}{'' if o.flags.writeable else ' read-only'}"
                       if isinstance(o, np.ndarray) else type(o).__name__)
                raise ShapeError(f"out= array #{k}: expected shape "
                                 f"{list(shape)} float32 (writeable), got {got}")
        return outs

    def _empty_result(self, ctx, shapes):
        """Outputs for an empty batch, or None when one of them is not empty (a reduction
        over the batch axis: then a plan computes it). The graph is resolved at these shapes,
        so an empty batch is refused exactly where a full one would be."""
        from .plan import resolve
        r = resolve(self.graph, shapes, None, self.memory_limit)
        out = [r.shapes[o] if o in r.shapes else np.shape(r.values[o]) for o in self.graph.outputs]
        if any(math.prod(s) for s in out):
            return None
        return [np.empty(s, np.float32) for s in out]
