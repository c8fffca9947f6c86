"""Integer and bool tensors through the plan, inputs of the declared dtype, and the typed
errors of index ops (every device against onnxruntime where it runs)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import offload


def _model(nodes, inputs, outputs, opset=21, inits=()):
    g = h.make_graph(nodes, "types", [h.make_tensor_value_info(*i) for i in inputs],
                     [h.make_tensor_value_info(*o) for o in outputs], list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _ort(m, feeds):
    return ort.InferenceSession(m.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def test_int64_and_bool_inputs_and_outputs(device):
    """An int64 index input, a bool mask input; int64, bool and float outputs."""
    m = _model([h.make_node("Gather", ["x", "idx"], ["g"], axis=1),
                h.make_node("Cast", ["mask"], ["mf"], to=T.FLOAT),
                h.make_node("Mul", ["g", "mf"], ["y"]),
                h.make_node("Add", ["idx", "idx"], ["idx2"]),
                h.make_node("Not", ["mask"], ["nmask"])],
               [("x", T.FLOAT, ["N", 6]), ("idx", T.INT64, [3]), ("mask", T.BOOL, ["N", 3])],
               [("y", T.FLOAT, ["N", 3]), ("idx2", T.INT64, [3]), ("nmask", T.BOOL, ["N", 3])])
    model = offload.load(m, device=device)
    assert [np.dtype(t.dtype).name for t in model.inputs] == ["float32", "int64", "bool"]
    rng = np.random.default_rng(0)
    for n in (1, 4):
        feeds = {"x": rng.standard_normal((n, 6)).astype(np.float32),
                 "idx": np.array([5, -1, 2], np.int64), "mask": rng.random((n, 3)) > 0.5}
        for got, want in zip(model(feeds), _ort(m, feeds)):
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_wrong_dtype_for_an_int64_input_is_a_typed_error():
    m = _model([h.make_node("Gather", ["x", "idx"], ["y"], axis=0)],
               [("x", T.FLOAT, [4, 2]), ("idx", T.INT64, [3])], [("y", T.FLOAT, [3, 2])])
    model = offload.load(m)
    with pytest.raises(offload.ShapeError, match=r"input 'idx'.*expected dtype int64.*float32"):
        model(np.zeros((4, 2), np.float32), np.zeros(3, np.float32))


def test_gather_index_out_of_range_is_a_typed_error():
    m = _model([h.make_node("Gather", ["x", "idx"], ["y"], axis=0, name="pick")],
               [("x", T.FLOAT, [4, 2]), ("idx", T.INT64, [3])], [("y", T.FLOAT, [3, 2])])
    model = offload.load(m)
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(offload.ShapeError, match=r"Gather node 'pick': index 7 is outside "
                                                 r"\[-4, 3\] for axis 0"):
        model(x, np.array([0, 7, 1], np.int64))
    np.testing.assert_array_equal(model(x, np.array([0, -4, 3], np.int64)), np.zeros((3, 2)))


def test_gather_index_out_of_range_on_kernel_devices_reads_nan(device):
    """The kernel devices do not stop on a bad index (no host round trip per call): the value
    read is NaN, never another element."""
    if device.kind == "cpu":
        pytest.skip("the cpu device raises ShapeError (test above)")
    m = _model([h.make_node("Gather", ["x", "idx"], ["y"], axis=0)],
               [("x", T.FLOAT, [4, 2]), ("idx", T.INT64, [2])], [("y", T.FLOAT, [2, 2])])
    y = offload.load(m, device=device)(np.ones((4, 2), np.float32), np.array([1, 9], np.int64))
    assert np.all(y[0] == 1) and np.all(np.isnan(y[1]))


def test_reshape_that_does_not_fit_names_node_and_sizes():
    shape = h.make_tensor("shape", T.INT64, [2], [-1, 7])
    m = _model([h.make_node("Reshape", ["x", "shape"], ["y"], name="flat")],
               [("x", T.FLOAT, ["N", 4])], [("y", T.FLOAT, [None, 7])], inits=[shape])
    model = offload.load(m)
    with pytest.raises(offload.ShapeError, match=r"Reshape node 'flat': cannot reshape input "
                                                 r"\[3, 4\] \(12 elements\) to \[-1, 7\]"):
        model(np.zeros((3, 4), np.float32))


def test_topk_k_larger_than_axis_names_node_tensor_and_sizes(device):
    k = h.make_tensor("k", T.INT64, [1], [5])
    m = _model([h.make_node("TopK", ["x", "k"], ["v", "i"], name="knn")],
               [("x", T.FLOAT, ["N", "P"])], [("v", T.FLOAT, ["N", 5]), ("i", T.INT64, ["N", 5])],
               inits=[k])
    model = offload.load(m, device=device)
    x = np.random.default_rng(1).standard_normal((2, 9)).astype(np.float32)
    for got, want in zip(model(x), _ort(m, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(offload.ShapeError, match=r"TopK node 'knn': k = 5 but axis 1 of input "
                                                 r"'x' \[2, 3\] has 3 elements"):
        model(x[:, :3])


def test_topk_ties_go_to_the_lower_index(device):
    k = h.make_tensor("k", T.INT64, [1], [3])
    m = _model([h.make_node("TopK", ["x", "k"], ["v", "i"], largest=0)],
               [("x", T.FLOAT, ["N", 6])], [("v", T.FLOAT, ["N", 3]), ("i", T.INT64, ["N", 3])],
               inits=[k])
    x = np.array([[2, 1, 1, 0, 1, 0]], np.float32)
    got = offload.load(m, device=device)(x)
    want = _ort(m, {"x": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[1], [[3, 5, 1]])


@pytest.mark.parametrize("exclusive, reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_cumsum_with_a_constant_axis(device, exclusive, reverse):
    axis = h.make_tensor("axis", T.INT64, [], [-1])
    m = _model([h.make_node("CumSum", ["x", "axis"], ["y"], exclusive=exclusive,
                            reverse=reverse)],
               [("x", T.FLOAT, ["N", 3, 7])], [("y", T.FLOAT, ["N", 3, 7])], inits=[axis])
    x = np.random.default_rng(2).standard_normal((2, 3, 7)).astype(np.float32)
    np.testing.assert_allclose(offload.load(m, device=device)(x), _ort(m, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("upper, k", [(1, 0), (0, -1), (1, 2)])
def test_trilu_with_a_constant_k(device, upper, k):
    kk = h.make_tensor("k", T.INT64, [], [k])
    m = _model([h.make_node("Trilu", ["x", "k"], ["y"], upper=upper)],
               [("x", T.FLOAT, ["N", 4, 5])], [("y", T.FLOAT, ["N", 4, 5])], inits=[kk])
    x = np.random.default_rng(3).standard_normal((2, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(offload.load(m, device=device)(x), _ort(m, {"x": x})[0])


@pytest.mark.parametrize("axis, bias", [(-1, True), (-2, False), (1, True)])
def test_layernorm_fused_with_constant_scale(device, axis, bias):
    """LayerNormalization with constant scale/bias runs as the fused layernorm op."""
    rng = np.random.default_rng(4)
    norm = (5, 6)[axis:] if axis < 0 else (5, 6)[axis - 1:]
    inits = [h.make_tensor("s", T.FLOAT, norm, rng.uniform(0.5, 1.5, norm).reshape(-1))]
    inputs = ["x", "s"]
    if bias:
        inits.append(h.make_tensor("b", T.FLOAT, norm, rng.standard_normal(norm).reshape(-1)))
        inputs.append("b")
    m = _model([h.make_node("LayerNormalization", inputs, ["y"], axis=axis, epsilon=1e-5)],
               [("x", T.FLOAT, ["N", 5, 6])], [("y", T.FLOAT, ["N", 5, 6])], inits=inits)
    model = offload.load(m, device=device)
    assert any(n.op == "layernorm" for n in model.graph.nodes)
    x = (rng.standard_normal((3, 5, 6)) * 3 + 1).astype(np.float32)
    np.testing.assert_allclose(model(x), _ort(m, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_layernorm_written_out_is_fused(device, tmp_path):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add (LayerNorm before opset 17) becomes one
    layernorm node and matches onnxruntime."""
    torch = pytest.importorskip("torch")

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.rand(6) + 0.5)
            self.b = torch.nn.Parameter(torch.randn(6))

        def forward(self, x):
            d = x - x.mean(-1, keepdim=True)
            return d / torch.sqrt((d ** 2).mean(-1, keepdim=True) + 1e-5) * self.w + self.b

    torch.manual_seed(0)
    path = tmp_path / "ln.onnx"
    torch.onnx.export(Norm(), (torch.randn(2, 5, 6),), str(path), dynamo=False, opset_version=13,
                      input_names=["x"], dynamic_axes={"x": {0: "N"}})
    model = offload.load(path, device=device)
    assert [n.op for n in model.graph.nodes] == ["layernorm"]
    x = (np.random.default_rng(6).standard_normal((3, 5, 6)) * 3).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(model(x), want[0], rtol=1e-4, atol=1e-5)
