"""An EMULATION of XRT's ``pyxrt`` Python surface, for testing ``drivers/xrt.py`` without a card.

This is not XRT and talks to no hardware. It reproduces the subset of ``pyxrt`` that the xrt
driver uses, with the names, arguments and return values of XRT's own binding
(``src/python/pybind11/src/pyxrt.cpp``): ``device(index)``, ``xclbin(path)``,
``device.register_xclbin`` + ``hw_context(device, uuid)`` (XRT >= 2023.2) and the older
``device.load_xclbin``, ``kernel(hw_context, name)`` / ``kernel(device, uuid, name, mode)``,
``kernel.group_id(i)``, ``bo(device, size, bo.normal, group)`` with ``write``/``read``/
``sync``/``map``/``size``, ``kernel(*args) -> run``, ``run.wait(timeout_ms) -> ert_cmd_state``,
``run.state()``, the ``xclBOSyncDirection`` and ``ert_cmd_state`` enums.

Kernels run as the HLS C-simulation (:mod:`offload.fpga.hls_csim`: the same ``kernels/hls/*.cpp``
compiled by g++). An emulated "xclbin" is a JSON manifest written by :func:`build_xclbin` (the
emulation of ``make xclbin``): the kernel types, the C-sim library, and each kernel's arguments
**parsed from the C++ sources** (order, pointer or int, m_axi bundle) with the memory bank of
each bundle parsed from ``connectivity.cfg`` -- so a driver that passes arguments in the wrong
order or on the wrong bank fails here as it would on the card.

Stricter than the real thing, on purpose:

* device memory is separate from host memory: ``bo.map()``/``write`` touch the host copy only,
  a kernel reads and writes the device copy, and only ``sync`` moves bytes (device memory starts
  filled with 0xCD, so a missing sync gives stale data instead of a lucky zero);
* every kernel argument is checked before the run: the count, ``bo`` for pointer arguments
  (from this card, on the bank ``group_id`` reports, large enough for what the kernel will
  touch), a Python ``int`` within int32 for scalars (real pyxrt silently skips an argument it
  cannot convert); violations raise :class:`EmulationError`;
* ``run.wait()`` without a timeout on a run that never completes raises instead of hanging;
* faults are injectable (:meth:`Card.inject`): a run that times out (``wait`` sleeps its timeout
  and returns ``ERT_CMD_STATE_TIMEOUT``), or ends in ``ERROR``/``ABORT``/... without writing;
* counters of syncs, bytes each way and runs (:attr:`Card.counters`).

Not emulated (only a card shows them): DMA timing and bandwidth, the ERT scheduler, multiple
compute units, address alignment, bank capacity, real ``pyxrt`` conversions and error texts.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import os
import pathlib
import re
import threading
import time

import numpy as np

from . import hls_csim

EMULATION = True  # drivers and users can tell this module from the real pyxrt
NAME = "pyxrt emulation (offload.fpga.pyxrt_emu: HLS C-simulation, no card)"
XCL_BO_FLAGS_NONE = 0
BANKS = ("DDR[0]", "DDR[1]", "DDR[2]", "DDR[3]")  # an Alveo U250's four DDR banks
STALE = 0xCD
INT32 = (-(1 << 31), (1 << 31) - 1)


class EmulationError(RuntimeError):
    """A call the emulation refuses (where real XRT may fail later, or silently)."""


class xclBOSyncDirection(enum.IntEnum):  # noqa: N801  (pyxrt's spelling)
    XCL_BO_SYNC_BO_TO_DEVICE = 0
    XCL_BO_SYNC_BO_FROM_DEVICE = 1
    XCL_BO_SYNC_BO_GMIO_TO_AIE = 2
    XCL_BO_SYNC_BO_AIE_TO_GMIO = 3


class ert_cmd_state(enum.IntEnum):  # noqa: N801  (values of XRT's ert.h)
    ERT_CMD_STATE_NEW = 1
    ERT_CMD_STATE_QUEUED = 2
    ERT_CMD_STATE_RUNNING = 3
    ERT_CMD_STATE_COMPLETED = 4
    ERT_CMD_STATE_ERROR = 5
    ERT_CMD_STATE_ABORT = 6
    ERT_CMD_STATE_SUBMITTED = 7
    ERT_CMD_STATE_TIMEOUT = 8
    ERT_CMD_STATE_NORESPONSE = 9
    ERT_CMD_STATE_SKERROR = 10
    ERT_CMD_STATE_SKCRASHED = 11


FAULTS = {"timeout": None, "error": ert_cmd_state.ERT_CMD_STATE_ERROR,
          "abort": ert_cmd_state.ERT_CMD_STATE_ABORT,
          "noresponse": ert_cmd_state.ERT_CMD_STATE_NORESPONSE,
          "skcrashed": ert_cmd_state.ERT_CMD_STATE_SKCRASHED}


# ---------------------------------------------------------------------------
# the emulated "xclbin": kernel signatures parsed from the HLS sources
# ---------------------------------------------------------------------------

_SIG = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_MAXI = re.compile(r"#pragma\s+HLS\s+INTERFACE\s+m_axi\s+port\s*=\s*(\w+)[^\n]*?bundle\s*=\s*(\w+)")


def kernel_signatures(hls_dir=None) -> dict:
    """{kernel: [(arg name, "ptr" | "int", m_axi bundle or None), ...]} from kernels/hls/*.cpp."""
    folder = pathlib.Path(hls_dir or hls_csim.hls_dir())
    sigs = {}
    for src in sorted(folder.glob("*.cpp")):
        text = src.read_text()
        matches = list(_SIG.finditer(text))
        for i, m in enumerate(matches):
            body = text[m.end():matches[i + 1].start() if i + 1 < len(matches) else len(text)]
            bundles = dict(_MAXI.findall(body))
            args = []
            for param in m.group(2).split(","):
                param = " ".join(param.split())
                name = re.findall(r"(\w+)\s*$", param)[0]
                kind = "ptr" if "*" in param else "int"
                args.append((name, kind, bundles.get(name) if kind == "ptr" else None))
            if any(kind == "ptr" for _, kind, _ in args) and m.group(1) != "offload_hls_info":
                sigs[m.group(1)] = args
    return sigs


def connectivity(hls_dir=None) -> dict:
    """{(kernel, bundle): bank tag} from kernels/hls/connectivity.cfg (``sp=`` lines)."""
    folder = pathlib.Path(hls_dir or hls_csim.hls_dir())
    cu_kernel, banks = {}, {}
    for line in (folder / "connectivity.cfg").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("nk="):
            kernel, _, cu = line[3:].split(":")
            cu_kernel[cu] = kernel
        elif line.startswith("sp="):
            port, _, bank = line[3:].partition(":")
            cu, _, bundle = port.partition(".")
            banks[(cu_kernel.get(cu, cu), bundle.replace("m_axi_", ""))] = bank
    return banks


def build_xclbin(types: hls_csim.KernelTypes, folder=None) -> pathlib.Path:
    """The emulation of ``make xclbin``: compile the C-sim library for ``types`` and write the
    emulated xclbin manifest (JSON) next to it; return the manifest's path (cached)."""
    lib = hls_csim.build(types)
    sigs, banks = kernel_signatures(), connectivity()
    kernels = {}
    for name, args in sigs.items():
        kernels[name] = [{"name": a, "kind": k, "bundle": b,
                          "group": BANKS.index(banks[(name, b)]) if k == "ptr" else None}
                         for a, k, b in args]
    manifest = {"format": "offload-pyxrt-emulation", "xsa": "emulated_u250 (no platform)",
                "types": {f: str(getattr(types, f)) for f in ("data", "weight", "bias", "acc",
                                                              "out")},
                "library": str(lib), "kernels": kernels, "mems": list(BANKS)}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    manifest["uuid"] = hashlib.sha256(text.encode()).hexdigest()[:32]
    folder = pathlib.Path(folder) if folder else hls_csim.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"offload-emu-{manifest['uuid'][:16]}.xclbin.json"
    if not path.is_file():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# the pyxrt surface
# ---------------------------------------------------------------------------


class uuid:  # noqa: N801
    def __init__(self, text: str):
        self._text = str(text)

    def to_string(self) -> str:
        return self._text

    def __eq__(self, other):
        return isinstance(other, uuid) and other._text == self._text

    def __hash__(self):
        return hash(self._text)


class xclbin:  # noqa: N801
    """An emulated xclbin: the manifest written by :func:`build_xclbin`."""

    class xclbinkernel:  # noqa: N801
        def __init__(self, name, args):
            self._name, self._args = name, args

        def get_name(self):
            return self._name

        def get_num_args(self):
            return len(self._args)

    def __init__(self, filename: str):
        try:
            data = json.loads(pathlib.Path(filename).read_text())
        except (OSError, ValueError) as e:
            raise EmulationError(f"cannot read emulated xclbin {filename}: {e}") from None
        if data.get("format") != "offload-pyxrt-emulation":
            raise EmulationError(f"{filename} is not an emulated xclbin (a real .xclbin needs "
                                 "a card and the real pyxrt)")
        self.path, self._data = str(filename), data
        self.types = hls_csim.KernelTypes(**data["types"])

    def get_kernels(self):
        return [self.xclbinkernel(n, a) for n, a in sorted(self._data["kernels"].items())]

    def get_uuid(self) -> uuid:
        return uuid(self._data["uuid"])

    def get_xsa_name(self) -> str:
        return self._data["xsa"]


class Card:
    """The state of one emulated card: memory banks, xclbins, counters, injected faults."""

    def __init__(self, index: int):
        self.index = index
        self.lock = threading.RLock()
        self.registered: dict[uuid, xclbin] = {}
        self.loaded: uuid | None = None
        self._faults: list[str] = []
        self._libs: dict[str, ctypes.CDLL] = {}
        self.reset_counters()

    def reset_counters(self):
        self.counters = {"syncs_to_device": 0, "syncs_from_device": 0, "bytes_to_device": 0,
                         "bytes_from_device": 0, "runs": 0, "runs_by_kernel": {}}

    def inject(self, fault: str, count: int = 1):
        """The next ``count`` runs end with ``fault``: "timeout" (never completes), "error",
        "abort", "noresponse" or "skcrashed" (the output is not written)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        with self.lock:
            self._faults.extend([fault] * count)

    def clear_faults(self):
        with self.lock:
            self._faults.clear()

    def _next_fault(self):
        with self.lock:
            return self._faults.pop(0) if self._faults else None

    def lib(self, path: str) -> ctypes.CDLL:
        with self.lock:
            if path not in self._libs:
                self._libs[path] = ctypes.CDLL(path)
            return self._libs[path]


_cards: dict[int, Card] = {}
_cards_lock = threading.Lock()
CARDS = 1


def card(index: int = 0) -> Card:
    """The emulated card ``index`` (for tests: counters, fault injection)."""
    if not 0 <= int(index) < CARDS:
        raise EmulationError(f"no emulated card {index}; the emulation has {CARDS}")
    with _cards_lock:
        return _cards.setdefault(int(index), Card(int(index)))


def enumerate_devices() -> int:
    return CARDS


class device:  # noqa: N801
    def __init__(self, index: int = 0):
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"device(index): expected int, got {type(index).__name__}")
        self._card = card(index)

    def register_xclbin(self, xb: xclbin) -> uuid:
        if not isinstance(xb, xclbin):
            raise TypeError(f"register_xclbin: expected xclbin, got {type(xb).__name__}")
        with self._card.lock:
            self._card.registered[xb.get_uuid()] = xb
        return xb.get_uuid()

    def load_xclbin(self, xb) -> uuid:
        """Deprecated in XRT >= 2023.2; loading replaces the card's one xclbin."""
        xb = xclbin(xb) if isinstance(xb, str) else xb
        u = self.register_xclbin(xb)
        with self._card.lock:
            self._card.loaded = u
        return u

    def get_xclbin_uuid(self) -> uuid:
        return self._card.loaded or uuid("00000000000000000000000000000000")

    def get_info(self, key):
        return f"xrt-emu card {self._card.index}"


class hw_context:  # noqa: N801
    class access_mode(enum.IntEnum):  # noqa: N801
        exclusive = 0
        shared = 1

    def __init__(self, dev: device, xb_or_uuid, mode=None):
        if not isinstance(dev, device):
            raise TypeError(f"hw_context: expected device, got {type(dev).__name__}")
        if isinstance(xb_or_uuid, (xclbin, str)):
            xb_or_uuid = dev.register_xclbin(xclbin(xb_or_uuid) if isinstance(xb_or_uuid, str)
                                             else xb_or_uuid)
        if xb_or_uuid not in dev._card.registered:
            raise EmulationError(f"hw_context: xclbin {xb_or_uuid.to_string()} is not "
                                 "registered on this device")
        self._device, self._uuid = dev, xb_or_uuid
        self._xclbin = dev._card.registered[xb_or_uuid]

    def get_device(self):
        return self._device

    def get_xclbin_uuid(self):
        return self._uuid


class bo:  # noqa: N801
    class flags(enum.IntEnum):  # noqa: N801
        normal = 0
        cacheable = 1
        device_only = 2
        host_only = 3
        p2p = 4
        svm = 5

    normal, cacheable, device_only, host_only, p2p, svm = (
        flags.normal, flags.cacheable, flags.device_only, flags.host_only, flags.p2p, flags.svm)

    def __init__(self, owner, size: int, flags, group: int):
        dev = owner._device if isinstance(owner, hw_context) else owner
        if not isinstance(dev, device):
            raise TypeError(f"bo: expected device or hw_context, got {type(owner).__name__}")
        if not isinstance(size, int) or size <= 0:
            raise EmulationError(f"bo: size must be a positive int, got {size!r}")
        if not isinstance(group, int) or not 0 <= group < len(BANKS):
            raise EmulationError(f"bo: memory group {group!r} does not exist (banks 0.."
                                 f"{len(BANKS) - 1}: {', '.join(BANKS)})")
        if int(flags) != bo.flags.normal:
            raise EmulationError(f"bo: only bo.normal buffers are emulated, got {flags!r}")
        self._card, self._group, self._size = dev._card, group, size
        self._host = np.zeros(size, np.uint8)
        self._dev = np.full(size, STALE, np.uint8)

    def size(self) -> int:
        return self._size

    def address(self) -> int:
        return int(self._dev.ctypes.data)

    def map(self) -> memoryview:
        return memoryview(self._host)

    def write(self, buf, seek: int):
        src = np.frombuffer(memoryview(buf).cast("B"), np.uint8)
        if seek < 0 or seek + src.size > self._size:
            raise EmulationError(f"bo.write: {src.size} bytes at {seek} overflow the "
                                 f"{self._size}-byte buffer")
        self._host[seek:seek + src.size] = src

    def read(self, size: int, skip: int):
        if skip < 0 or skip + size > self._size:
            raise EmulationError(f"bo.read: {size} bytes at {skip} outside the {self._size}-"
                                 "byte buffer")
        return self._host[skip:skip + size].view(np.int8).copy()

    def sync(self, direction, size: int | None = None, offset: int = 0):
        size = self._size - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > self._size:
            raise EmulationError(f"bo.sync: {size} bytes at {offset} outside the {self._size}-"
                                 "byte buffer")
        c = self._card.counters
        with self._card.lock:
            if direction == xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE:
                self._dev[offset:offset + size] = self._host[offset:offset + size]
                c["syncs_to_device"] += 1
                c["bytes_to_device"] += size
            elif direction == xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE:
                self._host[offset:offset + size] = self._dev[offset:offset + size]
                c["syncs_from_device"] += 1
                c["bytes_from_device"] += size
            else:
                raise EmulationError(f"bo.sync: direction {direction!r} is not emulated")


class run:  # noqa: N801
    def __init__(self, state: ert_cmd_state, kernel_name: str, never_completes: bool = False):
        self._state, self._name, self._hang = state, kernel_name, never_completes

    def wait(self, timeout_ms: int = 0) -> ert_cmd_state:
        if self._hang:
            if not timeout_ms:
                raise EmulationError(f"run of {self._name}: wait() without a timeout on a run "
                                     "that never completes would block forever")
            time.sleep(timeout_ms / 1000)
            return ert_cmd_state.ERT_CMD_STATE_TIMEOUT
        return self._state

    def state(self) -> ert_cmd_state:
        return ert_cmd_state.ERT_CMD_STATE_RUNNING if self._hang else self._state


def _nbytes(name: str, args: dict, t: hls_csim.KernelTypes) -> dict:
    """Bytes each pointer argument of a kernel run touches (from kernels/hls/*.cpp)."""
    it = {k: getattr(t, k).storage_dtype.itemsize for k in ("data", "weight", "bias", "out")}
    a = args
    if name == "dense":
        return {"x": a["batch"] * a["n_in"] * it["data"],
                "w": a["n_out"] * a["n_in"] * it["weight"], "b": a["n_out"] * it["bias"],
                "y": a["batch"] * a["n_out"] * it["out"]}
    if name == "conv2d":
        ho = a["height"] + 2 * a["pad"] - a["kh"] + 1
        wo = a["width"] + 2 * a["pad"] - a["kw"] + 1
        return {"x": a["batch"] * a["c_in"] * a["height"] * a["width"] * it["data"],
                "w": a["c_out"] * a["c_in"] * a["kh"] * a["kw"] * it["weight"],
                "b": a["c_out"] * it["bias"],
                "y": a["batch"] * a["c_out"] * max(ho, 0) * max(wo, 0) * it["out"]}
    if name in ("maxpool2d", "avgpool2d"):
        k = max(a["k"], 1)
        return {"x": a["batch"] * a["channels"] * a["height"] * a["width"] * it["data"],
                "y": a["batch"] * a["channels"] * (a["height"] // k) * (a["width"] // k)
                * it["out"]}
    raise EmulationError(f"kernel {name}: no emulated memory footprint")


class kernel:  # noqa: N801
    class cu_access_mode(enum.IntEnum):  # noqa: N801
        exclusive = 0
        shared = 1
        none = 2

    exclusive, shared, none = cu_access_mode.exclusive, cu_access_mode.shared, cu_access_mode.none

    def __init__(self, owner, *rest):
        if isinstance(owner, hw_context) and len(rest) == 1:
            ctx, name = owner, rest[0]
            dev, xb = ctx._device, ctx._xclbin
        elif isinstance(owner, device) and len(rest) in (2, 3):  # deprecated (device, uuid, ...)
            dev, u, name = owner, rest[0], rest[1]
            if dev._card.loaded != u:
                raise EmulationError(f"kernel {name}: xclbin {getattr(u, 'to_string', str)()} "
                                     "is not the one loaded on the device (load_xclbin)")
            xb = dev._card.registered[u]
        else:
            raise TypeError("kernel(hw_context, name) or kernel(device, uuid, name[, mode])")
        if name not in xb._data["kernels"]:
            raise EmulationError(f"kernel {name!r} is not in xclbin {xb.path} (it has "
                                 f"{sorted(xb._data['kernels'])})")
        self._device, self._xclbin, self._name = dev, xb, name
        self._args = xb._data["kernels"][name]
        self._uuid = xb.get_uuid()
        self._fn = None

    def group_id(self, index: int) -> int:
        if not isinstance(index, int) or not 0 <= index < len(self._args):
            raise EmulationError(f"kernel {self._name}.group_id({index!r}): it has "
                                 f"{len(self._args)} arguments")
        g = self._args[index]["group"]
        if g is None:
            raise EmulationError(f"kernel {self._name}.group_id({index}): argument "
                                 f"{self._args[index]['name']!r} is a scalar, not a buffer")
        return g

    def __call__(self, *args) -> run:
        card_ = self._device._card
        if card_.loaded is not None and card_.loaded != self._uuid and \
                self._uuid not in card_.registered:
            raise EmulationError(f"kernel {self._name}: its xclbin is no longer on the device")
        if len(args) != len(self._args):
            raise EmulationError(f"kernel {self._name}: expected {len(self._args)} arguments "
                                 f"({', '.join(a['name'] for a in self._args)}), got {len(args)}")
        values, buffers = {}, {}
        for i, (spec, arg) in enumerate(zip(self._args, args)):
            what = f"kernel {self._name} argument {i} ({spec['name']})"
            if spec["kind"] == "ptr":
                if not isinstance(arg, bo):
                    raise EmulationError(f"{what}: expected a bo, got {type(arg).__name__}")
                if arg._card is not card_:
                    raise EmulationError(f"{what}: the bo belongs to another device")
                if arg._group != spec["group"]:
                    raise EmulationError(f"{what}: bo in memory group {arg._group} "
                                         f"({BANKS[arg._group]}) but the kernel reads it from "
                                         f"group {spec['group']} ({BANKS[spec['group']]})")
                buffers[spec["name"]] = arg
            else:
                if type(arg) is not int:
                    raise EmulationError(f"{what}: expected a Python int, got "
                                         f"{type(arg).__name__} {arg!r} (real pyxrt would "
                                         "silently skip it)")
                if not INT32[0] <= arg <= INT32[1]:
                    raise EmulationError(f"{what}: {arg} does not fit an int")
                values[spec["name"]] = arg
        need = _nbytes(self._name, values, self._xclbin.types)
        for name, nbytes in need.items():
            if nbytes > buffers[name]._size:
                raise EmulationError(f"kernel {self._name}: argument {name} would touch "
                                     f"{nbytes} bytes of a {buffers[name]._size}-byte bo")
        fault = card_._next_fault()
        with card_.lock:
            card_.counters["runs"] += 1
            by = card_.counters["runs_by_kernel"]
            by[self._name] = by.get(self._name, 0) + 1
        if fault == "timeout":
            return run(ert_cmd_state.ERT_CMD_STATE_TIMEOUT, self._name, never_completes=True)
        if fault is not None:
            return run(FAULTS[fault], self._name)
        if self._fn is None:
            self._fn = getattr(card_.lib(self._xclbin._data["library"]), self._name)
            self._fn.restype = None
            self._fn.argtypes = [ctypes.c_void_p if a["kind"] == "ptr" else ctypes.c_int
                                 for a in self._args]
        call = [ctypes.c_void_p(buffers[a["name"]]._dev.ctypes.data) if a["kind"] == "ptr"
                else values[a["name"]] for a in self._args]
        with card_.lock:
            self._fn(*call)  # reads and writes device memory only
        return run(ert_cmd_state.ERT_CMD_STATE_COMPLETED, self._name)
