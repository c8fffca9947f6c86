"""The CUDA driver itself: discovery without CuPy or a GPU, the module importing without CuPy, the
NVRTC sources, and (on a GPU only) graphs and typed errors.

Every op on ``cuda:0`` is checked by the device matrix (test_ops, test_onnx_ops, test_zoo) where a
GPU is present; here it is listed as skipped with its reason.
"""

import subprocess
import sys

import numpy as np
import pytest

import offload
from offload import DeviceMemoryError, DeviceUnavailableError, KernelBuildError
from offload import graph as G
from offload.drivers import cuda
from conftest import TOLERANCE, find_nvcc


def _cuda_info():
    return next(i for i in offload.devices() if i.spec == "cuda:0")


def test_discover_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    infos = cuda.discover()
    assert len(infos) == 1
    info = infos[0]
    assert info.spec == "cuda:0" and not info.available and info.open is None
    assert info.reason == "CuPy is not installed (pip install offload[cuda])"


def test_driver_module_imports_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupy_backends'] = None\n"
            "from offload.drivers import cuda\n"
            "infos = cuda.discover()\n"
            "assert not infos[0].available and 'CuPy is not installed' in infos[0].reason\n"
            "import offload\n"
            "assert any(i.spec == 'cuda:0' for i in offload.devices())\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cuda_listed_and_unavailable_device_raises_with_reason():
    info = _cuda_info()
    if info.available:
        pytest.skip(f"cuda:0 is available here ({info.name})")
    assert info.reason
    with pytest.raises(DeviceUnavailableError) as e:
        offload.device("cuda:0")
    assert info.reason in str(e.value)


def test_every_device_op_has_a_builder():
    assert set(cuda.OPS) == G.DEVICE_OPS


def test_nvrtc_options_and_sources():
    assert cuda.nvrtc_options({"TM": 64, "TK": 16}) == ("-std=c++17", "-DTK=16", "-DTM=64")
    text = cuda.program_source("elementwise.cl")
    assert "KERNEL void bias_act" in text and "DEVICE_FN float activate" in text
    assert '#include' not in text  # NVRTC gets one self-contained source


def _nvcc():
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found on PATH nor in /usr/local/cuda*/bin")
    return path


@pytest.mark.parametrize("program", ["elementwise.cl", "conv.cl", "pool.cl",
                                     "reduce.cl"])
def test_driver_sources_compile_as_cuda(program, tmp_path):
    """The exact text and options the driver hands NVRTC compile as CUDA C++ (nvcc stands in for
    NVRTC where there is no GPU: both define __CUDACC__)."""
    nvcc = _nvcc()
    src = tmp_path / f"{program}.cu"
    src.write_text(cuda.program_source(program))
    cmd = [nvcc, "-arch=sm_90", "--ptx", *cuda.nvrtc_options(), str(src), "-o",
           str(tmp_path / "out.ptx")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"


# ------------------------------------------------- on a GPU, and on its emulation cuda-emu:0

CUDA_SPECS = ("cuda:0", "cuda-emu:0")


def _open(spec):
    info = next((i for i in offload.devices() if i.spec == spec), None)
    if info is None or not info.available:
        pytest.skip(f"{spec} unavailable: {info.reason if info else 'unknown'}")
    return offload.device(spec)


@pytest.fixture(params=CUDA_SPECS)
def gpu(request):
    """The CUDA driver on the GPU and on the emulation (each skipped with its reason)."""
    return _open(request.param)


def _emu(gpu):
    """The emulation's module when ``gpu`` is cuda-emu:0 (for its counters), else None."""
    return gpu._cp if gpu.emulated else None


def _jet():
    from offload import zoo
    return zoo.path("jet_mlp"), zoo.sample_input("jet_mlp", 4)


@pytest.mark.parametrize("blas", cuda.BLAS_PATHS)
def test_plan_runs_as_one_cuda_graph(gpu, blas, monkeypatch):
    """Defects 1 and 2 of issue 14: with the direct libcublas path a plan with matrix
    products is captured as one graph, and the counter the caller's device shows moves; with
    CuPy's wrappers the capture fails (NotImplementedError) and the plan falls back, saying so."""
    monkeypatch.setenv("OFFLOAD_CUDA_BLAS", blas)
    path, x = _jet()
    before, fallbacks = gpu.graphs, len(gpu.graph_fallbacks)
    model = offload.load(path, device=gpu)
    want = offload.load(path, device="cpu")(x)
    emu = _emu(gpu)
    launches = emu.counters()["graph_launches"] if emu else 0
    for _ in range(2):
        np.testing.assert_allclose(model(x), want, rtol=1e-4, atol=1e-5)
    if blas == "direct":
        assert gpu.graphs == before + 1, gpu.graph_fallbacks[fallbacks:]
        assert len(gpu.graph_fallbacks) == fallbacks, gpu.graph_fallbacks
        if emu:
            assert emu.counters()["graph_launches"] == launches + 2
    else:
        assert gpu.graphs == before
        assert "calling cuBLAS API during stream capture is currently unsupported" in \
            gpu.graph_fallbacks[-1]


def test_a_plan_without_products_is_a_graph_on_both_paths(gpu, monkeypatch):
    from offload import graph as G
    from offload.model import Model
    monkeypatch.setenv("OFFLOAD_CUDA_BLAS", "cupy")
    node = G.Node("activation", ["x"], ["y"], {"fn": "relu"}, "relu")
    graph = G.Graph([node], [G.TensorInfo("x", (3, 5))], ["y"], {})
    before = gpu.graphs
    x = np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5)
    np.testing.assert_array_equal(Model(graph, gpu)(x), np.maximum(x, 0))
    assert gpu.graphs == before + 1


def test_direct_cublas_matches_cupys_wrappers(gpu, monkeypatch):
    """The two cuBLAS paths give the same products (dense, 1x1 and im2col convs, grouped) in
    every precision."""
    from offload import zoo
    x = zoo.sample_input("jet_cnn", 3)
    for precision in ("float32", "tf32", "float16", "bfloat16"):
        got = {}
        for blas in cuda.BLAS_PATHS:
            monkeypatch.setenv("OFFLOAD_CUDA_BLAS", blas)
            got[blas] = offload.load(zoo.path("jet_cnn"), device=gpu, precision=precision)(x)
        # the same cuBLAS calls; the user workspace may let cuBLAS pick another algorithm
        rtol, atol = TOLERANCE[precision]
        np.testing.assert_allclose(got["direct"], got["cupy"], rtol=rtol / 10, atol=atol / 10,
                                   err_msg=precision)


def test_cuda_arrays_from_another_stream_are_waited_for(gpu):
    """Defect 3: a CuPy array written on the caller's stream is read by the model's stream
    only after that write (the emulation runs stream work lazily, so a missing wait reads the
    0xCD bytes of fresh device memory)."""
    cp = gpu._cp
    path, x = _jet()
    model = offload.load(path, device=gpu)
    want = offload.load(path, device="cpu")(x)
    producer = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.Device(gpu.index), producer:
        src = cp.empty(x.shape, cp.float32)
        src.set(x)                    # queued on the producer's stream
        got = model(src)              # the producer's stream is current: the model waits on it
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_page_locked_input_is_copied_from_directly(gpu):
    """Defect 8: page-locked host memory (here CuPy's, which CUDA reports as
    cudaMemoryTypeHost) is copied from directly, without the staging copy."""
    cp = gpu._cp
    path, x = _jet()
    model = offload.load(path, device=gpu)
    want = offload.load(path, device="cpu")(x)
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(x.nbytes), np.float32,
                           x.size).reshape(x.shape)
    pinned[...] = x
    assert gpu._page_locked(pinned) and not gpu._page_locked(x.copy())
    emu = _emu(gpu)
    before = emu.counters()["h2d_pinned"] if emu else 0
    model.reset_stats()
    np.testing.assert_allclose(model(pinned), want, rtol=1e-4, atol=1e-5)
    assert model.stats["copy_in_bytes"] == x.nbytes
    if emu:
        assert emu.counters()["h2d_pinned"] == before + 1


@pytest.mark.parametrize("precision", ["float32", "float16", "tf32"])
def test_device_outputs_are_float32_like_host_outputs(gpu, precision):
    """Defect 8: out="device" gives float32 CuPy arrays in every precision (a float16 plan's
    outputs are converted on the device), equal to the host outputs."""
    path, x = _jet()
    model = offload.load(path, device=gpu, precision=precision)
    host = model(x)
    y = model(x, out="device")
    assert y.dtype == np.float32 and y.shape == host.shape
    np.testing.assert_array_equal(y.get(), host)


def test_torch_cuda_tensors_go_in(gpu):
    torch = pytest.importorskip("torch")
    if gpu.emulated or not torch.cuda.is_available():
        pytest.skip("needs PyTorch with a CUDA GPU (the emulation has no torch tensors)")
    path, x = _jet()
    model = offload.load(path, device=gpu)
    t = torch.from_numpy(x).to(f"cuda:{gpu.index}")
    t = t * 1.0  # queued on torch's current stream
    np.testing.assert_allclose(model(t), offload.load(path)(x), rtol=1e-4, atol=1e-5)


def test_numpy_reads_page_locked_host_memory_through_dlpack(gpu):
    try:
        a = offload.empty((4, 16), pinned=True)
    except offload.DeviceUnavailableError as e:
        pytest.skip(f"page-locking needs a GPU: {e}")
    a[...] = np.arange(64, dtype=np.float32).reshape(4, 16)
    assert a.base.obj.__dlpack_device__() == (3, 0)  # kDLCUDAHost
    v = np.from_dlpack(a.base.obj)
    np.testing.assert_array_equal(v.reshape(4, 16), a)
    path, _ = _jet()
    x = offload.empty((4, 16), pinned=True)
    x[...] = 0.5
    np.testing.assert_allclose(offload.load(path, device=gpu)(x), offload.load(path)(x),
                               rtol=1e-4, atol=1e-5)


def test_denormals_are_flushed_in_cuda_kernels(gpu):
    """Defect 6: CuPy compiles every kernel with -ftz=true, so single-precision denormals are
    flushed to zero in the CUDA kernels (not in cuBLAS's products); the cpu device keeps them.
    Documented in the README; the emulation flushes them as the GPU does."""
    from offload import graph as G
    from offload.model import Model
    node = G.Node("add", ["x", "z"], ["y"], {}, "add")
    graph = G.Graph([node], [G.TensorInfo("x", (4,)), G.TensorInfo("z", (4,))], ["y"], {})
    x = np.array([1e-40, -1e-40, 1e-30, 1.0], np.float32)
    got = Model(graph, gpu)({"x": x, "z": x})
    cpu = Model(graph, offload.device("cpu"))({"x": x, "z": x})
    assert cpu[0] != 0 and cpu[1] != 0
    tiny = np.finfo(np.float32).tiny
    np.testing.assert_array_equal(got, np.where(np.abs(x) < tiny, 0, x + x))


def test_out_of_memory_is_typed(gpu):
    with pytest.raises(DeviceMemoryError, match="bytes"):
        gpu.alloc(1 << 50)


def test_bad_source_is_a_kernel_build_error(gpu, monkeypatch):
    monkeypatch.setattr(cuda, "program_source", lambda name: "KERNEL void broken(int x) { y = 1; }")
    gpu._modules.pop(("broken.cl", cuda.nvrtc_options()), None)
    try:
        with pytest.raises(KernelBuildError) as e:
            gpu.module("broken.cl")
        assert "error" in e.value.log and "kern.cu" in e.value.log
    finally:
        gpu._modules.pop(("broken.cl", cuda.nvrtc_options()), None)


def test_nvrtc_and_cupy_errors_at_build_are_kernel_build_errors(gpu, monkeypatch):
    """Defect 5: a bad option (NVRTC's error without a compile log) and CuPy's RuntimeError
    when it finds no CUDA headers are KernelBuildErrors, not raw exceptions."""
    key = ("elementwise.cl", cuda.nvrtc_options({"BAD": 1}))
    monkeypatch.setattr(cuda, "nvrtc_options",
                        lambda defines=None: ("-std=c++17", "--no-such-option"))
    gpu._modules.pop(("elementwise.cl", ("-std=c++17", "--no-such-option")), None)
    with pytest.raises(KernelBuildError, match="--no-such-option"):
        gpu.module("elementwise.cl")
    monkeypatch.undo()

    class NoHeaders:
        def __init__(self, **kw):
            pass

        def compile(self):
            raise RuntimeError("Failed to find CUDA headers. Please install CUDA toolkit")
    monkeypatch.setattr(gpu._cp, "RawModule", NoHeaders)
    gpu._modules.pop(key, None)
    with pytest.raises(KernelBuildError) as e:
        gpu.module("elementwise.cl", {"BAD": 1})
    assert "CUDA headers" in e.value.log
    gpu._modules.pop(key, None)


def test_cublas_in_a_capture_is_a_typed_error_on_the_cupy_path(gpu, monkeypatch):
    """Defect 5: CuPy's NotImplementedError inside a capture reaches the caller as a
    DeviceRuntimeError (finalize turns it into a fallback; here a capture made by hand)."""
    from offload import DeviceRuntimeError
    monkeypatch.setenv("OFFLOAD_CUDA_BLAS", "cupy")
    dev = gpu.session()
    cp = dev._cp
    a = dev.view(dev.alloc(16), (2, 2))
    run = cuda.gemm(dev, 2, 2, 2, (a, 0), 2, 0, (a, 0), 2, 0, (a, 0), 2, 0, 1)
    run()
    dev.synchronize()
    with cp.cuda.Device(gpu.index):
        dev.stream.begin_capture()
        try:
            with pytest.raises(DeviceRuntimeError, match="during stream capture"):
                run()
        finally:
            dev.stream.end_capture()


def test_without_the_libcublas_c_api_the_driver_says_so_and_uses_cupys(gpu, monkeypatch):
    def missing():
        raise OSError("libcublas.so.13: cannot open shared object file")
    monkeypatch.setattr(gpu._backend, "libcublas", missing)
    with pytest.warns(RuntimeWarning, match="direct cuBLAS path unavailable"):
        dev = gpu.session()
    assert dev.blas == "cupy" and dev._direct is None
    assert any("direct cuBLAS path unavailable" in f for f in gpu.graph_fallbacks)
    path, x = _jet()
    model = offload.load(path, device=dev)
    np.testing.assert_allclose(model(x), offload.load(path)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blas", cuda.BLAS_PATHS)
def test_closed_models_give_their_device_memory_back(gpu, blas, monkeypatch):
    """Each model has its own session (stream, cuBLAS handle, 32 MiB workspace): once closed and
    dropped, all of it is freed. A finalizer that held the session kept every one alive (the
    emulation's process grew by 32 MB per model loaded)."""
    import gc
    monkeypatch.setenv("OFFLOAD_CUDA_BLAS", blas)
    path, x = _jet()
    gc.collect()
    before = gpu.bytes_in_use
    for _ in range(3):
        model = offload.load(path, device=gpu)
        model(x)
        model.close()
        del model
    gc.collect()
    assert gpu.bytes_in_use == before
