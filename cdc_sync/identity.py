"""EUIDs for the application's own user ids (``source.identity``): found, or resolved and kept.

EngageLab addresses a contact push to its own numeric user id, the EUID. An application that
knows only its own id resolves it with ``POST /v1/user/register``. :class:`Resolver` looks the
values up in the tracking database first (one query for a page, most answered from memory),
sends the unknown ones in calls of at most :data:`~cdc_sync.engagelab.REGISTER_LIMIT` through
the one EngageLab client (so they share its pace, its retry classification and its stop after a
FATAL answer), and stores what was resolved before anything is pushed: a value resolved once is
never sent to ``register`` again, even after a crash.

What could not be resolved is returned with its reason, the answer the user's status row then
records (*retrying* or *failed*, like a push's answer), so it never holds back the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from cdc_sync.engagelab import REGISTER_LIMIT, ApiResult, Call, Registration, Verdict
from cdc_sync.state import StateStore

R = TypeVar("R")


class Registrar(Protocol):
    """What resolution needs from the EngageLab client (``engagelab.EngageLabClient``)."""

    def registration(self, name: str, values: Sequence[str]) -> Call[Registration]: ...

    def submit_calls(self, calls: Sequence[Call[R]]) -> Future[list[R | None]]: ...


@dataclass(frozen=True, slots=True)
class Resolution:
    """EUIDs by identity value, and why the others have none: the answer that left them
    unresolved, or None where no request was sent (the sync was refused before it)."""

    euids: dict[str, int]
    unresolved: dict[str, ApiResult | None]
    registered: int = 0  # values ``register`` resolved just now (the others were stored)


def chunks(values: Sequence[str], size: int = REGISTER_LIMIT) -> list[Sequence[str]]:
    """``values`` in consecutive slices of at most ``size``."""
    return [values[i : i + size] for i in range(0, len(values), size)]


def read_answers(
    name: str, sent: Sequence[Sequence[str]], answers: Sequence[Registration | None]
) -> Resolution:
    """What the register answers to the calls of ``sent`` resolved (pure).

    A value missing from a successful answer's ``data`` is unresolved (``code`` 0 may be a
    partial success): transient, tried again with backoff like any transient answer.
    """
    euids: dict[str, int] = {}
    unresolved: dict[str, ApiResult | None] = {}
    for values, answer in zip(sent, answers, strict=True):
        for value in values:
            if answer is None or answer.result.verdict is not Verdict.SUCCESS:
                unresolved[value] = None if answer is None else answer.result
            elif value in answer.euids:
                euids[value] = answer.euids[value]
            else:
                code, status = answer.result.code, answer.result.status
                message = f"register answered code 0 but left this {name} unresolved"
                unresolved[value] = ApiResult(Verdict.TRANSIENT, code, status, message)
    return Resolution(euids, unresolved)


class Resolver:
    """Resolves identity values of one kind (``user_id``, ...) to EUIDs for one sync."""

    def __init__(
        self, name: str, state: StateStore, client: Registrar, clock: Callable[[], datetime]
    ) -> None:
        self.name = name
        self.state = state
        self.client = client
        self.clock = clock

    def known(self, values: Sequence[str]) -> dict[str, int]:
        """The stored EUIDs of ``values``, without calling ``register`` for the others."""
        return self.state.identities(self.name, values) if values else {}

    def resolve(self, values: Sequence[str]) -> Resolution:
        """The EUIDs of ``values``: stored ones, then the rest from ``register``, stored before
        this returns. No state query and no call for an empty list."""
        if not values:
            return Resolution({}, {})
        known = self.state.identities(self.name, values)
        unknown = [value for value in dict.fromkeys(values) if value not in known]
        if not unknown:
            return Resolution(known, {})
        sent = chunks(unknown)
        calls = [self.client.registration(self.name, chunk) for chunk in sent]
        resolved = read_answers(self.name, sent, self.client.submit_calls(calls).result())
        self.state.store_identities(self.name, resolved.euids, self.clock())
        return Resolution(known | resolved.euids, resolved.unresolved, len(resolved.euids))
