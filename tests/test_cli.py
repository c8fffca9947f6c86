"""The ``offload`` command line: every command through ``offload.cli.main`` (and a subprocess).

No test asserts a timing: the machines are shared and noisy; only that tables and files appear.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import offload
from offload import bench, zoo
from offload.cli import main

FAST = ["--repeats", "2", "--min-time", "0.05"]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture
def jet_mlp(zoo_dir):
    return zoo.path("jet_mlp", cache_dir=zoo_dir)


@pytest.fixture(autouse=True)
def private_zoo_cache(zoo_dir, monkeypatch):
    """Zoo names given to the CLI are built in a test folder, not in ~/.cache."""
    monkeypatch.setenv("OFFLOAD_CACHE", str(zoo_dir))


def _two_in_two_out(path, free_feature=False):
    """Inputs a, b [N, 3] -> outputs sum = a + b and pos = relu(a)."""
    feat = "F" if free_feature else 3
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", feat])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", feat])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", feat])
    p = helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["N", feat])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["sum"], name="add"),
                               helper.make_node("Relu", ["a"], ["pos"], name="relu")],
                              "two", [a, b], [s, p])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("offload: error: ")
    assert "Traceback" not in err
    return lines[0]


# -- devices -------------------------------------------------------------------------------------
def test_devices_lists_cpu(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == len(offload.devices())
    cpu = [line for line in lines if line.startswith("cpu:0")]
    assert cpu and "(available)" in cpu[0]


def test_devices_require_fails_naming_the_reason(capsys):
    """A GPU check must not pass when its device is missing (issue 14, defect 7)."""
    assert main(["devices", "--require", "cpu"]) == 0
    assert main(["devices", "--require", "cpu", "--require", "nosuch:0"]) == 1
    assert "nosuch:0: no device 'nosuch:0'" in capsys.readouterr().err
    down = next((i for i in offload.devices() if not i.available), None)
    if down is not None:
        assert main(["devices", "--require", down.spec]) == 1
        assert down.reason in capsys.readouterr().err


def test_pytest_require_device_stops_the_run(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_x(device):\n    pass\n")
    conftest = pathlib.Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--require-device=nosuch:0", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "--require-device: not available: nosuch:0" in done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--require-device=cpu", "--device=cpu", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_command_and_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "devices" in capsys.readouterr().out


# -- run -----------------------------------------------------------------------------------------
def test_run_writes_output(tmp_path, jet_mlp, capsys):
    x = zoo.sample_input("jet_mlp", 7)
    np.save(tmp_path / "x.npy", x)
    y_path = tmp_path / "y.npy"
    assert main(["run", str(jet_mlp), "--input", str(tmp_path / "x.npy"), "--device", "cpu",
                 "--output", str(y_path)]) == 0
    assert str(y_path) in capsys.readouterr().out
    y = np.load(y_path, allow_pickle=False)
    assert y.shape == (7, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, offload.load(jet_mlp)(x), rtol=1e-6, atol=1e-7)


def test_run_prints_shape_and_values(tmp_path, jet_mlp, capsys):
    np.save(tmp_path / "x.npy", zoo.sample_input("jet_mlp", 3))
    assert main(["run", str(jet_mlp), "-i", str(tmp_path / "x.npy")]) == 0
    out = capsys.readouterr().out
    assert "[3, 5] float32" in out and "..." in out


def test_run_several_inputs_and_outputs(tmp_path, capsys):
    model = _two_in_two_out(tmp_path / "two.onnx")
    a = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    b = np.ones((4, 3), np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    ins = ["--input", str(tmp_path / "a.npy"), "--input", str(tmp_path / "b.npy")]
    # one --output: numbered files
    assert main(["run", str(model), *ins, "--output", str(tmp_path / "y.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "y_0.npy"), a + b)
    np.testing.assert_allclose(np.load(tmp_path / "y_1.npy"), np.maximum(a, 0))
    # one --output per output
    assert main(["run", str(model), *ins, "-o", str(tmp_path / "s.npy"),
                 "-o", str(tmp_path / "p.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), a + b)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), np.maximum(a, 0))
    capsys.readouterr()
    # a wrong number of --output
    assert main(["run", str(model), *ins, "-o", "1.npy", "-o", "2.npy", "-o", "3.npy"]) == 2
    assert "2 outputs" in _error_line(capsys.readouterr().err)


def test_run_bad_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx model\n" * 10)
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.float32))
    assert main(["run", str(bad), "--input", str(tmp_path / "x.npy")]) == 2
    captured = capsys.readouterr()
    assert str(bad) in _error_line(captured.err)
    assert captured.out == ""


@pytest.mark.parametrize("problem", ["missing_input", "pickled_input", "wrong_shape",
                                     "missing_model", "bad_device"])
def test_run_errors_are_one_line(problem, tmp_path, jet_mlp, capsys):
    x = tmp_path / "x.npy"
    np.save(x, zoo.sample_input("jet_mlp", 2))
    args = ["run", str(jet_mlp), "--input", str(x)]
    if problem == "missing_input":
        args[3] = str(tmp_path / "nope.npy")
    elif problem == "pickled_input":
        np.save(x, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif problem == "wrong_shape":
        np.save(x, np.zeros((2, 3), np.float32))
    elif problem == "missing_model":
        args[1] = str(tmp_path / "nope.onnx")
    elif problem == "bad_device":
        args += ["--device", "nosuchdevice"]
    assert main(args) == 2
    _error_line(capsys.readouterr().err)


# -- bench ---------------------------------------------------------------------------------------
def _table_rows(out: str, model: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith(f"| {model} ")]


def test_bench_prints_table(capsys):
    assert main(["bench", "jet_mlp", "--device", "cpu", "--batch", "1,4", *FAST]) == 0
    captured = capsys.readouterr()
    assert "offload median ms" in captured.out and "samples/s" in captured.out
    rows = _table_rows(captured.out, "jet_mlp")
    assert [r[1] for r in rows] == ["1", "4"]
    assert all(r[2] == "cpu:0" for r in rows)
    assert all(float(r[3]) > 0 for r in rows)        # offload median ms
    if bench.onnxruntime_missing_reason() is None:
        assert all(float(r[7]) > 0 for r in rows)    # ratio offload/onnxruntime
        assert all(float(r[8]) < 1e-4 for r in rows)  # max abs diff vs onnxruntime
    assert "[1/2] jet_mlp b1" in captured.err and "[2/2] jet_mlp b4" in captured.err


def test_bench_profile_shows_ops(capsys):
    assert main(["bench", "jet_mlp", "--batch", "2", "--no-onnxruntime", "--profile",
                 *FAST]) == 0
    out = capsys.readouterr().out
    assert "Profile: jet_mlp b2" in out
    for name in ("dense", "softmax", "fc1", "share %"):
        assert name in out


def test_bench_json_and_file_model(tmp_path, jet_mlp, capsys):
    target = tmp_path / "bench.json"
    assert main(["bench", str(jet_mlp), "--batch", "3", "--no-onnxruntime", "--json",
                 str(target), *FAST]) == 0
    out = capsys.readouterr().out
    assert _table_rows(out, "jet_mlp.onnx")
    doc = json.loads(target.read_text())
    assert doc["machine"]["cores"] >= 1 and "date" in doc["machine"]
    (row,) = doc["rows"]
    assert row["model"] == "jet_mlp.onnx" and row["batch"] == 3 and row["median_ms"] > 0
    assert row.get("ort_median_ms") is None


def test_bench_errors(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.onnx")]) == 2
    _error_line(capsys.readouterr().err)
    free = _two_in_two_out(tmp_path / "free.onnx", free_feature=True)
    assert main(["bench", str(free), "--no-onnxruntime", *FAST]) == 2
    assert "static" in _error_line(capsys.readouterr().err)  # non-batch axes must be static
    assert main(["bench", "jet_mlp", "--batch", "0"]) == 2
    assert "batch" in capsys.readouterr().err


# -- demo ----------------------------------------------------------------------------------------
def test_demo_quick(capsys, tmp_path):
    png = tmp_path / "demo.png"
    assert main(["demo", "--quick", "--models", "jet_mlp", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert "cpu:0" in captured.out and "(available)" in captured.out
    rows = [r for r in _table_rows(captured.out, "jet_mlp") if r[2] == "cpu:0"]
    assert [r[1] for r in rows] == ["1", "64", "1024"]  # --quick: batches up to 1024
    every = _table_rows(captured.out, "jet_mlp")
    if bench.onnxruntime_missing_reason() is None:
        assert [r[2] for r in every].count("onnxruntime") == 3
    for r in every:  # latency with its unit, and a throughput that is never a bare 0
        assert r[3].endswith(("µs", "ms", " s")), r
        assert r[4] not in ("0", "-") and float(r[4].replace(",", "")) > 0, r
    assert "Wall time" in captured.out and "2019" in captured.out
    assert "[1/3] jet_mlp b1" in captured.err and "done in" in captured.err  # progress
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in captured.out
    else:
        assert f"Plot: {png}" in captured.out and png.stat().st_size > 10_000


def test_demo_table_context_and_no_zero_rates():
    from offload import demo
    rows = [dict(model="resnet50", batch=1, device="cpu:0", error=None, median_ms=2500.0,
                 samples_per_s=0.4, ratio=3.0, max_abs_diff=1e-6, ort_median_ms=800.0,
                 ort_samples_per_s=1.25),
            dict(model="resnet50", batch=1, device="opencl:0", error="KernelBuildError: x")]
    table = demo.table_rows(rows)
    assert [r["device"] for r in table] == ["cpu:0", "opencl:0", "onnxruntime"]
    assert table[0]["context"] == demo.CONTEXT_2019[("resnet50", 1)]
    assert table[0]["latency"] == "2.5 s" and bench.rate(0.4) == "0.4"
    assert table[1]["latency"].startswith("error")
    assert demo.latency(0.0041) == "4.1 µs" and demo.latency(12.34) == "12.3 ms"


# -- options and errors found before any work ----------------------------------------------------
def test_bench_unknown_device_fails_before_timing(capsys):
    assert main(["bench", "jet_mlp", "--device", "foo", *FAST]) == 2
    captured = capsys.readouterr()
    line = _error_line(captured.err)
    assert "'foo'" in line and "foo:0" not in line and "known devices" in line
    assert captured.out == ""  # no table, nothing timed


def test_mistyped_zoo_name_suggests(tmp_path, capsys):
    np.save(tmp_path / "x.npy", zoo.sample_input("jet_mlp", 1))
    assert main(["run", "jet_mpl", "-i", str(tmp_path / "x.npy")]) == 2
    assert "did you mean 'jet_mlp'?" in _error_line(capsys.readouterr().err)
    assert main(["bench", "jet_mpl"]) == 2
    assert "did you mean 'jet_mlp'?" in _error_line(capsys.readouterr().err)
    assert main(["warmup", "hcal"]) == 2
    assert "did you mean 'hcal_mlp'?" in _error_line(capsys.readouterr().err)


def _available(spec):
    return any(i.spec == spec and i.available for i in offload.devices())


def test_run_and_bench_precision(tmp_path, capsys):
    x = zoo.sample_input("jet_mlp", 4)
    np.save(tmp_path / "x.npy", x)
    # the cpu device runs fixed point bit-exactly (emulation): same as the API
    y = tmp_path / "y.npy"
    assert main(["run", "jet_mlp", "-i", str(tmp_path / "x.npy"), "--precision",
                 "ap_fixed<16,6>", "-o", str(y)]) == 0
    want = offload.load("jet_mlp", precision="ap_fixed<16,6>")(x)
    np.testing.assert_array_equal(np.load(y), want)
    capsys.readouterr()
    assert main(["run", "jet_mlp", "-i", str(tmp_path / "x.npy"), "--precision", "float16"]) == 2
    assert "does not run precision 'float16'" in _error_line(capsys.readouterr().err)
    if _available("xrt-emu:0"):
        assert main(["bench", "jet_mlp", "--device", "xrt-emu:0", *FAST]) == 2
        assert "--precision" in _error_line(capsys.readouterr().err)
        assert main(["bench", "jet_mlp", "--device", "xrt-emu:0", "--precision",
                     "ap_fixed<16,6>", "--no-onnxruntime", *FAST]) == 0
        (row,) = _table_rows(capsys.readouterr().out, "jet_mlp")
        assert row[2] == "xrt-emu:0" and float(row[3]) > 0
    first = next((i.spec for i in offload.devices() if i.spec.startswith("opencl")
                  and i.available), None)
    if first:
        assert main(["run", "jet_mlp", "-i", str(tmp_path / "x.npy"), "--device", first,
                     "--precision", "float16", "-o", str(y)]) == 0
        np.testing.assert_allclose(np.load(y), offload.load("jet_mlp")(x), rtol=1e-2, atol=1e-2)


def test_run_zoo_model_without_input(tmp_path, jet_mlp, capsys):
    assert main(["run", "jet_mlp"]) == 0
    out = capsys.readouterr().out
    assert "sample input, [1, 16]" in out and "[1, 5] float32" in out
    assert main(["run", str(jet_mlp)]) == 2  # a file has no sample input
    assert "--input" in _error_line(capsys.readouterr().err)


def test_warmup_command(capsys):
    specs = ["cpu"] + [i.spec for i in offload.devices() if i.available
                       and i.spec.startswith("opencl")][:1]
    assert main(["warmup", "jet_cnn", "--device", ",".join(specs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(specs)
    assert lines[0].startswith("cpu:0: plan for batch 1 built and run once") and "nothing to compile" in lines[0]
    for line in lines[1:]:
        assert "programs compiled" in line and "from the disk cache" in line
    assert main(["warmup", "jet_mlp", "--device", "foo"]) == 2
    assert "'foo'" in _error_line(capsys.readouterr().err)


# -- the console script --------------------------------------------------------------------------
def test_subprocess(tmp_path, jet_mlp):
    def offload_cmd(*args):
        return subprocess.run([sys.executable, "-m", "offload.cli", *args], capture_output=True,
                              text=True, timeout=300)

    done = offload_cmd("devices")
    assert done.returncode == 0 and "cpu:0" in done.stdout

    x = zoo.sample_input("jet_mlp", 5)
    np.save(tmp_path / "x.npy", x)
    done = offload_cmd("run", str(jet_mlp), "--input", str(tmp_path / "x.npy"), "--output",
                       str(tmp_path / "y.npy"))
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "y.npy").shape == (5, 5)

    bad = tmp_path / "bad.onnx"
    bad.write_text("garbage")
    done = offload_cmd("run", str(bad), "--input", str(tmp_path / "x.npy"))
    assert done.returncode == 2
    _error_line(done.stderr)

    done = subprocess.run([sys.executable, "-m", "offload", "devices"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "cpu:0" in done.stdout


def test_bench_without_onnxruntime_installed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert bench.onnxruntime_contender(zoo.path("jet_mlp")) is None
    assert "onnxruntime" in bench.onnxruntime_missing_reason()
    assert main(["bench", "jet_mlp", *FAST]) == 0
    captured = capsys.readouterr()
    assert "onnxruntime: skipped" in captured.err
    (row,) = _table_rows(captured.out, "jet_mlp")
    assert float(row[3]) > 0 and row[6] == "-" and row[7] == "-"


# -- the timing engine ---------------------------------------------------------------------------
def test_measure_alternates_round_robin():
    order = []
    a = bench.Contender("a", lambda x: order.append("a"))
    b = bench.Contender("b", lambda x: order.append("b"))
    x = np.zeros((3, 2), np.float32)
    results = bench.measure([a, b], x, repeats=4, min_time_s=0.0, warmup=1, pause_s=0)
    timed = order[-8:]  # min_time 0: one call per block, 4 repeats x 2 contenders
    assert timed == ["a", "b"] * 4
    for m in results.values():
        assert m.batch == 3 and len(m.blocks_s) == 4 and m.calls_per_block == 1
        assert 0 < m.median_s <= m.p90_s and m.throughput == pytest.approx(3 / m.median_s)


def test_format_table_and_profile():
    text = bench.format_table([dict(name="x|y", v=1.5), dict(name="z", v=None)],
                              ["name", ("v", "value", ".2f")])
    lines = text.splitlines()
    assert lines[0].split("|")[1:3] == [" name ", " value "]
    assert "x\\|y" in lines[2] and "1.50" in lines[2] and "-" in lines[3]
    model = offload.load(zoo.path("jet_mlp"))
    prof = bench.profile(model, zoo.sample_input("jet_mlp", 2), runs=3)
    assert {r["op"] for r in prof["by_op"]} == {"dense", "softmax"}
    assert sum(r["share"] for r in prof["by_node"]) == pytest.approx(100)
    info = bench.machine_info()
    assert info["cores"] >= 1 and "numpy" in info and "date" in info


def test_bench_clients_table(capsys, tmp_path):
    out = tmp_path / "clients.json"
    assert main(["bench", "jet_mlp", "--clients", "1,3", "--min-time", "0.05",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 caller with batches of 64" in captured.out
    assert "unbatched" in captured.out and "| batched" in captured.out
    doc = json.loads(out.read_text())
    rows = doc["results"][0]["rows"]
    assert [(r["clients"], r["mode"]) for r in rows] == [
        (1, "unbatched"), (1, "batched"), (3, "unbatched"), (3, "batched")]
    assert all(r["requests"] > 0 for r in rows)
