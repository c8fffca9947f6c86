"""In-process dynamic batching: requests from many threads merged into one device call.

A Batcher owns one worker thread. Requests wait in a queue per sample shape (the shapes of the
inputs without their batch axis; requests of different sample shapes are never merged). The
worker takes the oldest waiting request, gathers more of the same sample shape until
``max_batch`` rows are reached or ``max_delay_us`` has passed since that request arrived, runs
them as one batch, and hands each caller exactly its own rows. Requests that arrived while the
previous batch ran have waited already: they go at once, with whatever else is queued (under load
the device is never left idle to fill a batch). A request larger than
``max_batch`` is split into pieces that are batched like any other and joined again.
"""

from __future__ import annotations

import concurrent.futures
import numbers
import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from . import _core, hostmem
from .errors import ArgumentError, DeviceMemoryError, OffloadError

MAX_BATCH = 2**31 - 1  # rows: device kernels index a batch with 32-bit integers
MAX_DELAY_US = 60e6  # one minute: a request waits at most this long for others to join it
LONELY_AFTER = 4    # batches of one request in a row before requests stop waiting for company
LONELY_PROBE = 16   # ... except one batch in this many, which still waits


@dataclass(frozen=True)
class Batching:
    """How to merge requests: at most ``max_batch`` rows (an int, 1 to 2**31 - 1), waiting at
    most ``max_delay_us`` microseconds (a finite number, 0 to 6e7: one minute) for more
    requests after the first one arrives. Other values raise ArgumentError here, not later in
    the batcher's thread. A large ``max_batch`` costs nothing by itself: batches (and their
    staging memory) are sized by the rows actually queued."""

    max_batch: int = 64
    max_delay_us: float = 500.0

    def __post_init__(self):
        b, d = self.max_batch, self.max_delay_us
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise ArgumentError(f"Batching.max_batch: expected an int (rows), got "
                                f"{type(b).__name__} {b!r}")
        if not 1 <= b <= MAX_BATCH:
            raise ArgumentError(f"Batching.max_batch must be between 1 and {MAX_BATCH} rows, "
                                f"got {b}")
        if isinstance(d, bool) or not isinstance(d, numbers.Real):
            raise ArgumentError(f"Batching.max_delay_us: expected a number (microseconds), got "
                                f"{type(d).__name__} {d!r}")
        if not 0 <= d <= MAX_DELAY_US:  # also refuses nan and inf
            raise ArgumentError(f"Batching.max_delay_us must be between 0 and {MAX_DELAY_US:g} "
                                f"(one minute), got {d}")
        object.__setattr__(self, "max_batch", int(b))
        object.__setattr__(self, "max_delay_us", float(d))


class _Request:
    __slots__ = ("arrays", "rows", "future", "arrived", "finish", "owner", "key")

    def __init__(self, arrays, future, finish, arrived=None, owner=None, rows=None, key=None):
        self.arrays = arrays
        self.rows = arrays[0].shape[0] if rows is None else rows
        self.future = future
        self.finish = finish  # turns this request's list of outputs into its result
        self.arrived = time.perf_counter() if arrived is None else arrived
        self.owner = owner  # what runs it (the model), held while the request waits
        # the sample shapes: requests with the same key are merged
        self.key = tuple(a.shape[1:] for a in arrays) if key is None else key


class Batcher:
    """Merges requests for ``execute(arrays, queue_wait_s) -> list of output arrays`` (one run
    of the model on a batch) and splits the results back to each request's future, whose result
    is ``finish(list of its outputs)``. ``record(latency_s, wait_s)`` is told of every request
    answered.

    When ``execute`` is a bound method (``model._execute_batch``), the batcher holds its object
    weakly: only waiting requests keep it alive, so a model that is dropped without ``close()``
    is collected, and its batcher's threads stop. A failure in a worker thread fails every
    request it holds or that waits with an OffloadError (never a silent death, never a hang)."""

    def __init__(self, execute, config: Batching, record=None, finish=None,
                 name: str = "offload-batcher", workers: int = 1):
        if not isinstance(config, Batching):
            raise ArgumentError(f"batching: expected offload.Batching(max_batch, max_delay_us), "
                                f"got {type(config).__name__} {config!r}")
        owner = getattr(execute, "__self__", None)
        if owner is not None and hasattr(execute, "__func__"):
            self._owner, self._execute = weakref.ref(owner), execute.__func__
        else:
            self._owner, self._execute = None, execute
        self._record = record or (lambda latency_s, wait_s: None)
        self._finish = finish or (lambda outputs: outputs[0] if len(outputs) == 1
                                  else tuple(outputs))
        self.max_batch = config.max_batch
        self.max_delay_s = config.max_delay_us * 1e-6
        self._queues: dict[tuple, deque] = {}
        self._rows: dict[tuple, int] = {}  # rows waiting per sample shape
        # workers waiting with nothing queued: only they (or a full batch) need a notify; a
        # worker waiting for a batch to fill wakes at its deadline, not at every request
        self._idle = 0
        self._cond = threading.Condition()
        self._closed = False
        self._broken: OffloadError | None = None  # why the worker threads stopped
        self._free_since = 0.0  # when the worker finished its last batch
        # consecutive batches of a single request: after a few, a request stops waiting for
        # company that does not come (one caller is then not delayed by max_delay_us at every
        # call); one batch in LONELY_PROBE still waits, to notice callers that come back
        self._lonely = 0
        self.batches = 0  # device calls made
        self.requests = 0  # requests (pieces) served
        # one worker per device, so that several devices each run a batch at once
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{k}", daemon=True)
                         for k in range(max(1, int(workers)))]
        try:
            for t in self._threads:
                t.start()
        except RuntimeError as e:  # "can't start new thread": no batcher, said now
            self._stop(weakref.ref(self))
            for t in self._threads:
                if t.ident is not None:
                    t.join()
            raise OffloadError(f"could not start the batcher thread {name}: {e}") from None
        if self._owner is not None:  # the owner collected: stop (nothing waits: see _Request)
            f = weakref.finalize(owner, Batcher._stop, weakref.ref(self))
            f.atexit = False

    @staticmethod
    def _stop(ref):
        """Stop the workers without waiting for them (may run in any thread, from the GC)."""
        self = ref()
        if self is not None:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    # -- callers -------------------------------------------------------------------------------
    def submit(self, arrays: list[np.ndarray]) -> concurrent.futures.Future:
        if len(arrays) == 1:  # the common case, without building sets and generators
            shape = arrays[0].shape
            n, key = shape[0], (shape[1:],)
        else:
            rows = {a.shape[0] for a in arrays}
            if len(rows) != 1:
                raise OffloadError(f"batched inputs must share the batch axis; got batch sizes "
                                   f"{[a.shape[0] for a in arrays]}")
            n, key = rows.pop(), None
        owner = self._owner() if self._owner is not None else None
        if n <= self.max_batch:
            future = concurrent.futures.Future()
            request = _Request(arrays, future, self._finish, None, owner, n, key)
            with self._cond:
                if self._broken is not None or self._closed:
                    self._refuse()
                queue = self._queues.get(request.key)
                if queue is None:
                    queue = self._queues[request.key] = deque()
                queue.append(request)
                rows = self._rows[request.key] = self._rows.get(request.key, 0) + n
                if self._idle or rows >= self.max_batch:
                    self._cond.notify()
            return future
        now = time.perf_counter()
        pieces = [_Request([a[i:i + self.max_batch] for a in arrays], concurrent.futures.Future(),
                           list, now, owner) for i in range(0, n, self.max_batch)]
        joined = _joined([p.future for p in pieces], self._finish)
        self._enqueue(pieces)
        return joined

    def _refuse(self):
        if self._broken is not None:
            raise OffloadError(*self._broken.args)
        raise OffloadError("the model is closed: no new requests")

    def _enqueue(self, requests):
        with self._cond:
            if self._broken is not None or self._closed:
                self._refuse()
            for r in requests:
                self._queues.setdefault(r.key, deque()).append(r)
                self._rows[r.key] = self._rows.get(r.key, 0) + r.rows
            self._cond.notify()

    def close(self, cancel: bool = False) -> None:
        """Stop taking requests; finish the waiting ones (or cancel them); join the worker."""
        dropped = []
        with self._cond:
            self._closed = True
            if cancel:
                for queue in self._queues.values():
                    dropped.extend(queue)
                self._queues.clear()
                self._rows.clear()
            self._cond.notify_all()
        for r in dropped:  # outside the lock: the last reference to the model may go here
            r.future.cancel()
        del dropped
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    # -- the worker ----------------------------------------------------------------------------
    def _take_batch(self):
        """Block until a batch is due; return its requests (or None when closed and drained)."""
        with self._cond:
            while True:
                waiting = [(q[0].arrived, key) for key, q in self._queues.items() if q]
                if not waiting:
                    if self._closed:
                        return None
                    self._idle += 1
                    try:
                        self._cond.wait()
                    finally:
                        self._idle -= 1
                    continue
                first, key = min(waiting) if len(waiting) > 1 else waiting[0]
                queue = self._queues[key]
                patient = self._lonely < LONELY_AFTER or self._lonely % LONELY_PROBE == 0
                if (patient and first >= self._free_since and not self._closed
                        and self._rows[key] < self.max_batch):
                    due = first + self.max_delay_s
                    now = time.perf_counter()
                    if now < due:
                        self._cond.wait(due - now)
                        continue
                batch, total = [], 0
                while queue and total + queue[0].rows <= self.max_batch:
                    r = queue.popleft()
                    batch.append(r)
                    total += r.rows
                self._rows[key] -= total
                self._lonely = self._lonely + 1 if len(batch) == 1 else 0
                return batch

    def _loop(self):
        batch = None
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    return
                live = [r for r in batch if r.future.set_running_or_notify_cancel()]
                if live:
                    self._run(live)
                # the requests (and the model they hold) go now, not when the next batch comes
                batch = live = None
                self._free_since = time.perf_counter()
        except BaseException as e:  # noqa: BLE001 - a bug or a failure outside any request
            self._fail_all(e, batch or [])

    def _fail_all(self, error, batch):
        """The worker cannot go on: fail its batch and every waiting request, refuse new ones."""
        broken = OffloadError(f"the batcher thread {threading.current_thread().name} failed "
                              f"({type(error).__name__}: {error}); the model takes no more "
                              "batched requests")
        broken.__cause__ = error
        with self._cond:
            self._broken = self._broken or broken
            self._closed = True
            waiting = [r for q in self._queues.values() for r in q]
            self._queues.clear()
            self._rows.clear()
            self._cond.notify_all()
        for r in list(batch) + waiting:
            _fail(r.future, broken)

    def bucket(self, rows: int) -> int:
        """Rows of the device run for ``rows`` requested: a multiple of a step that is
        max_batch/8 (so that under load a sample shape needs few plans and at most max_batch/8
        rows are padding) but never more than the next power of two of ``rows`` (so a few rows
        are never padded to a large max_batch: batches and arenas follow what is queued)."""
        step = max(1, min(self.max_batch // 8, 1 << (rows - 1).bit_length()))
        return min(self.max_batch, -(-rows // step) * step)

    def _gather(self, batch):
        """The batch's inputs in one block per input (one copy), padded with zero rows."""
        rows = sum(r.rows for r in batch)
        size = self.bucket(rows)
        if len(batch) == 1 and size == rows:
            return batch[0].arrays
        merged = []
        for k in range(len(batch[0].arrays)):
            parts = [r.arrays[k] for r in batch]
            block = None
            shape = (size,) + parts[0].shape[1:]
            try:
                if parts[0].dtype == np.float32:
                    # native: one memcpy each, zero rows after, GIL released; -1 (nothing
                    # written) unless every part is C-contiguous float32 of the sample shape
                    block = _ARENA.take(shape)
                    if _core.gather(block, parts, strict=False) < 0:
                        block = None
                if block is None:
                    block = np.empty(shape, np.result_type(*parts))
                    np.concatenate(parts, out=block[:rows])
                    block[rows:] = 0
            except MemoryError:
                raise DeviceMemoryError(f"host memory: cannot allocate the merged batch of "
                                        f"{len(batch)} requests, shape {list(shape)}") from None
            merged.append(block)
        return merged

    def _run(self, batch):
        started = time.perf_counter()
        try:
            wait = started - sum(r.arrived for r in batch) / len(batch)
            arrays = self._gather(batch)
            if self._owner is None:
                outputs = self._execute(arrays, wait)
            else:  # the owner is alive: each waiting request holds it
                outputs = self._execute(batch[0].owner, arrays, wait)
            del arrays
            if len(batch) == 1:
                results = [batch[0].finish([o[:batch[0].rows] for o in outputs])]
            else:
                offset, results = 0, []
                for r in batch:
                    end = offset + r.rows
                    results.append(r.finish([o[offset:end] for o in outputs]))
                    offset = end
        except BaseException as e:  # noqa: BLE001 - the error belongs to exactly these callers
            error = e if isinstance(e, OffloadError) else _wrapped(e)
            for r in batch:
                _fail(r.future, error)
            return
        self.batches += 1
        self.requests += len(batch)
        done = time.perf_counter()
        for r, result in zip(batch, results):
            if r.finish is not list:  # pieces of a split request are counted once, when joined
                try:
                    self._record(done - r.arrived, started - r.arrived)
                except Exception:  # noqa: BLE001 - a statistic must not lose the answer
                    pass
            r.future.set_result(result)


class _Arena:
    """Reusable 4 KiB-aligned float32 staging blocks for merged batches, a few per shape.

    Reuse is safe only when nothing refers to a block any more. After ``_run`` the batch array
    is gone from the batcher, but others may still hold it: a device that reads the input in
    place can keep it bound (the CPU plan, an OpenCL buffer made with CL_MEM_USE_HOST_PTR) or
    still read it after returning; an output may be a view of the input (an Identity or Reshape
    model), and those rows go to the callers, who keep them as long as they like. Every such
    holder keeps the block's owner (a ``_core.HostBuffer``) referenced: arrays and views through
    their memoryview base, DLPack consumers directly. So a pooled block is handed out again only
    when its owner's reference count shows nobody but the pool; otherwise a new block is made
    (and pooled while the pool has room). Never more than ``per_shape`` blocks per shape,
    ``shapes`` shapes (least recently used dropped) and ``max_bytes`` in all are kept.
    """

    def __init__(self, per_shape: int = 4, shapes: int = 16, max_bytes: int = 64 << 20):
        self.per_shape, self.shapes, self.max_bytes = per_shape, shapes, max_bytes
        self._pools: OrderedDict[tuple, list] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # one Batcher worker per device: several take at once

    def take(self, shape: tuple) -> np.ndarray:
        """An uninitialised float32 array of ``shape`` that nobody else refers to."""
        with self._lock:
            pool = self._pools.get(shape)
            if pool is None:
                pool = self._pools[shape] = []
                while len(self._pools) > self.shapes:
                    _, dropped = self._pools.popitem(last=False)
                    self._bytes -= sum(b.nbytes for b in dropped)
            else:
                self._pools.move_to_end(shape)
            free = _core.unshared(pool)  # a block only the pool refers to
            if free >= 0:
                return np.asarray(pool[free])  # made under the lock: now referenced
            owner = hostmem.buffer(shape, "<f4")
            if len(pool) < self.per_shape and self._bytes + owner.nbytes <= self.max_bytes:
                pool.append(owner)
                self._bytes += owner.nbytes
            return np.asarray(owner)


_ARENA = _Arena()


def _joined(futures, finish) -> concurrent.futures.Future:
    """One future for the pieces of a split request: their outputs concatenated in order."""
    joined = concurrent.futures.Future()
    joined.set_running_or_notify_cancel()
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_):
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        try:
            parts = [f.result() for f in futures]
            result = finish([np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))])
        except concurrent.futures.CancelledError:
            _fail(joined, OffloadError("part of a split request was cancelled"))
        except BaseException as e:  # noqa: BLE001 - a failed piece, or joining failed
            _fail(joined, e if isinstance(e, OffloadError) else _wrapped(e))
        else:
            joined.set_result(result)

    for f in futures:
        f.add_done_callback(done)
    return joined


def _wrapped(error: BaseException) -> OffloadError:
    """An unexpected exception in the batcher as the typed error its callers get."""
    kind = DeviceMemoryError if isinstance(error, MemoryError) else OffloadError
    wrapped = kind(f"batched run failed: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def _fail(future, error) -> None:
    try:
        future.set_exception(error)
    except concurrent.futures.InvalidStateError:  # answered (or cancelled) already
        pass
