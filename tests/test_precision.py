"""Reduced float precisions (tf32, float16, bfloat16) on every device that runs them, against
the CPU device in float32 at that precision's tolerance; devices that do not are refused."""

from __future__ import annotations

import numpy as np
import pytest

import offload
from offload import precision as P
from offload import zoo

from conftest import TOLERANCE, assert_close

REDUCED = ("tf32", "float16", "bfloat16")


def runs(device, precision):
    if precision not in device.capabilities.precisions:
        pytest.skip(f"{device.spec} does not run {precision} (it runs "
                    f"{sorted(device.capabilities.precisions)})")


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("name,rows", [("jet_mlp", 5), ("jet_cnn", 3), ("hcal_mlp", 7)])
def test_zoo_models_in_reduced_precision_match_cpu(device, precision, name, rows):
    runs(device, precision)
    x = zoo.sample_input(name, rows)
    want = offload.load(name)(x)
    model = offload.load(name, device=device, precision=precision)
    y = model(x)
    assert y.dtype == np.float32  # float32 in and out whatever the precision
    assert_close(y, want, precision, f"{name} {precision} on {device.spec}")
    # inputs cross in the storage type: half the bytes of float32 for 16-bit storage
    model.reset_stats()
    model(x)
    assert model.stats["copy_in_bytes"] == x.size * P.storage_dtype(precision).itemsize


@pytest.mark.parametrize("precision", ("float16", "bfloat16"))
def test_resnet50_in_16_bits_keeps_its_answer(device, precision):
    runs(device, precision)
    x = zoo.sample_input("resnet50", 1)
    want = offload.load("resnet50")(x)
    got = offload.load("resnet50", device=device, precision=precision)(x)
    assert got.argmax() == want.argmax()
    assert_close(got, want, precision, f"resnet50 {precision} on {device.spec}")


@pytest.mark.parametrize("precision", ("float16", "bfloat16"))
def test_stored_values_round_like_the_host_conversion(device, precision, tmp_path):
    """A Relu model: the device stores the input and the output in 16 bits, so its output is
    exactly relu(x) rounded through the storage type on the host."""
    runs(device, precision)
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 37])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 37])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 37)) * np.logspace(-6, 6, 37)).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, np.nan, 65504.0]
    got = offload.load(path, device=device, precision=precision)(x)
    want = P.round_trip(np.maximum(x, 0), precision)
    np.testing.assert_array_equal(got, want)


def test_the_cpu_device_refuses_reduced_precisions():
    with pytest.raises(offload.UnsupportedOpError, match=r"cpu:0 does not run precision "
                                                         r"'float16'.*float32"):
        offload.load("jet_mlp", precision="float16")
    with pytest.raises(ValueError, match="unknown precision 'float8'"):
        offload.load("jet_mlp", precision="float8")


@pytest.mark.parametrize("values", [
    [1.0, -2.5, 0.0, -0.0, 3.0e38, -3.4e38, 1e-40, 65504.0, np.pi],
    np.random.default_rng(1).standard_normal(4096) * 1e3,
    np.frombuffer(np.random.default_rng(2).integers(0, 2**32, 4096, dtype=np.uint32)
                  .tobytes(), np.float32),  # every bit pattern class, NaNs included
])
def test_bfloat16_conversion_matches_torch(values):
    torch = pytest.importorskip("torch")
    x = np.asarray(values, np.float32)
    bits = P.float32_to_bfloat16_bits(x)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(bits[finite], want.view(np.uint16)[finite])
    assert np.isnan(P.from_storage(bits, "bfloat16")[~finite]).all()


def test_float16_storage_rounds_to_nearest_even():
    x = np.array([1 + 2**-11, 1 + 3 * 2**-11, 70000.0, -1e-8], np.float32)
    np.testing.assert_array_equal(P.round_trip(x, "float16"),
                                  np.array([1.0, 1 + 2**-9, np.inf, -0.0], np.float32))
