"""When a copy happens, on every device: `offload.empty` arrays are used in place where the device
reads host memory (0 bytes copied in), everything else is copied and counted, and never wrong."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import offload
from offload import zoo

from conftest import assert_close

ROWS = 4
NBYTES_IN = ROWS * 16 * 4
NBYTES_OUT = ROWS * 5 * 4


def reads_host_memory(device) -> bool:
    """Whether the device uses an aligned host array in place (cpu; OpenCL sharing host memory)."""
    return device.reads_host_arrays or bool(getattr(device, "zero_copy", False))


@pytest.fixture(scope="module")
def jet_path():
    return zoo.path("jet_mlp")


@pytest.fixture(scope="module")
def reference(jet_path):
    return offload.load(jet_path)


def sample(seed=0):
    return zoo.sample_input("jet_mlp", ROWS, seed=seed)


def copied_in(model, *args, **kw):
    model.reset_stats()
    y = model(*args, **kw)
    return y, model.stats["copy_in_bytes"], model.stats["copy_out_bytes"]


def test_an_empty_array_is_read_in_place(device, jet_path, reference):
    model = offload.load(jet_path, device=device)
    x = offload.empty((ROWS, 16))
    for seed in range(3):  # the same buffer refilled per event
        x[...] = sample(seed)
        y, n_in, _ = copied_in(model, x)
        assert_close(y, reference(sample(seed)), what=f"seed {seed} on {device.spec}")
        assert n_in == (0 if reads_host_memory(device) else NBYTES_IN)


def test_a_plain_array_is_copied_and_counted(device, jet_path, reference):
    model = offload.load(jet_path, device=device)
    y, n_in, n_out = copied_in(model, sample())
    assert (n_in, n_out) == (NBYTES_IN, NBYTES_OUT)
    assert_close(y, reference(sample()))


@pytest.mark.parametrize("kind", ["strided", "misaligned", "read-only", "big-endian", "float64"])
def test_awkward_arrays_are_copied_counted_and_right(device, jet_path, reference, kind):
    want = reference(sample())
    if kind == "strided":
        x = np.zeros((ROWS, 32), np.float32)[:, ::2]
    elif kind == "misaligned":  # contiguous, 4 bytes past a page boundary
        x = offload.empty(ROWS * 16 + 1)[1:].reshape(ROWS, 16)
    elif kind == "read-only":
        x = offload.empty((ROWS, 16))
    elif kind == "big-endian":
        x = np.empty((ROWS, 16), ">f4")
    else:
        x = np.empty((ROWS, 16), np.float64)
    x[...] = sample()
    if kind == "read-only":
        x.flags.writeable = False
    model = offload.load(jet_path, device=device)
    y, n_in, _ = copied_in(model, x)
    # OpenCL maps a read-only aligned array in place (its kernels only read it); the cpu device
    # copies it (its native kernels take writeable arrays)
    in_place = kind == "read-only" and getattr(device, "zero_copy", False)
    assert n_in == (0 if in_place else NBYTES_IN), kind
    assert_close(y, want, what=kind)


def test_out_array_is_written_in_place(device, jet_path, reference):
    model = offload.load(jet_path, device=device)
    x, out = offload.empty((ROWS, 16)), offload.empty((ROWS, 5))
    x[...] = sample()
    y, n_in, n_out = copied_in(model, x, out=out)
    assert y is out
    assert_close(out, reference(sample()))
    if device.reads_host_arrays:
        assert (n_in, n_out) == (0, 0)
    plain_out = np.empty((ROWS, 5), np.float32)
    y, _, n_out = copied_in(model, x, out=plain_out)
    assert y is plain_out and n_out == NBYTES_OUT
    assert_close(plain_out, reference(sample()))


def test_many_buffers_in_turn_stay_right(device, jet_path, reference):
    """More distinct buffers than a plan keeps bindings for, used in turn."""
    model = offload.load(jet_path, device=device)
    buffers = [offload.empty((ROWS, 16)) for _ in range(7)]
    for rnd in range(2):
        for k, x in enumerate(buffers):
            x[...] = sample(10 * rnd + k)
            assert_close(model(x), reference(sample(10 * rnd + k)), what=f"buffer {k}")


def test_an_output_overlapping_the_input_is_not_corrupted(jet_path, reference):
    model = offload.load(jet_path)
    block = offload.empty(ROWS * 16)
    x = block.reshape(ROWS, 16)
    out = block[:ROWS * 5].reshape(ROWS, 5)  # the output shares the input's memory
    x[...] = sample()
    want = reference(sample())
    model(x, out=out)
    assert_close(out, want)


def test_bind_reuses_the_same_buffers(device, jet_path, reference):
    model = offload.load(jet_path, device=device)
    x = offload.empty((ROWS, 16))
    run = model.bind(x)
    for seed in range(3):
        x[...] = sample(seed)
        model.reset_stats()
        y = run()
        assert y is run.outputs[0]
        assert_close(y, reference(sample(seed)))
        assert model.stats["copy_in_bytes"] == (0 if reads_host_memory(device) else NBYTES_IN)
        assert model.stats["calls"] == 1


def test_bind_checks_once_and_refuses_misuse(jet_path):
    model = offload.load(jet_path)
    with pytest.raises(offload.ShapeError, match=r"expected shape \[N, 16\] float32, got \[4, 3\]"):
        model.bind(np.zeros((4, 3), np.float32))
    with pytest.raises(offload.ShapeError, match="bind.*float32.*float64"):
        model.bind(np.zeros((4, 16)))
    with pytest.raises(offload.ShapeError, match=r"out= array #0: expected shape \[4, 5\]"):
        model.bind(np.zeros((4, 16), np.float32), out=np.zeros((4, 6), np.float32))
    run = model.bind(offload.empty((ROWS, 16)))
    model.close()
    with pytest.raises(offload.OffloadError, match="closed"):
        run()


def test_a_binding_used_from_two_threads_at_once_raises(jet_path):
    model = offload.load(jet_path)
    run = model.bind(offload.empty((ROWS, 16)))
    entered, release = threading.Event(), threading.Event()
    original = run._run

    def slow(*args):
        entered.set()
        release.wait(10)
        original(*args)

    run._run = slow
    worker = threading.Thread(target=run)
    worker.start()
    assert entered.wait(10)
    with pytest.raises(offload.OffloadError, match="another thread"):
        run()
    release.set()
    worker.join()


class ArrayOnAnotherDevice:
    """Stands for a CuPy array or a CUDA tensor: only its DLPack device is read before refusal."""

    shape, dtype = (ROWS, 16), "float32"

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0


def test_an_array_from_another_device_is_refused_naming_both(jet_path):
    model = offload.load(jet_path)
    with pytest.raises(offload.ShapeError, match=r"in cuda:0 memory.*runs on cpu:0"):
        model(ArrayOnAnotherDevice())


def test_a_host_dlpack_array_goes_in_without_copy_to_numpy(jet_path, reference):
    torch = pytest.importorskip("torch")
    model = offload.load(jet_path)
    assert_close(model(torch.from_numpy(sample())), reference(sample()))


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_other_dtypes_raise_shape_error(jet_path, dtype):
    model = offload.load(jet_path)
    with pytest.raises(offload.ShapeError, match=f"expected dtype float32.*got {np.dtype(dtype)}"):
        model(np.zeros((ROWS, 16), dtype))


def test_out_device_returns_arrays_in_the_device_memory(device, jet_path, reference):
    model = offload.load(jet_path, device=device)
    y = model(sample(), out="device")
    if device.kind == "cpu":
        assert isinstance(y, np.ndarray)
        host = y
    elif device.kind == "opencl":
        import pyopencl.array as cla
        assert isinstance(y, cla.Array)
        host = y.get()
    else:  # cuda: a CuPy array on the device
        assert y.__dlpack_device__() == device.dlpack_device
        host = y.get()
    assert_close(host, reference(sample()))
    again = model(sample(1), out="device")  # the plan's buffers are reused: y must not change
    assert_close(host if device.kind == "cpu" else y.get(), reference(sample()))
    del again


def test_a_gpu_array_goes_in_without_a_host_round_trip(device, jet_path, reference):
    if device.dlpack_device is None:
        pytest.skip(f"{device.spec} takes host arrays only")
    cupy = getattr(device, "_cp", None)  # the CUDA driver's CuPy (emulated on cuda-emu:0)
    if cupy is None:
        cupy = pytest.importorskip("cupy")
    model = offload.load(jet_path, device=device)
    with cupy.cuda.Device(device.dlpack_device[1]):
        x = cupy.asarray(sample())
    model.reset_stats()
    assert_close(model(x), reference(sample()))
    assert model.stats["copy_in_bytes"] == NBYTES_IN  # one device-to-device copy
