"""Server settings: ``config.properties`` (TorchServe's keys), CLI overrides, env vars, model YAML.

Precedence is TorchServe's: file < CLI overrides < ``TS_<KEY>`` env vars, the last only when
``enable_envvars_config=true``. Nothing here reads ``os.environ``: callers pass the environment.
Keys marserve does not use (JVM, Netty, keystore, Intel launcher, workflows, ...) and unknown keys
end up in ``ServerConfig.ignored_keys``; ``key_warnings`` words one warning for each.

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
- ``enable_grpc`` is a new key (default true): false starts no gRPC server (TorchServe always
  starts them). The gRPC ports' defaults (7070, 7071) give way: when neither ``enable_grpc`` nor
  a gRPC address or port is set and a default port is taken, the server starts without gRPC
  and says so (``grpc_defaulted``); a gRPC key set explicitly makes a taken port stop the start.
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
from dataclasses import dataclass
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

from .models.policy import parse_policies
from .workers.placement import default_max_workers, detect_gpu_count, machine_cpus, machine_memory


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


# ---------------------------------------------------------------- ranges
# Every numeric setting has one range, defined here and checked by every source that sets it: the
# register and scale calls (server/models/settings.py, registry.py), the model YAML and ``models=``
# (ModelYamlConfig) and config.properties (ServerConfig). The README's configuration reference lists
# them; a value outside its range is refused with a message that names the setting and the range.


@dataclass(frozen=True)
class Range:
    """The integers a setting may take, ``low`` to ``high`` inclusive."""

    low: int
    high: int

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def expected(self) -> str:
        return f"expected an integer from {self.low} to {self.high}"

    def up_to(self, high: int) -> Range:
        """This range, its top lowered to ``high`` (a cap the server's configuration sets)."""
        return Range(self.low, min(self.high, high))


BATCH_SIZE = Range(1, 1024)  # batch_size, batchSize (YAML, models=: 0 is "not set")
MAX_BATCH_DELAY = Range(0, 10_000)  # ms; the API's 0 is "do not wait", the YAML's "not set"
RESPONSE_TIMEOUT = Range(1, 3600)  # s: response_timeout, responseTimeout, default_response_timeout
# s: startup_timeout, startupTimeout, default_startup_timeout. 0, as in TorchServe: no worker can
# load in no time, so the registration fails.
STARTUP_TIMEOUT = Range(0, 3600)
JOB_QUEUE_SIZE = Range(1, 100_000)  # job_queue_size, jobQueueSize
# One model's worker count (initial_workers, min_worker, max_worker, minWorkers, maxWorkers,
# default_workers_per_model); max_workers_per_model lowers the top (WorkerCaps.workers).
WORKERS = Range(0, 4096)
WORKER_CAP = Range(1, 4096)  # max_workers, max_workers_per_model
UNREGISTER_TIMEOUT = Range(1, 3600)  # s
GPU_COUNT = Range(0, 1024)  # number_of_gpu
DEVICE_ID = Range(0, 1023)  # deviceIds items
MESSAGE_SIZE = Range(1, 2**31 - 1)  # bytes: max_request_size, max_response_size
READ_TIMEOUT = Range(1, 3600)  # s: request_read_timeout
DOWNLOAD_SIZE = Range(1, 1 << 40)  # bytes: max_download_size
TOKEN_MINUTES = Range(1, 525_600)  # token_expiration_min: a year at most
PORT = Range(0, 65_535)  # grpc_inference_port, grpc_management_port (0: any free port)
# ms: grpc_*_max_connection_age_ms, grpc_*_max_connection_age_grace_ms (gRPC core takes a C int).
CONNECTION_AGE_MS = Range(1, 2**31 - 1)
CONNECTION_GRACE_MS = Range(0, 2**31 - 1)
RETRY_TIMEOUT = Range(0, 86_400)  # s: maxRetryTimeoutInSec
CLIENT_TIMEOUT_MS = Range(0, 86_400_000)  # ms: clientTimeoutInMills
PARALLEL_LEVEL = Range(0, 1024)  # parallelLevel
POLL_SECONDS = Range(1, 86_400)  # s: model_store_poll_seconds (0: off)
BATCHES_IN_FLIGHT = Range(1, 2)  # max_batches_in_flight, maxBatchesInFlight: the one running and the next
# ms: autoscale_window_ms, autoscaleWindowMs (how long queue pressure lasts before a worker is
# added) and autoscale_cooldown_ms, autoscaleCooldownMs (how long quiet lasts before one goes).
AUTOSCALE_WINDOW_MS = Range(50, 600_000)
AUTOSCALE_COOLDOWN_MS = Range(100, 86_400_000)


def _within(limits: Range, *, zero: str | None = None) -> AfterValidator:
    """Checks a value against ``limits``; ``zero``: 0 is accepted too, meaning this."""
    expected = limits.expected() + (f", or 0 for {zero}" if zero else "")

    def check(value: int) -> int:
        if value in limits or (zero and value == 0):
            return value
        raise ValueError(expected)

    return AfterValidator(check)


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


def _host(value: str) -> str:
    """A bare host to bind (TorchServe's ``grpc_*_address``: a name or an IP, no scheme or port);
    an IPv6 address may come in brackets, which are dropped."""
    host = value.strip()
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if bracketed or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("expected a host name or an IP address, without a scheme or a port") from None
    elif not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        raise ValueError("expected a host name or an IP address, without a scheme or a port")
    return host


def _s3_urls(urls: list[str]) -> list[str]:
    for url in urls:
        if not url.lower().startswith("s3://"):
            raise ValueError("expected s3://bucket/prefix/ URLs")
    return urls


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
OptWorkerCap = Annotated[Annotated[Int, _within(WORKER_CAP)] | None, _blank_is(None)]
NonNegInt = Annotated[Int, Field(ge=0)]
PosInt = Annotated[Int, Field(ge=1)]
Bool = Annotated[bool, Field(strict=True), BeforeValidator(_java_bool)]
OptStr = Annotated[str | None, _blank_is(None)]
OptPath = Annotated[Path | None, _blank_is(None)]
AddressValue = Annotated[Address, BeforeValidator(_to_address)]
CommaList = Annotated[list[str], BeforeValidator(_split_commas), AfterValidator(_drop_blank)]
Host = Annotated[str, AfterValidator(_host)]
Port = Annotated[Int, _within(PORT)]
OptAgeMs = Annotated[Annotated[Int, _within(CONNECTION_AGE_MS)] | None, _blank_is(None)]
OptGraceMs = Annotated[Annotated[Int, _within(CONNECTION_GRACE_MS)] | None, _blank_is(None)]


def _check_models_json(models: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    # ModelYamlConfig is defined further down; this runs only once a config is built.
    problems: list[str] = []
    for name, versions in models.items():
        for version, entry in versions.items():
            try:
                ModelYamlConfig.model_validate(entry)
            except ValidationError as exc:
                problems.extend(f"{name} {version} {_problem(error)}" for error in exc.errors())
    if problems:
        raise ValueError("; ".join(problems))
    return models


def _check_policies(policies: dict[str, Any]) -> dict[str, Any]:
    parse_policies(policies)  # ValueError names the model
    return policies


def _problem(error: Any) -> str:
    """One pydantic error as ``key: value (expected ...)``."""
    key = ".".join(str(part) for part in error["loc"]) or "?"
    template = _EXPECTED.get(error["type"])
    expected = template.format(**error.get("ctx", {})) if template else error["msg"]
    return f"{key}: {_shown(error['input'])} ({expected})"


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
    r"vmargs|number_of_netty_threads|netty_client_threads|keystore.*"
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
    # gRPC (server/grpc/): TorchServe's keys and defaults. The inference port also serves the Open
    # Inference Protocol's GRPCInferenceService. DEV: enable_grpc is a new key.
    enable_grpc: Bool = True
    grpc_inference_address: Host = "127.0.0.1"
    grpc_management_address: Host = "127.0.0.1"
    grpc_inference_port: Port = 7070
    grpc_management_port: Port = 7071
    # None (unset): connections are never closed for their age (TorchServe: Long.MAX_VALUE).
    grpc_inference_max_connection_age_ms: OptAgeMs = None
    grpc_management_max_connection_age_ms: OptAgeMs = None
    grpc_inference_max_connection_age_grace_ms: OptGraceMs = None
    grpc_management_max_connection_age_grace_ms: OptGraceMs = None
    # TLS on both gRPC ports with certificate_file and private_key_file.
    enable_grpc_ssl: Bool = False

    model_store: OptPath = None
    load_models: Annotated[CommaList, AfterValidator(_all_or_list)] = []
    # Each version's entry is checked as a model YAML is (ModelYamlConfig): types and ranges.
    models: Annotated[
        Json[dict[str, dict[str, dict[str, Any]]]], _blank_is("{}"), AfterValidator(_check_models_json)
    ] = {}
    model_snapshot: Annotated[Json[dict[str, Any]] | None, _blank_is(None)] = None
    # DEV (new keys): watching the model store for new and removed versions (server/models/watching.py).
    # 0: off, TorchServe's behaviour. The policy is JSON per model (server/models/policy.py); the
    # watch URLs are s3:// prefixes watched as the store is, each allowed by allowed_urls.
    model_store_poll_seconds: Annotated[Int, _within(POLL_SECONDS, zero="off")] = 0
    model_store_version_policy: Annotated[
        Json[dict[str, Any]], _blank_is("{}"), AfterValidator(_check_policies)
    ] = {}
    model_store_watch_urls: Annotated[CommaList, AfterValidator(_s3_urls)] = []

    job_queue_size: Annotated[Int, _within(JOB_QUEUE_SIZE)] = 100
    # DEV: 0 means 1 (TorchServe: one per GPU, else one per CPU); at most max_workers_per_model.
    default_workers_per_model: Annotated[Int, _within(WORKERS)] = 0
    default_response_timeout: Annotated[Int, _within(RESPONSE_TIMEOUT)] = 120
    default_startup_timeout: Annotated[Int, _within(STARTUP_TIMEOUT)] = 120
    unregister_model_timeout: Annotated[Int, _within(UNREGISTER_TIMEOUT)] = 120
    # None: all detected; the caller clamps it to what it detects.
    number_of_gpu: Annotated[Annotated[Int, _within(GPU_COUNT)] | None, _blank_is(None)] = None
    # DEV (new keys): the most workers the server runs in all, and for one model version. None
    # (unset): derived from the machine when the server starts (see worker_caps).
    max_workers: OptWorkerCap = None
    max_workers_per_model: OptWorkerCap = None
    # DEV (new keys): autoscaling between a model's minWorkers and maxWorkers (see
    # server/workers/autoscaler.py); a model YAML's autoscaleWindowMs, autoscaleCooldownMs stand.
    autoscale_window_ms: Annotated[Int, _within(AUTOSCALE_WINDOW_MS)] = 1000
    autoscale_cooldown_ms: Annotated[Int, _within(AUTOSCALE_COOLDOWN_MS)] = 30_000

    max_request_size: Annotated[Int, _within(MESSAGE_SIZE)] = 6553500
    max_response_size: Annotated[Int, _within(MESSAGE_SIZE)] = 6553500
    # Seconds a connection may go silent while it owes the server a request; then it is closed.
    request_read_timeout: Annotated[Int, _within(READ_TIMEOUT)] = 60  # DEV: not a TorchServe key
    # DEV (new keys), against clients that trickle: a request head must be complete this many
    # seconds after its first byte; a body must arrive at this many bytes a second on average,
    # after a first request_read_timeout seconds of grace (0: no minimum).
    request_head_timeout: Annotated[Int, Field(ge=1, le=3600)] = 10
    min_request_body_rate: Annotated[Int, Field(ge=0)] = 16384
    # DEV (new key): open connections per listener; at the cap, a new connection closes the oldest
    # one that is idle or has not sent a whole request head, else it is refused.
    max_connections: Annotated[Int, Field(ge=1, le=1_000_000)] = 4096
    limit_max_image_pixels: Bool = True
    decode_input_request: Bool = True
    service_envelope: Annotated[
        Literal["body", "json", "kserve", "kservev2"] | None, _folded(str.lower), _blank_is(None)
    ] = None
    default_service_handler: OptStr = None
    install_py_dep_per_model: Bool = False
    # DEV (new key): fork workers from a warm template process (server/workers/templates.py).
    worker_template: Bool = True
    # DEV (new key): bytes an archive download may have
    max_download_size: Annotated[Int, _within(DOWNLOAD_SIZE)] = 10 << 30

    # DEV: empty (TorchServe allows any URL)
    allowed_urls: Annotated[CommaList, AfterValidator(lambda urls: [_regex(u) for u in urls])] = []
    use_env_allowed_urls: Bool = False
    blacklist_env_vars: Annotated[str, AfterValidator(_regex)] = ""
    enable_model_api: Bool = True  # DEV: TorchServe false
    # None (unset): tokens are on exactly when an API listens beyond loopback; see server/http/auth.py.
    disable_token_authorization: Annotated[Bool | None, _blank_is(None)] = None  # DEV: TorchServe false
    token_expiration_min: Annotated[Int, _within(TOKEN_MINUTES)] = 60
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
    # DEV (new keys): ts_log.log, model_log.log and access_log.log are rotated at this size, keeping
    # this many old files (TorchServe's log4j2 rotates at 100 MB too).
    log_max_bytes: Annotated[Int, Field(ge=1024)] = 100 << 20
    log_backup_count: Annotated[Int, Field(ge=0, le=1000)] = 5

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
        if self.enable_grpc and self.enable_grpc_ssl and not (self.certificate_file and self.private_key_file):
            raise ConfigError("enable_grpc_ssl is true, which needs certificate_file and private_key_file")
        return self

    @model_validator(mode="after")
    def _watch_urls_allowed(self) -> ServerConfig:
        for url in self.model_store_watch_urls:
            if not self.url_allowed(url):
                raise ConfigError(_invalid("model_store_watch_urls", url, "it does not match any of allowed_urls"))
        if self.model_store_watch_urls and not self.model_store_poll_seconds:
            raise ConfigError("model_store_watch_urls is set, which needs model_store_poll_seconds")
        return self

    @property
    def grpc_defaulted(self) -> bool:
        """Whether gRPC runs on its defaults alone (no gRPC key set): a default port that is taken
        then leaves gRPC off with a warning rather than stopping the start."""
        return not any(key in self.model_fields_set for key in _GRPC_PLACEMENT_KEYS)

    @classmethod
    def from_properties(cls, values: Mapping[str, object]) -> ServerConfig:
        """Build from raw key/values (text, or typed but for the JSON keys); unknown keys go to ``ignored_keys``."""
        known = {k: v for k, v in values.items() if k in cls.model_fields and k != "ignored_keys"}
        return cls.model_validate({**known, "ignored_keys": tuple(k for k in values if k not in known)})

    def url_allowed(self, url: str) -> bool:
        """Whether ``url`` fully matches one ``allowed_urls`` regex, ignoring case."""
        return any(re.fullmatch(p, url, re.IGNORECASE) for p in self.allowed_urls)


_GRPC_PLACEMENT_KEYS = (
    "enable_grpc", "grpc_inference_address", "grpc_management_address", "grpc_inference_port", "grpc_management_port",
)  # fmt: skip


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


# ---------------------------------------------------------------- worker caps


@dataclass(frozen=True)
class WorkerCaps:
    """The most workers the server runs: for one model version, and in all."""

    per_model: int
    total: int

    @property
    def workers(self) -> Range:
        """The range of one model's worker counts on this server."""
        return WORKERS.up_to(self.per_model)

    def expected(self) -> str:
        return f"{self.workers.expected()}; max_workers_per_model is {self.per_model}"


def worker_caps(
    config: ServerConfig, *, gpu_count: int, cpus: int | None = None, memory: int | None | Literal["detect"] = "detect"
) -> WorkerCaps:
    """The caps ``config`` sets, or else the machine's defaults (``default_max_workers``):
    ``max_workers`` defaults to a few workers per CPU and GPU, no more than memory holds, and
    ``max_workers_per_model`` to ``max_workers``, which it never exceeds. ``cpus`` and ``memory``
    are detected unless given (``memory`` None: it cannot be judged)."""
    total = config.max_workers
    if total is None:
        cpus = machine_cpus() if cpus is None else cpus
        total = default_max_workers(
            cpus, gpu_count, machine_memory() if memory == "detect" else memory, WORKER_CAP.high
        )
    return WorkerCaps(per_model=min(config.max_workers_per_model or total, total), total=total)


def usable_gpus(config: ServerConfig, env: Mapping[str, str]) -> int:
    """The GPUs the server will use: those detected, at most ``number_of_gpu``."""
    gpus = detect_gpu_count(env)
    return gpus if config.number_of_gpu is None else min(gpus, config.number_of_gpu)


def _check_default_workers(config: ServerConfig, env: Mapping[str, str]) -> None:
    # Only now are the caps known: they may come from the machine.
    if config.default_workers_per_model == 0:
        return
    caps = worker_caps(config, gpu_count=usable_gpus(config, env))
    if config.default_workers_per_model not in caps.workers:
        raise ConfigError(_invalid("default_workers_per_model", config.default_workers_per_model, caps.expected()))


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
    config = ServerConfig.from_properties(values)
    _check_default_workers(config, env)
    return config


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


class ModelYamlConfig(BaseModel):
    """The model YAML keys the frontend reads (TorchServe's ``ModelConfig``); None = not set.

    ``models=`` entries in config.properties are checked against it too. The ranges are the register
    API's (see the ranges above), but where TorchServe reads 0 as "not set", 0 is accepted.
    """

    # Strict: YAML values are typed already, so "4" or 4.0 for an integer is a mistake.
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    # minWorkers 0 reads as 1, and both bounds count only together and consistent (settings.py);
    # the server's max_workers_per_model lowers the top when the model is registered.
    minWorkers: Annotated[int, _within(WORKERS)] | None = None
    maxWorkers: Annotated[int, _within(WORKERS)] | None = None
    batchSize: Annotated[int, _within(BATCH_SIZE, zero="not set")] | None = None
    maxBatchDelay: Annotated[int, _within(MAX_BATCH_DELAY)] | None = None  # ms; 0: not set
    # s; TorchServe's default once a YAML exists: 120 (both)
    responseTimeout: Annotated[int, _within(RESPONSE_TIMEOUT)] | None = None
    startupTimeout: Annotated[int, _within(STARTUP_TIMEOUT)] | None = None
    deviceType: Annotated[Literal["cpu", "gpu"] | None, _folded(str.lower)] = None
    deviceIds: list[Annotated[int, _within(DEVICE_ID)]] | None = None
    jobQueueSize: Annotated[int, _within(JOB_QUEUE_SIZE)] | None = None
    maxRetryTimeoutInSec: Annotated[int, _within(RETRY_TIMEOUT)] | None = None  # default DEFAULT_MAX_RETRY_TIMEOUT_SEC
    clientTimeoutInMills: Annotated[int, _within(CLIENT_TIMEOUT_MS)] | None = None  # default DEFAULT_CLIENT_TIMEOUT_MS
    useJobTicket: bool | None = None
    parallelType: Annotated[Literal["pp", "tp", "pptp", "custom"] | None, _folded(str.lower)] = None
    parallelLevel: Annotated[int, _within(PARALLEL_LEVEL)] | None = None
    # marserve's: batches a worker may hold at once, and whether its handler's stages overlap.
    maxBatchesInFlight: Annotated[int, _within(BATCHES_IN_FLIGHT)] | None = None
    overlapStages: bool | None = None
    # marserve's: autoscaling between minWorkers and maxWorkers (config.properties' autoscale_*).
    autoscaleWindowMs: Annotated[int, _within(AUTOSCALE_WINDOW_MS)] | None = None
    autoscaleCooldownMs: Annotated[int, _within(AUTOSCALE_COOLDOWN_MS)] | None = None


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
