"""The pace of requests: spacing, Retry-After, and adapting to throttling (fake clock, no I/O)."""

import asyncio
import bisect
import random

import pytest

from cdc_sync.pacing import SLACK, Pacer, Signal


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def starts(pacer: Pacer, clock: Clock, count: int) -> list[float]:
    """Start ``count`` requests as the gate lets them through; their start times."""
    times = []
    for _ in range(count):
        clock.now += pacer.wait_time()
        pacer.take()
        times.append(clock.now)
    return times


def test_requests_are_spaced_evenly_at_the_limit() -> None:
    """At rate R, requests start 1/R seconds apart."""
    clock = Clock()

    times = starts(Pacer(10.0, clock), clock, 4)

    assert times == pytest.approx([100.0, 100.1, 100.2, 100.3])


def test_idle_time_is_not_banked_into_a_burst() -> None:
    """After an idle minute requests are still paced, not released all at once."""
    clock = Clock()
    pacer = Pacer(10.0, clock)
    pacer.take()
    clock.now += 60

    assert starts(pacer, clock, 3) == pytest.approx([160.0, 160.1, 160.2])


def test_a_stall_does_not_make_the_next_ones_bunch_up() -> None:
    """A request that starts long after its slot (a stall) pushes the next slot back."""
    clock = Clock()
    pacer = Pacer(10.0, clock)
    pacer.take()
    clock.now += 0.35  # due at 100.1, but the process stalled until 100.35

    pacer.take()

    assert pacer.wait_time() == pytest.approx(0.1)


def test_timer_jitter_does_not_lower_the_rate() -> None:
    """Starts that each lag their slot by up to a millisecond keep the configured rate."""
    clock = Clock()
    pacer = Pacer(200.0, clock)
    jitter = random.Random(3)

    for _ in range(2001):
        clock.now += pacer.wait_time() + jitter.random() * 0.001
        pacer.take()

    assert 2000 / (clock.now - 100.0) == pytest.approx(200.0, rel=0.01)


def test_no_limit_means_no_wait() -> None:
    """Without a configured limit and without complaints, nothing waits."""
    clock = Clock()

    assert starts(Pacer(None, clock), clock, 100) == [100.0] * 100


def test_retry_after_holds_every_later_request() -> None:
    """A pause (Retry-After) delays every request after it, paced from its end."""
    clock = Clock()
    pacer = Pacer(10.0, clock)
    pacer.pause(5)

    assert starts(pacer, clock, 2) == pytest.approx([105.0, 105.1])


@pytest.mark.parametrize("rate", [7.0, 100.0, 333.0])
def test_no_one_second_window_holds_more_than_rate_and_slack(rate: float) -> None:
    """With random stalls between requests, any 1 s window holds at most rate*(1+SLACK) + 1."""
    clock = Clock()
    pacer = Pacer(rate, clock)
    stalls = random.Random(1)
    times = []
    for _ in range(2000):
        clock.now += pacer.wait_time() + (stalls.random() * 0.2 if stalls.random() < 0.05 else 0)
        pacer.take()
        times.append(clock.now)

    busiest = max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))

    assert busiest <= rate * (1 + SLACK) + 1


def answer(pacer: Pacer, clock: Clock, signal: Signal, count: int, spread: float) -> None:
    for _ in range(count):
        clock.now += spread / count
        pacer.record(signal)


def test_throttling_sets_the_rate_just_below_what_was_accepted() -> None:
    """A 429 after a second of 100 accepted answers sets the rate to 90 at once."""
    clock = Clock()
    pacer = Pacer(None, clock)
    answer(pacer, clock, Signal.ACCEPTED, 100, 1.0)

    pacer.record(Signal.THROTTLED)

    assert pacer.rate == pytest.approx(90.0)


def test_one_cut_per_second_however_many_429s() -> None:
    """A burst of 429s in the same second cuts the rate once, not once per answer."""
    clock = Clock()
    pacer = Pacer(500.0, clock)
    clock.now += 2
    answer(pacer, clock, Signal.ACCEPTED, 50, 0.5)
    pacer.record(Signal.THROTTLED)
    cut = pacer.rate

    answer(pacer, clock, Signal.THROTTLED, 40, 0.5)

    assert cut == pytest.approx(45.0)
    assert pacer.rate == cut


def test_rate_grows_back_to_the_limit_and_no_further() -> None:
    """Each quiet second grows the rate by 5%, until the configured limit."""
    clock = Clock()
    pacer = Pacer(100.0, clock)
    clock.now += 2
    answer(pacer, clock, Signal.ACCEPTED, 80, 1.0)
    pacer.record(Signal.THROTTLED)

    rates: list[float] = []
    for _ in range(12):
        answer(pacer, clock, Signal.ACCEPTED, 50, 1.0)
        assert pacer.rate is not None
        rates.append(pacer.rate)

    first_step = next(rate for rate in rates if rate != 72.0)
    assert first_step == pytest.approx(72.0 * 1.05)
    assert rates == sorted(rates)
    assert rates[-1] == 100.0


def test_a_burst_of_server_errors_slows_down() -> None:
    """Mostly 5xx / code -1 answers within a second count as a throttling signal."""
    clock = Clock()
    pacer = Pacer(200.0, clock)
    clock.now += 2
    answer(pacer, clock, Signal.ACCEPTED, 10, 0.5)

    answer(pacer, clock, Signal.OVERLOADED, 15, 0.4)

    assert pacer.rate == pytest.approx(9.0)


def test_scattered_server_errors_do_not_slow_down() -> None:
    """A few errors among many good answers leave the rate alone."""
    clock = Clock()
    pacer = Pacer(200.0, clock)
    clock.now += 2
    for _ in range(10):
        answer(pacer, clock, Signal.ACCEPTED, 20, 0.1)
        answer(pacer, clock, Signal.OVERLOADED, 1, 0.01)

    assert pacer.rate == 200.0


def simulate(limit: float | None, capacity: float, seconds: float) -> tuple[int, int]:
    """Requests paced by a Pacer against a server taking ``capacity`` per second (token bucket
    holding one second); returns (sent, throttled) after the first ten seconds."""
    clock = Clock()
    pacer = Pacer(limit, clock)
    tokens, last, sent, throttled = capacity, clock.now, 0, 0
    start = clock.now
    step = 1 / 2000  # an eager client: up to 2000 attempts a second when unpaced
    while clock.now - start < seconds:
        clock.now += max(step, pacer.wait_time())
        pacer.take()
        tokens = min(capacity, tokens + (clock.now - last) * capacity)
        last = clock.now
        late = clock.now - start > 10
        if tokens >= 1:
            tokens -= 1
            pacer.record(Signal.ACCEPTED)
        else:
            pacer.record(Signal.THROTTLED)
            pacer.pause(1.0)  # the server's Retry-After
            throttled += late
        sent += late
    return sent, throttled


@pytest.mark.parametrize("limit", [None, 500.0, 150.0])
def test_against_a_fixed_throttle_few_requests_are_refused(limit: float | None) -> None:
    """Against a server that takes 100/s, after ten seconds under 5% of requests are throttled,
    and the server is kept busy (at least 80/s get through)."""
    sent, throttled = simulate(limit, capacity=100.0, seconds=60.0)

    assert throttled / sent < 0.05
    assert (sent - throttled) / 50.0 >= 80.0


def test_halt_ends_the_waits_for_a_slot_at_once() -> None:
    """A halt wakes the request sleeping through a pause and the ones queued behind it: none
    gets a slot, and the pause stands for when requests resume."""
    pacer = Pacer(10.0)  # the real clock: the sleep is asyncio's timer

    async def halted_while_waiting() -> list[bool]:
        pacer.pause(600)  # Retry-After: 600
        waiting = [asyncio.create_task(pacer.acquire()) for _ in range(3)]
        await asyncio.sleep(0)  # one sleeps at the gate, two queue for it
        pacer.halt()
        return await asyncio.wait_for(asyncio.gather(*waiting), 60)  # hang guard only

    got = asyncio.run(halted_while_waiting())

    assert got == [False, False, False]
    assert pacer.wait_time() > 500


def test_after_resume_requests_get_slots_again() -> None:
    """A halted pacer gives no slot until resumed, then paces as before."""
    pacer = Pacer(None)

    async def acquire_twice() -> tuple[bool, bool]:
        pacer.halt()
        halted = await pacer.acquire()
        pacer.resume()
        return halted, await pacer.acquire()

    assert asyncio.run(acquire_twice()) == (False, True)
