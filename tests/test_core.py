"""Tests for the nanobind extension ``offload._core``."""

import gc
import os
import platform

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


# ASan's quarantine keeps freed memory resident on purpose: RSS says nothing under it
_under_asan = pytest.mark.skipif(bool(os.environ.get("OFFLOAD_ASAN")),
                                 reason="RSS is not meaningful under AddressSanitizer")


@_under_asan
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


_TINY = np.float32(1e-20)  # squared: 1e-40, a float32 denormal


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="denormals are flushed through x86's MXCSR only")
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_flush_denormals_and_give_the_callers_mode_back(threads):
    """The native kernels run with FTZ | DAZ (an Intel core takes ~100 cycles per denormal
    operation: a saturated LSTM was 28x slower), and the caller's float mode comes back."""
    x = np.full((64, 8), _TINY, np.float32)
    w = np.full((8, 4), _TINY, np.float32)
    old = _core.get_num_threads(), _core.get_parallel_macs()
    _core.set_num_threads(threads)
    _core.set_parallel_macs(0)
    try:
        out = np.full((64, 4), np.nan, np.float32)
        _core.dense(x, w, None, None, out, 0, 0.0, 0.0, 0.0)
        np.testing.assert_array_equal(out, 0)  # 8 * 1e-40 flushed
        if _NATIVE_BLAS:
            out[:] = np.nan
            _core.gemm_dense(x, w, None, None, out, 0, 0.0, 0.0, 0.0)
            np.testing.assert_array_equal(out, 0)
    finally:
        _core.set_num_threads(old[0])
        _core.set_parallel_macs(old[1])
    assert _TINY * _TINY != 0  # NumPy, on the calling thread, keeps its denormals


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


# -- HostBuffer: the owner of aligned host memory ----------------------------------------------
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


@pytest.mark.parametrize("shape,typestr,dtype", [
    ((3, 5), "<f4", np.float32), ((7,), "|u1", np.uint8), ((2, 3, 4), "<i8", np.int64),
    ((0, 4), "<f8", np.float64), ((), "<f2", np.float16), ((4,), "|b1", np.bool_),
    ((2, 2), "<c8", np.complex64), ((5,), "<u4", np.uint32), ((3,), "|i1", np.int8)])
def test_hostbuffer_is_an_aligned_typed_buffer(shape, typestr, dtype):
    hb = _core.HostBuffer(shape, typestr)
    a = np.asarray(hb)
    assert a.dtype == dtype and a.shape == shape and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data == hb.address and hb.address % 4096 == 0
    assert hb.nbytes == a.nbytes and not hb.pinned
    assert a.base.obj is hb  # the base chain ends in the owner
    m = memoryview(hb)
    assert m.shape == shape and m.nbytes == a.nbytes and not m.readonly


@pytest.mark.parametrize("typestr", [">f4", "<f3", "<V8", "<M8", "f4", "<f", "", "<f4x"])
def test_hostbuffer_refuses_types_it_cannot_describe(typestr):
    with pytest.raises(ValueError, match="typestr"):
        _core.HostBuffer((2,), typestr)


def test_hostbuffer_refuses_negative_shape():
    with pytest.raises(ValueError, match="-3"):
        _core.HostBuffer((2, -3), "<f4")


def test_hostbuffer_dlpack_roundtrip_through_numpy():
    hb = _core.HostBuffer((4, 3), "<f4")
    np.asarray(hb)[:] = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert hb.__dlpack_device__() == (1, 0)  # kDLCPU
    x = np.from_dlpack(hb)
    assert x.shape == (4, 3) and x.dtype == np.float32 and x.ctypes.data == hb.address
    np.testing.assert_array_equal(x, np.arange(12).reshape(4, 3))
    x[0, 0] = 42  # a view, not a copy
    assert np.asarray(hb)[0, 0] == 42
    with pytest.raises(BufferError):
        hb.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        hb.__dlpack__(dl_device=(2, 0))
    for kwargs in ({}, {"max_version": (1, 0)}, {"max_version": (0, 8)}, {"stream": None}):
        assert type(hb.__dlpack__(**kwargs)).__name__ == "PyCapsule"


def test_memory_lives_while_a_view_or_dlpack_consumer_holds_it():
    a = np.asarray(_core.HostBuffer((1 << 18,), "<f4"))  # the user's array; the only owner ref
    a[:] = np.arange(1 << 18, dtype=np.float32)
    view = a[1000:2000]
    imported = np.from_dlpack(a.base.obj)
    address = a.ctypes.data
    del a
    gc.collect()
    junk = [np.asarray(_core.HostBuffer((1 << 18,), "<f4")) for _ in range(8)]
    for j in junk:
        j[:] = -1  # would clobber the block if it had been freed and reused
    np.testing.assert_array_equal(view, np.arange(1000, 2000, dtype=np.float32))
    np.testing.assert_array_equal(imported[:5], np.arange(5, dtype=np.float32))
    assert imported.ctypes.data == address
    del view
    gc.collect()
    imported[-1] = 7  # still writeable, still ours
    assert imported[-1] == 7


def test_hostbuffer_dlpack_into_torch_survives_the_array():
    torch = pytest.importorskip("torch")
    a = np.asarray(_core.HostBuffer((64, 16), "<f4"))
    a[:] = 3.0
    t = torch.from_dlpack(a.base.obj)
    assert t.shape == (64, 16) and t.dtype == torch.float32 and t.data_ptr() == a.ctypes.data
    del a
    gc.collect()
    junk = [np.asarray(_core.HostBuffer((64, 16), "<f4")) for _ in range(8)]
    for j in junk:
        j[:] = -1
    assert bool((t == 3.0).all())
    t += 1  # writes into the shared block
    back = np.from_dlpack(t)
    assert bool((back == 4.0).all())
    del t, back, junk
    gc.collect()


def test_cuda_runtime_is_optional():
    loaded = _core.cuda_runtime()
    if loaded is None:
        with pytest.raises(RuntimeError, match="load_cuda_runtime"):
            _core.HostBuffer((4,), "<f4", True)
        with pytest.raises(RuntimeError, match="/nonexistent/libcudart.so.99"):
            _core.load_cuda_runtime(["/nonexistent/libcudart.so.99"])
    else:  # loaded once per process; later calls answer the same library
        assert _core.load_cuda_runtime(["/nonexistent/libcudart.so.99"]) == loaded


# -- copy and gather ----------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [0, 1, 4096, 64 * 1024, 3 << 20])
def test_copy_moves_every_byte(nbytes):
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.asarray(_core.HostBuffer((nbytes,), "|u1"))
    _core.copy(dst, src)
    np.testing.assert_array_equal(dst, src)
    back = np.zeros(nbytes, np.uint8)
    _core.copy(back, dst.base.obj)  # a HostBuffer is a source (and a destination) as well
    np.testing.assert_array_equal(back, src)


def test_copy_refuses_what_it_cannot_copy_in_one_memcpy():
    with pytest.raises(ValueError, match="dst has 16 bytes, src has 12 bytes"):
        _core.copy(np.zeros(4, np.float32), np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="C-contiguous"):
        _core.copy(np.zeros(4, np.float32), np.zeros(8, np.float32)[::2])
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="writeable"):
        _core.copy(ro, np.zeros(4, np.float32))
    with pytest.raises(TypeError):
        _core.copy(np.zeros(4, np.float32), 3)


def _progress_during(call, repeats=3):
    """How far a Python thread got while ``call()`` ran in this thread (the switch interval is
    raised so that the other thread runs only where ``call`` releases the GIL)."""
    counter, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0)  # hands the GIL back at once

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    worker = threading.Thread(target=spin)
    try:
        worker.start()
        time.sleep(0.05)
        progress = 0
        for _ in range(repeats):
            before = counter[0]
            call()
            progress = max(progress, counter[0] - before)
        return progress
    finally:
        stop.set()
        sys.setswitchinterval(old)
        worker.join()


def test_copy_releases_the_gil_for_large_copies():
    src = np.ones(64 << 20, np.uint8)
    dst = np.asarray(_core.HostBuffer((64 << 20,), "|u1"))

    def busy_python(seconds=0.02):  # holds the GIL throughout: the harness must see no progress
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    assert _progress_during(busy_python) == 0
    assert _progress_during(lambda: _core.copy(dst, src)) > 0
    parts = [src[:32 << 20].reshape(1, -1), src[32 << 20:].reshape(1, -1)]
    out = np.asarray(_core.HostBuffer((2, 32 << 20), "|u1"))
    assert _progress_during(lambda: _core.gather(out, parts)) > 0


def test_gather_concatenates_and_zero_pads_exactly():
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((n, 4, 3)).astype(np.float32) for n in (1, 3, 2, 1, 5)]
    out = np.asarray(_core.HostBuffer((16, 4, 3), "<f4"))
    out[:] = np.nan  # padding must be written, not left over
    assert _core.gather(out, parts) == 12
    expected = np.concatenate(parts + [np.zeros((4, 4, 3), np.float32)])
    np.testing.assert_array_equal(out, expected)
    assert _core.gather(out, []) == 0 and not out.any()
    assert _core.gather(out, [np.ones((16, 4, 3), np.float32)]) == 16 and (out == 1).all()


def test_gather_refuses_parts_that_do_not_fit():
    out = np.zeros((4, 3), np.float32)
    bad = [([np.zeros((1, 3), np.float64)], ValueError, "format 'f'"),
           ([np.zeros((1, 2), np.float32)], ValueError, r"sample shape \(3,\)"),
           ([np.zeros((5, 3), np.float32)], ValueError, "5 rows, out has only 4"),
           ([np.zeros((1, 6), np.float32)[:, ::2]], TypeError, "part 0 must be a C-contiguous"),
           ([np.zeros((1, 3), ">f4")], ValueError, "format")]
    for parts, error, message in bad:
        with pytest.raises(error, match=message):
            _core.gather(out, parts)
        assert _core.gather(out, parts, strict=False) == -1
    with pytest.raises(TypeError, match="out must be"):
        _core.gather(np.zeros((4, 6), np.float32)[:, ::2], [])


def test_unshared_finds_items_only_the_list_holds():
    held = _core.HostBuffer((4,), "<f4")
    items = [held, _core.HostBuffer((4,), "<f4")]
    assert _core.unshared(items) == 1
    view = np.asarray(items[1])  # a view holds its owner through the memoryview
    assert _core.unshared(items) == -1
    del view, held
    assert _core.unshared(items) == 0
    assert _core.unshared([]) == -1


# -- every binding checks what it is given before touching memory (issue 15, class 3) ----------
# Each of these crashed the process (segfault, or a use after free that ASan reports) before the
# bindings checked their arguments; CI's sanitizer step (.ci/run asan) runs them under ASan.
class _Temporaries:
    """A sequence whose __getitem__ makes a new array each time (nobody else holds it)."""

    def __init__(self, n, cols):
        self.n, self.cols = n, cols

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return np.full((1, self.cols), i, np.float32)


def test_gather_holds_the_parts_a_sequence_makes_on_the_fly():
    out = np.full((5, 1024), np.nan, np.float32)
    assert _core.gather(out, _Temporaries(4, 1024)) == 4
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2, 3, 0])
    assert _core.gather(out, _Temporaries(3, 1024), strict=False) == 3
    with pytest.raises(ValueError, match="3 rows, out has only 2"):
        _core.gather(np.zeros((2, 1024), np.float32), _Temporaries(3, 1024))


def test_gather_counts_rows_when_samples_are_empty():
    """Found by the fuzzer (tests/fuzz_core.py): with a zero-size sample shape the bytes always
    fit, and gather said it wrote 3 rows into an out of 0 rows."""
    out = np.zeros((0, 0), np.float32)
    with pytest.raises(ValueError, match="3 rows, out has only 0"):
        _core.gather(out, [np.zeros((3, 0), np.float32)])
    assert _core.gather(out, [np.zeros((3, 0), np.float32)], strict=False) == -1
    assert _core.gather(np.zeros((4, 0), np.float32), [np.zeros((3, 0), np.float32)]) == 3


def test_gather_takes_a_sequence_that_lies_about_its_length():
    class Liar(_Temporaries):
        def __len__(self):
            return 100  # __getitem__ stops at 2 (IndexError): 2 parts, not 100
    out = np.zeros((4, 8), np.float32)
    assert _core.gather(out, Liar(2, 8)) == 2

    class Broken(_Temporaries):
        def __getitem__(self, i):
            raise RuntimeError("no parts today")
    with pytest.raises(RuntimeError, match="no parts today"):
        _core.gather(out, Broken(2, 8))


def _dense_args(x, w, out, act=0):
    return (x, w, None, None, out, act, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("x,w,out", [
    (np.float32(1).reshape(()), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32)),
    (np.zeros(3, np.float32), np.zeros((3, 1), np.float32), np.zeros((1, 1), np.float32)),
    (np.zeros((1, 3), np.float32), np.zeros(3, np.float32), np.zeros((1, 1), np.float32)),
    (np.zeros((1, 3), np.float32), np.zeros((3, 2), np.float32), np.float32(0).reshape(())),
    (np.zeros((1, 1, 3), np.float32), np.zeros((3, 2), np.float32), np.zeros((1, 2), np.float32))])
def test_program_checks_ranks_before_reading_shapes(x, w, out):
    out = np.array(out)
    with pytest.raises(ValueError, match="Program.add_dense: expected 2-D"):
        _core.Program().add_dense(*_dense_args(x, w, out))
    with pytest.raises(ValueError, match="dense: expected 2-D"):
        _core.dense(*_dense_args(x, w, out))
    with pytest.raises(ValueError, match="add_softmax"):
        _core.Program().add_softmax(np.array(np.float32(1)), np.zeros(2, np.float32))


def test_program_holds_the_arrays_it_runs_on():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 300)).astype(np.float32)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    want = x @ w
    out = np.zeros((4, 200), np.float32)
    program = _core.Program()
    program.add_dense(*_dense_args(x, w, out))
    view = out[1:]  # the only reference left to the output
    del x, w, out
    gc.collect()
    junk = [np.full((300, 200), 7, np.float32) for _ in range(8)]  # would reuse freed blocks
    program.run()
    np.testing.assert_allclose(view, want[1:], rtol=1e-4, atol=1e-4)
    del junk


@pytest.mark.parametrize("bad", [
    dict(x=np.zeros((4, 3), np.float64)),              # would be a converted temporary
    dict(w=np.zeros((6, 3), np.float32)[::2]),         # strided: would be a converted copy
    dict(bias=np.zeros(3, np.float64)),
    dict(residual=np.zeros((4, 3), np.float16))])
def test_program_takes_arrays_as_they_are(bad):
    args = dict(x=np.zeros((4, 3), np.float32), w=np.zeros((3, 3), np.float32), bias=None,
                residual=None, out=np.zeros((4, 3), np.float32))
    args.update(bad)
    with pytest.raises(TypeError):
        _core.Program().add_dense(args["x"], args["w"], args["bias"], args["residual"],
                                  args["out"], 0, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError):
        _core.Program().add_softmax(np.zeros((4, 3), np.float64), np.zeros((4, 3), np.float32))


def test_program_runs_safely_while_another_thread_adds_to_it():
    x, w = np.ones((1, 64), np.float32), np.ones((64, 64), np.float32) / 64
    outs = [np.zeros((1, 64), np.float32) for _ in range(400)]
    program, stop = _core.Program(), threading.Event()

    def runner():
        while not stop.is_set():
            program.run()
    t = threading.Thread(target=runner)
    t.start()
    try:
        for out in outs:  # the op list grows (and moves) while the other thread runs it
            program.add_dense(*_dense_args(x, w, out))
    finally:
        stop.set()
        t.join()
    program.run()
    assert len(program) == 400 and all((o == 1).all() for o in outs)


def test_kernels_refuse_unknown_codes_and_overlapping_outputs():
    x, w = np.ones((4, 4), np.float32), np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="activation code must be 0..5, got 9"):
        _core.dense(*_dense_args(x, w, np.zeros((4, 4), np.float32), act=9))
    with pytest.raises(ValueError, match="activation code"):
        _core.Program().add_dense(*_dense_args(x, w, np.zeros((4, 4), np.float32), act=-1))
    with pytest.raises(ValueError, match="bias_axis must be 0 or 1"):
        _core.epilogue(np.zeros((4, 4), np.float32), np.ones(4, np.float32), 2, None, 0, 0.0,
                       0.0, 0.0)
    with pytest.raises(ValueError, match="out overlaps x"):
        _core.dense(*_dense_args(x, w, x))
    with pytest.raises(ValueError, match="out overlaps w"):
        _core.Program().add_dense(*_dense_args(x, w, w))
    block = np.ones(32, np.float32)
    with pytest.raises(ValueError, match="out overlaps residual"):
        _core.epilogue(block[:16].reshape(4, 4), None, 1, block[8:24].reshape(4, 4), 0, 0.0,
                       0.0, 0.0)
    with pytest.raises(ValueError, match="out overlaps x"):  # softmax: in place, or apart
        _core.softmax(block[:16].reshape(4, 4), block[4:20].reshape(4, 4))
    _core.softmax(block[:16].reshape(4, 4), block[:16].reshape(4, 4))
    np.testing.assert_allclose(block[:16], 0.25)
    prod = np.ones((2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="out overlaps prod"):
        _core.conv_epilogue(prod, prod.reshape(1, 2, 4), None, None, 0, 0.0, 0.0, 0.0)


class _SkipsBase(_core.HostBuffer):
    def __init__(self):  # never calls HostBuffer.__init__: no block behind the object
        pass


@pytest.mark.parametrize("make", [_SkipsBase, lambda: _core.HostBuffer.__new__(_core.HostBuffer)])
def test_an_unconstructed_hostbuffer_exposes_nothing(make):
    hb = make()
    with pytest.raises(BufferError, match="never initialised"):
        memoryview(hb)
    assert np.asarray(hb).dtype == object  # NumPy wraps it as an object, reads no memory
    with pytest.raises(BufferError, match="never initialised"):
        hb.__dlpack__()
    with pytest.raises((TypeError, BufferError)):
        np.from_dlpack(hb)
    with pytest.warns(RuntimeWarning, match="uninitialized"):
        with pytest.raises(TypeError):
            hb.address
    with pytest.raises(TypeError):
        _core.copy(hb, np.zeros(4, np.uint8))
    with pytest.raises(TypeError):
        _core.gather(np.zeros((4, 1), np.uint8), [hb])
    assert _core.gather(np.zeros((4, 1), np.uint8), [hb], strict=False) == -1


def test_a_subclass_that_calls_the_base_works_and_init_runs_once():
    class Fine(_core.HostBuffer):
        def __init__(self, n):
            super().__init__((n,), "<f4")
    a = np.asarray(Fine(8))
    assert a.shape == (8,) and a.dtype == np.float32
    hb = _core.HostBuffer((4,), "<f4")
    with pytest.warns(RuntimeWarning, match="already-initialized"), pytest.raises(TypeError):
        hb.__init__((1 << 20,), "<f4")  # a second __init__ would leak (or free) the first block
    assert hb.nbytes == 16


def test_hostbuffer_refuses_more_dims_than_the_buffer_protocol_takes():
    with pytest.raises(ValueError, match="at most 64 dimensions"):
        _core.HostBuffer([1] * 65, "<f4")
    assert memoryview(_core.HostBuffer([1] * 64, "<f4")).ndim == 64


def test_load_cuda_runtime_refuses_a_name_with_a_nul_byte():
    if _core.cuda_runtime() is None:
        with pytest.raises(ValueError, match="NUL"):
            _core.load_cuda_runtime(["libcudart.so\0/evil"])


def test_fuzz_core_seeded():
    """400 seeded inputs through tests/fuzz_core.py (the coverage-guided run: .ci/run fuzz):
    any exception but a refusal, a wrong result or a crash fails (under ASan in CI)."""
    import fuzz_core
    for data in fuzz_core.seeded(400, seed=15):
        fuzz_core.one_input(data)


def test_fuzz_conv_direct_seeded():
    """300 seeded fuzzed convolutions (fuzz_core.check_conv: both weight layouts, strides, pads,
    dilations, fused pools; results against the definition), under ASan in CI: the direct
    kernels read past each row of the padded image into a slack that this must show to be
    enough."""
    import fuzz_core
    for data in fuzz_core.seeded(300, seed=16, size=48):
        fuzz_core.check_conv(fuzz_core.Reader(data))


# ---- conv kernels, large products and the thread pool (csrc/conv_kernels.cpp) ----

import threadpoolctl  # noqa: E402

from offload.drivers import cpu as _cpu  # noqa: E402

_NATIVE_BLAS = _cpu.native_blas()
_RNG = np.random.default_rng(11)
_ACTS = [(0, 0.0, 0.0, 0.0), (1, 0.0, 0.0, 0.0), (2, 0.1, 0.0, 0.0), (3, 0.0, 0.0, 0.0),
         (4, 0.0, 0.0, 0.0), (5, 0.0, -0.5, 0.5)]


def _act_ref(y, act):
    code, alpha, lo, hi = act
    if code == 1:
        return np.maximum(y, 0)
    if code == 2:
        return np.where(y >= 0, y, y * alpha)
    if code == 3:
        return 1 / (1 + np.exp(-y))
    if code == 4:
        return np.tanh(y)
    if code == 5:
        return np.clip(y, lo, hi)
    return y


def _conv_ref(x, w, b, r, strides, pads, dil, act):
    """The convolution by its definition (float64 sums over a zero-padded copy)."""
    n, c, h, wd = x.shape
    m, _, kh, kw = w.shape
    t, l, bo, ri = pads
    xp = np.zeros((n, c, h + t + bo, wd + l + ri))
    xp[:, :, t:t + h, l:l + wd] = x
    oh = (xp.shape[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xp.shape[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((n, m, oh, ow))
    for i in range(kh):
        for j in range(kw):
            taps = xp[:, :, i * dil[0]:i * dil[0] + (oh - 1) * strides[0] + 1:strides[0],
                      j * dil[1]:j * dil[1] + (ow - 1) * strides[1] + 1:strides[1]]
            y += np.einsum("nchw,mc->nmhw", taps, w[:, :, i, j])
    if b is not None:
        y += b[None, :, None, None]
    if r is not None:
        y += r
    return _act_ref(y, act).astype(np.float32)


# conv_direct's weight layouts: 8 lanes (positions in the vectors) everywhere, 16 (output
# channels in the vectors) where the CPU has AVX-512
_DIRECT_LANES = (8, 16) if _core.simd() == "avx512" else (8,)



def _direct_lanes_for(strides):
    """The layouts whose kernel takes these strides (16 lanes: the second one 1 or 2)."""
    return [lanes for lanes in _DIRECT_LANES
            if strides == (1, 1) or (lanes == 16 and strides[1] <= 2)]


_CONV_SHAPES = [  # n, c, h, w, m, kh, kw, strides, pads, dilations
    (1, 3, 23, 22, 20, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1)),    # ResNet's stem, stride 2
    (2, 9, 9, 8, 33, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1)),      # 1x1 stride 2 (downsample)
    (2, 6, 10, 9, 18, 3, 2, (3, 1), (1, 0, 2, 1), (1, 2)),     # strides 3 x 1, dilated
    (2, 5, 9, 11, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),     # 3 panels of 16: a pair + one
    (1, 3, 6, 70, 17, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),     # 1x1 direct, 2 panels, M odd
    (1, 1, 40, 40, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),    # thin first layer
    (3, 16, 9, 11, 9, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),     # M not a multiple of 8
    (2, 5, 7, 9, 13, 2, 3, (1, 1), (0, 1, 2, 0), (2, 1)),      # asymmetric pads, dilation
    (4, 42, 1, 37, 32, 1, 3, (1, 1), (0, 1, 0, 1), (1, 1)),    # 1-D as H = 1
    (2, 7, 1, 30, 5, 1, 5, (1, 1), (0, 2, 0, 2), (1, 3)),      # 1-D, dilated
    (2, 7, 11, 13, 19, 3, 3, (2, 3), (1, 2, 0, 1), (1, 2)),    # strided (gemm only)
    (3, 24, 6, 5, 20, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),     # 1x1: plain GEMM
    (1, 3, 2, 2, 4, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1)),       # kernel larger than x: empty
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", _CONV_SHAPES)
def test_native_convolutions_match_the_definition(shape, threads):
    n, c, h, w, m, kh, kw, strides, pads, dil = shape
    x = _RNG.standard_normal((n, c, h, w), dtype=np.float32)
    wt = _RNG.standard_normal((m, c, kh, kw), dtype=np.float32)
    b = _RNG.standard_normal(m, dtype=np.float32)
    old = _core.get_num_threads(), _core.get_parallel_macs()
    _core.set_num_threads(threads)
    _core.set_parallel_macs(0 if threads > 1 else 1 << 21)  # the pool for every size
    try:
        for k, act in enumerate(_ACTS):
            bias = b if k % 2 == 0 else None
            want0 = _conv_ref(x, wt, bias, None, strides, pads, dil, (0, 0, 0, 0))
            res = _RNG.standard_normal(want0.shape, dtype=np.float32) if k % 3 == 0 else None
            want = _conv_ref(x, wt, bias, res, strides, pads, dil, act)
            for lanes in _direct_lanes_for(strides):
                got = np.full(want.shape, np.nan, np.float32)
                _core.conv_direct(x, _cpu._pack_direct(wt, lanes), bias, res, got, m,
                                  list(pads), list(dil), *act, strides=list(strides))
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{lanes}")
            if _NATIVE_BLAS:
                got = np.full(want.shape, np.nan, np.float32)
                _core.conv_gemm(x, wt.reshape(m, -1), bias, res, got, kh, kw, list(strides),
                                list(pads), list(dil), *act)
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    finally:
        _core.set_num_threads(old[0])
        _core.set_parallel_macs(old[1])


@pytest.mark.parametrize("lanes", _DIRECT_LANES)
@pytest.mark.parametrize("pooling", [1, 2])
@pytest.mark.parametrize("shape", [(2, 1, 41, 39, 16), (3, 16, 20, 21, 32), (2, 7, 9, 10, 40),
                                   (1, 4, 1, 33, 20)])
def test_conv_direct_fused_pool_matches_conv_then_pool(shape, pooling, lanes):
    n, c, h, w, m = shape
    k = (3, 3) if h > 1 else (1, 3)
    pads = [1, 1, 1, 1] if h > 1 else [0, 1, 0, 1]
    x = _RNG.standard_normal((n, c, h, w), dtype=np.float32)
    wt = _RNG.standard_normal((m, c) + k, dtype=np.float32)
    b = _RNG.standard_normal(m, dtype=np.float32)
    x[0, 0, 0, :3] = np.nan  # NaN propagates through the max
    for act in _ACTS:
        full = _conv_ref(x, wt, b, None, (1, 1), pads, (1, 1), act)
        oh, ow = full.shape[2] // 2, full.shape[3] // 2
        win = full[:, :, :2 * oh, :2 * ow].reshape(n, m, oh, 2, ow, 2)
        if pooling == 1:
            want = win.max(axis=(3, 5))  # NaN where the window has one
        else:
            want = win.mean(axis=(3, 5))
        got = np.full((n, m, oh, ow), -7.0, np.float32)
        _core.conv_direct(x, _cpu._pack_direct(wt, lanes), b, None, got, m, pads, [1, 1], *act,
                          pooling)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{act}")


def test_native_convolutions_refuse_what_does_not_fit():
    x = np.zeros((2, 3, 8, 8), np.float32)
    wp = _cpu._pack_direct(np.zeros((5, 3, 3, 3), np.float32))
    out = np.zeros((2, 5, 8, 8), np.float32)
    args = (None, None)
    _core.conv_direct(x, wp, *args, out, 5, [1, 1, 1, 1], [1, 1], 0, 0.0, 0.0, 0.0)
    bad = [
        (x, wp, None, None, np.zeros((2, 5, 7, 8), np.float32), 5, [1, 1, 1, 1], [1, 1]),  # out
        (x, wp, None, None, out, 9, [1, 1, 1, 1], [1, 1]),          # M beyond the packed blocks
        (x, wp, None, None, out, 5, [1, 1, 1], [1, 1]),             # 3 pads
        (x, wp, None, None, out, 5, [-1, 1, 1, 1], [1, 1]),         # negative pad
        (x, wp, None, None, out, 5, [1, 1, 1, 1], [0, 1]),          # zero dilation
        (x, wp, np.zeros(4, np.float32), None, out, 5, [1, 1, 1, 1], [1, 1]),   # bias size
        (x, wp, None, np.zeros(5, np.float32), out, 5, [1, 1, 1, 1], [1, 1]),   # residual size
        (np.zeros((2, 4, 8, 8), np.float32), wp, None, None, out, 5, [1, 1, 1, 1], [1, 1]),
        (x, wp[:, :, :, :, :4].copy(), None, None, out, 5, [1, 1, 1, 1], [1, 1]),  # layout
        (x[0], wp, None, None, out, 5, [1, 1, 1, 1], [1, 1]),       # 3-D x
        (x, wp, None, None, np.zeros((2, 5, 4, 4), np.float32), 5, [1, 1, 1, 1], [1, 1], 0,
         0.0, 0.0, 0.0, 0, [2, 2]),                                 # 8 lanes: stride 1 only
        (x, _cpu._pack_direct(np.zeros((5, 3, 3, 3), np.float32), 16), None, None,
         np.zeros((2, 5, 8, 3), np.float32), 5, [1, 1, 1, 1], [1, 3], 0, 0.0, 0.0, 0.0, 0,
         [1, 3]),                                                   # a stride of 3 wide
        (x, _cpu._pack_direct(np.zeros((5, 3, 3, 3), np.float32), 16)[:, :, :, :, :12].copy(),
         None, None, out, 5, [1, 1, 1, 1], [1, 1]),                 # 12 lanes
    ]
    for case in bad:
        with pytest.raises((ValueError, TypeError)):
            _core.conv_direct(*case, *((0, 0.0, 0.0, 0.0) if len(case) == 8 else ()))
    pooled = np.zeros((2, 5, 4, 4), np.float32)  # a fused 2x2 pool: out is the pooled shape
    _core.conv_direct(x, wp, None, None, pooled, 5, [1, 1, 1, 1], [1, 1], 0, 0.0, 0.0, 0.0, 1)
    for out_, residual, code, match in [(out, None, 1, "pooled 2x2"), (pooled, None, 3, "pool"),
                                        (pooled, pooled, 2, "residual")]:
        with pytest.raises(ValueError, match=match):
            _core.conv_direct(x, wp, None, residual, out_, 5, [1, 1, 1, 1], [1, 1], 0, 0.0,
                              0.0, 0.0, code)
    with pytest.raises(ValueError, match="activation code"):
        _core.conv_direct(x, wp, None, None, out, 5, [1, 1, 1, 1], [1, 1], 6, 0.0, 0.0, 0.0)
    flat = np.zeros(2 * 5 * 8 * 8 + 2 * 3 * 8 * 8, np.float32)
    with pytest.raises(ValueError, match="overlaps"):  # out over x
        _core.conv_direct(flat[:x.size].reshape(x.shape), wp, None, None,
                          flat[x.size // 2:x.size // 2 + out.size].reshape(out.shape), 5,
                          [1, 1, 1, 1], [1, 1], 0, 0.0, 0.0, 0.0)
    with pytest.raises(TypeError):  # float64 out is not converted (it would be a temporary)
        _core.conv_direct(x, wp, None, None, out.astype(np.float64), 5, [1, 1, 1, 1], [1, 1],
                          0, 0.0, 0.0, 0.0)
    if _NATIVE_BLAS:
        w2 = np.zeros((5, 27), np.float32)
        _core.conv_gemm(x, w2, None, None, out, 3, 3, [1, 1], [1, 1, 1, 1], [1, 1], 0, 0, 0, 0)
        for case in [(x, w2, None, None, out, 3, 2, [1, 1], [1, 1, 1, 1], [1, 1]),   # kernel
                     (x, w2, None, None, out, 3, 3, [0, 1], [1, 1, 1, 1], [1, 1]),   # stride
                     (x, w2, None, None, out, 3, 3, [2, 2], [1, 1, 1, 1], [1, 1]),   # out
                     (x, w2.reshape(5, 3, 9), None, None, out, 3, 3, [1, 1], [1, 1, 1, 1],
                      [1, 1])]:
            with pytest.raises((ValueError, TypeError)):
                _core.conv_gemm(*case, 0, 0.0, 0.0, 0.0)
        with pytest.raises(ValueError, match="overlaps"):
            _core.conv_gemm(x, w2, out.reshape(-1)[:5], None, out, 3, 3, [1, 1], [1, 1, 1, 1],
                            [1, 1], 0, 0, 0, 0)


@pytest.mark.parametrize("is_max", [True, False])
@pytest.mark.parametrize("k,s,d", [((2, 2), (2, 2), (1, 1)), ((3, 2), (1, 2), (1, 1)),
                                   ((2, 2), (1, 1), (2, 2)), ((1, 3), (1, 3), (1, 1))])
def test_native_pooling_matches_numpy(is_max, k, s, d):
    x = _RNG.standard_normal((3, 4, 9, 10), dtype=np.float32)
    oh = (9 - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (10 - d[1] * (k[1] - 1) - 1) // s[1] + 1
    taps = [x[:, :, i * d[0]:i * d[0] + (oh - 1) * s[0] + 1:s[0],
              j * d[1]:j * d[1] + (ow - 1) * s[1] + 1:s[1]]
            for i in range(k[0]) for j in range(k[1])]
    want = np.max(taps, axis=0) if is_max else np.mean(taps, axis=0)
    got = np.empty((3, 4, oh, ow), np.float32)
    _core.pool2d(x, got, is_max, list(k), list(s), list(d))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        _core.pool2d(x, np.empty((3, 4, oh + 1, ow), np.float32), is_max, list(k), list(s),
                     list(d))
    with pytest.raises(ValueError):
        _core.pool2d(x, got, is_max, [0, 2], list(s), list(d))


def test_native_maxpool_propagates_nan():
    x = np.zeros((1, 1, 2, 4), np.float32)
    x[0, 0, 1, 2] = np.nan
    y = np.empty((1, 1, 1, 2), np.float32)
    _core.pool2d(x, y, True, [2, 2], [2, 2], [1, 1])
    assert y[0, 0, 0, 0] == 0 and np.isnan(y[0, 0, 0, 1])


@pytest.mark.skipif(not _NATIVE_BLAS, reason="NumPy's BLAS is not an OpenBLAS offload can call")
@pytest.mark.parametrize("rows", [1, 17, 3000])
def test_gemm_dense_matches_numpy_and_leaves_openblas_threads_alone(rows):
    x = _RNG.standard_normal((rows, 47), dtype=np.float32)
    w = _RNG.standard_normal((47, 200), dtype=np.float32)
    b = _RNG.standard_normal(200, dtype=np.float32)
    r = _RNG.standard_normal((rows, 200), dtype=np.float32)
    got = np.empty((rows, 200), np.float32)
    old = _core.get_num_threads(), _core.get_parallel_macs()
    _core.set_num_threads(2)
    _core.set_parallel_macs(0)
    try:
        with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
            _core.gemm_dense(x, w, b, r, got, 1, 0.0, 0.0, 0.0)
            # held at one thread only while offload's product ran
            assert threadpoolctl.threadpool_info()[0]["num_threads"] == 2
    finally:
        _core.set_num_threads(old[0])
        _core.set_parallel_macs(old[1])
    want = np.maximum(x.astype(np.float64) @ w + b + r, 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        _core.gemm_dense(x, w[:46], None, None, got, 0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="overlaps"):
        _core.gemm_dense(x, w, got[0], None, got, 0, 0.0, 0.0, 0.0)  # bias inside out


def test_thread_pool_resizes_and_refuses_bad_counts():
    old = _core.get_num_threads()
    try:
        for n in (1, 3, 2):
            _core.set_num_threads(n)
            assert _core.get_num_threads() == n
        for bad in (0, -1, 5000):
            with pytest.raises(ValueError):
                _core.set_num_threads(bad)
    finally:
        _core.set_num_threads(old)


def test_thread_pool_serves_many_callers_at_once():
    """Callers that find the pool busy run inline: every result is still exact."""
    x = _RNG.standard_normal((8, 16, 12, 12), dtype=np.float32)
    wt = _RNG.standard_normal((32, 16, 3, 3), dtype=np.float32)
    wp = _cpu._pack_direct(wt)
    want = _conv_ref(x, wt, None, None, (1, 1), (1, 1, 1, 1), (1, 1), (0, 0, 0, 0))
    old = _core.get_num_threads(), _core.get_parallel_macs()
    _core.set_num_threads(2)
    _core.set_parallel_macs(0)
    errors = []

    def work():
        out = np.empty(want.shape, np.float32)
        for _ in range(20):
            _core.conv_direct(x, wp, None, None, out, 32, [1, 1, 1, 1], [1, 1], 0, 0, 0, 0)
            if not np.allclose(out, want, rtol=1e-4, atol=1e-4):
                errors.append("mismatch")
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        _core.set_num_threads(old[0])
        _core.set_parallel_macs(old[1])
    assert not errors
# ---------------------------------------------------------------------------------------------
# rnn: the LSTM/GRU time loop (csrc/rnn_kernels.cpp)

def _rnn_case(cell, t=5, b=7, i=3, h=11, d=2, seed=0):
    """Random operands of _core.rnn for one layer (b not a multiple of the 6- or 12-row
    block, h not of the 8- or 16-lane vector)."""
    from offload.drivers.cpu import rnn_packed_rt, rnn_packed_wt
    rng = np.random.default_rng(seed)
    g = 4 if cell == "lstm" else 3
    f = lambda *s: rng.uniform(-0.6, 0.6, s).astype(np.float32)  # noqa: E731
    case = dict(x=f(t, b, i), w=f(d, g * h, i), r=f(d, g * h, h), wb=f(d, g * h),
                rb=f(d, g * h), p=f(d, 3 * h) if cell == "lstm" else None, h0=f(d, b, h),
                c0=f(d, b, h) if cell == "lstm" else None,
                lens=rng.integers(0, t + 1, b).astype(np.int32))
    case["wtp"] = rnn_packed_wt(case["w"])
    case["rt"] = rnn_packed_rt(case["r"], cell)
    case["out"] = np.full((t + (2 if cell == "lstm" else 1), d, b, h), np.nan, np.float32)
    return case


def _rnn_call(cell, c, direction=2, clip=0.0, input_forget=False, lbr=False, threads=1,
              wide=True, **override):
    c = dict(c, **override)
    _core.rnn(0 if cell == "lstm" else 1, direction, c["x"], c["wtp"], c["rt"], c["wb"],
              c["rb"], c["p"], c["lens"], c["h0"], c["c0"], c["out"], clip, input_forget, lbr,
              threads, wide)
    return c["out"]


def _rnn_numpy(cell, c, direction=2, clip=0.0, input_forget=False, lbr=False):
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    cut = (lambda v: np.clip(v, -clip, clip)) if clip else (lambda v: v)  # noqa: E731
    x, w, r = (c[k].astype(np.float64) for k in ("x", "w", "r"))
    t_len, batch, _ = x.shape
    d_count, gh, h = r.shape
    out = np.zeros(c["out"].shape)
    for d in range(d_count):
        rev = direction == 1 or d == 1
        for b in range(batch):
            n = int(c["lens"][b])
            hp = c["h0"][d, b].astype(np.float64)
            cp = c["c0"][d, b].astype(np.float64) if cell == "lstm" else None
            for s in range(n):
                t = n - 1 - s if rev else s
                xg = w[d] @ x[t, b] + c["wb"][d]
                hg = r[d] @ hp + c["rb"][d]
                if cell == "lstm":
                    p = c["p"][d]
                    gi, go, gf, gc = np.split(xg + hg, 4)
                    i = sig(cut(gi + p[:h] * cp))
                    f = 1 - i if input_forget else sig(cut(gf + p[2 * h:] * cp))
                    cp = f * cp + i * np.tanh(cut(gc))
                    hp = sig(cut(go + p[h:2 * h] * cp)) * np.tanh(cp)
                else:
                    z = sig(cut(xg[:h] + hg[:h]))
                    rr = sig(cut(xg[h:2 * h] + hg[h:2 * h]))
                    if lbr:
                        hc = np.tanh(cut(xg[2 * h:] + rr * hg[2 * h:]))
                    else:
                        hc = np.tanh(cut(xg[2 * h:] + r[d][2 * h:] @ (rr * hp)
                                         + c["rb"][d][2 * h:]))
                    hp = (1 - z) * hc + z * hp
                out[t, d, b] = hp
            out[t_len, d, b] = hp if n else 0
            if cell == "lstm":
                out[t_len + 1, d, b] = cp if n else 0
    return out


@pytest.mark.parametrize("cell,options", [
    ("lstm", {}), ("lstm", dict(clip=0.4, input_forget=True)), ("lstm", dict(direction=1)),
    ("gru", {}), ("gru", dict(lbr=True, clip=0.3)), ("gru", dict(direction=0))])
@pytest.mark.parametrize("wide", (True, False))  # 16 lanes where the CPU has AVX-512; 8
# h: not whole vectors (8, 16), or more than one; b: not whole blocks (6, 12 rows), or one more
@pytest.mark.parametrize("h,b", ((11, 7), (33, 13)))
def test_rnn_matches_numpy(cell, options, wide, h, b):
    c = _rnn_case(cell, b=b, h=h, d=1 if options.get("direction", 2) < 2 else 2)
    got = _rnn_call(cell, c, wide=wide, **options)
    np.testing.assert_allclose(got, _rnn_numpy(cell, c, **options), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("cell", ("lstm", "gru"))
@pytest.mark.parametrize("wide", (True, False))
def test_rnn_threads_and_optional_inputs(cell, wide):
    c = _rnn_case(cell, t=4, b=40, h=17)
    one = _rnn_call(cell, c, threads=1, wide=wide).copy()
    three = _rnn_call(cell, c, threads=3, wide=wide)
    np.testing.assert_array_equal(three, one)  # blocks are independent
    bare = _rnn_call(cell, c, p=None, lens=None, h0=None, c0=None, threads=2, wide=wide)
    zeros = {k: np.zeros_like(c[k]) for k in ("h0", "c0", "p") if c[k] is not None}
    full = np.full_like(c["lens"], 4)
    np.testing.assert_allclose(bare, _rnn_numpy(cell, dict(c, lens=full, **zeros)),
                               rtol=1e-5, atol=2e-6)


def test_rnn_checks_before_touching_memory():
    c = _rnn_case("lstm")
    bad = [
        (dict(x=c["x"][:, :, :-1].copy()), r"wtp .* must have shape"),
        (dict(wtp=c["wtp"][:, :-1].copy()), r"wtp .* must have shape"),
        (dict(rt=c["rt"][:, :-1].copy()), r"rt .* must have shape"),
        (dict(wb=c["wb"][:1].copy()), r"wb must have shape"),
        (dict(p=c["p"][:, :5].copy()), r"p must have shape"),
        (dict(h0=c["h0"][:, :3].copy()), r"initial_h must have shape"),
        (dict(c0=c["c0"][:1].copy()), r"initial_c must have shape"),
        (dict(lens=np.array([1, 2], np.int32)), r"sequence_lens must have shape"),
        (dict(lens=np.array([1, 2, 6, 0, 0, 0, 0], np.int32)), r"sequence_lens\[2\] = 6 is "
                                                              r"outside \[0, 5\]"),
        (dict(lens=np.array([1, -2, 0, 0, 0, 0, 0], np.int32)), r"outside \[0, 5\]"),
        (dict(out=np.zeros((8, 2, 7, 11), np.float32)), r"x must have shape"),
        (dict(out=np.zeros((7, 1, 7, 11), np.float32)), r"out .* is not"),
    ]
    for override, message in bad:
        with pytest.raises(ValueError, match=message):
            _rnn_call("lstm", c, **override)
    with pytest.raises(ValueError, match="cell must be"):
        _core.rnn(7, 2, c["x"], c["wtp"], c["rt"], c["wb"], c["rb"], None, None,
                  None, None, c["out"], 0.0, False, False, 1)
    with pytest.raises(ValueError, match="direction must be"):
        _core.rnn(0, 3, c["x"], c["wtp"], c["rt"], c["wb"], c["rb"], None, None,
                  None, None, c["out"], 0.0, False, False, 1)
    with pytest.raises(ValueError, match="clip must be"):
        _rnn_call("lstm", c, clip=float("nan"))
    with pytest.raises(ValueError, match="peepholes p on a GRU"):
        g = _rnn_case("gru")
        _rnn_call("gru", g, p=c["p"])
    # overlapping output, wrong dtype, non-contiguous: refused
    with pytest.raises(ValueError, match="out overlaps x "):
        _rnn_call("lstm", c, x=c["out"].reshape(-1)[:c["x"].size].reshape(c["x"].shape))
    with pytest.raises(ValueError, match="out overlaps initial_h"):
        _rnn_call("lstm", c, h0=c["out"].reshape(-1)[:c["h0"].size].reshape(c["h0"].shape))
    for override in (dict(out=c["out"].astype(np.float64)),  # never a converted copy
                     dict(out=np.zeros(c["out"].shape[::-1], np.float32).T),
                     dict(rt=c["rt"].astype(np.float64)),
                     dict(h0=np.asfortranarray(c["h0"])),
                     dict(lens=c["lens"].astype(np.int64))):
        with pytest.raises(TypeError):
            _rnn_call("lstm", c, **override)
    assert np.isnan(c["out"]).all()  # nothing was written by any refused call


# ---- row kernels of the transformer taggers (csrc/row_kernels.cpp)

@pytest.mark.parametrize("threads", [1, 2])
def test_gelu_and_erf_match_the_definition(threads):
    from math import erf
    x = np.concatenate([np.linspace(-9, 9, 70001, dtype=np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)])
    old = _core.get_num_threads()
    _core.set_num_threads(threads)
    try:
        g, e = np.empty_like(x), np.empty_like(x)
        _core.gelu(x, g, True)
        _core.gelu(x, e, False)
    finally:
        _core.set_num_threads(old)
    x64 = x.astype(np.float64)
    want_e = np.array([erf(v) if np.isfinite(v) else np.sign(v) if np.isinf(v) else np.nan
                       for v in x64])
    np.testing.assert_allclose(e, want_e, rtol=0, atol=5e-7)  # A&S 7.1.26: 1.5e-7 + rounding
    want_g = 0.5 * x64[:-3] * (1 + np.array([erf(v / 2 ** 0.5) for v in x64[:-3]]))
    np.testing.assert_allclose(g[:-3], want_g, rtol=1e-6, atol=5e-7)
    # x/2 (1 + erf(x/sqrt 2)) as written: inf, -inf * 0 = NaN (the NumPy formula's too), NaN
    assert g[-3] == np.inf and np.isnan(g[-2]) and np.isnan(g[-1]) and np.isnan(e[-1])
    inplace = x.copy()
    _core.gelu(inplace, inplace, True)
    np.testing.assert_array_equal(inplace, g)


def _softmax_np(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("bias_shape,div", [(None, 1), ((3, 4, 5, 37), 1), ((3, 1, 1, 37), 20),
                                            ((1, 4, 5, 37), 1), ((37,), 1)])
def test_softmax_scaled_matches_numpy_for_each_bias_pattern(bias_shape, div):
    x = _RNG.standard_normal((3, 4, 5, 37), dtype=np.float32) * 4
    bias = None if bias_shape is None else _RNG.standard_normal(bias_shape, dtype=np.float32)
    if bias is not None:
        bias[..., -3:] = -1e9  # masked keys
    out = np.empty_like(x)
    _core.softmax_scaled(x, bias, 0.25, div, out)
    want = _softmax_np(x * np.float32(0.25) + (0 if bias is None else bias))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


def test_softmax_scaled_rows_fully_masked_nan_and_in_place():
    x = np.zeros((4, 6), np.float32)
    x[1, 2] = np.nan
    bias = np.full((4, 6), -1e9, np.float32)  # every key masked: uniform, as onnxruntime
    bias[2:] = 0
    out = np.empty_like(x)
    _core.softmax_scaled(x, bias, 1.0, 1, out)
    np.testing.assert_allclose(out[0], 1 / 6, rtol=1e-6)
    assert np.isnan(out[1]).all()
    np.testing.assert_allclose(out[2:], 1 / 6, rtol=1e-6)
    y = _RNG.standard_normal((5, 9), dtype=np.float32)
    want = _softmax_np(y * 2)
    _core.softmax_scaled(y, None, 2.0, 1, y)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-7)


def test_layernorm_matches_numpy():
    x = _RNG.standard_normal((333, 64), dtype=np.float32) * 3 + 1
    g, b = (_RNG.standard_normal(64, dtype=np.float32) for _ in range(2))
    out = np.empty_like(x)
    x64 = x.astype(np.float64)
    norm = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    _core.layernorm(x, g, b, 1e-5, out)
    np.testing.assert_allclose(out, norm * g + b, rtol=1e-4, atol=1e-5)
    _core.layernorm(x, g, None, 1e-5, out)
    np.testing.assert_allclose(out, norm * g, rtol=1e-4, atol=1e-5)


def test_row_kernels_check_before_touching_memory():
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="same size"):
        _core.gelu(x, np.empty(31, np.float32), True)
    with pytest.raises(ValueError, match="overlaps"):
        _core.gelu(x.reshape(-1)[:16], x.reshape(-1)[8:24], True)
    with pytest.raises(TypeError):
        _core.gelu(x.astype(np.float64), np.empty((4, 8)), True)
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="end in the softmax axis"):
        _core.softmax_scaled(x, np.ones((4, 7), np.float32), 1.0, 1, out)
    with pytest.raises(ValueError, match="bias_div"):
        _core.softmax_scaled(x, np.ones((2, 8), np.float32), 1.0, 3, out)
    with pytest.raises(ValueError, match="bias_div"):
        _core.softmax_scaled(x, np.ones((2, 8), np.float32), 1.0, 0, out)
    with pytest.raises(ValueError, match="overlaps bias"):
        _core.softmax_scaled(x, out, 1.0, 1, out)
    with pytest.raises(ValueError, match="finite"):
        _core.softmax_scaled(x, None, float("nan"), 1, out)
    with pytest.raises(ValueError, match="scale has 7 values"):
        _core.layernorm(x, np.ones(7, np.float32), None, 1e-5, out)
    with pytest.raises(ValueError, match="bias has 9 values"):
        _core.layernorm(x, np.ones(8, np.float32), np.ones(9, np.float32), 1e-5, out)
    with pytest.raises(ValueError, match="epsilon"):
        _core.layernorm(x, np.ones(8, np.float32), None, -1.0, out)
    assert np.isnan(out).sum() >= 0  # never written: nothing to compare


# ---- index kernels of the graph taggers: topk, reduce (csrc/index_kernels.cpp) ----

def _topk_want(x, k, largest):
    """What build_topk's NumPy path gives: a stable argsort (NaN last, in index order)."""
    return np.argsort(-x if largest else x, axis=1, kind="stable")[:, :k]


def _awkward(shape, seed):
    """float32 with many ties, NaNs, infinities, signed zeros and denormals."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, shape).astype(np.float32)
    for value, share in ((np.nan, 0.1), (np.inf, 0.03), (-np.inf, 0.03), (-0.0, 0.05),
                         (1e-40, 0.03), (-1e-40, 0.03)):
        x[rng.random(shape) < share] = value
    return x


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("shape,k", [((7, 50, 1), 9), ((5, 50, 1), 8), ((3, 20, 5), 4),
                                     ((5, 12, 1), 12), ((4, 30, 2), 1), ((6, 40, 1), 16),
                                     ((2, 70, 3), 17), ((2, 90, 1), 64), ((1, 1, 1), 1),
                                     ((9, 3, 4), 3)])
def test_topk_is_a_stable_argsort(shape, k, largest):
    """Ties to the lower index, NaN after every number (NaNs by index), -0 == +0, denormals
    kept apart from zero (integer keys: FTZ/DAZ cannot merge them); k <= 8, <= 16 (lanes) and
    larger (insertion), lines along a strided axis (inner > 1)."""
    for x in (_awkward(shape, sum(shape) + k),
              np.random.default_rng(k).standard_normal(shape).astype(np.float32)):
        out = np.full((shape[0], k, shape[2]), -1, np.int64)
        _core.topk(x, out, largest)
        np.testing.assert_array_equal(out, _topk_want(x, k, largest))


def test_topk_every_k_and_degenerate_lines():
    x = _awkward((6, 20, 1), 3)
    x[0] = np.nan  # a line of NaNs only: index order
    x[1] = 2.0     # all equal
    for k in range(21):
        for largest in (True, False):
            out = np.full((6, k, 1), -1, np.int64)
            _core.topk(x, out, largest)
            np.testing.assert_array_equal(out, _topk_want(x, k, largest))
    for shape, k in (((0, 5, 3), 2), ((3, 5, 0), 2), ((2, 0, 1), 0), ((2, 4, 1), 0)):
        out = np.empty((shape[0], k, shape[2]), np.int64)
        _core.topk(np.zeros(shape, np.float32), out, True)  # nothing to do, nothing refused


@pytest.mark.parametrize("fn", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("shape", [(2000, 8, 1), (37, 3, 1), (9, 100, 1), (4, 19, 1),
                                   (21, 16, 1), (6, 5, 7), (3, 1, 2), (5, 40, 33), (0, 4, 1),
                                   (4, 4, 0)])
def test_reduce_matches_numpy(fn, shape):
    rng = np.random.default_rng(len(fn) + sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size:
        x[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = np.nan  # propagates
        x[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = np.inf
    out = np.full((shape[0], shape[2]), -7, np.float32)
    _core.reduce(x, out, fn)
    want = getattr(np, fn)(x.astype(np.float64), axis=1)
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-6)  # NaN where NumPy has NaN


def test_reduce_over_no_values_gives_the_identity():
    out = np.empty((3, 2), np.float32)
    for fn, want in (("sum", 0.0), ("mean", np.nan), ("max", -np.inf), ("min", np.inf)):
        _core.reduce(np.zeros((3, 0, 2), np.float32), out, fn)
        np.testing.assert_array_equal(out, want)
        _core.reduce(np.zeros((3, 0, 1), np.float32), out.reshape(6, 1)[:3], fn)
        np.testing.assert_array_equal(out.reshape(-1)[:3], want)


def test_index_kernels_on_the_pool_match_one_thread():
    """Above 1e5 elements the lines are shared out between the pool's threads."""
    x = _awkward((3000, 50, 1), 5)
    r = np.random.default_rng(6).standard_normal((20000, 8, 1)).astype(np.float32)
    old = _core.get_num_threads()
    try:
        for threads in (1, 3):
            _core.set_num_threads(threads)
            out = np.empty((3000, 9, 1), np.int64)
            _core.topk(x, out, True)
            np.testing.assert_array_equal(out, _topk_want(x, 9, True))
            mean = np.empty((20000, 1), np.float32)
            _core.reduce(r, mean, "mean")
            np.testing.assert_allclose(mean, r.mean(axis=1), rtol=1e-5, atol=1e-6)
    finally:
        _core.set_num_threads(old)


def test_index_kernels_refuse_before_writing():
    x = np.zeros((2, 5, 3), np.float32)
    topk_bad = [
        (np.zeros((2, 5), np.float32), np.zeros((2, 2, 3), np.int64), r"x must be \[outer, n, "
                                                                      r"inner\], got \[2, 5\]"),
        (x, np.zeros((2, 2), np.int64), r"out must be \[outer, k, inner\], got \[2, 2\]"),
        (x, np.zeros((2, 2, 4), np.int64), r"out must be .* = \[2, k, 3\] for x \[2, 5, 3\], "
                                           r"got \[2, 2, 4\]"),
        (x, np.zeros((3, 2, 3), np.int64), r"\[2, k, 3\]"),
        (x, np.zeros((2, 6, 3), np.int64), r"k = 6 .* larger than n = 5"),
    ]
    for xx, out, message in topk_bad:
        out[...] = -1
        with pytest.raises(ValueError, match=message):
            _core.topk(xx, out, True)
        assert (out == -1).all()
    reduce_bad = [
        (x, np.zeros((2, 3, 1), np.float32), "sum", r"out must be \[outer, inner\], got"),
        (x, np.zeros((2, 5), np.float32), "sum", r"= \[2, 3\] for x \[2, 5, 3\], got \[2, 5\]"),
        (x.reshape(2, 15), np.zeros((2, 1), np.float32), "sum", r"x must be"),
        (x, np.zeros((2, 3), np.float32), "prod", r"fn must be 'sum', 'mean', 'max' or 'min', "
                                                  r"got 'prod'"),
    ]
    for xx, out, fn, message in reduce_bad:
        out[...] = -1
        with pytest.raises(ValueError, match=message):
            _core.reduce(xx, out, fn)
        assert (out == -1).all()
    # out over x's memory: refused, x untouched
    both = np.arange(64, dtype=np.int64)
    xs = both.view(np.float32)[:40].reshape(2, 20, 1)
    before = xs.copy()
    with pytest.raises(ValueError, match="topk: out overlaps x"):
        _core.topk(xs, both[10:14].reshape(2, 2, 1), True)
    flat = np.ones(80, np.float32)
    with pytest.raises(ValueError, match="reduce: out overlaps x"):
        _core.reduce(flat[:60].reshape(3, 20, 1), flat[58:61].reshape(3, 1), "max")
    np.testing.assert_array_equal(xs, before)
    assert (flat == 1).all()
    # another dtype or layout: never a converted copy (TypeError, as every _core kernel)
    for args in ((x.astype(np.float64), np.zeros((2, 2, 3), np.int64)),
                 (x, np.zeros((2, 2, 3), np.int32)),
                 (x, np.zeros((2, 3, 2), np.int64).transpose(0, 2, 1)),
                 (np.zeros((2, 3, 5), np.float32).transpose(0, 2, 1), np.zeros((2, 2, 3),
                                                                              np.int64))):
        with pytest.raises(TypeError):
            _core.topk(*args, True)
    for args in ((x.astype(np.float16), np.zeros((2, 3), np.float32)),
                 (x, np.zeros((2, 3), np.float64)),
                 (x, np.zeros((3, 2), np.float32).T)):
        with pytest.raises(TypeError):
            _core.reduce(*args, "sum")


@pytest.mark.skipif(not _NATIVE_BLAS, reason="NumPy's BLAS is not an OpenBLAS offload can call")
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_batched_matches_numpy_and_checks_shapes(threads):
    a = _RNG.standard_normal((13, 5, 7), dtype=np.float32)
    b = _RNG.standard_normal((13, 7, 3), dtype=np.float32)
    old = _core.get_num_threads(), _core.get_parallel_macs()
    _core.set_num_threads(threads)
    _core.set_parallel_macs(0)
    try:
        out = np.full((13, 5, 3), np.nan, np.float32)
        _core.matmul_batched(a, b, out)
        np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)
        _core.matmul_batched(a, b[:1], out)  # one b for every item
        np.testing.assert_allclose(out, a.astype(np.float64) @ b[:1], rtol=1e-5, atol=1e-5)
    finally:
        _core.set_num_threads(old[0])
        _core.set_parallel_macs(old[1])
    for bad_a, bad_b, bad_out in [(a, b[:2], out), (a, b[:, :6], out), (a, b, out[:12]),
                                  (a[0], b, out), (a, b, out[:, :, :2].copy())]:
        with pytest.raises(ValueError):
            _core.matmul_batched(bad_a, bad_b, bad_out)
    with pytest.raises(ValueError, match="overlaps"):
        _core.matmul_batched(out.reshape(13, 5, 3)[:, :, :3], b[:, :3, :3].copy(), out)


@pytest.mark.parametrize("threads", [1, 2])
def test_copy_view_copies_any_strided_view(threads):
    rng = np.random.default_rng(3)
    old = _core.get_num_threads()
    _core.set_num_threads(threads)
    try:
        for trial in range(400):
            nd = int(rng.integers(1, 5))
            shape = tuple(int(v) for v in rng.integers(1, 7, nd))
            dt = [np.float32, np.int64, np.bool_, np.float16][trial % 4]
            big = (rng.standard_normal([s * 2 for s in shape]) * 10).astype(dt)
            steps = [int(rng.choice([1, 2, -1])) for _ in shape]
            src = big[tuple(slice(None, None, st) for st in steps)]
            src = src[tuple(slice(0, s) for s in shape)].transpose(rng.permutation(nd))
            host = np.zeros([s * 2 for s in src.shape], dt)
            out = host[tuple(slice(0, s) for s in src.shape)] if trial % 2 else \
                np.zeros(src.shape, dt)
            _core.copy_view(src, out)
            np.testing.assert_array_equal(out, src)
        x = rng.standard_normal((3, 1, 5)).astype(np.float32)  # a broadcast source
        big = np.zeros((3, 400, 5), np.float32)
        _core.copy_view(np.broadcast_to(x, big.shape), big)
        np.testing.assert_array_equal(big, np.broadcast_to(x, big.shape))
    finally:
        _core.set_num_threads(old)


def test_copy_view_refuses_overlaps_and_mismatches():
    o = np.zeros((3, 4, 5), np.float32)
    for src, out, match in [(o, o, "overlaps an operand"), (o[:, :2], o[:, 1:3], "overlaps an"),
                            (o[:, :, :4], np.zeros((3, 4, 5), np.float32), "same shape"),
                            (o.astype(np.float64), np.zeros_like(o), "same dtype"),
                            (o, np.zeros((3, 4), np.float32), "same rank|one rank"),
                            (o.astype(np.complex128), np.zeros((3, 4, 5), np.complex128),
                             "1, 2, 4 or 8 bytes")]:
        with pytest.raises(ValueError, match=match):
            _core.copy_view(src, out)
    with pytest.raises(ValueError, match="repeats elements"):
        _core.copy_view(np.zeros((3, 4), np.float32), np.lib.stride_tricks.as_strided(
            np.zeros(4, np.float32), (3, 4), (0, 4)))
    with pytest.raises(ValueError, match="overlap one another"):
        _core.copy_view(np.zeros((3, 4), np.float32), np.lib.stride_tricks.as_strided(
            np.zeros(8, np.float32), (3, 4), (8, 4)))
    with pytest.raises((ValueError, TypeError)):  # read-only out
        _core.copy_view(np.zeros(3, np.float32), np.broadcast_to(np.zeros(1, np.float32), (3,)))


@pytest.mark.parametrize("threads", [1, 2])
def test_binary_view_matches_numpy_with_broadcasting(threads):
    rng = np.random.default_rng(4)
    ops = [np.add, np.subtract, np.multiply, np.divide, np.maximum, np.minimum]
    old = _core.get_num_threads()
    _core.set_num_threads(threads)
    try:
        for trial in range(120):
            shape = tuple(int(v) for v in rng.integers(1, 40, int(rng.integers(1, 5))))
            a = rng.standard_normal(shape).astype(np.float32)
            b = rng.standard_normal(tuple(1 if rng.random() < 0.4 else d for d in shape))
            b = b.astype(np.float32)
            if trial % 3 == 0:
                a = a.T.copy().T  # strided (Fortran order)
            a.reshape(-1)[::17] = np.nan
            out = np.empty(shape, np.float32)
            code = trial % 6
            _core.binary_view(a, np.broadcast_to(b, shape), out, code)
            with np.errstate(all="ignore"):
                np.testing.assert_array_equal(out, ops[code](a, b))
    finally:
        _core.set_num_threads(old)


def test_binary_view_refuses_what_does_not_fit():
    a = np.zeros((4, 5), np.float32)
    out = np.zeros((4, 5), np.float32)
    for args, match in [((a, a, out, 6), "op must be"), ((a.astype(np.int64), a, out, 0), "float32"),
                        ((a, a[:, :4], out, 0), "same shape"), ((a, out, out, 0), "overlaps"),
                        ((a, a, np.lib.stride_tricks.as_strided(out, (4, 5), (0, 4)), 0),
                         "repeats elements")]:
        with pytest.raises(ValueError, match=match):
            _core.binary_view(*args)


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_packed_matches_numpy(threads):
    from offload.drivers.cpu import pack_columns
    rng = np.random.default_rng(6)
    old = _core.get_num_threads(), _core.get_parallel_macs()
    _core.set_num_threads(threads)
    _core.set_parallel_macs(0)
    try:
        for rows, k, n in [(1, 5, 3), (13, 16, 64), (37, 47, 200), (100, 3, 17), (25, 64, 16)]:
            x = rng.standard_normal((rows, k)).astype(np.float32)
            w = rng.standard_normal((k, n)).astype(np.float32)
            b = rng.standard_normal(n).astype(np.float32)
            r = rng.standard_normal((rows, n)).astype(np.float32)
            wp = pack_columns(w)
            for bias, residual, act in [(b, None, 1), (None, r, 0), (b, r, 4)]:
                out = np.full((rows, n), np.nan, np.float32)
                _core.dense_packed(x, wp, bias, residual, out, act, 0.0, 0.0, 0.0)
                want = x.astype(np.float64) @ w + (0 if bias is None else b) + \
                    (0 if residual is None else r)
                want = np.maximum(want, 0) if act == 1 else np.tanh(want) if act == 4 else want
                np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    finally:
        _core.set_num_threads(old[0])
        _core.set_parallel_macs(old[1])


def test_dense_packed_checks_before_touching_memory():
    from offload.drivers.cpu import pack_columns
    x = np.ones((4, 8), np.float32)
    wp = pack_columns(np.ones((8, 20), np.float32))  # [2, 8, 16]
    out = np.zeros((4, 20), np.float32)
    for args, match in [((x[:, :7].copy(), wp, None, None, out), "does not fit"),
                        ((x, wp, None, None, np.zeros((4, 33), np.float32)), "does not fit"),
                        ((x, wp, None, None, np.zeros((4, 16), np.float32)), "does not fit"),
                        ((x, wp, np.ones(19, np.float32), None, out), "bias must have 20"),
                        ((x, wp, None, np.ones((4, 19), np.float32), out), "residual"),
                        ((x, wp[:, :, :8].copy(), None, None, out), "expected x"),
                        ((out.reshape(-1)[:32].reshape(4, 8), wp, None, None, out), "overlaps")]:
        with pytest.raises(ValueError, match=match):
            _core.dense_packed(*args, 0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="activation"):
        _core.dense_packed(x, wp, None, None, out, 9, 0.0, 0.0, 0.0)


# ---- fused chains of dense layers (csrc/dense_kernels.cpp) ----

_CHAIN_ACTS = [(0, 0.0, 0.0, 0.0), (1, 0.0, 0.0, 0.0), (2, 0.1, 0.0, 0.0), (3, 0.0, 0.0, 0.0),
               (4, 0.0, 0.0, 0.0), (5, 0.0, -0.5, 0.75)]
_CHAIN_LANES = [8, 16] if _core.DenseChain(
    np.zeros((1, 1), np.float32), [np.zeros((1, 1, 16), np.float32)], [None],
    np.zeros((1, 1), np.float32), [0], [0.0], [0.0], [0.0]).lanes == 16 else [8]


def _chain_layers(rng, dims, acts):
    from offload.drivers.cpu import pack_columns
    ws = [(rng.standard_normal((k, n)) / np.sqrt(max(k, 1))).astype(np.float32)
          for k, n in zip(dims, dims[1:])]
    bs = [rng.standard_normal(n).astype(np.float32) if i % 3 != 1 else None
          for i, n in enumerate(dims[1:])]
    return ws, [pack_columns(w) for w in ws], bs, acts


def _chain_reference(x, ws, bs, acts):
    v = x.astype(np.float64)
    for w, b, (code, alpha, lo, hi) in zip(ws, bs, acts):
        v = v @ w + (0 if b is None else b)
        v = [v, np.maximum(v, 0), np.where(v >= 0, v, v * alpha), 1 / (1 + np.exp(-v)),
             np.tanh(v), np.clip(v, lo, hi)][code]
    return v


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lanes", _CHAIN_LANES)
def test_dense_chain_matches_numpy_and_the_layers_one_by_one(threads, lanes):
    """Every activation at every position, widths around the 16-column panels, rows around
    the register blocks and the blocks of rows (forced small: several blocks per task): the
    result of NumPy in float64, and (16 lanes, as dense_packed runs here) the same bits as the
    layers one by one through dense_packed."""
    rng = np.random.default_rng(16)
    old = _core.get_num_threads(), _core.get_parallel_macs()
    _core.set_num_threads(threads)
    _core.set_parallel_macs(0)
    try:
        for dims in ([16, 64, 32, 32, 5], [47, 200, 100, 50, 20, 10, 5, 1], [3, 17, 16, 33],
                     [1, 1], [5, 0, 7], [0, 4, 3], [8, 40, 0]):
            for rows in (0, 1, 5, 12, 13, 97):
                for block in (0, 12, 24):
                    acts = [_CHAIN_ACTS[int(i)] for i in rng.integers(0, 6, len(dims) - 1)]
                    ws, wps, bs, acts = _chain_layers(rng, dims, acts)
                    x = rng.standard_normal((rows, dims[0])).astype(np.float32)
                    out = np.full((rows, dims[-1]), np.nan, np.float32)
                    _core.dense_chain(x, wps, bs, out, *map(list, zip(*acts)), block, lanes)
                    np.testing.assert_allclose(out, _chain_reference(x, ws, bs, acts),
                                               rtol=1e-5, atol=1e-5)
                    if lanes == 16 and all(dims):
                        v = x
                        for wp, b, a, n in zip(wps, bs, acts, dims[1:]):
                            y = np.empty((rows, n), np.float32)
                            _core.dense_packed(v, wp, b, None, y, *a)
                            v = y
                        np.testing.assert_array_equal(out, v)
    finally:
        _core.set_num_threads(old[0])
        _core.set_parallel_macs(old[1])


@pytest.mark.parametrize("lanes", _CHAIN_LANES)
def test_dense_chain_activations_keep_nan_and_signed_zeros_as_dense_packed(lanes):
    """The activations applied in registers (bit operations for ReLU and leaky ReLU) give the
    bits of dense_packed's epilogue on NaN, infinities and -0 (an identity layer whose bias is
    -0 passes x through exactly)."""
    from offload.drivers.cpu import pack_columns
    special = [np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, -1.5, 2.5, -1e-30, 3e38]
    x = np.array([special[i:] + special[:i] for i in range(13)], np.float32)[:, :10]
    x = np.concatenate([x] * 4, axis=1)  # 40 columns: two whole panels and a part
    wp = pack_columns(np.eye(40, dtype=np.float32))
    bias = np.full(40, -0.0, np.float32)
    for code, alpha, lo, hi in _CHAIN_ACTS + [(2, -0.5, 0.0, 0.0), (5, 0.0, 1.0, -1.0)]:
        want = np.empty_like(x)
        _core.dense_packed(x, wp, bias, None, want, code, alpha, lo, hi)
        got = np.empty_like(x)
        with np.errstate(all="ignore"):
            _core.dense_chain(x, [wp], [bias], got, [code], [alpha], [lo], [hi], 0, lanes)
        same = (got.view(np.int32) == want.view(np.int32)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), (code, alpha, lo, hi, x[~same], got[~same], want[~same])


def test_dense_chain_checks_before_touching_memory():
    from offload.drivers.cpu import pack_columns
    x = np.ones((4, 8), np.float32)
    w1, w2 = pack_columns(np.ones((8, 20), np.float32)), pack_columns(np.ones((20, 3), np.float32))
    out = np.zeros((4, 3), np.float32)
    good = dict(x=x, w_packed=[w1, w2], bias=[None, None], out=out, act=[1, 0],
                alpha=[0.0, 0.0], lo=[0.0, 0.0], hi=[0.0, 0.0])
    cases = [
        (dict(w_packed=[], bias=[], act=[], alpha=[], lo=[], hi=[]), "expected 1 to 64 layers, got 0"),
        (dict(bias=[None]), "one bias .* per layer \\(2 layers\\), got 1 biases"),
        (dict(act=[1]), "got 2 biases, 1 acts"),
        (dict(x=x.reshape(-1)), "expected x \\[rows, k\\] and out \\[rows, n\\], got x \\[32\\]"),
        (dict(out=np.zeros((5, 3), np.float32)), "have different rows"),
        (dict(w_packed=[w1, w2[:, :, :8].copy()]), "layer 1: expected w packed .* got \\[1, 20, 8\\]"),
        (dict(x=np.ones((4, 7), np.float32)), "layer 0: w packed \\[2, 8, 16\\] takes 8 inputs, x has 7"),
        (dict(w_packed=[w1, pack_columns(np.ones((15, 3), np.float32))]),
         "layer 0: w packed \\[2, 8, 16\\] holds 32 columns, for the 15 inputs of the next "
         "layer \\(expected 15 padded to a multiple of 16: 16\\)"),
        (dict(w_packed=[w1, pack_columns(np.ones((33, 3), np.float32))]), "for the 33 inputs"),
        (dict(out=np.zeros((4, 17), np.float32)), "layer 1: .* for the 17 columns of out"),
        (dict(bias=[np.ones(19, np.float32), None]), "layer 0: bias must have 20 values, got 19"),
        (dict(act=[1, 6]), "layer 1: activation code must be 0..5, got 6"),
        (dict(act=[-1, 0]), "layer 0: activation code must be 0..5, got -1"),
        (dict(x=out.reshape(-1)[:8].reshape(1, 8), out=out[:1]), "out overlaps x"),
        (dict(out=w2.reshape(-1)[:12].reshape(4, 3)), "out overlaps w\\[1\\]"),
    ]
    for change, match in cases:
        args = dict(good, **change)
        before = [a.copy() for a in (x, w1, w2, out)]
        with pytest.raises(ValueError, match=match):
            _core.dense_chain(**args)
        with pytest.raises(ValueError, match=match.replace("dense_chain", "DenseChain")):
            _core.DenseChain(**args)
        for a, b in zip((x, w1, w2, out), before):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="block_rows must be 0 .* to 384, got 385"):
        _core.dense_chain(**good, block_rows=385)
    with pytest.raises(ValueError, match="lanes must be 0"):
        _core.dense_chain(**good, lanes=4)
    with pytest.raises(TypeError):  # float64 out: refused, never converted
        _core.dense_chain(**dict(good, out=out.astype(np.float64)))
    with pytest.raises(TypeError):  # DenseChain converts nothing: it keeps what it reads
        _core.DenseChain(**dict(good, x=x.astype(np.float64)))
    with pytest.raises(ValueError, match="layer 0: 65552 columns; a chain takes up to 65536"):
        wide = np.zeros((4097, 0, 16), np.float32)
        _core.dense_chain(np.ones((1, 0), np.float32), [wide], [None],
                          np.zeros((1, 4097 * 16 - 5), np.float32), [0], [0.0], [0.0], [0.0])
    _core.dense_chain(**good)
    np.testing.assert_array_equal(out, np.full((4, 3), 160.0, np.float32))


def test_dense_chain_object_keeps_what_it_reads():
    """DenseChain holds its arrays: run() after every other reference is gone reads them."""
    import gc
    rng = np.random.default_rng(3)
    ws, wps, bs, acts = _chain_layers(rng, [6, 40, 9], [_CHAIN_ACTS[1], _CHAIN_ACTS[0]])
    x = rng.standard_normal((50, 6)).astype(np.float32)
    want = _chain_reference(x, ws, bs, acts)
    out = np.zeros((50, 9), np.float32)
    chain = _core.DenseChain(x.copy(), [w.copy() for w in wps], [b if b is None else b.copy()
                                                                 for b in bs],
                             out, *map(list, zip(*acts)))
    gc.collect()
    junk = [np.full(4096, np.nan, np.float32) for _ in range(64)]
    chain.run()
    del junk
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert chain.block_rows % 12 == 0 and chain.lanes in (8, 16)
