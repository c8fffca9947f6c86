"""The op builders of the drivers that run the shared kernel sources (OpenCL, CUDA), written once.

A builder receives the BuildContext, the node's resolved attributes, its operands and the output
buffer (see offload.device.OpBuilder) and returns the step callable. It reaches its device only
through the thin runtime every such driver provides:

    device.launch_1d(program, kernel, n, args, what, defines, source=None) -> callable
        one 1-D launch of ``kernel`` of kernels/<program> (or of the generated ``source``) over
        ``n`` work-items; ``args`` hold the driver's buffers (None: a null pointer) and NumPy
        scalars, converted by the driver (cl.Buffer / device pointer)
    ctx.weight(array) -> buffer, ctx.scratch(shape) -> buffer    (plan.BuildContext)

Matrix products stay with each driver (gemm.cl on OpenCL, cuBLAS on CUDA): ``conv2d``,
``dense`` and ``matmul`` come from the driver's ``products`` table.
"""

from __future__ import annotations

import math

import numpy as np

from .. import checks
from .. import elementwise as EW
from ._kernels import (ACTIVATIONS, BINARY_OPS, MAX_RANK, REDUCTIONS, _broadcast_strides,
                       _collapse, _contiguous_strides, _operand, _outer_r_inner, _pad_rank,
                       _sequence, _window_args)
from ..errors import UnsupportedOpError

i32, f32 = np.int32, np.float32


def launch(ctx, program, name, n, args, what, source=None, defines=None):
    """A 1-D launch of a kernel compiled for the plan's tensor storage (ctx.kernel_defines, or
    ``defines`` that extend them)."""
    if n == 0:
        return lambda: None
    return ctx.device.launch_1d(program, name, n, args, what,
                                ctx.kernel_defines if defines is None else defines, source)


def epilogue_args(attrs, driver="opencl"):
    fn = attrs.get("activation", attrs.get("fn", "identity"))
    if fn not in ACTIVATIONS:
        raise UnsupportedOpError(f"{driver}: unknown activation {fn!r}", [(fn, "")])
    return (i32(ACTIVATIONS[fn]), f32(attrs.get("alpha", 0.01)),
            f32(attrs.get("lo", -np.inf)), f32(attrs.get("hi", np.inf)))


def build_maxpool(ctx, attrs, ins, out):
    x = ins[0]
    args, _ = _window_args(attrs, x, out)
    total = out.size
    return launch(ctx, "pool.cl", "maxpool", total, (x, out, i32(total), *args), "maxpool")


def build_avgpool(ctx, attrs, ins, out):
    x = ins[0]
    args, (pb, pr) = _window_args(attrs, x, out)
    total = out.size
    return launch(ctx, "pool.cl", "avgpool", total,
                  (x, out, i32(total), *args, i32(pb), i32(pr),
                   i32(1 if attrs.get("count_include_pad", 0) else 0)), "avgpool")


def reduce_rows(ctx, x, y, outer, r, inner, fn):
    total = outer * inner
    return launch(ctx, "reduce.cl", "reduce_axis", total,
                  (x, y, i32(total), i32(r), i32(inner), i32(REDUCTIONS[fn])), "reduce")


def build_global_avgpool(ctx, attrs, ins, out):
    x = ins[0]
    n, c = x.shape[:2]
    return reduce_rows(ctx, x, out, n * c, math.prod(x.shape[2:]), 1, "mean")


def build_binary(op):
    def build(ctx, attrs, ins, out):
        a, b = (_operand(ctx, v) for v in ins)
        total = out.size
        if a.shape == b.shape == out.shape:
            return launch(ctx, "elementwise.cl", "binary_same", total,
                          (a, b, out, i32(total), i32(BINARY_OPS[op])), op)
        dims, sa, sb = _broadcast_strides(out.shape, a.shape, b.shape)
        return launch(ctx, "elementwise.cl", "binary_bcast", total,
                      (a, b, out, i32(total), i32(BINARY_OPS[op]),
                       *map(i32, dims), *map(i32, sa), *map(i32, sb)), op)
    return build


def build_activation(ctx, attrs, ins, out):
    x = ins[0]
    total = out.size
    return launch(ctx, "elementwise.cl", "activation", total,
                  (x, out, i32(total), *epilogue_args(attrs)), "activation")


def build_softmax(ctx, attrs, ins, out):
    x, axis = ins[0], attrs["axis"]
    outer, r, inner = _outer_r_inner(x.shape, (axis,))
    total = outer * inner
    first = None
    if "scale" in attrs:  # softmax(x * scale + bias) (plan fusion): a muladd into scratch
        b = _operand(ctx, ins[1])
        tmp = ctx.scratch(x.shape)
        scale = ctx.weight(np.array(attrs["scale"], np.float32), "softmax_scale")
        views = [(x, 0, _contiguous_strides(x.shape)), (scale, 0, [0] * x.ndim),
                 (b, 0, _broadcast_view(b.shape, x.shape))]
        first = elementwise(ctx, "muladd", [tmp], tmp.shape, views,
                            (tmp, 0, _contiguous_strides(tmp.shape)))
        x = tmp
    soft = launch(ctx, "reduce.cl", "softmax_axis", total,
                  (x, out, i32(total), i32(r), i32(inner)), "softmax")
    return soft if first is None else _sequence(first, soft)


build_softmax.scale_bias = True  # the plan may fuse a constant scale and a bias add into it


def gather6(ctx, x, y, out_shape, x_index_strides, lows, highs, value=0.0):
    """y[c] = x[sum (c_k - low_k) * s_k] where every c_k - low_k lies in [0, high_k), else
    ``value`` (gather6 in elementwise.cl)."""
    total = math.prod(out_shape)
    dims, strides, lo, _ = _pad_rank(list(out_shape), list(x_index_strides), list(lows),
                                     list(highs))
    hi = [1] * (MAX_RANK - len(out_shape)) + list(highs)
    return launch(ctx, "elementwise.cl", "gather6", total,
                  (x, y, i32(total), i32(0), f32(value), *map(i32, dims),
                   *map(i32, strides), *map(i32, lo), *map(i32, hi)), "gather")


def build_reduce(ctx, attrs, ins, out):
    x, axes = ins[0], tuple(attrs["axes"])
    if np.dtype(x.dtype) != np.dtype(ctx.storage):
        return _reduce_through_float(ctx, attrs, x, out)
    if not axes:
        return gather6(ctx, x, out, x.shape, _contiguous_strides(x.shape), [0] * x.ndim,
                       x.shape)
    if axes == tuple(range(axes[0], axes[-1] + 1)):
        outer, r, inner = _outer_r_inner(x.shape, axes)
        return reduce_rows(ctx, x, out, outer, r, inner, attrs["fn"])
    # reduced axes not adjacent: move them last (a transposed copy in scratch), then rows
    keep = [i for i in range(x.ndim) if i not in axes]
    perm = keep + list(axes)
    t_shape = tuple(x.shape[p] for p in perm)
    tmp = ctx.scratch(t_shape)
    xs = _contiguous_strides(x.shape)
    move = gather6(ctx, x, tmp, t_shape, [xs[p] for p in perm], [0] * x.ndim, t_shape)
    r = math.prod(x.shape[a] for a in axes)
    rows = reduce_rows(ctx, tmp, out, math.prod(t_shape) // max(r, 1), r, 1, attrs["fn"])
    return _sequence(move, rows)


def _reduce_through_float(ctx, attrs, x, out):
    """ReduceMax/Min of bool data (ONNX 20): cast to float scratch, reduce, cast back (exact
    for 0/1). Integer data: refused by name (float32 would round values past 2**24)."""
    dt = np.dtype(x.dtype)
    if dt.kind != "b":
        raise UnsupportedOpError(f"{ctx.device.spec}: Reduce{attrs['fn'].capitalize()} of "
                                 f"{dt.name} data (float and bool data on this device)",
                                 [("reduce", attrs.get("node", ""))])
    xf, yf = ctx.scratch(x.shape, slot=1), ctx.scratch(out.shape, slot=2)
    xs, ys = _contiguous_strides(x.shape), _contiguous_strides(out.shape)
    to_float = elementwise(ctx, "cast", [xf], x.shape, [(x, 0, xs)], (xf, 0, xs))
    reduce = build_reduce(ctx, attrs, [xf], yf)
    zero = _operand(ctx, _ZERO)
    # y > 0: also right over an empty set (max -inf -> False, min +inf -> True, as ONNX)
    back = elementwise(ctx, "greater", [out], out.shape,
                       [(yf, 0, ys), (zero, 0, [0] * len(ys))], (out, 0, ys))
    return _sequence(to_float, reduce, back)


_ZERO = np.zeros((), np.float32)


def build_pad(ctx, attrs, ins, out):
    x = ins[0]
    return gather6(ctx, x, out, out.shape, _contiguous_strides(x.shape), list(attrs["begin"]),
                   x.shape, float(attrs.get("value", 0.0)))


def build_transpose(ctx, attrs, ins, out):
    x, perm = _operand(ctx, ins[0]), attrs["perm"]
    xs = _contiguous_strides(x.shape)
    return elementwise(ctx, "copy", [out], out.shape, [(x, 0, [xs[p] for p in perm])],
                       (out, 0, _contiguous_strides(out.shape)))


def build_concat(ctx, attrs, ins, out):
    axis = attrs["axis"]
    ys = _contiguous_strides(out.shape)
    steps, offset = [], 0
    for part in ins:
        part = _operand(ctx, part)
        steps.append(elementwise(ctx, "copy", [out], part.shape,
                                 [(part, 0, _contiguous_strides(part.shape))],
                                 (out, offset * ys[axis], ys)))
        offset += part.shape[axis]
    return _sequence(*steps)


# ------------------------------------------------------------------------------ elementwise

def elementwise(ctx, fn, _outs, dims, views, out_view, params=()):
    """One generated kernel (elementwise.generate) computing ``fn`` over ``dims``: every operand
    and the output are strided views (buffer, element offset, strides over ``dims``)."""
    total = math.prod(dims)
    if total == 0:
        return lambda: None
    strides = [v[2] for v in views] + [out_view[2]]
    cdims, cstrides = _collapse(list(dims), *strides)
    if len(cdims) > MAX_RANK:
        raise UnsupportedOpError(f"{ctx.device.spec}: elementwise {fn} over {len(cdims)} "
                                 f"axes exceeds the kernels' {MAX_RANK}", [(fn, "")])
    pad = MAX_RANK - len(cdims)
    cdims = [1] * pad + cdims
    cstrides = [[0] * pad + s for s in cstrides]
    dtypes = [np.dtype(v[0].dtype) for v in views] + [np.dtype(out_view[0].dtype)]
    name, source = EW.generate(fn, dtypes[:-1], dtypes[-1], ctx.kernel_defines)
    args = [out_view[0], i32(out_view[1]), *map(i32, cstrides[-1])]
    for (buf, base, _), s in zip(views, cstrides[:-1]):
        args += [buf, i32(base), *map(i32, s)]
    p = list(params) + [0.0] * (2 - len(params))
    args += [i32(total), *map(i32, cdims), f32(p[0]), f32(p[1])]
    return launch(ctx, name, name, total, tuple(args), fn, source=source)


def build_elementwise(ctx, attrs, ins, out):
    ins = [_operand(ctx, v) for v in ins]
    views = [(x, 0, _broadcast_view(x.shape, out.shape)) for x in ins]
    return elementwise(ctx, attrs["fn"], [out], out.shape, views,
                       (out, 0, _contiguous_strides(out.shape)), EW.params(attrs))


def _broadcast_view(shape, out_shape):
    shape = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    return [0 if d == 1 and o != 1 else s
            for d, o, s in zip(shape, out_shape, _contiguous_strides(shape))]


def build_slice(ctx, attrs, ins, out):
    x = _operand(ctx, ins[0])
    xs = _contiguous_strides(x.shape)
    base = sum(s * st for s, st in zip(attrs["starts"], xs))
    strides = [st * step for st, step in zip(xs, attrs["steps"])]
    return elementwise(ctx, "copy", [out], out.shape, [(x, base, strides)],
                       (out, 0, _contiguous_strides(out.shape)))


def build_tile(ctx, attrs, ins, out):
    x = _operand(ctx, ins[0])
    reps = attrs["repeats"]
    dims = [d for r, s in zip(reps, x.shape) for d in (r, s)]
    xs = _contiguous_strides(x.shape)
    return elementwise(ctx, "copy", [out], dims, [(x, 0, [v for s in xs for v in (0, s)])],
                       (out, 0, _contiguous_strides(dims)))


SHARED = {
    "maxpool": build_maxpool,
    "avgpool": build_avgpool,
    "global_avgpool": build_global_avgpool,
    "add": build_binary("add"),
    "sub": build_binary("sub"),
    "mul": build_binary("mul"),
    "div": build_binary("div"),
    "activation": build_activation,
    "softmax": build_softmax,
    "concat": build_concat,
    "reduce": build_reduce,
    "pad": build_pad,
    "transpose": build_transpose,
    "elementwise": build_elementwise,
    "slice": build_slice,
    "tile": build_tile,
}


# ------------------------------------------------------------------------------ indices

_DATA_T = {"int64": "i64", "int32": "int", "bool": "u8"}  # index.cl's DATA_T per dtype


def _index_defines(ctx, x, idx=None, op=""):
    """The defines compiling index.cl for this data (float storage, int64, int32 or bool) and
    these indices (int64 or int32)."""
    defines = dict(ctx.kernel_defines)
    dt = np.dtype(x.dtype)
    if dt != np.dtype(ctx.storage):
        if dt.name not in _DATA_T:
            raise UnsupportedOpError(f"{ctx.device.spec}: {op} of {dt.name} data (float "
                                     "storage, int64, int32 and bool on this device)", [(op, "")])
        defines["DATA_T"] = _DATA_T[dt.name]
    if idx is not None and np.dtype(idx.dtype) == np.int32:
        defines["INDEX_T"] = "int"
    return defines


def _indices(ctx, idx):
    if isinstance(idx, np.ndarray):
        return ctx.weight(idx, "int64", lambda a: a.astype(np.int64))
    if np.dtype(idx.dtype) not in (np.dtype(np.int64), np.dtype(np.int32)):
        raise UnsupportedOpError(f"{ctx.device.spec}: run-time indices of dtype "
                                 f"{np.dtype(idx.dtype).name} (int64 and int32 only)",
                                 [("gather", "")])
    return idx


def _flag(ctx, attrs, op, idx, axis_size):
    """(flag buffer, slot) for an index kernel: the kernel writes the flat position + 1 of an
    index outside its axis; after the run the plan reads the flags and raises a ShapeError
    naming the node, the index value and position and the axis size (``axis_size(position)``
    -> (axis, size)). The index value is read back only then."""
    device = ctx.device

    def describe(position):
        host = np.empty(idx.shape, np.dtype(idx.dtype))
        device.copy_out(host, idx)
        axis, size = axis_size(position)
        return checks.index_message(op, attrs.get("node", ""), int(host.reshape(-1)[position]),
                             np.unravel_index(position, idx.shape) if idx.shape else (),
                             axis, size)
    return ctx.index_flag(describe)


def build_gather(ctx, attrs, ins, out):
    x, idx = _operand(ctx, ins[0]), _indices(ctx, ins[1])
    defines = _index_defines(ctx, x, idx, "Gather")
    axis = attrs["axis"]
    inner = math.prod(x.shape[axis + 1:])
    total = out.size
    err, slot = _flag(ctx, attrs, "Gather", idx, lambda p: (axis, x.shape[axis]))
    return launch(ctx, "index.cl", "gather_axis", total,
                  (x, idx, out, i32(total), i32(x.shape[axis]), i32(max(idx.size, 1)),
                   i32(inner), err, i32(slot)), "gather", defines=defines)


def build_gather_elements(ctx, attrs, ins, out):
    x, idx = _operand(ctx, ins[0]), _indices(ctx, ins[1])
    defines = _index_defines(ctx, x, idx, "GatherElements")
    axis, pad = attrs["axis"], MAX_RANK - x.ndim
    dims, strides = _pad_rank(list(out.shape), _contiguous_strides(x.shape))
    total = out.size
    err, slot = _flag(ctx, attrs, "GatherElements", idx, lambda p: (axis, x.shape[axis]))
    return launch(ctx, "index.cl", "gather_elements6", total,
                  (x, idx, out, i32(total), i32(axis + pad), i32(x.shape[axis]),
                   *map(i32, dims), *map(i32, strides), err, i32(slot)), "gather_elements",
                  defines=defines)


def build_topk(ctx, attrs, ins, out):
    x = _operand(ctx, ins[0])
    defines = _index_defines(ctx, x, None, "TopK")
    outer, r, inner = _outer_r_inner(x.shape, (attrs["axis"],))
    total = outer * inner
    return launch(ctx, "index.cl", "topk_indices", total,
                  (x, out, i32(total), i32(r), i32(attrs["k"]), i32(inner),
                   i32(attrs.get("largest", 1))), "topk", defines=defines)


def _nd_args(x, q):
    sizes = list(x.shape[:q]) + [1] * (MAX_RANK - q)
    weights = [math.prod(x.shape[j + 1:q]) for j in range(q)] + [0] * (MAX_RANK - q)
    return sizes, weights


def build_gather_nd(ctx, attrs, ins, out):
    x, idx = _operand(ctx, ins[0]), _indices(ctx, ins[1])
    defines = _index_defines(ctx, x, idx, "GatherND")
    q = idx.shape[-1]
    inner = math.prod(x.shape[q:])
    sizes, weights = _nd_args(x, q)
    total = out.size
    err, slot = _flag(ctx, attrs, "GatherND", idx, lambda p: (p % q, x.shape[p % q]))
    return launch(ctx, "index.cl", "gather_nd", total,
                  (x, idx, out, i32(total), i32(max(inner, 1)), i32(q), *map(i32, sizes),
                   *map(i32, weights), err, i32(slot)), "gather_nd", defines=defines)


def build_cumsum(ctx, attrs, ins, out):
    x = _operand(ctx, ins[0])
    defines = _index_defines(ctx, x, None, "CumSum")
    outer, r, inner = _outer_r_inner(x.shape, (attrs["axis"],))
    total = outer * inner
    return launch(ctx, "index.cl", "cumsum_axis", total,
                  (x, out, i32(total), i32(r), i32(inner), i32(attrs.get("exclusive", 0)),
                   i32(attrs.get("reverse", 0))), "cumsum", defines=defines)


def build_scatter_nd(ctx, attrs, ins, out):
    x, idx, u = _operand(ctx, ins[0]), _indices(ctx, ins[1]), _operand(ctx, ins[2])
    defines = _index_defines(ctx, x, idx, "ScatterND")
    q = idx.shape[-1]
    inner = math.prod(x.shape[q:])
    sizes, weights = _nd_args(x, q)
    xs = _contiguous_strides(x.shape)
    copy = elementwise(ctx, "copy", [out], x.shape, [(x, 0, xs)], (out, 0, xs))
    total = u.size
    err, slot = _flag(ctx, attrs, "ScatterND", idx, lambda p: (p % q, x.shape[p % q]))
    scatter = launch(ctx, "index.cl", "scatter_nd", total,
                     (idx, u, out, i32(total), i32(max(inner, 1)), i32(q), *map(i32, sizes),
                      *map(i32, weights), err, i32(slot)), "scatter_nd", defines=defines)
    return _sequence(copy, scatter)


def build_layernorm(ctx, attrs, ins, out):
    x, scale = _operand(ctx, ins[0]), ctx.weight(ins[1])
    bias = ctx.weight(ins[2]) if len(ins) > 2 else None
    rows = attrs["rows"]
    return launch(ctx, "reduce.cl", "layernorm_rows", rows,
                  (x, scale, bias, out, i32(rows), i32(attrs["size"]), f32(attrs["epsilon"])),
                  "layernorm")


SHARED.update(layernorm=build_layernorm, scatter_nd=build_scatter_nd, cumsum=build_cumsum, gather_nd=build_gather_nd, gather=build_gather, gather_elements=build_gather_elements, topk=build_topk)


# ------------------------------------------------------------------------------ recurrent layers

def rnn_weights(attrs, ins):
    """The operands of an rnn node by role and its sizes (T, B, I, D, H, G); shared with the
    cpu device. ``attrs["constant_weights"]`` (passes.lower) says W, R, B and P are constants:
    re-laid out once; else they are copied into that layout on every run."""
    roles = attrs["roles"]
    get = {role: ins[k] for k, role in enumerate(roles)}
    t, b, i = get["x"].shape
    d, gh, _ = get["w"].shape
    h = get["r"].shape[2]
    return get, (t, b, i, d, h, gh // h)


def _weight_t(ctx, attrs, w, rows, tag, slot):
    """W/R [D, N, K] rows ``rows`` as [D, K, len(rows)] (transposed): (buffer, refresh step or
    None): a constant once, a run-time tensor copied on every run."""
    d, n, k = w.shape
    r0, r1 = rows
    if attrs.get("constant_weights"):
        return ctx.weight(w, tag, lambda a: np.transpose(a[:, r0:r1], (0, 2, 1)).astype(f32)), \
            None
    out = ctx.scratch((d, k, r1 - r0), slot=slot)
    step = elementwise(ctx, "copy", [out], (d, k, r1 - r0), [(w, r0 * k, [n * k, 1, k])],
                       (out, 0, _contiguous_strides((d, k, r1 - r0))))
    return out, step


def build_rnn(ctx, attrs, ins, out):
    """LSTM/GRU on the kernel devices: X @ W^T of every step as one batched product (the
    driver's matmul), then per step the recurrent product h @ R^T (matmul) and one fused gate
    kernel of rnn.cl; only enqueues, no synchronisation per step. Run-time sequence lengths
    stay on the device (no host read: CUDA plans are captured graphs): one outside [0, T]
    gives NaN outputs for its row (as index.cl's out-of-range indices), where the cpu device
    raises a ShapeError; constant lengths are checked at load on every device."""
    spec = ctx.device.spec
    get, (t, b, i, d, h, g) = rnn_weights(attrs, ins)
    cell, matmul = attrs["cell"], ctx.device.ops["matmul"]
    lbr = cell == "gru" and attrs.get("linear_before_reset", 0)
    dir_code = i32({"forward": 0, "reverse": 1, "bidirectional": 2}[attrs["direction"]])
    clip = f32(attrs.get("clip", 0.0))
    gh = g * h
    x = _operand(ctx, get["x"])
    wt, refresh_w = _weight_t(ctx, attrs, get["w"], (0, gh), "rnn_wt", 17)
    bias = _operand(ctx, get["b"] if "b" in get else np.zeros((d, 2 * gh), f32))
    p = _operand(ctx, get["p"]) if "p" in get else None
    lens = get.get("seq")
    if isinstance(lens, np.ndarray):
        lens = ctx.weight(lens, "int32", lambda a: a.astype(np.int32))
    h0 = _operand(ctx, get["h0"]) if "h0" in get else None
    c0 = _operand(ctx, get["c0"]) if "c0" in get else None
    total = d * b * h
    xw = ctx.scratch((d, t * b, gh), slot=10)
    hs = ctx.scratch((d, b, h), slot=11)
    cs = ctx.scratch((d, b, h), slot=12) if cell == "lstm" else None
    steps = [refresh_w]
    if lens is not None and np.dtype(lens.dtype) != np.int32:
        raise UnsupportedOpError(f"{spec}: sequence_lens of dtype {np.dtype(lens.dtype).name} "
                                 "(int32, as ONNX defines it)", [(cell.upper(), "")])
    if t * b:
        steps.append(matmul(ctx, {}, [x.reshape(1, t * b, i), wt], xw))
    steps.append(launch(ctx, "rnn.cl", "rnn_init", total, (h0, c0, hs, cs, i32(total)),
                        "rnn init"))
    shape = (i32(total), i32(t), i32(b), i32(h), i32(d), dir_code)
    if cell == "lstm" or lbr:
        rt, refresh_r = _weight_t(ctx, attrs, get["r"], (0, gh), "rnn_rt", 18)
        steps.insert(0, refresh_r)
        gates = ctx.scratch((d, b, gh), slot=13)
        product = matmul(ctx, {}, [hs, rt], gates)
        for s in range(t):
            if cell == "lstm":
                gate = launch(ctx, "rnn.cl", "lstm_step", total,
                              (xw, gates, bias, p, lens, hs, cs, out, *shape, i32(s), clip,
                               i32(attrs.get("input_forget", 0))), "lstm step")
            else:
                gate = launch(ctx, "rnn.cl", "gru_step", total,
                              (xw, gates, bias, lens, hs, out, *shape, i32(s), clip), "gru step")
            steps += [product, gate]
    else:  # GRU, linear_before_reset = 0: (r * h) @ R_h^T needs r first
        rt_zr, refresh_zr = _weight_t(ctx, attrs, get["r"], (0, 2 * h), "rnn_rt_zr", 18)
        rt_h, refresh_h = _weight_t(ctx, attrs, get["r"], (2 * h, 3 * h), "rnn_rt_h", 19)
        steps[:0] = [refresh_zr, refresh_h]
        gates = ctx.scratch((d, b, 2 * h), slot=13)
        zs, rh, ghs = (ctx.scratch((d, b, h), slot=k) for k in (14, 15, 16))
        first, second = matmul(ctx, {}, [hs, rt_zr], gates), matmul(ctx, {}, [rh, rt_h], ghs)
        for s in range(t):
            steps += [first,
                      launch(ctx, "rnn.cl", "gru_reset", total,
                             (xw, gates, bias, lens, hs, zs, rh, out, *shape, i32(s), clip),
                             "gru reset"),
                      second,
                      launch(ctx, "rnn.cl", "gru_update", total,
                             (xw, ghs, bias, lens, zs, hs, out, *shape, i32(s), clip),
                             "gru update")]
    steps.append(launch(ctx, "rnn.cl", "rnn_final", total,
                        (hs, cs, lens, out, i32(total), i32(t), i32(b), i32(h)), "rnn final"))
    return _sequence(*steps)


SHARED["rnn"] = build_rnn
