"""server.config: properties syntax, precedence, strict values, addresses, model YAML."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from server.config import (
    Address,
    ConfigError,
    ModelYamlConfig,
    ServerConfig,
    env_var_name,
    is_torchserve_only_key,
    key_warnings,
    load_config,
    parse_model_yaml,
    parse_properties,
    resolve_config_path,
    resolve_env_refs,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.properties"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **overrides: object) -> ServerConfig:
    return load_config(write(tmp_path, text), env=env or {}, overrides=overrides)


def assert_one_line_naming(exc: pytest.ExceptionInfo[ConfigError], key: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message
    assert key in message


# ---------------------------------------------------------------- properties syntax


def test_separators() -> None:
    text = "a=1\nb:2\nc 3\nd\t4\ne = 5\nf   :  6\ng==7\nh\ni=\nj :\n"
    assert parse_properties(text) == {
        "a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6",
        "g": "=7", "h": "", "i": "", "j": "",
    }


def test_comments_and_leading_whitespace() -> None:
    text = "# comment\n! bang comment\n   # indented comment\n\t\fkey = v\n\n   \nx=#not a comment\n"
    assert parse_properties(text) == {"key": "v", "x": "#not a comment"}


def test_a_comment_line_never_continues() -> None:
    assert parse_properties("# comment \\\nkey=v\n") == {"key": "v"}


def test_continuation_drops_leading_whitespace() -> None:
    text = "list = a,\\\n       b,\\\n\t   c\nnext=1\n"
    assert parse_properties(text) == {"list": "a,b,c", "next": "1"}


def test_continued_line_is_not_a_comment() -> None:
    assert parse_properties("k=a\\\n   #b\n") == {"k": "a#b"}


def test_even_backslashes_do_not_continue() -> None:
    assert parse_properties("path=C:\\\\dir\\\\\nnext=1\n") == {"path": "C:\\dir\\", "next": "1"}


def test_blank_line_ends_a_continuation_and_eof_continuation_is_dropped() -> None:
    assert parse_properties("a=x\\\n\nb=y\\") == {"a": "x", "b": "y"}


def test_crlf_and_cr_line_endings() -> None:
    assert parse_properties("a=1\r\nb=2\rc=3\\\r\n  4") == {"a": "1", "b": "2", "c": "34"}


def test_escapes() -> None:
    text = r"k\=e\:y\ x = \t\n\r\f\\\=\:\u0041\u00e9\q" + "\n"
    assert parse_properties(text) == {"k=e:y x": "\t\n\r\f\\=:A\u00e9q"}


def test_surrogate_pair_escape_is_one_character() -> None:
    assert parse_properties(r"smile=\uD83D\uDE00") == {"smile": "\U0001F600"}


def test_trailing_whitespace_is_kept_like_java() -> None:
    assert parse_properties("k = v  \n") == {"k": "v  "}


def test_last_duplicate_wins() -> None:
    assert parse_properties("k=1\nother=x\nk=2\n") == {"k": "2", "other": "x"}


def test_malformed_unicode_escape_names_the_key() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_properties("model_store=\\u12G4\n")
    assert_one_line_naming(exc, "model_store")


def _escape(text: str, is_key: bool, ascii_only: bool) -> str:
    out = []
    for i, ch in enumerate(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch in "\t\n\r\f":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[ch])
        elif ch in "=:#!" or (ch == " " and (is_key or i == 0)):  # as Properties.store does
            out.append("\\" + ch)
        elif ascii_only and ord(ch) > 126:
            units = ch.encode("utf-16-be")
            out.extend(f"\\u{units[j]:02x}{units[j + 1]:02x}" for j in range(0, len(units), 2))
        else:
            out.append(ch)
    return "".join(out)


@given(
    st.dictionaries(st.text(max_size=12), st.text(max_size=20), max_size=8),
    st.booleans(),
    st.sampled_from(["=", ":", " ", " = ", "\t:\t"]),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_properties_round_trip(
    entries: dict[str, str], ascii_only: bool, separator: str, newline: str
) -> None:
    # An empty key needs a visible separator, as Java's Properties.store writes it.
    text = newline.join(
        _escape(k, True, ascii_only) + (separator if k or separator.strip() else "=")
        + _escape(v, False, ascii_only)
        for k, v in entries.items()
    )
    assert parse_properties(text) == entries


# ---------------------------------------------------------------- $$NAME$$


def test_env_references_are_replaced() -> None:
    props = {"model_store": "$$HOME_DIR$$/store", "x": "$$AB$$-$$AB$$", "y": "$$A$$ stays"}
    assert resolve_env_refs(props, {"HOME_DIR": "/srv", "AB": "v$1\\"}) == {
        "model_store": "/srv/store", "x": "v$1\\-v$1\\", "y": "$$A$$ stays",
    }


def test_unset_env_reference_fails_naming_variable_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, "model_store=$$NOPE$$\n")
    assert_one_line_naming(exc, "model_store")
    assert "Invalid Environment Variable NOPE" in str(exc.value)


def test_env_references_in_file_are_resolved_by_load_config(tmp_path: Path) -> None:
    config = load(tmp_path, "model_store=$$STORE$$\njob_queue_size=$$Q_SIZE$$\n", {"STORE": "/m", "Q_SIZE": "7"})
    assert config.model_store == Path("/m") and config.job_queue_size == 7


# ---------------------------------------------------------------- defaults

# TorchServe 0.12's defaults for every key marserve keeps unchanged.
TORCHSERVE_DEFAULTS = {
    "inference_address": "http://127.0.0.1:8080",
    "management_address": "http://127.0.0.1:8081",
    "metrics_address": "http://127.0.0.1:8082",
    "model_store": None,
    "load_models": [],
    "model_snapshot": None,
    "job_queue_size": 100,
    "default_workers_per_model": 0,
    "default_response_timeout": 120,
    "default_startup_timeout": 120,
    "unregister_model_timeout": 120,
    "number_of_gpu": None,
    "use_env_allowed_urls": False,
    "install_py_dep_per_model": False,
    "blacklist_env_vars": "",
    "max_request_size": 6553500,
    "max_response_size": 6553500,
    "limit_max_image_pixels": True,
    "decode_input_request": True,
    "service_envelope": None,
    "default_service_handler": None,
    "cors_allowed_origin": None,
    "cors_allowed_methods": None,
    "cors_allowed_headers": None,
    "certificate_file": None,
    "private_key_file": None,
    "enable_metrics_api": True,
    "disable_system_metrics": False,
    "token_expiration_min": 60,
    "enable_envvars_config": False,
    # gRPC (server/grpc/).
    "grpc_inference_address": "127.0.0.1",
    "grpc_management_address": "127.0.0.1",
    "grpc_inference_port": 7070,
    "grpc_management_port": 7071,
    "grpc_inference_max_connection_age_ms": None,  # unset: no limit (TorchServe: Long.MAX_VALUE)
    "grpc_management_max_connection_age_ms": None,
    "grpc_inference_max_connection_age_grace_ms": None,
    "grpc_management_max_connection_age_grace_ms": None,
    "enable_grpc_ssl": False,
}
DEV_DEFAULTS = {
    "request_read_timeout": 60,
    "worker_template": True,
    "allowed_urls": [],
    "enable_model_api": True,
    "metrics_mode": "prometheus",
    "log_location": Path("logs"),
    "log_level": "INFO",
    "log_format": "text",
    "models": {},
    "disable_token_authorization": None,  # unset: decided by the addresses
    "max_download_size": 10 << 30,
    "model_store_poll_seconds": 0,
    "model_store_version_policy": {},
    "model_store_watch_urls": [],
    "max_workers": None,  # unset: derived from the machine when the server starts
    "max_workers_per_model": None,  # unset: max_workers
    "autoscale_window_ms": 1000,
    "autoscale_cooldown_ms": 30_000,
    # The HTTP layer's keys (server/http).
    "request_head_timeout": 10,
    "min_request_body_rate": 16384,
    "max_connections": 4096,
    "log_max_bytes": 100 << 20,
    "log_backup_count": 5,
    "enable_grpc": True,  # a new key: false starts no gRPC server
}


def test_defaults() -> None:
    config = load_config(None, env={})
    for key, expected in TORCHSERVE_DEFAULTS.items():
        value = getattr(config, key)
        assert (str(value) if isinstance(value, Address) else value) == expected, key
    for key, expected in DEV_DEFAULTS.items():
        assert getattr(config, key) == expected, key
    assert set(TORCHSERVE_DEFAULTS) | set(DEV_DEFAULTS) | {"ignored_keys"} == set(ServerConfig.model_fields)
    assert config.ignored_keys == ()


def test_example_file_documents_every_key_with_its_default(tmp_path: Path) -> None:
    example = (REPO / "config.properties.example").read_text()
    documented = re.findall(r"^#([a-z_]+)=(.*)$", example, re.MULTILINE)
    assert {k for k, _ in documented} == set(ServerConfig.model_fields) - {"ignored_keys"}
    # Uncommented, the example must load to exactly the defaults.
    config = load(tmp_path, "\n".join(f"{k}={v}" for k, v in documented))
    assert config == ServerConfig()


def test_config_is_frozen() -> None:
    config = ServerConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.job_queue_size = 5  # type: ignore[misc]


# ---------------------------------------------------------------- precedence


def test_file_values_are_typed(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "model_store=/models\nload_models=a.mar, b=b.mar ,,c=https://x/c.mar\njob_queue_size=5\n"
        "decode_input_request=FALSE\nservice_envelope=kservev2\nmetrics_mode=LOG\nlog_level=debug\n"
        'models={"m": {"1.0": {"minWorkers": 2}}}\nnumber_of_gpu=2\n',
    )
    assert config.model_store == Path("/models")
    assert config.load_models == ["a.mar", "b=b.mar", "c=https://x/c.mar"]
    assert config.job_queue_size == 5
    assert config.decode_input_request is False
    assert config.service_envelope == "kservev2"
    assert config.metrics_mode == "log"
    assert config.log_level == "DEBUG"
    assert config.models == {"m": {"1.0": {"minWorkers": 2}}}
    assert config.number_of_gpu == 2


def test_load_models_all_is_case_insensitive(tmp_path: Path) -> None:
    assert load(tmp_path, "load_models=ALL\n").load_models == ["all"]


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "model_store=/file\nload_models=a.mar\nenable_model_api=false\njob_queue_size=5\n",
        model_store=Path("/cli"),
        load_models=["b.mar", "c.mar"],
        enable_model_api=True,
        disable_token_authorization=None,  # None: flag not given
    )
    assert config.model_store == Path("/cli")
    assert config.load_models == ["b.mar", "c.mar"]
    assert config.enable_model_api is True
    assert config.disable_token_authorization is None
    assert config.job_queue_size == 5


ENV = {
    "TS_MODEL_STORE": "/env",
    "TS_JOB_QUEUE_SIZE": "9",
    "TS_TOKEN_EXPIRATION_TIME_MIN": "5",
    "TS_METRIC_TIME_INTERVAL": "1",  # not env-settable
    "TS_MODELS": '{"x": {}}',  # not env-settable
    "TS_ALLOWED_URLS": "https://env/.*",
}


def test_env_is_ignored_unless_enabled_in_file(tmp_path: Path) -> None:
    config = load(tmp_path, "model_store=/file\n", ENV | {"TS_ENABLE_ENVVARS_CONFIG": "true"})
    assert config.model_store == Path("/file") and config.job_queue_size == 100


def test_env_beats_overrides_and_file_when_enabled(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "enable_envvars_config=true\nmodel_store=/file\njob_queue_size=3\nmetric_time_interval=30\n",
        ENV,
        model_store="/cli",
    )
    assert config.model_store == Path("/env")
    assert config.job_queue_size == 9
    assert config.token_expiration_min == 5
    assert "metric_time_interval" in config.ignored_keys  # TorchServe-only, whether set in file or env
    assert config.models == {}
    assert config.allowed_urls == []  # use_env_allowed_urls is off


def test_env_allowed_urls_need_use_env_allowed_urls(tmp_path: Path) -> None:
    config = load(tmp_path, "enable_envvars_config=true\nuse_env_allowed_urls=true\n", ENV)
    assert config.allowed_urls == ["https://env/.*"]


def test_env_var_names() -> None:
    assert env_var_name("job_queue_size") == "TS_JOB_QUEUE_SIZE"
    assert env_var_name("token_expiration_min") == "TS_TOKEN_EXPIRATION_TIME_MIN"


def test_log_location_env_is_a_fallback(tmp_path: Path) -> None:
    assert load(tmp_path, "", {"LOG_LOCATION": "/var/log/ms"}).log_location == Path("/var/log/ms")
    assert load(tmp_path, "log_location=/mine\n", {"LOG_LOCATION": "/x"}).log_location == Path("/mine")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.properties"):
        load_config(tmp_path / "nope.properties", env={})


def test_utf8_file_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "c.properties"
    path.write_bytes("\ufeffmodel_store=/mod\u00e8les\n".encode())
    assert load_config(path, env={}).model_store == Path("/mod\u00e8les")


def test_unknown_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, "", no_such_key=1)
    assert_one_line_naming(exc, "no_such_key")


def test_ignored_and_unknown_keys(tmp_path: Path) -> None:
    config = load(tmp_path, "grpc_inference_port=7070\nvmargs=-Xmx4g\nkeystore_pass=x\nfoo=1\nignored_keys=x\n")
    # grpc_* keys are marserve's too now (server/grpc/): read, not ignored.
    assert config.ignored_keys == ("vmargs", "keystore_pass", "foo", "ignored_keys")
    assert [is_torchserve_only_key(k) for k in config.ignored_keys] == [True, True, False, False]


def test_key_warnings_suggest_the_closest_key(tmp_path: Path) -> None:
    config = load(tmp_path, "inference_adress=http://127.0.0.1:38080\nJob_Queue_Size=5\n")
    assert config.inference_address.port == 8080  # still ignored, but now said so
    assert key_warnings(config) == [
        "unknown configuration key 'inference_adress' (ignored); did you mean 'inference_address'?",
        "unknown configuration key 'Job_Queue_Size' (ignored); did you mean 'job_queue_size'?",
    ]


def test_key_warnings_without_a_close_key(tmp_path: Path) -> None:
    config = load(tmp_path, "xyzzy=1\nignored_keys=x\n")
    assert key_warnings(config) == [
        "unknown configuration key 'xyzzy' (ignored)",
        "unknown configuration key 'ignored_keys' (ignored)",
    ]


def test_key_warnings_for_torchserve_only_keys(tmp_path: Path) -> None:
    config = load(tmp_path, "vmargs=-Xmx4g\nworkflow_store=/wf\nmetric_time_interval=30\ngrpc_inference_port=7070\n")
    assert key_warnings(config) == [
        f"configuration key '{key}' is a TorchServe setting that marserve ignores"
        for key in ("vmargs", "workflow_store", "metric_time_interval")
    ]
    assert key_warnings(load(tmp_path, "job_queue_size=5\n")) == []


def test_resolve_config_path(tmp_path: Path) -> None:
    assert resolve_config_path(None, {}, tmp_path) is None
    write(tmp_path, "")
    assert resolve_config_path(None, {}, tmp_path) == tmp_path / "config.properties"
    assert resolve_config_path(Path("/cli"), {}, tmp_path) == Path("/cli")
    assert resolve_config_path(Path("/cli"), {"TS_CONFIG_FILE": "/env"}, tmp_path) == Path("/env")


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("job_queue_size=abc", "job_queue_size"),
        ("job_queue_size=0", "job_queue_size"),
        ("job_queue_size=1.5", "job_queue_size"),
        ("default_workers_per_model=-1", "default_workers_per_model"),
        ("default_response_timeout=", "default_response_timeout"),
        ("number_of_gpu=many", "number_of_gpu"),
        ("max_request_size=6.5MB", "max_request_size"),
        ("decode_input_request=yes", "decode_input_request"),
        ("enable_model_api=1", "enable_model_api"),
        ("disable_token_authorization=on", "disable_token_authorization"),
        ("service_envelope=xml", "service_envelope"),
        ("metrics_mode=statsd", "metrics_mode"),
        ("log_format=yaml", "log_format"),
        ("log_level=LOUD", "log_level"),
        ("allowed_urls=https://ok/.*,(unclosed", "allowed_urls"),
        ("blacklist_env_vars=[", "blacklist_env_vars"),
        ("allowed_urls=" + "(" * 5000, "allowed_urls"),  # deeper than re's parser recurses
        ("blacklist_env_vars=a{99999999999}", "blacklist_env_vars"),  # a repeat count re cannot hold
        ("job_queue_size=" + "9" * 5000, "job_queue_size"),  # more digits than int() converts
        ("models={not json", "models"),
        ("models=[1, 2]", "models"),
        ('models={"m": 1}', "models"),
        ("model_snapshot={oops", "model_snapshot"),
        ("model_snapshot=\"text\"", "model_snapshot"),
        ("inference_address=unix:/tmp/ts.sock", "inference_address"),
        ("inference_address=localhost:8080", "inference_address"),
        ("management_address=ftp://h:1", "management_address"),
        ("metrics_address=http://h:99999", "metrics_address"),
        ("metrics_address=http://[not:v6]:1", "metrics_address"),
        ("inference_address=http://h:80/path", "inference_address"),
        ("enable_envvars_config=maybe", "enable_envvars_config"),
    ],
)
def test_bad_value_is_a_one_line_error_naming_the_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, line + "\n")
    assert_one_line_naming(exc, key)


def test_bad_message_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^invalid value for job_queue_size: 'abc' \(expected an integer\)$"):
        load(tmp_path, "job_queue_size=abc\n")


def test_every_bad_value_is_reported_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, "enable_model_api=yes\njob_queue_size=abc\nmodel_store=/ok\nlog_format=yaml\n")
    assert str(exc.value) == (
        "invalid value for job_queue_size: 'abc' (expected an integer); "
        "invalid value for enable_model_api: 'yes' (expected true or false); "
        "invalid value for log_format: 'yaml' (expected 'text' or 'json')"
    )


def test_every_bad_model_yaml_value_is_reported() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_model_yaml("minWorkers: -1\nbatchSize: '4'\ndeviceIds: [0, a]\n")
    assert str(exc.value) == (
        "invalid value for minWorkers in model YAML: -1 (expected an integer from 0 to 4096); "
        "invalid value for batchSize in model YAML: '4' (expected an integer); "
        "invalid value for deviceIds.1 in model YAML: 'a' (expected an integer)"
    )


def test_bad_typed_override_and_direct_construction() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, env={}, overrides={"enable_model_api": "sure"})
    assert_one_line_naming(exc, "enable_model_api")
    with pytest.raises(ConfigError) as exc:
        ServerConfig(job_queue_size=True)  # type: ignore[arg-type]
    assert_one_line_naming(exc, "job_queue_size")
    with pytest.raises(ConfigError) as exc:
        ServerConfig(bogus=1)  # type: ignore[call-arg]
    assert_one_line_naming(exc, "bogus")


def test_multiline_bad_value_still_gives_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, "job_queue_size=1\\n2\n")
    assert_one_line_naming(exc, "job_queue_size")


def test_booleans_are_case_insensitive(tmp_path: Path) -> None:
    config = load(tmp_path, "enable_model_api=FALSE\ndisable_token_authorization=True\n")
    assert config.enable_model_api is False and config.disable_token_authorization is True


# ---------------------------------------------------------------- allowed_urls


def test_allowed_urls_default_allows_nothing() -> None:
    config = ServerConfig()
    assert not config.url_allowed("https://example.com/m.mar")
    assert not config.url_allowed("file:///etc/passwd")


def test_allowed_urls_match_fully_and_ignore_case(tmp_path: Path) -> None:
    # Backslashes are properties escapes, so a regex's \. is written \\. in the file.
    config = load(tmp_path, r"allowed_urls=https://models\\.example\\.com/.*\\.mar, file:///srv/.*" + "\n")
    assert config.allowed_urls == [r"https://models\.example\.com/.*\.mar", "file:///srv/.*"]
    assert config.url_allowed("https://models.example.com/a/b.mar")
    assert config.url_allowed("HTTPS://MODELS.EXAMPLE.COM/B.MAR")
    assert config.url_allowed("file:///srv/x.mar")
    assert not config.url_allowed("https://models.example.com/b.mar.evil")  # full match only
    assert not config.url_allowed("https://evil.com/?https://models.example.com/b.mar")
    assert not config.url_allowed("https://models.example.com/b.tar.gz")


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("key", "text", "scheme", "host", "port"),
    [
        ("inference_address", "http://0.0.0.0:9090", "http", "0.0.0.0", 9090),
        ("inference_address", "http://localhost", "http", "localhost", 80),
        ("inference_address", "https://localhost", "https", "localhost", 443),
        ("management_address", "http://127.0.0.1", "http", "127.0.0.1", 8081),
        ("management_address", "HTTPS://127.0.0.1", "https", "127.0.0.1", 8444),
        ("metrics_address", "http://127.0.0.1", "http", "127.0.0.1", 8082),
        ("metrics_address", "https://127.0.0.1/", "https", "127.0.0.1", 8445),
        ("inference_address", "http://[::1]:8080", "http", "::1", 8080),
        ("management_address", "https://[::]", "https", "::", 8444),
        ("inference_address", "http://h:0", "http", "h", 0),
    ],
)
def test_addresses(key: str, text: str, scheme: str, host: str, port: int) -> None:
    address = Address.parse(text, key)
    assert (address.scheme, address.host, address.port) == (scheme, host, port)
    assert address.ssl == (scheme == "https")


@pytest.mark.parametrize("missing", ["certificate_file", "private_key_file"])
def test_https_address_needs_certificate_and_key(tmp_path: Path, missing: str) -> None:
    files = {"certificate_file": "cert.pem", "private_key_file": "key.pem"}
    del files[missing]
    text = "metrics_address=https://127.0.0.1:8445\n" + "".join(f"{k}={v}\n" for k, v in files.items())
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    assert str(exc.value) == "metrics_address is https, which needs certificate_file and private_key_file"


def test_address_url_and_file_parsing(tmp_path: Path) -> None:
    assert str(Address.parse("http://[::1]:8080")) == "http://[::1]:8080"
    config = load(
        tmp_path,
        "management_address=https://0.0.0.0\ninference_address=http://[fe80::1]:1\n"
        "certificate_file=cert.pem\nprivate_key_file=key.pem\n",
    )
    assert config.management_address == Address(scheme="https", host="0.0.0.0", port=8444)
    assert config.inference_address.url == "http://[fe80::1]:1"


# ---------------------------------------------------------------- model YAML


def test_model_yaml_known_keys_and_the_whole_dict() -> None:
    text = (
        "minWorkers: 1\nmaxWorkers: 4\nbatchSize: 8\nmaxBatchDelay: 50\nresponseTimeout: 30\n"
        "startupTimeout: 600\ndeviceType: GPU\ndeviceIds: [0, 2]\njobQueueSize: 10\n"
        "maxRetryTimeoutInSec: 60\nclientTimeoutInMills: 1000\nuseJobTicket: true\n"
        "parallelType: tp\nparallelLevel: 2\nhandler:\n  profile: true\npt2: {backend: inductor}\n"
    )
    config, raw = parse_model_yaml(text)
    assert config == ModelYamlConfig(
        minWorkers=1, maxWorkers=4, batchSize=8, maxBatchDelay=50, responseTimeout=30,
        startupTimeout=600, deviceType="gpu", deviceIds=[0, 2], jobQueueSize=10,
        maxRetryTimeoutInSec=60, clientTimeoutInMills=1000, useJobTicket=True,
        parallelType="tp", parallelLevel=2,
    )
    assert raw["handler"] == {"profile": True} and raw["pt2"] == {"backend": "inductor"}
    assert raw["deviceType"] == "GPU"  # the handler sees the YAML as written


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_model_yaml(text: str) -> None:
    config, raw = parse_model_yaml(text)
    assert raw == {}
    assert all(value is None for value in config.model_dump().values())


def test_model_yaml_null_means_not_set() -> None:
    assert parse_model_yaml("batchSize:\n")[0].batchSize is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("batchSize: '4'", "batchSize"),
        ("batchSize: 4.0", "batchSize"),
        ("minWorkers: -1", "minWorkers"),
        ("maxWorkers: true", "maxWorkers"),
        ("responseTimeout: 0", "responseTimeout"),
        ("deviceType: tpu", "deviceType"),
        ("deviceIds: 0", "deviceIds"),
        ("deviceIds: [0, a]", "deviceIds"),
        ("useJobTicket: 'yes'", "useJobTicket"),
        ("parallelType: dp", "parallelType"),
        ("jobQueueSize: [1]", "jobQueueSize"),
    ],
)
def test_model_yaml_wrong_types(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_model_yaml(text)
    assert_one_line_naming(exc, key)
    assert "model YAML" in str(exc.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n", "a: [unclosed\n  b: c"])
def test_model_yaml_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_model_yaml(text)
    assert "\n" not in str(exc.value) and "model YAML" in str(exc.value)


def test_model_yaml_is_safe_loaded() -> None:
    with pytest.raises(ConfigError):
        parse_model_yaml("x: !!python/object/apply:os.system ['true']\n")
