"""Fixed-point precision for a model: ``offload.load(..., precision="ap_fixed<16,6>")``.

A precision names the ``ap_fixed`` types of the HLS kernels (:mod:`offload.fpga.quant`,
``kernels/hls``), hls4ml style. It is a string, or a dict with a ``"default"`` entry and per-layer
overrides by IR node name::

    precision="ap_fixed<16,6>"
    precision={"default": "ap_fixed<16,6,AP_RND,AP_SAT>",
               "fc1": "ap_fixed<12,4>",                        # a string: see below
               "fc4": {"result": "ap_fixed<18,8>", "accum": "ap_fixed<36,16>"}}

Each fixed-point layer (``dense``, ``conv2d``, ``maxpool``, ``avgpool``) has five types, the parts:

========== ===================================================================================
``data``   the layer's input. Always the ``result`` type of the fixed-point layer producing its
           input; for a layer fed by the graph input (or by a float op) the default's ``data``
           part, to which the float input is quantised (with that type's Q and O modes).
           Not overridable per layer.
``weight`` weights (quantised once, at the first plan)
``bias``   biases
``accum``  the accumulator (``acc``): every product and every partial sum is converted to it
``result`` the layer's output (``out``)
========== ===================================================================================

From one string ``T = ap_fixed<W,I,...>``: ``data = weight = bias = result = T`` and
``accum = ap_fixed<2W, 2I>`` (AP_TRN, AP_WRAP): products of two ``T`` values are exact in it, as
the hls4ml default accumulator for ``ap_fixed<16,6>`` (``ap_fixed<32,12>``). A dict gives any of
the parts (``data``, ``weight``, ``bias``, ``accum``, ``result``; also ``acc`` and ``out``); at the
``default`` level the missing ones come from its ``data`` part as from a string, at a layer the
missing ones are the default's. A layer override string sets that layer's weight, bias and result
to ``T`` and its accumulator to ``ap_fixed<2W, 2I>``.

ReLU is fused into dense/conv2d: it acts on the accumulator, then the result is converted
(``kernels/hls/README.md``). Every other op of the graph (softmax, flatten, ...) stays float32.

Between layers the plan keeps **float32 arrays holding the exact values** of the ``result`` type
(the CPU device's plan machinery is unchanged: ``Model.precision`` is ``"ap_fixed"``, tensors are
float32). That is exact because data and result types are limited to 24 bits (float32's
significand); a wider type raises :class:`PrecisionError`. Each emulated layer converts its input
back to raw integers exactly (:func:`offload.fpga.quant.quantize` of an exactly representable value).

:func:`annotate` is the graph pass: it returns a copy of the graph whose fixed-point nodes carry
``attrs["fixed"]`` (a :class:`FixedLayer`). The CPU device runs those nodes with
:mod:`offload.fpga.quant` (:func:`build_cpu`); the XRT devices run them with the HLS kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .. import graph as G
from . import quant
from ..errors import OffloadError, UnsupportedOpError
from .hls_csim import KernelTypes

__all__ = ["PrecisionError", "FixedLayer", "Precision", "parse", "annotate", "FIXED_OPS",
           "is_fixed_precision", "build_cpu", "kernel_layers", "FAMILY"]

FAMILY = "ap_fixed"  # the name in Capabilities.precisions of a device that runs these
FIXED_OPS = ("dense", "conv2d", "maxpool", "avgpool")
PARTS = ("data", "weight", "bias", "accum", "result")
_ALIASES = {"acc": "accum", "accumulator": "accum", "out": "result", "input": "data"}
MAX_CARRIER_BITS = 24  # float32 holds every value of a <= 24-bit fixed-point type exactly


class PrecisionError(OffloadError, ValueError):
    """A fixed-point precision is malformed, names unknown layers, or cannot be carried."""


@dataclasses.dataclass(frozen=True)
class FixedLayer:
    """The annotation of one fixed-point node: its kernel types, its name and op."""

    types: KernelTypes
    node: str
    op: str

    def __str__(self) -> str:
        return f"{self.op} {self.node!r}: {self.types}"


def wider_accumulator(t: quant.FixedType) -> quant.FixedType:
    """``ap_fixed<2W, 2I>`` (AP_TRN, AP_WRAP): the default accumulator of a type."""
    return quant.FixedType(min(2 * t.width, 62), 2 * t.integer, True)


def _type(text, what: str) -> quant.FixedType:
    try:
        return quant.parse(text)
    except (TypeError, ValueError) as e:
        raise PrecisionError(f"precision {what}: {e}") from None


def _parts(spec, what: str, base: dict | None) -> dict:
    """A string or dict of parts -> a dict of the five FixedTypes."""
    if isinstance(spec, (str, quant.FixedType)):
        t = _type(spec, what)
        out = dict(base) if base else {"data": t}
        out.update(weight=t, bias=t, result=t, accum=wider_accumulator(t))
        return out
    if not isinstance(spec, dict):
        raise PrecisionError(f"precision {what}: expected a type string such as "
                             f"'ap_fixed<16,6>' or a dict of {list(PARTS)}, got "
                             f"{type(spec).__name__}")
    given = {}
    for key, value in spec.items():
        part = _ALIASES.get(str(key).lower(), str(key).lower())
        if part not in PARTS:
            raise PrecisionError(f"precision {what}: unknown part {key!r}; expected "
                                 f"{list(PARTS)} (or acc/out)")
        given[part] = _type(value, f"{what} {part}")
    if base is None:  # the default level: missing parts derive from data
        first = given.get("data") or given.get("result") or given.get("weight")
        if first is None:
            raise PrecisionError(f"precision {what}: give at least 'data' (e.g. "
                                 "'ap_fixed<16,6>')")
        out = _parts(first, what, None)
        out.update(given)
        if "accum" not in given and "data" in given:
            out["accum"] = wider_accumulator(given["data"])
        return out
    if "data" in given:
        raise PrecisionError(
            f"precision {what}: a layer's 'data' (input) type is the result type of the layer "
            f"before it; set that layer's 'result', or the default's 'data' for the graph input")
    out = dict(base)
    out.update(given)
    return out


@dataclasses.dataclass(frozen=True)
class Precision:
    """A parsed fixed-point precision: the default parts and per-layer overrides."""

    default: dict
    layers: dict
    text: str

    def __str__(self) -> str:
        return self.text


def is_fixed_precision(precision) -> bool:
    """Whether ``precision`` asks for fixed point (a dict, or a string naming an ap_ type)."""
    if isinstance(precision, (dict, Precision)):
        return True
    return isinstance(precision, str) and precision.strip().lower().startswith(
        ("ap_fixed", "ap_ufixed", "fixed<", "ufixed<", "ap_int", "ap_uint"))


def parse(precision) -> Precision:
    """A precision string or dict (module docstring) -> :class:`Precision`."""
    if isinstance(precision, Precision):
        return precision
    if isinstance(precision, dict):
        if "default" not in precision:
            raise PrecisionError("precision dict needs a 'default' entry, e.g. "
                                 "{'default': 'ap_fixed<16,6>', 'fc1': 'ap_fixed<12,4>'}; got "
                                 f"keys {sorted(map(str, precision))}")
        default = _parts(precision["default"], "default", None)
        layers = {str(k): _parts(v, f"of layer {k!r}", default)
                  for k, v in precision.items() if k != "default"}
        text = repr(precision)
    else:
        default = _parts(precision, "", None)
        layers, text = {}, str(precision)
    for where, parts in [("default", default)] + list(layers.items()):
        for p in ("data", "result"):
            if parts[p].width > MAX_CARRIER_BITS:
                raise PrecisionError(
                    f"precision {where}: {p} type {parts[p]} has {parts[p].width} bits; "
                    f"activations travel between layers as float32, exact up to "
                    f"{MAX_CARRIER_BITS} bits")
    return Precision(default, layers, text)


def _source(graph: G.Graph, name: str, producers: dict) -> G.Node | None:
    """The node producing ``name``, looking through view ops (reshape, flatten, ...)."""
    node = producers.get(name)
    while node is not None and node.op in G.VIEW_OPS:
        node = producers.get(node.inputs[0])
    return node


def _kernel_problem(node: G.Node) -> str:
    """Why the HLS kernels (and so the emulation) cannot run this node, or ''."""
    a = node.attrs
    if node.op in ("dense", "conv2d"):
        if len([i for i in node.inputs if i]) > 3:
            return "a fused residual add"
        if a.get("activation", "identity") not in ("relu", "identity"):
            return f"activation {a.get('activation')!r} (kernels fuse relu only)"
    if node.op == "conv2d":
        k = a.get("kernel", ())
        pads = tuple(a.get("pads", (0, 0, 0, 0)))
        if a.get("groups", 1) != 1:
            return f"groups={a.get('groups')}"
        if tuple(a.get("strides", (1, 1))) != (1, 1) or tuple(a.get("dilations", (1, 1))) != (1, 1):
            return f"strides {a.get('strides')} / dilations {a.get('dilations')} (stride 1 only)"
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", None) or len(set(pads)) > 1:
            return f"pads {pads} (symmetric padding only)"
        if len(k) != 2:
            return f"kernel {k}"
    if node.op in ("maxpool", "avgpool"):
        k = tuple(a.get("kernel", ()))
        if len(k) != 2 or k[0] != k[1] or tuple(a.get("strides", ())) != k:
            return f"kernel {k} strides {a.get('strides')} (square k x k, stride k only)"
        if any(a.get("pads", ())) or a.get("ceil_mode", 0) or \
                a.get("auto_pad", "NOTSET") not in ("NOTSET", None):
            return "padding or ceil_mode"
        if tuple(a.get("dilations", (1, 1))) != (1, 1):
            return f"dilations {a.get('dilations')}"
        if node.op == "avgpool" and (k[0] * k[0]) & (k[0] * k[0] - 1):
            return f"window area {k[0] * k[0]} (a power of two only)"
    return ""


def annotate(graph: G.Graph, precision) -> G.Graph:
    """The graph pass: a copy of ``graph`` whose dense/conv2d/maxpool/avgpool nodes carry
    ``attrs["fixed"] = FixedLayer(...)``. Unknown layer names in the overrides raise
    PrecisionError listing the valid ones; fixed-point nodes the kernels cannot run (strided
    conv, padded pool, other activations...) raise UnsupportedOpError listing all of them."""
    p = parse(precision)
    valid = [n.name for n in graph.nodes if n.op in FIXED_OPS]
    unknown = sorted(set(p.layers) - set(valid))
    if unknown:
        raise PrecisionError(f"precision names unknown layers {unknown}; the fixed-point layers "
                             f"of {graph.name!r} are {valid}")
    producers = graph.producers()
    nodes, results, problems = [], {}, []
    for node in graph.nodes:
        if node.op not in FIXED_OPS:
            nodes.append(node)
            continue
        why = _kernel_problem(node)
        if why:
            problems.append((node.op, node.name, why))
            nodes.append(node)
            continue
        parts = p.layers.get(node.name, p.default)
        src = _source(graph, node.inputs[0], producers)
        data = results.get(src.name) if src is not None else None
        data = data if data is not None else p.default["data"]
        try:
            types = KernelTypes(data, parts["weight"], parts["bias"], parts["accum"],
                                parts["result"])
            if data.width + parts["weight"].width > 63:
                raise ValueError(f"products of {data} and {parts['weight']} need more than 63 "
                                 "bits")
        except ValueError as e:
            raise PrecisionError(f"precision of {node.op} node {node.name!r}: {e}") from None
        results[node.name] = parts["result"]
        attrs = dict(node.attrs)
        attrs["fixed"] = FixedLayer(types, node.name, node.op)
        nodes.append(dataclasses.replace(node, attrs=attrs))
    if problems:
        items = "; ".join(f"{op} node {name!r}: {why}" for op, name, why in problems)
        raise UnsupportedOpError(f"fixed point {p}: the HLS kernels cannot run {items}",
                                 [(op, name) for op, name, _ in problems])
    return dataclasses.replace(graph, nodes=nodes)


def kernel_layers(graph: G.Graph) -> list[FixedLayer]:
    """The annotations of an annotated graph, in order."""
    return [n.attrs["fixed"] for n in graph.nodes if "fixed" in n.attrs]


# ---------------------------------------------------------------------------
# the CPU device's emulation of annotated nodes (drivers/cpu.py dispatches here)
# ---------------------------------------------------------------------------


def _relu(attrs) -> bool:
    return attrs.get("activation", "identity") == "relu"


def _store(out: np.ndarray, raw: np.ndarray, t: quant.FixedType) -> None:
    np.copyto(out, quant.to_float(raw, t).reshape(out.shape), casting="same_kind")


def _weights(ctx, ins, layer: FixedLayer, weight_layout):
    t = layer.types
    w = ctx.weight(ins[1], f"fixed:{t.weight}", lambda a: t.weight.quantize(weight_layout(a)))
    b = ctx.weight(ins[2], f"fixed:{t.bias}", lambda a: t.bias.quantize(a)) \
        if len(ins) > 2 else None
    return w, b


def _cpu_dense(ctx, attrs, ins, out):
    layer: FixedLayer = attrs["fixed"]
    t, relu = layer.types, _relu(attrs)
    x = ins[0]
    k, m = ins[1].shape  # IR dense weight [in, out]; the kernel's is [out, in]
    w, b = _weights(ctx, ins, layer, lambda a: a.T)
    x2 = x.reshape(-1, k)

    def run():
        y = quant.dense(t.data.quantize(x2), t.data, w, t.weight, b, t.bias, t.acc, t.out,
                        relu)
        _store(out, y, t.out)
    return run


def _cpu_conv2d(ctx, attrs, ins, out):
    layer: FixedLayer = attrs["fixed"]
    t, relu = layer.types, _relu(attrs)
    x = ins[0]
    pad = int(attrs["pads"][0])
    w, b = _weights(ctx, ins, layer, lambda a: a)

    def run():
        y = quant.conv2d(t.data.quantize(x), t.data, w, t.weight, b, t.bias, t.acc, t.out,
                         relu, pad)
        _store(out, y, t.out)
    return run


def _cpu_pool(op):
    def build(ctx, attrs, ins, out):
        layer: FixedLayer = attrs["fixed"]
        t, k, x = layer.types, int(attrs["kernel"][0]), ins[0]

        def run():
            xr = t.data.quantize(x)
            if op == "maxpool":
                y = quant.maxpool2d(xr, t.data, t.out, k)
            else:
                y = quant.avgpool2d(xr, t.data, t.acc, t.out, k)
            _store(out, y, t.out)
        return run
    return build


_CPU = {"dense": _cpu_dense, "conv2d": _cpu_conv2d, "maxpool": _cpu_pool("maxpool"),
        "avgpool": _cpu_pool("avgpool")}


def build_cpu(op: str, float_builder):
    """An op builder running annotated nodes through :mod:`offload.fpga.quant` and every other node
    through ``float_builder`` (the float32 path, unchanged)."""
    fixed = _CPU[op]

    def builder(ctx, attrs, ins, out):
        if "fixed" in attrs:
            return fixed(ctx, attrs, ins, out)
        return float_builder(ctx, attrs, ins, out)
    # (__wrapped__, and the float builder's flags such as build_conv2d.fused_pool)
    return functools.update_wrapper(builder, float_builder)


def bytes_per_value(t: quant.FixedType) -> int:
    return int(t.storage_dtype.itemsize)


def storage_nbytes(shape, t: quant.FixedType) -> int:
    return max(1, math.prod(shape) * bytes_per_value(t))
