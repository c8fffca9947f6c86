"""SONIC mode, client side: the Model API on any KServe v2 / Triton server, through tritonclient.

    model = offload.load("grpc://127.0.0.1:8001/jet_mlp")        # or http://HOST:PORT/MODEL/VERSION
    y = model(x)                                                  # as a local model
    model = offload.load(["grpc://a:8001/m", "grpc://b:8001/m"], retries=2, fallback="cpu",
                         fallback_source="m.onnx", shared_memory=True, timeout=5.0)

Every byte of the protocol is tritonclient's (``tritonclient.grpc`` / ``tritonclient.http``, and
``tritonclient.utils.shared_memory`` for Triton's system shared-memory extension).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

import numpy as np

from . import graph as G
from .errors import (DeviceRuntimeError, DeviceUnavailableError, ModelFormatError, OffloadError,
                     RequestTimeoutError, ShapeError)

SCHEMES = ("grpc", "http")
WINDOW = 2048
COMPRESSIONS = (None, "gzip", "deflate")
_ids = itertools.count()


def is_url(source) -> bool:
    """True for "grpc://..." / "http://..." or a non-empty list of them."""
    if isinstance(source, (list, tuple)) and source:
        return all(is_url(s) for s in source)
    return isinstance(source, str) and source.split("://", 1)[0].lower() in SCHEMES \
        and "://" in source


def parse_url(url: str) -> tuple[str, str, str, str]:
    """"grpc://HOST:PORT/MODEL[/VERSION]" → (scheme, "HOST:PORT", model, version or "")."""
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme.lower() not in SCHEMES or not parts.hostname or parts.port is None \
            or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"expected a model URL like grpc://HOST:PORT/MODEL[/VERSION] or "
                         f"http://HOST:PORT/MODEL[/VERSION], got {url!r}")
    return parts.scheme.lower(), parts.netloc, path[0], path[1] if len(path) == 2 else ""


def _tritonclient(scheme):
    try:
        if scheme == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        import tritonclient.utils as utils
    except ImportError as e:
        raise DeviceUnavailableError(
            f"{scheme}:// models need tritonclient ({e}); install offload's 'triton' extra: "
            "pip install 'offload[triton]'") from None
    return module, utils


def _error(e: BaseException, where: str) -> OffloadError:
    """tritonclient's (or the socket's) exception as an offload error naming the server."""
    if isinstance(e, OffloadError):
        return e
    status = message = ""
    if hasattr(e, "status") and hasattr(e, "message"):  # InferenceServerException
        status, message = str(e.status() or ""), str(e.message() or "")
    text = message or str(e) or type(e).__name__
    low = f"{status} {text}".lower()
    said = f"{where}: {text}"
    if "deadline" in low or "timed out" in low or "timeout" in type(e).__name__.lower() or \
            isinstance(e, TimeoutError):
        return RequestTimeoutError(f"{where}: no answer in time ({text})")
    if "unavailable" in low or "connect" in low or "socket closed" in low or \
            isinstance(e, (ConnectionError, OSError)) or "broken pipe" in low:
        return DeviceUnavailableError(f"{where}: server unavailable ({text})")
    if "unknown model" in low or "unknown version" in low or "not found" in low or \
            "not_found" in low:
        return ModelFormatError(said)
    if "invalid_argument" in low or status == "400" or "shape" in low or "datatype" in low or \
            "batch-size" in low or "byte size" in low or "byte_size" in low:
        return ShapeError(said)
    return DeviceRuntimeError(said)


def _retriable(error: OffloadError) -> bool:
    return isinstance(error, (DeviceUnavailableError, RequestTimeoutError))


class _Region:
    """One system shared-memory region, registered on one server."""

    def __init__(self, endpoint, size: int):
        from tritonclient.utils import shared_memory as shm
        self.size = size
        self.name = f"offload_{os.getpid()}_{next(_ids)}"
        self.key = "/" + self.name
        self.handle = shm.create_shared_memory_region(self.name, self.key, size, create_only=True)
        try:
            endpoint.client().register_system_shared_memory(self.name, self.key, size,
                                                            **endpoint.control_timeout())
        except BaseException:
            shm.destroy_shared_memory_region(self.handle)
            raise

    def destroy(self, endpoint=None):
        from tritonclient.utils import shared_memory as shm
        if endpoint is not None:
            try:
                endpoint.client().unregister_system_shared_memory(
                    self.name, **endpoint.control_timeout())
            except Exception:  # the server is gone: nothing registered to undo
                pass
        shm.destroy_shared_memory_region(self.handle)


class _Endpoint:
    """One server's model: a tritonclient client per thread, requests in flight, the
    shared-memory regions registered there."""

    def __init__(self, url: str, timeout, compression):
        self.url = url
        self.scheme, self.address, self.model, self.version = parse_url(url)
        self.module, self.utils = _tritonclient(self.scheme)
        self.timeout = timeout
        self.compression = compression
        self.in_flight = 0
        self.failed_at = 0.0
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._free: list[_Region] = []
        self._regions: list[_Region] = []

    def client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            if self.scheme == "grpc":
                c = self.module.InferenceServerClient(self.address)
            else:
                t = self.timeout or 60.0
                c = self.module.InferenceServerClient(self.address, connection_timeout=t,
                                                      network_timeout=t)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def control_timeout(self) -> dict:
        """A bound for control calls (shared-memory registration): gRPC takes one per call,
        the HTTP client has its network timeout."""
        return {"client_timeout": self.timeout or 10.0} if self.scheme == "grpc" else {}

    def describe(self) -> tuple[dict, dict]:
        """(model metadata, model config) as dicts; raises an OffloadError."""
        try:
            c = self.client()
            kw = {"as_json": True} if self.scheme == "grpc" else {}
            if self.scheme == "grpc":
                kw["client_timeout"] = self.timeout or 10.0
            if not c.is_model_ready(self.model, self.version, **(
                    {"client_timeout": kw["client_timeout"]} if self.scheme == "grpc" else {})):
                raise ModelFormatError(
                    f"{self.url}: the server has no ready model {self.model!r}"
                    + (f" version {self.version}" if self.version else "")
                    + f" (models there: {self._names()})")
            meta = c.get_model_metadata(self.model, self.version, **kw)
            config = c.get_model_config(self.model, self.version, **kw)
        except Exception as e:
            raise _error(e, self.url) from None
        return meta, config.get("config", config)

    def _names(self) -> list[str]:
        try:
            index = self.client().get_model_repository_index(
                **({"as_json": True} if self.scheme == "grpc" else {}))
            entries = index.get("models", []) if isinstance(index, dict) else index
            return sorted({m.get("name", "?") for m in entries})
        except Exception:
            return ["?"]

    def statistics(self) -> dict:
        kw = {"as_json": True} if self.scheme == "grpc" else {}
        return self.client().get_inference_statistics(self.model, self.version, **kw)

    # -- shared memory ----------------------------------------------------------------------------
    def take_region(self, size: int) -> _Region:
        with self._lock:
            for k, r in enumerate(self._free):
                if r.size >= size:
                    return self._free.pop(k)
            stale = self._free.pop() if self._free else None
        if stale is not None:  # too small: replaced by a larger one
            self._forget(stale)
        region = _Region(self, max(size, 64 * 1024))
        with self._lock:
            self._regions.append(region)
        return region

    def give_region(self, region: _Region, ok: bool) -> None:
        if ok:
            with self._lock:
                self._free.append(region)
        else:  # the server may have lost it (restarted): register a fresh one next time
            self._forget(region)

    def _forget(self, region: _Region):
        with self._lock:
            if region in self._regions:
                self._regions.remove(region)
        region.destroy(self)

    def close(self):
        with self._lock:
            regions, self._regions, self._free = self._regions, [], []
        for r in regions:
            r.destroy(self)
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            try:
                c.close()
            except Exception:
                pass


class RemoteStats:
    """Counters of a remote model (client side) and, on request, the server's."""

    FIELDS = ("calls", "requests", "retries", "errors", "fallbacks", "bytes_sent",
              "bytes_received", "shm_bytes")

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        with self._lock:
            self.values = dict.fromkeys(self.FIELDS, 0)
            self.latency: deque = deque(maxlen=WINDOW)
            self.reasons: dict[str, int] = {}

    def add(self, **counts):
        with self._lock:
            for k, v in counts.items():
                self.values[k] += v

    def fallback(self, reason: str) -> bool:
        with self._lock:
            self.values["fallbacks"] += 1
            first = reason not in self.reasons
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            return first


class RemoteModel:
    """A model served by one or more KServe v2 / Triton servers, with the API of
    :class:`offload.Model`: ``model(x)`` (several inputs by position or a dict by name; several
    outputs come back as a tuple), ``submit`` → Future, ``infer_async``, ``predict``, ``close``,
    ``stats``. Use :func:`offload.load` with a URL or a list of URLs.

    Each request goes to the server with the fewest requests in flight (one that just failed
    last). ``retries``: extra tries on the same server before the next one, for an unavailable
    server or a timeout; a bad request (``ShapeError``, with the server's message) is not
    retried. ``timeout`` (s): per request (gRPC deadline; HTTP network timeout) →
    ``RequestTimeoutError``. ``fallback="cpu"``: when no server answers, run on a local CPU model
    of ``fallback_source`` (an .onnx path or a zoo name; default: the model's name if it is a zoo
    name), counted in ``stats`` (by reason) and warned once. ``shared_memory=True``: tensors go
    through system shared memory regions (for a server on this host), registered once per
    concurrent request slot, reused, unregistered on ``close``. ``compression``: "gzip" or
    "deflate" on the wire. A request of more rows than the server's ``max_batch_size`` is sent
    as several requests. Inputs are checked against the server's metadata before sending."""

    def __init__(self, urls, timeout: float | None = None, retries: int = 1,
                 fallback: str = "error", fallback_source=None, shared_memory: bool = False,
                 compression: str | None = None, workers: int = 16):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if fallback not in ("error", "cpu"):
            raise ValueError(f"fallback must be 'error' or 'cpu', got {fallback!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.endpoints = [_Endpoint(u, timeout, compression) for u in urls]
        if len({(e.model, e.version) for e in self.endpoints}) > 1:
            raise ValueError(f"the URLs name different models: {urls}")
        self.source = urls[0] if len(urls) == 1 else ", ".join(urls)
        self.timeout, self.retries, self.fallback = timeout, retries, fallback
        self.shared_memory = shared_memory
        self._stats = RemoteStats()
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="offload-remote")
        self._closing = False
        self._local_model = None
        self._warned = False
        from . import zoo
        name = self.endpoints[0].model
        self.fallback_source = fallback_source if fallback_source is not None else (
            name if name in zoo.NAMES else None)
        if fallback == "cpu" and self.fallback_source is None:
            raise ValueError(f"fallback='cpu' needs fallback_source= (the model's .onnx file): "
                             f"{name!r} is not a zoo name")
        described, reasons = None, []
        for e in self.endpoints:
            try:
                described = e.describe()
                break
            except OffloadError as err:
                if not _retriable(err) and len(self.endpoints) == 1:
                    self._executor.shutdown()
                    raise
                e.failed_at = time.monotonic()
                reasons.append(err)
        if described is None:
            if fallback != "cpu" or any(not _retriable(r) for r in reasons):
                self._executor.shutdown()
                raise reasons[-1].__class__(
                    "no server answered for the model: " + "; ".join(map(str, reasons)))
            self._fall_back_model("; ".join(map(str, reasons)))
            described = self._describe_local()
        self._set_metadata(*described)

    # -- metadata ---------------------------------------------------------------------------------
    def _set_metadata(self, meta: dict, config: dict):
        from tritonclient.utils import triton_to_np_dtype
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0)
        batched = self.max_batch_size > 0
        self._in = [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
                    for t in meta["inputs"]]
        self._out = [(t["name"], t["datatype"], [int(d) for d in t["shape"]])
                     for t in meta["outputs"]]
        self._np = {dt: np.dtype(triton_to_np_dtype(dt)) for _, dt, _ in self._in + self._out}
        self.inputs = [G.TensorInfo(n, tuple("N" if (d < 0 and (k == 0 and batched)) else
                                              (f"d{k}" if d < 0 else d)
                                              for k, d in enumerate(s)), self._np[dt])
                       for n, dt, s in self._in]
        self.outputs = [n for n, _, _ in self._out]
        self._batched = batched

    def _describe_local(self):
        m = self._local_model
        meta = {"inputs": [{"name": t.name, "datatype": "FP32",
                            "shape": [-1 if not isinstance(d, int) else d for d in t.shape]}
                           for t in m.inputs],
                "outputs": []}
        ones = [tuple(1 if not isinstance(d, int) else d for d in t.shape) for t in m.inputs]
        for name, shape in zip(m.outputs, m.plan(*ones).output_shapes):
            meta["outputs"].append({"name": name, "datatype": "FP32",
                                    "shape": [-1] + list(shape[1:])})
        return meta, {"max_batch_size": 0}

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}: {t.describe()}" for t in self.inputs)
        return f"<offload.RemoteModel {self.source!r} ({ins})>"

    # -- the Model API ----------------------------------------------------------------------------
    def __call__(self, *inputs, **named):
        return self._run_timed(self._prepare(inputs, named), time.perf_counter())

    run = __call__

    def submit(self, *inputs, **named) -> concurrent.futures.Future:
        """Send the request and return at once with a Future of its result; inputs are checked
        now (bad input raises here) and must not change until the future is done."""
        arrays = self._prepare(inputs, named)
        if self._closing:
            raise OffloadError(f"model {self.source!r} is closed")
        return self._executor.submit(self._run_timed, arrays, time.perf_counter())

    async def infer_async(self, *inputs, **named):
        """``await model.infer_async(x)``: the asyncio form of submit."""
        return await asyncio.wrap_future(self.submit(*inputs, **named))

    def predict(self, x, batch_size: int = 1024):
        """Run a large single-input array in requests of ``batch_size`` rows (at most the
        server's max_batch_size), concatenated."""
        x = np.asarray(x)
        if self.max_batch_size:
            batch_size = min(batch_size, self.max_batch_size)
        futures = [self.submit(x[i:i + batch_size]) for i in range(0, max(len(x), 1), batch_size)]
        parts = [f.result() for f in futures]
        if isinstance(parts[0], tuple):
            return tuple(np.concatenate(p) for p in zip(*parts))
        return np.concatenate(parts)

    @property
    def stats(self) -> dict:
        """Client side: calls, requests (to servers), retries, errors, fallbacks (and
        fallback_reasons), bytes_sent/bytes_received (tensor bytes on the wire), shm_bytes
        (through shared memory), latency_p50_s/latency_p99_s (client time per call, last 2048).
        Server side (Triton's statistics extension, for this model on every server that answers,
        from all its clients): server_requests, server_executions (device runs),
        server_inferences (rows), server_queue_s, server_compute_s (input + infer + output)."""
        with self._stats._lock:
            out = dict(self._stats.values)
            latency = np.array(self._stats.latency)
            out["fallback_reasons"] = dict(self._stats.reasons)
        for q in (50, 99):
            out[f"latency_p{q}_s"] = float(np.percentile(latency, q)) if len(latency) else 0.0
        server = dict.fromkeys(("server_requests", "server_executions", "server_inferences",
                                "server_queue_s", "server_compute_s"), 0)
        answered = 0
        for e in self.endpoints:
            try:
                stats = e.statistics()
            except Exception:
                continue
            answered += 1
            for m in stats.get("model_stats", []):
                inf = m.get("inference_stats", {})
                ns = lambda k: int(inf.get(k, {}).get("ns", 0))  # noqa: E731
                server["server_requests"] += int(inf.get("success", {}).get("count", 0))
                server["server_executions"] += int(m.get("execution_count", 0))
                server["server_inferences"] += int(m.get("inference_count", 0))
                server["server_queue_s"] += ns("queue") / 1e9
                server["server_compute_s"] += (ns("compute_input") + ns("compute_infer")
                                               + ns("compute_output")) / 1e9
        out.update(server)
        out["servers_answering"] = answered
        return out

    def reset_stats(self) -> None:
        """Reset the client-side counters (the servers' own are cumulative)."""
        self._stats.reset()

    def close(self, cancel: bool = False) -> None:
        """Finish (``cancel=True``: cancel) pending requests, unregister shared memory, close
        connections; later calls raise."""
        self._closing = True
        self._executor.shutdown(wait=True, cancel_futures=cancel)
        for e in self.endpoints:
            e.close()
        if self._local_model is not None:
            self._local_model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _prepare(self, inputs, named) -> list[np.ndarray]:
        names = [n for n, _, _ in self._in]
        if named and inputs:
            raise ShapeError("pass inputs either by position or by name, not both")
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            named, inputs = dict(inputs[0]), ()
        if named:
            unknown = set(named) - set(names)
            missing = [n for n in names if n not in named]
            if unknown or missing:
                raise ShapeError(f"model inputs are {names}; got names {sorted(named)} (missing "
                                 f"{missing}, unknown {sorted(unknown)})")
            inputs = tuple(named[n] for n in names)
        if len(inputs) != len(self._in):
            raise ShapeError(f"model takes {len(self._in)} input(s) "
                             f"{[t.name + ' ' + t.describe() for t in self.inputs]}, got "
                             f"{len(inputs)}")
        arrays = []
        for k, ((name, dt, shape), spec, x) in enumerate(zip(self._in, self.inputs, inputs)):
            what = f"input {name!r} (#{k})"
            try:
                x = np.asarray(x)
            except Exception as e:
                raise ShapeError(f"{what}: expected an array {spec.describe()}, got "
                                 f"{type(x).__name__} ({e})") from None
            want = self._np[dt]
            if x.dtype != want:
                if want == np.float32 and x.dtype in (np.float64, np.float16):
                    x = x.astype(np.float32)
                else:
                    raise ShapeError(f"{what}: expected dtype {want} ({dt}), got {x.dtype} with "
                                     f"shape {list(x.shape)}")
            if x.ndim != len(shape) or any(d >= 0 and d != s for d, s in zip(shape, x.shape)):
                raise ShapeError(f"{what}: expected shape {spec.describe()}, got "
                                 f"{list(x.shape)} {x.dtype}")
            arrays.append(np.ascontiguousarray(x))
        if self._batched and len({a.shape[0] for a in arrays}) > 1:
            raise ShapeError(f"inputs have different batch sizes: {[a.shape[0] for a in arrays]}")
        return arrays

    def _run_timed(self, arrays, since):
        self._stats.add(calls=1)
        try:
            rows = arrays[0].shape[0] if self._batched else 0
            if self._batched and rows > self.max_batch_size:
                m = self.max_batch_size
                parts = [self._infer([a[i:i + m] for a in arrays]) for i in range(0, rows, m)]
                results = [np.concatenate(p) for p in zip(*parts)]
            else:
                results = self._infer(arrays)
        except OffloadError:
            self._stats.add(errors=1)
            raise
        with self._stats._lock:
            self._stats.latency.append(time.perf_counter() - since)
        return results[0] if len(results) == 1 else tuple(results)

    def _order(self) -> list[_Endpoint]:
        with self._lock:
            now = time.monotonic()
            return sorted(self.endpoints, key=lambda e: (now - e.failed_at < 2.0, e.in_flight))

    def _infer(self, arrays) -> list[np.ndarray]:
        if self._local_model is not None and self.fallback == "cpu" and \
                all(time.monotonic() - e.failed_at < 2.0 for e in self.endpoints):
            return self._run_local(arrays, "every server failed in the last 2 s")
        errors = []
        for e in self._order():
            for attempt in range(1 + self.retries):
                if attempt or errors:
                    self._stats.add(retries=1)
                with self._lock:
                    e.in_flight += 1
                try:
                    return self._send(e, arrays)
                except Exception as exc:
                    error = _error(exc, e.url)
                    if not _retriable(error):
                        raise error from None
                    errors.append(error)
                    e.failed_at = time.monotonic()
                finally:
                    with self._lock:
                        e.in_flight -= 1
                if attempt < self.retries:
                    time.sleep(0.01 * (attempt + 1))
        if self.fallback == "cpu":
            return self._run_local(arrays, str(errors[-1]).split(" (")[0])
        last = errors[-1]
        raise last.__class__(f"{len(errors)} tries failed; last: {last}") from None

    def _send(self, e: _Endpoint, arrays) -> list[np.ndarray]:
        module = e.module
        client = e.client()
        rows = arrays[0].shape[0] if self._batched else None
        region = None
        ok = False
        try:
            ins, outs, offsets = [], [], []
            if self.shared_memory:
                shapes = [([rows] + s[1:]) if self._batched else s for _, _, s in self._out]
                if all(d >= 0 for s in shapes for d in s):
                    nbytes = [int(np.prod(s)) * self._np[dt].itemsize
                              for s, (_, dt, _) in zip(shapes, self._out)]
                    region = e.take_region(sum(a.nbytes for a in arrays) + sum(nbytes))
            offset = 0
            for (name, dt, _), a in zip(self._in, arrays):
                i = module.InferInput(name, list(a.shape), dt)
                if region is not None:
                    from tritonclient.utils import shared_memory as shm
                    shm.set_shared_memory_region(region.handle, [a], offset)
                    i.set_shared_memory(region.name, a.nbytes, offset)
                    offset += a.nbytes
                else:
                    i.set_data_from_numpy(a)
                ins.append(i)
            for k, (name, dt, _) in enumerate(self._out):
                o = module.InferRequestedOutput(name)
                if region is not None:
                    o.set_shared_memory(region.name, nbytes[k], offset)
                    offsets.append(offset)
                    offset += nbytes[k]
                outs.append(o)
            kw = {}
            if e.scheme == "grpc":
                if e.timeout is not None:
                    kw["client_timeout"] = e.timeout
                if e.compression:
                    kw["compression_algorithm"] = e.compression
            elif e.compression:
                kw["request_compression_algorithm"] = e.compression
                kw["response_compression_algorithm"] = e.compression
            try:
                result = client.infer(e.model, ins, model_version=e.version, outputs=outs, **kw)
            except Exception as exc:
                text = str(exc.message() if hasattr(exc, "message") else exc)
                if region is not None and region.name in text:  # lost: a restarted server
                    raise DeviceUnavailableError(f"{e.url}: the server lost shared-memory region "
                                                 f"{region.name} ({text})") from None
                raise
            self._stats.add(requests=1)
            values = []
            if region is not None:
                from tritonclient.utils import shared_memory as shm
                for k, (name, dt, _) in enumerate(self._out):
                    out = result.get_output(name)
                    shape = [int(d) for d in (out["shape"] if isinstance(out, dict)
                                              else out.shape)]
                    view = shm.get_contents_as_numpy(region.handle, self._np[dt], shape,
                                                     offsets[k])
                    values.append(np.array(view))
                    del view
                self._stats.add(shm_bytes=offset)
            else:
                values = [result.as_numpy(name) for name, _, _ in self._out]
                self._stats.add(bytes_sent=sum(a.nbytes for a in arrays),
                                bytes_received=sum(v.nbytes for v in values))
            ok = True
            return values
        finally:
            if region is not None:
                e.give_region(region, ok)

    def _fall_back_model(self, reason: str):
        with self._lock:
            if self._local_model is None:
                from . import load
                self._local_model = load(self.fallback_source, device="cpu")
        return self._local_model

    def _run_local(self, arrays, reason: str) -> list[np.ndarray]:
        model = self._fall_back_model(reason)
        self._stats.fallback(reason)
        if not self._warned:  # warned once; every fallback is counted, by reason
            self._warned = True
            warnings.warn(f"offload: no server answered for {self.source} ({reason}); running "
                          f"{self.fallback_source} on the local cpu device (fallback='cpu')",
                          RuntimeWarning, stacklevel=4)
        result = model.run(*[arrays[self._in_order(t.name)] for t in model.inputs]) \
            if hasattr(self, "_in") else model.run(*arrays)
        results = result if isinstance(result, tuple) else (result,)
        by_name = dict(zip(model.outputs, results))
        return [by_name[n] for n in self.outputs]

    def _in_order(self, name: str) -> int:
        return [n for n, _, _ in self._in].index(name)


def load(urls, timeout: float | None = None, retries: int = 1, fallback: str = "error",
         fallback_source=None, shared_memory: bool = False, compression: str | None = None,
         workers: int = 16) -> RemoteModel:
    """A :class:`RemoteModel` for a URL or a list of URLs of one model (see there)."""
    return RemoteModel(urls, timeout, retries, fallback, fallback_source, shared_memory,
                       compression, workers)
