"""Small hand-built ONNX models used by the test suite.

Pure ``onnx.helper`` builders (numpy + onnx only, no onnxruntime / torch).

Every model:

* is float32 end to end (int64 only for shape-like tensors),
* has ``ir_version`` 8 and opset 17 unless the case is explicitly about
  another opset (its name then contains ``opset<k>``),
* has graph inputs whose first axis is the symbolic batch dim ``"N"``,
* has every node named, weights stored as initializers with values drawn
  from an RNG seeded by the case name (so models are reproducible),
* has graph output shapes filled in by ONNX shape inference.

Public API::

    Case(name, model, make_inputs)      # dataclass
    case.make_inputs(batch, rng) -> dict[str, np.ndarray]   # float32, batch first
    case.opset -> int                   # default-domain opset of the model
    CASES: list[Case]
    case_ids() -> list[str]
    get_case(name) -> Case
    UNSUPPORTED_CASE: Case              # Det node "bad_det", Hardmax node "bad_hardmax"
    write(case, folder) -> Path         # saves <folder>/<case.name>.onnx
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "Case",
    "CASES",
    "UNSUPPORTED_CASE",
    "case_ids",
    "get_case",
    "write",
]

IR_VERSION = 8
DEFAULT_OPSET = 17
BATCH = "N"

InputFn = Callable[[int, np.random.Generator], "dict[str, np.ndarray]"]


@dataclass(frozen=True)
class Case:
    """One test model.

    ``make_inputs(batch, rng)`` returns float32 arrays keyed by graph input
    name, with the batch axis first.
    """

    name: str
    model: onnx.ModelProto
    make_inputs: InputFn

    @property
    def opset(self) -> int:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        raise ValueError(f"{self.name}: no default-domain opset import")

    @property
    def input_names(self) -> list[str]:
        inits = {t.name for t in self.model.graph.initializer}
        return [i.name for i in self.model.graph.input if i.name not in inits]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def __repr__(self) -> str:  # keep pytest output short
        return f"Case({self.name!r}, opset={self.opset})"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _rng(name: str) -> np.random.Generator:
    """Weight RNG, seeded deterministically by the case name."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def _w(rng: np.random.Generator, shape: Sequence[int], scale: float | None = None) -> np.ndarray:
    """Normal weights; default scale 1/sqrt(fan_in) keeps activations O(1)."""
    shape = tuple(shape)
    if scale is None:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / np.sqrt(max(fan_in, 1))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _f32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _i64(value) -> np.ndarray:
    return np.asarray(value, dtype=np.int64)


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str = "", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=name or None, **attrs)


def _normal_inputs(shapes: Mapping[str, Sequence[int]]) -> InputFn:
    shapes = {k: tuple(v) for k, v in shapes.items()}

    def make_inputs(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            k: rng.standard_normal((batch, *s)).astype(np.float32) for k, s in shapes.items()
        }

    return make_inputs


def _nonzero_inputs(shapes: Mapping[str, Sequence[int]], nonzero: Sequence[str]) -> InputFn:
    """Like _normal_inputs, but inputs listed in ``nonzero`` have |v| in [0.5, 2]."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    nonzero = set(nonzero)

    def make_inputs(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = {}
        for k, s in shapes.items():
            full = (batch, *s)
            if k in nonzero:
                mag = rng.uniform(0.5, 2.0, size=full)
                sign = np.where(rng.random(full) < 0.5, -1.0, 1.0)
                out[k] = (mag * sign).astype(np.float32)
            else:
                out[k] = rng.standard_normal(full).astype(np.float32)
        return out

    return make_inputs


def _build(
    name: str,
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int]],
    outputs: Sequence[str],
    inits: Mapping[str, np.ndarray] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    make_inputs: InputFn | None = None,
    doc: str = "",
) -> Case:
    """Assemble a Case.

    ``inputs`` maps graph input name -> shape *without* the batch axis; the
    batch axis ``"N"`` is prepended.  Unnamed nodes get ``<op>_<index>``.
    Output shapes come from ONNX shape inference.
    """
    nodes = list(nodes)
    used = {n.name for n in nodes if n.name}
    for i, n in enumerate(nodes):
        if not n.name:
            cand = f"{n.op_type.lower()}_{i}"
            while cand in used:
                cand += "_"
            n.name = cand
            used.add(cand)

    g_inputs = [
        helper.make_tensor_value_info(k, TensorProto.FLOAT, [BATCH, *s]) for k, s in inputs.items()
    ]
    g_outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, name, g_inputs, g_outputs, initializer=initializers, doc_string=doc)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name="offload-tests",
    )
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    # keep the model minimal: only graph outputs need shapes
    del model.graph.value_info[:]
    for o in model.graph.output:
        if not o.type.tensor_type.HasField("shape"):
            raise AssertionError(f"{name}: shape inference gave no shape for output {o.name}")
    return Case(name, model, make_inputs or _normal_inputs(inputs))


# --------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------


def _conv(name: str, x_shape, w_shape, bias: bool = True, **attrs) -> Case:
    rng = _rng(name)
    inits = {"W": _w(rng, w_shape)}
    ins = ["x", "W"]
    if bias:
        inits["B"] = _w(rng, [w_shape[0]], 0.5)
        ins.append("B")
    return _build(name, [_node("Conv", ins, ["y"], **attrs)], {"x": x_shape}, ["y"], inits)


def _conv_cases() -> list[Case]:
    return [
        _conv("conv_basic_3x3", [3, 8, 8], [4, 3, 3, 3], pads=[1, 1, 1, 1]),
        _conv("conv_no_pad", [3, 8, 8], [4, 3, 3, 3]),
        _conv("conv_asym_pads", [3, 8, 8], [4, 3, 3, 3], pads=[0, 1, 2, 1]),
        _conv("conv_stride2", [3, 9, 9], [4, 3, 3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        _conv("conv_dilation2", [3, 9, 9], [4, 3, 3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]),
        _conv("conv_group2", [4, 8, 8], [6, 2, 3, 3], group=2, pads=[1, 1, 1, 1]),
        _conv("conv_depthwise", [4, 8, 8], [4, 1, 3, 3], group=4, pads=[1, 1, 1, 1]),
        _conv("conv_depthwise_mult2", [4, 8, 8], [8, 1, 3, 3], group=4, pads=[1, 1, 1, 1]),
        _conv("conv_1x1", [8, 6, 6], [5, 8, 1, 1]),
        _conv("conv_no_bias", [3, 8, 8], [4, 3, 3, 3], bias=False, pads=[1, 1, 1, 1]),
        # 8x8, k3, s2 -> out 4, total pad 1 -> pad only at the end (upper)
        _conv("conv_auto_pad_same_upper", [3, 8, 8], [4, 3, 3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
        _conv("conv_kernel_1x3", [3, 6, 7], [4, 3, 1, 3], pads=[0, 1, 0, 1]),
        _conv(
            "conv_kernel_3x1_stride_2x1",
            [3, 9, 6],
            [4, 3, 3, 1],
            strides=[2, 1],
            pads=[1, 0, 1, 0],
        ),
    ]


# --------------------------------------------------------------------------
# Gemm / MatMul
# --------------------------------------------------------------------------


def _gemm_cases() -> list[Case]:
    K, M = 8, 6
    cases = []

    name = "gemm_basic"  # C as 1-D [M]
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("Gemm", ["x", "B", "C"], ["y"])],
            {"x": [K]},
            ["y"],
            {"B": _w(r, [K, M], K**-0.5), "C": _w(r, [M], 0.5)},
        )
    )

    name = "gemm_transA"  # A arrives as [K, N] via a leading Transpose
    r = _rng(name)
    cases.append(
        _build(
            name,
            [
                _node("Transpose", ["x"], ["xt"], perm=[1, 0]),
                _node("Gemm", ["xt", "B", "C"], ["y"], transA=1),
            ],
            {"x": [K]},
            ["y"],
            {"B": _w(r, [K, M], K**-0.5), "C": _w(r, [M], 0.5)},
        )
    )

    name = "gemm_transB"  # torch.nn.Linear layout: B is [M, K]
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("Gemm", ["x", "B", "C"], ["y"], transB=1)],
            {"x": [K]},
            ["y"],
            {"B": _w(r, [M, K], K**-0.5), "C": _w(r, [M], 0.5)},
        )
    )

    name = "gemm_alpha_beta"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("Gemm", ["x", "B", "C"], ["y"], alpha=0.5, beta=2.0, transB=1)],
            {"x": [K]},
            ["y"],
            {"B": _w(r, [M, K], K**-0.5), "C": _w(r, [M], 0.5)},
        )
    )

    name = "gemm_c_row"  # C as 2-D row vector [1, M]
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("Gemm", ["x", "B", "C"], ["y"])],
            {"x": [K]},
            ["y"],
            {"B": _w(r, [K, M], K**-0.5), "C": _w(r, [1, M], 0.5)},
        )
    )

    name = "gemm_c_scalar"  # C as [1] broadcast to everything
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("Gemm", ["x", "B", "C"], ["y"], beta=0.75)],
            {"x": [K]},
            ["y"],
            {"B": _w(r, [K, M], K**-0.5), "C": _f32([0.3])},
        )
    )

    name = "gemm_no_c"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("Gemm", ["x", "B"], ["y"], transB=1)],
            {"x": [K]},
            ["y"],
            {"B": _w(r, [M, K], K**-0.5)},
        )
    )
    return cases


def _matmul_cases() -> list[Case]:
    cases = []
    name = "matmul_2d"
    r = _rng(name)
    cases.append(
        _build(name, [_node("MatMul", ["x", "W"], ["y"])], {"x": [8]}, ["y"], {"W": _w(r, [8, 5], 8**-0.5)})
    )
    name = "matmul_3d_2d"  # [N, T, K] x [K, M]
    r = _rng(name)
    cases.append(
        _build(
            name, [_node("MatMul", ["x", "W"], ["y"])], {"x": [4, 8]}, ["y"], {"W": _w(r, [8, 5], 8**-0.5)}
        )
    )
    name = "matmul_add_bias"  # MatMul + Add, the un-fused Linear pattern
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("MatMul", ["x", "W"], ["xw"]), _node("Add", ["xw", "b"], ["y"])],
            {"x": [8]},
            ["y"],
            {"W": _w(r, [8, 5], 8**-0.5), "b": _w(r, [5], 0.5)},
        )
    )
    return cases


# --------------------------------------------------------------------------
# Elementwise binary ops
# --------------------------------------------------------------------------


def _binary_cases() -> list[Case]:
    cases = []
    for op in ("Add", "Sub", "Mul", "Div"):
        lo = op.lower()
        div = op == "Div"

        # two graph inputs, same shape
        name = f"{lo}_same_shape"
        shapes = {"a": [3, 4, 5], "b": [3, 4, 5]}
        cases.append(
            _build(
                name,
                [_node(op, ["a", "b"], ["y"])],
                shapes,
                ["y"],
                make_inputs=_nonzero_inputs(shapes, ["b"] if div else []),
            )
        )

        # initializer [C,1,1] broadcast onto [N,C,H,W]
        name = f"{lo}_bcast_c11"
        r = _rng(name)
        w = _w(r, [3, 1, 1], 1.0)
        if div:
            w = (np.sign(w) * (np.abs(w) + 0.5)).astype(np.float32)
        cases.append(_build(name, [_node(op, ["x", "w"], ["y"])], {"x": [3, 4, 5]}, ["y"], {"w": w}))

        if op in ("Sub", "Div"):  # non-commutative: initializer as first operand
            name = f"{lo}_bcast_c11_init_first"
            r = _rng(name)
            w = _w(r, [3, 1, 1], 1.0)
            shapes = {"x": [3, 4, 5]}
            cases.append(
                _build(
                    name,
                    [_node(op, ["w", "x"], ["y"])],
                    shapes,
                    ["y"],
                    {"w": w},
                    make_inputs=_nonzero_inputs(shapes, ["x"] if div else []),
                )
            )

        # 0-d scalar initializer
        name = f"{lo}_scalar"
        scalar = {"Add": 1.5, "Sub": 0.75, "Mul": -2.5, "Div": 4.0}[op]
        cases.append(
            _build(name, [_node(op, ["x", "s"], ["y"])], {"x": [3, 4, 5]}, ["y"], {"s": _f32(scalar)})
        )

        # two graph inputs, broadcast [N,4,5] with [N,1,5]
        name = f"{lo}_bcast_inputs"
        shapes = {"a": [4, 5], "b": [1, 5]}
        cases.append(
            _build(
                name,
                [_node(op, ["a", "b"], ["y"])],
                shapes,
                ["y"],
                make_inputs=_nonzero_inputs(shapes, ["b"] if div else []),
            )
        )
    return cases


# --------------------------------------------------------------------------
# Activations / Clip / Softmax
# --------------------------------------------------------------------------


def _unary(name: str, op: str, shape=(3, 4, 5), opset: int = DEFAULT_OPSET, **attrs) -> Case:
    return _build(name, [_node(op, ["x"], ["y"], **attrs)], {"x": list(shape)}, ["y"], opset=opset)


def _activation_cases() -> list[Case]:
    cases = [
        _unary("relu", "Relu"),
        _unary("leaky_relu", "LeakyRelu", alpha=0.2),
        _unary("sigmoid", "Sigmoid"),
        _unary("tanh", "Tanh"),
        _unary("identity", "Identity"),
    ]

    # Clip: min/max became inputs at opset 11.
    cases.append(
        _build(
            "clip_opset13_min_max",
            [_node("Clip", ["x", "lo", "hi"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
            {"lo": _f32(-0.5), "hi": _f32(0.8)},
            opset=13,
        )
    )
    cases.append(
        _build(
            "clip_min_only",  # max omitted via empty input name
            [_node("Clip", ["x", "lo", ""], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
            {"lo": _f32(-0.25)},
        )
    )
    cases.append(
        _build(
            "clip_max_only",  # min omitted via empty input name
            [_node("Clip", ["x", "", "hi"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
            {"hi": _f32(0.6)},
        )
    )
    cases.append(
        _build(
            "clip_relu6",  # what torch clamp(0, 6) / ReLU6 exports to
            [_node("Clip", ["x", "lo", "hi"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
            {"lo": _f32(0.0), "hi": _f32(6.0)},
            make_inputs=lambda b, rng: {"x": (rng.standard_normal((b, 3, 4, 5)) * 4).astype(np.float32)},
        )
    )
    cases.append(
        _build(
            "clip_opset20_min_max",
            [_node("Clip", ["x", "lo", "hi"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
            {"lo": _f32(-1.0), "hi": _f32(0.5)},
            opset=20,
        )
    )
    # Attribute form (Clip-6, valid for opsets 6..10).  onnxruntime runs the
    # opset-6 model correctly but logs warnings (it only *guarantees* opset >= 7),
    # so the same operator version is also provided stamped opset 10.
    cases.append(_unary("clip_opset6_attrs", "Clip", opset=6, min=-0.4, max=0.9))
    cases.append(_unary("clip_opset10_attrs", "Clip", opset=10, min=-0.3, max=0.7))

    # Softmax
    cases += [
        _unary("softmax_axis_last", "Softmax", shape=(3, 4, 5), axis=-1),
        _unary("softmax_axis1_4d", "Softmax", shape=(3, 4, 5), axis=1),
        _unary("softmax_opset13_axis1_4d", "Softmax", shape=(3, 4, 5), opset=13, axis=1),
        _unary("softmax_opset20_axis_last", "Softmax", shape=(6,), opset=20, axis=-1),
        # Softmax-11 semantics differ: input is coerced to 2-D [prod(:axis), prod(axis:)]
        # and normalised over the whole trailing block (here C*H*W).
        _unary("softmax_opset11_axis1_4d_coerced", "Softmax", shape=(3, 4, 5), opset=11, axis=1),
    ]
    return cases


# --------------------------------------------------------------------------
# BatchNormalization
# --------------------------------------------------------------------------


def _bn_params(r: np.random.Generator, c: int, prefix: str = "") -> dict[str, np.ndarray]:
    return {
        prefix + "scale": (1.0 + 0.3 * r.standard_normal(c)).astype(np.float32),
        prefix + "bias": (0.3 * r.standard_normal(c)).astype(np.float32),
        prefix + "mean": (0.3 * r.standard_normal(c)).astype(np.float32),
        prefix + "var": r.uniform(0.5, 2.0, c).astype(np.float32),
    }


def _bn_cases() -> list[Case]:
    cases = []
    bn_in = lambda x: [x, "scale", "bias", "mean", "var"]  # noqa: E731

    name = "conv_bn"
    r = _rng(name)
    inits = {"W": _w(r, [4, 3, 3, 3]), "B": _w(r, [4], 0.5), **_bn_params(r, 4)}
    cases.append(
        _build(
            name,
            [
                _node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                _node("BatchNormalization", bn_in("c"), ["y"], epsilon=1e-3),
            ],
            {"x": [3, 8, 8]},
            ["y"],
            inits,
        )
    )

    name = "conv_bn_relu_nobias"
    r = _rng(name)
    inits = {"W": _w(r, [4, 3, 3, 3]), **_bn_params(r, 4)}
    cases.append(
        _build(
            name,
            [
                _node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                _node("BatchNormalization", bn_in("c"), ["bn"]),
                _node("Relu", ["bn"], ["y"]),
            ],
            {"x": [3, 8, 8]},
            ["y"],
            inits,
        )
    )

    name = "batchnorm_4d"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("BatchNormalization", bn_in("x"), ["y"], epsilon=1e-5)],
            {"x": [4, 5, 5]},
            ["y"],
            _bn_params(r, 4),
        )
    )

    name = "batchnorm_2d"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [_node("BatchNormalization", bn_in("x"), ["y"], epsilon=1e-5)],
            {"x": [6]},
            ["y"],
            _bn_params(r, 6),
        )
    )
    return cases


# --------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------


def _pool_cases() -> list[Case]:
    x = [3, 8, 8]
    return [
        _unary("maxpool_2x2_s2", "MaxPool", shape=x, kernel_shape=[2, 2], strides=[2, 2]),
        _unary("maxpool_3x3_s2_p1", "MaxPool", shape=x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        # 8x8, k3 s2: floor -> 3x3, ceil -> 4x4
        _unary("maxpool_3x3_s2_ceil", "MaxPool", shape=x, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        _unary("maxpool_3x3_s1_no_pad", "MaxPool", shape=x, kernel_shape=[3, 3]),
        _unary(
            "avgpool_3x3_s2_p1_exclude_pad",
            "AveragePool",
            shape=x,
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=0,
        ),
        _unary(
            "avgpool_3x3_s2_p1_include_pad",
            "AveragePool",
            shape=x,
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            count_include_pad=1,
        ),
        _unary("avgpool_2x2_s2", "AveragePool", shape=x, kernel_shape=[2, 2], strides=[2, 2]),
        _unary("global_avgpool", "GlobalAveragePool", shape=[4, 5, 6]),
    ]


# --------------------------------------------------------------------------
# Shape manipulation
# --------------------------------------------------------------------------


def _shape_cases() -> list[Case]:
    cases = [
        _unary("flatten_axis1", "Flatten", shape=(3, 4, 5), axis=1),
        _unary("transpose_nhwc", "Transpose", shape=(3, 4, 5), perm=[0, 2, 3, 1]),
    ]

    cases.append(
        _build(
            "reshape_zero_minus1",  # [N,3,4,5] -> [0,-1,5] = [N,12,5]
            [_node("Reshape", ["x", "shape"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
            {"shape": _i64([0, -1, 5])},
        )
    )

    name = "concat_two_branches"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [
                _node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
                _node("Relu", ["x"], ["b"]),
                _node("Concat", ["a", "b"], ["y"], axis=1),
            ],
            {"x": [3, 6, 6]},
            ["y"],
            {"W1": _w(r, [2, 3, 3, 3])},
        )
    )

    cases.append(
        _build(
            "pad_constant_value",  # opset >= 11: pads and value are inputs
            [_node("Pad", ["x", "pads", "value"], ["y"], mode="constant")],
            {"x": [3, 4, 5]},
            ["y"],
            {"pads": _i64([0, 0, 1, 2, 0, 0, 2, 1]), "value": _f32(0.5)},
        )
    )
    cases.append(
        _build(
            "pad_constant_default_zero",  # constant_value omitted -> 0
            [_node("Pad", ["x", "pads"], ["y"], mode="constant")],
            {"x": [3, 4, 5]},
            ["y"],
            {"pads": _i64([0, 0, 1, 1, 0, 0, 1, 1])},
        )
    )

    cases.append(
        _build(
            "slice_axes_steps",  # [N,3,8,8] -> channels 1:3, rows ::2, cols 1:-1
            [_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])],
            {"x": [3, 8, 8]},
            ["y"],
            {
                "starts": _i64([1, 0, 1]),
                "ends": _i64([3, 8, -1]),
                "axes": _i64([1, 2, 3]),
                "steps": _i64([1, 2, 1]),
            },
        )
    )
    cases.append(
        _build(
            "squeeze_unsqueeze",  # opset >= 13: axes are inputs
            [
                _node("Squeeze", ["x", "sq_axes"], ["s"]),
                _node("Unsqueeze", ["s", "unsq_axes"], ["y"]),
            ],
            {"x": [1, 4, 5]},
            ["y"],
            {"sq_axes": _i64([1]), "unsq_axes": _i64([3])},
        )
    )
    cases.append(
        _build(
            "cast_roundtrip",  # float -> int32 (truncate toward zero) -> float
            [
                _node("Mul", ["x", "k"], ["xk"]),
                _node("Cast", ["xk"], ["xi"], to=TensorProto.INT32),
                _node("Cast", ["xi"], ["y"], to=TensorProto.FLOAT),
            ],
            {"x": [3, 4]},
            ["y"],
            {"k": _f32(3.0)},
            # keep values away from integer boundaries so truncation is unambiguous
            make_inputs=lambda b, rng: {
                "x": ((rng.integers(-6, 7, size=(b, 3, 4)) + rng.uniform(0.1, 0.9, size=(b, 3, 4))) / 3.0).astype(
                    np.float32
                )
            },
        )
    )
    cases.append(
        _build(
            "gather_axis1",
            [_node("Gather", ["x", "idx"], ["y"], axis=1)],
            {"x": [5, 3]},
            ["y"],
            {"idx": _i64([4, 0, 2, 2])},
        )
    )
    return cases


# --------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------


def _reduce_cases() -> list[Case]:
    x = {"x": [3, 4, 5]}
    cases = []

    cases.append(
        _build(
            "reducesum_opset13_axes_input",
            [_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
            x,
            ["y"],
            {"axes": _i64([2, 3])},
            opset=13,
        )
    )
    cases.append(
        _build(
            "reducesum_axes_input_keepdims0",
            [_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
            x,
            ["y"],
            {"axes": _i64([-1])},
        )
    )
    cases.append(
        _build(
            "reducemean_keepdims1",  # opset 17: axes attribute
            [_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)],
            x,
            ["y"],
        )
    )
    cases.append(
        _build(
            "reducemean_keepdims0",
            [_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)],
            x,
            ["y"],
        )
    )
    cases.append(
        _build(
            "reducemax_last_keepdims0",
            [_node("ReduceMax", ["x"], ["y"], axes=[-1], keepdims=0)],
            x,
            ["y"],
        )
    )
    cases.append(
        _build(
            "reducemax_keepdims1",
            [_node("ReduceMax", ["x"], ["y"], axes=[1, 3])],
            x,
            ["y"],
        )
    )
    # opset 18+: ReduceMean / ReduceMax take axes as an input too
    cases.append(
        _build(
            "reducemean_opset18_axes_input",
            [_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)],
            x,
            ["y"],
            {"axes": _i64([2, 3])},
            opset=18,
        )
    )
    cases.append(
        _build(
            "reducemax_opset20_axes_input",
            [_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0)],
            x,
            ["y"],
            {"axes": _i64([1])},
            opset=20,
        )
    )
    cases.append(
        _build(
            "reducesum_opset20_axes_input",
            [_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
            x,
            ["y"],
            {"axes": _i64([1, -1])},
            opset=20,
        )
    )
    # axes input omitted, noop_with_empty_axes absent (=0): reduce over ALL
    # axes including the batch axis -> output [1,1,1,1]
    cases.append(
        _build(
            "reducesum_opset20_all_axes",
            [_node("ReduceSum", ["x"], ["y"], keepdims=1)],
            x,
            ["y"],
            opset=20,
        )
    )
    # axes omitted with noop_with_empty_axes=1: identity
    cases.append(
        _build(
            "reducesum_opset18_noop_empty_axes",
            [_node("ReduceSum", ["x"], ["y"], keepdims=1, noop_with_empty_axes=1)],
            x,
            ["y"],
            opset=18,
        )
    )
    return cases


# --------------------------------------------------------------------------
# Misc: Dropout, Constant, constant folding, shape subgraph, multi-IO
# --------------------------------------------------------------------------


def _misc_cases() -> list[Case]:
    cases = []

    cases.append(
        _build(
            "dropout_inference",  # ratio given, training_mode absent -> identity
            [_node("Dropout", ["x", "ratio"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
            {"ratio": _f32(0.3)},
        )
    )
    cases.append(
        _build(
            "dropout_with_mask",  # second (bool mask) output present but unused
            [_node("Dropout", ["x"], ["d", "mask"]), _node("Relu", ["d"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
        )
    )

    name = "constant_node_add"
    r = _rng(name)
    cst = helper.make_tensor("c", TensorProto.FLOAT, [4, 5], _w(r, [4, 5], 1.0).ravel().tolist())
    cases.append(
        _build(
            name,
            [_node("Constant", [], ["c"], value=cst), _node("Add", ["x", "c"], ["y"])],
            {"x": [3, 4, 5]},
            ["y"],
        )
    )
    cases.append(
        _build(
            "constant_node_value_float",  # Constant with the value_float attribute
            [_node("Constant", [], ["c"], value_float=0.25), _node("Mul", ["x", "c"], ["y"])],
            {"x": [3, 4]},
            ["y"],
        )
    )

    # Weight computed from initializers only -> an engine should fold it at load.
    name = "constant_subgraph_fold"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [
                _node("Mul", ["W", "two"], ["W2"]),
                _node("Transpose", ["W2"], ["Wt"], perm=[1, 0]),
                _node("Add", ["bias", "bias"], ["bias2"]),
                _node("MatMul", ["x", "Wt"], ["xw"]),
                _node("Add", ["xw", "bias2"], ["y"]),
            ],
            {"x": [8]},
            ["y"],
            {"W": _w(r, [5, 8], 8**-0.5), "two": _f32(2.0), "bias": _w(r, [5], 0.3)},
        )
    )

    # x.view(x.size(0), -1) as exported by the legacy PyTorch exporter
    name = "shape_subgraph_flatten"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [
                _node("Shape", ["x"], ["shp"]),
                _node("Gather", ["shp", "zero"], ["n"], axis=0),
                _node("Unsqueeze", ["n", "unsq_axes"], ["n1"]),
                _node("Concat", ["n1", "minus1"], ["new_shape"], axis=0),
                _node("Reshape", ["x", "new_shape"], ["flat"]),
                _node("Gemm", ["flat", "W", "b"], ["y"], transB=1),
            ],
            {"x": [3, 4, 4]},
            ["y"],
            {
                "zero": _i64(0),
                "unsq_axes": _i64([0]),
                "minus1": _i64([-1]),
                "W": _w(r, [10, 48], 48**-0.5),
                "b": _w(r, [10], 0.3),
            },
        )
    )

    name = "two_inputs_two_outputs"
    r = _rng(name)
    cases.append(
        _build(
            name,
            [
                _node("MatMul", ["a", "W"], ["aw"]),
                _node("Relu", ["aw"], ["out_a"]),
                _node("Sigmoid", ["b"], ["sb"]),
                _node("Add", ["sb", "one"], ["out_b"]),
            ],
            {"a": [8], "b": [5]},
            ["out_a", "out_b"],
            {"W": _w(r, [8, 6], 8**-0.5), "one": _f32(1.0)},
        )
    )

    # A graph output that is also consumed internally.
    name = "output_also_consumed"
    cases.append(
        _build(
            name,
            [_node("Relu", ["x"], ["r"]), _node("Mul", ["r", "r"], ["sq"])],
            {"x": [3, 4]},
            ["r", "sq"],
        )
    )

    # Small end-to-end CNN.
    name = "small_cnn"
    r = _rng(name)
    inits = {
        "W1": _w(r, [4, 3, 3, 3]),
        "B1": _w(r, [4], 0.3),
        **_bn_params(r, 4, "bn_"),
        "W2": _w(r, [4, 1, 3, 3]),
        "W3": _w(r, [8, 4, 1, 1]),
        "B3": _w(r, [8], 0.3),
        "Wfc": _w(r, [5, 8], 8**-0.5),
        "Bfc": _w(r, [5], 0.3),
    }
    cases.append(
        _build(
            name,
            [
                _node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
                _node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"]),
                _node("Relu", ["b1"], ["r1"]),
                _node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
                _node("Conv", ["p1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=4),
                _node("Add", ["c2", "p1"], ["res"]),
                _node("Conv", ["res", "W3", "B3"], ["c3"]),
                _node("Clip", ["c3", "zero", "six"], ["r3"]),
                _node("GlobalAveragePool", ["r3"], ["g"]),
                _node("Flatten", ["g"], ["f"], axis=1),
                _node("Gemm", ["f", "Wfc", "Bfc"], ["logits"], transB=1),
                _node("Softmax", ["logits"], ["y"], axis=-1),
            ],
            {"x": [3, 8, 8]},
            ["y"],
            {**inits, "zero": _f32(0.0), "six": _f32(6.0)},
        )
    )
    return cases


# --------------------------------------------------------------------------
# Unsupported-op model (for error-message tests)
# --------------------------------------------------------------------------


def _unsupported_case() -> Case:
    """x -> Det ("bad_det") -> y;  Hardmax(y) ("bad_hardmax") -> Cast -> nz.

    Runs in onnxruntime; offload imports neither op (NonZero, used here before, now runs as a
    host step).
    """
    return _build(
        "unsupported_ops",
        [
            _node("Det", ["x"], ["y"], name="bad_det"),
            _node("Hardmax", ["y"], ["nz_i64"], name="bad_hardmax"),
            _node("Cast", ["nz_i64"], ["nz"], name="cast_nz", to=TensorProto.FLOAT),
        ],
        {"x": [3, 4, 4]},
        ["y", "nz"],
    )


# --------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------


def _all_cases() -> list[Case]:
    cases = (
        _conv_cases()
        + _gemm_cases()
        + _matmul_cases()
        + _binary_cases()
        + _activation_cases()
        + _bn_cases()
        + _pool_cases()
        + _shape_cases()
        + _reduce_cases()
        + _misc_cases()
    )
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise AssertionError(f"duplicate case names: {sorted(dup)}")
    return cases


CASES: list[Case] = _all_cases()
UNSUPPORTED_CASE: Case = _unsupported_case()
_BY_NAME = {c.name: c for c in CASES}


def case_ids() -> list[str]:
    """Case names, in CASES order (for ``pytest.mark.parametrize(ids=...)``)."""
    return [c.name for c in CASES]


def get_case(name: str) -> Case:
    if name == UNSUPPORTED_CASE.name:
        return UNSUPPORTED_CASE
    return _BY_NAME[name]


def write(case: Case, folder: str | Path) -> Path:
    """Save ``case.model`` as ``<folder>/<case.name>.onnx`` and return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.name}.onnx"
    onnx.save_model(case.model, str(path))
    return path
