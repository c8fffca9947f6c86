"""Every zoo model on every device against onnxruntime on the same ONNX file."""

import numpy as np
import onnxruntime as ort
import pytest

import offload
from conftest import assert_close, full_on
from offload import zoo

BATCHES = {"resnet50": (1, 3, 16), "jet_mlp": (1, 3, 16), "hcal_mlp": (1, 3, 16),
           "jet_cnn": (1, 3, 16)}


@pytest.fixture(scope="module")
def session():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = ort.InferenceSession(str(zoo.path(name)),
                                               providers=["CPUExecutionProvider"])
        return cache[name]
    return get


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_matches_onnxruntime(name, device, session, request):
    model = offload.load(zoo.path(name), device=device)
    batches = BATCHES[name]
    if name == "resnet50" and not full_on(request.config, device):
        batches = batches[:1]  # ~3 s per image on cuda-emu:0; --emulation-full for all
    for batch in batches:
        x = zoo.sample_input(name, batch, seed=batch)
        want = session(name).run(None, {"input": x})[0]
        got = model(x)
        assert_close(got, want, "float32", f"{name} batch {batch} on {device.spec}")


@pytest.mark.parametrize("name", ["jet_mlp", "jet_cnn"])
def test_zoo_model_matches_cpu_device(name, device, assert_matches_cpu):
    assert_matches_cpu(zoo.path(name), device, zoo.sample_input(name, 5))


def test_load_by_zoo_name():
    model = offload.load("jet_mlp")
    y = model(zoo.sample_input("jet_mlp", 2))
    assert y.shape == (2, 5)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)


def test_resnet50_graph_is_fused():
    """BatchNorm is folded into the convs; every ReLU and residual add fused into a conv."""
    graph = offload.import_onnx(zoo.path("resnet50"))
    ops = sorted(n.op for n in graph.nodes)
    assert ops == sorted(["conv2d"] * 53 + ["maxpool", "global_avgpool", "flatten", "dense"])
    assert sum(bool(n.attrs.get("residual")) for n in graph.nodes) == 16
