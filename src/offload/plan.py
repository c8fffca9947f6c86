"""A Plan: one graph compiled for one device and one set of input shapes.

Compiling resolves every shape, folds what the input shapes make constant (shape arithmetic),
prepares each op once through the device's op builders (weights uploaded once per model and
shared between plans), and gives activations buffers from a liveness-based pool so buffers are
reused between tensors and between calls. ``run`` then only copies in, calls the steps, copies out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import graph as G
from . import reference
from .device import Device
from .errors import ShapeError, UnsupportedOpError


class BuildContext:
    """What op builders may ask of the plan: prepared weights and scratch memory."""

    def __init__(self, device: Device, weights: dict):
        self.device = device
        self._weights = weights  # shared by every plan of one model on one device
        self._scratch: dict[int, tuple] = {}  # slot -> (raw block, nbytes)

    def weight(self, array: np.ndarray, tag: str = "", transform=None):
        """A device copy of a constant, transformed once (e.g. re-laid out) and cached."""
        key = (id(array), tag)
        hit = self._weights.get(key)
        if hit is None:
            host = transform(array) if transform is not None else array
            hit = self._weights[key] = (array, self.device.upload(np.ascontiguousarray(host)))
        return hit[1]

    def scratch(self, shape, dtype=np.float32, slot: int = 0):
        """A temporary buffer valid only while one step runs, shared between steps; a step that
        needs two temporaries asks for two slots."""
        nbytes = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
        raw, size = self._scratch.get(slot, (None, 0))
        if nbytes > size:
            raw = self.device.alloc(nbytes)
            self._scratch[slot] = (raw, nbytes)
        return self.device.view(raw, tuple(shape), dtype)


@dataclass
class Step:
    node: G.Node
    run: object  # zero-argument callable


def _device_operands(node: G.Node, values: dict, shapes: dict):
    """Split a device op's inputs into data operands and plan-time parameters (in attrs)."""
    op, a = node.op, dict(node.attrs)
    ins = node.inputs
    x_shape = shapes.get(ins[0])
    if op in ("conv2d", "maxpool", "avgpool"):
        a = G.window_attrs(node, x_shape)
    if op == "reduce":
        a["axes"] = G.reduce_axes(node, len(x_shape), values.get(ins[1]) if len(ins) > 1 and
                                  ins[1] else None)
        ins = ins[:1]
    elif op == "pad":
        opt = lambda i: values.get(ins[i]) if len(ins) > i and ins[i] else None  # noqa: E731
        for i in (1, 2, 3):
            if len(ins) > i and ins[i] and ins[i] not in values:
                raise ShapeError(f"Pad node {node.name!r}: pads, value and axes must be known "
                                 "before the run")
        a["begin"], a["end"] = G.pad_amounts(node, len(x_shape), opt(1), opt(3))
        if opt(2) is not None and np.asarray(opt(2)).size:
            a["value"] = float(np.asarray(opt(2)).reshape(-1)[0])
        ins = ins[:1]
    elif op == "softmax":
        a["axis"] = G.normalize_axis(a["axis"], len(x_shape), node)
    elif op == "concat":
        a["axis"] = G.normalize_axis(a["axis"], len(x_shape), node)
    elif op == "transpose":
        a["perm"] = tuple(a.get("perm") or reversed(range(len(x_shape))))
    return a, [i for i in ins if i]


@dataclass
class Resolved:
    """A graph at concrete input shapes: the run-time nodes in order with resolved attributes,
    operands and output shapes, plus every tensor's shape and the plan-time constants."""

    entries: list  # (node, attrs, data operand names, out shape)
    shapes: dict
    values: dict


def resolve(graph: G.Graph, input_shapes: tuple, device_ops=None) -> Resolved:
    """Resolve shapes and fold what the input shapes make constant; with ``device_ops``, check
    that the device implements every run-time op (UnsupportedOpError lists all that it lacks)."""
    values: dict[str, np.ndarray] = dict(graph.constants)
    shapes: dict[str, tuple] = {t.name: s for t, s in zip(graph.inputs, input_shapes)}
    entries = []
    unsupported, failed = [], set()
    for node in graph.nodes:
        if any(i in failed for i in node.inputs):
            failed.update(node.outputs)  # downstream of an op already reported
            continue
        if all(not i or i in values for i in node.inputs):
            outs = reference.evaluate(node, [values.get(i) if i else None for i in node.inputs])
            values.update(zip(node.outputs, (np.asarray(v) for v in outs)))
            continue
        if node.op == "shape":
            dims = np.array(shapes[node.inputs[0]], np.int64)
            values[node.outputs[0]] = dims[node.attrs.get("start", 0):node.attrs.get("end")]
            continue
        if node.op == "cast" and reference.ONNX_DTYPES.get(node.attrs["to"]) == np.float32:
            node = G.Node("identity", node.inputs[:1], node.outputs, {}, node.name)
        if node.op in G.HOST_OPS:
            unsupported.append((node.op, node.name))
            failed.update(node.outputs)
            continue
        in_shapes = [shapes.get(i) if i in shapes else
                     (values[i].shape if i in values else None) for i in node.inputs]
        out_shape = G.infer_shape(node, in_shapes, [values.get(i) for i in node.inputs])
        shapes[node.outputs[0]] = out_shape
        if node.op in G.VIEW_OPS:
            entries.append((node, {}, node.inputs[:1], out_shape))
        else:
            if device_ops is not None and node.op not in device_ops:
                unsupported.append((node.op, node.name))
                failed.update(node.outputs)
                continue
            attrs, operands = _device_operands(node, values, shapes)
            entries.append((node, attrs, operands, out_shape))
    if unsupported:
        items = ", ".join(f"{op} (node {name!r})" for op, name in unsupported)
        raise UnsupportedOpError(f"cannot run {items} on run-time data", unsupported)
    return Resolved(entries, shapes, values)


def batch_mixing_node(graph: G.Graph, sample_shapes: tuple) -> str | None:
    """The first node that mixes samples across the batch axis (axis 0 of every input), or None
    when every op treats each sample on its own, so that requests may be merged into one batch.

    Checked at an odd batch size no other axis is likely to have."""
    probe = 7919
    resolved = resolve(graph, tuple((probe,) + tuple(s) for s in sample_shapes))
    for node, attrs, operands, out_shape in resolved.entries:
        op = node.op
        in_shape = resolved.shapes[operands[0]]
        crosses = (
            not out_shape or out_shape[0] != probe
            or any(resolved.shapes[n][0] != probe for n in operands if n in resolved.shapes)
            or (op == "reduce" and 0 in attrs["axes"])
            or (op in ("softmax", "concat") and attrs["axis"] == 0)
            or (op == "transpose" and attrs["perm"][0] != 0)
            or (op == "pad" and (attrs["begin"][0] or attrs["end"][0]))
            or (op in G.VIEW_OPS and (not in_shape or in_shape[0] != probe)))
        if crosses:
            return f"{node.source_op or op} node {node.name!r}"
    return None


class Plan:
    """``graph`` compiled for ``device`` at the given input shapes."""

    def __init__(self, graph: G.Graph, device: Device, input_shapes: tuple, weights: dict):
        self.device = device
        self.input_shapes = input_shapes
        ctx = BuildContext(device, weights)
        try:
            r = resolve(graph, input_shapes, device.ops)
        except UnsupportedOpError as e:
            raise UnsupportedOpError(f"device {device.spec}: {e}", e.ops) from None
        self._build(graph, device, ctx, r.values, r.shapes, r.entries)

    def _build(self, graph, device, ctx, values, shapes, entries):
        # Which memory block each run-time tensor lives in (views share their input's block).
        root = {t.name: t.name for t in graph.inputs}
        for node, _, operands, _ in entries:
            root[node.outputs[0]] = root[operands[0]] if node.op in G.VIEW_OPS else \
                node.outputs[0]
        last_use = {}
        for i, (node, _, operands, _) in enumerate(entries):
            for name in operands:
                if name in root:
                    last_use[root[name]] = i
        pinned = {t.name for t in graph.inputs} | {root[o] for o in graph.outputs if o in root}

        blocks: dict[str, tuple] = {}  # root name -> (raw, nbytes)
        free: list[tuple[int, object]] = []
        buffers = {}
        self.input_buffers = []
        for t in graph.inputs:
            shape = shapes[t.name]
            nbytes = max(1, math.prod(shape) * 4)
            raw = device.alloc(nbytes)
            blocks[t.name] = (raw, nbytes)
            buffers[t.name] = device.view(raw, shape)
            self.input_buffers.append(buffers[t.name])

        self.steps: list[Step] = []
        self.activation_blocks = 0  # blocks allocated for step outputs (reuse keeps this low)
        for i, (node, attrs, operands, out_shape) in enumerate(entries):
            out = node.outputs[0]
            if node.op in G.VIEW_OPS:
                raw = blocks[root[out]][0]
                buffers[out] = device.view(raw, out_shape)
            else:
                nbytes = max(1, math.prod(out_shape) * 4)
                fit = [(cap, raw) for cap, raw in free if nbytes <= cap <= 4 * nbytes + 4096]
                if fit:
                    best = min(fit, key=lambda f: f[0])
                    free.remove(best)
                    blocks[out] = best[1], best[0]
                else:
                    blocks[out] = device.alloc(nbytes), nbytes
                    self.activation_blocks += 1
                buffers[out] = device.view(blocks[out][0], out_shape)
                data = [buffers[n] if n in buffers else
                        np.ascontiguousarray(values[n], dtype=np.float32) for n in operands]
                self.steps.append(Step(node, device.ops[node.op](ctx, attrs, data, buffers[out])))
            for name in set(operands):
                r = root.get(name)
                if r is not None and last_use.get(r) == i and r not in pinned:
                    raw, cap = blocks[r]
                    free.append((cap, raw))
        self.outputs = []  # (buffer or None, constant or None, shape)
        for o in graph.outputs:
            if o in buffers:
                self.outputs.append((buffers[o], None, shapes[o]))
            elif o in values:
                self.outputs.append((None, np.asarray(values[o]), values[o].shape))
            else:
                raise ShapeError(f"graph output {o!r} is never computed")
        self._run_steps = tuple(device.finalize([s.run for s in self.steps]))

    @property
    def output_shapes(self) -> list[tuple]:
        return [shape for _, _, shape in self.outputs]

    def run(self, arrays, outs=None, stats=None, profile=None):
        """Copy ``arrays`` in, run every step, copy the outputs out (into ``outs`` if given)."""
        device = self.device
        t0 = time.perf_counter()
        copied_in = 0
        for buf, array in zip(self.input_buffers, arrays):
            copied_in += device.copy_in(buf, array)
        t1 = time.perf_counter()
        if profile is None:
            for run in self._run_steps:
                run()
            device.synchronize()
        else:
            for step in self.steps:
                s = time.perf_counter()
                step.run()
                device.synchronize()
                profile.append((step.node.name, step.node.op, time.perf_counter() - s))
        t2 = time.perf_counter()
        results, copied_out = [], 0
        for k, (buf, const, shape) in enumerate(self.outputs):
            dst = outs[k] if outs is not None else np.empty(shape, np.float32)
            if buf is None:
                np.copyto(dst, const)
                copied_out += dst.nbytes
            else:
                copied_out += device.copy_out(dst, buf)
            results.append(dst)
        t3 = time.perf_counter()
        if stats is not None:
            stats.record(copied_in, copied_out, t1 - t0, t2 - t1, t3 - t2)
        return results
