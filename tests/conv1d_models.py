"""A DeepBoostedJet-sized 1-D ResNet as ONNX (seeded weights): the particle axis is the width
of a 2-D convolution with H = 1, because this branch's importer takes 2-D Conv only.

    build(batch_dim="N", features=42, particles=100, widths=(32, 64, 64, 128)) -> ModelProto

Input ``input`` [N, features, 1, particles]; output ``output`` [N, 5] (softmax). A 1x1 stem conv
to widths[0], then per width one residual block: conv(1x3)-BN-ReLU-conv(1x3)-BN, plus the block
input (through a 1x1 conv where the width changes), ReLU; global average pooling, Gemm, Softmax.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = 5


def build(batch_dim="N", features=42, particles=100, widths=(32, 64, 64, 128), seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(name, x, cin, cout, k):
        w = rng.standard_normal((cout, cin, 1, k)) * np.sqrt(2.0 / (cin * k))
        b = rng.standard_normal(cout) * 0.05
        nodes.append(helper.make_node("Conv", [x, weight(name + ".w", w), weight(name + ".b", b)],
                                      [name], name, kernel_shape=[1, k],
                                      pads=[0, k // 2, 0, k // 2], strides=[1, 1]))
        return name

    def bn(name, x, c):
        ins = [x] + [weight(f"{name}.{p}", v) for p, v in (
            ("scale", rng.uniform(0.5, 1.0, c)), ("bias", rng.standard_normal(c) * 0.1),
            ("mean", rng.standard_normal(c) * 0.1), ("var", rng.uniform(0.5, 1.5, c)))]
        nodes.append(helper.make_node("BatchNormalization", ins, [name], name, epsilon=1e-5))
        return name

    def relu(name, x):
        nodes.append(helper.make_node("Relu", [x], [name], name))
        return name

    x = relu("stem.relu", bn("stem.bn", conv("stem", "input", features, widths[0], 1),
                             widths[0]))
    cin = widths[0]
    for i, c in enumerate(widths):
        p = f"block{i}"
        y = relu(p + ".relu1", bn(p + ".bn1", conv(p + ".conv1", x, cin, c, 3), c))
        y = bn(p + ".bn2", conv(p + ".conv2", y, c, c, 3), c)
        short = x if cin == c else conv(p + ".short", x, cin, c, 1)
        nodes.append(helper.make_node("Add", [y, short], [p + ".add"], p + ".add"))
        x = relu(p + ".relu2", p + ".add")
        cin = c
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], "pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], "flatten", axis=1))
    w = rng.standard_normal((CLASSES, cin)) * np.sqrt(1.0 / cin)
    nodes.append(helper.make_node("Gemm", ["flat", weight("fc.w", w),
                                           weight("fc.b", np.zeros(CLASSES))],
                                  ["logits"], "fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["output"], "softmax", axis=-1))
    graph = helper.make_graph(
        nodes, "conv1d_resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       [batch_dim, features, 1, particles])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch_dim, CLASSES])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sample(batch, features=42, particles=100, seed=0):
    return np.random.default_rng(seed).standard_normal(
        (batch, features, 1, particles)).astype(np.float32)
