"""In-process dynamic batching: requests from many threads merged into one device call.

A Batcher owns one worker thread. Requests wait in a queue per sample shape (the shapes of the
inputs without their batch axis; requests of different sample shapes are never merged). The
worker takes the oldest waiting request, gathers more of the same sample shape until
``max_batch`` rows are reached or ``max_delay_us`` has passed since that request arrived, runs
them as one batch, and hands each caller exactly its own rows. Requests that arrived while the
previous batch ran have waited already: they go at once, with whatever else is queued (under load
the device is never left idle to fill a batch). A request larger than
``max_batch`` is split into pieces that are batched like any other and joined again.

A batch formed while the device is free waits for company (up to ``max_delay_us``) only until
it has as many requests as such batches had lately (LONELY_AFTER, LONELY_PROBE): callers that
wait for their answers (one alone, or a few threads) are not made to wait ``max_delay_us`` at
every call, and a caller alone runs its call in its own thread (``Batcher.call``).

What a request costs is Python work, so it is kept to a few objects: a ``Future`` (a
concurrent.futures.Future without a Condition of its own, see below) and a tuple in the queue of
its sample shape. The worker marks a batch running, answers it and records its statistics under
one acquisition of the batcher's lock each, not one per request; one-row requests get their rows
as views made in one pass over the outputs.
"""

from __future__ import annotations

import concurrent.futures
import numbers
import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import CancelledError, InvalidStateError
from concurrent.futures._base import (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING,
                                      RUNNING)
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from . import _core, hostmem
from .errors import ArgumentError, DeviceMemoryError, OffloadError

MAX_BATCH = 2**31 - 1  # rows: device kernels index a batch with 32-bit integers
MAX_DELAY_US = 60e6  # one minute: a request waits at most this long for others to join it
# A batch formed while the device is free waits max_delay_us for company, unless the last
# LONELY_AFTER such batches all waited and none reached more than k requests: then a batch goes
# as soon as it has k (the callers there are: one caller alone goes at once, 8 threads calling
# synchronously go when all 8 are in), except one batch in LONELY_PROBE, which still waits its
# full delay, to notice callers that come (a larger batch then raises k at once).
LONELY_AFTER = 4
LONELY_PROBE = 16


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



_DONE = (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED)


class Future(concurrent.futures.Future):
    """The concurrent.futures.Future of a batched request (what ``Model.submit`` returns),
    cheaper to make and to answer than the standard one and the same to its users: ``result``,
    ``exception``, ``cancel``, ``done``, done callbacks, ``concurrent.futures.wait`` and
    ``as_completed``, ``asyncio.wrap_future``.

    A standard Future makes a Condition (and the RLock inside it) per request, which cost more
    than the rest of a request. Here the futures of one batcher share its Condition as
    ``_condition``, used as a lock only (``wait``/``as_completed`` acquire and release it, and
    so do the inherited ``done``, ``add_done_callback``, ...); a caller that has to wait for the
    answer blocks on a lock made for it then (``_wake``), released once when the future is done
    and passed on by each waiter to the next. The batcher marks a batch running and answers it
    under one acquisition of its lock each (``Batcher._take_batch``, ``Batcher._settle``)."""

    _state = PENDING
    _result = None
    _exception = None
    _wake = None  # made by the first caller that waits; released when the future is done

    def __init__(self, condition):  # noqa: D107 - concurrent.futures.Future's init, lighter
        self._condition = condition
        self._waiters = []
        self._done_callbacks = []

    def _wait(self, timeout):
        """This future's state once it is done, waiting at most ``timeout`` seconds."""
        lock = self._condition
        with lock:
            state = self._state
            if state in _DONE:
                return state
            wake = self._wake
            if wake is None:
                wake = self._wake = threading.Lock()
                wake.acquire()
        if wake.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            wake.release()  # for the next caller waiting on this future, if any
            return self._state  # set before the wake was released
        with lock:
            state = self._state
        if state not in _DONE:
            raise TimeoutError()
        return state

    def result(self, timeout=None):
        lock = self._condition
        lock.acquire()
        state = self._state
        lock.release()
        if state is not FINISHED and self._wait(timeout) is not FINISHED:
            raise CancelledError()
        error = self._exception
        if error is not None:
            try:
                raise error
            finally:
                error = self = None  # no reference cycle through the traceback
        return self._result

    def exception(self, timeout=None):
        lock = self._condition
        lock.acquire()
        state = self._state
        lock.release()
        if state is not FINISHED and self._wait(timeout) is not FINISHED:
            raise CancelledError()
        return self._exception

    def cancel(self):
        with self._condition:
            state = self._state
            if state is RUNNING or state is FINISHED:
                return False
            if state is CANCELLED or state is CANCELLED_AND_NOTIFIED:
                return True
            self._state = CANCELLED
            if self._wake is not None:
                self._wake.release()
        self._invoke_callbacks()
        return True

    def _answer_locked(self, value, failed: bool):
        """Under the lock (a pending or running future): the outcome set and ``wait()``'s
        waiters told; returns the wake lock to release once the lock is let go."""
        if failed:
            self._exception = value
        else:
            self._result = value
        self._state = FINISHED
        for waiter in self._waiters:
            (waiter.add_exception if failed else waiter.add_result)(self)
        return self._wake

    def _answer(self, value, failed: bool):
        with self._condition:
            if self._state in _DONE:
                raise InvalidStateError(f"{self._state}: {self!r}")
            wake = self._answer_locked(value, failed)
        if wake is not None:
            wake.release()
        self._invoke_callbacks()

    def set_result(self, result):
        self._answer(result, False)

    def set_exception(self, exception):
        self._answer(exception, True)


def _unwrap(outputs):
    """A request's result from the list of its outputs: the array, or a tuple of them."""
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


class Batcher:
    """Merges requests for ``execute(arrays, queue_wait_s) -> list of output arrays`` (one run
    of the model on a batch) and splits the results back to each request's future, whose result
    is ``finish(list of its outputs)`` (default: the array, or a tuple of them).
    ``record(latencies_s, waits_s)`` is told of the requests answered by each batch (two lists,
    one entry per request).

    When ``execute`` is a bound method (``model._execute_batch``), the batcher holds its object
    weakly: it holds it strongly only while requests wait, so a model that is dropped without
    ``close()`` is collected, and its batcher's threads stop. A failure in a worker thread fails
    every request it holds or that waits with an OffloadError (never a silent death, never a
    hang)."""

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
        self._record = record
        self._finish = finish or _unwrap
        self.max_batch = config.max_batch
        self.max_delay_s = config.max_delay_us * 1e-6
        # queue entries: (future, arrays, rows, arrived, split or None); only non-empty queues
        self._queues: dict[tuple, deque] = {}
        self._rows: dict[tuple, int] = {}  # rows waiting per sample shape
        self._keep = None  # the owner (the model), held while requests are queued
        self._splits = 0  # split requests not answered yet (their pieces are not recorded)
        # workers waiting with nothing queued: only they (or a full batch) need a notify; a
        # worker waiting for a batch to fill wakes at its deadline, not at every request
        self._idle = 0
        # one lock for the queues and the futures' states (Future._condition)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._broken: OffloadError | None = None  # why the worker threads stopped
        self._free_since = 0.0  # when the worker's last batch had its outputs
        # the requests in the last LONELY_AFTER batches formed while the device was free, and
        # what they say: a batch goes once it has _expect requests (0: it waits max_delay_us);
        # _early counts the batches that went so since the last that waited (the probe)
        self._company: deque = deque(maxlen=LONELY_AFTER)
        self._expect = 0
        self._early = 0
        self._notify_at = 0  # queued requests at which a worker waiting for company is woken
        self._running = 0  # batches running: taken by a worker, or run by a caller (call())
        self._inline = 0  # of them, run by a caller
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
        if self._owner is not None:  # the owner collected: stop (nothing waits: see _keep)
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
    def submit(self, arrays) -> Future:
        """A Future of the outputs for ``arrays`` (the model's inputs, each with the batch axis
        first)."""
        if len(arrays) == 1:  # the common case, without building sets and generators
            shape = arrays[0].shape
            n, key = shape[0], shape[1:]
        else:
            rows = {a.shape[0] for a in arrays}
            if len(rows) != 1:
                raise OffloadError(f"batched inputs must share the batch axis; got batch sizes "
                                   f"{[a.shape[0] for a in arrays]}")
            n, key = rows.pop(), tuple(a.shape[1:] for a in arrays)
        if n > self.max_batch:
            return self._submit_split(arrays, n, key)
        future = Future(self._cond)
        entry = (future, arrays, n, perf_counter(), None)
        with self._lock:
            queue = self._queue_for(key)
            queue.append(entry)
            rows = self._rows[key] = self._rows[key] + n
            if self._idle or rows >= self.max_batch or len(queue) == self._notify_at:
                self._cond.notify()
        return future

    def _queue_for(self, key) -> deque:
        """Under the lock, for a new request: the queue of its sample shape (made, and the
        owner held, when it is the first); refused when closed."""
        if self._closed:
            self._refuse()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._rows[key] = 0
            if self._keep is None and self._owner is not None:
                self._keep = self._owner()
        return queue

    def call(self, arrays):
        """``submit(arrays).result()``, for a caller that waits for its answer (``model(x)``).

        A caller alone (the company expected is one request, see LONELY_AFTER), with nothing
        queued and no batch running, runs its request here, in its own thread: handing it to
        the worker and the answer back would wake two threads, which costs more than the run
        of a small model. It counts as a batch that went early; the probe still goes through
        the worker and waits, so that callers who come are noticed."""
        n = arrays[0].shape[0]
        if (self._expect == 1 and not self._queues and not self._running and n <= self.max_batch
                and (len(arrays) == 1 or all(a.shape[0] == n for a in arrays))):  # else submit
            with self._lock:
                alone = (self._expect == 1 and not self._queues and not self._running
                         and self._early < LONELY_PROBE - 1 and not self._closed)
                if alone:
                    self._running += 1
                    self._inline += 1
                    self._early += 1
                    if self._keep is None and self._owner is not None:
                        self._keep = self._owner()
                    owner = self._keep
            if alone:
                return self._run_here(arrays, n, owner)
        return self.submit(arrays).result()

    def _run_here(self, arrays, n, owner):
        started = perf_counter()
        try:
            merged = self._gather([arrays], n)
            if self._owner is None:
                outputs = self._execute(merged, 0.0)
            else:
                outputs = self._execute(owner, merged, 0.0)
            del merged, owner
            result = self._finish([o[:n] for o in outputs])
        except Exception as e:  # typed, as the worker gives it (KeyboardInterrupt goes as is)
            if isinstance(e, OffloadError):
                raise
            raise _wrapped(e) from e
        finally:
            with self._lock:
                self._running -= 1
                self._inline -= 1
                self._free_since = done = perf_counter()
                if not self._queues:
                    self._keep = None
                if self._closed:
                    self._cond.notify_all()  # close() waits for runs in callers' threads
        self.batches += 1
        self.requests += 1
        self._recorded([done - started], [0.0])
        return result

    def _recorded(self, latencies_s, waits_s) -> None:
        """The statistics told of answered requests (a failure there must not lose answers)."""
        if self._record is not None:
            try:
                self._record(latencies_s, waits_s)
            except Exception:  # noqa: BLE001
                pass

    def _submit_split(self, arrays, n, key):
        """A request over max_batch rows: pieces of max_batch rows, batched like any other and
        joined again into one future (recorded once in the statistics, when joined)."""
        now = perf_counter()
        step = self.max_batch
        pieces = [Future(self._cond) for _ in range(0, n, step)]
        split = _Split(self, pieces, now)
        entries = [(f, [a[i:i + step] for a in arrays], min(step, n - i), now, split)
                   for f, i in zip(pieces, range(0, n, step))]
        with self._lock:
            self._queue_for(key).extend(entries)
            self._rows[key] += n
            self._splits += 1
            self._cond.notify()
        return split.future

    def _refuse(self):
        if self._broken is not None:
            raise OffloadError(*self._broken.args)
        raise OffloadError("the model is closed: no new requests")

    def close(self, cancel: bool = False) -> None:
        """Stop taking requests; finish the waiting ones (or cancel them); join the worker."""
        dropped, keep = [], None
        with self._cond:
            self._closed = True
            if cancel:
                for queue in self._queues.values():
                    dropped.extend(queue)
                self._queues.clear()
                self._rows.clear()
                keep, self._keep = self._keep, None
            self._cond.notify_all()
            while self._inline:  # runs in callers' threads (call()) finish first
                self._cond.wait()
        for entry in dropped:  # outside the lock: callbacks may run here
            entry[0].cancel()
            entry[0].set_running_or_notify_cancel()  # concurrent.futures.wait() is told
        del dropped, keep  # the last reference to the model may go here
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    # -- the worker ----------------------------------------------------------------------------
    def _take_batch(self):
        """Block until a batch is due; return (its entries, marked running, and the owner), or
        None when closed and drained. Requests cancelled while they waited are told and left
        out."""
        with self._cond:
            queues = self._queues
            while True:
                if not queues:
                    if self._closed:
                        return None
                    self._idle += 1
                    try:
                        self._cond.wait()
                    finally:
                        self._idle -= 1
                    continue
                if len(queues) == 1:
                    for key, queue in queues.items():
                        first = queue[0][3]
                else:
                    first, key = min((q[0][3], k) for k, q in queues.items())
                    queue = queues[key]
                # formed while the device is free (requests that came while it ran have waited
                # already, and go at once with whatever else is queued): wait for company, up
                # to max_delay_us, or until the company expected is there
                free, early = first >= self._free_since, False
                if free and not self._closed and self._rows[key] < self.max_batch:
                    expect = self._expect if self._early < LONELY_PROBE - 1 else 0
                    if expect and len(queue) >= expect:
                        early = True
                    else:
                        due = first + self.max_delay_s
                        now = perf_counter()
                        if now < due:
                            self._notify_at = expect
                            self._cond.wait(due - now)
                            self._notify_at = 0
                            continue
                batch, total, taken, limit = [], 0, 0, self.max_batch
                while queue and total + queue[0][2] <= limit:
                    entry = queue.popleft()
                    future = entry[0]
                    taken += entry[2]
                    if future._state is PENDING:
                        future._state = RUNNING
                        batch.append(entry)
                        total += entry[2]
                    else:  # cancelled while it waited: concurrent.futures.wait() is told
                        future.set_running_or_notify_cancel()
                if queue:
                    self._rows[key] -= taken
                else:
                    del queues[key], self._rows[key]
                owner = self._keep
                if not queues:
                    self._keep = None
                if free:
                    self._learn(len(batch), early)
                if batch:
                    self._running += 1
                return batch, owner

    def _learn(self, requests: int, early: bool) -> None:
        """A batch formed while the device was free took ``requests``, ``early`` when it went
        with the company expected instead of waiting: how many requests to expect next."""
        if early and requests <= self._expect:
            self._early += 1
            return
        if not early:  # it waited out max_delay_us (or filled up): the company there is
            self._early = 0
        company = self._company  # (or an early batch that outgrew the expectation)
        company.append(requests)
        if len(company) == LONELY_AFTER:
            self._expect = max(company)

    def _loop(self):
        batch = None
        try:
            while True:
                taken = self._take_batch()
                if taken is None:
                    return
                batch, owner = taken
                taken = None
                if batch:
                    self._run(batch, owner)
                # the requests (and the model) go now, not when the next batch comes
                batch = owner = None
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
            waiting = [e for q in self._queues.values() for e in q]
            self._queues.clear()
            self._rows.clear()
            keep, self._keep = self._keep, None
            self._cond.notify_all()
        for entry in list(batch) + waiting:
            _fail(entry[0], broken)
        del keep

    def bucket(self, rows: int) -> int:
        """Rows of the device run for ``rows`` requested: a multiple of a step that is
        max_batch/8 (so that under load a sample shape needs few plans and at most max_batch/8
        rows are padding) but never more than the next power of two of ``rows`` (so a few rows
        are never padded to a large max_batch: batches and arenas follow what is queued)."""
        step = max(1, min(self.max_batch // 8, 1 << (rows - 1).bit_length()))
        return min(self.max_batch, -(-rows // step) * step)

    def _gather(self, inputs, rows):
        """The batch's inputs in one block per input (one copy), padded with zero rows:
        ``inputs`` holds each request's list of arrays, ``rows`` their rows in all."""
        size = self.bucket(rows)
        if len(inputs) == 1 and size == rows:
            return inputs[0]
        merged = []
        for k in range(len(inputs[0])):
            parts = [arrays[k] for arrays in inputs]
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
                                        f"{len(inputs)} requests, shape {list(shape)}") from None
            merged.append(block)
        return merged

    def _run(self, batch, owner):
        started = perf_counter()
        n = len(batch)
        arrived = [e[3] for e in batch]
        try:
            counts = [e[2] for e in batch]
            rows = sum(counts)
            wait = started - sum(arrived) / n
            arrays = self._gather([e[1] for e in batch], rows)
            if self._owner is None:
                outputs = self._execute(arrays, wait)
            else:  # the owner is alive: held while its requests wait
                outputs = self._execute(owner, arrays, wait)
            del arrays
            if (counts.count(1) == n and self._finish is _unwrap
                    and all(type(o) is np.ndarray for o in outputs)):
                # one row each: the rows of each output as (1, ...) views, in one pass
                views = [list(o[:n].reshape((n, 1) + o.shape[1:])) for o in outputs]
                results = views[0] if len(views) == 1 else list(zip(*views))
            else:
                finish, results, offset = self._finish, [], 0
                for e in batch:
                    end = offset + e[2]
                    part = [o[offset:end] for o in outputs]
                    # pieces of a split request: joined (then finished) by their _Split
                    results.append(finish(part) if e[4] is None else _unwrap(part))
                    offset = end
        except BaseException as e:  # noqa: BLE001 - the error belongs to exactly these callers
            self._ran()
            error = e if isinstance(e, OffloadError) else _wrapped(e)
            for entry in batch:
                _fail(entry[0], error)
            return
        self.batches += 1
        self.requests += n
        # before the answers: a caller that comes back with its next request after its answer
        # is company to wait for, not a request that waited while the device ran
        done = self._ran()
        if self._splits:  # pieces: their split records the request once, when joined
            for e in batch:
                if e[4] is not None:
                    e[4].started(started - e[3])
            arrived = [e[3] for e in batch if e[4] is None]
        if arrived:
            self._recorded([done - a for a in arrived], [started - a for a in arrived])
        self._settle(batch, results)

    def _ran(self) -> float:
        """A worker's batch has its outputs (or failed): the device is free, from now."""
        with self._lock:
            self._running -= 1
            self._free_since = now = perf_counter()
        return now

    def _settle(self, batch, results):
        """Answer a batch's futures (running, so nobody else can) under one lock; the callers
        waiting are woken after it, so that they do not wake only to wait for it."""
        called = wakes = None
        with self._lock:
            for entry, result in zip(batch, results):
                future = entry[0]
                wake = future._answer_locked(result, False)
                if wake is not None:
                    wakes = (wakes or []) + [wake]
                if future._done_callbacks:
                    called = (called or []) + [future]
        if wakes:
            for wake in wakes:
                wake.release()
        if called:
            for future in called:
                future._invoke_callbacks()


class _Split:
    """The pieces of a request larger than max_batch, joined in order into one future when the
    last is answered, and recorded in the statistics once."""

    def __init__(self, batcher: Batcher, pieces: list, arrived: float):
        self.batcher, self.pieces, self.arrived = batcher, pieces, arrived
        self.wait = 0.0  # the longest a piece waited: until the request's last piece started
        self.future = Future(batcher._cond)
        self.future.set_running_or_notify_cancel()
        self._remaining = len(pieces)
        self._lock = threading.Lock()
        for f in pieces:
            f.add_done_callback(self._done)

    def started(self, wait_s: float) -> None:
        self.wait = max(self.wait, wait_s)

    def _done(self, _):
        with self._lock:
            self._remaining -= 1
            if self._remaining:
                return
        b = self.batcher
        with b._lock:
            b._splits -= 1
        try:
            parts = [f.result() for f in self.pieces]
            if isinstance(parts[0], tuple):
                outputs = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
            else:
                outputs = [np.concatenate(parts)]
            result = b._finish(outputs)
        except CancelledError:
            _fail(self.future, OffloadError("part of a split request was cancelled"))
        except BaseException as e:  # noqa: BLE001 - a failed piece, or joining failed
            _fail(self.future, e if isinstance(e, OffloadError) else _wrapped(e))
        else:
            b._recorded([perf_counter() - self.arrived], [self.wait])
            self.future.set_result(result)
        self.pieces = None


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


def _wrapped(error: BaseException) -> OffloadError:
    """An unexpected exception in the batcher as the typed error its callers get."""
    kind = DeviceMemoryError if isinstance(error, MemoryError) else OffloadError
    wrapped = kind(f"batched run failed: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def _fail(future, error) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:  # answered (or cancelled) already
        pass
