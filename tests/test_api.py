"""The public API as the README shows it, and bad input: clear typed errors, nothing lost."""

import concurrent.futures
import pickle

import numpy as np
import onnx
import pytest

import offload
from offload import zoo
from onnx_cases import UNSUPPORTED_CASE, get_case, write


@pytest.fixture(scope="module")
def jet_path():
    return zoo.path("jet_mlp")


def test_devices_lists_cpu_available():
    infos = offload.devices()
    cpu = [i for i in infos if i.spec == "cpu:0"]
    assert cpu and cpu[0].available and cpu[0].name
    for info in infos:
        assert info.available or info.reason, f"{info.spec} unavailable without a reason"


def test_opening_cpu_loads_no_other_driver():
    """'cpu' is opened from its own driver: no OpenCL or CUDA runtime is loaded for it (PoCL's
    start-up aborts a process that cannot create threads, e.g. under a tight RLIMIT_AS)."""
    import subprocess
    import sys
    code = ("import sys, offload; offload.device('cpu'); "
            "print(sorted(m for m in ('pyopencl', 'cupy', 'pyxrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_device_specs():
    assert offload.device("cpu") is offload.device("CPU:0")
    with pytest.raises(offload.DeviceUnavailableError, match="known devices"):
        offload.device("tpu:3")
    with pytest.raises(offload.DeviceUnavailableError, match="bad device spec"):
        offload.device("cuda:1x")
    # a name after the colon is matched against the devices of that kind, never renamed
    with pytest.raises(offload.DeviceUnavailableError, match=r"no device 'cuda:nosuch'; known"):
        offload.device("cuda:nosuch")
    with pytest.raises(offload.DeviceUnavailableError, match=r"no device 'foo'; known"):
        offload.device("foo")
    assert offload.device_spec("OpenCL:PoCL") == "opencl:pocl"
    assert offload.device_spec("opencl") == "opencl:0"


def test_mistyped_zoo_names_get_suggestions(tmp_path):
    with pytest.raises(offload.ModelFormatError, match=r"did you mean 'jet_mlp'\?"):
        offload.load("jet_mpl")
    with pytest.raises(offload.ModelFormatError, match="did you mean 'resnet50'"):
        offload.load("resnet")
    assert zoo.suggest("hcal") == ["hcal_mlp"]
    assert zoo.suggest("nothing_like_it") == []
    # a path is a path: no zoo suggestion for a missing file
    with pytest.raises(offload.ModelFormatError) as info:
        offload.load(str(tmp_path / "jet_mpl.onnx"))
    assert "did you mean" not in str(info.value)


def _float32_devices():
    return [i.spec for i in offload.devices() if i.available
            and "float32" in offload.device(i.spec).capabilities.precisions]


def test_stats_per_device(jet_path):
    specs = _float32_devices()
    model = offload.load(jet_path, device=specs)
    x = zoo.sample_input("jet_mlp", 6)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: model(x[: 1 + k % 6]), range(24)))
    stats = model.stats
    per = stats["per_device"]
    assert set(per) <= set(specs) and per
    assert sum(d["device_runs"] for d in per.values()) == stats["device_runs"] == 24
    assert sum(d["rows"] for d in per.values()) == sum(1 + k % 6 for k in range(24))
    for spec, d in per.items():
        assert d["device_runs"] > 0, spec
        assert d["time_s"] == pytest.approx(d["copy_in_s"] + d["compute_s"] + d["copy_out_s"])
        assert d["copy_out_bytes"] == d["rows"] * 5 * 4  # float32 [rows, 5] out of each run
    model.reset_stats()
    assert all(d["device_runs"] == 0 for d in model.stats["per_device"].values())


def test_stats_per_device_with_all(jet_path):
    model = offload.load(jet_path, device="all")
    x = zoo.sample_input("jet_mlp", 3)
    for _ in range(5):
        model(x)
    per = model.stats["per_device"]
    assert sum(d["rows"] for d in per.values()) == 15
    assert set(per) <= {d.spec for d in model.devices}


def test_warmup_builds_the_plan_on_every_device(jet_path):
    specs = _float32_devices()
    model = offload.load(jet_path, device=specs)
    took = model.warmup()
    assert set(took) == {d.spec for d in model.devices} and all(t >= 0 for t in took.values())
    for ctx in model._contexts:
        assert ctx.plans.get(((1, 16),)), ctx.device.spec
    assert model.stats["device_runs"] == 0 and model.stats["calls"] == 0  # not counted
    with pytest.raises(offload.ShapeError, match="warmup"):
        offload.load(_free_feature_model()).warmup()


def _free_feature_model() -> bytes:
    """a [N, F] -> relu -> [N, F]: a free non-batch axis."""
    from onnx import TensorProto, helper
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "F"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "F"])
    graph = helper.make_graph([helper.make_node("Relu", ["a"], ["y"], name="relu")], "free",
                              [a], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_call_submit_and_stats(jet_path):
    model = offload.load(jet_path)
    x = zoo.sample_input("jet_mlp", 7)
    y = model(x)
    assert y.shape == (7, 5) and y.dtype == np.float32
    future = model.submit(x)
    assert isinstance(future, concurrent.futures.Future)
    np.testing.assert_array_equal(future.result(timeout=30), y)
    stats = model.stats
    assert stats["calls"] == 2
    assert stats["copy_in_bytes"] == 2 * x.nbytes and stats["copy_out_bytes"] == 2 * y.nbytes
    assert all(stats[k] >= 0 for k in ("copy_in_s", "compute_s", "copy_out_s"))


def test_any_batch_size_and_plan_reuse(jet_path):
    model = offload.load(jet_path)
    for batch in (1, 2, 5, 1000, 1, 2):
        assert model(zoo.sample_input("jet_mlp", batch)).shape == (batch, 5)
    # 1000 rows run on the plan of the 1024 bucket (offload.model.bucket)
    assert sorted(model._plans) == [((1, 16),), ((2, 16),), ((5, 16),), ((1024, 16),)]
    assert all(len(p) == 1 for p in model._plans.values())  # one plan per shape, reused


def test_weights_are_prepared_once_per_model(jet_path):
    model = offload.load(jet_path)
    model(zoo.sample_input("jet_mlp", 1))
    n = len(model._weights)
    model(zoo.sample_input("jet_mlp", 9))
    assert len(model._weights) == n


def test_activation_buffers_are_reused():
    model = offload.load(zoo.path("resnet50"))
    plan = model.plan((1, 3, 224, 224))
    assert len(plan.steps) == 56
    assert plan.activation_blocks <= 8  # 56 step outputs share a few liveness-reused blocks
    assert model.plan((1, 3, 224, 224)) is plan


def test_several_inputs_and_outputs_by_position_and_name(tmp_path):
    case = get_case("two_inputs_two_outputs")
    model = offload.load(write(case, tmp_path))
    feeds = case.make_inputs(4, np.random.default_rng(0))
    by_name = model(feeds)
    by_pos = model(*[feeds[n] for n in case.input_names])
    kw = model(**feeds)
    assert isinstance(by_name, tuple) and len(by_name) == 2
    for a, b, c in zip(by_name, by_pos, kw):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_out_argument(jet_path):
    model = offload.load(jet_path)
    x = zoo.sample_input("jet_mlp", 3)
    out = np.empty((3, 5), np.float32)
    assert model(x, out=out) is out
    np.testing.assert_array_equal(out, model(x))
    with pytest.raises(offload.ShapeError, match=r"expected shape \[3, 5\]"):
        model(x, out=np.empty((4, 5), np.float32))


def test_unsupported_ops_are_all_listed(tmp_path):
    path = write(UNSUPPORTED_CASE, tmp_path)
    with pytest.raises(offload.UnsupportedOpError) as info:
        offload.load(path)
    message = str(info.value)
    assert "Det (node 'bad_det')" in message and "Hardmax (node 'bad_hardmax')" in message
    assert str(path) in message
    assert {op for op, _ in info.value.ops} >= {"Det", "Hardmax"}


@pytest.mark.parametrize("x, match", [
    (np.zeros((2, 15), np.float32), r"expected shape \[N, 16\] float32, got \[2, 15\]"),
    (np.zeros((2, 16, 1), np.float32), r"expected shape \[N, 16\].*got \[2, 16, 1\]"),
    (np.zeros(16, np.float32), r"got \[16\]"),
    (np.zeros((2, 16), np.int64), r"expected dtype float32.*got int64"),
    (np.zeros((2, 16), np.complex64), r"got complex64"),
    ("text", r"got <U4"),
])
def test_bad_input_shape_and_dtype(jet_path, x, match):
    model = offload.load(jet_path)
    with pytest.raises(offload.ShapeError, match=match):
        model(x)


def test_wrong_number_and_names_of_inputs(jet_path):
    model = offload.load(jet_path)
    x = zoo.sample_input("jet_mlp", 1)
    with pytest.raises(offload.ShapeError, match="takes 1 input"):
        model(x, x)
    with pytest.raises(offload.ShapeError, match="unknown"):
        model({"nope": x})
    with pytest.raises(offload.ShapeError, match="missing"):
        model({})


def test_float64_and_float16_are_converted(jet_path):
    model = offload.load(jet_path)
    x = zoo.sample_input("jet_mlp", 4)
    y = model(x)
    np.testing.assert_allclose(model(x.astype(np.float64)), y, rtol=1e-6)
    np.testing.assert_allclose(model(x.astype(np.float16)), model(x.astype(np.float16)
                                                                   .astype(np.float32)))


def test_non_contiguous_input(jet_path):
    model = offload.load(jet_path)
    x = zoo.sample_input("jet_mlp", 8)
    wide = np.zeros((8, 32), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(model(wide[:, ::2]), model(x))


def test_empty_batch(jet_path):
    y = offload.load(jet_path)(np.zeros((0, 16), np.float32))
    assert y.shape == (0, 5) and y.dtype == np.float32


def test_empty_batch_cnn():
    y = offload.load(zoo.path("jet_cnn"))(np.zeros((0, 1, 40, 40), np.float32))
    assert y.shape == (0, 5)


def test_nan_propagates_through_a_model(jet_path):
    x = zoo.sample_input("jet_mlp", 3)
    x[1, 4] = np.nan
    y = offload.load(jet_path)(x)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_truncated_and_foreign_files(tmp_path, jet_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(jet_path.read_bytes()[:1000])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (truncated, text, empty):
        with pytest.raises(offload.ModelFormatError) as info:
            offload.load(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
    with pytest.raises(offload.ModelFormatError, match="no such model file"):
        offload.load(tmp_path / "missing.onnx")


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model = zoo.build("jet_mlp")
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "4096")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "escape.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(offload.ModelFormatError, match="outside the model's folder"):
        offload.load(path)


def test_external_data_inside_the_folder_loads(tmp_path, jet_path):
    model = onnx.load(jet_path)
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    x = zoo.sample_input("jet_mlp", 2)
    np.testing.assert_array_equal(offload.load(tmp_path / "ext.onnx")(x),
                                  offload.load(jet_path)(x))


def test_static_batch_is_enforced(tmp_path):
    model = zoo.build("jet_mlp")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(offload.ShapeError, match=r"expected shape \[2, 16\]"):
        offload.load(model)(zoo.sample_input("jet_mlp", 3))


def test_errors_pickle():
    for error in (offload.ShapeError("bad shape"), offload.UnsupportedOpError("x", [("Erf", "n")]),
                  offload.KernelBuildError("failed", log="line 3: error")):
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)


def test_context_manager_closes(jet_path):
    with offload.load(jet_path) as model:
        model(zoo.sample_input("jet_mlp", 1))
    with pytest.raises(offload.OffloadError, match="closed"):
        model(zoo.sample_input("jet_mlp", 1))


def test_predict_in_batches(jet_path):
    model = offload.load(jet_path)
    x = zoo.sample_input("jet_mlp", 2500)
    np.testing.assert_allclose(model.predict(x, batch_size=1000), model(x), rtol=1e-6, atol=1e-7)


def test_empty_gives_aligned_arrays_a_model_takes(jet_path):
    x = offload.empty((3, 16))
    assert x.dtype == np.float32 and x.shape == (3, 16) and x.flags.c_contiguous
    assert offload.hostmem.address(x) % 4096 == 0
    x[:] = zoo.sample_input("jet_mlp", 3)
    np.testing.assert_array_equal(offload.load(jet_path)(x), offload.load(jet_path)(x.copy()))
