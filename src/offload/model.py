"""Model: a loaded graph bound to a device; NumPy in, NumPy out, any batch size."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Mapping

import numpy as np

from . import graph as G
from .device import Device
from .errors import OffloadError, ShapeError
from .plan import Plan

ACCEPTED_FLOATS = (np.float32, np.float64, np.float16)

_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _shared_executor():
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="offload")
        return _executor


class Stats:
    """Counters of one model: calls, bytes and seconds of copy-in, compute and copy-out."""

    FIELDS = ("calls", "copy_in_bytes", "copy_out_bytes", "copy_in_s", "compute_s", "copy_out_s")

    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.FIELDS, 0)

    def record(self, in_bytes, out_bytes, in_s, compute_s, out_s):
        with self._lock:
            v = self._values
            v["calls"] += 1
            v["copy_in_bytes"] += in_bytes
            v["copy_out_bytes"] += out_bytes
            v["copy_in_s"] += in_s
            v["compute_s"] += compute_s
            v["copy_out_s"] += out_s

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._values)

    def reset(self):
        with self._lock:
            self._values = dict.fromkeys(self.FIELDS, 0)


class Model:
    """An ONNX model prepared for one device.

    ``model(x)`` runs it on NumPy arrays (several inputs in graph order, or a dict by name);
    several outputs come back as a tuple. Inputs must be floating point: float32 is used as is,
    float64 and float16 are converted to float32 (a counted copy). A plan is compiled per input
    shape on first use and reused; concurrent calls with the same shape each get their own plan
    (weights are shared).
    """

    def __init__(self, graph: G.Graph, device: Device, source: str = ""):
        self.graph = graph
        self.device = device
        self.source = source
        self._weights: dict = {}
        self._plans: dict[tuple, list[Plan]] = {}
        self._stats = Stats()
        self._closed = False
        # per input: (name, rank, [(axis, size) of fixed axes]) for the fast check of each call
        self._input_checks = [(t.name, len(t.shape), [(i, d) for i, d in enumerate(t.shape)
                                                      if isinstance(d, int)])
                              for t in graph.inputs]

    # -- introspection -------------------------------------------------------------------------
    @property
    def inputs(self) -> list[G.TensorInfo]:
        return list(self.graph.inputs)

    @property
    def outputs(self) -> list[str]:
        return list(self.graph.outputs)

    @property
    def stats(self) -> dict:
        """calls, copy_in_bytes, copy_out_bytes, copy_in_s, compute_s, copy_out_s."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self._stats.reset()

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}: {t.describe()}" for t in self.graph.inputs)
        return f"<offload.Model {self.source or self.graph.name!r} on {self.device.spec} ({ins})>"

    # -- running -------------------------------------------------------------------------------
    def __call__(self, *inputs, out=None, **named):
        return self._run(inputs, named, out=out)

    def run(self, *inputs, out=None, profile=None, **named):
        """As ``__call__``; ``profile`` (a list) receives (node, op, seconds) per step."""
        return self._run(inputs, named, out=out, profile=profile)

    def submit(self, *inputs, **named) -> concurrent.futures.Future:
        """Run in the background; returns a concurrent.futures.Future of the result."""
        arrays = self._prepare(inputs, named)  # validate now: errors surface at submit time
        return _shared_executor().submit(self._run_prepared, arrays, None, None)

    def predict(self, x: np.ndarray, batch_size: int = 1024):
        """Run a large single-input array in batches of ``batch_size``; returns the concatenation."""
        x = np.asarray(x)
        parts = [self(x[i:i + batch_size]) for i in range(0, max(len(x), 1), batch_size)]
        if isinstance(parts[0], tuple):
            return tuple(np.concatenate(p) for p in zip(*parts))
        return np.concatenate(parts)

    def close(self) -> None:
        """Release the plans and device buffers of this model; later calls raise."""
        self._closed = True
        self._plans.clear()
        self._weights.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _run(self, inputs, named, out=None, profile=None):
        return self._run_prepared(self._prepare(inputs, named), out, profile)

    def _prepare(self, inputs, named) -> list[np.ndarray]:
        if not named and len(inputs) == len(self._input_checks):
            ok = True  # fast path: float32 arrays of the right shape, checked without formatting
            for x, (_, rank, fixed) in zip(inputs, self._input_checks):
                if (type(x) is not np.ndarray or x.dtype != np.float32 or x.ndim != rank
                        or any(x.shape[i] != d for i, d in fixed)):
                    ok = False
                    break
            if ok:
                return list(inputs)
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
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as e:
                raise ShapeError(f"input {spec.name!r} (#{k}): expected an array {spec.describe()},"
                                 f" got {type(x).__name__} ({e})") from None
        if x.dtype not in ACCEPTED_FLOATS:
            raise ShapeError(f"input {spec.name!r} (#{k}): expected dtype float32 (float64 and "
                             f"float16 are converted), got {x.dtype} with shape {list(x.shape)}")
        if x.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, x.shape)):
            raise ShapeError(f"input {spec.name!r} (#{k}): expected shape {spec.describe()}, got "
                             f"{list(x.shape)} {x.dtype}")
        return x

    def _acquire(self, shapes: tuple) -> Plan:
        try:
            return self._plans[shapes].pop()  # list.pop is atomic: no lock on the hot path
        except (KeyError, IndexError):
            pass
        if self._closed:
            raise OffloadError(f"model {self.source or self.graph.name!r} is closed")
        return Plan(self.graph, self.device, shapes, self._weights)

    def _release(self, plan: Plan) -> None:
        if not self._closed:
            self._plans.setdefault(plan.input_shapes, []).append(plan)

    def plan(self, *shapes) -> Plan:
        """Compile (or fetch) the plan for these input shapes, e.g. to warm up before timing."""
        plan = self._acquire(tuple(tuple(s) for s in shapes))
        self._release(plan)
        return plan

    def _run_prepared(self, arrays, out=None, profile=None):
        shapes = tuple([a.shape for a in arrays])
        if self._closed:
            raise OffloadError(f"model {self.source or self.graph.name!r} is closed")
        if shapes not in self._plans and any(0 in s for s in shapes):
            results = self._empty_result(shapes)
        else:
            outs = None
            if out is not None:
                outs = [out] if isinstance(out, np.ndarray) else list(out)
            plan = self._acquire(shapes)
            try:
                if outs is not None:
                    for o, shape in zip(outs, plan.output_shapes):
                        if o.shape != tuple(shape) or o.dtype != np.float32:
                            raise ShapeError(f"out= array: expected shape {list(shape)} float32, "
                                             f"got {list(o.shape)} {o.dtype}")
                results = plan.run(arrays, outs, self._stats, profile)
            finally:
                self._release(plan)
        return results[0] if len(results) == 1 else tuple(results)

    def _empty_result(self, shapes):
        """Outputs for an empty batch: the plan at batch 1 tells the other dimensions."""
        ones = tuple((1,) + tuple(s[1:]) for s in shapes)
        plan = self._acquire(ones)
        self._release(plan)
        return [np.empty((0,) + tuple(s[1:]), np.float32) for s in plan.output_shapes]
