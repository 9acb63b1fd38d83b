"""Reboot policies: one per group, written as TOML files, stored in etcd as canonical JSON.

A policy file is checked in two passes, and every problem of both is reported at once, each with
its key path (``windows[2].start``) and, for files, its line:

1. structure against the JSON Schema shipped in this package (``policy_schema.json``; the copy at
   ``policies/schema.json`` is generated from it): types, enums, bounds, unknown keys;
2. meaning, in code: group names, time zones, Go durations, the windows themselves (parsed by
   :mod:`locksmith.windows`), and the rules that tie fields together.

The etcd form (``to_json``) has the same keys as the file, with windows and durations canonical
(durations as Go-style strings such as ``"1h30m"``), so one schema describes both; reading it
back (``policy_from_json``) is lenient only about missing keys, which take their defaults (a
policy key written by ``set-max`` alone may hold just ``format_version`` and ``slots``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from locksmith.errors import CorruptValueError, InvalidArgumentError, LocksmithError
from locksmith.files import InputFileError, read_bytes
from locksmith.keys import FORMAT_VERSION, check_group
from locksmith.windows import (
    DurationError,
    Window,
    WindowError,
    WindowSet,
    format_duration,
    parse_duration,
    parse_windows,
    resolve_time_zone,
)

if TYPE_CHECKING:
    import jsonschema

__all__ = [
    "DURATION_FIELDS",
    "MAX_NESTING",
    "MAX_POLICY_BYTES",
    "ON_TIMEOUT_ACTIONS",
    "STRATEGIES",
    "CorruptPolicyError",
    "Policy",
    "PolicyError",
    "Problem",
    "default_policy",
    "load_schema",
    "max_slots",
    "parse_policy_file",
    "parse_policy_text",
    "policy_from_json",
    "to_toml",
    "validate_policy_data",
]

SCHEMA_RESOURCE = "policy_schema.json"
STRATEGIES: tuple[str, ...] = ("etcd-lock", "reboot", "off")
ON_TIMEOUT_ACTIONS: tuple[str, ...] = ("hold", "release")
DURATION_FIELDS: tuple[str, ...] = ("reboot_timeout", "cooldown", "min_window_remaining")
# Input bounds (docs/policy.md "Limits"). A policy with the maximum number of windows is a few
# kilobytes; the byte cap only keeps a stray huge file or value from being parsed at all.
MAX_POLICY_BYTES = 1 << 20
# A policy's deepest value is windows[i].days[j]: four levels. Far deeper input is refused before
# anything recurses over it.
MAX_NESTING = 16

# Keys users bring from other tools, with what to write instead.
_KEY_HINTS = {
    "start_time": 'Zincati\'s start_time is written start = "HH:MM" here',
    "length_minutes": 'Zincati\'s length_minutes is written length = "<N>m" here',
    "max": "the number of concurrent reboots is slots",
    "reboot_strategy": "the strategy key is strategy",
    "timezone": "the key is time_zone",
    "tz": "the key is time_zone",
}


# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy: where (key path, and line in a file) and what."""

    path: str
    message: str
    line: int | None = None

    def format(self, source: str | None = None) -> str:
        where = "" if source is None else source
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        head = f"{where}: " if where else ""
        return f"{head}{self.path}: {self.message}" if self.path else f"{head}{self.message}"

    def __str__(self) -> str:
        return self.format()


class PolicyError(LocksmithError):
    """A policy that cannot be used. ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: Iterable[Problem], *, source: str = "<text>") -> None:
        self.problems: list[Problem] = sorted(problems, key=_problem_order)
        self.source = source
        n = len(self.problems)
        parts = "; ".join(p.format(source if p.line is not None else None) for p in self.problems)
        # Exception.__init__ directly: the subclass also derives from CorruptValueError, whose
        # __init__ takes other arguments.
        Exception.__init__(self, f"invalid policy {source} ({n} problem{'s' if n != 1 else ''}): {parts}")

    def describe(self) -> str:
        """Multi-line form for a terminal: a summary line, then one problem per line, compiler style."""
        n = len(self.problems)
        head = f"invalid policy {self.source} ({n} problem{'s' if n != 1 else ''})"
        return "\n".join([head, *(p.format(self.source) for p in self.problems)])


class CorruptPolicyError(PolicyError, CorruptValueError):
    """A stored policy (etcd JSON) that does not parse; ``key`` names the etcd key."""

    def __init__(self, key: str, problems: Iterable[Problem]) -> None:
        PolicyError.__init__(self, problems, source=key)
        self.key = key
        self.problem = "; ".join(p.format() for p in self.problems)
        # Same wording as CorruptValueError, so callers catching either read the same line.
        self.args = (f"stored value at {key!r} is invalid: {self.problem}",)


def _problem_order(p: Problem) -> tuple[int, str]:
    return (p.line if p.line is not None else 1 << 30, p.path)


# ---------------------------------------------------------------------------------------------
# The policy


@dataclass(frozen=True)
class Policy:
    """One group's reboot policy, normalised. Equal policies compare equal however written."""

    group: str | None
    slots: int = 1
    windows: tuple[Window, ...] = ()
    time_zone: str = "UTC"
    strategy: str = "etcd-lock"
    reboot_timeout: timedelta = timedelta(hours=1)
    on_timeout: str = "hold"
    failure_budget: int = 0
    cooldown: timedelta = timedelta(0)
    min_window_remaining: timedelta = timedelta(0)
    paused: bool = False
    paused_reason: str | None = None
    _window_set: WindowSet | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    def window_set(self) -> WindowSet:
        """The windows as a queryable :class:`locksmith.windows.WindowSet` (is_open, next_open,
        remaining, current_window_end), in this policy's time zone."""
        if self._window_set is None:
            object.__setattr__(self, "_window_set", WindowSet(self.windows, self.time_zone))
        assert self._window_set is not None
        return self._window_set

    def to_json(self) -> dict[str, Any]:
        """The etcd form: every key present (``group`` and ``paused_reason`` only when set),
        windows canonical, durations as Go-style strings."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        if self.group is not None:
            out["group"] = self.group
        out.update(
            slots=self.slots,
            time_zone=self.time_zone,
            windows=[w.to_json() for w in self.windows],
            strategy=self.strategy,
            reboot_timeout=format_duration(self.reboot_timeout),
            on_timeout=self.on_timeout,
            failure_budget=self.failure_budget,
            cooldown=format_duration(self.cooldown),
            min_window_remaining=format_duration(self.min_window_remaining),
            paused=self.paused,
        )
        if self.paused_reason is not None:
            out["paused_reason"] = self.paused_reason
        return out

    def to_json_bytes(self) -> bytes:
        """``to_json`` encoded the one way the store writes it (sorted keys, compact), so equal
        policies give equal bytes and an unchanged apply can be detected by comparing values."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def default_policy(group: str | None) -> Policy:
    """The policy of a group that has none stored: the schema's defaults (slots 1, always open,
    etcd-lock, reboot_timeout 1h held on timeout, failure budget 0, no cooldown)."""
    defaults = _schema_defaults()
    return Policy(
        group=group,
        slots=defaults["slots"],
        windows=(),
        time_zone=defaults["time_zone"],
        strategy=defaults["strategy"],
        reboot_timeout=parse_duration(defaults["reboot_timeout"]),
        on_timeout=defaults["on_timeout"],
        failure_budget=defaults["failure_budget"],
        cooldown=parse_duration(defaults["cooldown"]),
        min_window_remaining=parse_duration(defaults["min_window_remaining"]),
        paused=defaults["paused"],
        paused_reason=None,
    )


# ---------------------------------------------------------------------------------------------
# Reading


def parse_policy_text(text: str, *, source: str = "<text>", group: str | None = None) -> Policy:
    """Parse a TOML policy. ``group`` (e.g. from ``--group``) fills in a file without one, and
    must agree with a file that has one. Raises :class:`PolicyError` listing every problem."""
    # Many editors on Windows start UTF-8 files with a byte-order mark; TOML forbids it, but it
    # carries no meaning, so it is dropped rather than reported as a syntax error in column 1.
    text = text.removeprefix("\ufeff")
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError([Problem("", f"policy text is too large ({len(text)} characters; the limit is "
                                       f"{MAX_POLICY_BYTES})")], source=source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([_toml_syntax_problem(exc, text, _TomlLocator(text))], source=source) from None
    except RecursionError:
        raise PolicyError([Problem("", f"TOML syntax error: arrays or tables nested too deeply "
                                       f"(at most {MAX_NESTING} levels make sense in a policy)")],
                          source=source) from None
    except ValueError as exc:  # an integer of thousands of digits: Python's int() limit
        raise PolicyError([Problem("", f"TOML syntax error: {exc}".split(";")[0])], source=source) from None
    locate = _TomlLocator(text).line
    return _build(data, locate=locate, source=source, group=group, error=_file_error(source))


def parse_policy_file(path: str | os.PathLike[str], *, group: str | None = None) -> Policy:
    """Read and parse a policy file (see :func:`parse_policy_text`)."""
    source = os.fspath(path)
    try:
        text = read_bytes(path, max_bytes=MAX_POLICY_BYTES, what="policy file").decode("utf-8")
    except InputFileError as exc:
        raise PolicyError([Problem("", f"cannot read: {exc.problem}")], source=source) from None
    except UnicodeDecodeError as exc:
        raise PolicyError([Problem("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")], source=source) from None
    return parse_policy_text(text, source=source, group=group)


def policy_from_json(data: Mapping[str, Any] | bytes | str, *, key: str) -> Policy:
    """Read the etcd form. Missing keys take their defaults; anything else wrong raises
    :class:`CorruptPolicyError` (a :class:`PolicyError` and a ``CorruptValueError``) naming ``key``."""
    if isinstance(data, bytes | str):
        if len(data) > MAX_POLICY_BYTES:
            raise CorruptPolicyError(key, [Problem("", f"{len(data)} bytes, more than the {MAX_POLICY_BYTES} a "
                                                       "policy may take")])
        try:
            data = json.loads(data)
        except RecursionError:
            raise CorruptPolicyError(key, [Problem("", "not JSON: nested too deeply")]) from None
        except ValueError as exc:  # also UnicodeDecodeError and int()'s digit limit
            raise CorruptPolicyError(key, [Problem("", f"not JSON: {str(exc).split(';')[0]}")]) from None
    return _build(data, locate=lambda _path: None, source=key, group=None, error=lambda ps: CorruptPolicyError(key, ps))


def validate_policy_data(data: Any) -> list[Problem]:
    """Every problem with already-decoded policy data (file or etcd form), without line numbers;
    empty when it is valid."""
    try:
        _build(data, locate=lambda _path: None, source="<data>", group=None, error=_file_error("<data>"))
    except PolicyError as exc:
        return exc.problems
    return []


def _file_error(source: str) -> Callable[[list[Problem]], PolicyError]:
    return lambda problems: PolicyError(problems, source=source)


def _build(
    data: Any,
    *,
    locate: Callable[[str], int | None],
    source: str,
    group: str | None,
    error: Callable[[list[Problem]], PolicyError],
) -> Policy:
    problems: list[Problem] = []

    def add(path: str, message: str) -> None:
        problems.append(Problem(path, message, locate(path)))

    if not isinstance(data, Mapping):
        raise error([Problem("", f"a policy must be a table/object of keys, got {_describe(data)}")])
    deep = _too_deep(data, MAX_NESTING)
    if deep is not None:
        # Before the schema pass: jsonschema recurses per level and would hit Python's limit.
        raise error([Problem(deep, f"nested more than {MAX_NESTING} levels deep; a policy needs at most 4")])

    broken: set[str] = set()  # top-level keys (and "windows[i]") that failed the structural pass
    errors = list(_validator().iter_errors(data))
    # A value of the wrong type also fails its const/enum/minimum; the type is the one to report.
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    for err in errors:
        if err.validator != "type" and tuple(err.absolute_path) in mistyped:
            continue
        for path, message in _schema_problems(err):
            add(path, message)
            # A bad window spoils only itself: the other windows are still checked for meaning.
            m = re.match(r"^windows\[\d+\]", path)
            broken.add(m.group(0) if m else path.split(".")[0].split("[")[0])
    defaults = _schema_defaults()

    def value(name: str) -> Any:
        return data[name] if name in data and name not in broken else defaults.get(name)

    # group: the file's, or the caller's; both given must agree.
    file_group = value("group")
    if file_group is not None:
        try:
            check_group(file_group)
        except InvalidArgumentError as exc:
            add("group", str(exc).replace(f"group {file_group!r} is invalid: ", f"invalid group name {file_group!r}: "))
            file_group = None
    if group is not None and file_group is not None and group != file_group:
        add("group", f"the file is for group {file_group!r} but group {group!r} was asked for")
    the_group = file_group if file_group is not None else group

    durations: dict[str, timedelta] = {}
    for name in DURATION_FIELDS:
        if name in broken:
            continue
        raw = value(name)
        try:
            d = parse_duration(raw, where=name)
        except DurationError as exc:
            add(name, exc.problem)
            broken.add(name)
            continue
        if d.microseconds:
            add(name, f"{raw!r} must be a whole number of seconds")
            broken.add(name)
            continue
        durations[name] = d
    if "reboot_timeout" in durations and durations["reboot_timeout"] <= timedelta(0):
        add("reboot_timeout", f"must be more than zero, got {data.get('reboot_timeout')!r}")
        broken.add("reboot_timeout")

    time_zone = value("time_zone")
    # "localtime" is resolved by each host when it uses the windows: whether the checking
    # machine's own TZ setting is sound says nothing about the policy.
    if "time_zone" not in broken and time_zone != "localtime":
        try:
            resolve_time_zone(time_zone, where="time_zone")
        except WindowError as exc:
            add("time_zone", exc.problem)

    windows: tuple[Window, ...] = ()
    windows_ok = "windows" not in broken
    if windows_ok:
        raw_windows = value("windows") or []
        parsed: list[Window] = []
        for i, raw_window in enumerate(raw_windows):
            here = f"windows[{i}]"
            if here in broken:
                windows_ok = False
                continue
            try:
                # One window at a time so that every bad window is reported, not just the first.
                ws = parse_windows([raw_window], "UTC", where="windows")
            except WindowError as exc:
                add(_renumber(exc.where, i), exc.problem)
                windows_ok = False
                continue
            parsed.extend(ws.windows)
        if windows_ok:
            try:
                windows = WindowSet(parsed, "UTC").windows  # normalising needs no zone
            except WindowError as exc:  # too many starts a week in all
                add("windows", exc.problem)

    if windows and "min_window_remaining" in durations:
        longest = max(w.length for w in windows)
        if durations["min_window_remaining"] >= longest:
            add(
                "min_window_remaining",
                f"{format_duration(durations['min_window_remaining'])} is not shorter than the longest window "
                f"({format_duration(longest)}): no reboot could ever start",
            )

    paused = value("paused")
    reason = value("paused_reason")
    if "paused_reason" not in broken and reason is not None and paused is not True:
        add("paused_reason", "is only allowed with paused = true")

    if problems:
        raise error(problems)
    return Policy(
        group=the_group,
        slots=value("slots"),
        windows=windows,
        time_zone=time_zone,
        strategy=value("strategy"),
        reboot_timeout=durations["reboot_timeout"],
        on_timeout=value("on_timeout"),
        failure_budget=value("failure_budget"),
        cooldown=durations["cooldown"],
        min_window_remaining=durations["min_window_remaining"],
        paused=paused,
        paused_reason=reason,
    )


def _too_deep(data: Any, limit: int) -> str | None:
    """The path of the first value nested deeper than ``limit`` lists/tables, else None.
    Iterative, so it cannot itself run out of stack."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > limit:
            return path
        if isinstance(value, Mapping):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
    return None


def _renumber(where: str, index: int) -> str:
    """Map a path from a one-window parse (``windows[0]...``) back to the window's real index."""
    return re.sub(r"^windows\[0\]", f"windows[{index}]", where)


# ---------------------------------------------------------------------------------------------
# The schema and its messages


@cache
def load_schema() -> dict[str, Any]:
    """The policy JSON Schema (draft 2020-12) shipped in this package."""
    text = resources.files("locksmith").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def max_slots() -> int:
    """The largest ``slots`` a policy may have (the schema's bound; ``set-max`` keeps to it too)."""
    return int(load_schema()["properties"]["slots"]["maximum"])


@cache
def _schema_defaults() -> dict[str, Any]:
    props = load_schema()["properties"]
    return {name: spec["default"] for name, spec in props.items() if "default" in spec}


def _is_int(_checker: Any, instance: Any) -> bool:
    # The draft's "integer" admits 2.0; a slot count written as a float is a mistake worth naming.
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _validator() -> jsonschema.protocols.Validator:
    # Imported on the first validation (~4 MiB resident): an agent whose group has no stored
    # policy, or that does not coordinate through etcd, never validates one.
    import jsonschema

    schema = load_schema()
    base = jsonschema.Draft202012Validator
    base.check_schema(schema)
    checker = base.TYPE_CHECKER.redefine("integer", _is_int)
    cls = jsonschema.validators.extend(base, type_checker=checker)
    return cls(schema)


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "a boolean (true or false)",
    "array": "a list",
    "object": "a table",
    "number": "a number",
    "null": "null",
}


def _describe(value: Any) -> str:
    """A value as a TOML user would name it."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, datetime):
        return f"date-time {value.isoformat()}"
    if isinstance(value, date):
        return f"date {value.isoformat()}"
    if isinstance(value, time):
        return f"time {value.isoformat()} (quote it)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, Sequence):
        return "a list"
    if value is None:
        return "null"
    return type(value).__name__


def _join_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_problems(err: jsonschema.ValidationError) -> list[tuple[str, str]]:
    path = _join_path(err.absolute_path)
    kind = err.validator
    inst = err.instance
    if kind == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        out = []
        for key in inst:
            if key in allowed:
                continue
            message = f"unknown key {key!r}"
            hint = _KEY_HINTS.get(key)
            close = difflib.get_close_matches(key, allowed, n=1)
            if hint:
                message += f" ({hint})"
            elif close:
                message += f" (did you mean {close[0]!r}?)"
            else:
                message += f" (allowed: {', '.join(allowed)})"
            out.append((_join_path([*err.absolute_path, key]), message))
        return out
    if kind == "required":
        out = []
        for key in err.validator_value:
            if key not in inst:
                hint = f" (add {key} = {FORMAT_VERSION})" if key == "format_version" else ""
                out.append((_join_path([*err.absolute_path, key]), f"required key is missing{hint}"))
        return out
    if kind == "type":
        wanted = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in wanted)
        return [(path, f"must be {words}, got {_describe(inst)}")]
    if kind == "const" and path == "format_version":
        return [(path, f"unsupported format version {inst!r} (this locksmith reads format_version {FORMAT_VERSION})")]
    if kind == "enum":
        choices = ", ".join(repr(c) for c in err.validator_value)
        extra = " (best-effort is gone: use etcd-lock)" if path == "strategy" and inst == "best-effort" else ""
        return [(path, f"must be one of {choices}, got {inst!r}{extra}")]
    if kind == "minimum":
        return [(path, f"must be at least {err.validator_value}, got {inst!r}")]
    if kind == "maximum":
        return [(path, f"must be at most {err.validator_value}, got {inst!r}")]
    if kind == "maxItems":
        return [(path, f"has {len(inst)} entries; at most {err.validator_value} are allowed")]
    if kind == "minItems":
        return [(path, "must not be empty" + (" (list day names, or write 'daily')" if path.endswith("days") else ""))]
    return [(path, err.message)]


# ---------------------------------------------------------------------------------------------
# Where things are in a TOML text

_TOML_ERR_AT = re.compile(r"^(?P<msg>.*?) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$")
_BARE_KEY = r"[A-Za-z0-9_-]+"
_QUOTED_KEY = r"\"(?:[^\"\\]|\\.)*\"|'[^']*'"
_KEY = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_AOT_HEADER = re.compile(rf"^\s*\[\[\s*(?P<key>{_DOTTED})\s*\]\]")
_TABLE_HEADER = re.compile(rf"^\s*\[\s*(?P<key>{_DOTTED})\s*\]")
_KEY_LINE = re.compile(rf"^\s*(?P<key>{_DOTTED})\s*=")


def _toml_syntax_problem(exc: tomllib.TOMLDecodeError, text: str, locator: _TomlLocator) -> Problem:
    m = _TOML_ERR_AT.match(str(exc))
    if not m:
        return Problem("", f"TOML syntax error: {exc}")
    if m.group("line"):
        line = int(m.group("line"))
        where = f"column {m.group('col')}"
    else:
        line = max(1, len(text.splitlines()))
        where = "at end of file"
    message = m.group("msg")
    if message.startswith("Cannot overwrite a value"):
        message = "duplicate key (a key may be set only once)"
    elif message.startswith("Cannot declare"):
        message = f"duplicate table: {message}"
    return Problem(locator.path_at(line), f"TOML syntax error: {message} ({where})", line)


def _split_dotted(key: str) -> list[str]:
    parts = re.findall(_KEY, key)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


class _TomlLocator:
    """Maps key paths (``windows[1].start``) to the line that sets them, by a line scan of the
    text; good for the tables and keys a policy has, with multi-line values skipped over."""

    def __init__(self, text: str) -> None:
        self._lines: dict[str, int] = {}
        self._paths: dict[int, str] = {}  # line -> the key or table it sets
        aot_count: dict[str, int] = {}
        prefix = ""
        depth = 0  # open brackets of a multi-line array or inline table
        in_multiline: str | None = None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw
            if in_multiline is not None:
                if in_multiline in line:
                    in_multiline = None
                continue
            if depth == 0:
                m = _AOT_HEADER.match(line)
                if m:
                    name = ".".join(_split_dotted(m.group("key")))
                    index = aot_count.get(name, 0)
                    aot_count[name] = index + 1
                    prefix = f"{name}[{index}]"
                    self._lines.setdefault(prefix, number)
                    self._paths[number] = prefix
                    self._lines.setdefault(name, number)
                    continue
                m = _TABLE_HEADER.match(line)
                if m:
                    prefix = ".".join(_split_dotted(m.group("key")))
                    self._lines.setdefault(prefix, number)
                    self._paths[number] = prefix
                    continue
                m = _KEY_LINE.match(line)
                if m:
                    key = ".".join(_split_dotted(m.group("key")))
                    path = f"{prefix}.{key}" if prefix else key
                    self._lines.setdefault(path, number)
                    self._paths[number] = path
                    line = line[m.end() :]
            stripped = _strip_strings(line)
            for quote in ('"""', "'''"):
                if stripped.count(quote) % 2 == 1:
                    in_multiline = quote
            depth = max(
                0, depth + stripped.count("[") + stripped.count("{") - stripped.count("]") - stripped.count("}")
            )

    def path_at(self, line: int) -> str:
        """The key or table set on ``line``; empty when none is."""
        return self._paths.get(line, "")

    def line(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest located parent; None when nothing matches."""
        while path:
            if path in self._lines:
                return self._lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            if cut <= 0:
                return None
            path = path[:cut]
        return None


def _strip_strings(line: str) -> str:
    """The line with single-line strings and a trailing comment removed, for bracket counting;
    an opening triple quote is left in place."""
    out = re.sub(r'"(?:[^"\\]|\\.)*"(?!")|\'[^\']*\'(?!\')', '""', line.replace('"""', "\x00").replace("'''", "\x01"))
    out = out.split("#", 1)[0]
    return out.replace("\x00", '"""').replace("\x01", "'''")


# ---------------------------------------------------------------------------------------------
# Writing TOML


def to_toml(policy: Policy) -> str:
    """The policy as a policy file (``policy get --output toml``); parses back to an equal policy."""
    out = [f"format_version = {FORMAT_VERSION}"]
    if policy.group is not None:
        out.append(f"group = {_toml_str(policy.group)}")
    out += [
        f"slots = {policy.slots}",
        f"strategy = {_toml_str(policy.strategy)}",
        f"time_zone = {_toml_str(policy.time_zone)}",
        f"reboot_timeout = {_toml_str(format_duration(policy.reboot_timeout))}",
        f"on_timeout = {_toml_str(policy.on_timeout)}",
        f"failure_budget = {policy.failure_budget}",
        f"cooldown = {_toml_str(format_duration(policy.cooldown))}",
        f"min_window_remaining = {_toml_str(format_duration(policy.min_window_remaining))}",
        f"paused = {'true' if policy.paused else 'false'}",
    ]
    if policy.paused_reason is not None:
        out.append(f"paused_reason = {_toml_str(policy.paused_reason)}")
    if not policy.windows:
        out.append("windows = []  # always open")
    for window in policy.windows:
        out.append("")
        out.append("[[windows]]")
        for key, val in window.to_json().items():
            if isinstance(val, list):
                out.append(f"{key} = [{', '.join(_toml_str(v) for v in val)}]")
            else:
                out.append(f"{key} = {_toml_str(val)}")
    return "\n".join(out) + "\n"


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
