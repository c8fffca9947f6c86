"""``cuda-emu:0``: the CUDA driver (drivers/cuda.py, unchanged) on an EMULATION of CuPy.

The emulation (:mod:`offload.drivers._cupy_emu`) compiles every kernel with the real NVRTC and
CuPy 14.2's options, runs the same source compiled for the host over the launch grid, computes
cuBLAS calls in NumPy with cuBLAS's checks, and enforces CuPy's stream, memory and graph-capture
rules; its docstring lists exactly what it checks and what only a GPU can. It needs NVRTC
(``pip install 'nvidia-cuda-nvrtc>=13'``, in the test extra) and a C++ compiler, no GPU.
"""

from __future__ import annotations

import os
import shutil

from ..device import DeviceInfo


def backend():
    """The emulated CuPy as the CUDA driver's Backend."""
    from . import _cupy_emu as emu
    from .cuda import Backend
    return Backend(emu, emu.runtime, emu.driver, emu.cublas, emu.nvrtc, emu.CompileException,
                   emu.libcublas, emulated=True)


def _open():
    from . import _cupy_emu as emu
    from .cuda import CUDADevice
    return CUDADevice(0, backend(), kind="cuda-emu", name=emu.NAME)


def discover():
    try:
        from ._cupy_emu import _kernels
        _kernels.load_nvrtc()
    except Exception as e:  # noqa: BLE001 - discovery never raises
        return [DeviceInfo("cuda-emu:0", False, reason=f"CUDA emulation needs NVRTC: {e}")]
    if shutil.which(os.environ.get("CXX") or "g++") is None:
        return [DeviceInfo("cuda-emu:0", False, reason="CUDA emulation needs a C++ compiler "
                           "(g++ or $CXX)")]
    from ._cupy_emu import NAME
    return [DeviceInfo("cuda-emu:0", True, NAME, open=_open)]
