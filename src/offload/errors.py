"""Typed errors of offload.

Every error is an :class:`OffloadError`. Messages name what was expected and what came (shape, dtype,
op, node, file). All errors pickle (they cross thread and process boundaries through futures).
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base class of every error offload raises on purpose."""

    def __reduce__(self):
        return (self.__class__, self.args)


class ArgumentError(OffloadError, ValueError):
    """An argument of a public function is of the wrong type or out of range (a batch size, a
    setting, a fallback name); the message names the argument, what it takes and what came.
    Also a ValueError, as such arguments raised before."""


class ModelFormatError(OffloadError):
    """A model file could not be read: missing, truncated, not ONNX, or referring outside its folder."""


class UnsupportedOpError(OffloadError):
    """The model holds ops this importer or device does not implement.

    ``ops`` lists every offending ``(op_type, node_name)`` pair, not just the first.
    """

    def __init__(self, message: str, ops: list[tuple[str, str]] | tuple = ()):
        super().__init__(message, list(ops))
        self.ops = list(ops)

    def __str__(self) -> str:
        return self.args[0]


class ShapeError(OffloadError):
    """An input or tensor has the wrong rank, shape or dtype."""


class DeviceUnavailableError(OffloadError):
    """The device asked for is unknown or cannot be used here; the message says why."""


class DeviceMemoryError(OffloadError):
    """An allocation on a device failed; the message names the size asked and the size in use."""


class KernelBuildError(OffloadError):
    """A device kernel failed to compile. ``log`` holds the compiler's output."""

    def __init__(self, message: str, log: str = "", source: str = ""):
        super().__init__(message, log, source)
        self.log = log
        self.source = source

    def __str__(self) -> str:
        return self.args[0] + (("\n" + self.log) if self.log else "")


class DeviceRuntimeError(OffloadError):
    """A device reported a failure while running (launch failure, timeout, lost device)."""


class RequestTimeoutError(DeviceRuntimeError, TimeoutError):
    """A request got no answer in the time allowed (a remote model's ``timeout``)."""
