"""offload: run ONNX models on coprocessors connected to the host, in-process.

    import offload
    offload.devices()                      # every known device, available or not, with the reason
    model = offload.load("jet.onnx", device="cpu")
    y = model(x)                           # NumPy in, NumPy out
"""

from __future__ import annotations

import os

from .device import Capabilities, Device, DeviceInfo, device, devices
from .device import parse_spec as device_spec
from .errors import (DeviceMemoryError, DeviceRuntimeError, DeviceUnavailableError,
                     KernelBuildError, ModelFormatError, OffloadError, ShapeError,
                     UnsupportedOpError)
from .hostmem import empty
from .model import Model
from . import zoo  # noqa: E402  (builds reference models on demand; no downloads)

__version__ = "0.1.0"

__all__ = [
    "Capabilities", "Device", "DeviceInfo", "DeviceMemoryError", "DeviceRuntimeError",
    "DeviceUnavailableError", "KernelBuildError", "Model", "ModelFormatError", "OffloadError",
    "ShapeError", "UnsupportedOpError", "device", "device_spec", "devices", "empty", "import_onnx", "load",
]


def import_onnx(source):
    """Read an ONNX model (path, bytes or ModelProto) into the optimized IR graph."""
    from . import onnx_import, passes
    model, label = onnx_import.read_model(source)
    graph = onnx_import.to_graph(model, label)
    inferred = onnx_import.check(model, label)
    return passes.optimize(graph, label, onnx_import.shapes(inferred))


def load(source: str | os.PathLike, device: str | Device = "cpu") -> Model:
    """Load an ONNX model for ``device`` (default: the embedded CPU device).

    ``source`` is a path to an .onnx file, its bytes, an ``onnx.ModelProto``, or a zoo name
    (``offload.zoo.NAMES``) which is built on first use.
    """
    if isinstance(source, str) and source in zoo.NAMES and not os.path.exists(source):
        source = zoo.path(source)
    graph = import_onnx(source)
    label = str(source) if isinstance(source, (str, os.PathLike)) else graph.name
    return Model(graph, globals()["device"](device), label)
