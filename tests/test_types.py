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
    with pytest.raises(offload.ShapeError, match=r"Gather node 'pick': index 7 at position "
                                                 r"\(1,\) of the indices is outside "
                                                 r"\[-4, 3\] for axis 0"):
        model(x, np.array([0, 7, 1], np.int64))
    np.testing.assert_array_equal(model(x, np.array([0, -4, 3], np.int64)), np.zeros((3, 2)))


_BAD_INDEX = {  # op, indices (one outside), attrs, data shape, what the message names
    "Gather": ([1, 9], {"axis": 0}, [4, 2], r"index 9 at position \(1,\) .* axis 0 \(size 4\)"),
    "GatherElements": ([[0, 1], [-5, 0]], {"axis": 0}, [4, 2],
                       r"index -5 at position \(1, 0\) .* axis 0 \(size 4\)"),
    "GatherND": ([[1, 0], [0, 2]], {}, [4, 2], r"index 2 at position \(1, 1\) .* axis 1 "
                 r"\(size 2\)"),
    "ScatterND": ([[3], [4]], {}, [4, 2], r"index 4 at position \(1, 0\) .* axis 0 "
                  r"\(size 4\)"),
}


@pytest.mark.parametrize("op", sorted(_BAD_INDEX))
def test_index_out_of_range_is_a_typed_error_on_every_device(device, op):
    """A run-time index outside its axis is a ShapeError naming node, index value, position
    and axis size on every device (kernel devices: an error flag read after the run); the
    next call with good indices runs normally."""
    bad, attrs, shape, message = _BAD_INDEX[op]
    bad = np.array(bad, np.int64)
    ins = [("x", T.FLOAT, shape), ("idx", T.INT64, list(bad.shape))]
    names = ["x", "idx"]
    if op == "ScatterND":
        ins.append(("u", T.FLOAT, [2, 2]))
        names.append("u")
    out_shape = {"Gather": [2, 2], "GatherElements": [2, 2], "GatherND": [2],
                 "ScatterND": shape}[op]
    m = _model([h.make_node(op, names, ["y"], name="pick", **attrs)], ins,
               [("y", T.FLOAT, out_shape)])
    model = offload.load(m, device=device)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "idx": bad}
    if op == "ScatterND":
        feeds["u"] = rng.standard_normal((2, 2)).astype(np.float32)
    with pytest.raises(offload.ShapeError, match=rf"{op} node 'pick': " + message):
        model(feeds)
    good = dict(feeds, idx=np.where(bad > 3, 1, np.where(bad < -4, 0, bad)))
    if op == "GatherND":
        good["idx"] = np.minimum(good["idx"], [3, 1])
    np.testing.assert_allclose(model(good), _ort(m, good)[0], rtol=1e-6)


_TYPED_DATA = [(T.INT64, np.int64), (T.INT32, np.int32), (T.BOOL, np.bool_),
               (T.FLOAT, np.float32)]


@pytest.mark.parametrize("elem,dtype", _TYPED_DATA, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("index_elem,index_dtype", [(T.INT64, np.int64), (T.INT32, np.int32)],
                         ids=["i64", "i32"])
def test_index_ops_move_integer_and_bool_data(device, elem, dtype, index_elem, index_dtype):
    """Gather, GatherElements, GatherND and ScatterND on int64/int32/bool/float data with
    int64 or int32 run-time indices (GatherND/ScatterND: int64, as ONNX defines them) match
    onnxruntime."""
    nodes = [h.make_node("Gather", ["x", "i"], ["g"], axis=1),
             h.make_node("GatherElements", ["x", "e"], ["ge"], axis=1),
             h.make_node("GatherND", ["x", "n"], ["gn"]),
             h.make_node("ScatterND", ["x", "n", "u"], ["s"])]
    m = _model(nodes, [("x", elem, [3, 5]), ("i", index_elem, [4]), ("e", index_elem, [3, 2]),
                       ("n", T.INT64, [2, 2]), ("u", elem, [2])],
               [("g", elem, [3, 4]), ("ge", elem, [3, 2]), ("gn", elem, [2]),
                ("s", elem, [3, 5])])
    rng = np.random.default_rng(2)
    x = rng.integers(-50, 50, (3, 5))
    feeds = {"x": (x > 0) if dtype is np.bool_ else x.astype(dtype),
             "i": np.array([4, -1, 0, 2], index_dtype),
             "e": np.array([[0, 4], [-2, 1], [3, 3]], index_dtype),
             "n": np.array([[2, 4], [-3, 0]], np.int64),
             "u": np.array([1, 0], dtype)}
    model = offload.load(m, device=device)
    for got, want in zip(model(feeds), _ort(m, feeds)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("elem,dtype", [(T.INT64, np.int64), (T.INT32, np.int32)],
                         ids=["int64", "int32"])
def test_topk_of_integer_data(device, elem, dtype):
    """TopK of int64/int32 values (beyond float32's exact integers, ties to the lower index)
    matches onnxruntime: values and indices."""
    k = h.make_tensor("k", T.INT64, [1], [3])
    m = _model([h.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=1)],
               [("x", elem, [2, 6])], [("v", elem, [2, 3]), ("i", T.INT64, [2, 3])],
               inits=[k])
    big = 2 ** 40 + 1 if dtype is np.int64 else 2 ** 30 + 1
    x = np.array([[5, big, big - 1, 5, -7, big], [0, 0, 1, -1, 3, 3]], dtype)
    got = offload.load(m, device=device)(x)
    for g, w in zip(got, _ort(m, {"x": x})):
        np.testing.assert_array_equal(g, w)


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


# ------------------------------------------------------------------ host steps (plan.HostSplit)

def _branches(shape):
    two = h.make_tensor("two", T.FLOAT, [], [2.0])
    then = h.make_graph([h.make_node("Mul", ["x", "two"], ["ty"])], "then", [],
                        [h.make_tensor_value_info("ty", T.FLOAT, shape)], [two])
    other = h.make_graph([h.make_node("Neg", ["x"], ["ey"])], "else", [],
                         [h.make_tensor_value_info("ey", T.FLOAT, shape)])
    return {"then_branch": then, "else_branch": other}


def _host_cases():
    zero_f = h.make_tensor("z", T.FLOAT, [], [0.0])
    yield "nonzero", _model(
        [h.make_node("Greater", ["x", "z"], ["b"]), h.make_node("NonZero", ["b"], ["nz"]),
         h.make_node("Transpose", ["nz"], ["t"]), h.make_node("GatherND", ["x", "t"], ["y"]),
         h.make_node("Relu", ["y"], ["r"])],
        [("x", T.FLOAT, [3, 4])], [("r", T.FLOAT, ["a"]), ("nz", T.INT64, [2, "a"])],
        inits=[zero_f]), [{}]
    yield "topk_k_input", _model(
        [h.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)],
        [("x", T.FLOAT, [3, 4]), ("k", T.INT64, [1])],
        [("v", T.FLOAT, [3, "k"]), ("i", T.INT64, [3, "k"])]), [
        {"k": np.array([2], np.int64)}, {"k": np.array([3], np.int64)}]
    yield "reshape_shape_input", _model(
        [h.make_node("Reshape", ["x", "s"], ["y"]), h.make_node("Exp", ["y"], ["e"])],
        [("x", T.FLOAT, [3, 4]), ("s", T.INT64, [2])], [("e", T.FLOAT, ["a", "b"])]), [
        {"s": np.array([2, 6], np.int64)}, {"s": np.array([-1, 3], np.int64)}]
    yield "range_of_data", _model(
        [h.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
         h.make_node("Cast", ["mx"], ["c"], to=T.INT64),
         h.make_node("Range", ["zero", "c", "one"], ["r"])],
        [("x", T.FLOAT, [3, 4])], [("r", T.INT64, ["a"])],
        inits=[h.make_tensor("zero", T.INT64, [], [0]), h.make_tensor("one", T.INT64, [], [1])]
    ), [{}]
    yield "if_on_data", _model(
        [h.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         h.make_node("Greater", ["s", "z"], ["c"]),
         h.make_node("If", ["c"], ["y"], **_branches([3, 4])),
         h.make_node("Relu", ["y"], ["r"])],
        [("x", T.FLOAT, [3, 4])], [("r", T.FLOAT, [3, 4])], inits=[zero_f]), [
        {"sign": 1.0}, {"sign": -1.0}]
    yield "if_on_shape", _model(
        [h.make_node("Shape", ["x"], ["sh"]), h.make_node("Gather", ["sh", "zi"], ["n"]),
         h.make_node("Equal", ["n", "three"], ["c"]),
         h.make_node("If", ["c"], ["y"], **_branches(["N", 4]))],
        [("x", T.FLOAT, ["N", 4])], [("y", T.FLOAT, ["N", 4])],
        inits=[h.make_tensor("zi", T.INT64, [], [0]), h.make_tensor("three", T.INT64, [], [3])]
    ), [{"rows": 3}, {"rows": 2}]
    yield "if_constant", _model(
        [h.make_node("If", ["c"], ["y"], **_branches([3, 4]))],
        [("x", T.FLOAT, [3, 4])], [("y", T.FLOAT, [3, 4])],
        inits=[h.make_tensor("c", T.BOOL, [], [False])]), [{}]


@pytest.mark.parametrize("case", list(_host_cases()), ids=lambda c: c[0])
def test_host_steps_match_onnxruntime(device, case):
    """Nodes whose output shape or parameters follow from run-time values (NonZero; k, shape,
    Range limits from the data; If on a run-time, shape-derived or constant condition) run:
    the plan stops there, the host reads the values, the rest continues."""
    _, m, calls = case
    model = offload.load(m, device=device)
    rng = np.random.default_rng(3)
    for extra in calls:
        x = rng.standard_normal((extra.get("rows", 3), 4)).astype(np.float32)
        if "sign" in extra:
            x = extra["sign"] * np.abs(x)
        feeds = {"x": x * 3, **{k: v for k, v in extra.items() if isinstance(v, np.ndarray)}}
        got = model(feeds)
        got = got if isinstance(got, (list, tuple)) else [got]
        for g, w in zip(got, _ort(m, feeds)):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_host_step_model_refuses_out_arrays_with_a_reason():
    _, m, _ = next(c for c in _host_cases() if c[0] == "nonzero")
    model = offload.load(m)
    with pytest.raises(offload.ShapeError, match=r"NonZero node .* is a host step"):
        model(np.ones((3, 4), np.float32), out=[np.empty(12, np.float32)] * 2)


def test_opset_semantics_table_names_real_versions():
    """Every version in onnx_import.OPSET_SEMANTICS is one where onnx's schema of that op
    changes (so the table cannot drift from the standard)."""
    import onnx.defs
    from offload.onnx_import import OPSET_SEMANTICS
    for op, changes in OPSET_SEMANTICS.items():
        for version, _ in changes:
            assert onnx.defs.get_schema(op, version, "").since_version == version, (op, version)


def test_opset6_broadcast_at_an_axis(device):
    """Add of opset 6 with broadcast=1 and an axis aligns B at that axis (not at the end)."""
    g = h.make_graph([h.make_node("Add", ["a", "b"], ["y"], broadcast=1, axis=1, name="legacy")],
                     "v6", [h.make_tensor_value_info("a", T.FLOAT, [2, 3, 4]),
                            h.make_tensor_value_info("b", T.FLOAT, [3])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 3, 4])],
                     [h.make_tensor("b", T.FLOAT, [3], [1.0, 2.0, 3.0])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 6)])
    m.ir_version = 3
    a = np.zeros((2, 3, 4), np.float32)
    y = offload.load(m, device=device)(a)
    np.testing.assert_array_equal(y, a + np.array([1, 2, 3], np.float32)[:, None])


def test_a_semantics_change_not_implemented_is_refused_naming_op_and_version():
    """BatchNormalization of opset 7 with spatial=0 (per-element statistics) is refused with
    op and version."""
    c = [h.make_tensor(n, T.FLOAT, [3, 4], np.ones(12, np.float32)) for n in "sbmv"]
    g = h.make_graph([h.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                                  spatial=0, name="bn")], "v7",
                     [h.make_tensor_value_info("x", T.FLOAT, [2, 3, 4])] +
                     [h.make_tensor_value_info(n, T.FLOAT, [3, 4]) for n in "sbmv"],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 3, 4])], c)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 7)])
    m.ir_version = 3
    with pytest.raises(offload.UnsupportedOpError, match=r"BatchNormalization \(node 'bn'\): "
                                                         r"BatchNormalization version 7 "
                                                         r"\(opset 7\): spatial=0"):
        offload.load(m)


def test_load_path_layers_only_go_down():
    """import (onnx_import) -> passes -> plan only goes down: the IR (graph.py), the checks,
    the passes and the plan never import onnx_import (shape inference and the unsupported-op
    report are the IR's), and the IR imports neither passes nor plan."""
    import ast
    from pathlib import Path
    root = Path(offload.__file__).parent
    below = {"graph": {"onnx_import", "passes", "plan"}, "checks": {"onnx_import", "passes"},
             "passes": {"onnx_import", "plan"}, "plan": {"onnx_import", "passes"},
             "fusions": {"onnx_import", "passes", "plan"},
             "batch_axis": {"onnx_import", "passes"}}
    for module, banned in below.items():
        tree = ast.parse((root / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names.add((node.module or "").split(".")[-1])
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name.split(".")[-1] for a in node.names)
        assert not names & banned, f"{module}.py imports {sorted(names & banned)}"


@pytest.mark.parametrize("bias_shape", [[2, 3, 6, 6], [2, 1, 1, 6]], ids=["full", "broadcast"])
def test_fused_attention_softmax_matches_onnxruntime(device, bias_shape):
    """softmax(scores / c + bias) fused into one step: rows far below the others (their sum
    underflows against a shared maximum) and fully masked rows (-inf: NaN, as onnxruntime)
    come out as onnxruntime's."""
    c = h.make_tensor("c", T.FLOAT, [], [4.0])
    m = _model([h.make_node("Div", ["s", "c"], ["d"]), h.make_node("Add", ["d", "b"], ["a"]),
                h.make_node("Softmax", ["a"], ["y"], axis=-1)],
               [("s", T.FLOAT, [2, 3, 6, 6]), ("b", T.FLOAT, bias_shape)],
               [("y", T.FLOAT, [2, 3, 6, 6])], inits=[c])
    rng = np.random.default_rng(5)
    s = (rng.standard_normal((2, 3, 6, 6)) * 3).astype(np.float32)
    s[0, 0, :2] -= 2000.0
    s[1, 2, 3] = -np.inf
    feeds = {"s": s, "b": rng.standard_normal(bias_shape).astype(np.float32)}
    model = offload.load(m, device=device)
    got, want = model(feeds), _ort(m, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if device.kind in ("cpu", "opencl", "cuda", "cuda-emu"):
        plan = model.plan((2, 3, 6, 6), tuple(bias_shape))
        assert [s.node.op for s in plan.steps] == ["softmax"]
