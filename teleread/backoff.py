"""The one retry delay of teleread: capped exponential backoff with jitter.

A :class:`RetryPolicy` is the schedule's numbers: the ceiling of the n-th delay (n from 1) is
``min(max_backoff, initial_backoff * multiplier ** (n - 1))``; the delay is drawn uniformly below it
(``jitter="full"``: from 0, so many waiting clients spread out), in its upper half (``"equal"``:
never much shorter than the ceiling) or is the ceiling itself (``"none"``: a poll). A server's retry
hint (gRPC ``RetryInfo``) lengthens a delay up to ``max_backoff``, never shortens it. A policy may
give up: after ``max_attempts`` consecutive failures, or once the next delay would end more than
``max_total_seconds`` after the first failure or the last progress (``None``: never).

A :class:`Backoff` applies a policy. :meth:`Backoff.next_delay` is the running form (the attempts
so far are counted here; :meth:`Backoff.reset` after progress), :meth:`Backoff.delay` the
stateless one for a caller that keeps the count itself (the gateway's outbox keeps it on disk).
The random source and the clock are injectable, so tests replay a schedule exactly.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Callable, Literal

Jitter = Literal["full", "equal", "none"]


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter. A call is given up after ``max_attempts``
    consecutive failures or ``max_total_seconds`` without progress (``None``: never)."""

    max_attempts: int | None = 10
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    multiplier: float = 2.0
    max_total_seconds: float | None = 900.0
    jitter: Jitter = "equal"

    def ceiling(self, attempt: int) -> float:
        """The longest delay after the ``attempt``-th consecutive failure (from 1)."""
        exponent = max(0, attempt - 1)
        try:
            grown = self.initial_backoff * self.multiplier**exponent
        except OverflowError:
            return self.max_backoff
        return min(self.max_backoff, grown)


WAITING = RetryPolicy(max_attempts=None, initial_backoff=2.0, max_backoff=300.0, max_total_seconds=None, jitter="full")
"""The schedule of work that waits rather than gives up (the gateway's exams and its link)."""


class Backoff:
    """The running state of one :class:`RetryPolicy` (see the module's text).

    ``Backoff(base_s=..., cap_s=...)`` is :data:`WAITING` with that first ceiling and cap."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        base_s: float | None = None,
        cap_s: float | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy is not None and (base_s is not None or cap_s is not None):
            raise ValueError("give a RetryPolicy or base_s/cap_s, not both")
        if policy is None and (base_s is not None or cap_s is not None):
            policy = dataclasses.replace(
                WAITING,
                initial_backoff=WAITING.initial_backoff if base_s is None else base_s,
                max_backoff=WAITING.max_backoff if cap_s is None else cap_s,
            )
        self.policy = policy if policy is not None else RetryPolicy()
        if self.policy.initial_backoff < 0 or self.policy.max_backoff < 0 or self.policy.multiplier < 1:
            raise ValueError("backoff delays must not be negative and must not shrink")
        self.rng = rng
        self.clock = clock
        self.attempts = 0
        self.started = clock()

    def __repr__(self) -> str:
        return f"Backoff({self.policy!r}, attempts={self.attempts})"

    @property
    def base_s(self) -> float:
        return self.policy.initial_backoff

    @property
    def cap_s(self) -> float:
        return self.policy.max_backoff

    def delay(self, attempt: int, rng: random.Random | None = None, *, hint: float | None = None) -> float:
        """Seconds to wait after the ``attempt``-th consecutive failure (from 1), jittered, at least
        ``hint`` (capped at ``max_backoff``). Does not count the attempt."""
        policy = self.policy
        ceiling = policy.ceiling(attempt)
        source = rng or self.rng or random
        if policy.jitter == "full":
            drawn = source.uniform(0.0, ceiling)
        elif policy.jitter == "equal":
            drawn = source.uniform(ceiling / 2, ceiling)
        else:
            drawn = ceiling
        return max(drawn, min(max(hint or 0.0, 0.0), policy.max_backoff))

    def next_delay(self, hint: float | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None when the policy's budget is spent
        (then nothing is counted)."""
        policy = self.policy
        if policy.max_attempts is not None and self.attempts >= policy.max_attempts:
            return None
        delay = self.delay(self.attempts + 1, hint=hint)
        if policy.max_total_seconds is not None and self.clock() - self.started + delay > policy.max_total_seconds:
            return None
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Progress was made: the next failure starts the schedule (and its time budget) again."""
        self.attempts = 0
        self.started = self.clock()
