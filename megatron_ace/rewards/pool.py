"""A pool of worker processes that scores items with a hard timeout per item.

Reward functions (math-verify, program tests) can hang or explode on hostile model output, e.g.
`\\boxed{9^{9^{9^{9}}}}` sends sympy into an effectively endless power evaluation. This pool runs
`fn(item)` in separate worker processes, one item at a time per worker, and gives each item a
wall-clock budget that starts when a worker picks it up (not when it is submitted, so a long
queue never times items out). An item that overruns its budget has its worker killed
(SIGKILL) and replaced; it costs that one item, never the run, and the other items keep being
scored by the other workers meanwhile.

Each worker holds up to `_ITEMS_PER_WORKER` items: the next one waits in its pipe while it
scores the current one, so a worker never idles waiting for the dispatcher thread (which shares
the parent's GIL with a busy trainer or engine). The timeout still counts per item, from the
moment the worker starts it; items queued behind a killed or crashed worker's item go to the
front of the queue again, unharmed.

Each worker runs `fn` in its own MAIN thread, so libraries that time themselves out with
`signal.alarm` (math-verify does) work inside `fn`.

A worker that dies before it is ready (its function cannot even be loaded) marks the pool
broken: queued and later items fail with RuntimeError instead of waiting forever. Future
callbacks run on the pool's dispatcher thread: keep them short.

What it does not do: it does not sandbox `fn` (no resource or syscall limits: use the code
sandbox for untrusted programs), and it does not retry a timed-out or failed item.

Workers are started with the `spawn` method by default: the parent may be a trainer holding
threads (torch, vLLM) where `fork` can deadlock. `fn` and items must therefore be picklable,
and `fn` must be importable (a module-level function or a `functools.partial` of one).
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from multiprocessing.reduction import ForkingPickler

from megatron_ace.utils.logging import get_logger

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

_log = get_logger(__name__)

# Seconds a stopping worker gets to leave on its own before it is killed.
_JOIN_GRACE_S = 2.0
# Items a worker holds at once: the one it scores and the next, already sent.
_ITEMS_PER_WORKER = 2


class ItemTimeoutError(TimeoutError):
    """An item ran past the pool's per-item timeout; its worker was killed and replaced."""


class WorkerError(RuntimeError):
    """`fn` raised in the worker, or the worker process died while scoring the item."""


class _State(enum.Enum):
    STARTING = "starting"  # spawned, still importing `fn`'s module
    IDLE = "idle"
    BUSY = "busy"


@dataclass
class _Task:
    task_id: int
    items: list[Any]
    futures: list[concurrent.futures.Future]
    batch: bool = False
    """Sent and answered as one message (`submit_many`); else one item."""

    def message(self) -> tuple[int, bool, Any]:
        return self.task_id, self.batch, self.items if self.batch else self.items[0]


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    state: _State = _State.STARTING
    tasks: collections.deque[_Task] = field(default_factory=collections.deque)
    """Items sent to the worker, in order: it scores the first, the others wait in its pipe."""
    deadline: float = float("inf")
    """When the first of `tasks` runs out of time (its clock starts when the worker starts it)."""
    spawned_at: float = field(default_factory=time.monotonic)
    unreachable: bool = False
    """A send to it failed: it is dead, and its end of file is yet to be read."""


def _worker_main(
    fn: Callable[[Any], Any],
    conn: multiprocessing.connection.Connection,
    initializer: Callable[[], None] | None = None,
    nice: int = 0,
) -> None:
    """Worker loop: receive `(task_id, batch, item or items)`, reply `(task_id, ok,
    result_or_message)`; a batch's reply is `(task_id, True, [(ok, result_or_message), ...])`."""
    # Ctrl-C goes to the whole process group; the parent decides, and kills us if needed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    if initializer is not None:
        initializer()  # lazy imports and first-call set-up, before any item's clock starts
    conn.send(("ready", True, os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if message is None:
            return
        task_id, batch, payload = message
        if batch:
            reply = (task_id, True, [_call(fn, item) for item in payload])
        else:
            reply = (task_id, *_call(fn, payload))
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - an unpicklable result must not kill the worker
            conn.send((task_id, False, f"result could not be sent back: {type(exc).__name__}: {exc}"))


def _call(fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any]:
    try:
        return True, fn(item)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
        return False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"


class RewardPool(Generic[ItemT, ResultT]):
    """Score items with `fn` in `num_workers` processes, `timeout_s` seconds at most per item.

    `submit(item)` returns a `concurrent.futures.Future` (so scoring overlaps with generation);
    `map(items)` returns results in input order; `submit_many(items)` sends items to one worker
    as one message (one round trip for a prompt's samples). A timed-out item resolves to
    `on_timeout(item)` when given, else its future raises `ItemTimeoutError`; an item whose `fn`
    raised or whose worker died resolves to `on_error(item, message)` when given, else raises
    `WorkerError`. Use as a context manager, or call `close()`: no worker outlives the pool.
    `initializer()` runs once in each worker (replacements included) before it takes items, so
    slow first-call set-up (lazy imports, parser tables) never counts against an item's timeout;
    a worker whose initializer raises dies before it is ready, which marks the pool broken.
    `nice` (0-19) lowers the workers' CPU priority: where they share cores with a rollout engine
    (a CPU run), they then take the cores when the engine leaves them idle instead of
    preempting its threads mid-step.
    """

    def __init__(
        self,
        fn: Callable[[ItemT], ResultT],
        num_workers: int,
        timeout_s: float,
        *,
        on_timeout: Callable[[ItemT], ResultT] | None = None,
        on_error: Callable[[ItemT, str], ResultT] | None = None,
        start_method: str = "spawn",
        initializer: Callable[[], None] | None = None,
        nice: int = 0,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {fn!r}")
        if int(num_workers) != num_workers or num_workers < 1:
            raise ValueError(f"num_workers: must be an integer >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method: {start_method!r} is not available here")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer: expected a callable or None, got {initializer!r}")
        if int(nice) != nice or not 0 <= nice <= 19:
            raise ValueError(f"nice: an integer in [0, 19], got {nice!r}")
        self._nice = int(nice)
        self._fn = fn
        self._initializer = initializer
        self._timeout_s = float(timeout_s)
        self._on_timeout = on_timeout
        self._on_error = on_error
        self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._queue: collections.deque[_Task] = collections.deque()
        # Items taken back from a killed or crashed worker before it started them: next in line.
        self._requeued: collections.deque[_Task] = collections.deque()
        self._ids = itertools.count()
        self._closing = False
        self._cancel_pending = False
        self._broken: str | None = None
        self._num_killed = 0
        # A raw pipe wakes the dispatcher: one-byte os.write is atomic, so any thread may submit.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._workers: list[_Worker] = []
        try:
            for _ in range(int(num_workers)):
                self._workers.append(self._spawn())
        except Exception as exc:
            for worker in self._workers:
                self._stop_worker(worker, kill=True)
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise TypeError(
                f"fn: could not start a worker with {fn!r} ({type(exc).__name__}: {exc}); with the "
                f"{start_method!r} start method fn must be picklable (a module-level function)"
            ) from exc
        self._thread = threading.Thread(target=self._dispatch_loop, name="reward-pool", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------- public API
    @property
    def num_killed(self) -> int:
        """Workers killed so far because an item ran past the timeout."""
        return self._num_killed

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [w.process.pid for w in list(self._workers) if w.process.pid is not None]

    def submit(self, item: ItemT) -> concurrent.futures.Future:
        """Queue one item; the future resolves to `fn(item)` (or the timeout/error result)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closing:
                raise RuntimeError("submit: the reward pool is closed")
            if self._broken is not None:
                raise RuntimeError(f"submit: the reward pool is broken: {self._broken}")
            self._queue.append(_Task(next(self._ids), [item], [future]))
            self._wake()
        return future

    def submit_many(self, items: Iterable[ItemT]) -> list[concurrent.futures.Future]:
        """Queue items that go to one worker as one message and come back as one (a prompt's
        samples: one round trip instead of one per sample). They share one `timeout_s`; if the
        worker overruns it or dies, each item is retried on its own with its own timeout, so a
        hostile item still costs only itself. Futures as `submit` gives them, in order."""
        items = list(items)
        futures = [concurrent.futures.Future() for _ in items]
        if not items:
            return futures
        with self._lock:
            if self._closing:
                raise RuntimeError("submit_many: the reward pool is closed")
            if self._broken is not None:
                raise RuntimeError(f"submit_many: the reward pool is broken: {self._broken}")
            self._queue.append(_Task(next(self._ids), items, futures, batch=len(items) > 1))
            self._wake()
        return futures

    def map(self, items: Iterable[ItemT]) -> list[ResultT]:
        """Score all items (in parallel) and return their results in input order."""
        futures = [self.submit(item) for item in items]
        return [f.result() for f in futures]

    def close(self, *, cancel_pending: bool = False) -> None:
        """Stop the workers. Queued items are still scored unless `cancel_pending`."""
        with self._lock:
            if self._closing and not self._thread.is_alive():
                return
            self._closing = True
            self._cancel_pending = self._cancel_pending or cancel_pending
            self._wake()
        self._thread.join()

    def __enter__(self) -> RewardPool[ItemT, ResultT]:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception (e.g. Ctrl-C) nobody will read the remaining results: drop them.
        self.close(cancel_pending=exc_type is not None)

    # ----------------------------------------------------------------------------- internals
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the dispatcher is gone

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(self._fn, child_conn, self._initializer, self._nice), name="reward-worker",
            daemon=True
        )
        process.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        return _Worker(process=process, conn=parent_conn)

    def _stop_worker(self, worker: _Worker, *, kill: bool) -> None:
        if kill:
            worker.process.kill()
        worker.process.join(_JOIN_GRACE_S)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()

    def _resolve_timeout(self, task: _Task) -> None:
        if task.batch:
            return self._split(task)
        if self._on_timeout is not None:
            task.futures[0].set_result(self._on_timeout(task.items[0]))
        else:
            task.futures[0].set_exception(
                ItemTimeoutError(f"item {task.task_id} ran past the {self._timeout_s:g} s timeout")
            )

    def _resolve_error(self, task: _Task, message: str) -> None:
        if task.batch:
            return self._split(task)
        self._resolve_item_error(task.items[0], task.futures[0], message)

    def _resolve_item_error(self, item: Any, future: concurrent.futures.Future, message: str) -> None:
        if self._on_error is not None:
            future.set_result(self._on_error(item, message))
        else:
            future.set_exception(WorkerError(message))

    def _split(self, task: _Task) -> None:
        """A batch whose worker overran the timeout or died: each item again, on its own."""
        _log.info("reward pool: batch %d (%d items) retried item by item", task.task_id, len(task.items))
        self._requeued.extendleft(reversed([
            _Task(next(self._ids), [item], [future]) for item, future in zip(task.items, task.futures)
        ]))

    def _dispatch_loop(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # noqa: BLE001 - never leave callers waiting forever
            _log.error("reward pool dispatcher failed: %s", exc, exc_info=True)
            self._broken = f"dispatcher failed: {exc}"
        finally:
            self._shutdown_workers()

    def _step(self) -> bool:
        """One round of the dispatcher: assign, wait for replies or deadlines. False = stop."""
        with self._lock:
            closing, cancel = self._closing, self._cancel_pending
            if cancel or self._broken is not None:
                self._fail_queued()
        busy = any(w.state is _State.BUSY for w in self._workers)
        if closing and not self._queue and not self._requeued and not busy:
            return False
        self._assign()
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.state is _State.BUSY]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else None
        conns = [self._wake_r] + [w.conn for w in self._workers]
        for conn in multiprocessing.connection.wait(conns, timeout=wait_s):
            if conn == self._wake_r:
                os.read(self._wake_r, 4096)
            else:
                self._on_message(next(w for w in self._workers if w.conn is conn))
        self._kill_overdue()
        return True

    def _assign(self) -> None:
        # Round-robin, one item per worker per pass, so that a short queue is shared out.
        for _ in range(_ITEMS_PER_WORKER):
            for worker in list(self._workers):
                if worker not in self._workers or worker.state is _State.STARTING:
                    continue
                if len(worker.tasks) >= _ITEMS_PER_WORKER or worker.unreachable:
                    continue
                task = self._next_task()
                if task is None:
                    return
                try:
                    message = ForkingPickler.dumps(task.message())
                except Exception as exc:  # noqa: BLE001 - an unpicklable item fails alone
                    for item, future in zip(task.items, task.futures):
                        self._resolve_item_error(
                            item, future, f"item could not be sent to a worker: {type(exc).__name__}: {exc}")
                    continue
                try:
                    worker.conn.send_bytes(message)
                except OSError:
                    # The worker died (its current item killed it) between the dispatcher's
                    # last look and this send. The item never reached it: it goes back in
                    # front of the queue, and the worker's end of file, read next, blames the
                    # item it was scoring.
                    self._requeued.appendleft(task)
                    worker.unreachable = True
                    continue
                if not worker.tasks:  # it starts this item now
                    worker.deadline = time.monotonic() + self._timeout_s
                worker.state = _State.BUSY
                worker.tasks.append(task)

    def _next_task(self) -> _Task | None:
        if self._requeued:
            return self._requeued.popleft()  # already marked running
        with self._lock:
            while self._queue:
                task = self._queue.popleft()
                running = [f.set_running_or_notify_cancel() for f in task.futures]
                if all(running):
                    return task
                if any(running):  # some of a batch's items were cancelled: the rest go
                    task.items = [x for x, r in zip(task.items, running) if r]
                    task.futures = [f for f, r in zip(task.futures, running) if r]
                    return task
        return None

    def _on_message(self, worker: _Worker) -> None:
        try:
            tag, ok, payload = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(_JOIN_GRACE_S)  # reap it, so that its exit code is known
            if worker.state is _State.STARTING:
                self._broken = f"a worker exited with code {worker.process.exitcode} while starting"
                _log.error("reward pool: %s", self._broken)
                self._workers.remove(worker)
                self._stop_worker(worker, kill=True)
                if not self._workers:
                    self._fail_queued()
                return
            self._replace(worker, reason=f"worker exited with code {worker.process.exitcode}")
            return
        if tag == "ready":
            worker.state = _State.IDLE
            return
        assert worker.tasks and worker.tasks[0].task_id == tag, "reply for an item the worker does not hold"
        task = worker.tasks.popleft()
        if worker.tasks:  # the worker starts the next item now
            worker.deadline = time.monotonic() + self._timeout_s
        else:
            worker.state, worker.deadline = _State.IDLE, float("inf")
        if task.batch:
            for item, future, (item_ok, value) in zip(task.items, task.futures, payload, strict=True):
                if item_ok:
                    future.set_result(value)
                else:
                    self._resolve_item_error(item, future, value)
        elif ok:
            task.futures[0].set_result(payload)
        else:
            self._resolve_error(task, payload)

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.state is _State.BUSY and now >= worker.deadline:
                task = worker.tasks[0]
                self._num_killed += 1
                _log.warning(
                    "reward pool: item %d ran past %g s; killing worker pid %s",
                    task.task_id, self._timeout_s, worker.process.pid,
                )
                self._replace(worker, reason=None)

    def _replace(self, worker: _Worker, *, reason: str | None) -> None:
        """Kill `worker`, resolve the item it was scoring as a timeout (`reason` None) or an
        error, start a new worker, and put the worker's other items back in front of the queue."""
        task, *waiting = worker.tasks or [None]
        self._stop_worker(worker, kill=True)
        self._workers[self._workers.index(worker)] = self._spawn()
        self._requeued.extendleft(reversed(waiting))
        if task is not None:
            if reason is None:
                self._resolve_timeout(task)
            else:
                self._resolve_error(task, reason)

    def _fail_queued(self) -> None:
        """Cancel queued items (close with cancel_pending) or fail them (pool broken)."""
        while self._requeued:  # already running: they can only fail
            task = self._requeued.popleft()
            message = self._broken or "the reward pool was closed with cancel_pending"
            for future in task.futures:
                future.set_exception(RuntimeError(f"reward pool: item not scored: {message}"))
        while self._queue:
            task = self._queue.popleft()
            for future in task.futures:
                if self._broken is not None and future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError(f"reward pool is broken: {self._broken}"))
                else:
                    future.cancel()

    def _shutdown_workers(self) -> None:
        for worker in self._workers:
            for task in worker.tasks:
                for future in task.futures:
                    if not future.done():
                        future.set_exception(RuntimeError("reward pool shut down mid-item"))
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            self._stop_worker(worker, kill=False)
        self._workers = []
        with self._lock:
            self._fail_queued()
        with self._lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
