"""Hostile settings and arguments at run time (issue 15: classes 4, 6, 9, 10 and 12).

Each test here hung, leaked, crashed or let a raw Python exception out before the fix it guards.
What can take the process down (memory caps, thread limits, the CLI) runs in a subprocess with
a time limit.
"""

import concurrent.futures
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest

import offload
from offload import ArgumentError, DeviceMemoryError, OffloadError, ShapeError, zoo
from offload import graph as G
from offload.batching import MAX_BATCH, MAX_DELAY_US, Batcher, Batching
from offload.drivers.cpu import CPUDevice
from offload.model import Model

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def jet():
    return offload.import_onnx(zoo.path("jet_mlp"))


def _run_python(code: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def _offload_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload", *args], capture_output=True,
                          text=True, timeout=timeout)


# -- 4. Batching settings are checked when made ------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(max_delay_us=float("inf")), "max_delay_us must be between 0 and 6e\\+07"),
    (dict(max_delay_us=1e16), "max_delay_us must be between"),
    (dict(max_delay_us=float("nan")), "max_delay_us must be between"),
    (dict(max_delay_us=-1), "max_delay_us must be between"),
    (dict(max_delay_us="500"), "max_delay_us: expected a number"),
    (dict(max_delay_us=None), "max_delay_us: expected a number"),
    (dict(max_batch=0), "max_batch must be between 1 and"),
    (dict(max_batch=-5), "max_batch must be between 1 and"),
    (dict(max_batch=MAX_BATCH + 1), "max_batch must be between 1 and"),
    (dict(max_batch=2.5), "max_batch: expected an int"),
    (dict(max_batch=8.0), "max_batch: expected an int"),
    (dict(max_batch=True), "max_batch: expected an int"),
    (dict(max_batch="64"), "max_batch: expected an int")])
def test_batching_refuses_settings_that_cannot_work(kwargs, message):
    with pytest.raises(ArgumentError, match=message) as info:
        Batching(**kwargs)
    assert isinstance(info.value, ValueError)  # as these settings raised before


def test_batching_takes_numpy_numbers_and_keeps_plain_ones():
    b = Batching(max_batch=np.int64(16), max_delay_us=np.float32(250))
    assert type(b.max_batch) is int and type(b.max_delay_us) is float
    assert b == Batching(16, 250.0)
    assert Batching(max_batch=MAX_BATCH, max_delay_us=MAX_DELAY_US).max_batch == MAX_BATCH


def _broken_batching(**kw):
    """A Batching whose delay overflows the worker's wait, as construction used to allow."""
    config = Batching(max_batch=8, max_delay_us=100)
    object.__setattr__(config, "max_delay_us", float("inf"))
    return config


def test_a_failing_batcher_thread_fails_every_future_and_close_returns(jet):
    model = Model(jet, offload.device("cpu"), batching=_broken_batching())
    x = zoo.sample_input("jet_mlp", 1)
    futures = [model.submit(x) for _ in range(3)]
    done, pending = concurrent.futures.wait(futures, timeout=30)
    assert not pending  # before: the thread died of OverflowError, the futures never finished
    for f in futures:
        with pytest.raises(OffloadError, match="batcher thread .* failed .*OverflowError"):
            f.result()
    with pytest.raises(OffloadError, match="batcher thread"):
        model(x)  # refused at once, not queued for a dead thread
    closer = threading.Thread(target=model.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()


def test_a_failure_after_the_device_run_fails_that_batch_only():
    calls = []

    def finish(outputs):
        calls.append(len(outputs[0]))
        if len(calls) == 1:
            raise RuntimeError("finishing failed")
        return outputs[0]
    batcher = Batcher(lambda arrays, wait: arrays, Batching(max_batch=1, max_delay_us=0),
                      finish=finish)
    try:
        first = batcher.submit([np.ones((1, 4), np.float32)])
        with pytest.raises(OffloadError, match="RuntimeError: finishing failed"):
            first.result(timeout=30)
        second = batcher.submit([np.full((1, 4), 2, np.float32)])
        np.testing.assert_array_equal(second.result(timeout=30), np.full((1, 4), 2))
    finally:
        batcher.close()


def test_a_split_request_whose_pieces_fail_fails_once(jet):
    model = Model(jet, offload.device("cpu"), batching=Batching(max_batch=4, max_delay_us=0))
    real = model._dispatch

    def flaky(arrays, *args, **kw):
        if len(arrays[0]) == 2:
            raise MemoryError("no memory for the last piece")
        return real(arrays, *args, **kw)
    model._dispatch = flaky
    future = model.submit(zoo.sample_input("jet_mlp", 10))  # 4 + 4 + 2 rows
    with pytest.raises(DeviceMemoryError, match="no memory for the last piece"):
        future.result(timeout=30)
    model.close()


def test_the_batcher_thread_that_cannot_start_is_a_typed_error(jet):
    result = _run_python(f"""
        import resource, sys, threading
        sys.path.insert(0, {HERE!r})
        import offload
        from offload import zoo
        graph = offload.import_onnx(zoo.path("jet_mlp"))
        threading.stack_size(1 << 30)  # 1 GiB per thread: under the cap below, none starts
        vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize")][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20),) * 2)
        try:
            offload.Model(graph, offload.device("cpu"), batching=offload.Batching())
        except offload.OffloadError as e:
            print("typed:", e)
    """)
    assert result.returncode == 0, result.stderr
    assert "typed: could not start the batcher thread" in result.stdout


# -- 10. a batching model that is never closed is collected, its thread stops ------------------
def _batcher_threads():
    return [t for t in threading.enumerate() if t.name.startswith("offload-batcher")]


def test_five_hundred_unclosed_batching_models_leave_no_thread(jet):
    gc.collect()
    baseline = threading.active_count()
    refs = []
    x = zoo.sample_input("jet_mlp", 2)
    for i in range(500):
        model = Model(jet, offload.device("cpu"), batching=Batching(max_batch=8, max_delay_us=50))
        if i % 100 == 0:
            assert model(x).shape == (2, 5)  # a used one too
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    deadline = time.monotonic() + 30
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() <= baseline  # before: 500 models -> 500 more threads
    assert sum(r() is not None for r in refs) == 0  # and the models themselves


def test_a_dropped_model_still_answers_what_was_submitted(jet):
    model = Model(jet, offload.device("cpu"),
                  batching=Batching(max_batch=64, max_delay_us=200_000))
    xs = [zoo.sample_input("jet_mlp", 1, seed=k) for k in range(5)]
    futures = [model.submit(x) for x in xs]
    ref = weakref.ref(model)
    del model
    gc.collect()
    reference = offload.load("jet_mlp")
    for x, f in zip(xs, futures):  # the waiting requests kept the model alive
        np.testing.assert_allclose(f.result(timeout=30), reference(x), rtol=1e-5, atol=1e-6)
    del f, futures
    gc.collect()
    deadline = time.monotonic() + 30
    while ref() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
        gc.collect()
    assert ref() is None


# -- 6. batches and arenas follow what is queued -----------------------------------------------
def test_a_huge_max_batch_runs_small_requests_at_their_size(jet):
    model = Model(jet, offload.device("cpu"), batching=Batching(max_batch=10**9,
                                                                max_delay_us=1000))
    x = zoo.sample_input("jet_mlp", 8)
    np.testing.assert_allclose(model(x), offload.load("jet_mlp")(x), rtol=1e-5, atol=1e-6)
    # before: bucket(8) was max_batch/8 = 125 000 000 rows, an 8 GB arena block and plan
    assert list(model._plans) == [((8, 16),)]
    assert model._batcher.bucket(8) == 8 and model._batcher.bucket(1000) == 1024
    model.close()


@pytest.mark.parametrize("max_batch", [1, 8, 64, 1000, 10**9])
def test_buckets_cover_the_rows_with_bounded_padding(max_batch):
    b = Batcher(lambda arrays, wait: arrays, Batching(max_batch=max_batch, max_delay_us=0))
    try:
        for rows in list(range(1, 130)) + [999, 1000, 4097, 10**6]:
            if rows > max_batch:
                continue
            size = b.bucket(rows)
            assert rows <= size <= max_batch
            assert size - rows <= max(max_batch // 8, rows)  # never more padding than rows
    finally:
        b.close()


def test_calls_over_the_run_size_run_as_several_runs(jet):
    model = Model(jet, offload.device("cpu"))
    model.max_run_rows = 1000
    x = zoo.sample_input("jet_mlp", 4500, seed=3)
    want = offload.load("jet_mlp").run(x)
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-6)
    assert sorted(model._plans) == [((500, 16),), ((1000, 16),)]
    assert model.stats["calls"] == 1 and model.stats["device_runs"] == 5
    out = np.empty((4500, 5), np.float32)
    assert model(x, out=out) is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, batch_size=3000), want, rtol=1e-5, atol=1e-6)


def test_a_model_that_mixes_the_batch_is_never_split():
    node = G.Node("reduce", ["x"], ["y"], {"fn": "sum", "axes": (0,), "keepdims": 1,
                                           "noop_with_empty_axes": 0}, "r")
    graph = G.Graph([node], [G.TensorInfo("x", ("N", 3))], ["y"], {})
    model = Model(graph, offload.device("cpu"))
    model.max_run_rows = 4
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.testing.assert_allclose(model(x), x.sum(0, keepdims=True))


class _SmallCPU(CPUDevice):
    """The CPU device with a per-allocation limit: a device with less memory than the call."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def alloc(self, nbytes):
        if nbytes > self.limit:
            raise DeviceMemoryError(f"cpu: {nbytes} bytes asked, {self.limit} is the limit")
        return super().alloc(nbytes)


def test_a_run_that_finds_no_memory_is_halved_until_it_fits(jet):
    model = Model(jet, _SmallCPU(64 << 10))  # 64 KiB blocks: about 250 rows of jet_mlp
    x = zoo.sample_input("jet_mlp", 3000, seed=4)
    np.testing.assert_allclose(model(x), offload.load("jet_mlp").run(x), rtol=1e-5, atol=1e-6)
    learned = model._run_rows[((16,),)]
    assert 1 <= learned <= 1000 and all(s[0][0] <= 3000 for s in model._plans)
    np.testing.assert_allclose(model(x[:7]), offload.load("jet_mlp").run(x[:7]), rtol=1e-5,
                               atol=1e-6)


def test_ten_million_rows_under_a_memory_cap_are_split_and_typed():
    """The issue's 10**7-row call: before, one plan of 10**7 rows (gigabytes of activations)
    and, under a memory cap, a raw MemoryError from aligned_empty; now runs of
    OFFLOAD_MAX_RUN_ROWS rows, and a plan asked for three times that size (its two dense layers
    are one fused chain: a plan of 10**7 rows fits) a DeviceMemoryError."""
    result = _run_python("""
        import resource, numpy as np
        import offload
        from offload import graph as G
        w1 = np.full((16, 64), 0.01, np.float32)
        w2 = np.full((64, 2), 0.01, np.float32)
        nodes = [G.Node("dense", ["x", "w1"], ["h"], {"activation": "relu"}, "d1"),
                 G.Node("dense", ["h", "w2"], ["y"], {}, "d2")]
        graph = G.Graph(nodes, [G.TensorInfo("x", ("N", 16))], ["y"], {"w1": w1, "w2": w2})
        model = offload.Model(graph, offload.device("cpu"))
        x = np.ones((10**7, 16), np.float32)  # 640 MB; unfused, one plan for it: 2.6 GB of activations
        vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize")][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30),) * 2)
        y = model(x)
        print("split", y.shape, float(y[0, 0]), float(y[-1, 1]), model.stats["device_runs"])
        try:
            # (d1 and d2 run as one fused chain on the cpu device: a plan of 10**7 rows holds only
            # its input and output, 0.7 GB, under the cap; 3 * 10**7 rows are 2.2 GB)
            model.plan((3 * 10**7, 16))
        except offload.DeviceMemoryError as e:
            print("typed", "bytes" in str(e))
    """, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    want = 64 * 0.16 * 0.01
    split = lines[0].split()
    assert split[0] == "split" and split[1:3] == ["(10000000,", "2)"], result.stdout
    assert abs(float(split[3]) - want) < 1e-4 and abs(float(split[4]) - want) < 1e-4
    assert int(split[5]) == -(-10**7 // 65536)
    assert lines[1] == "typed True", result.stdout


# -- hostmem: sizes no machine has, devices nobody has ------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: offload.empty((2**38,)),
    lambda: offload.empty((2**62, 2**62)),
    lambda: offload.empty((2**33,), dtype=">f4"),  # through the byte-block path
    lambda: offload.hostmem.aligned_empty(2**45),
    lambda: offload.hostmem.buffer((2**40,), "<f4")])
def test_impossible_host_allocations_are_device_memory_errors(call):
    with pytest.raises(DeviceMemoryError, match="host memory: cannot allocate .* bytes"):
        call()


@pytest.mark.parametrize("spec", ["tpu:9", "cuda:7", [], 5, "cuda:1x"])
def test_empty_refuses_devices_that_do_not_exist(spec):
    with pytest.raises(offload.DeviceUnavailableError):
        offload.empty((2,), device=spec)


# -- 12. typed errors for bad arguments across the public API ----------------------------------
@pytest.fixture(scope="module")
def model():
    m = offload.load("jet_mlp")
    yield m
    m.close()


X = np.zeros((4, 16), np.float32)


@pytest.mark.parametrize("call,error,message", [
    (lambda m: m.predict(X, batch_size=0), ArgumentError, "batch_size"),
    (lambda m: m.predict(X, batch_size=-1), ArgumentError, "batch_size"),
    (lambda m: m.predict(X, batch_size=2.5), ArgumentError, "batch_size"),
    (lambda m: m.predict(X, batch_size=None), ArgumentError, "batch_size"),
    (lambda m: m.predict(5), ShapeError, "batch axis"),
    (lambda m: m(X, out=5), ShapeError, "out=: expected a float32 array"),
    (lambda m: m(X, out="x"), ShapeError, "out=: expected a float32 array"),
    (lambda m: m(X, out=[5]), ShapeError, "out= array #0"),
    (lambda m: m.bind(X, out=5), ShapeError, "out=: expected"),
    (lambda m: m.plan(("a", 16)), ShapeError, "expected ints >= 0"),
    (lambda m: m.plan((-1, 16)), ShapeError, "expected ints >= 0"),
    (lambda m: m.plan((2.0, 16)), ShapeError, "expected ints >= 0"),
    (lambda m: m.plan(5), ShapeError, "expected a tuple of ints"),
    (lambda m: m.plan((4, 17)), ShapeError, r"expected \[N, 16\]"),
    (lambda m: m.plan((4, 16), (4, 16)), ShapeError, "takes 1 input"),
    (lambda m: m.plan((2**40, 16)), DeviceMemoryError, "bytes"),
])
def test_model_methods_raise_typed_errors(model, call, error, message):
    with pytest.raises(error, match=message):
        call(model)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(fallback="gpu"), ArgumentError, "fallback must be one of"),
    (dict(fallback=None), ArgumentError, "fallback must be one of"),
    (dict(precision="float8"), ArgumentError, "unknown precision 'float8'"),
    (dict(precision=5), ArgumentError, "precision: expected a name"),
    (dict(device=[]), ArgumentError, "empty list"),
    (dict(device="tpu:9"), offload.DeviceUnavailableError, "no device 'tpu:9'"),
    (dict(batching=5), ArgumentError, "batching: expected offload.Batching"),
    (dict(batching={"max_batch": 8}), ArgumentError, "batching: expected offload.Batching")])
def test_load_raises_typed_errors_for_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        offload.load("jet_mlp", **kwargs)


def test_batching_zero_through_load_is_typed():
    with pytest.raises(ArgumentError, match="max_batch"):
        offload.load("jet_mlp", batching=offload.Batching(max_batch=0))


def test_bad_run_size_setting_is_typed(monkeypatch, jet):
    monkeypatch.setenv("OFFLOAD_MAX_RUN_ROWS", "lots")
    with pytest.raises(ArgumentError, match="OFFLOAD_MAX_RUN_ROWS"):
        Model(jet, offload.device("cpu"))
    monkeypatch.setenv("OFFLOAD_MAX_RUN_ROWS", "128")
    assert Model(jet, offload.device("cpu")).max_run_rows == 128


# -- 9. the CLI: one line, exit 2, never a traceback or a hang ---------------------------------
def _npy_with_header(path, shape, data=b""):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(data)
    return str(path)


def _file(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _one_line_error(result, expect):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("offload")]
    assert lines and expect in lines[-1], result.stderr


@pytest.mark.parametrize("make,expect", [
    (lambda d: _npy_with_header(d / "huge.npy", (10**12, 16), b"\0" * 64),
     "the header declares more data than the file holds"),
    (lambda d: _npy_with_header(d / "short.npy", (1000, 16), b"\0" * 64),
     "the header declares more data than the file holds"),
    (lambda d: _file(d / "empty.npy", b""), "is empty"),
    (lambda d: _file(d / "junk.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 5}    \n"),
     "cannot read as a .npy array")])
def test_cli_run_refuses_npy_files_that_lie(tmp_path, make, expect):
    _one_line_error(_offload_cli("run", "jet_mlp", "--input", make(tmp_path)), expect)


@pytest.mark.parametrize("args,expect", [
    (["--batch", "99999999999999999999"], "batch sizes must be at most"),
    (["--min-time", "inf"], "expected a finite number"),
    (["--min-time", "nan"], "expected a finite number"),
    (["--min-time", "1e300"], "expected at most 3600 seconds"),
    (["--clients", "100000"], "client counts must be at most 1024"),
    (["--clients", "2", "--max-delay-us", "1e16", "--min-time", "0.05"],
     "max_delay_us must be between")])
def test_cli_bench_refuses_settings_that_hang_or_explode(args, expect):
    _one_line_error(_offload_cli("bench", "jet_mlp", "--no-onnxruntime", *args, timeout=120),
                    expect)


def test_cli_bench_clients_that_cannot_all_start_do_not_hang():
    """Before: 'can't start new thread' left the started clients on a barrier forever."""
    result = _run_python("""
        import resource, sys
        import offload, offload.bench, offload.cli
        vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize")][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20),) * 2)  # ~35 thread stacks
        sys.exit(offload.cli.main(["bench", "jet_mlp", "--clients", "400", "--min-time", "0.05"]))
    """, timeout=120)
    # the client threads or the batcher's, whichever the capped address space refuses first
    _one_line_error(result, "could not start")


def test_gemm_c_broadcasts_into_the_product_only():
    """Gemm's C is unidirectionally broadcastable to [M, N]: a [4, 1] C is a per-row term for a
    batch of 4 (as onnxruntime computes it) and a ShapeError naming the node for a batch of 1
    (NumPy's two-way broadcasting made that a [4, 4] output)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    w = np.ones((16, 4), np.float32)
    c = np.arange(4, dtype=np.float32).reshape(4, 1)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], "fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    m = offload.load(model.SerializeToString())
    np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(offload.ShapeError, match="Gemm node 'fc'.*does not broadcast"):
        m(x[:1])
