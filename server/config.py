"""Server settings: ``config.properties`` (TorchServe's keys), CLI overrides, env vars, model YAML.

Precedence is TorchServe's: file < CLI overrides < ``TS_<KEY>`` env vars, the last only when
``enable_envvars_config=true``. Nothing here reads ``os.environ``: callers pass the environment.
Keys marserve does not use (gRPC, JVM, Netty, keystore, Intel launcher, ...) and unknown keys end
up in ``ServerConfig.ignored_keys`` for the caller to warn about; TorchServe ignores them too.

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
- Addresses: ``unix:`` sockets are not supported; bracketed IPv6 hosts (``http://[::1]:8080``)
  are, which TorchServe's address pattern cannot parse.
- The file is read as UTF-8 (Java's ``Properties.load`` reads ISO-8859-1; same for ASCII files).
- ``$$NAME$$`` values are inserted literally (Java's ``appendReplacement`` mangles ``$`` and ``\\``).
- Values are stripped of surrounding whitespace before conversion; empty ``allowed_urls`` and
  ``load_models`` items are dropped. Regexes use Python's ``re`` syntax.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator


class ConfigError(Exception):
    """A bad setting. The message is one line and names the offending key."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def _invalid(key: str, value: object, expected: str, where: str = "") -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ConfigError(f"invalid value for {key}{where}: {shown} ({expected})")


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
        parts = []
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
        text = text.strip()
        if text.lower().startswith("unix:"):
            raise _invalid(key, text, "unix: sockets are not supported; use http(s)://host:port")
        match = _ADDRESS.fullmatch(text)
        if match is None:
            raise _invalid(key, text, "expected http(s)://host[:port]")
        host = match["host"] or match["ipv6"]
        if match["ipv6"] is not None:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise _invalid(key, text, "bad IPv6 address") from None
        scheme = match["scheme"].lower()
        if match["port"] is None:
            port = _DEFAULT_PORTS.get(key, (80, 443))[scheme == "https"]
        else:
            port = int(match["port"])
            if port > 65535:
                raise _invalid(key, text, "port must be 0-65535")
        return cls(scheme=scheme, host=host, port=port)


# ---------------------------------------------------------------- value converters
# Each takes (key, value): a string from a file or env var, or an already-typed Python value.


def _using(parse: Callable[[str, Any], Any]) -> BeforeValidator:
    # ConfigError is not a ValueError, so pydantic lets it through unchanged.
    return BeforeValidator(lambda value, info: parse(info.field_name, value))


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _invalid(key, value, "expected true or false")


def _to_opt_bool(key: str, value: Any) -> bool | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _to_bool(key, value)


def _int_parser(minimum: int, optional: bool = False) -> Callable[[str, Any], int | None]:
    def parse(key: str, value: Any) -> int | None:
        if optional and (value is None or (isinstance(value, str) and not value.strip())):
            return None
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid(key, value, "expected an integer")
        if value < minimum:
            raise _invalid(key, value, f"expected an integer >= {minimum}")
        return value

    return parse


def _to_opt_str(key: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return (value or "").strip() or None
    raise _invalid(key, value, "expected a string")


def _to_opt_path(key: str, value: Any) -> Path | None:
    if isinstance(value, PathLike):
        return Path(value)
    text = _to_opt_str(key, value)
    return None if text is None else Path(text)


def _to_path(key: str, value: Any) -> Path:
    path = _to_opt_path(key, value)
    if path is None:
        raise _invalid(key, value, "expected a path")
    return path


def _choice(
    *choices: str, optional: bool = False, upper: bool = False
) -> Callable[[str, Any], str | None]:
    def parse(key: str, value: Any) -> str | None:
        text = _to_opt_str(key, value)
        if text is None and optional:
            return None
        text = (text or "").upper() if upper else (text or "").lower()
        if text not in choices:
            raise _invalid(key, value, "expected one of " + ", ".join(choices))
        return text

    return parse


def _to_address(key: str, value: Any) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise _invalid(key, value, "expected http(s)://host[:port]")
    return Address.parse(value, key)


def _to_list(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = value.split(",")  # TorchServe splits on every comma, regexes included
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _invalid(key, value, "expected a comma-separated list")
    return [item.strip() for item in value if item.strip()]


def _compile(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _invalid(key, pattern, f"bad regular expression: {exc}") from None


def _to_regex_list(key: str, value: Any) -> list[str]:
    patterns = _to_list(key, value)
    for pattern in patterns:
        _compile(key, pattern)
    return patterns


def _to_regex(key: str, value: Any) -> str:
    pattern = _to_opt_str(key, value) or ""
    _compile(key, pattern)
    return pattern


def _to_load_models(key: str, value: Any) -> list[str]:
    models = _to_list(key, value)
    return ["all"] if [m.lower() for m in models] == ["all"] else models


def _json_object(nested: bool, optional: bool) -> Callable[[str, Any], dict[str, Any] | None]:
    expected = "expected a JSON object" + (" of {model: {version: {...}}}" if nested else "")

    def parse(key: str, value: Any) -> dict[str, Any] | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None if optional else {}
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the decoder goes
                raise _invalid(key, value, f"invalid JSON: {exc}") from None
        if not isinstance(value, dict) or (
            nested
            and not all(
                isinstance(versions, dict) and all(isinstance(v, dict) for v in versions.values())
                for versions in value.values()
            )
        ):
            raise _invalid(key, value, expected)
        return value

    return parse


AddressValue = Annotated[Address, _using(_to_address)]
Bool = Annotated[bool, _using(_to_bool)]
NonNegInt = Annotated[int, _using(_int_parser(0))]
PosInt = Annotated[int, _using(_int_parser(1))]


# ---------------------------------------------------------------- ServerConfig

# TorchServe keys marserve has no use for. Together with unknown keys they land in ignored_keys.
TORCHSERVE_ONLY_KEYS = re.compile(
    r"grpc_.*|enable_grpc_ssl|vmargs|number_of_netty_threads|netty_client_threads|keystore.*"
    r"|plugins_path|prefer_direct_buffer|use_native_io|io_ratio|initial_worker_port"
    r"|initial_distribution_port|model_server_home|debug|ipex_.*|cpu_launcher_.*|cpp_log_config"
    r"|async_logging|ts_open_inference_protocol|ts_header_key_sequence_.*|system_metrics_cmd"
    r"|metrics_config|model_metrics_auto_detect"
)


def is_torchserve_only_key(key: str) -> bool:
    """True for a TorchServe key marserve ignores (as opposed to an unknown key)."""
    return TORCHSERVE_ONLY_KEYS.fullmatch(key) is not None


class ServerConfig(BaseModel):
    """All server settings; field names are the config.properties keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inference_address: AddressValue = Address(scheme="http", host="127.0.0.1", port=8080)
    management_address: AddressValue = Address(scheme="http", host="127.0.0.1", port=8081)
    metrics_address: AddressValue = Address(scheme="http", host="127.0.0.1", port=8082)

    model_store: Annotated[Path | None, _using(_to_opt_path)] = None
    workflow_store: Annotated[Path | None, _using(_to_opt_path)] = None
    load_models: Annotated[list[str], _using(_to_load_models)] = []
    models: Annotated[dict[str, Any], _using(_json_object(nested=True, optional=False))] = {}
    model_snapshot: Annotated[
        dict[str, Any] | None, _using(_json_object(nested=False, optional=True))
    ] = None

    job_queue_size: PosInt = 100
    default_workers_per_model: NonNegInt = 0  # 0: one per GPU, else one per CPU
    default_response_timeout: PosInt = 120
    default_startup_timeout: PosInt = 120
    unregister_model_timeout: PosInt = 120
    # None: all detected; the caller clamps it to what it detects.
    number_of_gpu: Annotated[int | None, _using(_int_parser(0, optional=True))] = None

    max_request_size: PosInt = 6553500
    max_response_size: PosInt = 6553500
    # Seconds a connection may go silent while it owes the server a request; then it is closed.
    request_read_timeout: PosInt = 60  # DEV: not a TorchServe key
    limit_max_image_pixels: Bool = True
    decode_input_request: Bool = True
    service_envelope: Annotated[
        Literal["body", "json", "kserve", "kservev2"] | None,
        _using(_choice("body", "json", "kserve", "kservev2", optional=True)),
    ] = None
    default_service_handler: Annotated[str | None, _using(_to_opt_str)] = None
    install_py_dep_per_model: Bool = False
    max_download_size: PosInt = 10 << 30  # DEV (new key): bytes an archive download may have

    allowed_urls: Annotated[list[str], _using(_to_regex_list)] = []  # DEV: TorchServe allows any
    use_env_allowed_urls: Bool = False
    blacklist_env_vars: Annotated[str, _using(_to_regex)] = ""
    enable_model_api: Bool = True  # DEV: TorchServe false
    # None (unset): tokens are on exactly when an API listens beyond loopback; see server/auth.py.
    disable_token_authorization: Annotated[bool | None, _using(_to_opt_bool)] = None  # DEV: TorchServe false
    token_expiration_min: PosInt = 60
    enable_envvars_config: Bool = False
    cors_allowed_origin: Annotated[str | None, _using(_to_opt_str)] = None
    cors_allowed_methods: Annotated[str | None, _using(_to_opt_str)] = None
    cors_allowed_headers: Annotated[str | None, _using(_to_opt_str)] = None
    certificate_file: Annotated[Path | None, _using(_to_opt_path)] = None
    private_key_file: Annotated[Path | None, _using(_to_opt_path)] = None

    metrics_mode: Annotated[
        Literal["log", "prometheus", "legacy"], _using(_choice("log", "prometheus", "legacy"))
    ] = "prometheus"  # DEV: TorchServe log
    enable_metrics_api: Bool = True
    disable_system_metrics: Bool = False
    metric_time_interval: PosInt = 60
    log_location: Annotated[Path, _using(_to_path)] = Path("logs")  # DEV: a key, not only env
    log_level: Annotated[
        str, _using(_choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", upper=True))
    ] = "INFO"
    log_format: Annotated[Literal["text", "json"], _using(_choice("text", "json"))] = "text"

    ignored_keys: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        # Raised here rather than left to extra="forbid" so the error is a one-line ConfigError.
        if isinstance(data, Mapping):
            for key in data:
                if key not in cls.model_fields:
                    raise ConfigError(f"unknown configuration key: {key}")
        return data

    @model_validator(mode="after")
    def _https_needs_a_certificate(self) -> ServerConfig:
        for key in ("inference_address", "management_address", "metrics_address"):
            if getattr(self, key).ssl and not (self.certificate_file and self.private_key_file):
                # TorchServe would make up a self-signed certificate; clients could not trust it.
                raise ConfigError(f"{key} is https, which needs certificate_file and private_key_file")
        return self

    @classmethod
    def from_properties(cls, values: Mapping[str, object]) -> ServerConfig:
        """Build from raw key/values (strings or typed); unknown keys go to ``ignored_keys``."""
        known = {k: v for k, v in values.items() if k in cls.model_fields and k != "ignored_keys"}
        ignored = tuple(k for k in values if k not in known)
        try:
            return cls(**known, ignored_keys=ignored)
        except ValidationError as exc:
            raise _from_validation_error(exc) from None

    def url_allowed(self, url: str) -> bool:
        """Whether ``url`` fully matches one ``allowed_urls`` regex, ignoring case."""
        return any(re.fullmatch(p, url, re.IGNORECASE) for p in self.allowed_urls)


def _from_validation_error(exc: ValidationError, where: str = "") -> ConfigError:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "?"
    return _invalid(key, error.get("input"), error["msg"], where)


# ---------------------------------------------------------------- loading

_ENV_RENAMES = {"token_expiration_min": "TS_TOKEN_EXPIRATION_TIME_MIN"}
_NOT_FROM_ENV = {
    "models", "model_snapshot", "enable_envvars_config", "metric_time_interval", "ignored_keys"
}


def env_var_name(key: str) -> str:
    """The ``TS_*`` variable that sets ``key`` when ``enable_envvars_config`` is on."""
    return _ENV_RENAMES.get(key, "TS_" + key.upper())


def _from_env(values: Mapping[str, object], env: Mapping[str, str]) -> dict[str, object]:
    found = {
        key: env[env_var_name(key)]
        for key in ServerConfig.model_fields
        if key not in _NOT_FROM_ENV and env_var_name(key) in env
    }
    merged = {**values, **found}
    use_env_urls = _to_bool("use_env_allowed_urls", merged.get("use_env_allowed_urls", False))
    if "allowed_urls" in found and not use_env_urls:
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
    if _to_bool("enable_envvars_config", values.get("enable_envvars_config", False)):
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


def _yaml(
    check: Callable[[Any], bool], expected: str, normalize: Callable[[Any], Any] | None = None
) -> BeforeValidator:
    def parse(key: str, value: Any) -> Any:
        if value is None:
            return None
        if not check(value):
            raise _invalid(key, value, expected, " in model YAML")
        return normalize(value) if normalize else value

    return _using(parse)


def _is_int(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _yaml_choice(*choices: str) -> BeforeValidator:
    def check(value: Any) -> bool:
        return isinstance(value, str) and value.lower() in choices

    return _yaml(check, "expected one of " + ", ".join(choices), str.lower)


YamlNonNegInt = Annotated[int | None, _yaml(_is_int(0), "expected an integer >= 0")]
YamlPosInt = Annotated[int | None, _yaml(_is_int(1), "expected an integer >= 1")]


class ModelYamlConfig(BaseModel):
    """The model YAML keys the frontend reads (TorchServe's ``ModelConfig``); None = not set."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    minWorkers: YamlNonNegInt = None
    maxWorkers: YamlNonNegInt = None
    batchSize: YamlNonNegInt = None  # 0: unset
    maxBatchDelay: YamlNonNegInt = None  # ms; 0: unset
    responseTimeout: YamlPosInt = None  # s; TorchServe's default once a YAML exists: 120
    startupTimeout: YamlPosInt = None  # s; likewise 120
    deviceType: Annotated[Literal["cpu", "gpu"] | None, _yaml_choice("cpu", "gpu")] = None
    deviceIds: Annotated[
        list[int] | None,
        _yaml(lambda v: isinstance(v, list) and all(map(_is_int(0), v)), "expected a list of ints >= 0"),
    ] = None
    jobQueueSize: YamlPosInt = None
    maxRetryTimeoutInSec: YamlNonNegInt = None  # default DEFAULT_MAX_RETRY_TIMEOUT_SEC
    clientTimeoutInMills: YamlNonNegInt = None  # default DEFAULT_CLIENT_TIMEOUT_MS
    useJobTicket: Annotated[
        bool | None, _yaml(lambda v: isinstance(v, bool), "expected true or false")
    ] = None
    parallelType: Annotated[
        Literal["pp", "tp", "pptp", "custom"] | None, _yaml_choice("pp", "tp", "pptp", "custom")
    ] = None
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
    fields = ModelYamlConfig.model_fields
    known = {k: v for k, v in data.items() if isinstance(k, str) and k in fields}
    try:
        return ModelYamlConfig(**known), data
    except ValidationError as exc:
        raise _from_validation_error(exc, " in model YAML") from None
