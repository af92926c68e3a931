"""segflow.turns: the device goes to the oldest waiting shard, and is never left idle."""

from __future__ import annotations

import threading
import time

import pytest

from segflow.turns import DeviceTurns


def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the threads")
        time.sleep(0.001)


def _waiters(turns: DeviceTurns) -> int:
    with turns._changed:
        return len(turns._waiting)


def test_the_oldest_waiting_shard_goes_first_whatever_order_they_asked_in():
    turns = DeviceTurns()
    older, younger, holder = turns.shard(), turns.shard(), turns.shard()
    order: list[str] = []

    def take(turn, name: str) -> None:
        with turn:
            order.append(name)

    holder.__enter__()
    threads = [threading.Thread(target=take, args=(younger, "younger"))]
    threads[0].start()
    _until(lambda: _waiters(turns) == 1)  # the younger shard asks first
    threads.append(threading.Thread(target=take, args=(older, "older")))
    threads[1].start()
    _until(lambda: _waiters(turns) == 2)
    holder.__exit__(None, None, None)
    for thread in threads:
        thread.join(10)
    assert order == ["older", "younger"]


def test_a_younger_shard_is_not_kept_waiting_while_the_device_is_free():
    turns = DeviceTurns()
    turns.shard()  # an older shard, decoding: not waiting for the device
    younger = turns.shard()
    entered = threading.Event()

    def take() -> None:
        with younger:
            entered.set()

    thread = threading.Thread(target=take)
    thread.start()
    assert entered.wait(10)
    thread.join(10)


def test_one_turn_at_a_time_and_a_failing_forward_pass_hands_the_device_on():
    turns = DeviceTurns()
    inside = 0
    most = 0
    guard = threading.Lock()

    def forward(turn, fail: bool) -> None:
        nonlocal inside, most
        for _ in range(50):
            try:
                with turn:
                    with guard:
                        inside += 1
                        most = max(most, inside)
                    time.sleep(0.0005)
                    with guard:
                        inside -= 1
                    if fail:
                        raise RuntimeError("forward pass failed")
            except RuntimeError:
                pass

    threads = [threading.Thread(target=forward, args=(turns.shard(), i % 2 == 0)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert most == 1
    with pytest.raises(RuntimeError), turns.shard():
        raise RuntimeError("after all of them")
    after = threading.Thread(target=forward, args=(turns.shard(), False))
    after.start()
    after.join(30)
    assert not after.is_alive()
