"""The daemon's own configuration (not cluster state): who am I, where do I read
state from, which interfaces carry traffic.

``parse_config`` reads every section and reports every problem at once, each under
its dotted path (``metrics.listne: unknown key (known: listen)``), the way
``state.parse_state`` does for cluster state; ``load_config`` adds file and line.
``edgectl config check`` and the daemon's start print the same lines.

Durations are seconds as a number, or a string with a unit (``"250ms"``, ``"5s"``,
``"1m"``, ``"1h"``); sizes are bytes as an integer, or a string with a unit
(``"64KiB"``, ``"1MiB"``, ``"500kB"``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from .metrics import DEFAULT_LISTEN, parse_listen
from .proxy.server import ProxySettings
from .sources import SOURCE_KEYS
from .state import Problem, strict_loader, yaml_lines
from .state import _kind as kind_of
from .state import _with_line as with_line

ROLES = ("edge", "worker", "both")
TOP_KEYS = (
    "instance", "role", "host_id", "state", "interfaces", "metrics", "ready_file",
    "refuse", "idle_timeout_s", "resync_interval_s", "attach", "http",
)
REQUIRED_KEYS = ("instance", "role", "host_id", "state")
METRICS_KEYS = ("listen",)

DURATION_UNITS: Mapping[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
SIZE_UNITS: Mapping[str, int] = {
    "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
    "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def default_processes() -> int:
    """HTTP processes when the config names none: one per CPU."""
    return os.cpu_count() or 1


def default_http() -> ProxySettings:
    return ProxySettings(processes=default_processes())


class ConfigError(ValueError):
    """A daemon config that cannot be used; ``problems`` lists every bad field.

    Its text is one line per problem: ``FILE:LINE: path: reason`` when the config
    came from a file (as ``StateError``), ``path: reason`` otherwise.
    """

    def __init__(self, problems: str | Sequence[Problem], source: str | None = None) -> None:
        self.problems = (Problem("", problems),) if isinstance(problems, str) else tuple(problems)
        self.source = source
        super().__init__("\n".join(self.line(p) for p in self.problems))

    def line(self, problem: Problem) -> str:
        if self.source is not None:
            return problem.format(self.source)
        return f"{problem.path}: {problem.reason}" if problem.path else problem.reason


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    instance: str
    role: str
    host_id: str
    state: Mapping[str, Any]  # for sources.make_source; durations already in seconds
    interfaces: tuple[str, ...] = ()
    metrics_listen: str = DEFAULT_LISTEN
    ready_file: Path | None = None
    refuse: str = "rst"  # "rst" | "drop": what a full service does to a new connection
    idle_timeout_s: float = 300.0
    resync_interval_s: float = 1.0
    attach: Literal["xdp", "tc"] | None = None  # fast-path hook; None = the loader's default
    http: ProxySettings = field(default_factory=default_http)  # the `http:` section

    @property
    def is_edge(self) -> bool:
        return self.role in ("edge", "both")

    @property
    def is_worker(self) -> bool:
        return self.role in ("worker", "both")


# ----------------------------------------------------------------- values


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or ``"250ms"``/``"5s"``/``"1m"``/``"1h"``;
    ValueError says what is wrong (without the field, which the caller names)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration (seconds, or a string like 5s, 250ms, 1m), "
                         f"got {kind_of(value)}")
    if isinstance(value, str):
        number, unit = _quantity(value, "duration", "5s, 250ms, 1m")
        if unit not in DURATION_UNITS:
            raise ValueError(f"{value!r}: unknown unit {unit!r} "
                             f"(known: {', '.join(DURATION_UNITS)})")
        seconds = number * DURATION_UNITS[unit]
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r}: a duration must be a finite number >= 0")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or ``"64KiB"``/``"1MiB"``/``"500kB"``/``"512B"``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size (bytes, or a string like 64KiB, 1MiB), "
                         f"got {kind_of(value)}")
    if isinstance(value, int):
        size = value
    else:
        number, unit = _quantity(value, "size", "64KiB, 1MiB")
        if unit not in SIZE_UNITS:
            raise ValueError(f"{value!r}: unknown unit {unit!r} (known: {', '.join(SIZE_UNITS)})")
        exact = number * SIZE_UNITS[unit]
        if exact != int(exact):
            raise ValueError(f"{value!r}: not a whole number of bytes")
        size = int(exact)
    if size < 0:
        raise ValueError(f"{value!r}: a size must be >= 0")
    return size


def _quantity(text: str, what: str, examples: str) -> tuple[float, str]:
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a {what} (examples: {examples})")
    number, unit = match.groups()
    if not unit:
        raise ValueError(f"{text!r}: a {what} string needs a unit (examples: {examples})")
    return float(number), unit


# ----------------------------------------------------------------- reading


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Reader:
    """Reads the config's sections; each reader reports a problem under its path
    and returns None, so parsing goes on and every problem is found in one pass."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def fail(self, path: str, reason: str) -> None:
        self.problems.append(Problem(path, reason))

    def section(self, raw: object, path: str, known: Sequence[str],
                required: Sequence[str] = ()) -> Mapping[str, object] | None:
        """A mapping whose keys are all ``known``; None (``key:`` with nothing) is an
        empty one unless keys are required."""
        if raw is None and not required:
            return {}
        if not isinstance(raw, Mapping):
            where = "" if path else " at the top level"
            self.fail(path, f"expected a mapping{where}, got {kind_of(raw)}")
            return None
        names = ", ".join(sorted(known))
        for name in raw:
            if name not in known:
                self.fail(_join(path, str(name)), f"unknown key (known: {names})")
        for name in required:
            if name not in raw:
                self.fail(_join(path, name), "missing required key")
        return raw

    def string(self, raw: Mapping[str, object], path: str, name: str,
               default: str | None = None) -> str | None:
        value = raw.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(_join(path, name), f"expected a non-empty string, got {kind_of(value)}")
            return None
        return value

    def choice(self, raw: Mapping[str, object], name: str, choices: Sequence[str | None],
               default: str | None) -> str | None:
        value = raw.get(name, default)
        if value not in choices:
            words = [c for c in choices if c is not None]
            listed = " or ".join(words) if len(words) == 2 else "one of " + ", ".join(words)
            self.fail(name, f"{value!r} is not {listed}")
            return None
        assert value is None or isinstance(value, str)
        return value

    def duration(self, raw: Mapping[str, object], path: str, name: str, default: float,
                 *, positive: bool = False) -> float | None:
        if name not in raw:
            return default
        try:
            seconds = parse_duration(raw[name])
        except ValueError as exc:
            self.fail(_join(path, name), str(exc))
            return None
        if positive and seconds <= 0:
            self.fail(_join(path, name), f"{raw[name]!r}: must be more than 0")
            return None
        return seconds

    def strings(self, raw: Mapping[str, object], name: str, *, nonempty: bool = False,
                path: str = "") -> tuple[str, ...] | None:
        value = raw.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(_join(path, name), f"expected a list of strings, got {kind_of(value)}")
            return None
        if nonempty and not value:
            self.fail(_join(path, name), "expected at least one entry")
            return None
        return tuple(value)


def _parse_state(r: _Reader, raw: object) -> dict[str, object] | None:
    """The ``state:`` section, checked against the keys its ``source`` takes."""
    if not isinstance(raw, Mapping):
        r.fail("state", f"expected a mapping, got {kind_of(raw)}")
        return None
    kind = raw.get("source", "file")
    if not isinstance(kind, str) or kind not in SOURCE_KEYS:
        r.fail("state.source", f"{kind!r} is not one of {', '.join(SOURCE_KEYS)}")
        return None
    required = ("endpoints",) if kind == "etcd" else ("path",)
    section = r.section(raw, "state", SOURCE_KEYS[kind], required)
    if section is None:
        return None
    out = dict(section)
    before = len(r.problems)
    if kind == "etcd":
        r.strings(section, "endpoints", nonempty=True, path="state")
        r.string(section, "state", "prefix")
    else:
        r.string(section, "state", "path")
        if "poll_interval" in section:
            out["poll_interval"] = r.duration(section, "state", "poll_interval", 0.0,
                                              positive=True)
    return out if len(r.problems) == before else None


def _parse_http(r: _Reader, raw: object) -> ProxySettings | None:
    """The ``http:`` section: any ProxySettings field, by name. Timeouts and
    intervals are durations; ``processes`` defaults to one per CPU (ProxySettings'
    own default is 1)."""
    defaults = ProxySettings()
    names = [f.name for f in dataclasses.fields(ProxySettings)]
    section = r.section(raw, "http", names)
    if section is None:
        return None
    values: dict[str, Any] = {"processes": default_processes()}
    before = len(r.problems)
    for name, value in section.items():
        if name not in names:
            continue  # reported by section()
        path = _join("http", name)
        kind = type(getattr(defaults, name))
        if kind is float and name.endswith(("_timeout", "_interval")):
            values[name] = r.duration(section, "http", name, 0.0)
            continue
        allowed = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            what = "an integer" if kind is int else "a number"
            r.fail(path, f"expected {what} >= 0, got {kind_of(value)}")
        elif not math.isfinite(value) or value < 0:
            r.fail(path, f"{value!r}: must be a finite number >= 0")
        else:
            values[name] = kind(value)
    if len(r.problems) != before:
        return None
    try:
        return ProxySettings(**values)
    except ValueError as exc:
        r.fail("http", str(exc))
        return None


def _parse_metrics(r: _Reader, raw: object) -> str | None:
    section = r.section(raw, "metrics", METRICS_KEYS)
    if section is None:
        return None
    listen = r.string(section, "metrics", "listen", DEFAULT_LISTEN)
    if listen is None:
        return None
    try:
        parse_listen(listen)  # the endpoint's own reading of host:port
    except ValueError:
        r.fail("metrics.listen", f"{listen!r} is not host:port or [v6]:port")
        return None
    return listen


def config_problems(data: object) -> tuple[DaemonConfig | None, list[Problem]]:
    """The config, or None and every problem found (paths, no lines)."""
    r = _Reader()
    top = r.section(data, "", TOP_KEYS, REQUIRED_KEYS)
    if top is None:
        return None, r.problems
    instance = r.string(top, "", "instance")
    host_id = r.string(top, "", "host_id")
    role = r.choice(top, "role", ROLES, None) if "role" in top else None
    state = _parse_state(r, top["state"]) if "state" in top else None
    interfaces = r.strings(top, "interfaces")
    listen = _parse_metrics(r, top.get("metrics"))
    ready = top.get("ready_file")
    if ready is not None and not isinstance(ready, str):
        r.fail("ready_file", f"expected a path, got {kind_of(ready)}")
    refuse = r.choice(top, "refuse", ("rst", "drop"), "rst")
    attach = r.choice(top, "attach", (None, "xdp", "tc"), None)
    idle = r.duration(top, "", "idle_timeout_s", 300.0)
    resync = r.duration(top, "", "resync_interval_s", 1.0, positive=True)
    http = _parse_http(r, top.get("http"))
    if r.problems:
        return None, r.problems
    assert instance and host_id and role and state is not None and interfaces is not None
    assert listen and refuse and idle is not None and resync is not None and http
    return DaemonConfig(
        instance=instance,
        role=role,
        host_id=host_id,
        state=state,
        interfaces=interfaces,
        metrics_listen=listen,
        ready_file=Path(ready) if isinstance(ready, str) and ready else None,
        refuse=refuse,
        idle_timeout_s=idle,
        resync_interval_s=resync,
        attach=cast(Literal["xdp", "tc"] | None, attach),
        http=http,
    ), r.problems


def parse_config(data: object) -> DaemonConfig:
    """Plain data (as YAML loads it) -> the config; ``ConfigError`` lists every problem."""
    config, problems = config_problems(data)
    if config is None:
        raise ConfigError(problems)
    return config


def load_config(path: Path) -> DaemonConfig:
    """Read and check a YAML config; problems name the file and line. OSError when
    the file cannot be read."""
    text = path.read_bytes()
    loader = strict_loader(text)  # duplicate keys refused, as in state files
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        reason = f"not valid YAML: {err.problem or err.context}"
        raise ConfigError([Problem("", reason, mark.line + 1 if mark else None)],
                          str(path)) from err
    except yaml.YAMLError as err:
        raise ConfigError([Problem("", f"not valid YAML: {err}")], str(path)) from err
    finally:
        loader.dispose()
    config, problems = config_problems(data)
    if config is None:
        lines = yaml_lines(text)
        found = sorted((with_line(p, lines) for p in problems), key=lambda p: p.line or 0)
        raise ConfigError(found, str(path))  # in file order
    return config
