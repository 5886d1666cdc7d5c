"""Server settings: ``config.properties`` (TorchServe's keys), CLI overrides, env vars, model YAML.

Precedence is TorchServe's: file < CLI overrides < ``TS_<KEY>`` env vars, the last only when
``enable_envvars_config=true``. Nothing here reads ``os.environ``: callers pass the environment.
Keys marserve does not use (gRPC, JVM, Netty, keystore, Intel launcher, workflows, ...) and unknown
keys end up in ``ServerConfig.ignored_keys``; ``key_warnings`` words one warning for each.

Deviations from TorchServe 0.12 (DEV), each deliberate:

- ``allowed_urls`` defaults to empty, so no URL can be registered until it is configured.
  TorchServe allows any ``http(s)://`` and ``file://`` URL (CVE-2023-43654).
- ``max_download_size`` is a new key: the bytes an archive downloaded from an allowed
  ``http(s)://`` URL may have (TorchServe has no cap).
- ``enable_model_api`` defaults to true (TorchServe: false) so that archives already in the
  model store can be registered out of the box; the URL allow-list is what guards registration.
- ``disable_token_authorization`` has a third state, unset (the default): tokens are then on only
  when an API listens on a non-loopback address (TorchServe: always on unless disabled).
- ``metrics_mode`` defaults to ``prometheus`` (TorchServe: ``log``, which leaves ``/metrics`` empty).
- ``log_location`` is a config key (TorchServe: env ``LOG_LOCATION`` only, still honoured when
  the key is not set); ``log_level`` and ``log_format`` are new keys (TorchServe: log4j2 config).
- Strict values: booleans must be ``true``/``false`` (any case; Java reads anything else as
  false), integers must be integers within range, choices must be listed ones, and a wrongly
  typed model-YAML value is an error (TorchServe ignores it with a warning). Timeouts must be >= 1.
  Every bad value is named in the one-line error, not only the first.
- Addresses: ``unix:`` sockets are not supported; bracketed IPv6 hosts (``http://[::1]:8080``)
  are, which TorchServe's address pattern cannot parse.
- The file is read as UTF-8 (Java's ``Properties.load`` reads ISO-8859-1; same for ASCII files).
- ``$$NAME$$`` values are inserted literally (Java's ``appendReplacement`` mangles ``$`` and ``\\``).
- Values are stripped of surrounding whitespace before conversion; empty ``allowed_urls`` and
  ``load_models`` items are dropped. Regexes use Python's ``re`` syntax.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Json,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)


class ConfigError(Exception):
    """A bad setting. The message is one line and names the offending key."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def _shown(value: object) -> str:
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


def _invalid(key: str, value: object, expected: str) -> str:
    return f"invalid value for {key}: {_shown(value)} ({expected})"


# ---------------------------------------------------------------- Java .properties syntax

# Java's line breaks only; str.splitlines() would also split on \v, \x1c, \u2028, ...
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_WS = " \t\f"
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}


def _continues(line: str) -> bool:
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def _logical_lines(text: str) -> Iterator[str]:
    lines = _LINE_BREAK.split(text)
    i = 0
    while i < len(lines):
        line = lines[i].lstrip(_WS)
        i += 1
        # Only a fresh line can be a comment, and a comment never continues.
        if not line or line[0] in "#!":
            continue
        parts: list[str] = []
        while _continues(line):
            parts.append(line[:-1])
            line = lines[i].lstrip(_WS) if i < len(lines) else ""
            i += 1
        parts.append(line)
        yield "".join(parts)


def _split_entry(line: str) -> tuple[str, str]:
    escaped = False
    for i, c in enumerate(line):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "=:":
            return line[:i], line[i + 1 :].lstrip(_WS)
        elif c in _WS:
            rest = line[i + 1 :].lstrip(_WS)
            if rest[:1] in ("=", ":"):  # "key = value": whitespace, then at most one separator
                rest = rest[1:].lstrip(_WS)
            return line[:i], rest
    return line, ""


def _unescape(raw: str, where: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(raw):
        c = raw[i]
        i += 1
        if c != "\\":
            out.append(c)
        elif i < len(raw):
            c = raw[i]
            i += 1
            if c == "u":
                digits = raw[i : i + 4]
                if not re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
                    raise ConfigError(f"malformed \\uXXXX escape in {where}")
                out.append(chr(int(digits, 16)))
                i += 4
            else:
                out.append(_ESCAPES.get(c, c))
    text = "".join(out)
    # \uD83D\uDE00 is how Java spells one astral character; join such surrogate pairs.
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java ``.properties`` text; the last of duplicate keys wins."""
    result: dict[str, str] = {}
    for line in _logical_lines(text):
        raw_key, raw_value = _split_entry(line)
        key = _unescape(raw_key, f"key {raw_key!r}")
        result[key] = _unescape(raw_value, key)
    return result


_ENV_REF = re.compile(r"\$\$([^$]{2,})\$\$")  # TorchServe's \$\$([^$]+[^$])\$\$


def resolve_env_refs(props: Mapping[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """Replace ``$$NAME$$`` in every value with ``env[NAME]``; an unset NAME is an error."""

    def resolve(key: str, value: str) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                raise ConfigError(f"Invalid Environment Variable {name} (used in {key})")
            return env[name]

        return _ENV_REF.sub(one, value)

    return {key: resolve(key, value) for key, value in props.items()}


# ---------------------------------------------------------------- addresses

_ADDRESS = re.compile(
    r"(?P<scheme>https?)://(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:/\[\]\s]+))(?::(?P<port>[0-9]{1,5}))?/?",
    re.IGNORECASE,
)
# TorchServe's ports when an address has none: (http, https).
_DEFAULT_PORTS = {"management_address": (8081, 8444), "metrics_address": (8082, 8445)}


class Address(BaseModel):
    """A listener: ``host`` is bare (no IPv6 brackets), ready to bind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: Literal["http", "https"]
    host: str
    port: int

    @property
    def ssl(self) -> bool:
        return self.scheme == "https"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url

    @classmethod
    def parse(cls, text: str, key: str = "inference_address") -> Address:
        """Parse ``http(s)://host[:port]``; ``key`` picks the default port and names errors."""
        try:
            return _address(text, key)
        except ValueError as exc:
            raise ConfigError(_invalid(key, text.strip(), str(exc))) from None


def _address(text: str, key: str) -> Address:
    # ValueError, so that pydantic gathers it with the other bad values.
    text = text.strip()
    if text.lower().startswith("unix:"):
        raise ValueError("unix: sockets are not supported; use http(s)://host:port")
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError("expected http(s)://host[:port]")
    host = match["host"] or match["ipv6"]
    if match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("bad IPv6 address") from None
    ssl = match["scheme"].lower() == "https"
    port = _DEFAULT_PORTS.get(key, (80, 443))[ssl] if match["port"] is None else int(match["port"])
    if port > 65535:
        raise ValueError("port must be 0-65535")
    return Address(scheme="https" if ssl else "http", host=host, port=port)


# ---------------------------------------------------------------- value types
# Values arrive as text (file, env) or typed (CLI overrides, Python callers). pydantic checks types,
# ranges and choices; the validators below only bring text to the form it checks, and say what
# pydantic cannot: Java's booleans, addresses, comma lists, regexes.


def _blank_is(default: object) -> BeforeValidator:
    """Text is stripped; blank text (``key=``) stands for ``default``."""
    return BeforeValidator(lambda v: (v.strip() or default) if isinstance(v, str) else v)


def _folded(fold: Callable[[str], str]) -> BeforeValidator:
    """Choices are matched in any case and reported as listed."""
    return BeforeValidator(lambda v: fold(v.strip()) if isinstance(v, str) else v)


def _int_text(value: object) -> object:
    # Strict int refuses all text; lax int would also take "5.0", "1_000", 5.0 and True.
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        return int(value)
    return value


def _java_bool(value: object) -> object:
    # pydantic's lax bool would take yes/on/1, which Java reads as false.
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    return value


def _to_address(value: object, info: ValidationInfo) -> object:
    return _address(value, info.field_name or "") if isinstance(value, str) else value


def _split_commas(value: object) -> object:
    return value.split(",") if isinstance(value, str) else value  # TorchServe splits regexes too


def _drop_blank(items: list[str]) -> list[str]:
    return [item.strip() for item in items if item.strip()]


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    # Deep nesting overflows the parser's stack; a huge {n} overflows its counter.
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"bad regular expression {_shown(pattern)}: {exc}") from None
    return pattern


def _all_or_list(models: list[str]) -> list[str]:
    return ["all"] if [m.lower() for m in models] == ["all"] else models


Int = Annotated[int, Field(strict=True), BeforeValidator(_int_text)]
NonNegInt = Annotated[Int, Field(ge=0)]
PosInt = Annotated[Int, Field(ge=1)]
Bool = Annotated[bool, Field(strict=True), BeforeValidator(_java_bool)]
OptStr = Annotated[str | None, _blank_is(None)]
OptPath = Annotated[Path | None, _blank_is(None)]
AddressValue = Annotated[Address, BeforeValidator(_to_address)]
CommaList = Annotated[list[str], BeforeValidator(_split_commas), AfterValidator(_drop_blank)]


# ---------------------------------------------------------------- errors

# What the user gets told, by pydantic error type; others keep pydantic's wording.
_EXPECTED = {
    "int_type": "expected an integer",
    "greater_than_equal": "expected an integer >= {ge}",
    "bool_type": "expected true or false",
    "literal_error": "expected {expected}",
    "string_type": "expected a string",
    "path_type": "expected a path",
    "list_type": "expected a list",
    "dict_type": "expected a JSON object",
    "json_invalid": "invalid JSON: {error}",
    "json_type": "expected JSON text",
    "model_type": "expected http(s)://host[:port]",
    "value_error": "{error}",
}


def _config_error(exc: ValidationError, where: str = "") -> ConfigError:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "?"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown configuration key: {key}")
            continue
        template = _EXPECTED.get(error["type"])
        expected = template.format(**error.get("ctx", {})) if template else error["msg"]
        problems.append(_invalid(key + where, error["input"], expected))
    return ConfigError("; ".join(problems))


# ---------------------------------------------------------------- ServerConfig

# TorchServe keys marserve has no use for. Together with unknown keys they land in ignored_keys.
TORCHSERVE_ONLY_KEYS = re.compile(
    r"grpc_.*|enable_grpc_ssl|vmargs|number_of_netty_threads|netty_client_threads|keystore.*"
    r"|plugins_path|prefer_direct_buffer|use_native_io|io_ratio|initial_worker_port"
    r"|initial_distribution_port|model_server_home|debug|ipex_.*|cpu_launcher_.*|cpp_log_config"
    r"|async_logging|ts_open_inference_protocol|ts_header_key_sequence_.*|system_metrics_cmd"
    r"|metrics_config|model_metrics_auto_detect|workflow_store|metric_time_interval"
)


def is_torchserve_only_key(key: str) -> bool:
    """True for a TorchServe key marserve ignores (as opposed to an unknown key)."""
    return TORCHSERVE_ONLY_KEYS.fullmatch(key) is not None


class ServerConfig(BaseModel):
    """All server settings; field names are the config.properties keys.

    Constructing one with a bad value raises ConfigError naming every bad key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    inference_address: AddressValue = Address(scheme="http", host="127.0.0.1", port=8080)
    management_address: AddressValue = Address(scheme="http", host="127.0.0.1", port=8081)
    metrics_address: AddressValue = Address(scheme="http", host="127.0.0.1", port=8082)

    model_store: OptPath = None
    load_models: Annotated[CommaList, AfterValidator(_all_or_list)] = []
    models: Annotated[Json[dict[str, dict[str, dict[str, Any]]]], _blank_is("{}")] = {}
    model_snapshot: Annotated[Json[dict[str, Any]] | None, _blank_is(None)] = None

    job_queue_size: PosInt = 100
    default_workers_per_model: NonNegInt = 0  # 0: one per GPU, else one per CPU
    default_response_timeout: PosInt = 120
    default_startup_timeout: PosInt = 120
    unregister_model_timeout: PosInt = 120
    # None: all detected; the caller clamps it to what it detects.
    number_of_gpu: Annotated[NonNegInt | None, _blank_is(None)] = None

    max_request_size: PosInt = 6553500
    max_response_size: PosInt = 6553500
    # Seconds a connection may go silent while it owes the server a request; then it is closed.
    request_read_timeout: PosInt = 60  # DEV: not a TorchServe key
    limit_max_image_pixels: Bool = True
    decode_input_request: Bool = True
    service_envelope: Annotated[
        Literal["body", "json", "kserve", "kservev2"] | None, _folded(str.lower), _blank_is(None)
    ] = None
    default_service_handler: OptStr = None
    install_py_dep_per_model: Bool = False
    max_download_size: PosInt = 10 << 30  # DEV (new key): bytes an archive download may have

    # DEV: empty (TorchServe allows any URL)
    allowed_urls: Annotated[CommaList, AfterValidator(lambda urls: [_regex(u) for u in urls])] = []
    use_env_allowed_urls: Bool = False
    blacklist_env_vars: Annotated[str, AfterValidator(_regex)] = ""
    enable_model_api: Bool = True  # DEV: TorchServe false
    # None (unset): tokens are on exactly when an API listens beyond loopback; see server/http/auth.py.
    disable_token_authorization: Annotated[Bool | None, _blank_is(None)] = None  # DEV: TorchServe false
    token_expiration_min: PosInt = 60
    enable_envvars_config: Bool = False
    cors_allowed_origin: OptStr = None
    cors_allowed_methods: OptStr = None
    cors_allowed_headers: OptStr = None
    certificate_file: OptPath = None
    private_key_file: OptPath = None

    # DEV: prometheus (TorchServe: log)
    metrics_mode: Annotated[Literal["log", "prometheus", "legacy"], _folded(str.lower)] = "prometheus"
    enable_metrics_api: Bool = True
    disable_system_metrics: Bool = False
    log_location: Annotated[Path, _blank_is(None)] = Path("logs")  # DEV: a key, not only env
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], _folded(str.upper)] = "INFO"
    log_format: Annotated[Literal["text", "json"], _folded(str.lower)] = "text"

    ignored_keys: tuple[str, ...] = ()

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_error(cls, data: Any, handler: ModelWrapValidatorHandler[ServerConfig]) -> ServerConfig:
        # Built directly or by load_config, a bad config fails with one ConfigError; pydantic lets
        # exceptions other than ValueError out as they are.
        try:
            return handler(data)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @model_validator(mode="after")
    def _https_needs_a_certificate(self) -> ServerConfig:
        for key in ("inference_address", "management_address", "metrics_address"):
            if getattr(self, key).ssl and not (self.certificate_file and self.private_key_file):
                # TorchServe would make up a self-signed certificate; clients could not trust it.
                raise ConfigError(f"{key} is https, which needs certificate_file and private_key_file")
        return self

    @classmethod
    def from_properties(cls, values: Mapping[str, object]) -> ServerConfig:
        """Build from raw key/values (text, or typed but for the JSON keys); unknown keys go to ``ignored_keys``."""
        known = {k: v for k, v in values.items() if k in cls.model_fields and k != "ignored_keys"}
        return cls.model_validate({**known, "ignored_keys": tuple(k for k in values if k not in known)})

    def url_allowed(self, url: str) -> bool:
        """Whether ``url`` fully matches one ``allowed_urls`` regex, ignoring case."""
        return any(re.fullmatch(p, url, re.IGNORECASE) for p in self.allowed_urls)


def key_warnings(config: ServerConfig) -> list[str]:
    """One warning for each key in ``config.ignored_keys``, for the caller to log at start."""
    known = [key for key in ServerConfig.model_fields if key != "ignored_keys"]
    warnings = []
    for key in config.ignored_keys:
        if is_torchserve_only_key(key):
            warnings.append(f"configuration key '{key}' is a TorchServe setting that marserve ignores")
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        warnings.append(f"unknown configuration key '{key}' (ignored){hint}")
    return warnings


# ---------------------------------------------------------------- loading

_ENV_RENAMES = {"token_expiration_min": "TS_TOKEN_EXPIRATION_TIME_MIN"}
_NOT_FROM_ENV = {"models", "model_snapshot", "enable_envvars_config", "ignored_keys"}


def env_var_name(key: str) -> str:
    """The ``TS_*`` variable that sets ``key`` when ``enable_envvars_config`` is on."""
    return _ENV_RENAMES.get(key, "TS_" + key.upper())


def _from_env(values: Mapping[str, object], env: Mapping[str, str]) -> dict[str, object]:
    found: dict[str, object] = {
        key: env[env_var_name(key)]
        for key in ServerConfig.model_fields
        if key not in _NOT_FROM_ENV and env_var_name(key) in env
    }
    # A bad use_env_allowed_urls counts as false here; ServerConfig then reports it.
    if "allowed_urls" in found and _java_bool({**values, **found}.get("use_env_allowed_urls")) is not True:
        del found["allowed_urls"]
    return found


def load_config(
    path: Path | None, *, env: Mapping[str, str], overrides: Mapping[str, object] | None = None
) -> ServerConfig:
    """Read ``path`` (None: defaults only), then apply CLI ``overrides`` and ``TS_*`` env vars.

    An override of None means "not given". ``$$NAME$$`` is resolved in file values only.
    """
    values: dict[str, object] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        values.update(resolve_env_refs(parse_properties(text), env))
    if "log_location" not in values and env.get("LOG_LOCATION"):
        values["log_location"] = env["LOG_LOCATION"]  # TorchServe's only way to set it
    for key, value in (overrides or {}).items():
        if key not in ServerConfig.model_fields or key == "ignored_keys":
            raise ConfigError(f"unknown configuration key: {key}")
        if value is not None:
            values[key] = value
    # A bad value counts as false here; ServerConfig then reports it with the others.
    if _java_bool(values.get("enable_envvars_config")) is True:
        values.update(_from_env(values, env))
    return ServerConfig.from_properties(values)


def resolve_config_path(cli_path: Path | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    """TorchServe's choice of file: ``TS_CONFIG_FILE``, ``--ts-config``, ``./config.properties``.

    Restoring a snapshot instead (TorchServe's step before ``./config.properties``) is the
    caller's business.
    """
    if env.get("TS_CONFIG_FILE"):
        return Path(env["TS_CONFIG_FILE"])
    if cli_path is not None:
        return cli_path
    default = cwd / "config.properties"
    return default if default.is_file() else None


# ---------------------------------------------------------------- model YAML

DEFAULT_MAX_RETRY_TIMEOUT_SEC = 300
DEFAULT_CLIENT_TIMEOUT_MS = 0  # 0: requests never expire in the queue

YamlNonNegInt = Annotated[int, Field(ge=0)] | None
YamlPosInt = Annotated[int, Field(ge=1)] | None


class ModelYamlConfig(BaseModel):
    """The model YAML keys the frontend reads (TorchServe's ``ModelConfig``); None = not set."""

    # Strict: YAML values are typed already, so "4" or 4.0 for an integer is a mistake.
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    minWorkers: YamlNonNegInt = None
    maxWorkers: YamlNonNegInt = None
    batchSize: YamlNonNegInt = None  # 0: unset
    maxBatchDelay: YamlNonNegInt = None  # ms; 0: unset
    responseTimeout: YamlPosInt = None  # s; TorchServe's default once a YAML exists: 120
    startupTimeout: YamlPosInt = None  # s; likewise 120
    deviceType: Annotated[Literal["cpu", "gpu"] | None, _folded(str.lower)] = None
    deviceIds: list[Annotated[int, Field(ge=0)]] | None = None
    jobQueueSize: YamlPosInt = None
    maxRetryTimeoutInSec: YamlNonNegInt = None  # default DEFAULT_MAX_RETRY_TIMEOUT_SEC
    clientTimeoutInMills: YamlNonNegInt = None  # default DEFAULT_CLIENT_TIMEOUT_MS
    useJobTicket: bool | None = None
    parallelType: Annotated[Literal["pp", "tp", "pptp", "custom"] | None, _folded(str.lower)] = None
    parallelLevel: YamlNonNegInt = None


def parse_model_yaml(text: str) -> tuple[ModelYamlConfig, dict[Any, Any]]:
    """Parse a model YAML: the frontend's typed view, and the whole dict for the handler."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid model YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"invalid model YAML: the top level must be a mapping, not {kind}")
    try:
        return ModelYamlConfig.model_validate(data), data
    except ValidationError as exc:
        raise _config_error(exc, " in model YAML") from None
