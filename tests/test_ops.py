"""Each IR op on every device against the straightforward NumPy reference (offload.reference)."""

import numpy as np
import pytest

from conftest import assert_close
from offload import graph as G
from offload import reference
from offload.model import Model

RNG = np.random.default_rng(7)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv(x_shape, m, k, groups=1, strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), bias=True,
         act="identity", **extra):
    c = x_shape[1]
    consts = {"w": randn(m, c // groups, *k) * 0.3}
    inputs = ["x", "w"]
    if bias:
        consts["b"] = randn(m)
        inputs.append("b")
    attrs = dict(kernel=k, strides=strides, pads=pads, dilations=dil, groups=groups,
                 auto_pad="NOTSET", ceil_mode=0, activation=act, **extra)
    return G.Node("conv2d", inputs, ["y"], attrs, "conv"), {"x": x_shape}, consts


def dense(x_shape, n, act="identity", bias=True, **extra):
    consts = {"w": randn(x_shape[-1], n) * 0.3}
    if bias:
        consts["b"] = randn(n)
    inputs = ["x", "w"] + (["b"] if bias else [])
    return G.Node("dense", inputs, ["y"], dict(activation=act, **extra), "dense"), \
        {"x": x_shape}, consts


def pool(kind, k, strides, pads=(0, 0, 0, 0), ceil=0, dil=(1, 1), shape=(2, 3, 9, 9), **extra):
    attrs = dict(kernel=k, strides=strides, pads=pads, dilations=dil, auto_pad="NOTSET",
                 ceil_mode=ceil, **extra)
    return G.Node(kind, ["x"], ["y"], attrs, kind), {"x": shape}, {}


def unary(op, shape=(2, 3, 5, 4), **attrs):
    return G.Node(op, ["x"], ["y"], attrs, op), {"x": shape}, {}


def binary(op, a_shape, b_shape, b_const=False):
    if b_const:
        return G.Node(op, ["x", "b"], ["y"], {}, op), {"x": a_shape}, {"b": randn(*b_shape) + 3}
    return G.Node(op, ["x", "z"], ["y"], {}, op), {"x": a_shape, "z": b_shape}, {}


CASES = {
    "conv3x3": conv((2, 4, 10, 10), 8, (3, 3), pads=(1, 1, 1, 1), act="relu"),
    "conv_b1": conv((1, 4, 10, 10), 8, (3, 3), pads=(1, 1, 1, 1)),
    "conv_asym_pad": conv((2, 3, 9, 7), 5, (3, 3), pads=(0, 1, 2, 1)),
    "conv_stride2": conv((2, 3, 11, 11), 4, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
    "conv_dilation": conv((2, 3, 12, 12), 4, (3, 3), dil=(2, 2), act="sigmoid"),
    "conv_groups": conv((2, 6, 8, 8), 4, (3, 3), groups=2, pads=(1, 1, 1, 1), act="tanh"),
    "conv_depthwise": conv((2, 6, 8, 8), 6, (3, 3), groups=6, pads=(1, 1, 1, 1)),
    "conv_depthwise_s2": conv((1, 6, 9, 9), 6, (3, 3), groups=6, strides=(2, 2),
                              pads=(1, 1, 1, 1), act="clip", lo=0.0, hi=6.0),
    "conv1x1": conv((2, 8, 5, 5), 16, (1, 1), bias=False, act="leaky_relu", alpha=0.1),
    "conv1x1_b1": conv((1, 8, 5, 5), 16, (1, 1)),
    "conv1x1_stride2": conv((2, 8, 6, 6), 4, (1, 1), strides=(2, 2)),
    "conv_7x7_s2": conv((1, 3, 20, 20), 8, (7, 7), strides=(2, 2), pads=(3, 3, 3, 3)),
    "conv_1x3": conv((2, 3, 6, 6), 4, (1, 3), pads=(0, 1, 0, 1)),
    "dense": dense((5, 16), 8, act="relu"),
    "dense_b1": dense((1, 16), 64),
    "dense_3d": dense((2, 3, 7), 4, bias=False),
    "dense_leaky": dense((4, 6), 3, act="leaky_relu", alpha=0.2),
    "maxpool": pool("maxpool", (2, 2), (2, 2)),
    "maxpool_pad": pool("maxpool", (3, 3), (2, 2), (1, 1, 1, 1)),
    "maxpool_ceil": pool("maxpool", (3, 3), (2, 2), ceil=1, shape=(2, 3, 8, 8)),
    "maxpool_dil": pool("maxpool", (2, 2), (1, 1), dil=(2, 2)),
    "avgpool": pool("avgpool", (3, 3), (2, 2), (1, 1, 1, 1), count_include_pad=0),
    "avgpool_incl": pool("avgpool", (3, 3), (2, 2), (1, 1, 1, 1), count_include_pad=1),
    "avgpool_ceil": pool("avgpool", (3, 3), (2, 2), ceil=1, shape=(1, 2, 8, 8),
                         count_include_pad=0),
    "global_avgpool": unary("global_avgpool"),
    "relu": unary("activation", fn="relu"),
    "leaky_relu": unary("activation", fn="leaky_relu", alpha=0.3),
    "sigmoid": unary("activation", fn="sigmoid"),
    "tanh": unary("activation", fn="tanh"),
    "clip": unary("activation", fn="clip", lo=-0.5, hi=0.7),
    "softmax_last": unary("softmax", axis=-1),
    "softmax_c": unary("softmax", axis=1),
    "reduce_sum": unary("reduce", fn="sum", axes=(2, 3), keepdims=1),
    "reduce_mean": unary("reduce", fn="mean", axes=(1,), keepdims=0),
    "reduce_max": unary("reduce", fn="max", axes=(-1,), keepdims=1),
    "pad": unary("pad", pads=(0, 0, 1, 2, 0, 0, 3, 0), value=0.5),
    "pad_crop": unary("pad", pads=(0, 0, -1, 2, 0, 0, 1, -2), value=0.0),
    "transpose": unary("transpose", perm=(0, 2, 3, 1)),
    "add": binary("add", (2, 3, 4), (2, 3, 4)),
    "add_bcast": binary("add", (2, 3, 4, 5), (3, 1, 1), b_const=True),
    "sub_bcast": binary("sub", (2, 4, 5), (2, 1, 5)),
    "mul_const": binary("mul", (2, 4, 5), (5,), b_const=True),
    "div_const": binary("div", (2, 4, 5), (4, 1), b_const=True),
}


def concat_case():
    node = G.Node("concat", ["x", "z"], ["y"], {"axis": 1}, "concat")
    return node, {"x": (2, 3, 4), "z": (2, 5, 4)}, {}


CASES["concat"] = concat_case()


def run_case(node, shapes, consts, device):
    graph = G.Graph([node], [G.TensorInfo(n, s) for n, s in shapes.items()], ["y"], dict(consts))
    feeds = {n: randn(*s) for n, s in shapes.items()}
    got = Model(graph, device)(feeds)
    want = reference.evaluate(node, [feeds.get(i, consts.get(i)) for i in node.inputs])[0]
    return got, want


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_reference(name, device):
    got, want = run_case(*CASES[name], device)
    assert_close(got, want, "float32", f"{name} on {device.spec}")


@pytest.mark.parametrize("fn", ["relu", "sigmoid", "tanh", "leaky_relu"])
def test_nan_propagates(fn, device):
    node = G.Node("activation", ["x"], ["y"], {"fn": fn, "alpha": 0.1}, fn)
    graph = G.Graph([node], [G.TensorInfo("x", (1, 4))], ["y"], {})
    y = Model(graph, device)(np.array([[np.nan, 1.0, -1.0, np.inf]], np.float32))
    assert np.isnan(y[0, 0]) and np.isfinite(y[0, 1:3]).all()


def test_sigmoid_saturates_without_warnings(device):
    node = G.Node("activation", ["x"], ["y"], {"fn": "sigmoid"}, "sig")
    graph = G.Graph([node], [G.TensorInfo("x", (1, 3))], ["y"], {})
    with np.errstate(all="raise"):
        y = Model(graph, device)(np.array([[-1000.0, 0.0, 1000.0]], np.float32))
    np.testing.assert_allclose(y, [[0.0, 0.5, 1.0]])
