"""Async calls, dynamic batching across threads, several devices, explicit fallback, shutdown."""

import asyncio
import concurrent.futures
import threading
import warnings

import numpy as np
import pytest

import offload
from offload import graph as G
from offload import zoo
from offload.device import Capabilities, Device
from offload.drivers.cpu import OPS as CPU_OPS, CPUDevice
from offload.model import Model
from onnx_cases import get_case


@pytest.fixture(scope="module")
def jet_path():
    return zoo.path("jet_mlp")


def batcher_threads():
    return [t for t in threading.enumerate() if t.name.startswith("offload-batcher")]


def test_submit_returns_before_the_work_is_done(jet_path):
    model = offload.load(jet_path)
    gate = threading.Event()
    real = model._dispatch

    def held(*args):
        gate.wait(30)
        return real(*args)
    model._dispatch = held
    x = zoo.sample_input("jet_mlp", 3)
    future = model.submit(x)
    assert not future.done()  # the caller's thread is free while the run waits
    gate.set()
    np.testing.assert_array_equal(future.result(timeout=30), offload.load(jet_path)(x))
    model.close()


def test_infer_async(jet_path):
    model = offload.load(jet_path)
    xs = [zoo.sample_input("jet_mlp", b, seed=b) for b in (1, 2, 3)]

    async def main():
        return await asyncio.gather(*(model.infer_async(x) for x in xs))
    for x, y in zip(xs, asyncio.run(main())):
        np.testing.assert_array_equal(y, model(x))
    model.close()


def test_fifty_threads_through_the_batcher(jet_path, device):
    """50 threads x 200 requests of 1-8 rows: each caller gets exactly its own rows."""
    reference = offload.load(jet_path, device="cpu")
    model = offload.load(jet_path, device=device,
                         batching=offload.Batching(max_batch=64, max_delay_us=500))
    failures = []

    def client(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            x = rng.standard_normal((int(rng.integers(1, 9)), 16)).astype(np.float32)
            y = model(x)
            if y.shape != (len(x), 5) or not np.allclose(y, reference(x), rtol=1e-4, atol=1e-5):
                failures.append((seed, x.shape))
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    stats = model.stats
    assert stats["calls"] == 50 * 200
    assert stats["device_runs"] < stats["calls"]  # requests were merged
    assert 0 <= stats["latency_p50_s"] <= stats["latency_p99_s"]
    model.close()
    assert not batcher_threads()


def test_request_larger_than_max_batch_is_split(jet_path):
    model = offload.load(jet_path, batching=offload.Batching(max_batch=8, max_delay_us=100))
    x = zoo.sample_input("jet_mlp", 20)
    np.testing.assert_allclose(model(x), offload.load(jet_path)(x), rtol=1e-5, atol=1e-6)
    assert model._batcher.requests == 3  # 8 + 8 + 4 rows
    model.close()


def test_different_sample_shapes_are_never_merged():
    node = G.Node("dense", ["x", "w"], ["y"], {"activation": "relu"}, "dense")
    graph = G.Graph([node], [G.TensorInfo("x", ("N", "T", 4))], ["y"],
                    {"w": np.arange(12, dtype=np.float32).reshape(4, 3) / 10})
    model = Model(graph, offload.device("cpu"),
                  batching=offload.Batching(max_batch=64, max_delay_us=20000))
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, t, 4)).astype(np.float32) for t in (3, 5, 3, 5, 7)]
    futures = [model.submit(x) for x in xs]
    for x, f in zip(xs, futures):
        np.testing.assert_allclose(f.result(timeout=30), np.maximum(x @ graph.constants["w"], 0),
                                   rtol=1e-6)
    model.close()


def test_a_model_that_mixes_the_batch_is_not_batched():
    with pytest.raises(offload.ModelFormatError, match="cannot be batched.*reducesum_0"):
        offload.load(get_case("reducesum_opset20_all_axes").model,
                     batching=offload.Batching())


def test_a_fault_fails_exactly_its_batch(jet_path):
    model = offload.load(jet_path, batching=offload.Batching(max_batch=4, max_delay_us=2e6))
    real, runs = model._dispatch, []

    def faulty(arrays, out, profile, **kw):
        runs.append(len(arrays[0]))
        if len(runs) == 2:
            raise offload.DeviceRuntimeError("injected fault in batch 2")
        return real(arrays, out, profile, **kw)
    model._dispatch = faulty
    groups = []
    for g in range(3):  # 4 one-row requests fill a batch at once
        xs = [zoo.sample_input("jet_mlp", 1, seed=10 * g + k) for k in range(4)]
        futures = [model.submit(x) for x in xs]
        concurrent.futures.wait(futures, timeout=30)
        groups.append((xs, futures))
    assert runs == [4, 4, 4]
    for g, (xs, futures) in enumerate(groups):
        for x, f in zip(xs, futures):
            if g == 1:
                with pytest.raises(offload.DeviceRuntimeError, match="injected"):
                    f.result()
            else:
                np.testing.assert_allclose(f.result(), offload.load(jet_path)(x), rtol=1e-5)
    model.close()


@pytest.mark.parametrize("cancel", [False, True])
def test_close_finishes_or_cancels_every_pending_future(jet_path, cancel):
    model = offload.load(jet_path, batching=offload.Batching(max_batch=1000, max_delay_us=5e6))
    futures = [model.submit(zoo.sample_input("jet_mlp", 2, seed=k)) for k in range(20)]
    model.close(cancel=cancel)
    assert all(f.done() for f in futures)  # none left pending, none lost
    if cancel:
        assert all(f.cancelled() for f in futures)
    else:
        assert all(f.result().shape == (2, 5) for f in futures)
    assert not batcher_threads()
    with pytest.raises(offload.OffloadError, match="closed"):
        model.submit(zoo.sample_input("jet_mlp", 1))


def test_close_joins_the_submit_threads(jet_path):
    model = offload.load(jet_path)
    futures = [model.submit(zoo.sample_input("jet_mlp", 1)) for _ in range(10)]
    model.close()
    assert all(f.done() for f in futures)
    assert not [t for t in threading.enumerate() if t.name.startswith("offload-model")]


def test_several_devices_share_the_work(jet_path):
    devices = [i.spec for i in offload.devices() if i.available and "float32" in
               offload.device(i.spec).capabilities.precisions]  # "all" that run float32
    model = offload.load(jet_path, device="all")
    assert [d.spec for d in model.devices] == devices
    x = zoo.sample_input("jet_mlp", 16)
    want = offload.load(jet_path)(x)
    futures = [model.submit(x) for _ in range(40)]
    for f in futures:
        np.testing.assert_allclose(f.result(timeout=60), want, rtol=1e-4, atol=1e-5)
    assert sum(c.runs for c in model._contexts) == 40
    model.close()


def test_batches_go_to_several_devices_at_once(jet_path):
    cpu = offload.device("cpu")
    model = Model(offload.import_onnx(jet_path), [cpu, cpu],
                  batching=offload.Batching(max_batch=4, max_delay_us=1e6))
    hold = threading.Barrier(2)
    real = model._run_on

    def together(ctx, *args):
        hold.wait(10)  # both batches must be in flight at once: one per device
        return real(ctx, *args)
    model._run_on = together
    xs = [zoo.sample_input("jet_mlp", 1, seed=k) for k in range(8)]
    futures = [model.submit(x) for x in xs]
    for x, f in zip(xs, futures):
        np.testing.assert_allclose(f.result(timeout=30), offload.load(jet_path)(x), rtol=1e-5)
    assert [c.runs for c in model._contexts] == [1, 1]
    model.close()
    assert not batcher_threads()


def test_two_contexts_on_one_device_are_both_used(jet_path):
    cpu = offload.device("cpu")
    model = Model(offload.import_onnx(jet_path), [cpu, cpu])
    x = zoo.sample_input("jet_mlp", 4)
    hold = threading.Barrier(2)
    real = model._run_on

    def together(ctx, *args):
        hold.wait(10)  # two runs in flight at once: the second goes to the idle context
        return real(ctx, *args)
    model._run_on = together
    a, b = model.submit(x), model.submit(x)
    a.result(timeout=30), b.result(timeout=30)
    assert [c.runs for c in model._contexts] == [1, 1]
    model.close()


class FaultyEmulatedDevice(CPUDevice):
    """An emulated device (test only) whose dense op fails at run time."""

    kind = "faulty-emu"

    def __init__(self):
        super().__init__()
        self.ops = dict(CPU_OPS, dense=self._failing_dense)
        self.capabilities = Capabilities(frozenset(self.ops))

    @staticmethod
    def _failing_dense(ctx, attrs, ins, out):
        def run():
            raise offload.DeviceRuntimeError("faulty-emu: launch failed")
        return run


def test_fallback_to_cpu_is_counted_and_warned_once(jet_path):
    graph = offload.import_onnx(jet_path)
    x = zoo.sample_input("jet_mlp", 3)
    strict = Model(graph, FaultyEmulatedDevice())
    with pytest.raises(offload.DeviceRuntimeError, match="launch failed"):
        strict(x)
    model = Model(graph, FaultyEmulatedDevice(), fallback="cpu")
    with pytest.warns(RuntimeWarning, match="falling back to cpu"):
        y = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # the same reason is not warned twice
    np.testing.assert_array_equal(y, offload.load(jet_path)(x))
    stats = model.stats
    assert stats["fallbacks"] == 2
    (reason, count), = stats["fallback_reasons"].items()
    assert count == 2 and "faulty-emu:0" in reason and "launch failed" in reason


def test_unavailable_device_with_fallback(jet_path):
    with pytest.raises(offload.DeviceUnavailableError):
        offload.load(jet_path, device="nosuch:0")
    with pytest.warns(RuntimeWarning, match="using cpu instead"):
        model = offload.load(jet_path, device="nosuch:0", fallback="cpu")
    assert model.device.spec == "cpu:0" and model.stats["fallbacks"] == 1
