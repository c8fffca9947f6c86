"""The Device contract and the registry of drivers.

A driver is one module. Built-in drivers are the modules of ``offload.drivers`` (found by module
name); third-party drivers register a module under the ``offload.drivers`` entry point group.
A driver module defines ``discover() -> list[DeviceInfo]``; discovery never raises: a driver
whose packages or hardware are missing lists itself as unavailable with the reason.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import DeviceUnavailableError, OffloadError

# An op builder compiles one IR node for a plan: it receives the BuildContext, the node's resolved
# attributes, its data operands (device buffers for run-time tensors, NumPy arrays for constants)
# and the output buffer, and returns a zero-argument callable that runs the op.
OpBuilder = Callable[..., Callable[[], None]]


@dataclass(frozen=True)
class Capabilities:
    """What a device can do: IR ops, tensor dtypes (NumPy names), and numeric precisions."""

    ops: frozenset
    dtypes: frozenset = frozenset({"float32"})
    precisions: frozenset = frozenset({"float32"})


ALL_DTYPES = frozenset({"float32", "int64", "int32", "bool"})


class Device:
    """One coprocessor (or the CPU) behind the common contract.

    Memory: ``alloc(nbytes)`` returns a raw block; ``view(raw, shape, dtype)`` a typed buffer at
    its start; ``upload(array)`` a constant buffer; ``copy_in(dst, host)`` and ``copy_out(host,
    src)`` move data and return the bytes moved; ``synchronize()`` waits for queued work.
    Ops: ``ops[name]`` is an OpBuilder for each IR op the device implements; ``finalize`` may
    merge a plan's steps.
    """

    kind: str = ""
    index: int = 0
    name: str = ""
    ops: dict[str, OpBuilder] = {}
    capabilities: Capabilities = Capabilities(frozenset())
    # True when ``view`` also accepts a flat uint8 host array as the raw block, so that a plan
    # may run on the caller's own aligned arrays instead of copying them (see Plan.run).
    reads_host_arrays: bool = False
    # The DLPack (device type, id) of arrays in this device's own memory that it takes as inputs
    # without a host round trip (e.g. (2, 0) for CUDA device 0); None: host arrays only.
    dlpack_device: tuple | None = None

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.index}"

    def alloc(self, nbytes: int) -> Any:
        raise NotImplementedError

    def view(self, raw: Any, shape: tuple, dtype=np.float32) -> Any:
        raise NotImplementedError

    def upload(self, array: np.ndarray) -> Any:
        raise NotImplementedError

    def copy_in(self, dst: Any, src: np.ndarray) -> int:
        raise NotImplementedError

    def copy_out(self, dst: np.ndarray, src: Any) -> int:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def device_array(self, src: Any):
        """A new array in the device's own memory holding a copy of the buffer ``src`` (for
        ``model(x, out="device")``); host-memory devices return NumPy arrays."""
        raise NotImplementedError(f"{self.spec} has no device array type")

    def session(self) -> "Device":
        """The device as one model uses it. A driver with queues gives each model its own (CUDA:
        a stream and a cuBLAS handle, so that models overlap on the GPU); by default the device
        itself."""
        return self

    def finalize(self, runs: list) -> list:
        """Given a plan's step callables in order, return the callables to run per inference
        (a device may merge steps, e.g. into one native call or one captured graph)."""
        return runs

    def __repr__(self) -> str:
        return f"<offload.Device {self.spec} {self.name!r}>"


@dataclass
class DeviceInfo:
    """A device known to offload, available or not."""

    spec: str
    available: bool
    name: str = ""
    reason: str = ""
    open: Callable[[], Device] | None = field(default=None, repr=False)
    driver: str = ""
    # Text that a spec by name ("opencl:pocl") is matched against, case-insensitively (the
    # OpenCL driver puts the platform's name, vendor and version here); empty: the name only.
    match: str = field(default="", repr=False)

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.spec:12s} {self.name or '-'}  ({state})"


_NAME = re.compile(r"[a-z][a-z0-9_.+-]*")


def parse_spec(spec: str | Device) -> str:
    """'cuda' -> 'cuda:0', 'CPU' -> 'cpu:0'; a name after the colon stays a name:
    'opencl:PoCL' -> 'opencl:pocl' (see :func:`device`)."""
    if isinstance(spec, Device):
        return spec.spec
    text = str(spec).strip().lower()
    kind, _, index = text.partition(":")
    if not kind or (index and not index.isdigit() and not _NAME.fullmatch(index)):
        raise DeviceUnavailableError(f"bad device spec {spec!r}: expected 'kind', 'kind:N' or "
                                     "'kind:name', e.g. 'cpu', 'opencl:0', 'opencl:pocl', "
                                     "'cuda:0'")
    return f"{kind}:{int(index or 0)}" if not index or index.isdigit() else f"{kind}:{index}"


def resolve_spec(spec: str | Device) -> str:
    """The 'kind:N' spec of a device named by ``spec``: 'opencl:pocl' is the first (best)
    available device of that kind whose name or platform contains 'pocl'. Raises
    DeviceUnavailableError (naming ``spec`` as given) when no known device matches."""
    key = parse_spec(spec)
    infos = devices()
    if any(i.spec == key for i in infos):
        return key
    kind, _, name = key.partition(":")
    if not name.isdigit():
        named = [i for i in infos if i.spec.partition(":")[0] == kind
                 and name in f"{i.name} {i.match}".lower()]
        for info in sorted(named, key=lambda i: not i.available):
            return info.spec
    known = ", ".join(i.spec for i in infos) or "none"
    raise DeviceUnavailableError(f"no device {str(spec)!r}; known devices: {known}")


def unavailable(specs) -> list[str]:
    """For each spec in ``specs`` that names no available device, one line 'spec: reason'
    ('opencl:pocl' resolves by name); empty when every one is available."""
    infos = {i.spec: i for i in devices()}
    missing = []
    for spec in specs:
        try:
            info = infos.get(resolve_spec(spec))
        except OffloadError as e:
            missing.append(f"{spec}: {e}")
            continue
        if info is None or not info.available:
            missing.append(f"{spec}: {info.reason if info else 'unknown device'}")
    return missing


_lock = threading.Lock()
_opened: dict[str, Device] = {}
_discovered: list[DeviceInfo] | None = None


def _driver_modules():
    from . import drivers
    for module in pkgutil.iter_modules(drivers.__path__):
        if not module.name.startswith("_"):
            yield module.name, lambda name=module.name: importlib.import_module(
                f"offload.drivers.{name}")
    for ep in importlib.metadata.entry_points(group="offload.drivers"):
        yield ep.name, ep.load


def _discover_all() -> list[DeviceInfo]:
    found: list[DeviceInfo] = []
    for name, load in _driver_modules():
        try:
            infos = list(load().discover())
        except Exception as e:  # a broken driver must not break discovery of the others
            infos = [DeviceInfo(f"{name}:0", False, reason=f"driver failed to load: "
                                f"{type(e).__name__}: {e}")]
        for info in infos:
            info.driver = info.driver or name
        found.extend(infos)
    def order(info):  # cpu first, then by kind; within a kind by number (opencl:2 < opencl:10)
        kind, _, index = info.spec.partition(":")
        return kind != "cpu", kind + ":", int(index) if index.isdigit() else 0, index
    found.sort(key=order)
    return found


def _own_driver_info(key: str) -> DeviceInfo | None:
    """The DeviceInfo of 'kind:N' from the built-in driver module of that kind alone, before any
    full discovery: opening 'cpu' loads no OpenCL or CUDA runtime (PoCL's start-up aborts the
    process where threads cannot be created). None where that module does not list the key."""
    kind, _, index = key.partition(":")
    if _discovered is not None or not index.isdigit():
        return None
    try:
        module = importlib.import_module(f"offload.drivers.{kind.replace('-', '_')}")
        infos = list(module.discover())
    except Exception:  # noqa: BLE001 - the full discovery reports it with its reason
        return None
    return next((i for i in infos if i.spec == key), None)


def devices(refresh: bool = False) -> list[DeviceInfo]:
    """Every known device, available or not, with the reason when not."""
    global _discovered
    with _lock:
        if _discovered is None or refresh:
            _discovered = _discover_all()
        return list(_discovered)


def device(spec: str | Device = "cpu") -> Device:
    """Open (once) and return the device named by ``spec``: 'cpu', 'opencl:0', 'cuda:0'…, or
    'kind:name' ('opencl:pocl': the first available device of that kind whose name or platform
    contains the name)."""
    if isinstance(spec, Device):
        return spec
    key = parse_spec(spec)
    with _lock:
        if key in _opened:
            return _opened[key]
    info = _own_driver_info(key)
    if info is None:
        key = resolve_spec(spec)
        with _lock:
            if key in _opened:
                return _opened[key]
        info = {i.spec: i for i in devices()}[key]
    if not info.available:
        asked = "" if parse_spec(spec) == key else f" ({str(spec)!r})"
        raise DeviceUnavailableError(f"device {key}{asked} is unavailable: {info.reason}")
    with _lock:
        if key not in _opened:
            _opened[key] = info.open()
        return _opened[key]
