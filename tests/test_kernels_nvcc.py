"""Every kernel source compiles through the CUDA side of kernels/dialect.h (nvcc --ptx, sm_90),
so the shared OpenCL/CUDA sources never break unseen on the CUDA side. Needs no GPU; skipped,
with the reason, where nvcc is absent."""

import subprocess
from pathlib import Path

import pytest

from conftest import find_nvcc

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = sorted(p.name for p in KERNEL_DIR.glob("*.cl"))
# gemm.cl takes per-device tile macros; CUDA devices use the GPU ones (the CPU configuration,
# fully unrolled 4x16 blocks, is for PoCL only and takes nvcc minutes to optimise).
GEMM_GPU = dict(TM=64, TN=64, TK=16, WM=4, WN=4)


@pytest.fixture(scope="module")
def nvcc():
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found on PATH nor in /usr/local/cuda*/bin")
    return path


def compile_ptx(nvcc, source, out, defines=()):
    cmd = [nvcc, "-x", "cu", "-arch=sm_90", "--ptx", "-std=c++17", "-I", str(KERNEL_DIR),
           *[f"-D{d}" for d in defines], str(KERNEL_DIR / source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"
    return out.read_text()


def test_driver_config_matches():
    from offload.drivers import opencl
    assert GEMM_GPU == opencl.GEMM_GPU
    assert set(SOURCES) == set(opencl.PROGRAMS)


STORAGES = {"float32": (), "float16": ("STORAGE_F16=1",), "bfloat16": ("STORAGE_BF16=1",)}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("source", SOURCES)
def test_kernel_compiles_with_nvcc(source, storage, nvcc, tmp_path):
    defines = STORAGES[storage] + (tuple(f"{k}={v}" for k, v in GEMM_GPU.items())
                                   if source == "gemm.cl" else ())
    ptx = compile_ptx(nvcc, source, tmp_path / f"{source}.ptx", tuple(defines))
    kernels = [line.split()[-1].rstrip("(") for line in ptx.splitlines() if ".entry" in line]
    declared = [line.split("(")[0].split()[-1] for line in
                (KERNEL_DIR / source).read_text().splitlines() if line.startswith("KERNEL void")]
    assert sorted(kernels) == sorted(declared), "every KERNEL must be an extern \"C\" entry"


def test_gemm_gpu_config_compiles_with_nvcc(nvcc, tmp_path):
    defines = [f"{k}={v}" for k, v in GEMM_GPU.items()]
    ptx = compile_ptx(nvcc, "gemm.cl", tmp_path / "gemm-gpu.ptx", defines)
    assert ".entry gemm_tiled" in ptx
