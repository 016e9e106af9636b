"""How fast requests start: a shared pace that obeys the configured limit and backs off when
EngageLab signals throttling (all pure arithmetic over an injected clock).

* Requests start evenly spaced at the current rate, one at a time through a gate. Lateness up
  to SLACK is made up (so timer jitter does not lower the rate); a longer stall is not (so it
  does not end in a burst): no one-second window holds more than ``rate * 1.02 + 1`` starts.
* A throttling signal (HTTP 429, a configured rate-limit code, or a burst of 5xx / code -1)
  sets the rate just below what EngageLab accepted in the last second — one step to a rate it
  takes, instead of halving blindly for many seconds — at most once a second.
* Every second without a signal the rate grows by 5%, up to the configured limit, to find out
  whether EngageLab takes more again. The sawtooth this makes keeps throttled requests to a few
  percent.
* ``Retry-After`` pauses every request, not just the one that was told (for at most
  ``engagelab.max_retry_after``: the client caps what it passes to :meth:`Pacer.pause`).
* :meth:`Pacer.halt` (a fatal answer, or the stop signal) ends every wait for a slot at once,
  and no request gets one until :meth:`Pacer.resume`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from enum import Enum

WINDOW = 1.0  # seconds of answers the pace looks back on
SLACK = 0.02  # seconds a start may lag its slot and still keep the schedule
ERROR_BURST = 10  # server errors in a window that count as a throttling signal (if half or more)


class Signal(Enum):
    """What one answer says about the pace."""

    ACCEPTED = "accepted"  # any answer that was not a complaint about load
    THROTTLED = "throttled"  # 429 or a rate-limit code
    OVERLOADED = "overloaded"  # 5xx or code -1: a burst of these means slow down too


class Pacer:
    """Shared by every request in flight. ``limit`` None: no configured ceiling."""

    def __init__(
        self,
        limit: float | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        floor: float = 1.0,
        growth: float = 1.05,
        backoff: float = 0.9,
    ) -> None:
        self.limit = limit
        self.rate = limit  # None: unpaced until EngageLab complains
        self._clock = clock
        self._floor = floor
        self._growth = growth
        self._backoff = backoff
        self._next = 0.0
        self._gate = asyncio.Lock()
        self.halted = False
        self._waking: asyncio.Future[None] | None = None  # the sleep of the request at the gate
        self._cut = self._grown = clock()  # when the rate last went down, and up
        self._answers: deque[tuple[float, Signal]] = deque()

    def wait_time(self) -> float:
        """How long the next request must wait for its slot."""
        return max(0.0, self._next - self._clock())

    def take(self) -> None:
        """A request starts now: the next slot is one interval after the one it was due in.

        A request that starts a little late (an event loop wakes a millisecond after the
        timer) keeps the schedule, or every interval would stretch by that much and the rate
        fall short. One that starts later than SLACK (the process stalled) restarts the
        schedule from now instead of letting the ones after it catch up in a burst: a
        one-second window never holds more than ``rate * (1 + SLACK) + 1`` starts.
        """
        if self.rate:
            now = self._clock()
            due = self._next if self._next >= now - SLACK else now
            self._next = due + 1.0 / self.rate

    async def acquire(self) -> bool:
        """Wait for this request's slot and take it; requests pass the gate one at a time.

        False, and no slot taken, once the pacer is halted: a wait in progress ends at once.
        """
        async with self._gate:
            while not self.halted and (delay := self.wait_time()) > 0:
                await self._sleep(delay)
            if self.halted:
                return False
            self.take()
            return True

    async def _sleep(self, delay: float) -> None:
        """``asyncio.sleep(delay)`` (the same future and timer), that :meth:`halt` cuts short."""
        loop = asyncio.get_running_loop()
        self._waking = waking = loop.create_future()
        timer = loop.call_later(delay, _wake, waking)
        try:
            await waking
        finally:
            timer.cancel()
            self._waking = None

    def halt(self) -> None:
        """No request starts until :meth:`resume`; the one waiting for its slot stops waiting.

        Call it on the event loop's thread. A pause (``Retry-After``) still in force is kept.
        """
        self.halted = True
        if self._waking is not None:
            _wake(self._waking)

    def resume(self) -> None:
        """Let requests start again after :meth:`halt`."""
        self.halted = False

    def pause(self, seconds: float) -> None:
        """Nobody starts before ``seconds`` from now (``Retry-After``)."""
        self._next = max(self._next, self._clock() + seconds)

    def record(self, signal: Signal) -> None:
        """Account one answer and adapt the rate."""
        now = self._clock()
        answers = self._answers
        answers.append((now, signal))
        while answers and answers[0][0] < now - WINDOW:
            answers.popleft()
        slowing = signal is Signal.THROTTLED or (signal is Signal.OVERLOADED and self._overloaded())
        if slowing and now - self._cut >= WINDOW:
            accepted = sum(1 for _, s in answers if s is Signal.ACCEPTED) / WINDOW
            fallback = (self.rate or len(answers) / WINDOW) / 2
            self.rate = max(self._floor, self._backoff * accepted if accepted else fallback)
            self._cut = now
        elif (
            signal is Signal.ACCEPTED
            and self.rate is not None
            and (self.limit is None or self.rate < self.limit)
            and now - max(self._cut, self._grown) >= WINDOW
        ):
            grown = self.rate * self._growth
            self.rate = grown if self.limit is None else min(self.limit, grown)
            self._grown = now

    def _overloaded(self) -> bool:
        errors = sum(1 for _, s in self._answers if s is Signal.OVERLOADED)
        return errors >= ERROR_BURST and 2 * errors >= len(self._answers)


def _wake(waiting: asyncio.Future[None]) -> None:
    if not waiting.done():
        waiting.set_result(None)
