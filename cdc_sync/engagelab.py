"""The EngageLab MA client: one pure classification of every answer, and the I/O around it.

:func:`classify` turns an HTTP status and body into a :class:`Verdict`; nothing else in cdc-sync
looks at status codes or API codes. :class:`EngageLabClient` pushes a page of payloads with a
bounded number of requests in flight, paced by a shared token bucket, from synchronous code (it
owns a private event loop thread so the connection pool stays warm across pages and cycles).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import httpx

from cdc_sync.mapping import Payload

T = TypeVar("T")

CONTACT_PATH = "/v1/user/contact"

FATAL_CODES = frozenset({40050, 50031, 50034, 50074})
PERMANENT_CODES = frozenset({40007, 55004, 55014, 55101, 55102, 55103, 55105, 55106, 55107, 55108})
TRANSIENT_CODES = frozenset({-1})


class Verdict(StrEnum):
    """What one answer means for the user and for the sync."""

    SUCCESS = "success"  # code 0: success or partial success (no per-key detail exists)
    TRANSIENT = "transient"  # try this user again later, with backoff
    PERMANENT = "permanent"  # this payload will never be accepted; wait for the row to change
    FATAL = "fatal"  # every request will fail (credentials, project): stop the cycle


@dataclass(frozen=True, slots=True)
class ApiResult:
    """One classified answer (or transport failure) for one request."""

    verdict: Verdict
    code: int | None
    status: int | None
    message: str
    retry_after: float | None = None
    throttled: bool = False


@dataclass(frozen=True)
class CodePolicy:
    """The configurable part of classification: per-code overrides and the default for unknowns."""

    overrides: Mapping[int, Verdict] = field(default_factory=dict)
    unknown: Verdict = Verdict.PERMANENT
    rate_limit_codes: frozenset[int] = frozenset()


def classify(
    status: int,
    body: bytes,
    retry_after: str | None = None,
    policy: CodePolicy = CodePolicy(),
) -> ApiResult:
    """Classify one HTTP answer: the body's ``code`` decides first, the HTTP status second."""
    delay = parse_retry_after(retry_after)
    code, message = _parse_body(body)
    if code is None:
        if status in (401, 403):
            return ApiResult(Verdict.FATAL, None, status, f"HTTP {status} without an API code")
        throttled = status == 429
        return ApiResult(
            Verdict.TRANSIENT,
            None,
            status,
            f"HTTP {status}, body is not an API answer",
            delay,
            throttled,
        )
    if code in policy.overrides:
        verdict = policy.overrides[code]
    elif code == 0:
        verdict = Verdict.SUCCESS if 200 <= status < 300 else Verdict.TRANSIENT
    elif code in FATAL_CODES:
        verdict = Verdict.FATAL
    elif code in policy.rate_limit_codes or status == 429:
        return ApiResult(Verdict.TRANSIENT, code, status, message, delay, True)
    elif code in TRANSIENT_CODES:
        verdict = Verdict.TRANSIENT
    elif code in PERMANENT_CODES:
        verdict = Verdict.PERMANENT
    elif status in (401, 403):
        verdict = Verdict.FATAL
    elif status >= 500:
        verdict = Verdict.TRANSIENT
    else:
        verdict = policy.unknown
    return ApiResult(verdict, code, status, message, delay)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _parse_body(body: bytes) -> tuple[int | None, str]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, ""
    if not isinstance(data, dict):
        return None, ""
    code = data.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return None, ""
    message = data.get("message")
    return code, (message if isinstance(message, str) else "")[:200]


class TokenBucket:
    """Paces requests to ``rate`` per second, shared by every request in flight.

    Reservation style: each caller is handed the next free slot, so requests are spread evenly
    instead of bursting at the start of each second. ``pause(seconds)`` pushes every future slot
    back, which is how a ``Retry-After`` answer stops all workers, not just the one that got it.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._next = 0.0

    def reserve(self) -> float:
        """Claim the next slot; returns how long the caller must wait for it."""
        now = self._clock()
        start = max(now, self._next)
        if self.rate:
            self._next = start + 1.0 / self.rate
        return start - now

    def pause(self, seconds: float) -> None:
        self._next = max(self._next, self._clock() + seconds)

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


class EngageLabClient:
    """Pushes payloads to ``POST /v1/user/contact``; safe to call from any one thread at a time."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        api_secret: str,
        *,
        timeout: float = 10.0,
        concurrency: int = 8,
        rate_limit: float | None = None,
        policy: CodePolicy = CodePolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + CONTACT_PATH
        self.concurrency = concurrency
        self.policy = policy
        self.bucket = TokenBucket(rate_limit)
        token = base64.b64encode(f"{api_key}:{api_secret}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self._timeout = timeout
        self._transport = transport
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="engagelab", daemon=True
        )
        self._thread.start()
        self._client = self._run(self._open())

    async def _open(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        return httpx.AsyncClient(
            timeout=self._timeout, limits=limits, transport=self._transport, headers=self._headers
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def push_all(self, payloads: Sequence[Payload]) -> list[ApiResult | None]:
        """Push every payload; after a FATAL answer no new request starts (those stay ``None``)."""
        return self._run(self._push_all(payloads))

    async def _push_all(self, payloads: Sequence[Payload]) -> list[ApiResult | None]:
        results: list[ApiResult | None] = [None] * len(payloads)
        pending = iter(range(len(payloads)))
        stop = asyncio.Event()

        async def worker() -> None:
            for index in pending:
                if stop.is_set():
                    return
                await self.bucket.acquire()
                if stop.is_set():
                    return
                result = await self.push(payloads[index])
                results[index] = result
                if result.verdict is Verdict.FATAL:
                    stop.set()

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(payloads)))))
        return results

    async def push(self, payload: Payload) -> ApiResult:
        """One request; transport failures become TRANSIENT results, never exceptions."""
        body = json.dumps(payload.body(), separators=(",", ":"), ensure_ascii=False).encode()
        try:
            response = await self._client.post(self.url, content=body)
        except httpx.TimeoutException:
            return ApiResult(Verdict.TRANSIENT, None, None, "request timed out")
        except httpx.TransportError as exc:
            return ApiResult(
                Verdict.TRANSIENT, None, None, f"connection failed: {type(exc).__name__}"
            )
        result = classify(
            response.status_code, response.content, response.headers.get("retry-after"), self.policy
        )
        if result.retry_after:
            self.bucket.pause(result.retry_after)
        return result

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> EngageLabClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
