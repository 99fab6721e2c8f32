"""The one backoff (teleread/backoff.py): bounds, cap, jitter kinds, budget, reset and a server's
retry hint, all with a seeded random source and a hand-driven clock."""

from __future__ import annotations

import random

import pytest

from teleread.backoff import WAITING, Backoff, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_full_jitter_stays_under_a_ceiling_that_doubles_to_the_cap() -> None:
    backoff = Backoff(base_s=1.0, cap_s=10.0, rng=random.Random(7))
    ceilings = [backoff.policy.ceiling(n) for n in range(1, 8)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    for attempt, ceiling in enumerate(ceilings, start=1):
        draws = [backoff.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert min(draws) < ceiling / 4 and max(draws) > ceiling * 3 / 4  # spread over the whole range
    assert backoff.policy.ceiling(10_000) == 10.0  # no overflow, still the cap


def test_equal_jitter_keeps_the_upper_half_and_none_is_the_ceiling() -> None:
    equal = Backoff(RetryPolicy(initial_backoff=2.0, max_backoff=16.0), rng=random.Random(1))
    draws = [equal.delay(3) for _ in range(200)]  # ceiling 8 s
    assert all(4.0 <= d <= 8.0 for d in draws) and min(draws) < 4.5
    poll = Backoff(RetryPolicy(initial_backoff=0.01, max_backoff=0.1, jitter="none"))
    assert [poll.delay(n) for n in range(1, 6)] == [0.01, 0.02, 0.04, 0.08, 0.1]


def test_a_seeded_random_source_replays_the_same_schedule() -> None:
    def schedule(seed: int) -> list[float | None]:
        backoff = Backoff(RetryPolicy(max_total_seconds=None), rng=random.Random(seed))
        return [backoff.next_delay() for _ in range(6)]

    assert schedule(42) == schedule(42) != schedule(43)
    per_call = Backoff(base_s=1.0, cap_s=60.0, rng=random.Random(0))
    assert per_call.delay(3, random.Random(5)) == Backoff(base_s=1.0, cap_s=60.0).delay(3, random.Random(5))


def test_the_budget_of_attempts_is_spent_then_reset_starts_again() -> None:
    backoff = Backoff(RetryPolicy(max_attempts=3, initial_backoff=1.0, max_backoff=8.0), rng=random.Random(2))
    delays = [backoff.next_delay() for _ in range(3)]
    assert all(d is not None for d in delays) and backoff.attempts == 3
    assert [0.5 <= delays[0] <= 1.0, 1.0 <= delays[1] <= 2.0, 2.0 <= delays[2] <= 4.0] == [True] * 3  # type: ignore[operator]
    assert backoff.next_delay() is None and backoff.attempts == 3  # spent: nothing counted
    backoff.reset()
    first = backoff.next_delay()
    assert first is not None and 0.5 <= first <= 1.0 and backoff.attempts == 1


def test_the_time_budget_counts_from_the_last_progress() -> None:
    clock = Clock()
    policy = RetryPolicy(max_attempts=None, initial_backoff=10.0, max_backoff=10.0, max_total_seconds=30.0)
    backoff = Backoff(policy, clock=clock, rng=random.Random(0))
    assert backoff.next_delay() is not None
    clock.now += 25.0  # 25 s since the first failure: a delay of 5-10 s would end past 30 s
    assert backoff.next_delay() is None
    backoff.reset()  # progress
    assert backoff.next_delay() is not None


def test_a_server_hint_lengthens_a_delay_up_to_the_cap_and_never_shortens_it() -> None:
    backoff = Backoff(RetryPolicy(initial_backoff=0.1, max_backoff=5.0), rng=random.Random(3))
    assert backoff.delay(1, hint=2.5) == 2.5
    assert backoff.delay(1, hint=3600.0) == 5.0  # a hint past the cap waits the cap
    assert 0.05 <= backoff.delay(1, hint=0.0) <= 0.1
    assert 0.05 <= backoff.delay(1, hint=-4.0) <= 0.1  # a nonsense hint is ignored
    assert backoff.next_delay(hint=4.0) == 4.0 and backoff.attempts == 1


def test_the_waiting_schedule_never_gives_up() -> None:
    backoff = Backoff(WAITING, rng=random.Random(0), clock=Clock())
    assert all(backoff.next_delay() is not None for _ in range(1000))
    assert (Backoff(base_s=0.2, cap_s=0.2).base_s, Backoff(base_s=0.2, cap_s=0.2).cap_s) == (0.2, 0.2)
    assert Backoff(base_s=3.0).policy == RetryPolicy(
        max_attempts=None, initial_backoff=3.0, max_backoff=300.0, max_total_seconds=None, jitter="full"
    )


def test_a_policy_and_base_cap_together_or_a_shrinking_schedule_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(RetryPolicy(), base_s=1.0)
    with pytest.raises(ValueError):
        Backoff(RetryPolicy(multiplier=0.5))
