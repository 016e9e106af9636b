"""Validating a config file's tree into frozen settings.

A file travels one way::

    read the file → parse YAML → interpolate ${VAR} in string values → validate → Settings
    (cdc_sync.configfile ..............................................)  (this module)

Every problem on the way becomes a :class:`~cdc_sync.errors.ConfigError` that names the file and
the dotted key path (``source.batch_size``), so the operator fixes the file without reading a
traceback. The EngageLab API secret never appears in an error message, a repr or
:meth:`Settings.redacted`; database passwords are masked wherever a URL is shown.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args
from urllib.parse import urlsplit

import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema
from sqlalchemy.engine import make_url

from cdc_sync import dburls
from cdc_sync.configfile import (
    DEFAULT_CONFIG_FILE,
    REFERENCE,
    Document,
    config_error,
    dotted,
    expand,
    read_document,
)
from cdc_sync.dburls import mask_password
from cdc_sync.durations import (
    DURATION_HINT,
    DurationTooLong,
    format_duration,
    from_seconds,
    parse_duration,
)
from cdc_sync.errors import ConfigError
from cdc_sync.mapping import CONTACT_KEYS, ContactKey, PhoneKey
from cdc_sync.normalise import PhoneFormat
from cdc_sync.proxies import Proxy

DEFAULT_STATE_URL = "sqlite:///cdc-sync-state.db"

IdentityName = Literal["user_id", "anonymous_id", "registration_id"]
ApiCodeClass = Literal["transient", "permanent", "fatal"]

# ---------------------------------------------------------------------------------------------
# Validation errors and durations

_OWN_ERROR = "cdc_sync_config"  # the error type of our own messages


def _invalid(problem: str) -> PydanticCustomError:
    """A validation error whose message is exactly ``problem``.

    Our messages never quote the input: :func:`_describe` adds what was given, when it may.
    """
    # The problem travels as context, not as the template: a "{" in it must not be formatted.
    return PydanticCustomError(_OWN_ERROR, "{problem}", {"problem": problem})


def _fail_at(model: type[BaseModel], loc: tuple[str | int, ...], problem: str) -> ValidationError:
    """A ValidationError pinned to ``loc``, for rules that span fields but blame one of them.

    Raised from a model validator, pydantic prefixes the model's own location, so the operator
    sees ``retry.max`` rather than ``retry``.
    """
    detail = InitErrorDetails(type=_invalid(problem), loc=loc, input=None)
    return ValidationError.from_exception_data(model.__name__, [detail])


Bound = int | float | timedelta


def _show_bound(value: Bound) -> str:
    if isinstance(value, timedelta):
        return format_duration(value)
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Between:
    """The range of a number or duration setting, both ends included: ``Annotated[Duration,
    Between(...)]``.

    Every number and duration setting carries one (a test checks it), so a value that passed
    validation cannot overflow the arithmetic that later uses it (``now + interval``, a
    statement timeout in milliseconds), and the README states each range. A bound checks only
    values of its own kind, so ``source.lookback`` (a duration or a count) carries one of each.
    """

    low: Bound
    high: Bound

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def check(self, value: Any) -> Any:
        """``value`` if it is of another kind or inside the range; else a validation error."""
        if isinstance(value, timedelta) != isinstance(self.low, timedelta) or value is None:
            return value
        if not self.low <= value <= self.high:  # so NaN, false against anything, is outside
            raise _invalid(
                f"must be at least {_show_bound(self.low)} and at most {_show_bound(self.high)}"
            )
        return value


def _seconds(value: object) -> timedelta:
    """Accept a bare YAML number as seconds; booleans are numbers to Python but not to us."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"expected a duration; {DURATION_HINT}")
    if math.isnan(value) or value < 0:
        raise _invalid(f"not a duration; {DURATION_HINT}")
    return from_seconds(float(value))


def _to_duration(value: object) -> timedelta:
    """Validate a Duration field: a duration string, a bare number of seconds or a timedelta.

    A duration too long for a timedelta becomes the longest one, so that the field's
    :class:`Between` refuses it with the range rather than an overflow.
    """
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise _invalid("a duration must not be negative")
        return value
    try:
        return parse_duration(value) if isinstance(value, str) else _seconds(value)
    except DurationTooLong:
        return timedelta.max
    except ValueError as error:
        raise _invalid(str(error)) from None


def _to_lookback(value: object) -> timedelta | int:
    """Validate ``source.lookback``: a duration string, or a bare integer in cursor units."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        raise _invalid(
            "a bare number is in cursor units and must be a whole number; "
            "for a timestamp cursor write a duration such as 5m"
        )
    return _to_duration(value)


def _lookback_to_json(value: timedelta | int) -> str | int:
    """Print a lookback the way it was written: a duration string or cursor units."""
    return format_duration(value) if isinstance(value, timedelta) else value


Duration = Annotated[
    timedelta,
    PlainValidator(_to_duration),
    PlainSerializer(format_duration, when_used="json"),
]
Lookback = Annotated[
    timedelta | int,
    PlainValidator(_to_lookback),
    PlainSerializer(_lookback_to_json, when_used="json"),
]

# ---------------------------------------------------------------------------------------------
# Small value types


def _reject_bool(value: object) -> object:
    """Refuse ``true``/``false`` where a number is due (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise _invalid(f"expected a number, not {str(value).lower()}")
    return value


def _not_blank(value: str) -> str:
    """Refuse empty or whitespace-only strings (column and table names, the API key)."""
    if not value.strip():
        raise _invalid("must not be empty")
    return value


def _no_outer_space(value: str) -> str:
    """Refuse surrounding whitespace: a stray newline from a secrets file breaks Basic auth."""
    if value != value.strip():
        raise _invalid("must not start or end with whitespace (check the variable it comes from)")
    return value


def _secret_ok(value: SecretStr) -> SecretStr:
    """The secret's checks, worded so that they never quote it."""
    raw = value.get_secret_value()
    _no_outer_space(_not_blank(raw))
    return value


def _upper(value: object) -> object:
    """Accept ``info`` for ``INFO``: case carries no meaning in a log level."""
    return value.upper() if isinstance(value, str) else value


def _lower(value: object) -> object:
    """Accept ``JSON`` for ``json`` in keyword-valued keys."""
    return value.lower() if isinstance(value, str) else value


Number = Annotated[int, BeforeValidator(_reject_bool)]
Real = Annotated[float, BeforeValidator(_reject_bool)]
Text = Annotated[str, AfterValidator(_not_blank)]
# An EngageLab response code: any 32-bit integer (the codes documented are five digits, and -1).
ApiCode = Annotated[Number, Between(-(2**31), 2**31 - 1)]
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_name(value: str) -> str:
    """The sync name keys rows in a shared tracking database, so keep it short and plain."""
    if not _NAME.fullmatch(value):
        raise _invalid("not a sync name; use 1-64 letters, digits, '_', '.' or '-'")
    return value


# ---------------------------------------------------------------------------------------------
# Secrets and database URLs


@dataclass(frozen=True)
class Concealed:
    """Marks a setting whose input may hold a secret: no message ever shows what was given.

    ``url``: a URL, whose password (userinfo or ``?password=``) is the secret; otherwise the
    whole value is. :func:`_describe` never echoes such an input, and ``cdc-sync check`` warns
    when the file itself holds one while others may read it.
    """

    url: bool = False


SECRET = Concealed()
SECRET_URL = Concealed(url=True)


def _database_url(text: str, info: ValidationInfo) -> str:
    """A database URL checked and normalised (see :func:`cdc_sync.dburls.normalise`)."""
    try:
        return dburls.normalise(text, _config_dir(info))
    except ValueError as error:
        raise _invalid(str(error)) from None


def _config_dir(info: ValidationInfo) -> Path:
    """The directory relative paths are anchored at: the config file's, else the current one."""
    context = info.context if isinstance(info.context, Mapping) else {}
    config_path = context.get("config_path")
    return Path(config_path).parent if config_path is not None else Path.cwd()


def _masked_url_repr(model: BaseModel) -> Iterator[tuple[str | None, Any]]:
    """A model's repr fields with the password in its ``url`` masked."""
    for name, value in BaseModel.__repr_args__(model):
        yield name, mask_password(value) if name == "url" and isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------
# The models

_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid")
_MS, _SECOND, _MINUTE = timedelta(milliseconds=1), timedelta(seconds=1), timedelta(minutes=1)
_HOUR, _DAY = timedelta(hours=1), timedelta(days=1)


class IdentitySettings(BaseModel):
    """Which column holds the application's own id of a user, and which EngageLab identity it
    is; cdc-sync resolves it to an EUID with ``POST /v1/user/register``."""

    model_config = _MODEL_CONFIG

    name: Annotated[IdentityName, BeforeValidator(_lower)]
    column: Text


class SourceSettings(BaseModel):
    """The user table on the read replica, and how to page through it."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    url: Annotated[str, SECRET_URL]
    table: Text
    schema_: Text | None = Field(default=None, alias="schema")
    key: Text
    cursor: Text
    euid: Text | None = None
    identity: IdentitySettings | None = None
    consent: Text | None = None
    deleted: Text | None = None
    batch_size: Annotated[Number, Between(1, 10_000)] = 500
    cursor_mode: Annotated[Literal["timestamp", "xid8"], BeforeValidator(_lower)] = "timestamp"
    # A count of cursor units must leave a bigint cursor minus the lookback inside bigint.
    lookback: Annotated[Lookback, Between(timedelta(0), 30 * _DAY), Between(0, 10**15)] = (
        5 * _MINUTE
    )
    max_transaction: Annotated[Duration, Between(timedelta(0), 30 * _DAY)] | None = None
    statement_timeout: Annotated[Duration, Between(100 * _MS, _HOUR)] = timedelta(seconds=30)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        return _database_url(value, info)

    @model_validator(mode="after")
    def _check_euid(self) -> Self:
        """Exactly one way to a user's EUID: a column holding it, or an identity to resolve."""
        if self.euid is None and self.identity is None:
            raise _fail_at(
                type(self),
                ("euid",),
                "required key is missing: name the column holding EngageLab's EUID, or give "
                "source.identity instead ({name: user_id, column: COL}) to resolve it",
            )
        if self.euid is not None and self.identity is not None:
            raise _fail_at(
                type(self),
                ("identity",),
                "give source.euid (a column holding the EUID) or source.identity (an id to "
                "resolve to one), not both",
            )
        return self

    @property
    def euid_column(self) -> str:
        """The column read for each user's EUID, or for the identity resolved to it."""
        return self.identity.column if self.identity is not None else str(self.euid)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        return _masked_url_repr(self)


class StateSettings(BaseModel):
    """The tracking database cdc-sync owns: watermarks, pushed hashes, per-user status."""

    model_config = _MODEL_CONFIG

    # validate_default: the default path is relative and must be anchored like a written one.
    url: Annotated[str, SECRET_URL] = Field(default=DEFAULT_STATE_URL, validate_default=True)
    keep_runs: Annotated[Duration, Between(_HOUR, 3650 * _DAY)] = 30 * _DAY

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        url = _database_url(value, info)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and dburls.is_memory(parsed):
            raise _invalid(
                "an in-memory database forgets every watermark at exit; "
                f"name a file, e.g. {DEFAULT_STATE_URL}"
            )
        return url

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        return _masked_url_repr(self)


_BASE_URL = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?(?:/[^\s?#]*)?")


def _check_base_url(value: str) -> str:
    if not _BASE_URL.fullmatch(value.strip()):
        raise _invalid("not an http(s) base URL; write e.g. https://ma-api.engagelab.com")
    return value.strip().rstrip("/")


def _proxy_ok(value: SecretStr | None) -> SecretStr | None:
    """An http proxy URL; the message never quotes it, since it may hold a password."""
    if value is not None:
        try:
            Proxy.parse(value.get_secret_value())
        except ValueError as exc:
            raise _invalid(str(exc)) from None
    return value


def _is_loopback(url: str) -> bool:
    """Whether a URL's host is this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return False


def _no_rate_limit(value: object) -> object:
    """0 (or "0" from a variable) and null both mean "no limit", stored as None."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return value
    try:
        return None if float(value) == 0 else value
    except ValueError:  # not a number; the float validator says so
        return value


class EngageLabSettings(BaseModel):
    """Where and how to call the EngageLab MA API, and how to read its answers."""

    model_config = _MODEL_CONFIG

    base_url: Annotated[str, SECRET_URL, AfterValidator(_check_base_url)] = (
        "https://ma-api.engagelab.com"
    )
    allow_insecure_http: bool = False
    api_key: Annotated[str, AfterValidator(_not_blank), AfterValidator(_no_outer_space)]
    api_secret: Annotated[SecretStr, SECRET, AfterValidator(_secret_ok)]
    timeout: Annotated[Duration, Between(100 * _MS, 10 * _MINUTE)] = timedelta(seconds=10)
    max_retry_after: Annotated[Duration, Between(timedelta(0), _HOUR)] = 5 * _MINUTE
    concurrency: Annotated[Number, Between(1, 256)] = 8
    rate_limit: Annotated[
        Annotated[Real, Between(0.1, 100_000.0)] | None, BeforeValidator(_no_rate_limit)
    ] = 50.0
    unknown_code: Annotated[Literal["permanent", "transient"], BeforeValidator(_lower)] = (
        "permanent"
    )
    codes: dict[ApiCode, Annotated[ApiCodeClass, BeforeValidator(_lower)]] = Field(
        default_factory=dict
    )
    rate_limit_codes: tuple[ApiCode, ...] = ()
    clear_empty: bool = False
    on_leave: Annotated[Literal["keep", "clear"], BeforeValidator(_lower)] = "keep"
    proxy: Annotated[SecretStr | None, SECRET_URL, AfterValidator(_proxy_ok)] = None

    @model_validator(mode="after")
    def _check_http(self) -> Self:
        if self.base_url.startswith("http://") and not (
            self.allow_insecure_http or _is_loopback(self.base_url)
        ):
            raise _fail_at(
                type(self),
                ("base_url",),
                "plain http:// to a host other than this machine would send the API key and "
                "secret unencrypted; use https://, or set engagelab.allow_insecure_http: true "
                "if the network on the way is yours",
            )
        return self

    @model_validator(mode="after")
    def _check_codes(self) -> Self:
        if 0 in self.codes:
            raise _fail_at(type(self), ("codes", 0), "code 0 is success and cannot be reclassified")
        for index, code in enumerate(self.rate_limit_codes):
            if code == 0:
                raise _fail_at(type(self), ("rate_limit_codes", index), "code 0 is success")
            if self.codes.get(code, "transient") != "transient":
                raise _fail_at(
                    type(self),
                    ("rate_limit_codes", index),
                    f"code {code} means throttling (retried) but codes classifies it as "
                    f"{self.codes[code]}",
                )
        return self


class AuditSettings(BaseModel):
    """The paced sweep over the whole table that finds and repairs missed changes."""

    model_config = _MODEL_CONFIG

    enabled: bool = False
    rows_per_cycle: Annotated[Number, Between(1, 1_000_000)] = 10_000


class ScheduleSettings(BaseModel):
    """How often a cycle starts."""

    model_config = _MODEL_CONFIG

    interval: Annotated[Duration, Between(_SECOND, 7 * _DAY)] = timedelta(seconds=60)


class RetrySettings(BaseModel):
    """Backoff for transient failures, per user."""

    model_config = _MODEL_CONFIG

    # backoff() doubles base up to 2**32 times before the cap applies: 1h keeps that a timedelta.
    base: Annotated[Duration, Between(100 * _MS, _HOUR)] = timedelta(seconds=30)
    max: Annotated[Duration, Between(100 * _MS, 30 * _DAY)] = timedelta(hours=1)
    max_attempts: Annotated[Number, Between(1, 10_000)] = 20

    @model_validator(mode="after")
    def _check_max(self) -> Self:
        if self.max < self.base:
            raise _fail_at(
                type(self),
                ("max",),
                f"{format_duration(self.max)} is shorter than base ({format_duration(self.base)})",
            )
        return self


class LoggingSettings(BaseModel):
    """What the daemon logs and in which shape."""

    model_config = _MODEL_CONFIG

    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = "INFO"
    format: Annotated[Literal["json", "console"], BeforeValidator(_lower)] = "json"


def host_port(text: str) -> tuple[str, int]:
    """The host and port of ``HOST:PORT`` (an IPv6 host in brackets), read as the authority of
    a URL is; a ValueError unless both are there, the port from 1 to 65535, and nothing else."""
    split = urlsplit("//" + text.strip())
    port = split.port  # a ValueError for a port that is no number or out of range
    if not split.hostname or port is None or port == 0 or split.path or split.username:
        raise ValueError(text)
    return split.hostname, port


def _listen_ok(value: str) -> str:
    try:
        host_port(value)
    except ValueError:
        raise _invalid(
            "not HOST:PORT with a port from 1 to 65535; write e.g. 127.0.0.1:9464 or [::1]:9464"
        ) from None
    return value.strip()


class MetricsSettings(BaseModel):
    """The Prometheus endpoint of the daemon (``cdc-sync run``)."""

    model_config = _MODEL_CONFIG

    listen: Annotated[str, AfterValidator(_listen_ok)] | None = None  # None: no endpoint

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to serve /metrics on; None: no endpoint."""
        return None if self.listen is None else host_port(self.listen)


def _at_least_one_contact(value: dict[ContactKey, str]) -> dict[ContactKey, str]:
    """A sync with no contacts would push nothing; that is a mistake, not a configuration."""
    if not value:
        raise _invalid(f"map at least one of {', '.join(CONTACT_KEYS)} to a source column")
    return value


@dataclass(frozen=True)
class FileFacts:
    """What loading saw of the file itself, for ``cdc-sync check``."""

    mode: int  # permission bits
    literal_secrets: tuple[str, ...]  # dotted keys whose secret is written in the file, not ${VAR}


def _phone_region(value: str | None) -> str | None:
    if value is None:
        return None
    region = value.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise _invalid(
            f"{value!r} is not a region phonenumbers knows; give an ISO 3166 code, e.g. JP, US, SG"
        )
    return region


class NormalizeSettings(BaseModel):
    """How phones and e-mail addresses are put in one form before they are hashed and sent."""

    model_config = _MODEL_CONFIG

    emails: bool = False
    phones: bool = False
    phone_region: Annotated[Text | None, AfterValidator(_phone_region)] = None
    phone_format: Annotated[PhoneFormat, BeforeValidator(_lower)] = "e164"
    phone_formats: dict[PhoneKey, Annotated[PhoneFormat, BeforeValidator(_lower)]] = Field(
        default_factory=dict
    )


class Settings(BaseModel):
    """Everything one sync needs, validated; built by :func:`load_settings`."""

    model_config = _MODEL_CONFIG

    name: Annotated[str, AfterValidator(_check_name)]
    source: SourceSettings
    contacts: Annotated[dict[ContactKey, Text], AfterValidator(_at_least_one_contact)]
    # validate_default: the default state URL must be anchored at the config file's directory.
    state: StateSettings = Field(default_factory=dict, validate_default=True)
    engagelab: EngageLabSettings
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    normalize: NormalizeSettings = Field(default_factory=NormalizeSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    _config_path: Path = PrivateAttr(default=Path(DEFAULT_CONFIG_FILE))
    _file: FileFacts | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_state_is_not_source(self, info: ValidationInfo) -> Self:
        if dburls.same_database(self.state.url, self.source.url):
            raise _fail_at(
                type(self),
                ("state", "url"),
                "the tracking database must not be the source database (the source is a read "
                "replica; cdc-sync never writes to it)",
            )
        context = info.context if isinstance(info.context, Mapping) else {}
        if context.get("config_path") is not None:
            self._config_path = Path(context["config_path"])
        if isinstance(context.get("file"), FileFacts):
            self._file = context["file"]
        return self

    @property
    def config_path(self) -> Path:
        """The file these settings were loaded from (``config.yaml`` when built in code)."""
        return self._config_path

    @property
    def config_mode(self) -> int | None:
        """The config file's permission bits (None when built in code)."""
        return None if self._file is None else self._file.mode

    @property
    def exposed_secrets(self) -> tuple[str, ...]:
        """The keys whose secret is written into a file that group or others may read."""
        if self._file is None or not self._file.mode & 0o077:
            return ()
        return self._file.literal_secrets

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data for ``cdc-sync check``: no secret, no password."""
        data = self.model_dump(mode="json", by_alias=True)
        data["engagelab"]["api_secret"] = "***"  # noqa: S105 - the mask, not a password
        data["source"]["url"] = mask_password(self.source.url)
        data["state"]["url"] = mask_password(self.state.url)
        if self.engagelab.proxy is not None:  # host and port: Proxy never shows credentials
            data["engagelab"]["proxy"] = str(Proxy.parse(self.engagelab.proxy.get_secret_value()))
        return data


# ---------------------------------------------------------------------------------------------
# Loading

_Loc = tuple[int | str, ...]


def _field_at(loc: _Loc) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The settings model holding ``loc``'s last part, and that part's field if it is one.

    ``(None, None)`` when ``loc`` leaves the models (inside a mapping such as ``codes``).
    """
    model: type[BaseModel] = Settings
    for index, part in enumerate(loc):
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        field = fields.get(str(part))
        if index == len(loc) - 1:
            return model, field
        annotation = field.annotation if field is not None else None
        # An optional section (``source.identity``) is ``Model | None``: the model it holds.
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None, None
        model = annotation
    return None, None


def _holds_secret(model: type[BaseModel]) -> bool:
    """Whether a mapping has a secret among its keys: then a key it does not know may be one."""
    return any(SECRET in field.metadata for field in model.model_fields.values())


def _concealment(field: FieldInfo | None) -> Concealed | None:
    """The field's :class:`Concealed` mark, if it has one."""
    marks = field.metadata if field is not None else []
    return next((mark for mark in marks if isinstance(mark, Concealed)), None)


def _is_hidden_key(loc: _Loc) -> bool:
    """Whether ``loc`` ends in a key its mapping does not know, beside a secret (never shown)."""
    model, field = _field_at(loc)
    return model is not None and field is None and _holds_secret(model)


def _where(loc: _Loc, document: Document) -> tuple[str, str]:
    """The dotted key to name for ``loc``, and, for a key not shown, where it was written.

    A key a secret-holding mapping does not know may be the secret itself, pasted on a line of
    its own; it is named by its line, never spelt out.
    """
    if not loc or not _is_hidden_key(loc):
        return dotted(loc), ""
    line = document.line(loc)
    where = f"the key on line {line}" if line else "a key"
    return dotted(loc[:-1]), f"{where} (not shown: it may be a misplaced secret): "


def _shown_input(value: object, loc: _Loc, written: Mapping[tuple[object, ...], str]) -> str:
    """`` (got ...)`` for a message, or nothing when the input may not be shown.

    Never for a concealed setting; for a value that took an environment variable, the text the
    file wrote (``${BATCH}``) rather than the value; and only plain scalars, cut at 80 characters.
    """
    if _concealment(_field_at(loc)[1]) is not None or value is None:
        return ""
    if loc in written:
        shown = f"what {written[loc]!r} expands to"
    elif isinstance(value, str) and dburls.holds_password(value):
        shown = "a URL with a password, not shown"
    elif isinstance(value, str | int | float):
        shown = repr(value)
    else:
        return ""  # a mapping or list: too long to quote
    return f" (got {shown if len(shown) <= 80 else shown[:76] + '...'})"


def _describe(
    detail: Mapping[str, Any], loc: _Loc, written: Mapping[tuple[object, ...], str]
) -> str:
    """One pydantic error as a sentence for the operator, quoting the input only when safe."""
    kind = detail["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":  # never quote the value: a misspelt api_secret is still secret
        model, _ = _field_at(loc)
        fields = model.model_fields.items() if model else []
        allowed = [field.alias or name for name, field in fields]
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close and not _is_hidden_key(loc) else ""
        return f"unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    message = str(detail["msg"])
    message = message[:1].lower() + message[1:]
    return message + _shown_input(detail.get("input"), loc, written)


def _literal_secrets(tree: Mapping[Any, Any]) -> tuple[str, ...]:
    """The dotted keys of concealed settings whose secret the file writes out, not as ${VAR}."""
    found = []
    sections: list[tuple[str, type[BaseModel]]] = [("", Settings), *_sections()]
    for section, model in sections:
        node = tree.get(section) if section else tree
        if not isinstance(node, Mapping):
            continue
        for name, field in model.model_fields.items():
            mark = _concealment(field)
            value = node.get(field.alias or name)
            if mark is None or not isinstance(value, str):
                continue
            # What the file itself spells out: the text around references, and their defaults.
            literal = REFERENCE.sub(lambda ref: ref.group("default") or "", value)
            if dburls.holds_password(literal) if mark.url else literal.strip():
                found.append(f"{section}.{field.alias or name}".lstrip("."))
    return tuple(found)


def _sections() -> Iterator[tuple[str, type[BaseModel]]]:
    """Each top-level key whose value is a settings model, with that model."""
    for name, field in Settings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield field.alias or name, field.annotation


def load_settings(path: Path, environ: Mapping[str, str], *, credentials: bool = True) -> Settings:
    """Read, interpolate and validate the config file; every problem in one ConfigError.

    ``credentials`` False, for commands that never call the API: ``engagelab.api_key`` and
    ``api_secret`` are neither read (nor their environment variables) nor required.
    """
    document = read_document(path)
    tree = document.tree
    if not credentials and isinstance(tree.get("engagelab"), dict):
        unused = {"api_key": "unused", "api_secret": "unused"}
        tree = tree | {"engagelab": tree["engagelab"] | unused}
    expanded = expand(tree, environ)
    facts = FileFacts(document.mode, _literal_secrets(document.tree))
    context = {"config_path": path.absolute(), "file": facts}
    problems: list[tuple[Any, str]] = list(expanded.problems)
    try:
        settings: Settings | None = Settings.model_validate(expanded.tree, context=context)
    except ValidationError as error:
        settings = None
        for detail in error.errors(include_url=False):
            loc = tuple(part for part in detail["loc"] if part != "[key]")  # a bad key's marker
            # A value already reported (an unset variable) is not reported again as invalid.
            if not any(loc[: len(keys)] == keys for keys, _ in expanded.problems):
                problems.append((loc, _describe(detail, loc, expanded.written)))
    # Raised here, outside the except block, so the ValidationError (whose text quotes inputs,
    # the secret among them) is neither the cause nor the context of what the operator sees.
    if settings is None or problems:
        raise _config_error(path, problems, document)
    return settings


def _config_error(path: Path, problems: list[tuple[Any, str]], document: Document) -> ConfigError:
    """One ConfigError for every problem, each named by its key (or the line of a hidden key)."""
    lines = []
    for loc, problem in problems:
        key, prefix = _where(loc, document)
        lines.append((key, prefix + problem))
    return config_error(str(path), lines)
