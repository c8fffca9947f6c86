"""The intermediate representation: a graph of IR ops on named tensors, and its shape rules.

Tensors carry NCHW semantics as ONNX does; a device may pick another layout inside its ops. Shapes
are concrete tuples at plan time; at load time the batch axis and other free axes are names (str).

IR ops run on devices (each device's op table implements them):
    conv2d, dense, maxpool, avgpool, global_avgpool, add, sub, mul, div, concat, activation,
    softmax, reduce, pad, transpose, elementwise (a row of offload.elementwise.TABLE, operands
    broadcast), slice, tile, matmul (two run-time operands, batch axes broadcast), gather,
    gather_elements, topk (the indices; values are a gather_elements of them),
    rnn (LSTM/GRU, see rnn_dims)
View ops share their input's memory (no kernel): reshape, flatten, squeeze, unsqueeze, identity.
Plan-time ops are rewritten into device ops once the input shapes are known: expand (an
elementwise copy), split_part (a slice), cast (an elementwise cast, or nothing),
channel_affine (x * scale + shift per channel of axis 1: an elementwise muladd), trilu (an
elementwise where with a constant triangle mask).
Host ops only ever see constants and are evaluated once (at load, or at plan time when they
depend on an input's shape): shape, cast, constant_of_shape, range, batchnorm inputs of
folding, and every device op above when all its inputs are constants.

Host steps (HOST_STEP_OPS: nonzero, if) and any node whose parameters (axes, shapes, k, pads,
repeats) or host-op inputs come from run-time values split the plan there: the device runs up
to it, the host reads the values it needs, and a plan of the rest is made for those values
(plan.HostSplit, plan.StagedRun).

Tensors are float32 (stored in the plan's precision), int64, int32 or bool (``infer_dtype``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ShapeError, UnsupportedOpError

DEVICE_OPS = frozenset({
    "conv2d", "dense", "maxpool", "avgpool", "global_avgpool", "add", "sub", "mul", "div",
    "concat", "activation", "softmax", "reduce", "pad", "transpose", "elementwise", "slice",
    "tile", "matmul", "gather", "gather_elements", "gather_nd", "topk", "cumsum",
    "scatter_nd", "layernorm", "rnn",
})
VIEW_OPS = frozenset({"reshape", "flatten", "squeeze", "unsqueeze", "identity"})
PLAN_OPS = frozenset({"expand", "split_part", "cast", "channel_affine", "trilu"})
HOST_OPS = frozenset({"shape", "constant_of_shape", "range", "batchnorm"})
# Host steps: ops whose output shape depends on values (nonzero), or that pick a subgraph by a
# value (if: attrs "then"/"else" hold (nodes, output names) of each branch; its inputs are the
# condition and every outer tensor the branches read). The plan runs them on the host between
# two device segments (plan.HostSplit), or folds them when their inputs are known.
HOST_STEP_OPS = frozenset({"nonzero", "if"})
# Inputs that parameterise an op (axes, shapes, repeats, pads, k...): they must be known when
# the plan is made (constants, or computed from input shapes), never values from the data.
PARAM_INPUTS = {"reduce": (1,), "unsqueeze": (1,), "squeeze": (1,), "tile": (1,), "expand": (1,),
                "reshape": (1,), "pad": (1, 2, 3), "slice": (1, 2, 3, 4), "topk": (1,),
                "split_part": (1,), "constant_of_shape": (0,), "range": (0, 1, 2),
                "cumsum": (1,), "trilu": (1,)}
ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "clip", "identity")


@dataclass
class TensorInfo:
    """A graph input: name, shape (ints and axis names) and NumPy dtype."""

    name: str
    shape: tuple
    dtype: np.dtype = np.dtype(np.float32)

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"[{dims}] {np.dtype(self.dtype).name}"


@dataclass
class Node:
    """One IR op. ``inputs`` may hold "" for an absent optional input."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""
    source_op: str = ""  # the ONNX op type it came from, for messages

    def __repr__(self) -> str:
        return f"Node({self.op} {self.name!r}: {self.inputs} -> {self.outputs} {self.attrs})"


@dataclass
class Graph:
    """Nodes in topological order, graph inputs, output names and constant tensors."""

    nodes: list[Node]
    inputs: list[TensorInfo]
    outputs: list[str]
    constants: dict[str, np.ndarray]
    name: str = "model"

    def consumers(self) -> dict[str, list[Node]]:
        uses: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    uses.setdefault(name, []).append(node)
        return uses

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}


# ---------------------------------------------------------------------------------------------
# Shape rules (concrete shapes). Each takes the node, the input shapes and the values of the
# inputs that are constants (None where not), and returns the output shape.

def conv_output_hw(in_hw, kernel, strides, pads, dilations, ceil_mode=False):
    out = []
    for i in range(2):
        span = dilations[i] * (kernel[i] - 1) + 1
        total = in_hw[i] + pads[i] + pads[i + 2] - span
        rounding = math.ceil if ceil_mode else math.floor
        o = rounding(total / strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= in_hw[i] + pads[i]:
            o -= 1  # the last window must start inside the input or its leading pad
        out.append(int(o))
    return tuple(out)


def resolve_auto_pad(auto_pad, in_hw, kernel, strides, dilations):
    """Turn ONNX auto_pad into explicit (top, left, bottom, right) pads."""
    if auto_pad in ("VALID",):
        return (0, 0, 0, 0)
    begin, end = [], []
    for i in range(2):
        out = math.ceil(in_hw[i] / strides[i])
        span = dilations[i] * (kernel[i] - 1) + 1
        total = max(0, (out - 1) * strides[i] + span - in_hw[i])
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def window_attrs(node: Node, x_shape) -> dict:
    """Conv/pool attributes with auto_pad resolved for a concrete input shape."""
    a = dict(node.attrs)
    if a.get("auto_pad") not in (None, "NOTSET"):
        a["pads"] = resolve_auto_pad(a["auto_pad"], x_shape[2:], a["kernel"], a["strides"],
                                     a["dilations"])
    a["auto_pad"] = "NOTSET"
    return a


def normalize_axis(axis: int, rank: int, node: Node) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"{node.op} node {node.name!r}: axis {axis} is out of range for rank {rank}")
    return axis % rank


def broadcast_shapes(a, b, node: Node):
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        names = " and ".join(repr(i) for i in node.inputs if i)
        raise ShapeError(f"{node.source_op or node.op} node {node.name!r}: shapes {list(a)} and "
                         f"{list(b)} do not broadcast (inputs {names})") from None


def reshape_target(node: Node, x_shape, target) -> tuple:
    target = [int(t) for t in np.asarray(target).reshape(-1)]
    allowzero = node.attrs.get("allowzero", 0)
    out = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero:
            if i >= len(x_shape):
                raise ShapeError(f"Reshape node {node.name!r}: 0 at position {i} but input has "
                                 f"rank {len(x_shape)}")
            out.append(x_shape[i])
        else:
            out.append(t)
    size = math.prod(x_shape)
    if out.count(-1) > 1:
        raise ShapeError(f"Reshape node {node.name!r}: more than one -1 in target {target}")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or size % known:
            raise ShapeError(f"Reshape node {node.name!r}: cannot reshape {list(x_shape)} to "
                             f"{target}")
        out[out.index(-1)] = size // known
    if math.prod(out) != size:
        raise ShapeError(f"Reshape node {node.name!r}: cannot reshape {list(x_shape)} "
                         f"({size} elements) to {out}")
    return tuple(out)


def unsqueeze_shape(x_shape, axes):
    rank = len(x_shape) + len(axes)
    axes = sorted(a % rank for a in axes)
    out = list(x_shape)
    for a in axes:
        out.insert(a, 1)
    return tuple(out)


def squeeze_shape(x_shape, axes, node: Node):
    if axes is None:
        return tuple(d for d in x_shape if d != 1)
    axes = {normalize_axis(a, len(x_shape), node) for a in axes}
    for a in axes:
        if x_shape[a] != 1:
            raise ShapeError(f"Squeeze node {node.name!r}: axis {a} has size {x_shape[a]}, not 1")
    return tuple(d for i, d in enumerate(x_shape) if i not in axes)


def reduce_axes(node: Node, rank: int, axes_value):
    """The axes a reduce node reduces, as a sorted tuple (empty tuple: identity)."""
    axes = node.attrs.get("axes")
    if node.attrs.get("from_axis") is not None:  # LayerNormalization: axis .. rank - 1
        axes = range(normalize_axis(node.attrs["from_axis"], rank, node), rank)
    if axes is None and axes_value is not None:
        axes = [int(a) for a in np.asarray(axes_value).reshape(-1)]
    if axes is None or len(axes) == 0:
        if node.attrs.get("noop_with_empty_axes", 0):
            return ()
        return tuple(range(rank))
    return tuple(sorted(normalize_axis(a, rank, node) for a in axes))


def pad_amounts(node: Node, rank: int, pads_value, axes_value):
    """(begin, end) pad per axis for a pad node."""
    pads = node.attrs.get("pads")
    if pads is None:
        pads = [int(p) for p in np.asarray(pads_value).reshape(-1)]
    if axes_value is not None:
        axes = [normalize_axis(int(a), rank, node) for a in np.asarray(axes_value).reshape(-1)]
    else:
        axes = list(range(rank))
    if len(pads) != 2 * len(axes):
        raise ShapeError(f"Pad node {node.name!r}: expected {2 * len(axes)} pad values for "
                         f"rank {rank}, got {len(pads)}")
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + len(axes)]
    return begin, end


def broadcast_into_first(node: Node, out: tuple, shapes: list) -> tuple:
    """``out``, checked to be the first operand's shape where the node says its other operands
    broadcast into it only (attrs into_first: Gemm's C, unidirectionally broadcastable to
    [M, N], where NumPy's two-way broadcasting would grow the product)."""
    if (node.attrs.get("into_first") or node.op == "gemm") and tuple(out) != tuple(shapes[0]):
        raise ShapeError(f"{node.source_op or node.op} node {node.name!r}: "
                         f"{[list(s) for s in shapes[1:]]} does not broadcast to "
                         f"{list(shapes[0])} (the product's shape)")
    return tuple(out)


def infer_shape(node: Node, shapes: list, values: list) -> tuple:
    """Output shape of a device or view op, given concrete input shapes and constant values."""
    op, a = node.op, node.attrs
    x = shapes[0] if shapes else None
    if op in ("conv2d", "maxpool", "avgpool"):
        if len(x) != 4:
            raise ShapeError(f"{op} node {node.name!r}: expected a 4-D [N, C, H, W] input, got "
                             f"shape {list(x)}")
        w = window_attrs(node, x)
        hw = conv_output_hw(x[2:], w["kernel"], w["strides"], w["pads"], w["dilations"],
                            w.get("ceil_mode", 0))
        if min(hw) <= 0:
            raise ShapeError(f"{op} node {node.name!r}: input {list(x)} is smaller than the "
                             f"window {list(w['kernel'])}")
        if op == "conv2d":
            wshape = shapes[1]
            if x[1] != wshape[1] * a["groups"]:
                raise ShapeError(f"Conv node {node.name!r}: expected {wshape[1] * a['groups']} "
                                 f"input channels, got shape {list(x)}")
            return (x[0], wshape[0]) + hw
        return (x[0], x[1]) + hw
    if op == "dense":
        k = shapes[1][0]
        if x[-1] != k:
            raise ShapeError(f"dense node {node.name!r}: expected last axis {k}, got shape "
                             f"{list(x)}")
        return tuple(x[:-1]) + (shapes[1][1],)
    if op == "global_avgpool":
        return tuple(x[:2]) + (1,) * (len(x) - 2)
    if op in ("add", "sub", "mul", "div"):
        return broadcast_into_first(node, broadcast_shapes(shapes[0], shapes[1], node), shapes)
    if op in ("activation", "softmax", "identity"):
        if op == "softmax":
            normalize_axis(a["axis"], len(x), node)
        return tuple(x)
    if op == "concat":
        axis = normalize_axis(a["axis"], len(x), node)
        for s in shapes[1:]:
            if len(s) != len(x) or any(s[i] != x[i] for i in range(len(x)) if i != axis):
                raise ShapeError(f"Concat node {node.name!r}: shapes {[list(s) for s in shapes]} "
                                 f"differ outside axis {axis}")
        return tuple(x[:axis]) + (sum(s[axis] for s in shapes),) + tuple(x[axis + 1:])
    if op == "reduce":
        axes = reduce_axes(node, len(x), values[1] if len(values) > 1 else None)
        if a.get("keepdims", 1):
            return tuple(1 if i in axes else d for i, d in enumerate(x))
        return tuple(d for i, d in enumerate(x) if i not in axes)
    if op == "pad":
        begin, end = pad_amounts(node, len(x), values[1] if len(values) > 1 else None,
                                 values[3] if len(values) > 3 else None)
        return tuple(d + b + e for d, b, e in zip(x, begin, end))
    if op == "transpose":
        perm = a.get("perm") or tuple(reversed(range(len(x))))
        if sorted(perm) != list(range(len(x))):
            raise ShapeError(f"Transpose node {node.name!r}: perm {list(perm)} does not fit "
                             f"shape {list(x)}")
        return tuple(x[p] for p in perm)
    if op == "reshape":
        if values[1] is None:
            raise ShapeError(f"Reshape node {node.name!r}: the target shape is computed from "
                             "data at run time; only shapes known before the run are supported")
        return reshape_target(node, x, values[1])
    if op == "flatten":
        axis = a.get("axis", 1)  # in [-r, r]; a negative axis counts from r, not r + 1
        axis = (axis + len(x) if axis < 0 else axis) if x else 0
        return (math.prod(x[:axis]), math.prod(x[axis:]))
    if op == "unsqueeze":
        axes = a.get("axes")
        if axes is None:
            axes = [int(v) for v in np.asarray(values[1]).reshape(-1)]
        return unsqueeze_shape(x, axes)
    if op == "squeeze":
        axes = a.get("axes")
        if axes is None and len(values) > 1 and values[1] is not None:
            axes = [int(v) for v in np.asarray(values[1]).reshape(-1)]
        return squeeze_shape(x, axes, node)
    if op == "elementwise" or op == "expand":
        out = tuple(x)
        for s in shapes[1:] if op == "elementwise" else [tuple(int(v) for v in
                                                             np.asarray(values[1]).reshape(-1))]:
            out = broadcast_shapes(out, s, node)
        return broadcast_into_first(node, out, shapes)
    if op == "slice":
        return slice_params(node, x, values)[2]
    if op == "split_part":
        begin, end = split_range(node, x, values)
        axis = normalize_axis(a["axis"], len(x), node)
        return tuple(x[:axis]) + (end - begin,) + tuple(x[axis + 1:])
    if op == "tile":
        reps = [int(v) for v in np.asarray(values[1]).reshape(-1)]
        if len(reps) != len(x):
            raise ShapeError(f"Tile node {node.name!r}: {len(reps)} repeats for input shape "
                             f"{list(x)} (rank {len(x)})")
        return tuple(d * r for d, r in zip(x, reps))
    if op == "scatter_nd":
        i, u = shapes[1], shapes[2]
        q = i[-1] if i else 0
        if not i or q > len(x) or tuple(u) != tuple(i[:-1]) + tuple(x[q:]):
            raise ShapeError(f"ScatterND node {node.name!r}: indices {list(i)} and updates "
                             f"{list(u)} do not fit data {list(x)}")
        return tuple(x)
    if op in ("cast", "cumsum", "trilu", "layernorm"):
        if op == "trilu" and len(x) < 2:
            raise ShapeError(f"Trilu node {node.name!r}: input {list(x)} has rank < 2")
        return tuple(x)
    if op == "rnn":
        d = rnn_dims(node, shapes)
        return (d["T"] + d["extra"], d["D"], d["B"], d["H"])
    if op == "matmul":
        a_shape, b_shape = shapes[0], shapes[1]
        ka = a_shape[-1]
        kb = b_shape[-2] if len(b_shape) > 1 else b_shape[0]
        if ka != kb or not a_shape or not b_shape:
            raise ShapeError(f"MatMul node {node.name!r}: inner axes differ: {list(a_shape)} @ "
                             f"{list(b_shape)}")
        batch = broadcast_shapes(a_shape[:-2], b_shape[:-2], node)
        return batch + tuple(a_shape[-2:-1]) + tuple(b_shape[-1:] if len(b_shape) > 1 else ())
    if op == "gather":
        axis = normalize_axis(a.get("axis", 0), len(x), node)
        return tuple(x[:axis]) + tuple(shapes[1]) + tuple(x[axis + 1:])
    if op == "gather_elements":
        i = shapes[1]
        axis = normalize_axis(a.get("axis", 0), len(x), node)
        if len(i) != len(x) or any(i[d] > x[d] for d in range(len(x)) if d != axis):
            raise ShapeError(f"GatherElements node {node.name!r}: indices {list(i)} do not fit "
                             f"data {list(x)} outside axis {axis}")
        return tuple(i)
    if op == "gather_nd":
        i = shapes[1]
        q = i[-1] if i else 0
        if not i or q > len(x) or a.get("batch_dims", 0):
            raise ShapeError(f"GatherND node {node.name!r}: indices {list(i)} do not index "
                             f"data {list(x)}")
        return tuple(i[:-1]) + tuple(x[q:])
    if op == "topk":
        axis = normalize_axis(a.get("axis", -1), len(x), node)
        k = topk_k(node, values)
        if k > x[axis] or k < 0:
            raise ShapeError(f"TopK node {node.name!r}: k = {k} but axis {axis} of input "
                             f"{node.inputs[0]!r} {list(x)} has {x[axis]} elements")
        return tuple(x[:axis]) + (k,) + tuple(x[axis + 1:])
    raise ShapeError(f"no shape rule for op {op!r} (node {node.name!r})")


def inline_branch(node: Node, cond) -> list[Node]:
    """The nodes an ``if`` node becomes once its condition is known: copies of the chosen
    branch's nodes, then identities from the branch's outputs to the If's."""
    nodes, outputs = node.attrs["then" if bool(np.asarray(cond).reshape(-1)[0]) else "else"]
    out = [Node(n.op, list(n.inputs), list(n.outputs), dict(n.attrs), n.name, n.source_op)
           for n in nodes]
    out += [Node("identity", [b], [o], {}, node.name, node.source_op)
            for b, o in zip(outputs, node.outputs) if o]
    return out


def branch_reads(branches) -> list[str]:
    """The outer tensors the branches of an ``if`` read (names read, not produced inside),
    nested Ifs included."""
    reads = []
    for nodes, outputs in branches:
        made = set()
        for n in nodes:
            reads += [i for i in n.inputs if i and i not in made]
            made.update(n.outputs)
        reads += [o for o in outputs if o not in made]
    return list(dict.fromkeys(reads))


# ---------------------------------------------------------------------------------------------
# rnn: one LSTM or GRU layer in layout 0 (onnx_import makes layout 1 from transposes). Inputs are
# the present ones of X [T, B, I], W [D, G*H, I], R [D, G*H, H], B [D, 2*G*H], sequence_lens [B],
# initial_h [D, B, H], initial_c [D, B, H], P [D, 3*H] (LSTM), named by attrs["roles"]; G gates
# (LSTM 4: i, o, f, c; GRU 3: z, r, h). The output packs Y (rows 0..T-1), Y_h (row T) and, for
# LSTM, Y_c (row T + 1): [T + 1 (+1), D, B, H].

RNN_GATES = {"lstm": 4, "gru": 3}


def rnn_input(node: Node, role: str, items):
    """The item of ``items`` (parallel to node.inputs) for input ``role``, or None."""
    roles = node.attrs.get("roles", ())
    return items[roles.index(role)] if role in roles and roles.index(role) < len(items) else None


def rnn_dims(node: Node, shapes) -> dict:
    """T, B, I, D, H, G (gates) and extra (rows after Y) of an rnn node from its shapes."""
    a = node.attrs
    x, r = rnn_input(node, "x", shapes), rnn_input(node, "r", shapes)
    g = RNN_GATES[a["cell"]]
    h = a.get("hidden", r[2] if r is not None and len(r) == 3 else None)
    return {"T": x[0], "B": x[1], "I": x[2], "D": 2 if a["direction"] == "bidirectional" else 1,
            "H": h, "G": g, "extra": 2 if a["cell"] == "lstm" else 1}


def trilu_mask(node: Node, x, values) -> np.ndarray:
    """The bool [rows, cols] mask of the elements a Trilu node keeps."""
    k = int(np.asarray(values[1]).reshape(-1)[0]) if len(values) > 1 and values[1] is not None \
        else 0
    ones = np.ones(tuple(x[-2:]), np.bool_)
    return np.triu(ones, k) if node.attrs.get("upper", 1) else np.tril(ones, k)


def topk_k(node: Node, values) -> int:
    if len(values) < 2 or values[1] is None:
        raise ShapeError(f"TopK node {node.name!r}: k is computed from data at run time; only "
                         "a k known before the run is supported")
    return int(np.asarray(values[1]).reshape(-1)[0])


def slice_params(node: Node, x, values):
    """(starts, steps, out shape) per axis of a slice node on shape ``x`` (ONNX clamping)."""
    if any(v is None for v in values[1:3]) or any(
            len(values) > i and node.inputs[i] and values[i] is None for i in (3, 4)):
        raise ShapeError(f"Slice node {node.name!r}: starts, ends, axes and steps must be known "
                         "before the run")
    starts = [int(v) for v in np.asarray(values[1]).reshape(-1)]
    ends = [int(v) for v in np.asarray(values[2]).reshape(-1)]
    axes = values[3] if len(values) > 3 and values[3] is not None else range(len(starts))
    axes = [normalize_axis(int(v), len(x), node) for v in np.asarray(axes).reshape(-1)]
    steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
    steps = [int(v) for v in np.asarray(steps).reshape(-1)]
    first, step, out = [0] * len(x), [1] * len(x), list(x)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise ShapeError(f"Slice node {node.name!r}: step 0 on axis {ax}")
        r = range(x[ax])[slice(s, e, st)]
        first[ax], step[ax], out[ax] = (r.start if len(r) else 0), st, len(r)
    return first, step, tuple(out)


def split_range(node: Node, x, values) -> tuple[int, int]:
    """[begin, end) along the axis of part ``part`` of a split into ``parts``."""
    a = node.attrs
    axis = normalize_axis(a["axis"], len(x), node)
    sizes = a.get("sizes")
    if sizes is None and len(values) > 1 and values[1] is not None:
        sizes = [int(v) for v in np.asarray(values[1]).reshape(-1)]
    n = x[axis]
    if sizes is None:
        parts = a["parts"]
        chunk = -(-n // parts)  # opset 18 num_outputs: ceil; older even splits agree
        sizes = [max(0, min(chunk, n - i * chunk)) for i in range(parts)]
        if a.get("even") and n % parts:
            raise ShapeError(f"Split node {node.name!r}: axis {axis} of size {n} does not split "
                             f"into {parts} equal parts")
    if sum(sizes) != n or len(sizes) != a["parts"]:
        raise ShapeError(f"Split node {node.name!r}: sizes {list(sizes)} do not split axis "
                         f"{axis} of size {n} into {a['parts']} parts")
    begin = sum(sizes[:a["part"]])
    return begin, begin + sizes[a["part"]]


def infer_dtype(node: Node, dtypes: list) -> np.dtype:
    """The dtype of a node's (first) output from its inputs' dtypes (None: absent input)."""
    from . import elementwise as EW
    op = node.op
    if op == "elementwise":
        return EW.result_dtype(node.attrs["fn"], dtypes, node.attrs)
    if op == "cast":
        return np.dtype(node.attrs["to"])
    if op in ("topk", "nonzero"):
        return np.dtype(np.int64)
    if op == "shape":
        return np.dtype(np.int64)
    return np.dtype(dtypes[0]) if dtypes and dtypes[0] is not None else np.dtype(np.float32)


def raise_unsupported(label: str, items: list[tuple[str, str, str]]) -> None:
    """The report of every unsupported node of a model at once: (op, node name, why)."""
    lines = [f"  {op} (node {name!r}){': ' + why if why else ''}" for op, name, why in items]
    raise UnsupportedOpError(f"{label}: {len(items)} unsupported op(s):\n" + "\n".join(lines),
                             [(op, name) for op, name, _ in items])
