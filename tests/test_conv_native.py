"""Convolutions that take the cpu device's native kernels (csrc/conv_kernels.cpp: direct,
im2col + SGEMM, pooling, large dense on the pool), on every device, against onnxruntime; and
the cpu device's thread count (offload.set_num_threads)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import offload
import conv1d_models
from conftest import assert_close

RNG = np.random.default_rng(5)


def conv_model(x_shape, m, k, strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), residual=False,
               relu=True, pool=False, pool2=None):
    c = x_shape[1]
    w = (RNG.standard_normal((m, c) + k) * 0.3).astype(np.float32)
    b = RNG.standard_normal(m).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], "conv", kernel_shape=list(k),
                              strides=list(strides), pads=[pads[0], pads[1], pads[2], pads[3]],
                              dilations=list(dil))]
    out = "c"
    if residual:
        nodes.append(helper.make_node("Add", ["c", "r"], ["a"], "add"))
        out = "a"
    if relu:
        nodes.append(helper.make_node("Relu", [out], ["y0"], "relu"))
        out = "y0"
    if pool:
        nodes.append(helper.make_node("MaxPool", [out], ["y1"], "pool", kernel_shape=[1, 2],
                                      strides=[1, 2]))
        out = "y1"
    if pool2:  # "MaxPool" / "AveragePool", 2x2 stride 2: the cpu device fuses it into the conv
        nodes.append(helper.make_node(pool2, [out], ["y2"], "pool2", kernel_shape=[2, 2],
                                      strides=[2, 2]))
        out = "y2"
    nodes.append(helper.make_node("Identity", [out], ["y"], "out"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    oh = (x_shape[2] + pads[0] + pads[2] - dil[0] * (k[0] - 1) - 1) // strides[0] + 1
    ow = (x_shape[3] + pads[1] + pads[3] - dil[1] * (k[1] - 1) - 1) // strides[1] + 1
    if residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT,
                                                    [x_shape[0], m, oh, ow]))
    graph = helper.make_graph(nodes, "conv", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [x_shape[0], m,
                                                              oh // 2 if pool2 else oh,
                                                              (ow // 2 if pool or pool2 else
                                                               ow)])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


CASES = {  # x shape, out channels, kernel, extra
    "thin_1_16": ((2, 1, 40, 40), 16, (3, 3), dict(pads=(1, 1, 1, 1))),
    "thin_16_32": ((3, 16, 20, 20), 32, (3, 3), dict(pads=(1, 1, 1, 1), residual=True)),
    "conv1d_h1": ((4, 42, 1, 50), 32, (1, 3), dict(pads=(0, 1, 0, 1), residual=True)),
    "conv1d_h1_pool": ((2, 8, 1, 30), 12, (1, 5), dict(pads=(0, 2, 0, 2), pool=True)),
    "conv1d_dilated": ((2, 8, 1, 30), 12, (1, 3), dict(dil=(1, 2), relu=False)),
    "conv1x1_gemm": ((3, 24, 7, 7), 20, (1, 1), dict(residual=True)),
    "conv3x3_wide": ((2, 64, 9, 9), 40, (3, 3), dict(pads=(1, 1, 1, 1))),
    "conv_strided": ((2, 8, 13, 11), 10, (3, 3), dict(strides=(2, 2), pads=(1, 0, 1, 2))),
    # a 2x2 stride-2 pool fused into the conv (odd sizes: the last row/column dropped)
    "thin_maxpool": ((3, 1, 41, 39), 16, (3, 3), dict(pads=(1, 1, 1, 1), pool2="MaxPool")),
    "thin_avgpool": ((2, 16, 20, 21), 32, (3, 3), dict(pads=(1, 1, 1, 1), relu=False,
                                                        pool2="AveragePool")),
    "wide_maxpool": ((2, 64, 9, 10), 40, (3, 3), dict(pads=(1, 1, 1, 1), pool2="MaxPool")),
    "strided_avgpool": ((2, 8, 13, 11), 10, (3, 3), dict(strides=(2, 2), pads=(1, 0, 1, 2),
                                                          pool2="AveragePool")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_matches_onnxruntime(name, device):
    shape, m, k, extra = CASES[name]
    model = conv_model(shape, m, k, **extra)
    feeds = {"x": RNG.standard_normal(shape).astype(np.float32)}
    if extra.get("residual"):
        shp = [d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim]
        feeds["r"] = RNG.standard_normal(shp).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = offload.load(model.SerializeToString(), device=device.spec)(feeds)
    assert_close(got, want, "float32", f"{name} on {device.spec}")


def test_a_2x2_pool_after_a_conv_is_fused_on_the_cpu_device():
    from offload import bench
    for name in ("thin_maxpool", "wide_maxpool"):
        shape, m, k, extra = CASES[name]
        model = offload.load(conv_model(shape, m, k, **extra).SerializeToString(), device="cpu")
        ops = {row["op"] for row in bench.profile(model, RNG.standard_normal(shape).astype(
            np.float32), runs=1)["by_op"]}
        assert "maxpool" not in ops and "conv2d" in ops, (name, ops)


@pytest.mark.parametrize("batch", [1, 7])
def test_conv1d_resnet_matches_onnxruntime(batch, device):
    model = conv1d_models.build()
    x = conv1d_models.sample(batch)
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = offload.load(model.SerializeToString(), device=device.spec)(x)
    assert_close(got, want, "float32", f"conv1d resnet b{batch} on {device.spec}")


def test_results_do_not_depend_on_the_thread_count():
    model = conv1d_models.build()
    x = conv1d_models.sample(64)
    old = offload.get_num_threads()
    try:
        offload.set_num_threads(1)
        one = offload.load(model.SerializeToString(), device="cpu")(x)
        offload.set_num_threads(3)
        assert offload.get_num_threads() == 3
        three = offload.load(model.SerializeToString(), device="cpu")(x)
    finally:
        offload.set_num_threads(old)
    np.testing.assert_array_equal(one, three)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True, None])
def test_set_num_threads_refuses_what_is_not_a_count(bad):
    with pytest.raises(offload.ArgumentError, match="set_num_threads"):
        offload.set_num_threads(bad)


def test_default_thread_count_comes_from_the_environment_or_the_affinity(monkeypatch):
    import os
    from offload.drivers import cpu
    monkeypatch.setenv("OFFLOAD_NUM_THREADS", "3")
    assert cpu._default_threads() == 3
    monkeypatch.setenv("OFFLOAD_NUM_THREADS", "lots")
    with pytest.warns(UserWarning, match="OFFLOAD_NUM_THREADS"):
        assert cpu._default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OFFLOAD_NUM_THREADS")
    assert cpu._default_threads() == len(os.sched_getaffinity(0))


def test_openblas_is_held_at_one_thread_when_offload_calls_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from offload.drivers import cpu
    if not cpu.native_blas():
        pytest.skip("NumPy's BLAS is not an OpenBLAS that offload calls from its own pool")
    offload.set_num_threads(offload.get_num_threads())
    blas = [lib for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas if lib["internal_api"] == "openblas")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no os.fork on this platform")
def test_a_forked_child_gets_its_own_pool():
    import os
    model = conv1d_models.build()
    x = conv1d_models.sample(64)
    m = offload.load(model.SerializeToString(), device="cpu")
    want = m(x)  # the parent's pool has run: its helper threads exist
    pid = os.fork()
    if pid == 0:  # the child: no helper threads; the pool is made again at its first op
        try:
            ok = np.array_equal(m(x), want) and np.array_equal(m(x), want)
        finally:
            os._exit(0 if locals().get("ok") else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(m(x), want)
