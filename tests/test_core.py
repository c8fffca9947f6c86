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
