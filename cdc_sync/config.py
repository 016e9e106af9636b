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
import math
import re
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from sqlalchemy.engine import make_url

from cdc_sync import dburls
from cdc_sync.configfile import DEFAULT_CONFIG_FILE, dotted, interpolate, read_tree
from cdc_sync.dburls import mask_password
from cdc_sync.durations import DURATION_HINT, format_duration, parse_duration
from cdc_sync.errors import ConfigError
from cdc_sync.proxies import Proxy

DEFAULT_STATE_URL = "sqlite:///cdc-sync-state.db"

ContactKey = Literal["email", "mobile_phone", "landline_phone", "whatsapp_phone"]
ApiCodeClass = Literal["transient", "permanent", "fatal"]

# ---------------------------------------------------------------------------------------------
# Validation errors and durations

_OWN_ERROR = "cdc_sync_config"  # the error type of our own messages, which quote what they need


def _invalid(problem: str) -> PydanticCustomError:
    """A validation error whose message is exactly ``problem`` (our messages quote the input)."""
    # The problem travels as context, not as the template: a "{" in it must not be formatted.
    return PydanticCustomError(_OWN_ERROR, "{problem}", {"problem": problem})


def _fail_at(model: type[BaseModel], loc: tuple[str | int, ...], problem: str) -> ValidationError:
    """A ValidationError pinned to ``loc``, for rules that span fields but blame one of them.

    Raised from a model validator, pydantic prefixes the model's own location, so the operator
    sees ``retry.max`` rather than ``retry``.
    """
    detail = InitErrorDetails(type=_invalid(problem), loc=loc, input=None)
    return ValidationError.from_exception_data(model.__name__, [detail])


def _seconds(value: object) -> float:
    """Accept a bare YAML number as seconds; booleans are numbers to Python but not to us."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"expected a duration; {DURATION_HINT}")
    if not math.isfinite(value) or value < 0:
        raise _invalid(f"{value!r} is not a duration; {DURATION_HINT}")
    return float(value)


def _to_duration(value: object) -> timedelta:
    """Validate a Duration field: a duration string, a bare number of seconds or a timedelta."""
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise _invalid("a duration must not be negative")
        return value
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as error:
            raise _invalid(str(error)) from None
    return timedelta(seconds=_seconds(value))


def _to_lookback(value: object) -> timedelta | int:
    """Validate ``source.lookback``: a duration string, or a bare integer in cursor units."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _invalid(f"{value} is negative; the lookback must be 0 or more")
        return value
    if isinstance(value, float):
        raise _invalid(
            f"{value!r}: a bare number is in cursor units and must be a whole number; "
            "for a timestamp cursor write a duration such as 5m"
        )
    return _to_duration(value)


def _lookback_to_json(value: timedelta | int) -> str | int:
    """Print a lookback the way it was written: a duration string or cursor units."""
    return format_duration(value) if isinstance(value, timedelta) else value


def _at_least(minimum: timedelta, *, inclusive: bool) -> AfterValidator:
    """A Duration bound; ``inclusive=False`` means strictly longer than ``minimum``."""

    def check(value: timedelta) -> timedelta:
        if value < minimum or (value == minimum and not inclusive):
            relation = "at least" if inclusive else "longer than"
            raise _invalid(
                f"{format_duration(value)} is too short; it must be {relation} "
                f"{format_duration(minimum)}"
            )
        return value

    return AfterValidator(check)


def _at_most(maximum: timedelta) -> AfterValidator:
    """A Duration's upper bound (inclusive)."""

    def check(value: timedelta) -> timedelta:
        if value > maximum:
            raise _invalid(
                f"{format_duration(value)} is too long; it must be at most "
                f"{format_duration(maximum)}"
            )
        return value

    return AfterValidator(check)


Duration = Annotated[
    timedelta,
    PlainValidator(_to_duration),
    PlainSerializer(format_duration, when_used="json"),
]
PositiveDuration = Annotated[Duration, _at_least(timedelta(0), inclusive=False)]
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
    if not raw.strip():
        raise _invalid("must not be empty")
    if raw != raw.strip():
        raise _invalid("must not start or end with whitespace (check the variable it comes from)")
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
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_name(value: str) -> str:
    """The sync name keys rows in a shared tracking database, so keep it short and plain."""
    if not _NAME.fullmatch(value):
        raise _invalid(f"{value!r} is not a sync name; use 1-64 letters, digits, '_', '.' or '-'")
    return value


# ---------------------------------------------------------------------------------------------
# Database URLs


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


class SourceSettings(BaseModel):
    """The user table on the read replica, and how to page through it."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    url: str
    table: Text
    schema_: Text | None = Field(default=None, alias="schema")
    key: Text
    cursor: Text
    euid: Text
    batch_size: Number = Field(default=500, ge=1, le=10_000)
    cursor_mode: Annotated[Literal["timestamp", "xid8"], BeforeValidator(_lower)] = "timestamp"
    lookback: Lookback = timedelta(minutes=5)
    max_transaction: Duration | None = None
    statement_timeout: PositiveDuration = timedelta(seconds=30)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        return _database_url(value, info)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        return _masked_url_repr(self)


class StateSettings(BaseModel):
    """The tracking database cdc-sync owns: watermarks, pushed hashes, per-user status."""

    model_config = _MODEL_CONFIG

    # validate_default: the default path is relative and must be anchored like a written one.
    url: str = Field(default=DEFAULT_STATE_URL, validate_default=True)
    keep_runs: PositiveDuration = timedelta(days=30)

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
        raise _invalid(
            f"{value!r} is not an http(s) base URL; write e.g. https://ma-api.engagelab.com"
        )
    return value.strip().rstrip("/")


def _proxy_ok(value: SecretStr | None) -> SecretStr | None:
    """An http proxy URL; the message never quotes it, since it may hold a password."""
    if value is not None:
        try:
            Proxy.parse(value.get_secret_value())
        except ValueError as exc:
            raise _invalid(str(exc)) from None
    return value


def _rate_limit(value: float | None) -> float | None:
    """Normalise the rate limit: 0 and null both mean "no limit", stored as None."""
    if value is None or value == 0:
        return None
    if not math.isfinite(value) or value < 0:
        raise _invalid(f"{value!r} is not a rate; give requests per second, or 0/null for no limit")
    return value


class EngageLabSettings(BaseModel):
    """Where and how to call the EngageLab MA API, and how to read its answers."""

    model_config = _MODEL_CONFIG

    base_url: Annotated[str, AfterValidator(_check_base_url)] = "https://ma-api.engagelab.com"
    api_key: Annotated[str, AfterValidator(_not_blank), AfterValidator(_no_outer_space)]
    api_secret: Annotated[SecretStr, AfterValidator(_secret_ok)]
    timeout: PositiveDuration = timedelta(seconds=10)
    max_retry_after: Annotated[Duration, _at_most(timedelta(hours=1))] = timedelta(minutes=5)
    concurrency: Number = Field(default=8, ge=1, le=256)
    rate_limit: Annotated[Real | None, AfterValidator(_rate_limit)] = 50.0
    unknown_code: Annotated[Literal["permanent", "transient"], BeforeValidator(_lower)] = (
        "permanent"
    )
    codes: dict[Number, Annotated[ApiCodeClass, BeforeValidator(_lower)]] = Field(
        default_factory=dict
    )
    rate_limit_codes: tuple[Number, ...] = ()
    clear_empty: bool = False
    proxy: Annotated[SecretStr | None, AfterValidator(_proxy_ok)] = None

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
    rows_per_cycle: Number = Field(default=10_000, ge=1, le=1_000_000)


class ScheduleSettings(BaseModel):
    """How often a cycle starts."""

    model_config = _MODEL_CONFIG

    interval: Annotated[Duration, _at_least(timedelta(seconds=1), inclusive=True)] = timedelta(
        seconds=60
    )


class RetrySettings(BaseModel):
    """Backoff for transient failures, per user."""

    model_config = _MODEL_CONFIG

    base: PositiveDuration = timedelta(seconds=30)
    max: PositiveDuration = timedelta(hours=1)
    max_attempts: Number = Field(default=20, ge=1)

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


def _at_least_one_contact(value: dict[ContactKey, str]) -> dict[ContactKey, str]:
    """A sync with no contacts would push nothing; that is a mistake, not a configuration."""
    if not value:
        raise _invalid(
            "map at least one of email, mobile_phone, landline_phone, whatsapp_phone "
            "to a source column"
        )
    return value


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
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    _config_path: Path = PrivateAttr(default=Path(DEFAULT_CONFIG_FILE))

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
        return self

    @property
    def config_path(self) -> Path:
        """The file these settings were loaded from (``config.yaml`` when built in code)."""
        return self._config_path

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


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The settings model found at ``loc``, to list the keys allowed there."""
    model: type[BaseModel] = Settings
    for part in loc:
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        annotation = fields[part].annotation if part in fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _hide(text: str, secret: str | None) -> str:
    """Mask URL passwords and the API secret, raw or as repr() escapes it, in text to be shown."""
    text = mask_password(text)
    for form in {secret, repr(secret)[1:-1]} if secret else ():
        text = text.replace(form, "***")
    return text


def _describe(detail: Mapping[str, Any], loc: tuple[int | str, ...], secret: str | None) -> str:
    """One pydantic error as a sentence for the operator, quoting the input only when safe."""
    kind = detail["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":  # never quote the value: a misspelt api_secret is still secret
        model = _model_at(loc[:-1])
        fields = model.model_fields.items() if model else []
        allowed = [field.alias or name for name, field in fields]
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    message = str(detail["msg"])
    message = message[:1].lower() + message[1:]
    value = detail.get("input")
    if kind == _OWN_ERROR or loc[:2] == ("engagelab", "api_secret"):
        return message
    if not isinstance(value, str | int | float | type(None)):
        return message  # a mapping or list: too long to quote, and it may hold the secret
    # Hide before cutting: a secret or password cut in half would no longer be recognised.
    shown = repr(_hide(value, secret) if isinstance(value, str) else value)
    return f"{message} (got {shown if len(shown) <= 80 else shown[:76] + '...'})"


def _validation_error(path: Path, error: ValidationError, secret: str | None) -> ConfigError:
    """All of pydantic's complaints as one ConfigError: one ``path: key: problem`` line each."""
    lines = []
    for detail in error.errors(include_url=False):
        loc = tuple(part for part in detail["loc"] if part != "[key]")  # a bad dict key's marker
        lines.append((dotted(loc), _hide(_describe(detail, loc, secret), secret)))
    (key, first), rest = lines[0], lines[1:]
    problem = first + "".join(f"\n{path}: {other_key}: {other}" for other_key, other in rest)
    return ConfigError(str(path), key, problem)


def load_settings(path: Path, environ: Mapping[str, str]) -> Settings:
    """Read, interpolate and validate the config file; any problem is one ConfigError."""
    tree = interpolate(read_tree(path), environ, str(path))
    engagelab = tree.get("engagelab")
    secret = engagelab.get("api_secret") if isinstance(engagelab, dict) else None
    context = {"config_path": path.absolute()}
    try:
        return Settings.model_validate(tree, context=context)
    except ValidationError as error:
        failure = _validation_error(path, error, secret if isinstance(secret, str) else None)
    # Raised here, outside the except block, so the ValidationError (whose text quotes inputs,
    # the secret among them) is neither the cause nor the context of what the operator sees.
    raise failure
