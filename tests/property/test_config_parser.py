"""Property tests of the ``config.properties`` parser (server/config.py).

Whatever the file holds, loading it gives a ServerConfig or a one-line ConfigError, never another
exception; and Java-escaped keys and values read back exactly, across continuation lines,
comments and every line-break style. (tests/server/test_config.py round-trips single lines.)
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.config import ConfigError, ServerConfig, load_config, parse_properties

SETTINGS = settings(max_examples=300, deadline=None)
# Drawn character by character, a round-trip example costs more.
ROUND_TRIP_SETTINGS = settings(max_examples=120, deadline=None)

KEYS = sorted(set(ServerConfig.model_fields) - {"ignored_keys"})

# Values a config file might hold for any key: each converter must turn all of them into a value or a ConfigError.
values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", " ", "true", "FALSE", "0", "-1", "+7", "1e3", "9" * 5000, "http://127.0.0.1:8080", "http://[::1]",
         "https://h:99999", "unix:/x", "{}", "[]", '{"m": {"1.0": {}}}', "null", "NaN", "all", "(", "[" * 100_000]
    ),  # fmt: skip
    st.from_regex(r"\s*[+-]?[0-9]{1,30}\s*", fullmatch=True),
    st.from_regex(r"https?://[a-z0-9.:\[\]]{0,20}(:[0-9]{0,7})?/?", fullmatch=True),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    ).map(json.dumps),
)


def load_text(text: str, env: dict[str, str] | None = None) -> ServerConfig | ConfigError:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.properties"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path, env=env or {})
        except ConfigError as exc:
            assert "\n" not in str(exc) and "\r" not in str(exc)
            return exc


@SETTINGS
@given(st.text(max_size=300))
@example("a=\\u12")
@example("\\")
@example("models=" + "[" * 100_000)
def test_any_text_parses_or_is_a_config_error(text: str) -> None:
    try:
        parsed = parse_properties(text)
    except ConfigError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())
    load_text(text)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
@example({"models": "[" * 100_000})
@example({"model_snapshot": "{" * 100_000})
@example({"job_queue_size": "9" * 5000})
def test_any_value_of_any_key_is_a_config_or_a_config_error(entries: dict[str, str]) -> None:
    text = "".join(f"{key}={escape(value)}\n" for key, value in entries.items())
    assert parse_properties(text) == entries
    load_text(text)
    # The same values from TS_* variables, which bypass the file's syntax entirely.
    env = {f"TS_{key.upper()}": value for key, value in entries.items()}
    load_text("enable_envvars_config=true\n", env)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), values, min_size=2, max_size=6))
def test_exactly_the_bad_keys_are_named(entries: dict[str, str]) -> None:
    def named(message: str, key: str) -> bool:
        return re.search(rf"invalid value for {re.escape(key)}[.:]", message) is not None

    def error(values: dict[str, str]) -> str:
        try:
            ServerConfig.from_properties(values)
        except ConfigError as exc:
            return str(exc)
        return ""

    # Only per-key errors: the https check needs the other keys, and runs once they are all valid.
    bad = {key for key, value in entries.items() if named(error({key: value}), key)}
    message = error(entries)
    assert "\n" not in message
    assert {key for key in entries if named(message, key)} == bad


# ---------------------------------------------------------------- round trip

WHITESPACE = st.text(alphabet=" \t\f", max_size=3)
SEPARATORS = st.sampled_from(["=", ":", " ", " = ", "\t:\t", "\f="])
NEWLINES = st.sampled_from(["\n", "\r\n", "\r"])


def escape_units(text: str, is_key: bool, data: st.DataObject) -> list[str]:
    """``text`` as Java-escaped pieces that can be split apart by continuation lines.

    Whitespace is always escaped, so a continuation line's leading whitespace (which is dropped)
    can never be part of the value; any character may also be written as a ``\\uXXXX`` escape.
    """
    units = []
    for ch in text:
        if ch in "\\\t\n\r\f":
            units.append({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}[ch])
        elif ch in " =:#!":
            units.append("\\" + ch)
        elif data.draw(st.integers(0, 4), label="as unicode escape") == 0:
            encoded = ch.encode("utf-16-be")
            units.append("".join(f"\\u{encoded[i]:02X}{encoded[i + 1]:02X}" for i in range(0, len(encoded), 2)))
        else:
            units.append(ch)
    return units


def escape(text: str) -> str:
    return "".join(
        {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\f": "\\f"}.get(ch, "\\" + ch if ch in " =:#!" else ch)
        for ch in text
    )


@ROUND_TRIP_SETTINGS
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=8), st.data())
def test_escaped_entries_round_trip_across_continuations_and_comments(
    entries: dict[str, str], data: st.DataObject
) -> None:
    lines = []
    for key, value in entries.items():
        separator = data.draw(SEPARATORS, label="separator")
        if not key and not separator.strip():
            separator = "="  # an empty key needs a visible separator, as Properties.store writes it
        units = [*escape_units(key, True, data), separator, *escape_units(value, False, data)]
        line = data.draw(WHITESPACE, label="indent")
        for i, unit in enumerate(units):
            line += unit
            # Not before a separator that starts with whitespace: a continuation line's leading whitespace is dropped.
            splittable = i < len(units) - 1 and units[i + 1][:1] not in (" ", "\t", "\f")
            if splittable and data.draw(st.integers(0, 5), label="split here") == 0:
                line += "\\" + data.draw(NEWLINES) + data.draw(WHITESPACE)
        lines.append(line)
        if data.draw(st.booleans(), label="comment after"):
            # Comments may hold anything but a line break; a trailing backslash does not continue them.
            comment = data.draw(st.text(max_size=15).map(lambda t: "".join(c for c in t if c not in "\r\n")))
            marker, trailer = data.draw(st.sampled_from("#!")), data.draw(st.sampled_from(["", "\\"]))
            lines.append(data.draw(WHITESPACE) + marker + comment + trailer)
        if data.draw(st.booleans(), label="blank after"):
            lines.append(data.draw(WHITESPACE))
    text = "".join(line + data.draw(NEWLINES) for line in lines)
    assert parse_properties(text) == entries
