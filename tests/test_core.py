"""Tests for the nanobind extension ``offload._core``."""

import gc

import numpy as np
import pytest

from offload import _core


def _vmrss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # reported in kB
    pytest.skip("VmRSS not available in /proc/self/status")


def test_alignment_constant():
    assert _core.ALIGNMENT == 4096


@pytest.mark.parametrize("nbytes", [1, 63, 64, 100, 4095, 4096, 4097, 1 << 20])
def test_default_alignment_and_shape(nbytes):
    arr = _core.aligned_empty(nbytes)
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (nbytes,)
    assert arr.ndim == 1
    assert arr.flags.c_contiguous
    assert _core.address(arr) % _core.ALIGNMENT == 0
    assert arr.ctypes.data % _core.ALIGNMENT == 0
    assert _core.address(arr) == arr.ctypes.data


@pytest.mark.parametrize("alignment", [64, 128, 256, 4096, 1 << 16, 1 << 21])
def test_explicit_alignment(alignment):
    arr = _core.aligned_empty(1000, alignment)
    assert arr.shape == (1000,)
    assert _core.address(arr) % alignment == 0
    assert arr.ctypes.data % alignment == 0
    arr2 = _core.aligned_empty(nbytes=10, alignment=alignment)
    assert arr2.ctypes.data % alignment == 0


def test_zero_size():
    arr = _core.aligned_empty(0)
    assert arr.shape == (0,)
    assert arr.dtype == np.uint8
    assert arr.nbytes == 0
    # One alignment unit is still allocated, so the pointer is real and aligned.
    assert _core.address(arr) != 0
    assert _core.address(arr) % _core.ALIGNMENT == 0
    del arr
    gc.collect()


@pytest.mark.parametrize("alignment", [0, 1, 2, 32, 63, 100, 4095, 4097, -64, -4096])
def test_bad_alignment_raises(alignment):
    with pytest.raises(ValueError, match=str(alignment)):
        _core.aligned_empty(16, alignment)


def test_negative_size_raises():
    with pytest.raises(ValueError):
        _core.aligned_empty(-1)


def test_huge_size_raises_memory_error():
    with pytest.raises(MemoryError):
        _core.aligned_empty(1 << 62)


def test_writeable_and_usable_as_other_dtypes():
    arr = _core.aligned_empty(4096)
    assert arr.flags.writeable
    arr[:] = np.arange(4096) % 256
    assert arr[0] == 0 and arr[255] == 255 and arr[256] == 0
    f = arr.view(np.float32)
    f[:] = 1.5
    assert f.shape == (1024,)
    assert np.all(f == 1.5)
    assert f.ctypes.data == arr.ctypes.data


def test_view_keeps_memory_alive():
    base = _core.aligned_empty(1 << 20)
    base[:] = np.arange(1 << 20) % 251
    view = base[1000:2000]
    view_addr = _core.address(view)
    assert view_addr == _core.address(base) + 1000
    expected = (np.arange(1000, 2000) % 251).astype(np.uint8)
    del base
    gc.collect()
    # Churn the allocator: if the buffer had been freed, these would likely
    # reuse it and clobber the contents.
    junk = [_core.aligned_empty(1 << 20) for _ in range(8)]
    for j in junk:
        j[:] = 0xAB
    junk2 = [np.full(1 << 20, 0xCD, dtype=np.uint8) for _ in range(8)]
    assert _core.address(view) == view_addr
    np.testing.assert_array_equal(view, expected)
    view[:] = 7  # still writeable
    assert np.all(view == 7)
    del junk, junk2


def test_address_matches_numpy_for_various_objects():
    a = np.arange(100, dtype=np.float64)
    assert _core.address(a) == a.ctypes.data
    # offset view and strided view
    assert _core.address(a[5:]) == a.ctypes.data + 5 * 8
    assert _core.address(a[::3]) == a.ctypes.data
    # read-only array
    ro = np.arange(10, dtype=np.int32)
    ro.flags.writeable = False
    assert _core.address(ro) == ro.ctypes.data
    # buffer-protocol objects that DLPack cannot describe / non-numpy buffers
    obj = np.array([1, "x"], dtype=object)
    assert _core.address(obj) == obj.ctypes.data
    ba = bytearray(b"hello")
    assert _core.address(ba) == np.frombuffer(ba, dtype=np.uint8).ctypes.data
    assert _core.address(memoryview(ba)[2:]) == _core.address(ba) + 2


def test_address_rejects_non_buffers():
    with pytest.raises(TypeError):
        _core.address(3)
    with pytest.raises(TypeError):
        _core.address(object())


def test_alloc_free_cycles_do_not_leak():
    nbytes = 64 * 1024
    cycles = 100_000
    limit = 20 * 1024 * 1024

    # Warm up the allocator so its steady-state footprint is in the baseline.
    for _ in range(100):
        a = _core.aligned_empty(nbytes)
        a[::4096] = 1
        del a
    gc.collect()
    start = _vmrss_bytes()

    for i in range(cycles):
        a = _core.aligned_empty(nbytes)
        a[::4096] = 1  # touch every page so leaked memory would be resident
        v = a[1:]
        del a, v
        if i % 5000 == 0:
            # fail fast instead of eating the machine's memory on a leak
            assert _vmrss_bytes() - start < limit, f"RSS grew too much after {i} cycles"

    gc.collect()
    growth = _vmrss_bytes() - start
    assert growth < limit, f"RSS grew by {growth / 2**20:.1f} MiB"


# -- the fused CPU kernels ---------------------------------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from offload import _core  # noqa: E402


def test_native_dense_matches_numpy():
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((3, 7), (7, 5), (5,)))
    out = np.empty((3, 5), np.float32)
    _core.dense(x, w, b, None, out, 1, 0.0, 0.0, 0.0)  # relu
    np.testing.assert_allclose(out, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-6)


def test_native_kernels_refuse_shapes_that_do_not_fit():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        _core.dense(x, np.zeros((4, 5), np.float32), None, None, np.zeros((2, 5), np.float32),
                    0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="bias values do not fit"):
        _core.epilogue(np.zeros((2, 3), np.float32), np.zeros(4, np.float32), 1, None, 0, 0.0,
                       0.0, 0.0)
    with pytest.raises(TypeError):  # a non-contiguous output is never silently copied
        _core.softmax(x, np.zeros((2, 6), np.float32)[:, ::2])


def test_program_runs_ops_in_order():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4)).astype(np.float32)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6), (6, 3)))
    h, y = np.empty((1, 6), np.float32), np.empty((1, 3), np.float32)
    program = _core.Program()
    program.add_dense(x, w1, None, None, h, 4, 0.0, 0.0, 0.0)  # tanh
    program.add_softmax(h, h)
    program.add_dense(h, w2, None, None, y, 0, 0.0, 0.0, 0.0)
    program.run()
    t = np.tanh(x @ w1)
    s = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
    assert len(program) == 3
    np.testing.assert_allclose(y, s @ w2, rtol=1e-5, atol=1e-6)
