"""Build every zoo model, validate it with the ONNX checker and run it in
onnxruntime; check the on-disk cache and seeding behaviour."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from offload import zoo

ort = pytest.importorskip("onnxruntime")

JET_MODELS = ("jet_mlp", "jet_cnn")
BATCHES = {"resnet50": (1,), "jet_mlp": (1, 3), "hcal_mlp": (1, 3), "jet_cnn": (1, 3)}

_built: dict[str, onnx.ModelProto] = {}


def _model(name: str) -> onnx.ModelProto:
    """build(name, seed=0), once per test session (resnet50 takes ~1 s)."""
    if name not in _built:
        _built[name] = zoo.build(name)
    return _built[name]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_names():
    assert zoo.NAMES == ("resnet50", "jet_mlp", "hcal_mlp", "jet_cnn")


@pytest.mark.parametrize("name", zoo.NAMES)
def test_model_is_valid_onnx(name):
    model = _model(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]

    graph = model.graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["output"]
    for vi, shape in ((graph.input[0], zoo.input_shape(name, 1)),
                      (graph.output[0], zoo.output_shape(name, 1))):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "N"
        assert tuple(d.dim_value for d in dims[1:]) == shape[1:]

    node_names = [n.name for n in graph.node]
    assert all(node_names), "every node must be named"
    assert len(set(node_names)) == len(node_names), "node names must be unique"
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer)


def test_resnet50_structure():
    graph = _model("resnet50").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 53
    assert ops.count("BatchNormalization") == 53
    assert ops.count("Add") == 16
    assert ops[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]
    by_name = {n.name: n for n in graph.node}
    # v1.5: stride 2 on the 3x3 conv of each downsampling stage's first block
    for stage in (2, 3, 4):
        strides = {a.name: list(a.ints) for a in by_name[f"layer{stage}.0.conv2"].attribute}
        assert strides["strides"] == [2, 2]
        strides = {a.name: list(a.ints) for a in by_name[f"layer{stage}.0.conv1"].attribute}
        assert strides["strides"] == [1, 1]
    gemm = by_name["fc"]
    assert {a.name: a.i for a in gemm.attribute if a.name == "transB"} == {"transB": 1}
    n_params = sum(
        w.size for k, w in _weights(_model("resnet50")).items()
        if not k.endswith(("running_mean", "running_var")))
    assert n_params == 25_557_032  # torchvision resnet50


def test_hcal_uses_matmul_add():
    ops = [n.op_type for n in _model("hcal_mlp").graph.node]
    assert ops[0] == "BatchNormalization"
    assert ops.count("MatMul") == 7 and ops.count("Add") == 7
    assert "Gemm" not in ops


@pytest.mark.parametrize("name", zoo.NAMES)
def test_runs_in_onnxruntime(name):
    model = _model(name)
    sess = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    for batch in BATCHES[name]:
        x = zoo.sample_input(name, batch)
        assert x.dtype == np.float32 and x.shape == zoo.input_shape(name, batch)
        (y,) = sess.run(None, {"input": x})
        assert y.dtype == np.float32
        assert y.shape == zoo.output_shape(name, batch)
        assert np.isfinite(y).all()
        if name in JET_MODELS:
            assert (y >= 0).all()
            np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
        if name == "resnet50":
            assert 0.1 < float(y.std()) < 10.0, "logits badly scaled"


@pytest.mark.parametrize("name", zoo.NAMES)
def test_sample_input(name):
    x = zoo.sample_input(name, 2, seed=1)
    assert x.dtype == np.float32 and x.shape == zoo.input_shape(name, 2)
    np.testing.assert_array_equal(x, zoo.sample_input(name, 2, seed=1))
    assert not np.array_equal(x, zoo.sample_input(name, 2, seed=2))
    if len(x.shape) == 4:  # images
        assert x.min() >= 0.0 and x.max() <= 1.0
    else:
        assert abs(float(x.mean())) < 1.0 and 0.3 < float(x.std()) < 3.0


@pytest.mark.parametrize("name", zoo.NAMES)
def test_build_is_seeded(name):
    a = _weights(_model(name))
    b = _weights(zoo.build(name, seed=0))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c = _weights(zoo.build(name, seed=1))
    assert c.keys() == a.keys()
    differing = [k for k in a if not np.array_equal(a[k], c[k])]
    assert len(differing) >= len(a) - 1  # all but constants like dropout.ratio


@pytest.mark.parametrize("name", ["jet_mlp", "hcal_mlp"])
def test_path_writes_once(name, tmp_path):
    cache = tmp_path / "cache"
    p = zoo.path(name, cache_dir=cache)
    assert p == cache / f"{name}.onnx"
    assert p.is_file()
    assert sorted(q.name for q in cache.iterdir()) == [p.name]  # no temp files left
    assert p.read_bytes() == zoo.build(name, seed=0).SerializeToString()
    onnx.checker.check_model(str(p), full_check=True)
    mtime = p.stat().st_mtime_ns
    assert zoo.path(name, cache_dir=str(cache)) == p
    assert p.stat().st_mtime_ns == mtime


def test_path_does_not_rebuild_existing(tmp_path):
    p = tmp_path / "jet_cnn.onnx"
    p.write_bytes(b"placeholder")
    assert zoo.path("jet_cnn", cache_dir=tmp_path) == p
    assert p.read_bytes() == b"placeholder"


def test_path_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "env-cache"))
    p = zoo.path("jet_mlp")
    assert p == tmp_path / "env-cache" / "jet_mlp.onnx"
    assert p.is_file()


@pytest.mark.parametrize("name", zoo.NAMES)
def test_describe(name):
    text = zoo.describe(name)
    assert text.startswith(name) and "\n" not in text


@pytest.mark.parametrize("call", [
    lambda: zoo.build("resnet18"),
    lambda: zoo.path("resnet18"),
    lambda: zoo.input_shape("resnet18", 1),
    lambda: zoo.sample_input("resnet18", 1),
    lambda: zoo.describe("resnet18"),
])
def test_unknown_name(call):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "resnet18" in message
    for known in zoo.NAMES:
        assert known in message


def test_bad_batch():
    with pytest.raises(ValueError):
        zoo.input_shape("jet_mlp", 0)
