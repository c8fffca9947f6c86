"""offload.empty, page-locked memory, the batcher's staging arena, and flat RSS over 10^5 cycles."""

import gc
import os
import threading

import numpy as np
import pytest

import offload
from offload import _core, hostmem
from offload.batching import _ARENA, Batcher, Batching, _Arena
from offload.errors import DeviceUnavailableError, ShapeError


def _pinning_works() -> bool:
    try:
        offload.empty(1, pinned=True)
        return True
    except DeviceUnavailableError:
        return False


PINNED = _pinning_works()


@pytest.mark.parametrize("shape,dtype", [
    ((1, 16), np.float32), (16, np.float32), ((3, 224, 224), np.float16), ((0,), np.int64),
    ((), np.float64), ((2, 3), np.uint8), ((5,), np.complex128), (np.int64(7), np.int32),
    ((4,), "datetime64[s]"), ((3,), np.dtype([("a", "<f4"), ("b", "<i2")])), ((4,), ">f4")])
def test_empty_is_aligned_with_the_shape_and_dtype_asked(shape, dtype):
    a = offload.empty(shape, dtype)
    expected = tuple(shape) if isinstance(shape, tuple) else (int(shape),)
    assert a.shape == expected and a.dtype == np.dtype(dtype)
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % 4096 == 0
    owner = a.base
    while not isinstance(owner, hostmem.HostBuffer):  # the base chain ends in the owner
        owner = owner.obj if isinstance(owner, memoryview) else owner.base
    assert owner.address == a.ctypes.data


def test_empty_default_dtype_is_float32():
    assert offload.empty((2, 3)).dtype == np.float32


@pytest.mark.parametrize("shape,dtype,message", [
    ((-1, 4), np.float32, "non-negative"), (("x",), np.float32, "shape"),
    ((3,), object, "object"), ((3,), "not-a-dtype", "dtype")])
def test_empty_refuses_bad_shapes_and_dtypes(shape, dtype, message):
    with pytest.raises(ShapeError, match=message):
        offload.empty(shape, dtype)


def test_empty_dlpack_roundtrip_numpy_and_torch():
    torch = pytest.importorskip("torch")
    a = offload.empty((8, 16))
    a[:] = np.arange(128, dtype=np.float32).reshape(8, 16)
    owner = a.base.obj
    assert owner.__dlpack_device__() == (1, 0)
    assert np.from_dlpack(a).ctypes.data == a.ctypes.data
    t = torch.from_dlpack(owner)
    assert t.data_ptr() == a.ctypes.data
    back = np.from_dlpack(t)
    np.testing.assert_array_equal(back, a)
    del a, owner
    gc.collect()
    assert float(t[7, 15]) == 127.0 and back[7, 15] == 127.0
    del t, back


@pytest.mark.skipif(PINNED, reason="this machine can page-lock memory: the error path is not hit")
def test_pinned_without_a_usable_cuda_runtime_raises_with_the_reason():
    with pytest.raises(DeviceUnavailableError) as e:
        offload.empty((4, 16), pinned=True)
    text = str(e.value)
    # either no library loads (each one tried is named) or the runtime cannot page-lock (the
    # CUDA error is named, e.g. cudaErrorInsufficientDriver or cudaErrorNoDevice)
    assert "libcudart" in text and ("CUDA error" in text or "not found" in text
                                    or "cannot open" in text or "No such file" in text), text
    # asking the device to choose never fails: plain aligned memory where pinning cannot work
    a = offload.empty((4, 16), device="cuda:0")
    assert not a.base.obj.pinned and hostmem.address(a) % 4096 == 0


@pytest.mark.skipif(not PINNED, reason="needs a CUDA runtime that can page-lock memory (a GPU)")
def test_pinned_memory_is_page_locked_and_exported_as_cuda_host():
    a = offload.empty((1024, 16), pinned=True)
    assert a.base.obj.pinned and a.base.obj.__dlpack_device__() == (3, 0)  # kDLCUDAHost
    a[:] = 2.5
    b = np.from_dlpack(a.base.obj)  # NumPy reads host-accessible CUDA memory
    assert b.ctypes.data == a.ctypes.data and (b == 2.5).all()
    c = offload.empty((4,), device="cuda:0")
    assert c.base.obj.pinned
    del a, b, c
    gc.collect()


@pytest.mark.parametrize("spec", ["cpu", "cpu:0", "opencl:0", "xrt:0", "CPU"])
def test_empty_for_host_sharing_devices_is_plain_aligned(spec):
    a = offload.empty((3, 4), device=spec)
    assert not a.base.obj.pinned and hostmem.address(a) % 4096 == 0


def test_empty_takes_a_device_object_and_refuses_bad_specs():
    a = offload.empty((2,), device=offload.device("cpu"))
    assert not a.base.obj.pinned
    with pytest.raises(DeviceUnavailableError, match="bad device spec"):
        offload.empty((2,), device="cuda:1x")  # "cuda:x" is a spec by name


def test_hostmem_copy_is_typed():
    dst = offload.empty((4, 4))
    hostmem.copy(dst, np.ones((4, 4), np.float32))
    assert (dst == 1).all()
    with pytest.raises(ShapeError, match="dst has 64 bytes, src has 32 bytes"):
        hostmem.copy(dst, np.ones((2, 4), np.float32))


# -- the batcher's arena -----------------------------------------------------------------------
class _Request:
    def __init__(self, *arrays):
        self.arrays = list(arrays)
        self.rows = arrays[0].shape[0]


def _numpy_gather(batcher, batch):
    """The batcher's NumPy path, as it was: the reference for the native one."""
    rows = sum(r.rows for r in batch)
    size = batcher.bucket(rows)
    merged = []
    for k in range(len(batch[0].arrays)):
        parts = [r.arrays[k] for r in batch]
        block = np.empty((size,) + parts[0].shape[1:], np.result_type(*parts))
        np.concatenate(parts, out=block[:rows])
        block[rows:] = 0
        merged.append(block)
    return merged


@pytest.fixture
def batcher():
    b = Batcher(lambda arrays, wait: arrays, Batching(max_batch=64, max_delay_us=100))
    yield b
    b.close()


@pytest.mark.parametrize("rows", [[1] * 64, [1] * 61, [3, 1, 7, 2], [5], [8, 8]])
def test_batcher_gathers_exactly_like_numpy(batcher, rows):
    rng = np.random.default_rng(sum(rows))
    batch = [_Request(rng.standard_normal((n, 16)).astype(np.float32),
                      rng.standard_normal((n, 2, 3)).astype(np.float32)) for n in rows]
    for _ in range(3):  # again on reused blocks, which hold the previous batch's rows
        merged = batcher._gather([r.arrays for r in batch], sum(rows))
        expected = _numpy_gather(batcher, batch)
        for m, e in zip(merged, expected):
            assert m.dtype == e.dtype and m.shape == e.shape
            np.testing.assert_array_equal(m, e)
            if len(batch) > 1 or m.shape[0] != rows[0]:
                assert hostmem.address(m) % 4096 == 0  # from the arena


@pytest.mark.parametrize("make", [
    lambda n: np.ones((n, 16), np.float64),                       # other dtype: promoted
    lambda n: np.ones((n, 32), np.float32)[:, ::2],               # strided
    lambda n: np.ones((n, 16), ">f4"),                            # big-endian
    lambda n: np.ones((n, 16), np.int32)])                        # integer
def test_batcher_falls_back_to_numpy_for_other_inputs(batcher, make):
    batch = [_Request(np.zeros((2, 16), np.float32)), _Request(make(3))]
    merged, expected = batcher._gather([r.arrays for r in batch], 5), _numpy_gather(batcher, batch)
    assert merged[0].dtype == expected[0].dtype
    np.testing.assert_array_equal(merged[0], expected[0])


def test_arena_reuses_a_block_only_when_nobody_holds_it():
    arena = _Arena(per_shape=2)
    first = arena.take((8, 4))
    address = first.ctypes.data
    del first
    again = arena.take((8, 4))
    assert again.ctypes.data == address  # nobody held it: reused
    rows = again[2:4]  # e.g. an output that is a view of the input, handed to a caller
    del again
    other = arena.take((8, 4))
    assert other.ctypes.data != address  # still referenced through the view: not reused
    third = arena.take((8, 4))  # pool full (2) and both in use: a fresh, unpooled block
    assert third.ctypes.data not in (address, other.ctypes.data)
    del rows
    assert arena.take((8, 4)).ctypes.data == address


def test_arena_is_bounded():
    arena = _Arena(per_shape=2, shapes=3, max_bytes=1 << 20)
    for k in range(1, 10):
        arena.take((k, 4))
    assert len(arena._pools) == 3
    big = arena.take((1 << 19,))  # 2 MiB: over max_bytes, not pooled
    assert arena._bytes <= 1 << 20
    del big


def test_arena_blocks_are_not_shared_across_threads():
    arena, seen, lock = _Arena(), [], threading.Lock()
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        blocks = [arena.take((16, 16)) for _ in range(3)]
        with lock:
            seen.extend(b.ctypes.data for b in blocks)
        barrier.wait()  # all blocks still held here

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 12


def test_batched_model_results_match_with_the_arena():
    model = offload.load("jet_mlp", batching=Batching(max_batch=16, max_delay_us=2000))
    try:
        rng = np.random.default_rng(5)
        xs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 2, 3, 1, 4, 1)]
        futures = [model.submit(x) for x in xs]
        reference = offload.load("jet_mlp")
        for x, f in zip(xs, futures):
            np.testing.assert_allclose(f.result(timeout=30), reference(x), rtol=1e-6, atol=1e-6)
    finally:
        model.close()


# -- memory safety -----------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(bool(os.environ.get("OFFLOAD_ASAN")),
                    reason="RSS is not meaningful under AddressSanitizer")
def test_100k_allocate_use_free_cycles_keep_rss_flat():
    model = offload.load("jet_mlp")
    parts = [np.full((1, 16), k, np.float32) for k in range(8)]
    expected_batch = np.concatenate(parts)

    def cycle(k):
        x = offload.empty((1, 16))
        x[:] = k % 7
        y = model(x)  # read in place by the CPU device
        block = _ARENA.take((8, 16))
        _core.gather(block, parts)
        big = offload.empty((64, 1024))  # above glibc's mmap threshold
        big[::16] = 1.0
        return y, block, big

    for k in range(2000):  # warm up: allocator pools, plan caches, arena
        cycle(k)
    gc.collect()
    start = _rss_bytes()
    limit = 8 << 20
    for k in range(100_000):
        y, block, big = cycle(k)
        if k % 10_000 == 0:
            assert y.shape == (1, 5)
            np.testing.assert_array_equal(block, expected_batch)
            assert _rss_bytes() - start < limit, f"RSS grew too much after {k} cycles"
        del y, block, big
    gc.collect()
    growth = _rss_bytes() - start
    assert growth < limit, f"RSS grew by {growth / 2**20:.1f} MiB over 10^5 cycles"
