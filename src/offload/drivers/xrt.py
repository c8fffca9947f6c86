"""The FPGA device on XRT's ``pyxrt``: HLS kernels (``kernels/hls``) in an xclbin on an Alveo card.

Devices: ``xrt:N`` for real cards (available when ``pyxrt`` imports, a card is found and
``$OFFLOAD_XCLBIN`` names the xclbin(s) built by ``kernels/hls/Makefile``), and ``xrt-emu:0``:
this same driver code on :mod:`offload.fpga.pyxrt_emu`, an **emulation** of the pyxrt surface that runs
the C-simulated kernels (no card; see that module for what it checks and what it cannot).

Written against XRT's binding (``src/python/pybind11/src/pyxrt.cpp``, ``tests/python/22_verify``):
``pyxrt.device(i)``; the xclbin through ``register_xclbin`` + ``hw_context`` (XRT >= 2023.2) or,
when those are missing, the older ``device.load_xclbin`` + ``kernel(device, uuid, name, mode)``;
``pyxrt.kernel``; one ``pyxrt.bo`` per kernel argument on ``kernel.group_id(arg)``; host data
written into ``bo.map()`` (zero copy), ``bo.sync(XCL_BO_SYNC_BO_TO_DEVICE)``, ``kernel(*args)``,
``run.wait(timeout_ms)`` (a run that does not complete in ``timeout_ms``, default 10 s or
``$OFFLOAD_XRT_TIMEOUT_MS``, raises :class:`KernelTimeoutError`; any other end state than
COMPLETED raises :class:`KernelStateError`; nothing waits forever), ``sync(FROM_DEVICE)``.
Every kernel argument is validated before the call: pyxrt silently skips arguments it cannot
convert.

Fixed point only (``Capabilities.precisions == {"ap_fixed"}``): load with
``precision="ap_fixed<16,6>"`` (or a per-layer dict, offload.fpga.fixed_point); a model loaded
without a fixed-point precision is refused at load -- no silent default precision.

Per batch (one ``model(x)`` call): the input is quantised on the host into the mapped input BO and
synced once; each fixed-point layer is **one kernel run with the batch loop inside the kernel**;
activations stay in device BOs between layers (no sync between layers); weights and biases are
quantised, written and synced once per model (at its first plan). The last layer's output is
synced back once; a final ``softmax`` (no HLS kernel for it) runs **on the host in float32** after
that sync, with the CPU device's own softmax (so results equal the CPU device's bit for bit).
Ops other than dense/conv2d/maxpool/avgpool (annotated) and a final softmax raise
UnsupportedOpError at plan time, listed all at once. ``device.counters`` counts syncs, bytes
each way and runs.

One xclbin holds one set of kernel types (``Makefile`` ``DATA_T`` .. ``OUT_T``), declared in a
JSON sidecar ``<xclbin>.json`` (``{"data": "ap_fixed<16,6>", "weight": ..., "bias": ...,
"acc": ..., "out": ...}``, written by ``make xclbin``); ``$OFFLOAD_XCLBIN`` may list several
(``os.pathsep``) for per-layer precisions. On ``xrt-emu`` the emulated xclbin for each set of
types is built on demand (:func:`offload.fpga.pyxrt_emu.build_xclbin`).
"""

from __future__ import annotations

import json
import math
import os
import threading

import numpy as np

from ..fpga import quant
from ..device import Capabilities, Device, DeviceInfo
from ..errors import DeviceRuntimeError, DeviceUnavailableError, ShapeError, UnsupportedOpError
from ..fpga.fixed_point import FAMILY, FixedLayer
from ..fpga.hls_csim import KernelTypes
from ..hostmem import aligned_empty

ENV_XCLBIN = "OFFLOAD_XCLBIN"
ENV_TIMEOUT = "OFFLOAD_XRT_TIMEOUT_MS"
DEFAULT_TIMEOUT_MS = 10_000
# The kernels' on-chip buffer sizes (offload_hls.h defaults): larger layers are refused at plan
# time, since the kernel would silently do nothing.
LIMITS = {"dense_max_in": 1024, "dense_max_out": 256, "dense_max_w": 65536,
          "conv_max_in": 32768, "conv_max_cout": 128, "conv_max_w": 36864, "pool_max_shift": 4}
INT32 = (-(1 << 31), (1 << 31) - 1)
KERNEL_OF = {"dense": "dense", "conv2d": "conv2d", "maxpool": "maxpool2d",
             "avgpool": "avgpool2d"}
NUM_ARGS = {"dense": 8, "conv2d": 13, "maxpool2d": 7, "avgpool2d": 7}


class KernelTimeoutError(DeviceRuntimeError):
    """A kernel run did not complete within the timeout (ERT_CMD_STATE_TIMEOUT)."""


class KernelStateError(DeviceRuntimeError):
    """A kernel run ended in a state other than COMPLETED (ERROR, ABORT, ...)."""


class _Block:
    """One allocation of a plan: a BO made when its first kernel argument says on which memory
    group, and a host float32 array for tensors computed on the host (the final softmax)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.bo = self.mapped = None
        self.group = None
        self.fmt = None  # the fixed-point type of the tensor last placed here
        self.host = None

    def host_array(self):
        if self.host is None:
            self.host = aligned_empty(self.nbytes)
        return self.host


class XBuf:
    """A tensor in a block: its shape, and its fixed-point type once a kernel declares it."""

    def __init__(self, block: _Block, shape: tuple):
        self.block, self.shape = block, tuple(shape)
        self.fmt = block.fmt  # a view (flatten) inherits the type of the tensor it views
        self.on_host = False

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def nbytes(self):
        return self.size * (self.fmt.storage_dtype.itemsize if self.fmt else 4)

    def reshape(self, *shape):
        return XBuf(self.block, shape[0] if len(shape) == 1 else shape)

    def raw_view(self) -> np.ndarray:
        """The mapped host side of the BO as the storage dtype (zero copy)."""
        return self.block.mapped[:self.size * self.fmt.storage_dtype.itemsize].view(
            self.fmt.storage_dtype).reshape(self.shape)

    def host_view(self) -> np.ndarray:
        return self.block.host_array()[:self.size * 4].view(np.float32).reshape(self.shape)


class _Const:
    """A quantised constant (weights, bias) in host memory; one BO per memory group, written and
    synced once."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        self.bos = {}


class XRTDevice(Device):
    """One card (``xrt:N``) or the emulation (``xrt-emu:0``) through a pyxrt-like module."""

    capabilities = Capabilities(frozenset({"dense", "conv2d", "maxpool", "avgpool", "softmax"}),
                                precisions=frozenset({FAMILY}))

    def __init__(self, xrt, index: int, kind: str, xclbins=None, build_xclbin=None,
                 name: str = ""):
        self.xrt, self.index, self.kind = xrt, index, kind
        self.emulated = bool(getattr(xrt, "EMULATION", False))
        self._xclbins = dict(xclbins or {})  # KernelTypes -> path
        self._build_xclbin = build_xclbin
        self.timeout_ms = int(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_MS))
        self._lock = threading.RLock()
        self._loaded = {}  # KernelTypes -> (make kernel, {name: kernel}, xclbin)
        self._legacy_uuid = None
        self._failed = None
        try:
            self.handle = xrt.device(index)
        except Exception as e:
            raise DeviceUnavailableError(f"{kind}:{index}: pyxrt.device({index}) failed: "
                                         f"{type(e).__name__}: {e}") from None
        self.name = name or f"XRT card {index}"
        self.ops = {"dense": self._build_dense, "conv2d": self._build_conv2d,
                    "maxpool": self._build_pool, "avgpool": self._build_pool,
                    "softmax": self._build_softmax}
        self.reset_counters()

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.index}"

    def reset_counters(self):
        self.counters = {"syncs_to_device": 0, "syncs_from_device": 0, "bytes_to_device": 0,
                         "bytes_from_device": 0, "runs": 0}

    def recover(self):
        """Accept runs again after a timeout or error state (on a card: after resetting it,
        e.g. ``xbutil reset``); runs are refused until then."""
        self._failed = None

    # -- xclbins and kernels ----------------------------------------------------------------
    def _kernels_for(self, types: KernelTypes, node: FixedLayer):
        with self._lock:
            hit = self._loaded.get(types)
            if hit is not None:
                return hit
            path = self._xclbins.get(types)
            if path is None and self._build_xclbin is not None:
                path = str(self._build_xclbin(types))
            if path is None:
                have = "; ".join(f"{p}: {t}" for t, p in self._xclbins.items()) or "none"
                raise UnsupportedOpError(
                    f"{self.spec}: no xclbin with kernels for {node} (types {types}); loaded "
                    f"xclbins ({ENV_XCLBIN}): {have}. Build one with kernels/hls/Makefile",
                    [(node.op, node.node)])
            xrt, dev = self.xrt, self.handle
            try:
                xb = xrt.xclbin(str(path))
                names = {k.get_name(): k.get_num_args() for k in xb.get_kernels()}
                if hasattr(xrt, "hw_context") and hasattr(dev, "register_xclbin"):
                    ctx = xrt.hw_context(dev, dev.register_xclbin(xb))

                    def make(name, ctx=ctx):
                        return xrt.kernel(ctx, name)
                else:  # XRT < 2023.2: one xclbin loaded at a time
                    if self._legacy_uuid is not None:
                        raise UnsupportedOpError(
                            f"{self.spec}: this XRT loads one xclbin at a time "
                            f"(load_xclbin); {node} needs a second one ({path})",
                            [(node.op, node.node)])
                    uid = self._legacy_uuid = dev.load_xclbin(xb)

                    def make(name, uid=uid):
                        return xrt.kernel(dev, uid, name, xrt.kernel.shared)
            except UnsupportedOpError:
                raise
            except Exception as e:
                raise DeviceRuntimeError(f"{self.spec}: loading xclbin {path} failed: "
                                         f"{type(e).__name__}: {e}") from None
            hit = self._loaded[types] = (make, {}, names, str(path))
            return hit

    def _kernel(self, name: str, layer: FixedLayer):
        make, kernels, names, path = self._kernels_for(layer.types, layer)
        if name not in kernels:
            if name not in names:
                raise UnsupportedOpError(f"{self.spec}: xclbin {path} has no kernel {name!r} "
                                         f"for {layer} (it has {sorted(names)})",
                                         [(layer.op, layer.node)])
            if names[name] != NUM_ARGS[name]:
                raise DeviceRuntimeError(f"{self.spec}: kernel {name} in {path} takes "
                                         f"{names[name]} arguments, expected {NUM_ARGS[name]}")
            try:
                kernels[name] = make(name)
            except Exception as e:
                raise DeviceRuntimeError(f"{self.spec}: pyxrt.kernel({name!r}) from {path} "
                                         f"failed: {type(e).__name__}: {e}") from None
        return kernels[name]

    # -- memory -----------------------------------------------------------------------------
    def alloc(self, nbytes):
        return _Block(nbytes)

    def view(self, raw, shape, dtype=np.float32):
        return XBuf(raw, shape)

    def upload(self, array):
        return _Const(array)

    def _make_bo(self, nbytes: int, group: int):
        try:
            bo = self.xrt.bo(self.handle, int(nbytes), self.xrt.bo.normal, int(group))
        except Exception as e:
            raise DeviceRuntimeError(f"{self.spec}: allocating a {nbytes}-byte buffer object "
                                     f"in memory group {group} failed: {type(e).__name__}: "
                                     f"{e}") from None
        return bo, np.frombuffer(bo.map(), np.uint8)

    def _place(self, buf: XBuf, fmt: quant.FixedType, group: int, what: str,
               output: bool = False):
        """Give ``buf`` its fixed-point type and its block a BO on ``group``. An output takes
        the kernel's type (its block may have held another tensor before); an input must hold
        the type the kernel reads."""
        if not output and buf.fmt is not None and buf.fmt != fmt:
            raise ShapeError(f"{self.spec}: {what}: tensor holds {buf.fmt}, the kernel expects "
                             f"{fmt}")
        buf.fmt = buf.block.fmt = fmt
        block = buf.block
        if block.bo is None:
            block.bo, block.mapped = self._make_bo(max(block.nbytes, 1), group)
            block.group = group
        elif block.group != group:
            raise DeviceRuntimeError(f"{self.spec}: {what}: buffer is in memory group "
                                     f"{block.group}, the kernel argument in group {group}; "
                                     "use one bank per model (connectivity.cfg)")
        if buf.nbytes > block.nbytes:
            raise ShapeError(f"{self.spec}: {what}: {buf.nbytes} bytes do not fit the "
                             f"{block.nbytes}-byte block")

    def _sync(self, bo, to_device: bool, nbytes: int):
        d = self.xrt.xclBOSyncDirection
        try:
            bo.sync(d.XCL_BO_SYNC_BO_TO_DEVICE if to_device else d.XCL_BO_SYNC_BO_FROM_DEVICE,
                    int(nbytes), 0)
        except Exception as e:
            raise DeviceRuntimeError(f"{self.spec}: bo.sync of {nbytes} bytes "
                                     f"{'to' if to_device else 'from'} the device failed: "
                                     f"{type(e).__name__}: {e}") from None
        c = self.counters
        if to_device:
            c["syncs_to_device"] += 1
            c["bytes_to_device"] += int(nbytes)
        else:
            c["syncs_from_device"] += 1
            c["bytes_from_device"] += int(nbytes)

    def _const_bo(self, const: _Const, group: int):
        hit = const.bos.get(group)
        if hit is None:
            bo, mapped = self._make_bo(max(const.array.nbytes, 1), group)
            mapped[:const.array.nbytes] = const.array.reshape(-1).view(np.uint8)
            self._sync(bo, True, const.array.nbytes)
            hit = const.bos[group] = bo
        return hit

    def copy_in(self, dst: XBuf, src: np.ndarray) -> int:
        if dst.fmt is None:  # read by no kernel (e.g. a host softmax straight on the input)
            np.copyto(dst.host_view(), src, casting="same_kind")
            dst.on_host = True
            return dst.nbytes
        raw = dst.fmt.quantize(src)
        dst.raw_view()[...] = raw  # into the mapped BO: no staging copy
        self._sync(dst.block.bo, True, dst.nbytes)
        return dst.nbytes

    def copy_out(self, dst: np.ndarray, src: XBuf) -> int:
        if src.on_host or src.fmt is None:
            np.copyto(dst, src.host_view().reshape(dst.shape))
            return dst.nbytes
        self._sync(src.block.bo, False, src.nbytes)
        np.copyto(dst, quant.to_float(src.raw_view(), src.fmt).reshape(dst.shape),
                  casting="same_kind")
        return src.nbytes

    # -- runs -------------------------------------------------------------------------------
    def _check_args(self, name: str, args: list, layer: FixedLayer):
        """Every argument a BO or a Python int within int32 (pyxrt drops others silently)."""
        if len(args) != NUM_ARGS[name]:
            raise DeviceRuntimeError(f"{self.spec}: kernel {name}: {len(args)} arguments, "
                                     f"expected {NUM_ARGS[name]}")
        checked = []
        for i, a in enumerate(args):
            if isinstance(a, self.xrt.bo):
                checked.append(a)
                continue
            if isinstance(a, (bool, float)) or not isinstance(a, (int, np.integer)):
                raise ShapeError(f"{self.spec}: kernel {name} argument {i} for {layer}: "
                                 f"expected a buffer object or int, got {type(a).__name__}")
            if not INT32[0] <= int(a) <= INT32[1]:
                raise ShapeError(f"{self.spec}: kernel {name} argument {i} for {layer}: "
                                 f"{int(a)} does not fit a 32-bit int")
            checked.append(int(a))
        return checked

    def _runner(self, name: str, kernel, args: list, layer: FixedLayer):
        args = self._check_args(name, args, layer)
        xrt = self.xrt
        completed = xrt.ert_cmd_state.ERT_CMD_STATE_COMPLETED
        timeout_state = xrt.ert_cmd_state.ERT_CMD_STATE_TIMEOUT

        def run():
            if self._failed:
                raise DeviceRuntimeError(f"{self.spec} is in an error state since {self._failed}"
                                         "; call device.recover() after resetting the card")
            try:
                r = kernel(*args)
            except Exception as e:
                raise DeviceRuntimeError(f"{self.spec}: starting kernel {name} for {layer} "
                                         f"failed: {type(e).__name__}: {e}") from None
            self.counters["runs"] += 1
            timeout = self.timeout_ms
            state = r.wait(timeout)
            if state == completed:
                return
            if state == timeout_state:
                self._failed = f"kernel {name} ({layer.node}) timed out"
                raise KernelTimeoutError(f"{self.spec}: kernel {name} for {layer} did not "
                                         f"complete within {timeout} ms "
                                         "(ERT_CMD_STATE_TIMEOUT)")
            self._failed = f"kernel {name} ({layer.node}) ended in {_state_name(state)}"
            raise KernelStateError(f"{self.spec}: kernel {name} for {layer} ended in "
                                   f"{_state_name(state)}, expected ERT_CMD_STATE_COMPLETED")
        return run

    @staticmethod
    def _layer(attrs, op: str) -> FixedLayer:
        layer = attrs.get("fixed")
        if not isinstance(layer, FixedLayer):
            raise UnsupportedOpError(f"xrt: a {op} node without a fixed-point type (load with "
                                     "precision='ap_fixed<16,6>')", [(op, "")])
        return layer

    def _limit(self, ok: bool, layer: FixedLayer, what: str):
        if not ok:
            raise UnsupportedOpError(f"{self.spec}: {layer}: {what} exceeds the kernel's on-chip "
                                     f"buffers {LIMITS}", [(layer.op, layer.node)])

    def _params(self, ctx, ins, layer: FixedLayer, kernel, layout, m: int):
        t = layer.types
        w = ctx.weight(ins[1], f"xrt:{t.weight}",
                       lambda a: t.weight.to_storage(t.weight.quantize(layout(a))))
        if len(ins) > 2:
            b = ctx.weight(ins[2], f"xrt:{t.bias}", lambda a: t.bias.to_storage(t.bias.quantize(a)))
        else:
            b = _Const(np.zeros(m, t.bias.storage_dtype))
        return self._const_bo(w, kernel.group_id(1)), self._const_bo(b, kernel.group_id(2))

    def _build_dense(self, ctx, attrs, ins, out):
        layer = self._layer(attrs, "dense")
        t = layer.types
        kernel = self._kernel("dense", layer)
        x = ins[0]
        k, m = ins[1].shape  # IR weight [in, out]; the kernel's [out, in]
        n = x.size // k
        self._limit(k <= LIMITS["dense_max_in"] and m <= LIMITS["dense_max_out"]
                    and k * m <= LIMITS["dense_max_w"], layer, f"dense {k}->{m}")
        self._place(x, t.data, kernel.group_id(0), f"{layer} input")
        self._place(out, t.out, kernel.group_id(3), f"{layer} output", output=True)
        wb, bb = self._params(ctx, ins, layer, kernel, lambda a: a.T, m)
        relu = int(attrs.get("activation", "identity") == "relu")
        return self._runner("dense", kernel, [x.block.bo, wb, bb, out.block.bo, n, k, m, relu],
                            layer)

    def _build_conv2d(self, ctx, attrs, ins, out):
        layer = self._layer(attrs, "conv2d")
        t = layer.types
        kernel = self._kernel("conv2d", layer)
        x = ins[0]
        n, c, h, wd = x.shape
        o, _, kh, kw = ins[1].shape
        self._limit(c * h * wd <= LIMITS["conv_max_in"] and o <= LIMITS["conv_max_cout"]
                    and ins[1].size <= LIMITS["conv_max_w"], layer, f"conv2d {x.shape[1:]}")
        self._place(x, t.data, kernel.group_id(0), f"{layer} input")
        self._place(out, t.out, kernel.group_id(3), f"{layer} output", output=True)
        wb, bb = self._params(ctx, ins, layer, kernel, lambda a: a, o)
        relu = int(attrs.get("activation", "identity") == "relu")
        pad = int(attrs["pads"][0])
        return self._runner("conv2d", kernel, [x.block.bo, wb, bb, out.block.bo, n, c, h, wd, o,
                                               kh, kw, pad, relu], layer)

    def _build_pool(self, ctx, attrs, ins, out):
        layer = self._layer(attrs, "pool")
        t = layer.types
        name = KERNEL_OF[layer.op]
        kernel = self._kernel(name, layer)
        x = ins[0]
        n, c, h, wd = x.shape
        k = int(attrs["kernel"][0])
        if layer.op == "avgpool":
            self._limit((k * k).bit_length() - 1 <= LIMITS["pool_max_shift"], layer,
                        f"window {k}x{k}")
        self._place(x, t.data, kernel.group_id(0), f"{layer} input")
        self._place(out, t.out, kernel.group_id(1), f"{layer} output", output=True)
        return self._runner(name, kernel, [x.block.bo, out.block.bo, n, c, h, wd, k], layer)

    def _build_softmax(self, ctx, attrs, ins, out):
        """Softmax on the host in float32 after syncing its input back (no HLS kernel)."""
        from .cpu import build_softmax
        x = ins[0]
        out.on_host = True
        if x.fmt is None:
            raise UnsupportedOpError(f"{self.spec}: softmax runs on the host after the last "
                                     "kernel; its input must be a fixed-point layer's output",
                                     [("softmax", "")])
        staged = np.frombuffer(aligned_empty(x.size * 4), np.float32, x.size).reshape(x.shape)
        host_softmax = build_softmax(ctx, attrs, [staged], out.host_view())
        fmt = x.fmt

        def run():
            self._sync(x.block.bo, False, x.nbytes)
            np.copyto(staged, quant.to_float(x.raw_view(), fmt), casting="same_kind")
            host_softmax()
        return run


def _state_name(state) -> str:
    return getattr(state, "name", str(state))


def _read_sidecar(path: str) -> KernelTypes:
    side = path + ".json"
    try:
        with open(side) as f:
            data = json.load(f)
        return KernelTypes(**{k: data[k] for k in ("data", "weight", "bias", "acc", "out")})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DeviceUnavailableError(f"xclbin {path}: cannot read its kernel types from {side} "
                                     f"({type(e).__name__}: {e}); make xclbin writes it") from None


def _count_cards(pyxrt) -> int:
    if hasattr(pyxrt, "enumerate_devices"):
        return int(pyxrt.enumerate_devices())
    n = 0
    while n < 64:
        try:
            pyxrt.device(n)
        except Exception:
            break
        n += 1
    return n


def _open_card(pyxrt, index: int, paths: list[str]) -> XRTDevice:
    xclbins = {_read_sidecar(p): p for p in paths}
    return XRTDevice(pyxrt, index, "xrt", xclbins=xclbins, name=f"XRT card {index} "
                     f"({', '.join(os.path.basename(p) for p in paths)})")


def _open_emulation() -> XRTDevice:
    from ..fpga import pyxrt_emu
    return XRTDevice(pyxrt_emu, 0, "xrt-emu", build_xclbin=pyxrt_emu.build_xclbin,
                     name=pyxrt_emu.NAME)


def discover():
    infos = []
    try:
        import pyxrt  # noqa: F401
    except Exception as e:
        infos.append(DeviceInfo("xrt:0", False, reason=f"pyxrt not importable ({type(e).__name__}"
                                f": {e}); it comes with an XRT install (source "
                                "/opt/xilinx/xrt/setup.sh)"))
    else:
        try:
            n = _count_cards(pyxrt)
        except Exception as e:
            n, why = 0, f"enumerating cards failed: {type(e).__name__}: {e}"
        else:
            why = "pyxrt imported but no card found"
        paths = [p for p in os.environ.get(ENV_XCLBIN, "").split(os.pathsep) if p]
        if n == 0:
            infos.append(DeviceInfo("xrt:0", False, reason=why))
        for i in range(n):
            if not paths:
                infos.append(DeviceInfo(f"xrt:{i}", False, reason=f"no xclbin given (set "
                                        f"{ENV_XCLBIN} to an xclbin built by kernels/hls/Makefile)"))
            else:
                infos.append(DeviceInfo(f"xrt:{i}", True, f"XRT card {i}",
                                        open=lambda i=i: _open_card(pyxrt, i, paths)))
    from ..fpga import hls_csim
    if hls_csim.compiler() is None:
        infos.append(DeviceInfo("xrt-emu:0", False, reason="pyxrt emulation needs a C++ compiler "
                                "for the HLS C-simulation (g++ or $CXX)"))
    else:
        infos.append(DeviceInfo("xrt-emu:0", True, "pyxrt emulation (HLS C-simulation, no card)",
                                open=_open_emulation))
    return infos
