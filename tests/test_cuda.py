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
from conftest import find_nvcc


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


# ----------------------------------------------------------------------- on a GPU only

@pytest.fixture(scope="module")
def gpu():
    info = _cuda_info()
    if not info.available:
        pytest.skip(f"cuda:0 unavailable: {info.reason}")
    return offload.device("cuda:0")


def test_plan_runs_as_one_cuda_graph(gpu):
    from offload import zoo
    model = offload.load(zoo.path("jet_mlp"), device=gpu)
    x = zoo.sample_input("jet_mlp", 4)
    before = gpu.graphs
    got = model(x)
    want = offload.load(zoo.path("jet_mlp"), device="cpu")(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert gpu.graphs > before or gpu.graph_fallbacks, "finalize neither captured nor fell back"
    assert not gpu.graph_fallbacks, gpu.graph_fallbacks


def test_out_of_memory_is_typed(gpu):
    with pytest.raises(DeviceMemoryError, match="bytes"):
        gpu.alloc(1 << 50)


def test_bad_source_is_a_kernel_build_error(gpu, monkeypatch):
    monkeypatch.setattr(cuda, "program_source", lambda name: "KERNEL void broken(int x) { y = 1; }")
    gpu._modules.pop(("broken.cl", cuda.nvrtc_options()), None)
    try:
        with pytest.raises(KernelBuildError) as e:
            gpu.module("broken.cl")
        assert e.value.log
    finally:
        gpu._modules.pop(("broken.cl", cuda.nvrtc_options()), None)
