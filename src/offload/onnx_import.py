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
from .errors import ModelFormatError, UnsupportedOpError
from .reference import ONNX_DTYPES

MIN_OPSET, MAX_OPSET = 6, 21


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
    attrs = _window(a, "Conv")
    attrs.update(groups=int(a.get("group", 1)), activation="identity")
    return [G.Node("conv2d", list(n.input), [n.output[0]], attrs)]


def _pool(kind):
    def convert(n, a, ctx):
        if len(n.output) > 1 and n.output[1] in ctx.used:
            raise _Unsupported("MaxPool with an Indices output that is used")
        attrs = _window(a, n.op_type)
        if kind == "avgpool":
            attrs["count_include_pad"] = int(a.get("count_include_pad", 0))
        if a.get("storage_order", 0):
            raise _Unsupported("MaxPool with storage_order=1")
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
    return lambda n, a, ctx: [G.Node(op, list(n.input[:2]), [n.output[0]])]


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
    "Gather": _simple("gather", "axis", axis=0),
    "Unsqueeze": _axes_op("unsqueeze"), "Squeeze": _axes_op("squeeze"),
    "Cast": _simple("cast", "to"),
    "Slice": _slice,
    "ConstantOfShape": _simple("constant_of_shape", "value"),
    "Range": _simple("range"),
}


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
    if dtype is None or np.dtype(dtype).kind != "f":
        name = onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type in \
            onnx.TensorProto.DataType.values() and t.elem_type else f"unknown ({t.elem_type})"
        raise ModelFormatError(f"{label}: input {value.name!r} has element type {name}; offload "
                               "runs models whose inputs are floating point")
    dims = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or ("N" if i == 0 else f"d{i}"))
    return G.TensorInfo(value.name, tuple(dims), np.dtype(np.float32))


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
        if not n.output or not n.output[0]:
            raise ModelFormatError(f"{label}: {n.op_type} node {name!r} has no output")
        if n.domain not in ("", "ai.onnx"):
            unsupported.append((n.op_type, name, f"custom domain {n.domain!r}"))
            continue
        if n.op_type == "Constant":
            a = _attrs(n, label, name)
            value = next((a[k] for k in ("value", "value_float", "value_floats", "value_int",
                                         "value_ints") if k in a), None)
            if value is None:
                unsupported.append(("Constant", name, "a Constant without a numeric value"))
                continue
            if not isinstance(value, np.ndarray):
                dtype = np.float32 if "value_float" in a or "value_floats" in a else np.int64
                value = np.array(value, dtype)
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
        for c in converted:
            c.name, c.source_op = name, n.op_type
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


def raise_unsupported(label: str, items: list[tuple[str, str, str]]) -> None:
    lines = [f"  {op} (node {name!r}){': ' + why if why else ''}" for op, name, why in items]
    raise UnsupportedOpError(f"{label}: {len(items)} unsupported op(s):\n" + "\n".join(lines),
                             [(op, name) for op, name, _ in items])


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
