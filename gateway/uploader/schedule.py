"""When and how fast the gateway may use the clinic's uplink: a bandwidth limit, time windows, and
the choice of compression on the wire.

- **Time windows** are local clock ranges ``"HH:MM-HH:MM"`` (a range may pass midnight,
  ``"22:00-06:00"``). ``limit_windows`` say when the bandwidth limit applies (none: always);
  ``routine_windows`` say when routine exams may be sent (none: always). Stat and urgent exams are
  sent at any time: a suspected STEMI never waits for the night.
- **The limit** is one token bucket shared by every upload stream of the gateway, so four parallel
  streams together stay under it. Streams send smaller messages while it applies, so the link is
  shared smoothly instead of in one-megabyte bursts.
- **Compression** (``auto``): gzip on the wire only for objects that shrink. A sample of the object
  is compressed with zlib level 1; uncompressed pixel data and ECG samples usually shrink (gzip on
  the stream), JPEG / JPEG 2000 images do not (sent as they are, no CPU spent).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from teleread.errors import InvalidInput

_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
COMPRESSION_MODES = ("auto", "gzip", "off")
SAMPLE_BYTES = 256 * 1024
WORTH_IT = 0.9  # compress when the sample shrinks to less than this fraction


@dataclass(frozen=True)
class Window:
    start: dt.time
    end: dt.time  # exclusive; 24:00 is written as 00:00 after the start

    def contains(self, t: dt.time) -> bool:
        if self.start <= self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # across midnight


def parse_windows(specs: list[str]) -> list[Window]:
    """``["08:00-18:00", "22:00-06:00"]`` → windows; a clear error names a malformed one."""
    windows = []
    for spec in specs:
        m = _WINDOW.match(spec.strip())
        if not m:
            raise InvalidInput(f"time window {spec!r} is not HH:MM-HH:MM", reason="BAD_WINDOW")
        h1, m1, h2, m2 = map(int, m.groups())
        if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59 or (h1 == 24 and m1) or (h2 == 24 and m2):
            raise InvalidInput(f"time window {spec!r} has an impossible time", reason="BAD_WINDOW")
        windows.append(Window(dt.time(h1 % 24, m1), dt.time(h2 % 24, m2)))
    return windows


def in_windows(windows: list[Window], now: dt.datetime | None = None) -> bool:
    """True when there are no windows, or the local time is inside one."""
    if not windows:
        return True
    t = (now or dt.datetime.now()).time()
    return any(w.contains(t) for w in windows)


class TokenBucket:
    """A byte-rate limit shared by threads: ``take(n)`` returns once ``n`` bytes may be sent.
    ``rate`` gives the bytes/s that apply now (``None``: no limit now)."""

    def __init__(
        self,
        rate: Callable[[], float | None],
        *,
        burst_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._at = clock()

    def message_size(self, default: int) -> int:
        """The size of stream messages while the limit applies: about a tenth of a second each."""
        rate = self.rate()
        if rate is None:
            return default
        return int(min(default, max(16 * 1024, rate / 10)))

    def take(self, n: int) -> None:
        rate = self.rate()
        if rate is None or n <= 0:
            return
        with self._lock:
            now = self.clock()
            self._tokens = min(rate * self.burst_s, self._tokens + (now - self._at) * rate)
            self._at = now
            self._tokens -= n  # may go negative: the debt is paid by waiting, in order
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)


def limit_rate(max_kbps: float, windows: list[Window]) -> Callable[[], float | None]:
    """The bytes/s a ``max_kbps`` (kilobits per second) limit allows now; None when it does not apply."""

    def rate() -> float | None:
        if max_kbps <= 0 or not in_windows(windows):
            return None
        return max_kbps * 1000 / 8

    return rate


def worth_compressing(path: Path, *, offset: int = 0) -> bool:
    """Does a sample of what is left to send shrink enough to spend CPU on gzip? The sample is the
    object's tail (its pixel data or samples, not the header that precedes them)."""
    try:
        with path.open("rb") as f:
            f.seek(max(offset, path.stat().st_size - SAMPLE_BYTES))
            sample = f.read(SAMPLE_BYTES)
    except OSError:
        return False
    if len(sample) < 1024:
        return False
    return len(zlib.compress(sample, 1)) < WORTH_IT * len(sample)
