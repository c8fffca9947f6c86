"""Straightforward NumPy implementations of every IR op.

Used to fold constants (at load and at plan time) and as the test oracle for device ops. Clarity
over speed: the fast NumPy implementations live in ``drivers/cpu.py``.
"""

from __future__ import annotations

import numpy as np

from . import elementwise as EW
from . import graph as G
from .errors import ShapeError, UnsupportedOpError

ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


def apply_activation(y: np.ndarray, attrs: dict) -> np.ndarray:
    fn = attrs.get("activation", attrs.get("fn", "identity"))
    if fn == "identity":
        return y
    if fn == "relu":
        return np.maximum(y, 0).astype(y.dtype)
    if fn == "leaky_relu":
        return np.where(y >= 0, y, y * np.float32(attrs.get("alpha", 0.01))).astype(y.dtype)
    if fn == "sigmoid":
        with np.errstate(over="ignore", under="ignore"):
            return (1.0 / (1.0 + np.exp(-y.astype(np.float64)))).astype(y.dtype)
    if fn == "tanh":
        return np.tanh(y)
    if fn == "clip":
        return np.clip(y, attrs.get("lo", -np.inf), attrs.get("hi", np.inf)).astype(y.dtype)
    raise UnsupportedOpError(f"unknown activation {fn!r}", [(fn, "")])


def pad_input(x, pads, value):
    t, l, b, r = pads
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=value)


def conv2d(x, w, b, attrs, residual=None):
    a = G.window_attrs(G.Node("conv2d", [], [], attrs), x.shape)
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    groups, (sh, sw), (dh, dw) = a["groups"], a["strides"], a["dilations"]
    oh, ow = G.conv_output_hw((h, wd), (kh, kw), (sh, sw), a["pads"], (dh, dw))
    xp = pad_input(x.astype(np.float64), a["pads"], 0.0)
    y = np.zeros((n, m, oh, ow))
    mg = m // groups
    for g in range(groups):
        xg = xp[:, g * cg:(g + 1) * cg]
        wg = w[g * mg:(g + 1) * mg].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                           j * dw: j * dw + sw * (ow - 1) + 1: sw]
                y[:, g * mg:(g + 1) * mg] += np.einsum("nchw,mc->nmhw", patch, wg[:, :, i, j])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    if residual is not None:
        y += residual
    return apply_activation(y.astype(np.float32), attrs)


def dense(x, w, b, attrs, residual=None):
    y = x.astype(np.float64) @ w.astype(np.float64)
    if b is not None:
        y = y + b
    if residual is not None:
        y = y + residual
    return apply_activation(y.astype(np.float32), attrs)


def pool(x, attrs, kind):
    a = G.window_attrs(G.Node(kind, [], [], attrs), x.shape)
    (kh, kw), (sh, sw), (dh, dw) = a["kernel"], a["strides"], a["dilations"]
    n, c, h, wd = x.shape
    oh, ow = G.conv_output_hw((h, wd), (kh, kw), (sh, sw), a["pads"], (dh, dw),
                              a.get("ceil_mode", 0))
    t, l = a["pads"][0], a["pads"][1]
    y = np.zeros((n, c, oh, ow), np.float64)
    for p in range(oh):
        for q in range(ow):
            rows = [p * sh - t + i * dh for i in range(kh)]
            cols = [q * sw - l + j * dw for j in range(kw)]
            inside_r = [r for r in rows if 0 <= r < h]
            inside_c = [s for s in cols if 0 <= s < wd]
            window = x[:, :, inside_r][:, :, :, inside_c].astype(np.float64)
            if kind == "maxpool":
                y[:, :, p, q] = window.max(axis=(2, 3))
            else:
                if a.get("count_include_pad", 0):
                    # count positions inside the padded input, not the extra ceil_mode region
                    hp, wp = h + a["pads"][0] + a["pads"][2], wd + a["pads"][1] + a["pads"][3]
                    count = (sum(1 for r in rows if r + t < hp) * sum(1 for s in cols if s + l < wp))
                else:
                    count = len(inside_r) * len(inside_c)
                y[:, :, p, q] = window.sum(axis=(2, 3)) / count
    return y.astype(np.float32)


def reduce(x, attrs, axes_value):
    axes = G.reduce_axes(G.Node("reduce", [], [], attrs), x.ndim, axes_value)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        return x.copy()
    fn = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min,
          "prod": np.prod}[attrs["fn"]]
    acc = x.astype(np.float64) if x.dtype.kind == "f" else x
    return fn(acc, axis=axes, keepdims=keep).astype(x.dtype)


def pad(x, attrs, pads_value, value_value, axes_value):
    node = G.Node("pad", [], [], attrs)
    begin, end = G.pad_amounts(node, x.ndim, pads_value, axes_value)
    value = attrs.get("value", 0.0)
    if value_value is not None and np.asarray(value_value).size:
        value = np.asarray(value_value).reshape(-1)[0]
    crop = tuple(slice(max(-b, 0), x.shape[i] - max(-e, 0)) for i, (b, e) in
                 enumerate(zip(begin, end)))
    x = x[crop]
    return np.pad(x, [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)],
                  constant_values=value).astype(x.dtype)


def softmax(x, axis):
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


def slice_(x, starts, ends, axes, steps):
    starts = [int(v) for v in np.asarray(starts).reshape(-1)]
    ends = [int(v) for v in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [int(v) % x.ndim for v in
                                                         np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(s, e, st)
    return x[tuple(index)]


def _indices(node, x, indices):
    """(axis, the indices made non-negative); ShapeError naming node, tensors and the bad
    index when one is outside the axis."""
    axis = G.normalize_axis(node.attrs.get("axis", 0), x.ndim, node)
    indices = np.asarray(indices).astype(np.int64)
    size = x.shape[axis]
    bad = indices[(indices < -size) | (indices >= size)]
    if bad.size:
        raise ShapeError(f"{node.source_op or node.op} node {node.name!r}: index "
                         f"{node.inputs[1]!r} holds {int(bad.reshape(-1)[0])}, outside "
                         f"[-{size}, {size - 1}] for axis {axis} of {node.inputs[0]!r}")
    return axis, np.where(indices < 0, indices + size, indices)


def gather(node, x, indices):
    axis, indices = _indices(node, x, indices)
    return np.take(x, indices, axis=axis)


def gather_elements(node, x, indices):
    axis, indices = _indices(node, x, indices)
    region = x[tuple(slice(0, d) for d in indices.shape[:axis]) + (slice(None),) +
               tuple(slice(0, d) for d in indices.shape[axis + 1:])]
    return np.take_along_axis(region, indices, axis)


def topk(node, x, inputs):
    """The indices of the k largest (smallest) along the axis, ties to the lower index."""
    axis = G.normalize_axis(node.attrs.get("axis", -1), x.ndim, node)
    k = G.topk_k(node, [x] + list(inputs[1:]))
    if not 0 <= k <= x.shape[axis]:
        raise ShapeError(f"TopK node {node.name!r}: k = {k} but axis {axis} of "
                         f"{node.inputs[0]!r} {list(x.shape)} has {x.shape[axis]} elements")
    key = -x if node.attrs.get("largest", 1) else x
    order = np.argsort(key, axis=axis, kind="stable")
    return np.take(order, np.arange(k), axis=axis).astype(np.int64)


def evaluate(node: G.Node, inputs: list) -> list[np.ndarray]:
    """Evaluate one IR node on NumPy arrays (None for an absent optional input)."""
    op, a = node.op, node.attrs
    x = inputs[0] if inputs else None
    opt = lambda i: inputs[i] if len(inputs) > i else None  # noqa: E731
    if a.get("into_first"):  # folded at load too: Gemm's C broadcasts into the product only
        shapes = [np.shape(v) for v in inputs if v is not None]
        G.broadcast_into_first(node, G.broadcast_shapes(shapes[0], shapes[1], node), shapes)
    if op == "conv2d":
        return [conv2d(x, inputs[1], opt(2), a, opt(3))]
    if op == "dense":
        return [dense(x, inputs[1], opt(2), a, opt(3))]
    if op in ("maxpool", "avgpool"):
        return [pool(x, a, op)]
    if op == "global_avgpool":
        return [x.astype(np.float64).mean(axis=tuple(range(2, x.ndim)), keepdims=True)
                .astype(x.dtype)]
    if op in ("add", "sub", "mul", "div"):
        fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op]
        if op == "div" and np.asarray(x).dtype.kind in "iu":
            q = np.abs(x) // np.abs(inputs[1])  # ONNX integer division truncates toward zero
            return [(q * np.sign(x) * np.sign(inputs[1])).astype(np.result_type(x, inputs[1]))]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = fn(x, inputs[1])
        return [np.asarray(out).astype(np.result_type(x, inputs[1]))]
    if op == "activation":
        return [apply_activation(x, a)]
    if op == "softmax":
        return [softmax(x, a["axis"])]
    if op == "concat":
        return [np.concatenate(inputs, axis=a["axis"])]
    if op == "reduce":
        return [reduce(x, a, opt(1))]
    if op == "pad":
        return [pad(x, a, opt(1), opt(2), opt(3))]
    if op == "transpose":
        return [np.ascontiguousarray(np.transpose(x, a.get("perm") or None))]
    if op in G.VIEW_OPS:
        shape = G.infer_shape(node, [i.shape if i is not None else None for i in inputs], inputs)
        return [x.reshape(shape)]
    if op == "shape":
        dims = np.array(x.shape, np.int64)
        return [dims[a.get("start", 0):a.get("end", None)]]
    if op == "gather":
        return [gather(node, x, inputs[1])]
    if op == "gather_nd":
        idx = np.asarray(inputs[1]).astype(np.int64)
        q = idx.shape[-1]
        sizes = np.array(x.shape[:q])
        if idx.size and ((idx < -sizes).any() or (idx >= sizes).any()):
            raise ShapeError(f"GatherND node {node.name!r}: an index of {node.inputs[1]!r} is "
                             f"outside data {list(x.shape)}")
        idx = np.where(idx < 0, idx + sizes, idx)
        return [x[tuple(np.moveaxis(idx, -1, 0))]]
    if op == "gather_elements":
        return [gather_elements(node, x, inputs[1])]
    if op == "cast":
        return [EW.evaluate("cast", [x], a)]
    if op == "elementwise":
        return [EW.evaluate(a["fn"], inputs, a)]
    if op == "expand":
        shape = G.infer_shape(node, [x.shape, inputs[1].shape], inputs)
        return [np.array(np.broadcast_to(x, shape))]
    if op == "tile":
        return [np.tile(x, [int(v) for v in inputs[1].reshape(-1)])]
    if op == "slice":
        return [slice_(x, inputs[1], inputs[2], opt(3), opt(4))]
    if op == "split_part":
        begin, end = G.split_range(node, x.shape, inputs)
        axis = a["axis"] % x.ndim
        return [x[(slice(None),) * axis + (slice(begin, end),)].copy()]
    if op == "topk":
        return [topk(node, x, inputs)]
    if op == "layernorm":
        axes = tuple(range(G.normalize_axis(a["axis"], x.ndim, node), x.ndim))
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=axes, keepdims=True)
        var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x64 - mean) / np.sqrt(var + a["epsilon"]) * inputs[1]
        if opt(2) is not None:
            y = y + inputs[2]
        return [y.astype(x.dtype)]
    if op == "scatter_nd":
        idx = np.asarray(inputs[1]).astype(np.int64)
        q = idx.shape[-1]
        sizes = np.array(x.shape[:q])
        if idx.size and ((idx < -sizes).any() or (idx >= sizes).any()):
            raise ShapeError(f"ScatterND node {node.name!r}: an index of {node.inputs[1]!r} is "
                             f"outside data {list(x.shape)}")
        y = x.copy()
        y[tuple(np.moveaxis(np.where(idx < 0, idx + sizes, idx), -1, 0))] = inputs[2]
        return [y]
    if op == "cumsum":
        axis = G.normalize_axis(int(np.asarray(inputs[1]).reshape(-1)[0]), x.ndim, node)
        y = np.flip(x, axis) if a.get("reverse", 0) else x
        acc = np.cumsum(y.astype(np.float64) if x.dtype.kind == "f" else y, axis=axis)
        if a.get("exclusive", 0):
            acc = acc - y
        acc = np.flip(acc, axis) if a.get("reverse", 0) else acc
        return [acc.astype(x.dtype)]
    if op == "trilu":
        return [np.where(G.trilu_mask(node, x.shape, inputs), x, np.zeros((), x.dtype))]
    if op == "channel_affine":
        shape = (-1,) + (1,) * (x.ndim - 2)
        return [(x * inputs[1].reshape(shape) + inputs[2].reshape(shape)).astype(x.dtype)]
    if op == "constant_of_shape":
        value = a.get("value", np.zeros(1, np.float32))
        return [np.full(tuple(int(d) for d in x), value.reshape(-1)[0], dtype=value.dtype)]
    if op == "range":
        start, limit, delta = (np.asarray(v).reshape(-1)[0] for v in inputs[:3])  # 1-element too
        return [np.arange(start, limit, delta).astype(np.result_type(x))]
    if op == "matmul":
        if x.dtype.kind == "f":
            return [np.matmul(x.astype(np.float64), inputs[1]).astype(x.dtype)]
        return [np.matmul(x, inputs[1])]
    if op == "gemm":
        A = x.T if a.get("transA", 0) else x
        B = inputs[1].T if a.get("transB", 0) else inputs[1]
        y = a.get("alpha", 1.0) * (A.astype(np.float64) @ B)
        if opt(2) is not None:
            shapes = [y.shape, np.shape(inputs[2])]
            G.broadcast_into_first(node, G.broadcast_shapes(shapes[0], shapes[1], node), shapes)
            y = y + a.get("beta", 1.0) * inputs[2]
        return [y.astype(x.dtype)]
    if op == "clip":
        lo = opt(1) if opt(1) is not None else -np.inf
        hi = opt(2) if opt(2) is not None else np.inf
        return [np.clip(x, lo, hi).astype(x.dtype)]
    if op == "batchnorm":
        scale, bias, mean, var = (t.astype(np.float64) for t in inputs[1:5])
        shape = (1, -1) + (1,) * (x.ndim - 2)
        inv = scale / np.sqrt(var + a["epsilon"])
        y = (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)
        return [y.astype(x.dtype)]
    raise UnsupportedOpError(f"no reference implementation for op {op!r} (node {node.name!r})",
                             [(op, node.name)])
