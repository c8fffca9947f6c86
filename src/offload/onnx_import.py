"""ONNX -> IR.

One table maps each ONNX op type to a converter producing IR nodes. Every unsupported op in the
file is collected and reported at once with its node name. Weight-shaped inputs that are computed
from initializers are folded later (passes.fold_constants), so converters keep inputs by name and
leave "must be constant" checks to ``passes.lower``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import checks
from . import graph as G
from .errors import ModelFormatError
from .reference import ONNX_DTYPES

INPUT_DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")
MIN_OPSET, MAX_OPSET = 6, onnx.defs.onnx_opset_version()  # the newest the installed onnx defines


class _Context:
    def __init__(self, opset: int, constants: dict, used: set):
        self.opset = opset
        self.used = used  # names read by some node or graph output
        self.constants = constants
        self.counter = 0

    def temp(self, base: str) -> str:
        self.counter += 1
        return f"_offload/{base}/{self.counter}"


class _Unsupported(Exception):
    """Raised by a converter for one node; collected, then reported together."""


def _attrs(node: onnx.NodeProto, label: str = "", name: str = "") -> dict:
    out = {}
    for attr in node.attribute:
        try:
            value = onnx.helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, onnx.TensorProto):
                value = _initializer(value, label)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{label}: {node.op_type} node {name or node.name!r}: "
                                   f"attribute {attr.name!r} cannot be read ({type(e).__name__}: "
                                   f"{e})") from None
        if isinstance(value, list):
            value = tuple(value)
        out[attr.name] = value
    return out


def _window(a: dict, nd_name: str, weight_kernel=None) -> dict:
    kernel = a.get("kernel_shape", weight_kernel)
    if kernel is not None and len(kernel) != 2:
        raise _Unsupported(f"{len(kernel)}-D {nd_name} (only 2-D windows are supported)")
    pads = a.get("pads", (0, 0, 0, 0))
    return {
        "kernel": tuple(kernel) if kernel is not None else None,
        "strides": tuple(a.get("strides", (1, 1))),
        "pads": tuple(pads),
        "dilations": tuple(a.get("dilations", (1, 1))),
        "auto_pad": a.get("auto_pad", "NOTSET"),
        "ceil_mode": int(a.get("ceil_mode", 0)),
    }


def _conv(n, a, ctx):
    if _is_1d(n, a, ctx):
        return _conv1d(n, a, ctx)
    attrs = _window(a, "Conv")
    attrs.update(groups=int(a.get("group", 1)), activation="identity")
    return [G.Node("conv2d", list(n.input), [n.output[0]], attrs)]


def _pool(kind):
    def convert(n, a, ctx):
        if len(n.output) > 1 and n.output[1] in ctx.used:
            raise _Unsupported("MaxPool with an Indices output that is used")
        attrs = _window(a, n.op_type) if not _is_1d(n, a, ctx) else {}
        if kind == "avgpool":
            attrs["count_include_pad"] = int(a.get("count_include_pad", 0))
        if a.get("storage_order", 0):
            raise _Unsupported("MaxPool with storage_order=1")
        if _is_1d(n, a, ctx):
            return _pool1d(kind, n, a, ctx)
        return [G.Node(kind, [n.input[0]], [n.output[0]], attrs)]
    return convert


def _activation(fn, **defaults):
    def convert(n, a, ctx):
        attrs = {"fn": fn}
        if fn == "leaky_relu":
            attrs["alpha"] = float(a.get("alpha", 0.01))
        return [G.Node("activation", [n.input[0]], [n.output[0]], attrs)]
    return convert


def _clip(n, a, ctx):
    if ctx.opset < 11:
        attrs = {"fn": "clip", "lo": float(a.get("min", -np.inf)), "hi": float(a.get("max", np.inf))}
        return [G.Node("activation", [n.input[0]], [n.output[0]], attrs)]
    return [G.Node("clip", list(n.input), [n.output[0]], {"fn": "clip"})]


def _softmax(n, a, ctx):
    if ctx.opset >= 13:
        return [G.Node("softmax", [n.input[0]], [n.output[0]], {"axis": int(a.get("axis", -1))})]
    # before opset 13 the input is coerced to 2-D at `axis` and softmax runs over the second part
    x, y, axis = n.input[0], n.output[0], int(a.get("axis", 1))
    shape, flat, soft = ctx.temp("shape"), ctx.temp("flat"), ctx.temp("softmax")
    return [G.Node("shape", [x], [shape]),
            G.Node("flatten", [x], [flat], {"axis": axis}),
            G.Node("softmax", [flat], [soft], {"axis": -1}),
            G.Node("reshape", [soft, shape], [y], {"allowzero": 0})]


def _batchnorm(n, a, ctx):
    if a.get("training_mode", 0) or any(o for o in n.output[1:]):
        raise _Unsupported("BatchNormalization in training mode")
    return [G.Node("batchnorm", list(n.input[:5]), [n.output[0]],
                   {"epsilon": float(a.get("epsilon", 1e-5))})]


def _binary(op):
    def convert(n, a, ctx):
        attrs = {}
        if ctx.opset < 7 and a.get("broadcast", 0) and "axis" in a:  # B aligned at axis
            attrs["legacy_axis"] = int(a["axis"])
        return [G.Node(op, list(n.input[:2]), [n.output[0]], attrs)]
    return convert


def _reduce(fn):
    def convert(n, a, ctx):
        attrs = {"fn": fn, "keepdims": int(a.get("keepdims", 1)),
                 "noop_with_empty_axes": int(a.get("noop_with_empty_axes", 0))}
        if "axes" in a:
            attrs["axes"] = tuple(a["axes"])
        return [G.Node("reduce", list(n.input[:2]), [n.output[0]], attrs)]
    return convert


def _pad(n, a, ctx):
    if a.get("mode", "constant") != "constant":
        raise _Unsupported(f"Pad mode {a['mode']!r} (only 'constant')")
    attrs = {"value": float(a.get("value", 0.0))}
    if ctx.opset < 11:
        attrs["pads"] = tuple(a["pads"])
    return [G.Node("pad", list(n.input), [n.output[0]], attrs)]


def _axes_op(op):
    def convert(n, a, ctx):
        attrs = {"axes": tuple(a["axes"])} if "axes" in a else {}
        return [G.Node(op, list(n.input), [n.output[0]], attrs)]
    return convert


def _dropout(n, a, ctx):
    if len(n.output) > 1 and n.output[1] in ctx.used:
        raise _Unsupported("Dropout with a mask output that is used")
    if len(n.input) > 2 and n.input[2]:
        training = ctx.constants.get(n.input[2])
        if training is None or bool(np.asarray(training).reshape(-1)[0]):
            raise _Unsupported("Dropout in training mode")
    return [G.Node("identity", [n.input[0]], [n.output[0]])]


def _slice(n, a, ctx):
    if ctx.opset < 10:
        starts, ends = ctx.temp("starts"), ctx.temp("ends")
        ctx.constants[starts] = np.array(a["starts"], np.int64)
        ctx.constants[ends] = np.array(a["ends"], np.int64)
        inputs = [n.input[0], starts, ends]
        if "axes" in a:
            axes = ctx.temp("axes")
            ctx.constants[axes] = np.array(a["axes"], np.int64)
            inputs.append(axes)
        return [G.Node("slice", inputs, [n.output[0]])]
    return [G.Node("slice", list(n.input), [n.output[0]])]


def _ew(fn, *params, arity=None):
    """An elementwise row of offload.elementwise.TABLE; ``params``: (attribute, default) pairs
    passed as the expression's p0, p1."""
    def convert(n, a, ctx):
        inputs = list(n.input)
        if arity is not None and len(inputs) != arity:
            raise _Unsupported(f"{len(inputs)} inputs (expected {arity})")
        attrs = {"fn": fn, "params": tuple(float(a.get(k, d)) for k, d in params)}
        return [G.Node("elementwise", inputs, [n.output[0]], attrs)]
    return convert


def _nary(fn):
    """Min/Max/Sum/Mean of any number of inputs: a chain of binary rows."""
    def convert(n, a, ctx):
        ins = [i for i in n.input if i]
        if not ins:
            raise _Unsupported("no inputs")
        nodes, acc = [], ins[0]
        row = "add" if fn in ("sum", "mean") else fn
        for k, x in enumerate(ins[1:]):
            last = k == len(ins) - 2 and fn != "mean"
            out = n.output[0] if last else ctx.temp(fn)
            nodes.append(G.Node("elementwise", [acc, x], [out], {"fn": row}))
            acc = out
        if fn == "mean":
            count = ctx.temp("count")
            ctx.constants[count] = np.array(len(ins), np.float32)
            nodes.append(G.Node("elementwise", [acc, count], [n.output[0]], {"fn": "div"}))
        elif len(ins) == 1:
            nodes.append(G.Node("elementwise", [acc], [n.output[0]], {"fn": "copy"}))
        return nodes
    return convert


def _cast(n, a, ctx):
    to = ONNX_DTYPES.get(int(a["to"]))
    if to is None or np.dtype(to).name not in ("float32", "float64", "float16", "int64",
                                               "int32", "bool"):
        name = onnx.TensorProto.DataType.Name(int(a["to"]))
        raise _Unsupported(f"Cast to {name} (float32, int64, int32 and bool are supported)")
    to = np.dtype(np.float32 if np.dtype(to).kind == "f" else to).name
    return [G.Node("cast", [n.input[0]], [n.output[0]], {"to": to})]


def _mod(n, a, ctx):
    return [G.Node("elementwise", list(n.input), [n.output[0]],
                   {"fn": "fmod" if a.get("fmod", 0) else "mod"})]


def _gelu(n, a, ctx):
    fn = "gelu_tanh" if a.get("approximate", "none") == "tanh" else "gelu"
    return [G.Node("elementwise", [n.input[0]], [n.output[0]], {"fn": fn})]


def _clip_any(n, a, ctx):
    if ctx.opset < 11:
        return _clip(n, a, ctx)
    return [G.Node("clip", list(n.input), [n.output[0]], {"fn": "clip"})]


def _where(n, a, ctx):
    return [G.Node("elementwise", list(n.input), [n.output[0]], {"fn": "where"})]


def _expand(n, a, ctx):
    return [G.Node("expand", list(n.input[:2]), [n.output[0]])]


def _tile(n, a, ctx):
    return [G.Node("tile", list(n.input[:2]), [n.output[0]])]


def _split(n, a, ctx):
    axis = int(a.get("axis", 0))
    parts = len(n.output)
    attrs = {"axis": axis, "parts": parts}
    inputs = [n.input[0]]
    if "split" in a:
        attrs["sizes"] = tuple(int(v) for v in a["split"])
    elif len(n.input) > 1 and n.input[1]:
        inputs.append(n.input[1])
    elif ctx.opset < 18:
        attrs["even"] = True
    return [G.Node("split_part", list(inputs), [out], dict(attrs, part=k))
            for k, out in enumerate(n.output) if out]


def _gather(n, a, ctx):
    return [G.Node("gather", list(n.input[:2]), [n.output[0]], {"axis": int(a.get("axis", 0))})]


def _gather_elements(n, a, ctx):
    return [G.Node("gather_elements", list(n.input[:2]), [n.output[0]],
                   {"axis": int(a.get("axis", 0))})]


def _scatter_nd(n, a, ctx):
    if a.get("reduction", "none") != "none":
        raise _Unsupported(f"ScatterND reduction {a['reduction']!r} (only 'none')")
    return [G.Node("scatter_nd", list(n.input[:3]), [n.output[0]])]


def _cumsum(n, a, ctx):
    return [G.Node("cumsum", list(n.input[:2]), [n.output[0]],
                   {"exclusive": int(a.get("exclusive", 0)), "reverse": int(a.get("reverse", 0))})]


def _trilu(n, a, ctx):
    return [G.Node("trilu", list(n.input[:2]), [n.output[0]], {"upper": int(a.get("upper", 1))})]


def _gather_nd(n, a, ctx):
    if a.get("batch_dims", 0):
        raise _Unsupported("GatherND with batch_dims > 0")
    return [G.Node("gather_nd", list(n.input[:2]), [n.output[0]])]


def _topk(n, a, ctx):
    axis, largest = int(a.get("axis", -1)), int(a.get("largest", 1))
    inputs = list(n.input[:2])
    if ctx.opset < 10:
        k = ctx.temp("k")
        ctx.constants[k] = np.array([a["k"]], np.int64)
        inputs = [n.input[0], k]
    values = n.output[0]
    indices = n.output[1] if len(n.output) > 1 and n.output[1] else ctx.temp("topk_indices")
    nodes = [G.Node("topk", inputs, [indices], {"axis": axis, "largest": largest})]
    if values:
        nodes.append(G.Node("gather_elements", [n.input[0], indices], [values], {"axis": axis}))
    return nodes


def _argmax(largest):
    def convert(n, a, ctx):
        if a.get("select_last_index", 0):
            raise _Unsupported("select_last_index=1")
        axis, keep = int(a.get("axis", 0)), int(a.get("keepdims", 1))
        k = ctx.temp("one")
        ctx.constants[k] = np.array([1], np.int64)
        out = n.output[0] if keep else ctx.temp("argmax")
        nodes = [G.Node("topk", [n.input[0], k], [out], {"axis": axis, "largest": largest})]
        if not keep:
            nodes.append(G.Node("squeeze", [out], [n.output[0]], {"axes": (axis,)}))
        return nodes
    return convert


def _layernorm(n, a, ctx):
    """LayerNormalization: one ``layernorm`` node; passes.lower keeps it as the fused device op
    when scale and bias are constants after folding (also behind the Identity nodes of shared
    initializers that PyTorch's exporter writes), else writes it out as reductions and
    elementwise rows."""
    if len(n.output) > 1 and any(o in ctx.used for o in n.output[1:] if o):
        raise _Unsupported("LayerNormalization with its Mean/InvStdDev outputs used")
    x, scale = n.input[0], n.input[1]
    bias = n.input[2] if len(n.input) > 2 else ""
    axis, eps = int(a.get("axis", -1)), float(a.get("epsilon", 1e-5))
    return [G.Node("layernorm", [x, scale] + ([bias] if bias else []), [n.output[0]],
                   {"axis": axis, "epsilon": eps})]


def _log_softmax(n, a, ctx):
    soft = ctx.temp("softmax")
    nodes = _softmax(n, a, ctx)
    nodes[-1].outputs = [soft]
    return nodes + [G.Node("elementwise", [soft], [n.output[0]], {"fn": "log"})]


def _nonzero(n, a, ctx):
    return [G.Node("nonzero", [n.input[0]], [n.output[0]])]


def _branch(g: onnx.GraphProto, ctx, label: str) -> tuple[list, list]:
    """An If branch as (IR nodes, output names); its initializers and Constants join the
    model's constants (ONNX names are unique across subgraphs)."""
    for t in g.initializer:
        ctx.constants[t.name] = _initializer(t, label)
    nodes, unsupported = [], []
    for i, n in enumerate(g.node):
        name = n.name or f"{g.name or 'branch'}/{n.op_type}_{i}"
        a = _attrs(n, label, name)
        if n.op_type == "Constant":
            value = _constant_value(a)
            if value is None:
                unsupported.append(("Constant", name, "a Constant without a numeric value"))
                continue
            ctx.constants[n.output[0]] = value
            continue
        convert = CONVERTERS.get(n.op_type)
        if convert is None or n.domain not in ("", "ai.onnx"):
            unsupported.append((n.op_type, name, "inside an If branch"))
            continue
        checks.onnx_attributes(n, ctx.opset, label, name)
        try:
            converted = convert(n, a, ctx)
        except _Unsupported as e:
            unsupported.append((n.op_type, name, str(e)))
            continue
        for c in converted:
            c.name, c.source_op = c.name or name, c.source_op or n.op_type
        nodes.extend(converted)
    if unsupported:
        raise_unsupported(label, unsupported)
    return nodes, [o.name for o in g.output]


def _if(n, a, ctx):
    """If: the chosen branch inline when the condition is a constant; else an ``if`` node that
    the plan resolves when the condition follows from shapes, or runs as a host step."""
    label = "If branch"
    then, other = _branch(a["then_branch"], ctx, label), _branch(a["else_branch"], ctx, label)
    if len(then[1]) != len(n.output) or len(other[1]) != len(n.output):
        raise _Unsupported(f"branches with {len(then[1])} and {len(other[1])} outputs for "
                           f"{len(n.output)} If outputs")
    node = G.Node("if", [n.input[0]] + G.branch_reads([then, other]), list(n.output),
                  {"then": then, "else": other})
    if n.input[0] in ctx.constants:
        return G.inline_branch(node, ctx.constants[n.input[0]])
    return [node]


def _simple(op, *names, **defaults):
    def convert(n, a, ctx):
        attrs = dict(defaults)
        attrs.update({k: a[k] for k in names if k in a})
        return [G.Node(op, list(n.input), list(n.output[:1]), attrs)]
    return convert


CONVERTERS = {
    "Conv": _conv,
    "Gemm": _simple("gemm", "alpha", "beta", "transA", "transB"),
    "MatMul": _simple("matmul"),
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "Relu": _activation("relu"), "LeakyRelu": _activation("leaky_relu"),
    "Sigmoid": _activation("sigmoid"), "Tanh": _activation("tanh"), "Clip": _clip,
    "Softmax": _softmax,
    "BatchNormalization": _batchnorm,
    "MaxPool": _pool("maxpool"), "AveragePool": _pool("avgpool"),
    "GlobalAveragePool": _simple("global_avgpool"),
    "Flatten": _simple("flatten", "axis", axis=1),
    "Reshape": _simple("reshape", "allowzero", allowzero=0),
    "Transpose": _simple("transpose", "perm"),
    "Concat": _simple("concat", "axis"),
    "Pad": _pad,
    "ReduceSum": _reduce("sum"), "ReduceMean": _reduce("mean"), "ReduceMax": _reduce("max"),
    "Identity": _simple("identity"), "Dropout": _dropout,
    "Shape": _simple("shape", "start", "end"),
    "Unsqueeze": _axes_op("unsqueeze"), "Squeeze": _axes_op("squeeze"),
    "Cast": _cast,
    "Slice": _slice,
    "ConstantOfShape": _simple("constant_of_shape", "value"),
    "Range": _simple("range"),
    "Equal": _ew("equal"), "Less": _ew("less"), "Greater": _ew("greater"),
    "LessOrEqual": _ew("less_equal"), "GreaterOrEqual": _ew("greater_equal"),
    "Not": _ew("not"), "And": _ew("and"), "Or": _ew("or"), "Xor": _ew("xor"),
    "Where": _where, "Expand": _expand, "Tile": _tile,
    "Erf": _ew("erf"), "Gelu": _gelu, "Sqrt": _ew("sqrt"), "Pow": _ew("pow"), "Exp": _ew("exp"),
    "Log": _ew("log"), "Neg": _ew("neg"), "Abs": _ew("abs"), "Reciprocal": _ew("reciprocal"),
    "Sign": _ew("sign"), "Floor": _ew("floor"), "Ceil": _ew("ceil"), "Round": _ew("round"),
    "Atan": _ew("atan"), "Sin": _ew("sin"), "Cos": _ew("cos"), "Mod": _mod, "IsNaN": _ew("is_nan"),
    "Min": _nary("min"), "Max": _nary("max"), "Sum": _nary("sum"), "Mean": _nary("mean"),
    "Elu": _ew("elu", ("alpha", 1.0)), "PRelu": _ew("prelu"),
    "Softplus": _ew("softplus"), "HardSigmoid": _ew("hard_sigmoid", ("alpha", 0.2), ("beta", 0.5)),
    "LayerNormalization": _layernorm, "LogSoftmax": _log_softmax,
    "Split": _split, "Gather": _gather, "GatherElements": _gather_elements,
    "GatherND": _gather_nd, "CumSum": _cumsum, "ScatterND": _scatter_nd, "Trilu": _trilu, "TopK": _topk,
    "ArgMax": _argmax(1), "ArgMin": _argmax(0),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"),
    "NonZero": _nonzero, "If": _if,
}


# ---------------------------------------------------------------------------------------------
# Opset semantics: the ops whose meaning changed between versions, each change as
# (version it came in, what changed, how offload reads it). The converters above read these by
# ``ctx.opset``; tests/test_types.py checks every version here against onnx's own schemas.
# A change offload does not implement is in NOT_IMPLEMENTED and refused naming op and version.
OPSET_SEMANTICS = {
    "ReduceSum": ((13, "axes as an optional input (attribute before)"),),
    **{op: ((18, "axes as an optional input (attribute before)"),)
       for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")},
    "Split": ((13, "split sizes as an optional input (attribute before)"),
              (18, "num_outputs attribute; without sizes the last part may be smaller "
                   "(before: equal parts only)")),
    "Pad": ((11, "pads and the constant value as inputs (attributes before)"),
            (18, "axes as an optional input: pads name those axes only"),
            (19, "mode 'wrap' (refused: only 'constant')")),
    "Clip": ((11, "min and max as optional inputs (attributes before)"),),
    "Squeeze": ((13, "axes as an optional input (attribute before)"),),
    "Unsqueeze": ((13, "axes as an input (attribute before)"),),
    "Softmax": ((13, "over one axis (before: the input coerced to 2-D at axis, softmax over "
                     "the second part; default axis 1, not -1)"),),
    "LogSoftmax": ((13, "as Softmax"),),
    "TopK": ((10, "k as an input (attribute before)"),
             (11, "largest and sorted attributes, negative axis")),
    "Slice": ((10, "starts/ends/axes/steps as inputs (attributes before, no steps)"),),
    "Dropout": ((7, "no is_test attribute: inference is the identity"),
                (12, "ratio and training_mode as inputs")),
    "BatchNormalization": ((7, "spatial attribute (spatial=0: per-element statistics, "
                               "refused)"),
                           (9, "spatial removed: per-channel statistics"),
                           (14, "training_mode attribute (refused when set)")),
    **{op: ((7, "NumPy broadcasting (before: a broadcast attribute, B aligned at the axis "
                "attribute: passes.legacy_broadcast unsqueezes B)"),)
       for op in ("Add", "Sub", "Mul", "Div")},
    "Pow": ((7, "NumPy broadcasting"),),
    "PRelu": ((7, "NumPy broadcasting of the slope (before: per-channel, refused by the "
                  "shape checks)"),),
    "Gemm": ((7, "C broadcast to [M, N] (before: a broadcast attribute)"),
             (11, "C optional")),
    "Shape": ((15, "start and end attributes"),),
    "Reshape": ((5, "shape as an input"), (14, "allowzero attribute")),
    "Max": ((8, "NumPy broadcasting (before: equal shapes)"),),
    "Min": ((8, "NumPy broadcasting (before: equal shapes)"),),
    "Sum": ((8, "NumPy broadcasting (before: equal shapes)"),),
    "Mean": ((8, "NumPy broadcasting (before: equal shapes)"),),
    "ArgMax": ((12, "select_last_index attribute (refused when 1)"),),
    "ArgMin": ((12, "select_last_index attribute (refused when 1)"),),
    "ScatterND": ((16, "reduction attribute (refused unless 'none')"),),
    "GatherND": ((12, "batch_dims attribute (refused when > 0)"),),
    "AveragePool": ((10, "ceil_mode"), (19, "dilations")),
    "MaxPool": ((8, "an Indices output and storage_order (refused when used)"),
                (10, "ceil_mode and dilations")),
}
# (op, last version, test on the attributes, what offload does not implement)
NOT_IMPLEMENTED = [
    ("BatchNormalization", 8, lambda a: a.get("spatial", 1) == 0,
     "spatial=0 (per-element statistics)"),
    ("BatchNormalization", 6, lambda a: a.get("is_test", 0) == 0 and "is_test" in a,
     "is_test=0 (training mode)"),
]


def op_version(op_type: str, opset: int) -> int:
    """The version of ``op_type`` in effect at ``opset`` (its schema's since_version)."""
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except Exception:  # noqa: BLE001 - an op unknown to onnx: the importer reports it
        return opset


def _by_version(op_type, convert):
    rules = [r for r in NOT_IMPLEMENTED if r[0] == op_type]

    def checked(n, a, ctx):
        version = op_version(op_type, ctx.opset)
        for _, last, test, what in rules:
            if version <= last and test(a):
                raise _Unsupported(f"{op_type} version {version} (opset {ctx.opset}): {what} "
                                   "is not implemented")
        return convert(n, a, ctx)
    return checked


for _op in {r[0] for r in NOT_IMPLEMENTED}:
    CONVERTERS[_op] = _by_version(_op, CONVERTERS[_op])
# 1-D windows and recurrent layers (DeepJet-class taggers)
#
# A 1-D Conv/MaxPool/AveragePool over [N, C, L] becomes the 2-D op over [N, C, 1, L] (kernel
# (1, k)) between an unsqueeze and a squeeze of axis 2, so every device runs it with its 2-D
# kernels. LSTM and GRU become one ``rnn`` IR op (layout 0: X [T, B, I]) whose one output packs
# Y, Y_h (and Y_c) as [T + 1 (+1), D, B, H]; slices take the outputs the graph uses, and
# transposes around it give layout 1.

def _is_1d(n, a, ctx) -> bool:
    kernel = a.get("kernel_shape")
    if kernel is None and n.op_type == "Conv" and len(n.input) > 1:
        w = ctx.constants.get(n.input[1])
        return w is not None and np.ndim(w) == 3
    return kernel is not None and len(kernel) == 1


def _window1d(a, n) -> dict:
    """The 2-D window attributes ([N, C, 1, L]) of a 1-D Conv/pool's attributes."""
    def one(key, length, default):
        v = tuple(int(x) for x in a.get(key, default))
        if len(v) != length:
            raise ValueError(f"attribute {key} has {len(v)} values for a 1-D window, "
                             f"expected {length}")
        return v
    kernel = a.get("kernel_shape")
    (s,), (d,) = one("strides", 1, (1,)), one("dilations", 1, (1,))
    pb, pe = one("pads", 2, (0, 0))
    return {"kernel": (1, int(kernel[0])) if kernel is not None else None,
            "strides": (1, s), "pads": (0, pb, 0, pe), "dilations": (1, d),
            "auto_pad": a.get("auto_pad", "NOTSET"), "ceil_mode": int(a.get("ceil_mode", 0))}


def _around_2d(node, n, ctx, weight=None):
    """[unsqueeze x (and the weight)] + node + [squeeze]: the 2-D op over [N, C, 1, L]."""
    x4, y4 = ctx.temp("x2d"), ctx.temp("y2d")
    nodes = [G.Node("unsqueeze", [n.input[0]], [x4], {"axes": (2,)})]
    node.inputs[0], node.outputs = x4, [y4]
    if weight is not None:
        w4 = ctx.temp("w2d")
        nodes.append(G.Node("unsqueeze", [weight], [w4], {"axes": (2,)}))
        node.inputs[1] = w4
    return nodes + [node, G.Node("squeeze", [y4], [n.output[0]], {"axes": (2,)})]


def _conv1d(n, a, ctx):
    attrs = _window1d(a, n)
    if attrs["kernel"] is None:  # _is_1d saw the weight: an initializer
        attrs["kernel"] = (1, int(np.shape(ctx.constants[n.input[1]])[2]))
    attrs.update(groups=int(a.get("group", 1)), activation="identity")
    node = G.Node("conv2d", list(n.input), [n.output[0]], attrs)
    return _around_2d(node, n, ctx, weight=n.input[1])


def _pool1d(kind, n, a, ctx):
    attrs = _window1d(a, n)
    if kind == "avgpool":
        attrs["count_include_pad"] = int(a.get("count_include_pad", 0))
    return _around_2d(G.Node(kind, [n.input[0]], [n.output[0]], attrs), n, ctx)


RNN_ROLES = {"LSTM": ("x", "w", "r", "b", "seq", "h0", "c0", "p"),
             "GRU": ("x", "w", "r", "b", "seq", "h0")}
RNN_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh")}


def _rnn(n, a, ctx):
    """LSTM/GRU -> one ``rnn`` node (see graph.py) plus the slices of the outputs used."""
    op = n.op_type
    cell = op.lower()
    direction = a.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    acts = a.get("activations")
    if acts is not None:
        acts = [v.decode() if isinstance(v, bytes) else str(v) for v in acts]
        want = RNN_DEFAULT_ACTIVATIONS[op] * dirs
        if tuple(str(v).lower() for v in acts) != want:
            raise _Unsupported(f"attribute activations {list(acts)} (only the defaults "
                               f"{list(RNN_DEFAULT_ACTIVATIONS[op])} per direction)")
    for key in ("activation_alpha", "activation_beta"):
        if a.get(key):
            raise _Unsupported(f"attribute {key} {list(a[key])} (only the default activations, "
                               "which take no parameters)")
    layout = int(a.get("layout", 0))
    roles, inputs = [], []
    for role, name in zip(RNN_ROLES[op], n.input):
        if name:
            roles.append(role)
            inputs.append(name)
    if len(n.input) > len(RNN_ROLES[op]):
        raise ValueError(f"{len(n.input)} inputs, at most {len(RNN_ROLES[op])}")
    nodes = []
    if layout == 1:  # batch-major X [B, T, I] and states [B, D, H]: moved to layout 0
        for k, role in enumerate(roles):
            if role in ("x", "h0", "c0"):
                moved = ctx.temp(f"{role}_time_major")
                nodes.append(G.Node("transpose", [inputs[k]], [moved], {"perm": (1, 0, 2)}))
                inputs[k] = moved
    attrs = {"cell": cell, "direction": direction, "roles": tuple(roles), "layout": layout,
             "clip": float(a.get("clip", 0.0)) if "clip" in a else 0.0,
             "input_forget": int(a.get("input_forget", 0)),
             "linear_before_reset": int(a.get("linear_before_reset", 0))}
    if "hidden_size" in a:
        attrs["hidden"] = int(a["hidden_size"])
    extra = 2 if cell == "lstm" else 1
    packed = ctx.temp("rnn_state")
    nodes.append(G.Node("rnn", inputs, [packed], attrs))

    def const(value):
        name = ctx.temp("rnn_slice")
        ctx.constants[name] = np.array(value, np.int64)
        return name

    outputs = list(n.output) + [""] * 3
    for k, out in enumerate(outputs[:1 + extra]):
        if not out or out not in ctx.used:
            continue
        if k == 0:  # Y [T, D, B, H]: the first T rows
            begin, end = 0, -extra
        else:       # Y_h / Y_c [D, B, H]: one row after them
            begin, end = k - 1 - extra, (k - extra if k < extra else np.iinfo(np.int64).max)
        rows = ctx.temp("rnn_rows")
        nodes.append(G.Node("slice", [packed, const([begin]), const([end]), const([0])],
                            [rows if (k or layout == 1) else out]))
        if k:
            squeezed = ctx.temp("rnn_squeezed") if layout == 1 else out
            nodes.append(G.Node("squeeze", [rows], [squeezed], {"axes": (0,)}))
            if layout == 1:
                nodes.append(G.Node("transpose", [squeezed], [out], {"perm": (1, 0, 2)}))
        elif layout == 1:  # Y [B, T, D, H]
            nodes.append(G.Node("transpose", [rows], [out], {"perm": (2, 0, 1, 3)}))
    return nodes


CONVERTERS.update({"LSTM": _rnn, "GRU": _rnn})


def _constant_value(a: dict):
    """The array a Constant node's attributes hold, or None when it holds no numeric value."""
    value = next((a[k] for k in ("value", "value_float", "value_floats", "value_int",
                                 "value_ints") if k in a), None)
    if value is not None and not isinstance(value, np.ndarray):
        dtype = np.float32 if "value_float" in a or "value_floats" in a else np.int64
        value = np.array(value, dtype)
    return value


def read_model(source) -> tuple[onnx.ModelProto, str]:
    """Read an ONNX model from a path, bytes or a ModelProto; returns (model, label for messages)."""
    if isinstance(source, onnx.ModelProto):
        label = source.graph.name or "<model>"
        _load_external_data(source, None, label)  # refused: there is no folder to read from
        return source, label
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, base, data = "<bytes>", None, bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        label = str(path)
        try:
            base = path.resolve().parent
            if not path.is_file():
                raise ModelFormatError(f"{path}: no such model file")
            data = path.read_bytes()
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{path}: cannot read the model file ({type(e).__name__}: "
                                   f"{e})") from None
    else:
        raise ModelFormatError(f"expected a model path, bytes or an onnx.ModelProto, got "
                               f"{type(source).__name__}")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-like errors, ValueError
        raise ModelFormatError(f"{label}: not a valid ONNX file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'undecodable'})") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelFormatError(f"{label}: not an ONNX model (no IR version, graph or opset; "
                               f"{len(data)} bytes read)")
    _load_external_data(model, base, label)
    return model, label


def _load_external_data(model: onnx.ModelProto, base: Path | None, label: str) -> None:
    external = [t for t in onnx.external_data_helper._get_all_tensors(model)
                if onnx.external_data_helper.uses_external_data(t)]
    if not external:
        return
    if base is None:
        raise ModelFormatError(f"{label}: the model refers to external data files but was not "
                               "loaded from a path (load it by path, or call "
                               "onnx.load_external_data_for_model on it first)")
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or base not in target.parents:
            raise ModelFormatError(f"{label}: initializer {tensor.name!r} refers to external data "
                                   f"{location!r} outside the model's folder {base}; refused")
        if not target.is_file():
            raise ModelFormatError(f"{label}: external data file {location!r} of initializer "
                                   f"{tensor.name!r} is missing")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise ModelFormatError(f"{label}: could not read external data ({e})") from None


def _opset(model: onnx.ModelProto, label: str) -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise ModelFormatError(f"{label}: no default-domain opset in the model")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelFormatError(f"{label}: opset {opset} is outside the supported range "
                               f"{MIN_OPSET}-{MAX_OPSET}")
    return opset


def _tensor_info(value: onnx.ValueInfoProto, label: str) -> G.TensorInfo:
    t = value.type.tensor_type
    dtype = ONNX_DTYPES.get(t.elem_type)
    if dtype is None or np.dtype(dtype).name not in INPUT_DTYPES:
        name = onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type in \
            onnx.TensorProto.DataType.values() and t.elem_type else f"unknown ({t.elem_type})"
        raise ModelFormatError(f"{label}: input {value.name!r} has element type {name}; offload "
                               "takes float32/float16/float64, int64, int32 and bool inputs")
    dtype = np.dtype(np.float32) if np.dtype(dtype).kind == "f" else np.dtype(dtype)
    dims = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or ("N" if i == 0 else f"d{i}"))
    return G.TensorInfo(value.name, tuple(dims), dtype)


def to_graph(model: onnx.ModelProto, label: str) -> G.Graph:
    """Convert a parsed ONNX model into an IR graph (before passes)."""
    opset = _opset(model, label)
    g = model.graph
    constants = {t.name: _initializer(t, label) for t in g.initializer}
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    ctx = _Context(opset, constants, used)
    nodes, unsupported = [], []
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if not n.output or not (n.output[0] or (n.op_type in RNN_ROLES and any(n.output))):
            raise ModelFormatError(f"{label}: {n.op_type} node {name!r} has no output")
        if n.domain not in ("", "ai.onnx"):
            unsupported.append((n.op_type, name, f"custom domain {n.domain!r}"))
            continue
        if n.op_type == "Constant":
            a = _attrs(n, label, name)
            value = _constant_value(a)
            if value is None:
                unsupported.append(("Constant", name, "a Constant without a numeric value"))
                continue
            constants[n.output[0]] = value
            continue
        convert = CONVERTERS.get(n.op_type)
        if convert is None:
            unsupported.append((n.op_type, name, ""))
            continue
        checks.onnx_attributes(n, opset, label, name)
        try:
            converted = convert(n, _attrs(n, label, name), ctx)
        except _Unsupported as e:
            unsupported.append((n.op_type, name, str(e)))
            continue
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ModelFormatError(f"{label}: {n.op_type} node {name!r}: malformed attributes "
                                   f"or inputs ({type(e).__name__}: {e})") from None
        for c in converted:  # (nodes of an inlined If branch keep their own)
            c.name, c.source_op = c.name or name, c.source_op or n.op_type
        nodes.extend(converted)
    if unsupported:
        raise_unsupported(label, unsupported)
    checks.onnx_outputs(g, label)
    inputs = [_tensor_info(v, label) for v in g.input if v.name not in constants]
    return G.Graph(nodes, inputs, [o.name for o in g.output], constants, g.name or "model")


def _initializer(t: onnx.TensorProto, label: str) -> np.ndarray:
    """A TensorProto as an array; a wrong element type or a short raw_data is a ModelFormatError."""
    if t.data_type not in ONNX_DTYPES:
        name = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in \
            onnx.TensorProto.DataType.values() else f"number {t.data_type}"
        raise ModelFormatError(f"{label}: tensor {t.name!r} has element type {name}; offload "
                               f"reads {sorted(np.dtype(d).name for d in ONNX_DTYPES.values())}")
    if any(d < 0 for d in t.dims):
        raise ModelFormatError(f"{label}: tensor {t.name!r} has negative dims {list(t.dims)}")
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise ModelFormatError(f"{label}: tensor {t.name!r} of dims {list(t.dims)} cannot be read "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                               ) from None


raise_unsupported = G.raise_unsupported  # the report is the IR's (graph.py)


def check(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Run the ONNX checker and shape inference; report problems as ModelFormatError.
    Returns the model with inferred value_info."""
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelFormatError(f"{label}: invalid ONNX model: {str(e).splitlines()[0]}") from None
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        raise ModelFormatError(f"{label}: ONNX shape inference failed: "
                               f"{str(e).splitlines()[0]}") from None


def shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """The shape of every tensor that shape inference knows: ints for fixed axes, names for free
    axes, None where even the axis is unknown."""
    out = {}
    g = model.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in t.shape.dim)
    for t in g.initializer:
        out[t.name] = tuple(t.dims)
    return out
