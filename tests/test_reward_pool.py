"""RewardPool: hard per-item timeouts with worker replacement, errors, ordering, clean shutdown."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import signal
import time

import psutil
import pytest

from megatron_ace.rewards.math_reward import MathRewardConfig, MathStatus, _score_pair, warm_up
from megatron_ace.rewards.pool import ItemTimeoutError, RewardPool, WorkerError

HOSTILE = "\\boxed{9^{9^{9^{9}}}}"


# Worker functions must be importable by spawned workers: module level.
def _square(x: int) -> int:
    return x * x


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _fail_on_negative(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative item {x}")
    return x


def _die_on_negative(x: int) -> int:
    if x < 0:
        os._exit(3)
    return x


def _log_then_die_or_hang(item: tuple[str, int]) -> int:
    """Appends the item to a log (so the test can count how often each ran); -1 exits, -2 hangs."""
    log_path, x = item
    with open(log_path, "a") as log:
        log.write(f"{x}\n")
    if x == -1:
        os._exit(3)
    if x == -2:
        time.sleep(60)
    return x


def _pid(_: object) -> int:
    return os.getpid()


def _alarm_then_sleep(seconds: int) -> str:
    """Uses signal.alarm as math-verify does; only works in a main thread."""

    def handler(signum, frame):
        raise TimeoutError("alarm")

    signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        time.sleep(10)
        return "no alarm"
    except TimeoutError:
        return "alarm fired"
    finally:
        signal.alarm(0)


class _DiesWhenUnpickled:
    """Picklable here; unpickling it (in the spawned worker, before it is ready) exits."""

    def __reduce__(self):
        return (os._exit, (5,))

    def __call__(self, item):
        return item


def _live_children() -> list[psutil.Process]:
    """Our child processes, minus multiprocessing's per-interpreter resource tracker.

    The resource tracker is started by the `spawn` start method once per interpreter, is shared
    by everything that uses multiprocessing, and exits with the interpreter: not the pool's.
    """
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            continue
    return alive


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_map_matches_serial_in_order_and_leaves_no_processes():
    before = {p.pid for p in _live_children()}
    items = list(range(-20, 21))
    with RewardPool(_square, num_workers=2, timeout_s=30) as pool:
        assert pool.map(items) == [_square(x) for x in items]
        pids = pool.worker_pids()
        assert len(pids) == 2
    _assert_gone(pids)
    assert {p.pid for p in _live_children()} - before == set()


def test_hostile_math_answer_is_killed_within_timeout_and_others_are_scored():
    config = MathRewardConfig(verify_timeout_s=0)  # no inner timeout: only the outer kill can stop it
    fn = functools.partial(_score_pair, config=config)
    timeout_s = 2.0
    # The initializer loads math-verify before a worker takes items (as MathRewardPool does).
    with RewardPool(fn, num_workers=2, timeout_s=timeout_s, initializer=warm_up) as pool:
        pool.map([("\\boxed{1}", "1")] * 2)  # both workers started and warm
        pids_before = set(pool.worker_pids())
        items = [(HOSTILE, "5")] + [(f"\\boxed{{{i}}}", str(i if i % 2 else i + 1)) for i in range(6)]
        futures = [pool.submit(item) for item in items]
        start = time.monotonic()
        with pytest.raises(ItemTimeoutError):
            futures[0].result()
        elapsed = time.monotonic() - start
        assert elapsed < timeout_s + 1.5, f"hostile item took {elapsed:.2f} s to be killed"
        results = [f.result() for f in futures[1:]]
        assert [r.status for r in results] == [MathStatus.WRONG if i % 2 == 0 else MathStatus.CORRECT for i in range(6)]
        assert pool.num_killed == 1
        pids_after = set(pool.worker_pids())
        assert len(pids_after) == 2 and len(pids_after - pids_before) == 1
        _assert_gone(list(pids_before - pids_after))
        assert pool.map([("\\boxed{\\frac{1}{2}}", "0.5")])[0].status is MathStatus.CORRECT
    _assert_gone(list(pids_after))


def test_timeout_resolves_to_on_timeout_value():
    with RewardPool(_sleep, 1, timeout_s=0.5, on_timeout=lambda item: ("timeout", item)) as pool:
        assert pool.map([30.0, 0.0]) == [("timeout", 30.0), 0.0]


def test_timeout_clock_starts_at_pickup_not_at_submission():
    # One worker, four 0.5 s items, 1.5 s budget: the last one waits 1.5 s in the queue, which
    # must not count against it (with a clock started at submission it would time out).
    with RewardPool(_sleep, 1, timeout_s=1.5) as pool:
        pool.map([0.0])  # worker ready
        assert pool.map([0.5] * 4) == [0.5] * 4
        assert pool.num_killed == 0


def test_fn_exception_becomes_worker_error_and_the_worker_survives():
    with RewardPool(_fail_on_negative, 1, timeout_s=30) as pool:
        pid = pool.worker_pids()[0]
        futures = [pool.submit(x) for x in (1, -2, 3)]
        assert futures[0].result() == 1
        with pytest.raises(WorkerError, match="negative item -2"):
            futures[1].result()
        assert futures[2].result() == 3
        assert pool.worker_pids() == [pid]


def test_dead_worker_is_replaced_and_costs_one_item():
    with RewardPool(_die_on_negative, 1, timeout_s=30, on_error=lambda item, msg: msg) as pool:
        out = pool.map([1, -1, 2])
        assert out[0] == 1 and out[2] == 2
        assert "exited with code 3" in out[1]


def test_items_behind_a_killed_or_crashed_item_are_scored_exactly_once(tmp_path):
    # A worker holds the item it scores and the next one; when it is killed (hang) or dies, the
    # item waiting behind goes to the replacement worker, scored once, with a fresh clock.
    log_path = str(tmp_path / "scored.log")
    items = [1, -1, 2, 3, -2, 4, 5]
    errors = []
    with RewardPool(_log_then_die_or_hang, 1, timeout_s=2.0, on_timeout=lambda item: "timeout",
                    on_error=lambda item, msg: errors.append(msg) or "error") as pool:
        out = pool.map([(log_path, x) for x in items])
        assert pool.num_killed == 1
    assert out == [1, "error", 2, 3, "timeout", 4, 5]
    assert "exited with code 3" in errors[0]
    scored = [int(line) for line in open(log_path).read().split()]
    assert sorted(scored) == sorted(items)  # none lost, none scored twice


def test_item_sent_to_a_worker_that_just_died_is_not_blamed_for_its_death(tmp_path):
    # The worker holds [1, -1]: it replies to 1, starts -1 and exits. The reply's callback (on the
    # dispatcher thread) holds the dispatcher until the worker is dead, so that the next item,
    # -2, is sent to a dead worker. The death belongs to -1; -2 goes to the replacement worker
    # and runs there: it hangs, is killed at its own timeout, and each item ran exactly once.
    log_path = str(tmp_path / "scored.log")
    errors = []
    with RewardPool(_log_then_die_or_hang, 1, timeout_s=2.0, on_timeout=lambda item: "timeout",
                    on_error=lambda item, msg: errors.append(msg) or "error",
                    initializer=functools.partial(time.sleep, 1.0)) as pool:
        pid = pool.worker_pids()[0]
        futures = [pool.submit((log_path, x)) for x in (1, -1, -2)]  # all queued before it is ready
        saw_it_dead = []

        def hold_until_the_worker_is_dead(_future):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    saw_it_dead.append(True)
                    return
                time.sleep(0.01)

        futures[0].add_done_callback(hold_until_the_worker_is_dead)
        out = [f.result() for f in futures]
        assert saw_it_dead, "the worker did not exit after item -1"
        assert pool.num_killed == 1
    assert out == [1, "error", "timeout"]
    assert len(errors) == 1 and "exited with code 3" in errors[0]
    assert sorted(int(line) for line in open(log_path).read().split()) == [-2, -1, 1]


def test_unpicklable_item_fails_alone():
    import threading

    with RewardPool(_square, 1, timeout_s=30) as pool:
        bad = pool.submit(threading.Lock())
        with pytest.raises(WorkerError, match="could not be sent to a worker"):
            bad.result()
        assert pool.map([2, 3]) == [4, 9]
        batch = pool.submit_many([4, threading.Lock()])
        for future in batch:
            with pytest.raises(WorkerError, match="could not be sent"):
                future.result()
        assert pool.submit(5).result() == 25 and pool.num_killed == 0


def test_submit_many_is_one_round_trip_to_one_worker_with_results_in_order():
    with RewardPool(_pid, 2, timeout_s=30) as pool:
        pool.map([0, 0])  # both workers ready
        futures = pool.submit_many(range(8))
        pids = [f.result() for f in futures]
        assert len(set(pids)) == 1 and pids[0] in pool.worker_pids()
    with RewardPool(_square, 2, timeout_s=30) as pool:
        groups = [pool.submit_many(range(k, k + 5)) for k in range(0, 40, 5)]
        assert [f.result() for g in groups for f in g] == [x * x for x in range(40)]
        assert pool.submit_many([]) == []


def test_submit_many_isolates_a_raising_a_hanging_and_a_crashing_item(tmp_path):
    with RewardPool(_fail_on_negative, 1, timeout_s=30) as pool:
        pid = pool.worker_pids()[0] if pool.worker_pids() else None
        futures = pool.submit_many([1, -2, 3])
        assert futures[0].result() == 1 and futures[2].result() == 3
        with pytest.raises(WorkerError, match="negative item -2"):
            futures[1].result()
        assert pool.num_killed == 0 and (pid is None or pool.worker_pids() == [pid])
    # A hung or crashing item takes the batch's worker down; every item is then retried on its
    # own, with its own timeout: only the bad one fails.
    log_path = str(tmp_path / "scored.log")
    with RewardPool(_log_then_die_or_hang, 1, timeout_s=2.0, on_timeout=lambda item: "timeout",
                    on_error=lambda item, msg: "error") as pool:
        pool.map([(log_path, 0)])  # worker ready
        hung = pool.submit_many([(log_path, x) for x in (1, -2, 2)])
        crashed = pool.submit_many([(log_path, x) for x in (3, -1, 4)])
        assert [f.result() for f in hung] == [1, "timeout", 2]
        assert [f.result() for f in crashed] == [3, "error", 4]
        assert pool.num_killed == 2  # the batch, then the hung item alone
    scored = [int(line) for line in open(log_path).read().split()]
    assert scored.count(-2) == 2 and scored.count(-1) == 2  # once in its batch, once alone


def test_fn_runs_in_the_worker_main_thread_so_signal_alarm_works():
    with RewardPool(_alarm_then_sleep, 1, timeout_s=30) as pool:
        assert pool.map([1]) == ["alarm fired"]


def test_items_run_in_parallel_and_submit_returns_futures():
    with RewardPool(_sleep, 2, timeout_s=30) as pool:
        pool.map([0.0, 0.0])  # warm: both workers ready
        start = time.monotonic()
        futures = [pool.submit(1.0) for _ in range(4)]
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)
        concurrent.futures.wait(futures)
        assert time.monotonic() - start < 3.5  # serial would take 4 s


def test_close_with_cancel_pending_cancels_queued_items():
    pool = RewardPool(_sleep, 1, timeout_s=30)
    futures = [pool.submit(0.5) for _ in range(5)]
    time.sleep(0.2)
    pids = pool.worker_pids()
    pool.close(cancel_pending=True)
    assert sum(f.cancelled() for f in futures) >= 3
    assert all(f.done() for f in futures)
    _assert_gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(1.0)


def test_items_are_scored_in_the_workers_not_the_parent():
    with RewardPool(_pid, 2, timeout_s=30) as pool:
        seen = set(pool.map(range(6)))
        assert seen <= set(pool.worker_pids()) and os.getpid() not in seen


def test_workers_that_cannot_start_fail_items_instead_of_hanging():
    pool = RewardPool(_DiesWhenUnpickled(), num_workers=2, timeout_s=5)
    try:
        # Either the item is queued before the workers die (its future fails) or the pool is
        # already marked broken when it is submitted (submit raises): never a hang.
        with pytest.raises(RuntimeError, match="broken.*code 5"):
            pool.submit(1).result(timeout=60)
        with pytest.raises(RuntimeError, match="broken"):
            pool.submit(2)
    finally:
        pool.close()
    assert pool.worker_pids() == []


def test_unpicklable_fn_is_a_clear_error_and_starts_nothing():
    before = {p.pid for p in _live_children()}
    with pytest.raises(TypeError, match="picklable"):
        RewardPool(lambda x: x, num_workers=2, timeout_s=1)
    assert {p.pid for p in _live_children()} - before == set()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_workers=0, timeout_s=1), "num_workers"),
        (dict(num_workers=1, timeout_s=0), "timeout_s"),
        (dict(num_workers=1, timeout_s=1, start_method="nope"), "start_method"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RewardPool(_square, **kwargs)
