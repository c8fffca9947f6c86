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
from .errors import (ArgumentError, DeviceMemoryError, DeviceRuntimeError,
                     DeviceUnavailableError, KernelBuildError, ModelFormatError, OffloadError,
                     RequestTimeoutError, ShapeError, UnsupportedOpError)
from .hostmem import empty
from .batching import Batching
from .model import PLAN_CACHE, Binding, Model
from . import checks as _checks
from .fpga.fixed_point import PrecisionError
from .fpga import fixed_point
from . import zoo  # noqa: E402  (builds reference models on demand; no downloads)

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "Batching", "Binding", "Capabilities", "Device", "DeviceInfo", "DeviceMemoryError", "DeviceRuntimeError",
    "DeviceUnavailableError", "KernelBuildError", "Model", "ModelFormatError", "OffloadError",
    "PrecisionError", "RequestTimeoutError", "ShapeError", "UnsupportedOpError", "device", "device_spec", "devices", "empty", "get_num_threads", "import_onnx", "load",
    "set_num_threads",
]


def set_num_threads(n: int) -> None:
    """Threads the cpu device uses for one large op, the calling thread included; small ops
    always run on the calling thread. Also limits NumPy's BLAS threads to ``n`` (threadpoolctl).
    Default: ``OFFLOAD_NUM_THREADS``, else ``len(os.sched_getaffinity(0))``."""
    from .drivers import cpu
    cpu.set_num_threads(n)


def get_num_threads() -> int:
    """The cpu device's thread count (see set_num_threads)."""
    from .drivers import cpu
    return cpu.get_num_threads()


def import_onnx(source, memory_limit=None):
    """Read an ONNX model (path, bytes or ModelProto) into the optimized IR graph; every node
    is checked (offload.checks) and constant folding stays under ``memory_limit``."""
    from . import onnx_import, passes
    model, label = onnx_import.read_model(source)
    try:
        graph = onnx_import.to_graph(model, label)
        inferred = onnx_import.check(model, label)
        return passes.optimize(graph, label, onnx_import.shapes(inferred), memory_limit)
    except OffloadError:
        raise
    except MemoryError:
        raise DeviceMemoryError(f"{label}: out of host memory while importing the model") from None
    except Exception as e:  # the last line behind offload.checks: still a typed error
        raise ModelFormatError(f"{label}: cannot be imported ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load(source: str | os.PathLike, device: str | Device | list = "cpu",
         batching: Batching | None = None, fallback: str = "error",
         precision: str | dict | None = None, memory_limit: int | str | None = None,
         plan_cache: int = PLAN_CACHE, **remote) -> Model:
    """Load an ONNX model for ``device`` (default: the embedded CPU device).

    ``source`` may also be a served model, "grpc://HOST:PORT/MODEL[/VERSION]" or "http://..."
    (or a list of them): a model of the same API on a KServe v2 / Triton server (SONIC; see
    offload.remote.RemoteModel for ``timeout``, ``retries``, ``fallback="cpu"`` with
    ``fallback_source``, ``shared_memory``, ``compression``; needs the 'triton' extra).

    ``source`` is a path to an .onnx file, its bytes, an ``onnx.ModelProto``, or a zoo name
    (``offload.zoo.NAMES``) which is built on first use. ``device`` may be a list of devices, or
    "all" (every available device that runs ``precision``): each run goes to the least-loaded
    one. ``batching`` merges
    concurrent requests into device batches (``offload.Batching(max_batch, max_delay_us)``).
    ``fallback="cpu"`` reruns on the CPU device what a device fails to run (counted in
    ``model.stats`` and warned once per reason); the default ``"error"`` raises.
    ``precision``: "float32" (default), "tf32", "float16" or "bfloat16" on a device that runs
    it (``Capabilities.precisions``; see offload.precision); inputs and outputs stay float32.

    Fixed point: ``precision="ap_fixed<16,6>"`` or ``{"default": "ap_fixed<16,6>", "<node>":
    "ap_fixed<12,4>" or {"result": ..., "weight": ..., "bias": ..., "accum": ...}}`` (hls4ml
    style; see offload.fpga.fixed_point for the parts and their defaults) runs dense, conv2d and the
    pools in ``ap_fixed`` arithmetic, bit-exact with the HLS kernels: on the CPU device through
    the offload.fpga.quant emulation, on ``xrt:N`` / ``xrt-emu:0`` through the kernels. A device
    without fixed point (opencl, cuda) refuses it here (UnsupportedOpError naming the device and
    the precision), and the FPGA devices, which run nothing else, refuse a model loaded without
    a fixed-point precision (no silent default). ``model.precision`` is then ``"ap_fixed"`` and
    ``model.fixed_point`` the parsed precision; inputs and outputs stay float32.

    Limits: ``memory_limit`` (bytes, or "8G"; default ``OFFLOAD_MEMORY_LIMIT`` or half the
    physical memory) bounds what one constant folded at load and one plan's buffers may take:
    more raises DeviceMemoryError before allocating. ``plan_cache`` is how many input-shape
    sets keep compiled plans per device (least recently used go; counted in ``model.stats``).
    Every node is checked at load against its operands as onnxruntime does (offload.checks):
    a malformed model raises ModelFormatError or ShapeError naming the node.
    """
    from . import remote as _remote
    if _remote.is_url(source):
        return _remote.load(source, fallback=fallback, **remote)
    if remote:
        raise TypeError(f"load() got options {sorted(remote)} that only a served model "
                        "(grpc:// or http:// source) takes")
    if isinstance(source, str) and not os.path.exists(source):
        if source in zoo.NAMES:
            source = zoo.path(source)
        elif zoo.suggest(source):
            raise ModelFormatError(f"{source}: no such model file or zoo model; did you mean "
                                   f"{' or '.join(map(repr, zoo.suggest(source)))}? (zoo models: "
                                   f"{', '.join(zoo.NAMES)})")
    try:
        limit = _checks.memory_limit(memory_limit)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    if isinstance(plan_cache, bool) or not isinstance(plan_cache, int) or plan_cache < 1:
        raise ArgumentError(f"plan_cache: expected an int >= 1 (input-shape sets kept per "
                           f"device), got {plan_cache!r}")
    graph = import_onnx(source, limit)
    label = str(source) if isinstance(source, (str, os.PathLike)) else graph.name
    opened, missing = _open_devices(device, fallback)
    if isinstance(device, str) and device.strip().lower() == "all":
        # "all": every available device that runs the precision asked for
        family = fixed_point.FAMILY if precision is not None and \
            fixed_point.is_fixed_precision(precision) else (precision or "float32")
        opened = [d for d in opened if family in d.capabilities.precisions] or opened
    fixed = None
    if precision is not None and fixed_point.is_fixed_precision(precision):
        fixed = fixed_point.parse(precision)
        for d in opened:
            if fixed_point.FAMILY not in d.capabilities.precisions:
                raise UnsupportedOpError(
                    f"device {d.spec} cannot run fixed-point precision {fixed} (it runs "
                    f"{sorted(d.capabilities.precisions)}); use device='cpu' (the bit-exact "
                    "emulation) or an xrt device", [(f"precision {fixed}", "")])
        graph = fixed_point.annotate(graph, fixed)
        precision = fixed_point.FAMILY
    else:
        for d in opened:
            if "float32" not in d.capabilities.precisions and fixed_point.FAMILY in \
                    d.capabilities.precisions:
                raise UnsupportedOpError(
                    f"device {d.spec} runs fixed point only ({sorted(d.capabilities.precisions)}"
                    f"), and no precision was given (got {precision!r}): load with e.g. "
                    "precision='ap_fixed<16,6>' (offload.fpga.fixed_point)",
                    [(f"precision {precision or 'float32'}", "")])
    model = Model(graph, opened, label, batching, fallback,
                  precision=precision if precision is not None else "float32",
                  memory_limit=limit, plan_cache=plan_cache)
    model.fixed_point = fixed
    for reason in missing:
        model._stats.fallback(reason)
    return model


def _open_devices(spec, fallback: str) -> tuple[list[Device], list[str]]:
    """The devices named by ``spec``; with fallback="cpu", unavailable ones are replaced by the
    CPU device (warned) and their reasons returned."""
    open_device = globals()["device"]
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return [open_device(i.spec) for i in devices() if i.available], []
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ArgumentError("device: expected a device spec ('cpu', 'opencl:0', 'all'), a "
                            "Device or a non-empty list of them, got an empty list")
    opened, missing = [], []
    for s in specs:
        try:
            opened.append(open_device(s))
        except DeviceUnavailableError as e:
            if fallback != "cpu":
                raise
            import warnings
            warnings.warn(f"offload: {e}; using cpu instead (fallback='cpu')", RuntimeWarning,
                          stacklevel=3)
            missing.append(f"{s}: DeviceUnavailableError: {e}")
    return (opened or [open_device("cpu")]), missing
