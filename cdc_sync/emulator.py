"""A stand-in for EngageLab Marketing Automation, served over real HTTP.

Tests, the demo and the benchmarks point cdc-sync at this server instead of EngageLab. It answers
``POST /v1/user/contact`` and ``POST /v1/user/register`` with the codes the API document lists,
keeps what it accepted so a test can ask "was this user pushed, once, with these values", and can
misbehave on purpose (latency, proxy 503 pages, ``-1`` errors, dropped connections, throttling,
forced codes) so the client's retry and classification paths run against something real.

Layout: the decisions (parse a body, merge contacts, pick a fault, take a token) are pure
functions over values; :class:`Emulator` holds the state and the aiohttp handlers;
:class:`EmulatorServer` runs it on a background thread for in-process use; :func:`main` runs it in
the foreground for other processes (``cdc-sync emulator`` and ``python -m cdc_sync.emulator``).

Admin endpoints (JSON, no auth): ``GET /_emulator/contacts``, ``/_emulator/received``,
``/_emulator/stats``, ``/_emulator/faults``, ``/_emulator/health``; ``POST /_emulator/faults``
(replace the faults) and ``POST /_emulator/reset``. Admin requests are not counted in the stats,
so reading them does not change them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import enum
import hashlib
import hmac
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType, TracebackType
from typing import Any

from aiohttp import web

from cdc_sync import mapping
from cdc_sync.errors import EX_UNAVAILABLE
from cdc_sync.normalise import VALUE_LIMIT

CONTACT_KEYS = frozenset(mapping.CONTACT_KEYS)
IDENTITY_NAMES = frozenset({"user_id", "anonymous_id", "registration_id"})
FATAL_CODES = frozenset({40050, 50031, 50034, 50074})
FIRST_EUID = 10_000_000  # EUIDs register gives are FIRST_EUID + 48 bits of a digest
MAX_IDENTITY_VALUES = 100
MAX_IDENTITY_LENGTH = 256
CONTACT_PATH = "/v1/user/contact"
REGISTER_PATH = "/v1/user/register"
MESSAGES = {
    40050: "authentication failed",
    50031: "project id invalid",
    50034: "project does not exist",
    50074: "API data source does not exist",
    -1: "internal error",
}
PROXY_PAGE = "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"


class FaultKind(enum.StrEnum):
    """A misbehaviour the emulator can answer with instead of the real answer."""

    DROPPED = "dropped"  # connection closed, no response at all
    UNAVAILABLE = "unavailable"  # HTTP 503 with an HTML proxy page
    SERVER_ERROR = "server_error"  # HTTP 500 with code -1
    THROTTLED = "throttled"  # HTTP 429, optionally with Retry-After


def _check_number(name: str, value: object, low: float, high: float = math.inf) -> None:
    """Raise ValueError unless ``value`` is a real number (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be a number between {low} and {high}, got {value!r}")


def _check_int(name: str, value: object, low: float = -math.inf, high: float = math.inf) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer between {low} and {high}, got {value!r}")


@dataclass(frozen=True)
class Faults:
    """How the emulator misbehaves; every random choice comes from ``random.Random(seed)``.

    ``drop_rate``, ``error_rate`` (503 page) and ``server_error_rate`` (500, code -1) are fractions
    of requests and must sum to at most 1. ``latency`` ± ``latency_jitter`` seconds are slept before
    answering. ``throttle_rps`` caps the rate (bucket of one second's worth, at least one request);
    the excess gets 429, with ``Retry-After: retry_after`` if set. ``throttled_euids`` are always
    answered that 429, however slow the rate. ``fail_codes`` forces a code for
    chosen euids, ``auth_fail_code`` for every request. ``auth_status`` and ``error_status`` are the
    HTTP statuses sent with fatal codes and with other business codes. ``answers`` scripts the
    whole answer for chosen euids: ``{euid: [status, body]}``, the body sent as it is, except that
    ``{email}``, ``{mobile_phone}``, ... become the value received for that contact (escaped for
    a JSON string), as an API that echoes what it refuses would.

    For ``register``: ``register_drop`` lists identity values a successful answer leaves out of
    ``data`` (a partial success); ``register_codes`` answers a whole register request holding a
    chosen value with a code (``-1``: HTTP 500; a fatal code: ``auth_status``). With
    ``hold_contacts`` a contact request is not answered until the faults change (a test holds
    pushes there, e.g. to kill cdc-sync between ``register`` and the push).
    """

    latency: float = 0.0
    latency_jitter: float = 0.0
    error_rate: float = 0.0
    server_error_rate: float = 0.0
    drop_rate: float = 0.0
    throttle_rps: float | None = None
    retry_after: int | None = None
    throttled_euids: Collection[int] = frozenset()
    fail_codes: Mapping[int, int] = field(default_factory=dict)
    answers: Mapping[int, tuple[int, str]] = field(default_factory=dict)
    auth_fail_code: int | None = None
    seed: int = 0
    auth_status: int = 401
    error_status: int = 400
    register_drop: frozenset[str] = frozenset()
    register_codes: Mapping[str, int] = field(default_factory=dict)
    hold_contacts: bool = False

    def __post_init__(self) -> None:
        """Check every setting once, so the request path can trust them."""
        _check_number("latency", self.latency, 0.0)
        _check_number("latency_jitter", self.latency_jitter, 0.0)
        for name in ("error_rate", "server_error_rate", "drop_rate"):
            _check_number(name, getattr(self, name), 0.0, 1.0)
        if self.error_rate + self.server_error_rate + self.drop_rate > 1.0:
            raise ValueError("error_rate + server_error_rate + drop_rate must not exceed 1")
        if self.throttle_rps is not None:
            _check_number("throttle_rps", self.throttle_rps, 1e-9)
        if self.retry_after is not None:
            _check_int("retry_after", self.retry_after, 0)
        if self.auth_fail_code is not None:
            _check_int("auth_fail_code", self.auth_fail_code)
        _check_int("seed", self.seed)
        _check_int("auth_status", self.auth_status, 200, 599)
        _check_int("error_status", self.error_status, 200, 599)
        if not isinstance(self.fail_codes, Mapping):
            raise ValueError("fail_codes must map euid to code")
        try:
            codes = {int(euid): int(code) for euid, code in self.fail_codes.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError("fail_codes must map integer euids to integer codes") from exc
        # Read-only, so a Faults shared between threads cannot change under the server.
        object.__setattr__(self, "fail_codes", MappingProxyType(codes))
        if not isinstance(self.answers, Mapping):
            raise ValueError("answers must map euid to [status, body]")
        answers = {}
        for euid, answer in self.answers.items():
            try:
                status, body = answer
            except (TypeError, ValueError) as exc:
                raise ValueError("answers must map euid to [status, body]") from exc
            _check_int("answer status", status, 100, 599)
            if not isinstance(body, str):
                raise ValueError("an answer's body must be a string")
            answers[int(euid)] = (status, body)
        object.__setattr__(self, "answers", MappingProxyType(answers))
        if isinstance(self.throttled_euids, str | bytes) or not isinstance(
            self.throttled_euids, Collection
        ):
            raise ValueError("throttled_euids must be a list of euids")
        for euid in self.throttled_euids:
            _check_int("throttled_euids", euid)
        object.__setattr__(self, "throttled_euids", frozenset(self.throttled_euids))
        if isinstance(self.register_drop, str | bytes) or not isinstance(
            self.register_drop, Collection
        ):
            raise ValueError("register_drop must be a list of identity values")
        object.__setattr__(self, "register_drop", frozenset(map(str, self.register_drop)))
        if not isinstance(self.register_codes, Mapping):
            raise ValueError("register_codes must map identity value to code")
        for code in self.register_codes.values():
            _check_int("register code", code)
        codes_by_value = {str(value): code for value, code in self.register_codes.items()}
        object.__setattr__(self, "register_codes", MappingProxyType(codes_by_value))
        if not isinstance(self.hold_contacts, bool):
            raise ValueError("hold_contacts must be true or false")

    @classmethod
    def from_json(cls, data: object) -> Faults:
        """Build from a decoded JSON object (string euid keys allowed); ValueError if invalid."""
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready dict (the inverse of :meth:`from_json`)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        settings["fail_codes"] = {str(euid): code for euid, code in self.fail_codes.items()}
        settings["answers"] = {str(euid): list(answer) for euid, answer in self.answers.items()}
        settings["throttled_euids"] = sorted(self.throttled_euids)
        settings["register_drop"] = sorted(self.register_drop)
        settings["register_codes"] = dict(self.register_codes)
        return settings


@dataclass(frozen=True)
class Rejection:
    """A business error: the ``code`` and ``message`` the API puts in the body."""

    code: int
    message: str


@dataclass(frozen=True)
class ContactUpdate:
    """A valid contact request: the user and the contacts to merge (``""`` clears a key)."""

    euid: int
    contacts: dict[str, str]


@dataclass(frozen=True)
class RegisterRequest:
    """A valid register request: the identifier kind and the values to resolve."""

    identity_name: str
    identity_values: tuple[str, ...]


@dataclass(frozen=True)
class TokenBucket:
    """Throttle state: ``tokens`` left at monotonic time ``stamp``."""

    tokens: float
    stamp: float


def _json_object(raw: bytes) -> dict[str, Any] | Rejection:
    """Decode a request body that must be a JSON object."""
    try:
        body = json.loads(raw)
    except ValueError:  # covers JSONDecodeError and undecodable UTF-8
        return Rejection(55004, "request body is not valid JSON")
    if not isinstance(body, dict):
        return Rejection(55004, "request body must be a JSON object")
    return body


def parse_contact_request(raw: bytes) -> ContactUpdate | Rejection:
    """Validate a ``/v1/user/contact`` body: euid first, then contacts; the first problem wins."""
    body = _json_object(raw)
    if isinstance(body, Rejection):
        return body
    euid = body.get("euid")
    if euid is None:
        return Rejection(40007, "euid is empty")
    if isinstance(euid, bool) or not isinstance(euid, int) or euid <= 0:
        return Rejection(55108, "euid is invalid")
    contacts = body.get("contacts")
    if not isinstance(contacts, dict) or not contacts:
        return Rejection(55004, "contacts must be a non-empty object")
    for key, value in contacts.items():
        if key not in CONTACT_KEYS:
            return Rejection(55102, f"invalid contact key {key[:64]!r}")
        if not isinstance(value, str):
            return Rejection(55004, f"contact {key!r} must be a string")
        if value and not contact_value_ok(key, value):
            return Rejection(55004, f"contact {key!r} is not a valid value")
    return ContactUpdate(euid, dict(contacts))


_EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")
_PHONE_SHAPE = re.compile(r"\+?[0-9][0-9 ().\-]*")


def contact_value_ok(key: str, value: str) -> bool:
    """Whether a contact value is one a channel could use (EngageLab documents no format: this
    is the least a real one needs): at most 256 characters without control characters; an
    e-mail address shaped ``local@domain.tld``; a phone of digits (a leading ``+``, spaces,
    ``-``, ``.`` and brackets allowed, as people write them). ``""`` (clearing) is checked
    by the caller."""
    if len(value) > VALUE_LIMIT or any(unicodedata.category(c) == "Cc" for c in value):
        return False
    shape = _EMAIL_SHAPE if key == "email" else _PHONE_SHAPE
    return shape.fullmatch(value) is not None


def parse_register_request(raw: bytes) -> RegisterRequest | Rejection:
    """Validate a ``/v1/user/register`` body; one bad value rejects the whole request."""
    body = _json_object(raw)
    if isinstance(body, Rejection):
        return body
    name = body.get("identity_name")
    if name not in IDENTITY_NAMES:
        return Rejection(55106, "identity_name is invalid")
    values = body.get("identity_values")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        return Rejection(55004, "identity_values must be a list of strings")
    if not 1 <= len(values) <= MAX_IDENTITY_VALUES:
        return Rejection(55101, f"identity_values must hold 1 to {MAX_IDENTITY_VALUES} values")
    if any(len(v) > MAX_IDENTITY_LENGTH for v in values):
        return Rejection(55105, f"identity values are limited to {MAX_IDENTITY_LENGTH} characters")
    if any(v == "" for v in values):
        return Rejection(55107, "identity value is empty")
    return RegisterRequest(str(name), tuple(values))


def euid_for(seed: int, name: str, value: str) -> int:
    """The EUID register gives an identity value: the same for the same seed on every call and
    in every process, so a restarted emulator resolves a value as before."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{value}".encode()).digest()
    return FIRST_EUID + int.from_bytes(digest[:6], "big")


def merge_contacts(stored: Mapping[str, str], patch: Mapping[str, str]) -> dict[str, str]:
    """Apply a patch: given keys replace stored ones, ``""`` removes a key, others stay."""
    merged = dict(stored)
    for key, value in patch.items():
        if value:
            merged[key] = value
        else:
            merged.pop(key, None)
    return merged


def pick_fault(faults: Faults, draw: float) -> FaultKind | None:
    """Map one uniform draw in [0, 1) onto drop, 503 and 500 by their cumulative rates."""
    threshold = faults.drop_rate
    if draw < threshold:
        return FaultKind.DROPPED
    threshold += faults.error_rate
    if draw < threshold:
        return FaultKind.UNAVAILABLE
    threshold += faults.server_error_rate
    if draw < threshold:
        return FaultKind.SERVER_ERROR
    return None


def delay_for(faults: Faults, draw: float) -> float:
    """Return the latency for one request: ``latency`` ± ``latency_jitter``, never negative."""
    return max(0.0, faults.latency + faults.latency_jitter * (2.0 * draw - 1.0))


def full_bucket(rate: float | None, now: float) -> TokenBucket:
    """Return a bucket holding one second's worth of tokens (at least one)."""
    return TokenBucket(max(1.0, rate or 0.0), now)


def take_token(bucket: TokenBucket, rate: float, now: float) -> tuple[TokenBucket, bool]:
    """Refill the bucket for the time passed, then take one token if there is one."""
    tokens = min(max(1.0, rate), bucket.tokens + (now - bucket.stamp) * rate)
    if tokens >= 1.0:
        return TokenBucket(tokens - 1.0, now), True
    return TokenBucket(tokens, now), False


def status_for(code: int, faults: Faults) -> int:
    """Choose the HTTP status for a business code (the real one is undocumented)."""
    if code in FATAL_CODES:
        return faults.auth_status
    if code == -1:
        return 500
    return faults.error_status


def is_authorized(header: str | None, credentials: bytes) -> bool:
    """Tell whether an Authorization header is HTTP Basic for exactly ``key:secret``."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, credentials)


def _message(code: int) -> str:
    """Return the message EngageLab would send with a code the emulator is told to force."""
    return MESSAGES.get(code, f"error {code} forced by the emulator")


def scripted_body(body: str, contacts: Mapping[str, str]) -> str:
    """A scripted answer's body with ``{email}`` and the like replaced by the values received."""
    for key in CONTACT_KEYS:
        body = body.replace("{" + key + "}", json.dumps(contacts.get(key, ""))[1:-1])
    return body


def _throttled(faults: Faults) -> web.Response:
    """HTTP 429, with ``Retry-After`` if the faults set one."""
    headers = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
    return web.json_response(
        {"code": 429, "message": "too many requests"}, status=429, headers=headers
    )


def _answer(code: int, message: str, status: int) -> web.Response:
    """Build an API answer with the documented ``{code, message}`` body."""
    return web.json_response({"code": code, "message": message}, status=status)


class Emulator:
    """The emulator's state and its aiohttp application; nothing runs until ``app()`` is served.

    Handlers run on the server's loop thread; every read or write of the state holds ``_lock``, so
    the accessors below are safe to call from any thread.
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        faults: Faults = Faults(),
        known_euids: Iterable[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._credentials = f"{api_key}:{api_secret}".encode()
        self._configured_euids = None if known_euids is None else frozenset(known_euids)
        self._clock = clock
        self._lock = threading.Lock()
        self._clear(faults)

    def _clear(self, faults: Faults) -> None:
        """Forget everything and start over with ``faults`` (call with the lock held)."""
        self._faults = faults
        self._rng = random.Random(faults.seed)  # noqa: S311 -- fault injection, not security
        self._bucket = full_bucket(faults.throttle_rps, self._clock())
        self._contacts: dict[int, dict[str, str]] = {}
        self._received: dict[int, list[dict[str, str]]] = {}
        self._identities: dict[tuple[str, str], int] = {}
        self._issued: set[int] = set()
        self._resolved: Counter[tuple[str, str]] = Counter()
        self._register_calls: list[tuple[str, tuple[str, ...]]] = []
        self._known = None if self._configured_euids is None else set(self._configured_euids)
        self._requests = 0
        self._paths: Counter[str] = Counter()
        self._accepted = 0
        self._rejected: Counter[int] = Counter()
        self._fired: Counter[str] = Counter()

    @property
    def contacts(self) -> dict[int, dict[str, str]]:
        """A snapshot of the stored contacts per euid."""
        with self._lock:
            return {euid: dict(stored) for euid, stored in self._contacts.items()}

    def received(self, euid: int) -> list[dict[str, str]]:
        """The contact payloads accepted for ``euid``, in arrival order."""
        with self._lock:
            return [dict(payload) for payload in self._received.get(euid, [])]

    def all_received(self) -> dict[int, list[dict[str, str]]]:
        """The accepted contact payloads of every euid, in arrival order."""
        with self._lock:
            return {euid: [dict(p) for p in ps] for euid, ps in self._received.items()}

    def register_calls(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every valid register request received: its identity name and values, in order."""
        with self._lock:
            return list(self._register_calls)

    def resolved(self) -> dict[tuple[str, str], int]:
        """How often each (identity name, value) was answered with its EUID."""
        with self._lock:
            return dict(self._resolved)

    def stats(self) -> dict[str, Any]:
        """Counts of API requests, per path, accepted, rejected per code and faults per kind."""
        with self._lock:
            return {
                "requests": self._requests,
                "paths": dict(self._paths),
                "accepted": self._accepted,
                "rejected": dict(self._rejected),
                "faults": {kind.value: self._fired[kind.value] for kind in FaultKind},
            }

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        with self._lock:
            return self._faults

    def set_faults(self, faults: Faults) -> None:
        """Replace the faults, re-seed the random source and refill the throttle bucket."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)  # noqa: S311 -- fault injection only
            self._bucket = full_bucket(faults.throttle_rps, self._clock())

    def reset(self) -> None:
        """Clear stored contacts, registrations, counts and faults."""
        with self._lock:
            self._clear(Faults())

    def app(self) -> web.Application:
        """Build a fresh aiohttp application serving this emulator's state."""
        app = web.Application()
        app.router.add_post(CONTACT_PATH, self._contact)
        app.router.add_post(REGISTER_PATH, self._register)
        app.router.add_get("/_emulator/health", self._admin_health)
        app.router.add_get("/_emulator/contacts", self._admin_contacts)
        app.router.add_get("/_emulator/received", self._admin_received)
        app.router.add_get("/_emulator/stats", self._admin_stats)
        app.router.add_get("/_emulator/faults", self._admin_get_faults)
        app.router.add_post("/_emulator/faults", self._admin_set_faults)
        app.router.add_post("/_emulator/reset", self._admin_reset)
        return app

    def _reject(self, rejection: Rejection, faults: Faults) -> web.Response:
        """Count a rejection and answer it."""
        with self._lock:
            self._rejected[rejection.code] += 1
        return _answer(rejection.code, rejection.message, status_for(rejection.code, faults))

    async def _gate(self, request: web.Request) -> tuple[Faults, web.StreamResponse | None]:
        """Do what every API request goes through: count, throttle, sleep, fault, authenticate.

        Returns the faults in force and, if the request is answered here, the answer. Both random
        draws are taken for every request, so a seed fixes the outcome of the n-th request.
        """
        with self._lock:
            faults = self._faults
            self._requests += 1
            self._paths[request.path] += 1
            fault_draw, delay_draw = self._rng.random(), self._rng.random()
            allowed = True
            if faults.throttle_rps is not None:
                self._bucket, allowed = take_token(self._bucket, faults.throttle_rps, self._clock())
            fault = pick_fault(faults, fault_draw) if allowed else FaultKind.THROTTLED
            if fault is not None:
                self._fired[fault.value] += 1
        if fault is FaultKind.THROTTLED:
            return faults, _throttled(faults)
        delay = delay_for(faults, delay_draw)
        if delay > 0.0:
            await asyncio.sleep(delay)
        if fault is FaultKind.DROPPED:
            # Read the body first: closing with unread bytes would send RST instead of FIN.
            await request.read()
            if request.transport is not None:
                request.transport.close()
            return faults, web.Response()  # never reaches the client: the socket is closed
        if fault is FaultKind.UNAVAILABLE:
            return faults, web.Response(status=503, text=PROXY_PAGE, content_type="text/html")
        if fault is FaultKind.SERVER_ERROR:
            return faults, _answer(-1, "internal error", 500)
        if not is_authorized(request.headers.get("Authorization"), self._credentials):
            return faults, self._reject(Rejection(40050, _message(40050)), faults)
        if faults.auth_fail_code is not None:
            code = faults.auth_fail_code
            return faults, self._reject(Rejection(code, _message(code)), faults)
        return faults, None

    async def _contact(self, request: web.Request) -> web.StreamResponse:
        """Handle ``POST /v1/user/contact``: validate, then merge into the stored contacts."""
        faults, answered = await self._gate(request)
        if answered is not None:
            return answered
        parsed = parse_contact_request(await request.read())
        if isinstance(parsed, Rejection):
            return self._reject(parsed, faults)
        while self.faults.hold_contacts:  # answered once a test lets go
            await asyncio.sleep(0.01)
        faults = self.faults
        scripted = faults.answers.get(parsed.euid)
        if scripted is not None:
            status, body = scripted
            text = scripted_body(body, parsed.contacts)
            return web.Response(status=status, text=text, content_type="application/json")
        with self._lock:
            forced = faults.fail_codes.get(parsed.euid)
            if parsed.euid in faults.throttled_euids:
                self._fired[FaultKind.THROTTLED.value] += 1
                return _throttled(faults)
            if forced is not None:
                rejection: Rejection | None = Rejection(forced, _message(forced))
            elif self._known is not None and parsed.euid not in self._known:
                rejection = Rejection(55108, "euid is unknown")
            else:
                rejection = None
                stored = self._contacts.get(parsed.euid, {})
                self._contacts[parsed.euid] = merge_contacts(stored, parsed.contacts)
                self._received.setdefault(parsed.euid, []).append(parsed.contacts)
                self._accepted += 1
        if rejection is not None:
            return self._reject(rejection, faults)
        return _answer(0, "success", 200)

    async def _register(self, request: web.Request) -> web.StreamResponse:
        """Handle ``POST /v1/user/register``: one stable euid per (identity name, value)."""
        faults, answered = await self._gate(request)
        if answered is not None:
            return answered
        parsed = parse_register_request(await request.read())
        if isinstance(parsed, Rejection):
            return self._reject(parsed, faults)
        with self._lock:
            self._register_calls.append((parsed.identity_name, parsed.identity_values))
        codes = faults.register_codes
        forced = next((codes[v] for v in parsed.identity_values if v in codes), None)
        if forced is not None:
            return self._reject(Rejection(forced, _message(forced)), faults)
        data = []
        with self._lock:
            for value in parsed.identity_values:
                if value in faults.register_drop:
                    continue
                identity = (parsed.identity_name, value)
                euid = self._identities.get(identity)
                if euid is None:
                    euid = euid_for(faults.seed, *identity)
                    while euid in self._issued:  # a digest collision: the next free one
                        euid += 1
                    self._identities[identity] = euid
                    self._issued.add(euid)
                    if self._known is not None:
                        self._known.add(euid)
                self._resolved[identity] += 1
                data.append({"identity_value": value, "euid": euid})
            self._accepted += 1
        return web.json_response({"code": 0, "message": "success", "data": data})

    async def _admin_health(self, request: web.Request) -> web.StreamResponse:
        """Answer 200 so a parent process can tell the server is up."""
        return web.json_response({"status": "ok"})

    async def _admin_contacts(self, request: web.Request) -> web.StreamResponse:
        """Return the stored contacts as ``{"<euid>": {key: value}}``."""
        return web.json_response({str(euid): c for euid, c in self.contacts.items()})

    async def _admin_received(self, request: web.Request) -> web.StreamResponse:
        """Return the accepted payloads as ``{"<euid>": [payload, ...]}``."""
        return web.json_response({str(euid): p for euid, p in self.all_received().items()})

    async def _admin_stats(self, request: web.Request) -> web.StreamResponse:
        """Return :meth:`stats` (JSON turns the rejected codes into string keys)."""
        return web.json_response(self.stats())

    async def _admin_get_faults(self, request: web.Request) -> web.StreamResponse:
        """Return the faults in force."""
        return web.json_response(self.faults.to_json())

    async def _admin_set_faults(self, request: web.Request) -> web.StreamResponse:
        """Replace the faults with the posted settings (absent ones take their defaults)."""
        try:
            faults = Faults.from_json(json.loads(await request.read()))
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.set_faults(faults)
        return web.json_response(faults.to_json())

    async def _admin_reset(self, request: web.Request) -> web.StreamResponse:
        """Clear all state, counts and faults."""
        self.reset()
        return web.json_response({"status": "reset"})


def _url(host: str, port: int) -> str:
    """Format a base URL, bracketing IPv6 hosts."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start_site(emulator: Emulator, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve the emulator on host:port (0 picks a free port); return the runner and base URL."""
    runner = web.AppRunner(emulator.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, _url(host, runner.addresses[0][1])


async def _cancel_pending() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class EmulatorServer:
    """Runs an :class:`Emulator` on its own event loop in a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`; ``url`` is the base URL.
    """

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self._host = host
        self._port = port
        self._url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:43125``; only known once started."""
        if self._url is None:
            raise RuntimeError("the emulator server is not running")
        return self._url

    def start(self) -> EmulatorServer:
        """Start serving and return once the socket listens; re-raise a failure to bind."""
        if self._thread is not None:
            raise RuntimeError("the emulator server is already running")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="engagelab-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def _run(self) -> None:
        """Thread body: set up the site, signal readiness, serve until stopped, clean up."""
        loop = asyncio.new_event_loop()
        try:
            runner, self._url = loop.run_until_complete(
                _start_site(self.emulator, self._host, self._port)
            )
        except BaseException as exc:  # handed to start(), which re-raises it in the caller
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            # A handler still sleeping out its latency after the shutdown timeout (its client
            # gave up) is cancelled and awaited, not destroyed pending with the loop.
            loop.run_until_complete(_cancel_pending())
            loop.close()

    def stop(self) -> None:
        """Stop serving and wait for the thread to finish; a no-op if not running."""
        if self._thread is None:
            return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None
        self._loop = None
        self._url = None

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    """Describe the command line of ``cdc-sync emulator``."""
    parser = argparse.ArgumentParser(
        prog="cdc-sync emulator", description="Serve an EngageLab MA stand-in until SIGTERM."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--api-key", help="default: $ENGAGELAB_API_KEY")
    parser.add_argument(
        "--api-secret", help="default: $ENGAGELAB_API_SECRET (preferred: flags show in ps)"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--latency-jitter", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction answered 503")
    parser.add_argument("--server-error-rate", type=float, default=0.0, help="fraction -1/500")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="fraction dropped")
    parser.add_argument("--throttle-rps", type=float, default=None)
    parser.add_argument("--retry-after", type=int, default=None, help="Retry-After on 429")
    parser.add_argument("--auth-fail-code", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser


async def _serve_until_signalled(emulator: Emulator, host: str, port: int) -> None:
    """Serve in the foreground, announce the URL on stdout, stop on SIGTERM or SIGINT."""
    runner, url = await _start_site(emulator, host, port)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    print(f"emulator listening on {url}", flush=True)
    try:
        await stopped.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground until SIGTERM/SIGINT; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    api_key = args.api_key or os.environ.get("ENGAGELAB_API_KEY")
    api_secret = args.api_secret or os.environ.get("ENGAGELAB_API_SECRET")
    if not api_key or not api_secret:
        parser.error("an API key and secret are required (flags or ENGAGELAB_API_KEY/_SECRET)")
    try:
        faults = Faults(
            latency=args.latency,
            latency_jitter=args.latency_jitter,
            error_rate=args.error_rate,
            server_error_rate=args.server_error_rate,
            drop_rate=args.drop_rate,
            throttle_rps=args.throttle_rps,
            retry_after=args.retry_after,
            auth_fail_code=args.auth_fail_code,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    emulator = Emulator(api_key, api_secret, faults=faults)
    try:
        asyncio.run(_serve_until_signalled(emulator, args.host, args.port))
    except OSError as exc:
        print(f"emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
